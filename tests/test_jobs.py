"""The jobs API over a real server: queue, progress, events, cancellation, ownership, expiry, webhooks."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from test_server import assert_error, decode, start_server

pytestmark = pytest.mark.slow
KEYS = ("key-one", "key-two")
ONE, TWO = ({"Authorization": f"Bearer {k}"} for k in KEYS)
QUICK = {"model_name": "SD1.5", "prompt": "a red cube", "height": 64, "width": 64, "steps": 6, "seed": 11,
         "sampler": "Euler"}
LONG = QUICK | {"height": 256, "width": 256, "steps": 150}
KEEP_S = 6


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(["--models", "SD1.5", "--workers", "1", "--max-queued-jobs", "2",
                              "--keep-finished", str(KEEP_S), "--webhook-allow", "127.0.0.1"],
                             env_extra={"SDAOT_API_KEYS": ",".join(KEYS)})
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def create(url, body, headers=ONE):
    resp = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=60)
    assert resp.status_code == 202, resp.text
    return resp.json()


def state(url, job_id, headers=ONE):
    resp = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for(url, job_id, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = state(url, job_id)
        if condition(current):
            return current
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {current}")


def wait_until_idle(url):
    """Until no work holds a worker slot: a job reads as ended a moment before its slot is given back."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if "sdaot_queue_depth 0.0" in httpx.get(f"{url}/metrics", headers=ONE, timeout=60).text:
            return
        time.sleep(0.05)


def read_events(url, job_id):
    """The (name, data) events of a job's stream, read to its end."""
    events, name = [], None
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=ONE, timeout=300) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def finished(job) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def test_a_job_reports_progress_and_ends_with_the_synchronous_answer(server):
    accepted = create(server, QUICK)
    assert set(accepted) == {"id", "status", "queue_position"} and accepted["status"] in ("queued", "running")
    seen = []
    while not seen or not finished(seen[-1]):
        seen.append(state(server, accepted["id"]))
    done = seen[-1]
    assert done["status"] == "succeeded" and done["step"] == done["steps"] == 6, done
    running = [s for s in seen if s["status"] == "running"]
    for s in running:
        assert 0 <= s["step"] <= 6 and s["steps"] == 6 and s["elapsed"] >= 0
    result = done["result"]
    assert result["images"][0]["random_seed"] == 11 and result["steps"] == 6
    sync = httpx.post(f"{server}/v1/image/generation", json=QUICK, headers=ONE, timeout=600).json()
    assert np.array_equal(np.asarray(decode(result["images"][0]["image"])),
                          np.asarray(decode(sync["images"][0]["image"])))


def test_the_event_stream_has_one_event_per_step_then_the_result(server):
    job = create(server, QUICK | {"steps": 5})
    events = read_events(server, job["id"])
    assert events[0][0] == "status"
    assert [e["step"] for n, e in events if n == "progress"] == [1, 2, 3, 4, 5]
    assert all(e["steps"] == 5 for n, e in events if n == "progress")
    assert events[-1][0] == "result" and events[-1][1]["status"] == "succeeded"
    assert decode(events[-1][1]["result"]["images"][0]["image"]).size == (64, 64)


def test_live_previews_come_as_events_every_nth_step_and_in_the_job_state(server):
    job = create(server, QUICK | {"steps": 7, "preview_every": 2})
    events = read_events(server, job["id"])
    previews = [e for n, e in events if n == "preview"]
    assert [p["step"] for p in previews] == [2, 4, 6] and all(p["steps"] == 7 for p in previews)
    for p in previews:
        image = decode(p["image"])
        assert image.format == "WEBP" and image.size == (64, 64)
    order = [n for n, _ in events if n in ("progress", "preview")]
    assert order.index("preview") == order.index("progress") + 2, "the step-2 preview follows the step-2 progress"
    assert "preview" not in state(server, job["id"]), "a finished job shows its images, not a preview"
    sync = httpx.post(f"{server}/v1/image/generation", json=QUICK | {"steps": 7}, headers=ONE, timeout=600).json()
    result = events[-1][1]["result"]
    assert np.array_equal(np.asarray(decode(result["images"][0]["image"])),
                          np.asarray(decode(sync["images"][0]["image"])))

    running = create(server, LONG | {"preview_every": 1})
    shown = wait_for(server, running["id"], lambda s: "preview" in s or finished(s))
    assert shown["status"] == "running" and 1 <= shown["preview"]["step"] <= shown["step"]
    assert decode(shown["preview"]["image"]).size == (256, 256)
    httpx.delete(f"{server}/v1/jobs/{running['id']}", headers=ONE, timeout=60)
    stopped = wait_for(server, running["id"], finished)
    assert stopped["status"] == "cancelled" and "preview" in stopped, "a cancelled job keeps its last preview"
    wait_until_idle(server)


def test_cancelling_a_running_job_stops_it_within_a_step_and_a_queued_one_before_it_starts(server):
    wait_until_idle(server)
    running = create(server, LONG)
    wait_for(server, running["id"], lambda j: j["status"] == "running")
    queued = create(server, LONG | {"seed": 1})
    last = create(server, QUICK | {"seed": 2})
    assert queued["status"] == "queued" and last["queue_position"] == 1
    at_cancel = wait_for(server, running["id"], lambda j: j["status"] == "running" and j["step"] >= 2)
    resp = httpx.delete(f"{server}/v1/jobs/{queued['id']}", headers=ONE, timeout=60)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    cancelled = httpx.delete(f"{server}/v1/jobs/{running['id']}", headers=ONE, timeout=60).json()
    stopped = wait_for(server, running["id"], finished)
    assert stopped["status"] == "cancelled", stopped
    assert at_cancel["step"] <= cancelled["step"] <= stopped["step"] <= cancelled["step"] + 1 < 150, (
        "the step running when DELETE arrived may finish, no more", at_cancel, cancelled, stopped)
    assert state(server, queued["id"])["step"] == 0
    assert wait_for(server, last["id"], finished)["status"] == "succeeded"


def test_a_job_is_visible_to_its_own_key_only_and_others_cannot_tell_it_exists(server):
    job = create(server, QUICK)
    for method in ("GET", "DELETE"):
        other = assert_error(httpx.request(method, f"{server}/v1/jobs/{job['id']}", headers=TWO, timeout=60), 404)
        unknown = assert_error(httpx.request(method, f"{server}/v1/jobs/job_000", headers=ONE, timeout=60), 404)
        assert other["message"].replace(job["id"], "ID") == unknown["message"].replace("job_000", "ID")
    assert_error(httpx.get(f"{server}/v1/jobs/{job['id']}/events", headers=TWO, timeout=60), 404)
    assert_error(httpx.get(f"{server}/v1/jobs/{job['id']}", timeout=60), 401)
    assert wait_for(server, job["id"], finished)["status"] == "succeeded", "another key's DELETE cancelled it"


def test_a_full_job_queue_answers_429_and_finished_jobs_expire(server):
    wait_until_idle(server)
    jobs = [create(server, LONG | {"seed": s}) for s in range(3)]
    full = httpx.post(f"{server}/v1/jobs", json=QUICK, headers=ONE, timeout=60)
    assert_error(full, 429)
    assert int(full.headers["Retry-After"]) > 0
    for job in jobs:
        httpx.delete(f"{server}/v1/jobs/{job['id']}", headers=ONE, timeout=60).raise_for_status()
    for job in jobs:
        wait_for(server, job["id"], finished)
    time.sleep(KEEP_S + 1)
    for job in jobs:
        assert_error(httpx.get(f"{server}/v1/jobs/{job['id']}", headers=ONE, timeout=60), 404)


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that fails its first `failures` deliveries with 500."""

    failures = 2
    bodies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Receiver.bodies.append(body)
        status = 500 if len(Receiver.bodies) <= Receiver.failures else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_webhook_gets_the_final_state_after_retries_and_only_allowed_urls_are_taken(server):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{receiver.server_address[1]}/done"
        job = create(server, QUICK | {"webhook_url": hook})
        deadline = time.time() + 120
        while len(Receiver.bodies) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert len(Receiver.bodies) == 3, Receiver.bodies
        final = Receiver.bodies[-1]
        assert final["id"] == job["id"] and final["status"] == "succeeded"
        assert decode(final["result"]["images"][0]["image"]).size == (64, 64)
        time.sleep(1)
        assert len(Receiver.bodies) == 3, "delivered again after a 2xx answer"
    finally:
        receiver.shutdown()
    for bad in ("ftp://127.0.0.1/x", "file:///etc/passwd", "http://example.com/hook", "not a url", "http://[::1",
                f"http://2130706433:{receiver.server_address[1]}/done", "http://127.0.0.1:99999/done"):
        assert_error(httpx.post(f"{server}/v1/jobs", json=QUICK | {"webhook_url": bad}, headers=ONE, timeout=60),
                     400, "webhook_url")


def metric(url, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", headers=ONE, timeout=60).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_a_synchronous_call_whose_client_leaves_is_dropped_queued_or_running(server):
    """The synchronous route runs on the same queue: a client that disconnects has its work cancelled, while
    it waits behind a job and while it runs. A generation that ran to its end would add to the step-time
    count (observed when a generation succeeds)."""
    wait_until_idle(server)
    steps_counted = metric(server, "sdaot_step_seconds_count")
    blocker = create(server, LONG)
    wait_for(server, blocker["id"], lambda j: j["status"] == "running")
    for case in ("queued behind a job", "running"):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server}/v1/image/generation", json=LONG | {"seed": 5}, headers=ONE, timeout=1.5)
        if case == "queued behind a job":
            httpx.delete(f"{server}/v1/jobs/{blocker['id']}", headers=ONE, timeout=60).raise_for_status()
        wait_until_idle(server)
        assert metric(server, "sdaot_step_seconds_count") == steps_counted, case
