"""Fair and bounded jobs over a real server: finished jobs evicted per key and by size, unfinished jobs and
event streams capped per key, no body read before the key check; and, on the pipeline itself, a cancelled or
timed-out request that stops waiting for the model's lock and merges or encodes nothing."""

import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from test_server import assert_error, start_server

from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.pipeline import Cancelled
from sdaot.runtime.request import parse_request
from sdaot.runtime.serve.serving import Server, ServerConfig

pytestmark = pytest.mark.slow
KEYS = ("fair-one", "fair-two", "fair-three")
ONE, TWO, THREE = ({"Authorization": f"Bearer {k}"} for k in KEYS)
QUICK = {"model_name": "SD1.5", "prompt": "a red cube", "height": 64, "width": 64, "steps": 4, "seed": 3,
         "sampler": "Euler"}
LONG = QUICK | {"height": 256, "width": 256, "steps": 150}


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(["--models", "SD1.5", "--workers", "1", "--max-queued-jobs", "4",
                              "--keep-finished-count", "2", "--keep-finished-bytes", "1", "--max-jobs-per-key", "2",
                              "--max-event-streams", "2", "--max-event-streams-per-key", "1"],
                             env_extra={"SDAOT_API_KEYS": ",".join(KEYS)})
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def create(url, body, headers):
    resp = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def read(url, job_id, headers):
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=60)


def finish(url, job_id, headers, cancel=False):
    if cancel:
        httpx.delete(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=60).raise_for_status()
    deadline = time.time() + 300
    while time.time() < deadline:
        job = read(url, job_id, headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never finished")


def test_one_keys_jobs_never_evict_anothers_and_the_byte_budget_drops_the_oldest_first(server):
    theirs = create(server, QUICK, TWO)
    assert finish(server, theirs, TWO)["status"] == "succeeded"
    mine = []
    for seed in range(3):
        mine.append(create(server, QUICK | {"seed": seed}, ONE))
        assert finish(server, mine[-1], ONE)["status"] == "succeeded"
    kept = read(server, theirs, TWO)
    assert kept.status_code == 200 and kept.json()["result"]["images"], "another key's jobs evicted this one"
    newest = read(server, mine[-1], ONE)
    assert newest.status_code == 200 and newest.json()["result"]["images"]
    assert_error(read(server, mine[0], ONE), 404)  # beyond --keep-finished-count 2
    assert_error(read(server, mine[1], ONE), 404)  # beyond --keep-finished-bytes (the newest always stays)


def test_one_key_may_have_only_so_many_unfinished_jobs(server):
    mine = [create(server, LONG | {"seed": s}, ONE) for s in range(2)]
    refused = assert_error(httpx.post(f"{server}/v1/jobs", json=QUICK, headers=ONE, timeout=60), 429)
    assert "--max-jobs-per-key" in refused["message"]
    theirs = create(server, QUICK, TWO)
    for job_id in mine:
        finish(server, job_id, ONE, cancel=True)
    assert finish(server, theirs, TWO)["status"] == "succeeded"
    again = create(server, QUICK, ONE)
    assert finish(server, again, ONE)["status"] == "succeeded"


def test_event_streams_are_capped_per_key_and_in_all(server):
    jobs = {name: create(server, LONG | {"seed": i}, key) for i, (name, key) in enumerate(
        (("one", ONE), ("two", TWO), ("three", THREE)))}
    stream = f"{server}/v1/jobs/{{}}/events"
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("GET", stream.format(jobs["one"]), headers=ONE) as first:
                first_lines = first.iter_lines()  # kept: a dropped line iterator closes the stream
                assert first.status_code == 200 and next(first_lines).startswith("event: status")
                assert_error(client.get(stream.format(jobs["one"]), headers=ONE), 429)
                with client.stream("GET", stream.format(jobs["two"]), headers=TWO) as second:
                    second_lines = second.iter_lines()
                    assert second.status_code == 200 and next(second_lines).startswith("event: status")
                    assert_error(client.get(stream.format(jobs["three"]), headers=THREE), 429)
        deadline = time.time() + 60
        while True:  # both closed: their places come back
            with httpx.stream("GET", stream.format(jobs["three"]), headers=THREE, timeout=60) as third:
                if third.status_code == 200:
                    break
            assert time.time() < deadline, "closed streams kept their places"
            time.sleep(0.1)
    finally:
        for key, job_id in zip((ONE, TWO, THREE), jobs.values(), strict=True):
            finish(server, job_id, key, cancel=True)


def test_an_unauthenticated_chunked_upload_gets_its_401_before_the_body_is_read(server):
    """Only the first chunk is sent: a server that read the body before the key check would wait for the
    rest, and this read would time out instead of getting the 401."""
    address = urlsplit(server)
    with socket.create_connection((address.hostname, address.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b"{" * 16 + b"\r\n")
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def request(**fields):
    return parse_request(dict(model_name="SD1.5", prompt="a red cube", height=64, width=64, steps=3, seed=5)
                         | fields)


@pytest.fixture(scope="module")
def pipe(lora_folder):
    return load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)


def test_a_request_stopped_before_it_runs_merges_no_lora_and_encodes_nothing(pipe):
    encoded = []
    hook = pipe.bundle.text_encoders["text_encoder"].register_forward_hook(lambda *_: encoded.append(1))
    weights = {k: v.clone() for k, v in pipe.bundle.unet.state_dict().items()}
    stop = threading.Event()
    stop.set()
    try:
        with pytest.raises(Cancelled):
            pipe.generate(pipe.plan(request(loras={"Logo": 1.0})), stop=stop)
    finally:
        hook.remove()
    assert encoded == []
    assert all(torch.equal(v, weights[k]) for k, v in pipe.bundle.unet.state_dict().items())


def test_a_request_waiting_for_the_models_lock_stops_when_cancelled(pipe):
    """Another generation holds the model (its LoRA lock); the waiting one gives up once stopped, and the lock
    is still held by the other: it did not wait for it."""
    stop, outcome = threading.Event(), []

    def waiting() -> None:
        try:
            pipe.generate(pipe.plan(request()), stop=stop)
            outcome.append("ran")
        except Cancelled:
            outcome.append("cancelled")

    with pipe.loras.lock:
        worker = threading.Thread(target=waiting)
        worker.start()
        stop.set()
        worker.join(timeout=60)
        assert not worker.is_alive() and outcome == ["cancelled"]


def test_a_finished_job_keeps_only_its_encoded_answer(pipe):
    server = Server(ServerConfig(models=["SD1.5"]))
    plan = pipe.plan(parse_request({"model_name": "SD1.5", "prompt": "a cube", "height": 64, "width": 64,
                                    "steps": 2, "image": _gray_image()}))
    job = server.queue.submit_job(pipe, plan, "owner", server.delivery())
    job.future.result(timeout=300)
    assert job.status == "succeeded" and job.answer.images[0].image and job.answer_bytes > 0
    assert job.result is None and job.plan is None, "a finished job holds its images or decoded inputs"
    server.queue.shutdown()


def _gray_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))
