"""The one place where generation work is admitted, queued, run, timed, cancelled and counted.

The synchronous route and the jobs API both hand a planned request to `GenerationQueue.submit` and get a
`Job` back: its status, step progress, result or error, and a cancel switch that the worker checks between
steps. Synchronous work takes a slot of the bounded worker pool (`Admission`: a slot is free only when the
worker has really finished) and is not listed; jobs are listed under their owner, bounded in number while
unfinished, and kept after they finish for a set time and count, then dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from .admission import Admission
from .errors import BusyError, SdaotError, error_content
from .pipeline import GenerationResult, Pipeline, Plan

log = logging.getLogger("sdaot.queue")
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: tuple[Status, ...] = ("succeeded", "failed", "cancelled")
BUSY_RETRY_S = 1.0


class Cancelled(Exception):
    """Raised inside a generation that was cancelled, timed out, or whose client went away."""


@dataclass
class Job:
    """One planned request on its way through the queue; the worker thread updates it, the routes read it.

    `step_log` holds (step, steps, elapsed s, ETA s) per finished sampler step, for the events stream;
    `answer` the finished generation's answer once encoded, so that every later read returns it as it is;
    `waits_when_busy` whether it waits for a busy pipeline (jobs) or fails with 429 (synchronous requests)."""

    id: str
    owner: str
    pipe: Pipeline
    plan: Plan
    created: float = field(default_factory=time.time)
    status: Status = "queued"
    step: int = 0
    steps: int = 0
    started: float | None = None
    finished: float | None = None
    step_times: list[float] = field(default_factory=list)
    step_log: list[tuple[int, int, float, float | None]] = field(default_factory=list)
    result: GenerationResult | None = None
    answer: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    webhook_url: str | None = None
    output_format: str = "png"
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    waits_when_busy: bool = False

    @property
    def done(self) -> bool:
        """Whether the job has ended, one way or another."""
        return self.status in FINISHED

    def elapsed(self) -> float:
        """Seconds since the worker started it (0 while queued)."""
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def eta(self) -> float | None:
        """Seconds left, from the measured time per step so far (None before the second step ends)."""
        if len(self.step_times) < 2 or self.done:
            return None
        per_step = (self.step_times[-1] - self.step_times[0]) / (len(self.step_times) - 1)
        return round(per_step * (self.steps - self.step), 2)


def owner_of(api_key: str | None) -> str:
    """The owner id of work created with this key (a hash: keys are not kept in memory twice)."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:16]


class GenerationQueue:
    """Worker threads over planned requests; jobs kept by id for their owner until they expire."""

    def __init__(self, workers: int, queue_size: int, max_queued_jobs: int, keep_finished_s: float,
                 keep_finished: int, on_depth: Callable[[int], None] = lambda _: None,
                 on_step: Callable[[str, float], None] = lambda *_: None,
                 on_finished: Callable[[Job], None] = lambda _: None) -> None:
        self.admission = Admission(workers, queue_size, on_change=on_depth)
        self.jobs_capacity = workers + max_queued_jobs
        self.keep_finished_s = keep_finished_s
        self.keep_finished = keep_finished
        self._on_step = on_step
        self._on_finished = on_finished
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    # ---- submitting ----------------------------------------------------------------------------
    def run_now(self, pipe: Pipeline, plan: Plan, owner: str) -> Job | None:
        """Admit a synchronous request (not listed as a job); None when every worker and queue slot is taken."""
        job = Job(secrets.token_hex(8), owner, pipe, plan)
        job.future = self.admission.submit(self._run, job)
        return job if job.future is not None else None

    def submit_job(self, pipe: Pipeline, plan: Plan, owner: str, webhook_url: str | None = None,
                   output_format: str = "png") -> Job | None:
        """Queue a job listed under `owner`; None when the maximum of unfinished work is reached. Jobs may wait
        in a longer queue than synchronous requests, which then get 429 until the jobs ahead have run."""
        job = Job("job_" + secrets.token_hex(12), owner, pipe, plan, webhook_url=webhook_url,
                  output_format=output_format, waits_when_busy=True)
        with self._lock:
            self._expire()
            self._jobs[job.id] = job
        job.future = self.admission.submit(self._run, job, capacity=self.jobs_capacity)
        if job.future is None:
            with self._lock:
                self._jobs.pop(job.id, None)
            return None
        return job

    # ---- reading and cancelling ----------------------------------------------------------------
    def get(self, job_id: str, owner: str) -> Job | None:
        """The job, if it exists, has not expired and belongs to `owner` (else None: nobody learns which)."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        return job if job is not None and secrets.compare_digest(job.owner, owner) else None

    def position(self, job: Job) -> int:
        """How many listed jobs wait ahead of this one (0 once it runs)."""
        if job.status != "queued":
            return 0
        with self._lock:
            waiting = [j for j in self._jobs.values() if j.status == "queued"]
        return next((i for i, j in enumerate(waiting) if j.id == job.id), 0)

    def cancel(self, job: Job) -> None:
        """Stop the job: at once while it waits, at its next step while it runs; a finished job is left as it is."""
        job.cancel.set()
        if job.future is not None and job.future.cancel():
            self._finish(job, "cancelled")

    async def outcome(self, job: Job, timeout_s: float) -> GenerationResult:
        """The job's result once it ends; past `timeout_s` the job is cancelled and TimeoutError raised (its
        worker slot stays taken until the work has really stopped). A job cancelled meanwhile raises
        Cancelled; if the awaiting coroutine is cancelled instead (the server drops a request whose client
        left), the job is cancelled with it."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            self.cancel(job)
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if job.future.cancelled() and not (task and getattr(task, "cancelling", lambda: 0)()):
                raise Cancelled() from None  # the job was cancelled while it waited, not this coroutine
            self.cancel(job)  # the caller itself is cancelled (its client left, or shutdown): stop the work too
            raise

    def shutdown(self) -> None:
        """Drop queued work and wait for running work to end."""
        self.admission.shutdown()

    # ---- the worker ----------------------------------------------------------------------------
    def _run(self, job: Job) -> GenerationResult:
        if job.cancel.is_set():
            self._finish(job, "cancelled")
            raise Cancelled()
        job.status, job.started, job.steps = "running", time.time(), job.plan.steps

        def progress(done: int, total: int) -> None:
            job.step, job.steps = done, total
            job.step_times.append(time.time())
            job.step_log.append((done, total, job.elapsed(), job.eta()))
            if job.cancel.is_set():
                raise Cancelled()

        try:
            result = self._generate(job, progress)
        except Cancelled:
            self._finish(job, "cancelled")
            raise
        except SdaotError as exc:
            self._finish(job, "failed", error=exc.content())
            raise
        except Exception as exc:
            log.exception("generation %s failed", job.id)
            self._finish(job, "failed", error=error_content(500, f"internal error: {type(exc).__name__}"))
            raise
        job.result = result
        backend = result.backends.get("unet") or result.backends.get("unet_controlnet", "unknown")
        for earlier, later in zip(job.step_times, job.step_times[1:], strict=False):
            self._on_step(backend, later - earlier)
        self._finish(job, "succeeded")
        return result

    def _generate(self, job: Job, progress: Callable[[int, int], None]) -> GenerationResult:
        """Run the job's generation. A listed job whose pipeline is busy elsewhere (a remote one: every replica
        of the model is full) waits, queued, and tries again until it runs or is cancelled; a synchronous
        request gets the BusyError (its client retries)."""
        while True:
            try:
                return job.pipe.generate(job.plan, progress=progress)
            except BusyError:
                if not job.waits_when_busy:
                    raise
            job.status = "queued"
            if job.cancel.wait(BUSY_RETRY_S):
                raise Cancelled()
            job.status = "running"

    def _finish(self, job: Job, status: Status, error: dict[str, Any] | None = None) -> None:
        if job.done:
            return
        job.status, job.error, job.finished = status, error, time.time()
        if job.result is not None:
            log.info("finished %s %s: %d steps in %.2f s; backends %s", job.id, job.plan.request.model_name,
                     job.step, job.result.inference_time,
                     ", ".join(f"{k}={v}" for k, v in job.result.backends.items()))
        else:
            log.info("%s %s after %d of %d steps", status, job.id, job.step, job.steps or job.plan.steps)
        self._on_finished(job)

    def _expire(self) -> None:
        """Drop finished jobs older than keep_finished_s, and the oldest beyond keep_finished (lock held)."""
        now = time.time()
        finished = [j for j in self._jobs.values() if j.done]
        for job in finished:
            if now - (job.finished or now) > self.keep_finished_s:
                del self._jobs[job.id]
        finished = [j for j in self._jobs.values() if j.done]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]
