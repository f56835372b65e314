"""The HTTP API over a real uvicorn on a loopback port, talked to with an HTTP client."""

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from PIL import Image

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_KEYS = {"object", "message", "type", "param", "code"}

pytestmark = pytest.mark.slow  # the server serves compiled artifacts (conftest.compiled_root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra_args, env_extra=None, wait_for="/readyz"):
    port = free_port()
    env = dict(os.environ, SDAOT_API_KEYS=KEY) | (env_extra or {})
    cmd = [sys.executable, "-m", "sdaot.runtime.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           *extra_args]
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads fills up and blocks the server's logging
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # the server's output, for tests that read its log
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}{wait_for}", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(log.read())
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready")


@pytest.fixture(scope="module")
def server(compiled_root, lora_folder):
    proc, url = start_server(["--models", "SD1.5,SDXL1.0-base,SD1.5-ControlNet", "--artifacts", str(compiled_root),
                              "--lora-dir", str(lora_folder)])
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def post(url, body, headers=AUTH, timeout=600):
    return httpx.post(f"{url}/v1/image/generation", json=body, headers=headers, timeout=timeout)


def assert_error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == ERROR_KEYS and body["object"] == "error" and body["code"] == status
    if param:
        assert body["param"] == param, body
    return body


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_reference_example_request_answers_a_1024_image(server):
    body = {"model_name": "SDXL1.0-base", "prompt": "a photo of an astronaut riding a horse on mars",
            "height": 1024, "width": 1024, "backend": "auto"}
    resp = post(server, body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert set(data) >= {"images", "inference_time"}
    image = data["images"][0]
    assert set(image) == {"image", "index", "random_seed"} and image["index"] == 0
    img = decode(image["image"])
    assert img.format == "PNG" and img.size == (1024, 1024)
    assert data["backends"]["unet"] == "torch"


def test_tvm_and_torch_backends_both_answer(server):
    for backend in ("tvm", "torch", "onnxruntime"):
        resp = post(server, {"model_name": "SD1.5", "prompt": "a red cube", "height": 64, "width": 64, "steps": 2,
                             "seed": 3, "backend": backend, "output_format": "jpeg"})
        assert resp.status_code == 200, resp.text
        assert set(resp.json()["backends"].values()) == {backend}
        img = decode(resp.json()["images"][0]["image"])
        assert img.format == "JPEG" and img.size == (64, 64)
    missing = post(server, {"model_name": "SD1.5", "prompt": "x", "height": 72, "width": 64, "backend": "tvm"})
    assert "64x64" in assert_error(missing, 400, "backend")["message"]


def test_img2img_with_a_data_url(server):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    resp = post(server, {"model_name": "SD1.5", "prompt": "x", "steps": 2, "image": data_url, "strength": 0.5})
    assert resp.status_code == 200, resp.text
    assert decode(resp.json()["images"][0]["image"]).size == (64, 64), "img2img keeps the image's size"


def test_auth(server):
    body = {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 1}
    assert_error(post(server, body, headers={}), 401)
    assert_error(post(server, body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{server}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("patch", "status", "param"),
    [
        ({"height": 65}, 422, "height"),
        ({"strength": 1.5}, 422, "strength"),
        ({"steps": 0}, 422, "steps"),
        ({"num_images": 9}, 422, "num_images"),
        ({"backend": "gpu"}, 422, "backend"),
        ({"surprise": 1}, 422, "surprise"),
        ({"model_name": "SD9"}, 404, "model_name"),
        ({"sampler": "Eulr"}, 400, "sampler"),
        ({"style_preset": "Cubism"}, 400, "style_preset"),
        ({"image": "not base64!!"}, 400, "image"),
        ({"image": base64.b64encode(b"hello world, not an image").decode()}, 400, "image"),
        ({"enable_refiner": True}, 400, "enable_refiner"),
    ],
)
def test_invalid_fields_get_a_json_error_naming_the_field(server, patch, status, param):
    body = {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 1} | patch
    body = {k: v for k, v in body.items()}
    assert_error(post(server, body), status, param)


def test_malformed_body_oversized_body_and_decompression_bomb(server):
    resp = httpx.post(f"{server}/v1/image/generation", content=b"{not json", headers=AUTH | {
        "Content-Type": "application/json"})
    assert_error(resp, 400)
    huge = {"model_name": "SD1.5", "prompt": "x" * (21 * 1024 * 1024)}
    assert_error(post(server, huge), 413)

    def chunked(megabytes: int):  # no Content-Length: only the bytes received can be counted
        yield b'{"model_name": "SD1.5", "height": 64, "width": 64, "steps": 1, "prompt": "'
        for _ in range(megabytes):
            yield b"x" * 1024
        yield b'"}'
    streamed = httpx.post(f"{server}/v1/image/generation", content=chunked(21 * 1024), timeout=600,
                          headers=AUTH | {"Content-Type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413)
    small = httpx.post(f"{server}/v1/image/generation", content=chunked(1), timeout=600,
                       headers=AUTH | {"Content-Type": "application/json"})
    assert small.status_code == 200, small.text
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")
    bomb = base64.b64encode(buf.getvalue()).decode()
    body = assert_error(post(server, {"model_name": "SD1.5", "prompt": "x", "image": bomb}), 400, "image")
    assert "5000x5000" in body["message"]


def test_models_readiness_and_metrics(server):
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"]
    sd15 = next(m for m in models if m["name"] == "SD1.5")
    assert sd15["compiled_resolutions"]["tvm"] == ["64x64"] and sd15["family"] == "sd1"
    assert sd15["default_tvm_resolutions"] == ["512x512", "512x768", "768x512"]
    sdxl = next(m for m in models if m["name"] == "SDXL1.0-base")
    assert len(sdxl["default_tvm_resolutions"]) == 9 and "1024x1024" in sdxl["default_tvm_resolutions"]
    assert_error(httpx.get(f"{server}/v1/nothing", headers=AUTH), 404)
    wrong_method = httpx.get(f"{server}/v1/image/generation", headers=AUTH)
    assert_error(wrong_method, 405)
    assert wrong_method.headers["Allow"] == "POST"
    assert httpx.get(f"{server}/readyz").json()["status"] == "ready"
    generated = post(server, {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 2})
    assert generated.status_code == 200
    assert_error(httpx.get(f"{server}/metrics"), 401)
    metrics = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert "sdaot_requests_total" in metrics and "sdaot_queue_depth" in metrics
    assert "sdaot_step_seconds_bucket" in metrics
    assert httpx.get(f"{server}/docs").status_code == 200


def test_refuses_non_loopback_without_keys():
    env = {k: v for k, v in os.environ.items() if k != "SDAOT_API_KEYS"}
    done = subprocess.run([sys.executable, "-m", "sdaot.runtime.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "without API keys" in done.stderr


def test_every_sampler_and_preset_name_is_accepted_and_near_misses_list_the_valid_ones(server):
    samplers = httpx.get(f"{server}/v1/samplers", headers=AUTH).json()["data"]
    presets = httpx.get(f"{server}/v1/style-presets", headers=AUTH).json()["data"]
    assert len(samplers) == 27 and len(presets) == 78
    base = {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 2}
    for entry in samplers:
        sent = entry["name"].lower().replace(" ", "_")
        resp = post(server, base | {"sampler": sent})
        assert resp.status_code == 200, (entry["name"], resp.text)
        assert resp.json()["sampler"] == entry["name"]
    for entry in presets:
        resp = post(server, base | {"style_preset": entry["name"].lower(), "steps": 1})
        assert resp.status_code == 200, (entry["name"], resp.text)
    wrong = assert_error(post(server, base | {"sampler": "Euler b"}), 400, "sampler")
    assert all(entry["name"] in wrong["message"] for entry in samplers)
    wrong = assert_error(post(server, base | {"style_preset": "Animee"}), 400, "style_preset")
    assert "Neon Punk" in wrong["message"] and "Tilt-Shift" in wrong["message"]


def test_response_shape_key_by_key(server):
    resp = post(server, {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 1, "seed": 5,
                         "num_images": 2, "output_format": "webp"})
    data = resp.json()
    assert isinstance(data["inference_time"], float) and data["inference_time"] > 0
    assert [img["index"] for img in data["images"]] == [0, 1]
    assert [img["random_seed"] for img in data["images"]] == [5, 6]
    for img in data["images"]:
        assert set(img) == {"image", "index", "random_seed"}
        assert decode(img["image"]).format == "WEBP"
    assert set(data) - {"images", "inference_time"} <= {"backends", "model_name", "width", "height", "steps",
                                                         "sampler", "output_format"}


def test_missing_weights_answer_503_with_the_reason():
    proc, url = start_server(["--models", "SD1.5", "--weights", "/nonexistent/weights"], wait_for="/healthz")
    try:
        deadline = time.time() + 60
        while "not found" not in httpx.get(f"{url}/readyz", headers=AUTH).text and time.time() < deadline:
            time.sleep(0.5)
        body = assert_error(httpx.get(f"{url}/readyz", headers=AUTH), 503)
        assert ".../weights" in body["message"] and "--weights tiny" in body["message"]
        assert "/nonexistent" not in body["message"], "no absolute path in an answer"
        assert_error(post(url, {"model_name": "SD1.5", "prompt": "x"}), 503)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_request_over_the_time_limit_answers_504_and_frees_the_worker():
    proc, url = start_server(["--models", "SD1.5", "--timeout", "5"])
    try:
        slow = {"model_name": "SD1.5", "prompt": "x", "height": 768, "width": 768, "steps": 150}
        assert_error(post(url, slow), 504)
        quick = {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 1}
        codes = []
        for _ in range(10):
            codes.append(post(url, quick).status_code)
            if codes[-1] == 200:
                break
            time.sleep(1)
        assert codes[-1] == 200, codes
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_loras_and_controlnets_over_http(server):
    models = {m["name"]: m for m in httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"]}
    assert {"Foreign", "Logo", "Pixel_Art"} <= set(models["SD1.5"]["loras"])
    files = {row["name"]: row for row in models["SD1.5"]["lora_files"]}
    assert files["Logo"] == {"name": "Logo", "tensors_matched": 2, "tensors_unmatched": 0,
                             "updates_with_alpha": 0, "updates_at_rank": 1}
    assert "'unet.mid_block.to_q.alpha' belongs to no update" in files["Stray_Alpha"]["error"]
    assert "matches no weight" in files["Foreign"]["error"]
    assert models["SD1.5"]["max_concurrent_generations"] == 1
    assert {c["name"] for c in models["SD1.5-ControlNet"]["controlnets"]} >= {"canny", "depth", "openpose",
                                                                               "scribble", "softedge", "tile"}
    base = {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 2, "seed": 1}
    plain = post(server, base).json()["images"][0]["image"]
    styled = post(server, base | {"loras": {"Pixel_Art": 0.7, "Logo": 0.6}})
    assert styled.status_code == 200 and styled.json()["images"][0]["image"] != plain
    assert post(server, base).json()["images"][0]["image"] == plain
    unknown = assert_error(post(server, base | {"loras": {"Nope": 1}}), 400, "loras")["message"]
    assert "available: Foreign, Logo, Mostly_Foreign, Pixel_Art" in unknown
    assert_error(post(server, base | {"loras": {"Logo": 7}}), 400, "loras")
    assert_error(post(server, base | {"loras": {"Foreign": 1}}), 400, "loras")
    stray = assert_error(post(server, base | {"loras": {"Stray_Alpha": 1}}), 400, "loras")["message"]
    assert "alpha entry 'unet.mid_block.to_q.alpha' belongs to no update" in stray
    assert_error(post(server, base | {"loras": {"Logo": "heavy"}}), 422, "loras.Logo")

    control = png_b64(Image.new("RGB", (64, 64), (90, 10, 200)))
    cn = base | {"model_name": "SD1.5-ControlNet", "controlnet_name": "canny", "controlnet_image": control}
    ok = post(server, cn)
    assert ok.status_code == 200 and ok.json()["backends"]["controlnet"] == "torch"
    assert "canny" in assert_error(post(server, cn | {"controlnet_name": "edges"}), 400, "controlnet_name")["message"]
    assert_error(post(server, base | {"controlnet_name": "canny", "controlnet_image": control}), 400,
                 "controlnet_name")
    assert_error(post(server, {k: v for k, v in cn.items() if k != "controlnet_image"}), 400, "controlnet_image")
    assert_error(post(server, cn | {"controlnet_image": "%%%"}), 400, "controlnet_image")


def test_image_decoding_runs_off_the_event_loop(server):
    """While a 2048x2048 PNG is decoded for one request (answered 400 by planning, after decoding), a second
    client keeps getting its health checks answered: no pause between two of them takes most of the time
    the big request was in the server (decoding on the event loop made one pause take ~90 % of it)."""
    import json
    import select
    import socket
    from urllib.parse import urlsplit

    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG", compress_level=1)
    body = json.dumps({"model_name": "SD1.5", "prompt": "x", "image": base64.b64encode(buf.getvalue()).decode(),
                       "steps": 1, "strength": 0.01}).encode()
    host, port = urlsplit(server).hostname, urlsplit(server).port
    with httpx.Client(base_url=server, timeout=60) as client, socket.create_connection((host, port)) as big:
        client.get("/healthz")
        big.sendall(f"POST /v1/image/generation HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    .encode() + body)
        sent = time.perf_counter()
        answered = [sent]
        while not select.select([big], [], [], 0)[0]:
            assert client.get("/healthz").status_code == 200
            answered.append(time.perf_counter())
        answered.append(time.perf_counter())
        big.settimeout(60)
        answer = b""
        while chunk := big.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"strength" in answer, answer[:300]
    longest_pause = max(later - earlier for earlier, later in zip(answered, answered[1:], strict=False))
    assert len(answered) > 3 and longest_pause < 0.5 * (answered[-1] - sent), (longest_pause, answered[-1] - sent)
