"""`sdaot compile --ray`: the jobs of a compile fanned out over a Ray cluster, one build per node at a time.

A model's (component, resolution, batch) builds are independent, and at full size each keeps a core busy
for minutes, so a cluster builds them side by side. Each job is a Ray task that reserves as many CPUs as
the smallest node has: two builds never share a node, and a build's timings are those of a whole node.
The task loads the model's weights itself (from the same `--weights` source), applies the tuning
database's records as a local build does and writes its artifact with the local compile's atomic rename,
so every node must see the artifact root and the database at the same paths (a shared filesystem); the
layout is then exactly a local compile's. The driver prints a line per finished job. A task that raises
is retried once (Ray's own retry); a job that fails again is reported by name once the others have
finished, and the command exits non-zero.

With `--tune`, each task tunes in its own copy of the database (`ray-work/<run>/<job>` beside it: MetaSchedule's
JSON files are not written by two processes at once), so it skips what is already tuned and its artifact
applies its own records; once every task has ended, the driver merges the copies' new records (all of
them, as a local run keeps them) and tuning goals into the shared database and deletes the copies.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdaot.compiler.compile import CompileJob, CompilePlan, compile_job, compile_modules
from sdaot.compiler.options import DEFAULT_BUILD, BuildOptions
from sdaot.compiler.tuning import TuningOptions, merge_work_dirs, private_copy

from ..errors import InvalidRequestError, SdaotError

RETRIES = 1


@dataclass(frozen=True)
class RemoteBuild:
    """What every task needs besides its job: where the weights come from (a path as an absolute one: a worker's
    working folder is not the driver's) and how to build."""

    model: str
    weights: str
    target: dict[str, Any]
    root: str
    controlnet: str | None = None
    options: BuildOptions = DEFAULT_BUILD


def build_on_node(build: RemoteBuild, job: CompileJob, work_dir: str | None = None) -> tuple[str, float, str]:
    """One job on a cluster node: (artifact folder, seconds, node's host name). With `work_dir`, the job tunes
    in that private copy of the tuning database (made here, afresh on a retry)."""
    import socket

    import tvm

    from ..loader import quiet_libraries
    from ..registry import get_model
    from ..weights import load_weights

    quiet_libraries()
    start = time.perf_counter()
    options = build.options
    if options.tuning is not None and work_dir is not None:
        private_copy(options.tuning.database, Path(work_dir))
        options = replace(options, tuning=replace(options.tuning, work_dir=Path(work_dir)))
    bundle = load_weights(get_model(build.model), build.weights)
    path = compile_job(bundle, job, tvm.target.Target(build.target), Path(build.root), log=lambda _: None,
                       modules=compile_modules(bundle, build.controlnet), options=options)
    return str(path), time.perf_counter() - start, socket.gethostname()


def connect(address: str | None) -> Any:
    """The `ray` module, connected: to `address`, or where `ray.init()` looks (RAY_ADDRESS, a cluster started on
    this machine, else a new local one); a session already connected is used as it is."""
    try:
        import ray
    except ImportError as exc:
        raise SdaotError(f"--ray needs the ray extra (pip install 'sdaot[ray]'): {exc}") from exc
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, logging_level="WARNING", include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InvalidRequestError(f"cannot reach a Ray cluster at {address or 'the default address'}: {exc}",
                                      param="ray") from exc
    return ray


def node_cpus(ray: Any) -> int:
    """The CPUs of the smallest live node: what each build reserves."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(min(cpus, default=1)))


def tuning_work_dirs(jobs: list[CompileJob], tuning: TuningOptions | None) -> dict[CompileJob, str]:
    """A private tuning folder per job when the builds tune (none when they only apply records), under the
    shared database's `ray-work/<this run>/`."""
    if tuning is None or tuning.budget_s <= 0:
        return {}
    run = tuning.database / "ray-work" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    return {job: str(run / re.sub(r"[^A-Za-z0-9_.-]+", "-", job.describe())) for job in jobs}


def compile_on_ray(plan: CompilePlan, build: RemoteBuild, address: str | None,
                   log: Callable[[str], None] = print) -> list[Path]:
    """Run the plan's jobs as Ray tasks; returns the artifact folders, in the plan's order."""
    ray = connect(address)
    cpus = node_cpus(ray)
    task = ray.remote(build_on_node).options(num_cpus=cpus, max_retries=RETRIES, retry_exceptions=True)
    log(f"on Ray: {len(ray.nodes())} node(s), each build reserving {cpus} CPUs")
    work_dirs = tuning_work_dirs(plan.jobs, build.options.tuning)
    pending = {task.remote(build, job, work_dirs.get(job)): job for job in plan.jobs}
    paths: dict[CompileJob, Path] = {}
    failed: dict[CompileJob, str] = {}
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready)
        finished = len(paths) + len(failed) + 1
        try:
            path, seconds, node = ray.get(ready)
        except ray.exceptions.RayError as exc:
            failed[job] = str(getattr(exc, "cause", None) or exc).strip().splitlines()[-1]
            log(f"[{finished}/{len(plan.jobs)}] {job.describe()} failed after {RETRIES} retry: {failed[job]}")
            continue
        paths[job] = Path(path)
        log(f"[{finished}/{len(plan.jobs)}] {job.describe()} done in {seconds:.1f} s on {node} -> {path}")
    if work_dirs:
        added = merge_work_dirs(build.options.tuning.database, [Path(d) for d in work_dirs.values()])
        run_dir = Path(next(iter(work_dirs.values()))).parent
        run_dir.rmdir()
        with contextlib.suppress(OSError):  # another run's folders are still there
            run_dir.parent.rmdir()
        log(f"merged {added} new tuning records from {len(work_dirs)} job(s) into {build.options.tuning.database}")
    if failed:
        raise SdaotError(f"{len(failed)} of {len(plan.jobs)} builds failed: "
                         + "; ".join(f"{job.describe()}: {why}" for job, why in failed.items()))
    return [paths[job] for job in plan.jobs]
