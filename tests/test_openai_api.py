"""OpenAI's Images API (POST /v1/images/generations) driven by the official `openai` client against a live
server on the tiny demo models (torch, 64x64)."""

import base64
import io

import httpx
import openai
import pytest
from PIL import Image
from test_server import AUTH, KEY, start_server


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(["--models", "SD1.5,SDXL1.0-base"])
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)


def test_generates_pngs_of_the_asked_size(server):
    answer = client(server).images.generate(model="SD1.5", prompt="a red cube", size="64x64", n=2,
                                            response_format="b64_json")
    assert len(answer.data) == 2 and answer.created > 0
    for item in answer.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 64)
        assert item.revised_prompt == "a red cube"


def test_model_defaults_to_the_first_served_and_size_may_be_oblong(server):
    resp = httpx.post(f"{server}/v1/images/generations", headers=AUTH, timeout=300,
                      json={"prompt": "x", "size": "64x128", "quality": "hd", "style": "vivid", "user": "u1"})
    assert resp.status_code == 200, resp.text
    image = Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"])))
    assert image.size == (64, 128)


def test_errors_come_in_openai_shape(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "wrong").images.generate(model="SD1.5", prompt="x", size="64x64")
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as caught:
        client(server).images.generate(model="SDXL-turbo", prompt="x", size="64x64")
    assert caught.value.body["param"] == "model" and "not served" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(server).images.generate(model="dall-e-3", prompt="x", size="64x64")
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).images.generate(model="SD1.5", prompt="x", size="65x64")
    assert "size" in caught.value.message and caught.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).images.generate(model="SD1.5", prompt="x", size="64x64", n=5)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).images.generate(model="SD1.5", prompt="x", size="64x64", response_format="url")
    assert "b64_json" in caught.value.message and caught.value.body["param"] == "response_format"
    resp = httpx.post(f"{server}/v1/images/generations", headers=AUTH, json={"prompt": "x", "seed": 1})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed"


def test_other_routes_keep_the_reference_shape(server):
    resp = httpx.post(f"{server}/v1/image/generation", headers={"Authorization": "Bearer wrong"}, json={})
    assert resp.status_code == 401 and resp.json()["object"] == "error"
