"""Liveness and readiness (public), and Prometheus metrics (behind the key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..error_shapes import error_body
from ..protocol import error_responses
from ..serving import ServerDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    """Alive (the process answers)."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
async def readyz(request: Request, server: ServerDep):
    """Ready once every configured model is loaded; the models, or why not, only to a request with a key."""
    detailed = server.authorized(request)
    if server.ready.is_set():
        return {"status": "ready", "models": list(server.pipelines)} if detailed else {"status": "ready"}
    if not detailed:
        return error_body(503, "not ready (send an API key to see why)", None)
    return error_body(503, server.load_error or "models are still loading", None)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={**error_responses(401), 200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                                                     "description": "Prometheus text format"}})
async def metrics(server: ServerDep) -> Response:
    """Prometheus metrics (with an API key, as every path but the page, health and docs)."""
    return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)
