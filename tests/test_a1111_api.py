"""AUTOMATIC1111's API (/sdapi/v1) driven by the `webuiapi` client against a live server on the tiny demo
models (torch, 64x64): generation, listings, per-key options, progress and interrupt, Basic auth."""

import base64
import io
import threading
import time

import httpx
import pytest
import webuiapi
from PIL import Image
from test_server import KEY, start_server

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.samplers import A1111_SAMPLERS, get_a1111_sampler

OTHER_KEY = "other-key-456"


@pytest.fixture(scope="module")
def server(lora_folder):
    proc, url = start_server(["--models", "SD1.5,SDXL1.0-base", "--lora-dir", str(lora_folder)],
                             env_extra={"SDAOT_API_KEYS": f"{KEY},{OTHER_KEY}"})
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def api(url: str, key: str = KEY) -> webuiapi.WebUIApi:
    port = int(url.rpartition(":")[2])
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="anyone", password=key)
    return client


def test_txt2img_answers_pngs_and_info(server):
    result = api(server).txt2img(prompt="a red cube", negative_prompt="blurry", width=64, height=64, steps=2,
                                 sampler_name="Euler a", seed=5, batch_size=2, cfg_scale=6)
    assert len(result.images) == 2 and all(image.size == (64, 64) for image in result.images)
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5, 6]
    assert result.info["sampler_name"] == "Euler a" and result.info["steps"] == 2
    assert result.info["sd_model_name"] == "SD1.5" and "Seed: 6" in result.info["infotexts"][1]
    assert result.parameters["prompt"] == "a red cube" and result.parameters["alwayson_scripts"] == {}


def test_karras_scheduler_old_names_and_unknown_samplers(server):
    result = api(server).txt2img(prompt="x", width=64, height=64, steps=2, sampler_name="DPM++ 2M",
                                 scheduler="Karras", n_iter=2, seed=-1)
    assert len(result.images) == 2 and result.info["scheduler"] == "Karras"
    assert result.info["all_seeds"][1] == result.info["seed"] + 1
    result = api(server).txt2img(prompt="x", width=64, height=64, steps=2, sampler_name="DPM++ 2M Karras")
    assert result.info["sampler_name"] == "DPM++ 2M" and result.info["scheduler"] == "Karras"
    with pytest.raises(RuntimeError) as caught:
        api(server).txt2img(prompt="x", width=64, height=64, steps=2, sampler_name="DPM fast")
    status, text = caught.value.args
    assert status == 400 and "sampler_name" in text and "Euler a" in text
    with pytest.raises(RuntimeError) as caught:
        api(server).txt2img(prompt="x", width=64, height=64, steps=2, batch_size=3, n_iter=2)
    assert caught.value.args[0] == 422 and "batch_size * n_iter" in caught.value.args[1]
    with pytest.raises(RuntimeError) as caught:
        api(server).txt2img(prompt="x", width=60, height=64, steps=2)
    assert caught.value.args[0] == 422 and '"detail":"width:' in caught.value.args[1]


def test_img2img_and_send_images(server):
    start = Image.new("RGB", (96, 64), (200, 30, 30))
    result = api(server).img2img(images=[start], prompt="x", denoising_strength=0.5, width=64, height=64, steps=4,
                                 seed=3)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["denoising_strength"] == 0.5 and result.parameters["init_images"] is None
    result = api(server).txt2img(prompt="x", width=64, height=64, steps=1, send_images=False, save_images=True)
    assert result.images == [] and result.info["all_seeds"]


def test_listings(server):
    client = api(server)
    models = client.get_sd_models()
    assert [m["title"] for m in models] == ["SD1.5", "SDXL1.0-base"]
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    names = {s["name"]: s for s in client.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LCM"} <= set(names)
    assert names["DPM++ 2M"]["options"] == {"scheduler": "karras"} and names["Euler a"]["aliases"] == ["k_euler_a"]
    assert {s["name"] for s in client.get_schedulers()} == {"automatic", "uniform", "karras"}
    loras = {lora["name"]: lora for lora in client.get_loras()}
    assert "Pixel_Art" in loras and loras["Pixel_Art"]["path"] == "Pixel_Art.safetensors"


def test_options_switch_the_model_per_key(server):
    mine, other = api(server), api(server, OTHER_KEY)
    assert mine.get_options()["sd_model_checkpoint"] == "SD1.5"
    mine.set_options({"sd_model_checkpoint": "SDXL1.0-base", "CLIP_stop_at_last_layers": 2})
    assert mine.util_get_current_model() == "SDXL1.0-base"
    assert other.util_get_current_model() == "SD1.5"
    assert mine.txt2img(prompt="x", width=64, height=64, steps=1).info["sd_model_name"] == "SDXL1.0-base"
    assert other.txt2img(prompt="x", width=64, height=64, steps=1).info["sd_model_name"] == "SD1.5"
    overridden = other.txt2img(prompt="x", width=64, height=64, steps=1,
                               override_settings={"sd_model_checkpoint": "SDXL1.0-base"})
    assert overridden.info["sd_model_name"] == "SDXL1.0-base"
    resp = mine.session.post(f"{mine.baseurl}/options", json={"sd_model_checkpoint": "SDXL-turbo"})
    assert resp.status_code == 404 and "sd_model_checkpoint" in resp.json()["detail"]
    resp = mine.session.post(f"{mine.baseurl}/options", json={"show_progress_every_n_steps": "often"})
    assert resp.status_code == 422 and resp.json()["detail"].startswith("show_progress_every_n_steps:")
    resp = mine.session.post(f"{mine.baseurl}/txt2img", json={"override_settings": {"sd_model_checkpoint": 1}})
    assert resp.status_code == 422 and "override_settings.sd_model_checkpoint" in resp.json()["detail"]
    mine.set_options({"sd_model_checkpoint": "SD1.5"})


def _long_txt2img(client: webuiapi.WebUIApi, outcome: dict) -> threading.Thread:
    def run() -> None:
        started = time.time()
        outcome["result"] = client.txt2img(prompt="x", width=256, height=256, steps=150, seed=1)
        outcome["seconds"] = time.time() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for(client: webuiapi.WebUIApi, ready, timeout_s: float = 60) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        progress = client.get_progress()
        if ready(progress):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"progress never got there: {progress}")


@pytest.mark.slow  # a long 256x256 generation, interrupted
def test_progress_and_interrupt(server):
    client, other = api(server), api(server, OTHER_KEY)
    assert client.get_progress()["state"]["job_count"] == 0
    outcome: dict = {}
    thread = _long_txt2img(client, outcome)
    progress = _wait_for(client, lambda p: p["progress"] > 0)
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] == 1
    assert 0 < progress["progress"] < 1 and progress["textinfo"].startswith("Step ")
    assert other.get_progress()["state"]["job_count"] == 0  # another key sees nothing of it
    other.interrupt()
    assert client.get_progress()["state"]["interrupted"] is False
    client.interrupt()
    thread.join(timeout=120)
    assert not thread.is_alive(), "an interrupted generation ends at its next step"
    result = outcome["result"]
    assert result.images == [] and result.info["interrupted"] is True
    assert client.get_progress()["state"]["job_count"] == 0


@pytest.mark.slow  # a long 256x256 generation, interrupted
def test_progress_shows_a_live_preview(server):
    client = api(server)
    client.set_options({"show_progress_every_n_steps": 1})
    outcome: dict = {}
    thread = _long_txt2img(client, outcome)
    try:
        progress = _wait_for(client, lambda p: p["current_image"] is not None)
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.format == "WEBP"
    finally:
        client.interrupt()
        thread.join(timeout=30)
        client.set_options({"show_progress_every_n_steps": 10})


def test_auth(server):
    url = f"{server}/sdapi/v1/sd-models"
    resp = httpx.get(url, auth=("anyone", "wrong"))
    assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Basic")
    assert set(resp.json()) == {"error", "detail", "body", "errors"}
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(url, auth=("", KEY)).status_code == 200
    assert httpx.get(f"{server}/v1/models", auth=("anyone", KEY)).status_code == 401  # Basic: /sdapi/ only


def test_every_a1111_sampler_name_runs_a_sampler_of_the_table():
    for name, entry in A1111_SAMPLERS.items():
        assert get_a1111_sampler(name, "automatic")[2].name == (entry.karras if entry.karras_by_default
                                                                else entry.plain)
        assert get_a1111_sampler(entry.alias, "uniform")[2].name == entry.plain
        if entry.karras:
            assert get_a1111_sampler(f"{name} Karras", None)[2].name == entry.karras
    with pytest.raises(InvalidRequestError) as caught:
        get_a1111_sampler("Euler a", "exponential")
    assert caught.value.param == "scheduler" and "karras" in caught.value.message
