"""POST /v1/image/generation: the reference API's synchronous call, answered when the images are ready."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...errors import BusyError
from ..generation_queue import Cancelled, Job
from ..protocol import ApiGenerationRequest, GenerationResponse, error_responses
from ..serving import Server, ServerDep, error_body, plan_request

router = APIRouter()


@router.post("/v1/image/generation", response_model=GenerationResponse,
             responses=error_responses(400, 401, 404, 413, 422, 429, 499, 503, 504))
async def generation(body: ApiGenerationRequest, request: Request,
                     server: ServerDep) -> GenerationResponse | JSONResponse:
    """Generate images: the reference API's request and response. For work that may outlast a proxy's
    timeout, POST /v1/jobs takes the same body and reports progress."""
    pipe, plan = await plan_request(server, body)
    job = server.queue.run_now(pipe, plan, server.owner(request), server.delivery(body.output_format))
    if job is None:
        raise BusyError("the server is busy: every worker and queue slot is taken; retry later, or POST the same "
                        "body to /v1/jobs to wait in the job queue")
    start = time.perf_counter()
    watcher = asyncio.ensure_future(_cancel_when_client_leaves(request, server, job))
    try:
        await server.queue.outcome(job, server.config.timeout_s)
    except asyncio.TimeoutError:
        return error_body(504, f"generation took longer than {server.config.timeout_s:.0f} s and was cancelled",
                          None)
    except Cancelled:
        return error_body(499 if await request.is_disconnected() else 504, "generation cancelled", None)
    finally:
        watcher.cancel()
    server.latency.observe(time.perf_counter() - start)
    assert isinstance(job.answer, GenerationResponse)
    return job.answer  # encoded on the worker thread, off the event loop


async def _cancel_when_client_leaves(request: Request, server: Server, job: Job) -> None:
    """Drop queued or running work of a client that went away."""
    while not job.done:
        if await request.is_disconnected():
            server.queue.cancel(job)
            return
        await asyncio.sleep(0.5)
