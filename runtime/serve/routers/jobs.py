"""Jobs: queue a generation and come back for it (POST, GET, DELETE /v1/jobs, and a Server-Sent Events
stream of its steps). A job is visible to the API key that created it only; to anyone else it does not
exist (404, the same answer as for an unknown or expired id). Event streams are bounded in number (in all
and per key) and wake on the job's changes, not on a timer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...errors import BusyError, NotFoundError
from ..generation_queue import Job
from ..protocol import JobAccepted, JobRequest, JobState, error_responses
from ..serving import Server, ServerDep, job_state, plan_request
from ..webhooks import check_webhook_url

router = APIRouter(prefix="/v1/jobs")
KEEP_ALIVE_S = 15.0


@router.post("", status_code=202, response_model=JobAccepted,
             responses=error_responses(400, 401, 404, 413, 422, 429, 503))
async def create_job(body: JobRequest, request: Request, server: ServerDep) -> JobAccepted:
    """Queue a generation (the body of /v1/image/generation, plus an optional `webhook_url`)."""
    if body.webhook_url is not None:
        await run_in_threadpool(check_webhook_url, body.webhook_url, server.config.webhook_allow)
    pipe, plan = await plan_request(server, body)
    job = server.queue.submit_job(pipe, plan, server.owner(request),
                                  server.delivery(body.output_format, body.webhook_url))
    if job is None:
        raise BusyError(f"the job queue is full ({server.config.max_queued_jobs} waiting); retry later")
    return JobAccepted(id=job.id, status=job.status, queue_position=server.queue.position(job))


@router.get("/{job_id}", response_model=JobState, response_model_exclude_unset=True,
            responses=error_responses(401, 404))
async def get_job(job_id: str, request: Request, server: ServerDep) -> JobState:
    """The job's status; while running its step, elapsed time and ETA; its images once succeeded."""
    return job_state(server, _owned(server, request, job_id))


@router.delete("/{job_id}", response_model=JobState, response_model_exclude_unset=True,
               responses=error_responses(401, 404))
async def cancel_job(job_id: str, request: Request, server: ServerDep) -> JobState:
    """Cancel this job: at once while queued, at its next step while running (a finished job stays as it is)."""
    job = _owned(server, request, job_id)
    server.queue.cancel(job)
    return job_state(server, job)


@router.get("/{job_id}/events", responses={**error_responses(401, 404), 200: {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "`status` once, `progress` after every step, `preview` as asked (`preview_every`), then "
                   "`result` with the final state"}})
async def job_events(job_id: str, request: Request, server: ServerDep) -> StreamingResponse:
    """Server-Sent Events: the job's state now (`status`, without images), one `progress` event per finished
    step, a `preview` event with each new live preview (a small WebP, base64; the request's `preview_every`),
    then `result` with the final state."""
    job = _owned(server, request, job_id)
    owner = server.owner(request)
    server.streams.take(owner)
    return ClosingStream(_events(server, job), lambda: server.streams.give_back(owner), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ClosingStream(StreamingResponse):
    """A streaming response that calls `on_close` once it has ended, however it ended (its client left before
    the first byte included)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _events(server: Server, job: Job) -> AsyncIterator[str]:
    """The stream's events; it sleeps until the job changes (a comment line every KEEP_ALIVE_S meanwhile, so
    a client that left is noticed). Starlette ends it when its client disconnects."""
    yield _event("status", job_state(server, job).wire(with_result=False))
    sent, previewed = 0, (job.preview.step if job.preview else 0)
    while True:
        seen = job.version
        steps = list(job.step_log)
        for step, total, elapsed, eta in steps[sent:]:
            yield _event("progress", {"id": job.id, "status": "running", "step": step, "steps": total,
                                      "elapsed": round(elapsed, 3), "eta": eta})
        sent = len(steps)
        preview = job.preview
        if preview is not None and preview.step != previewed:
            previewed = preview.step
            yield _event("preview", {"id": job.id, "step": preview.step, "steps": job.steps, "image": preview.image})
        if job.done and sent == len(job.step_log):
            yield _event("result", job_state(server, job).wire())
            return
        await job.changed(seen, KEEP_ALIVE_S)
        if job.version == seen:
            yield ": keep-alive\n\n"


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _owned(server: Server, request: Request, job_id: str) -> Job:
    job = server.queue.get(job_id, server.owner(request))
    if job is None:
        raise NotFoundError(f"no job {job_id!r} for this API key (finished jobs are kept "
                            f"{server.config.keep_finished_s:.0f} s, at most {server.config.keep_finished})",
                            param="job_id")
    return job
