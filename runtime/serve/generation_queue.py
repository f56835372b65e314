"""The one place where generation work is admitted, queued, run, timed, cancelled and counted.

The synchronous route and the jobs API both hand a planned request to `GenerationQueue.run_now` or
`submit_job` and get a `Job` back: its status, step progress, result or error, and a cancel switch that the
worker checks between steps. Synchronous work takes a slot of the bounded worker pool (`Admission`: a slot
is free only when the worker has really finished) and is not listed; jobs are listed under their owner,
bounded in number while unfinished (in all and per owner), and kept after they finish for a set time, count
and size per owner, so that one key's work never evicts another's. A finished generation keeps only its
encoded answer (made on the worker thread, never on the event loop): its images and the request's decoded
input images are dropped.

The queue knows nothing of HTTP: what an answer looks like and who hears of a job's end are the submitter's
(`Delivery`), so the same queue serves the HTTP routes and a Ray replica (which keeps the raw result).
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
from typing import Protocol

from PIL import Image

from ..errors import BusyError, SdaotError, ServiceUnavailableError
from ..images import encode_image
from ..pipeline import Cancelled, GenerationResult, Pipeline, Plan
from ..previews import PreviewSink
from .admission import Admission
from .protocol import JobStatus, LivePreview

log = logging.getLogger("sdaot.queue")
FINISHED: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
BUSY_RETRY_S = 1.0


class InternalError(SdaotError):
    """A generation failed for a reason that is not the client's; the details are in the log, under the id that
    the message names."""

    error_type = "api_error"


class WorkerLost(ServiceUnavailableError):
    """The process running a generation died under it (a Ray replica): nothing of the work is left, so a job
    runs once more elsewhere, while a synchronous request answers 503 for its client to retry."""


class Encoded(Protocol):
    """A succeeded job's answer as its submitter encoded it; the queue needs only its size (the byte budget)."""

    @property
    def nbytes(self) -> int:
        """The bytes it holds."""
        ...


class Delivery(Protocol):
    """What the submitter of a job does with its outcome: `encode` makes, on the worker thread, the answer the
    job keeps instead of its images; `finished` hears once that the job has ended, on the thread that ended it
    (a worker, or a cancel of a job still waiting), so it must not block."""

    def encode(self, job: Job, result: GenerationResult) -> Encoded:
        """The answer of the job's succeeded generation."""
        ...

    def finished(self, job: Job) -> None:
        """The job has ended: succeeded, failed or cancelled."""
        ...


@dataclass
class Job:
    """One planned request on its way through the queue; the worker thread updates it, the routes read it.

    `step_log` holds (step, steps, elapsed s, ETA s) per finished sampler step, for the events stream;
    `result` the generation's images until its `delivery` encodes them into `answer`, which every later read
    returns as it is (without a delivery `result` stays); `plan` is dropped once the answer is encoded (it holds
    the decoded input images); `error` is the failure as a client may see it (its details logged);
    `is_job` whether it waits for a busy pipeline and runs once more if its worker is lost (a listed job), or
    fails with 429 or 503 at once (a synchronous request, whose client retries);
    `preview` is the latest live preview (its step and WebP image, set as one, so a reader never pairs one
    preview's step with another's image);
    `version` counts changes (a step, a preview, a new status), which `notify` tells the events streams about."""

    id: str
    owner: str
    pipe: Pipeline
    plan: Plan | None
    created: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    step: int = 0
    steps: int = 0
    started: float | None = None
    finished: float | None = None
    step_times: list[float] = field(default_factory=list)
    step_log: list[tuple[int, int, float, float | None]] = field(default_factory=list)
    preview: LivePreview | None = None
    result: GenerationResult | None = None
    answer: Encoded | None = None
    error: SdaotError | None = None
    delivery: Delivery | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    is_job: bool = False
    version: int = 0
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    _waiters_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.plan is not None and not self.steps:
            self.steps = self.plan.steps

    def notify(self) -> None:
        """Count a change and wake every coroutine waiting in `changed` (from any thread)."""
        with self._waiters_lock:
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def changed(self, seen: int, timeout_s: float) -> None:
        """Return once `version` differs from `seen`, or after `timeout_s`: an event, not a polling loop."""
        event = asyncio.Event()
        with self._waiters_lock:
            if self.version != seen:
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            with self._waiters_lock:
                self._waiters = [w for w in self._waiters if w[1] is not event]

    @property
    def answer_bytes(self) -> int:
        """The size of the encoded answer (0 until there is one)."""
        return self.answer.nbytes if self.answer is not None else 0

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
                 on_step: Callable[[str, float], None] = lambda *_: None, max_jobs_per_key: int | None = None,
                 keep_finished_bytes: int | None = None) -> None:
        """`keep_finished` and `keep_finished_bytes` bound each owner's finished jobs, `max_jobs_per_key` each
        owner's unfinished ones (None: no bound beyond the queue's)."""
        self.admission = Admission(workers, queue_size, on_change=on_depth)
        self.jobs_capacity = workers + max_queued_jobs
        self.keep_finished_s = keep_finished_s
        self.keep_finished = keep_finished
        self.keep_finished_bytes = keep_finished_bytes
        self.max_jobs_per_key = max_jobs_per_key
        self._on_step = on_step
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    # ---- submitting ----------------------------------------------------------------------------
    def run_now(self, pipe: Pipeline, plan: Plan, owner: str, delivery: Delivery | None = None) -> Job | None:
        """Admit a synchronous request (not listed as a job); None when every worker and queue slot is taken."""
        job = Job(secrets.token_hex(8), owner, pipe, plan, delivery=delivery)
        job.future = self.admission.submit(self._run, job)
        return job if job.future is not None else None

    def submit_job(self, pipe: Pipeline, plan: Plan, owner: str, delivery: Delivery | None = None) -> Job | None:
        """Queue a job listed under `owner`; None when the maximum of unfinished work is reached, BusyError when
        `owner` has `max_jobs_per_key` unfinished jobs already. Jobs may wait in a longer queue than synchronous
        requests, which then get 429 until the jobs ahead have run."""
        job = Job("job_" + secrets.token_hex(12), owner, pipe, plan, delivery=delivery, is_job=True)
        with self._lock:
            self._expire()
            mine = sum(1 for j in self._jobs.values() if j.owner == owner and not j.done)
            if self.max_jobs_per_key is not None and mine >= self.max_jobs_per_key:
                raise BusyError(f"this API key has {mine} unfinished jobs, the most one key may have "
                                "(--max-jobs-per-key); retry when one has ended")
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

    async def outcome(self, job: Job, timeout_s: float) -> None:
        """Wait for the job to end (its answer is then in `answer`, or in `result` without a delivery); past
        `timeout_s` the job is cancelled and TimeoutError raised (its worker slot stays taken until the work has
        really stopped). A job cancelled meanwhile raises
        Cancelled; if the awaiting coroutine is cancelled instead (the server drops a request whose client
        left), the job is cancelled with it."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=timeout_s)
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
    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            self._finish(job, "cancelled")
            raise Cancelled()
        job.status, job.started = "running", time.time()
        job.notify()

        def progress(done: int, total: int) -> None:
            job.step, job.steps = done, total
            job.step_times.append(time.time())
            job.step_log.append((done, total, job.elapsed(), job.eta()))
            job.notify()
            if job.cancel.is_set():
                raise Cancelled()

        def preview(step: int, image: Image.Image) -> None:
            job.preview = LivePreview(step=step, image=encode_image(image, "webp"))
            job.notify()

        try:
            result = self._generate(job, progress, preview)
            if job.delivery is not None:
                job.answer = job.delivery.encode(job, result)
        except Cancelled:
            self._finish(job, "cancelled")
            raise
        except SdaotError as exc:
            self._finish(job, "failed", error=exc.reported(job.id))
            raise
        except Exception:
            log.exception("generation %s failed", job.id)
            self._finish(job, "failed", error=InternalError(
                f"internal error (details in the server log under request id {job.id})"))
            raise
        job.result = result
        backend = result.backends.get("unet") or result.backends.get("unet_controlnet", "unknown")
        for earlier, later in zip(job.step_times, job.step_times[1:], strict=False):
            self._on_step(backend, later - earlier)
        self._finish(job, "succeeded")

    def _generate(self, job: Job, progress: Callable[[int, int], None], preview: PreviewSink) -> GenerationResult:
        """Run the job's generation. A listed job whose pipeline is busy elsewhere (a remote one: every replica
        of the model is full) waits, queued, and tries again until it runs or is cancelled; one whose worker
        is lost runs once more, from its first step (its ETA measured anew). A synchronous request gets the
        BusyError or WorkerLost (its client retries)."""
        lost = False
        while True:
            try:
                return job.pipe.generate(job.plan, progress=progress, stop=job.cancel, preview=preview)
            except WorkerLost as exc:
                if not job.is_job or lost:
                    raise
                log.warning("%s: %s; running it once more", job.id, exc.message)
                lost = True
                job.step_times.clear()
                continue
            except BusyError:
                if not job.is_job:
                    raise
            job.status = "queued"
            job.notify()
            if job.cancel.wait(BUSY_RETRY_S):
                raise Cancelled()
            job.status = "running"
            job.notify()

    def _finish(self, job: Job, status: JobStatus, error: SdaotError | None = None) -> None:
        if job.done:
            return
        if job.result is not None:
            log.info("finished %s %s: %d steps in %.2f s; backends %s", job.id, job.pipe.spec.name,
                     job.step, job.result.inference_time,
                     ", ".join(f"{k}={v}" for k, v in job.result.backends.items()))
        else:
            log.info("%s %s after %d of %d steps", status, job.id, job.step, job.steps)
        if job.delivery is not None:
            job.result, job.plan = None, None  # the answer is encoded: images and decoded inputs go
        job.status, job.error, job.finished = status, error, time.time()
        job.notify()
        with self._lock:
            self._expire()
        if job.delivery is not None:
            job.delivery.finished(job)

    def _expire(self) -> None:
        """Drop finished jobs older than keep_finished_s, then, for each owner, the oldest finished beyond
        keep_finished or past keep_finished_bytes of answers; an owner's newest finished job stays (lock held)."""
        now = time.time()
        by_owner: dict[str, list[Job]] = {}
        for job in list(self._jobs.values()):
            if not job.done:
                continue
            if now - (job.finished or now) > self.keep_finished_s:
                del self._jobs[job.id]
            else:
                by_owner.setdefault(job.owner, []).append(job)
        for finished in by_owner.values():
            finished.sort(key=lambda j: j.finished or now)
            size = sum(j.answer_bytes for j in finished)
            while len(finished) > self.keep_finished or (len(finished) > 1 and self.keep_finished_bytes is not None
                                                          and size > self.keep_finished_bytes):
                oldest = finished.pop(0)
                size -= oldest.answer_bytes
                del self._jobs[oldest.id]
