"""`sdaot serve --ray` on a local Ray cluster (2 CPUs): two replicas of tiny SD1.5 behind the same HTTP API,
talked to over HTTP; overload, a replica killed under load (a synchronous call's 503, a job run once more),
Ray's errors as the API's, and the `serve deploy` YAML's arguments. How a cancelled call is counted is tested
on the replica's and the ingress's code with stand-ins that stop only when told, so no timing decides it."""

import asyncio
import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.schema import ServeDeploySchema
from test_server import AUTH, assert_error, decode, start_server

from sdaot.runtime.errors import BusyError, InvalidRequestError, SdaotError, ServiceUnavailableError
from sdaot.runtime.pipeline import Cancelled
from sdaot.runtime.serve.generation_queue import GenerationQueue, WorkerLost
from sdaot.runtime.serve.protocol import error_shape, status_of
from sdaot.runtime.serve.ray.deployments import ModelReplica, app, replica_queue
from sdaot.runtime.serve.ray.remote_pipeline import RemotePipeline, replica_error

REPLICAS, QUEUE = 2, 1
DEPLOYMENT = "model-SD1.5"
QUICK = {"model_name": "SD1.5", "prompt": "a red cube", "height": 64, "width": 64, "steps": 4}
SLOW = {**QUICK, "height": 256, "width": 256, "steps": 30}  # seconds on one core, on any CPU
YAML = Path(__file__).parent.parent / "docs" / "ray-serve.yaml"


@pytest.fixture(scope="module")
def cluster_url():
    """A local cluster, and `sdaot serve --ray ADDRESS` started on it as a user would (a second driver)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    proc = None
    try:
        proc, url = start_server(["--ray", ray.get_runtime_context().gcs_address, "--models", "SD1.5",
                                  "--replicas", str(REPLICAS), "--workers", "1", "--queue-size", str(QUEUE)])
        wait_for_replicas()
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        serve.shutdown()
        ray.shutdown()


def replica_states() -> dict[str, int]:
    return dict(serve.status().applications["sdaot"].deployments[DEPLOYMENT].replica_states)


def wait_for_replicas() -> None:
    """Until every replica of the model runs (/readyz answers once the first one does)."""
    deadline = time.time() + 120
    while replica_states() != {"RUNNING": REPLICAS} and time.time() < deadline:
        time.sleep(0.5)
    assert replica_states() == {"RUNNING": REPLICAS}


async def _post_all(url: str, bodies: list[dict], after=None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as client:
        sent = [asyncio.ensure_future(client.post("/v1/image/generation", json=b)) for b in bodies]
        if after is not None:
            await after()
        return list(await asyncio.gather(*sent))


@pytest.mark.slow
def test_two_replicas_serve_the_same_api_with_its_auth_errors_and_jobs(cluster_url):
    assert replica_states() == {"RUNNING": REPLICAS}
    assert httpx.post(f"{cluster_url}/v1/image/generation", json=QUICK).status_code == 401
    paths = httpx.get(f"{cluster_url}/openapi.json").json()["paths"]
    assert {"/v1/image/generation", "/v1/jobs", "/v1/jobs/{job_id}"} <= set(paths)
    models = httpx.get(f"{cluster_url}/v1/models", headers=AUTH).json()["data"]
    assert [m["name"] for m in models] == ["SD1.5"] and models[0]["weights"] == "tiny"

    results = asyncio.run(_post_all(cluster_url, [{**QUICK, "seed": s} for s in (1, 2)]))
    for resp, seed in zip(results, (1, 2), strict=True):
        assert resp.status_code == 200, resp.text
        image = resp.json()["images"][0]
        assert image["random_seed"] == seed and decode(image["image"]).size == (64, 64)
    assert results[0].json()["images"][0]["image"] != results[1].json()["images"][0]["image"]

    bad = httpx.post(f"{cluster_url}/v1/image/generation", headers=AUTH, json={**QUICK, "loras": {"nope": 1}})
    assert "unknown LoRA 'nope'" in assert_error(bad, 400, "loras")["message"]

    job = httpx.post(f"{cluster_url}/v1/jobs", headers=AUTH, json=QUICK)
    assert job.status_code == 202, job.text
    state = {}
    for _ in range(600):
        state = httpx.get(f"{cluster_url}/v1/jobs/{job.json()['id']}", headers=AUTH).json()
        if state["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert state["status"] == "succeeded" and state["step"] == state["steps"] >= 4, state
    assert decode(state["result"]["images"][0]["image"]).size == (64, 64)

    slow = httpx.post(f"{cluster_url}/v1/jobs", headers=AUTH, json={**SLOW, "steps": 150, "preview_every": 1}).json()
    while "preview" not in (running := httpx.get(f"{cluster_url}/v1/jobs/{slow['id']}", headers=AUTH).json()):
        time.sleep(0.1)
    assert decode(running["preview"]["image"]).size == (256, 256), "the replica's live preview reaches the ingress"
    cancelled = httpx.delete(f"{cluster_url}/v1/jobs/{slow['id']}", headers=AUTH).json()
    assert cancelled["status"] in ("running", "cancelled")
    for _ in range(100):
        state = httpx.get(f"{cluster_url}/v1/jobs/{slow['id']}", headers=AUTH).json()
        if state["status"] == "cancelled":
            break
        time.sleep(0.1)
    assert state["status"] == "cancelled" and state["step"] < 150, state


@pytest.mark.slow
def test_overload_gets_429_with_retry_after(cluster_url):
    results = asyncio.run(_post_all(cluster_url, [SLOW] * 8))
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429}, [r.text for r in results if r.status_code not in (200, 429)]
    assert codes.count(200) >= REPLICAS + QUEUE, codes  # both replicas and the queue were used
    assert codes.count(429) > 0, codes
    for resp in results:
        if resp.status_code == 429:
            assert_error(resp, 429)
            assert int(resp.headers["Retry-After"]) > 0


def test_ray_errors_become_the_answers_of_a_local_server():
    busy = replica_error("SD1.5", BackPressureError(num_queued_requests=3, max_queued_requests=3))
    assert isinstance(busy, BusyError) and status_of(busy) == 429 and "every replica of SD1.5" in busy.message
    refused = InvalidRequestError("unknown LoRA 'x'", param="loras")
    crossed = pickle.loads(pickle.dumps(RayTaskError("generate", "traceback", refused)))
    assert error_shape(replica_error("SD1.5", crossed)) == error_shape(refused)
    died = replica_error("SD1.5", ActorDiedError())
    assert isinstance(died, WorkerLost) and isinstance(died, ServiceUnavailableError) and status_of(died) == 503
    other = ValueError("not Ray's")
    assert replica_error("SD1.5", other) is other


@pytest.mark.slow
def test_a_replica_killed_under_load_costs_only_its_own_request_and_is_replaced(cluster_url):
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{DEPLOYMENT}#" in a["name"]]
    assert len(replicas) == REPLICAS

    async def kill_one_when_both_run() -> None:
        async with httpx.AsyncClient(base_url=cluster_url, headers=AUTH) as client:
            while "sdaot_queue_depth 3.0" not in (await client.get("/metrics")).text:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # both replicas are into their generation, far from its end
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    # two run (one per replica), one waits in Ray's queue: only the killed replica's own request may fail
    results = asyncio.run(_post_all(cluster_url, [SLOW] * (REPLICAS + QUEUE), after=kill_one_when_both_run))
    codes = [r.status_code for r in results]
    assert sorted(codes) == [200, 200, 503], [r.text for r in results]
    lost = assert_error(next(r for r in results if r.status_code == 503), 503)
    assert "replica of SD1.5 running this request stopped" in lost["message"]

    wait_for_replicas()
    after = asyncio.run(_post_all(cluster_url, [QUICK] * REPLICAS))
    assert [r.status_code for r in after] == [200] * REPLICAS


@pytest.mark.slow
def test_a_job_whose_replica_is_killed_runs_once_more_on_another(cluster_url):
    wait_for_replicas()
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{DEPLOYMENT}#" in a["name"]]
    ids = [httpx.post(f"{cluster_url}/v1/jobs", headers=AUTH, json={**SLOW, "steps": 150, "seed": s}).json()["id"]
           for s in (1, 2)]

    def states() -> list[dict]:
        return [httpx.get(f"{cluster_url}/v1/jobs/{i}", headers=AUTH).json() for i in ids]

    def wait_until(done, timeout_s: float) -> list[dict]:
        deadline = time.time() + timeout_s
        while not done(now := states()):
            assert time.time() < deadline, now
            time.sleep(0.05)
        return now

    # both run, one per replica (a replica runs one at a time), each far from its 150th step
    wait_until(lambda now: all(state.get("step", 0) >= 1 for state in now), 300)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    final = wait_until(lambda now: all(state["status"] in ("succeeded", "failed", "cancelled") for state in now), 900)
    assert [state["status"] for state in final] == ["succeeded", "succeeded"], final
    wait_for_replicas()


class StoppablePipeline:
    """A stand-in pipeline whose "slow" generation, once started, stops only when `release` is set: how long a
    cancelled generation runs on is the test's to decide, not the machine's."""

    spec = SimpleNamespace(name="SD1.5")

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lost = 0

    def generate(self, plan, progress=None, stop=None, preview=None):
        if plan.kind == "lost" and self.lost < 2:
            self.lost += 1
            raise WorkerLost("the replica running this request stopped")
        progress(1, 2)
        if plan.kind == "slow":
            self.release.wait(60)
        progress(2, 2)
        return SimpleNamespace(backends={}, inference_time=0.0, plan=plan)


def plan(kind: str) -> SimpleNamespace:
    """A stand-in plan: `kind` tells StoppablePipeline how to run it."""
    return SimpleNamespace(kind=kind, steps=2)


async def _drain(stream) -> list:
    return [item async for item in stream]


def test_a_cancelled_call_holds_its_replica_worker_until_it_stops_and_the_next_call_waits_for_it():
    """Ray counts a cancelled call as ended at once; the replica's worker is free only when the generation has
    stopped, its stream ends then, and the call Ray sends meanwhile waits for the worker instead of a 429."""
    replica = object.__new__(ModelReplica.func_or_class)
    replica.pipe, replica.queue = StoppablePipeline(), replica_queue(1)

    async def scenario() -> None:
        cancelled_stream = replica.generate(plan("slow"))
        assert await cancelled_stream.__anext__() == (1, 2)
        cancelled = asyncio.ensure_future(_drain(cancelled_stream))
        await asyncio.sleep(0.2)
        cancelled.cancel()
        following = asyncio.ensure_future(_drain(replica.generate(plan("quick"))))
        await asyncio.sleep(0.5)
        assert not cancelled.done(), "the cancelled stream ended while its generation still ran"
        assert not following.done(), following.exception() if following.done() else None
        replica.pipe.release.set()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        items = await asyncio.wait_for(following, 60)
        assert items[:2] == [(1, 2), (2, 2)] and items[-1].plan.kind == "quick"

    asyncio.run(scenario())
    replica.queue.shutdown()


class CancelledStream:
    """A stand-in for Ray's stream of a replica's steps: one step, then, once cancelled, its end (an error) only
    when the replica has stopped (`stopped`)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.cancelled = False
        self.sent = False

    def __iter__(self):
        return self

    def __next__(self):
        if not self.sent:
            self.sent = True
            return 1, 2
        assert self.cancelled and self.stopped.wait(60)
        raise RuntimeError("TaskCancelledError")

    def cancel(self) -> None:
        self.cancelled = True


def test_the_ingress_counts_a_cancelled_call_until_its_replica_has_stopped():
    stream = CancelledStream()
    handle = SimpleNamespace(options=lambda **_: SimpleNamespace(generate=SimpleNamespace(remote=lambda _: stream)))
    remote = RemotePipeline(StoppablePipeline.spec, handle, planner=None, summary={})
    outcome = []

    def cancel_at_first_step(step, steps):
        raise Cancelled()

    def run() -> None:
        try:
            remote.generate(plan("quick"), progress=cancel_at_first_step)
        except Cancelled:
            outcome.append("cancelled")

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(0.5)
    assert stream.cancelled and worker.is_alive(), "the ingress's worker was free before its replica stopped"
    stream.stopped.set()
    worker.join(60)
    assert outcome == ["cancelled"]


def test_a_job_runs_once_more_when_its_worker_is_lost_and_a_synchronous_call_gets_503():
    queue = GenerationQueue(1, 0, 4, 60, 4)
    pipe = StoppablePipeline()
    synchronous = queue.run_now(pipe, plan("lost"), "owner")  # its pipeline's first call is lost
    with pytest.raises(WorkerLost):
        synchronous.future.result(60)
    job = queue.submit_job(pipe, plan("lost"), "owner")  # the second call is lost, the third runs
    job.future.result(60)
    assert job.status == "succeeded" and job.result.plan.kind == "lost" and pipe.lost == 2
    twice = queue.submit_job(StoppablePipeline(), plan("lost"), "owner")  # lost twice: it fails
    with pytest.raises(WorkerLost):
        twice.future.result(60)
    assert twice.status == "failed" and status_of(twice.error) == 503
    queue.shutdown()


def test_the_serve_deploy_yaml_is_valid_and_builds_the_app(monkeypatch):
    monkeypatch.setenv("SDAOT_API_KEYS", "an-operators-key")  # what the YAML's runtime_env is to be given
    config = yaml.safe_load(YAML.read_text())
    ServeDeploySchema.model_validate(config)
    application = config["applications"][0]
    assert application["import_path"] == "sdaot.runtime.serve.ray.deployments:app"
    assert app(application["args"]) is not None
    assert app({"models": "SD1.5", "replicas": "2", "queue_size": "3"}) is not None  # `serve run k=v` gives text


@pytest.mark.parametrize(("args", "param", "says"), [
    ({"replcas": 2}, "replcas", "unknown argument"),
    ({"replicas": "two"}, "replicas", "valid integer"),
    ({"queue_size": 0}, "queue_size", "max_queued_requests cannot be 0"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas", ">= min_replicas"),
    ({"models": "SD9"}, "models", "unknown model 'SD9'"),
])
def test_bad_serve_arguments_name_the_argument(args, param, says, monkeypatch):
    monkeypatch.setenv("SDAOT_API_KEYS", "an-operators-key")  # a key, so that the argument is what is wrong
    with pytest.raises(SdaotError) as err:
        app(args)
    assert err.value.param == param and says in err.value.message


def test_every_folder_a_replica_reads_is_made_absolute_where_the_command_was_given(tmp_path, monkeypatch):
    # Replicas start in Ray's own working folder: a relative folder would name another place there.
    from sdaot.runtime.serve.ray.deployments import absolute_folders
    from sdaot.runtime.serve.serving import ServerConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDAOT_TINY_VAE_DIR", "taesd")
    config = absolute_folders(ServerConfig(models=["SD1.5"], artifacts_root=Path("art"), lora_folder=Path("loras"),
                                           controlnet_folder=Path("cn")))
    assert config.artifacts_root == tmp_path / "art" and config.lora_folder == tmp_path / "loras"
    assert config.controlnet_folder == tmp_path / "cn" and config.tiny_vae_folder == tmp_path / "taesd"
