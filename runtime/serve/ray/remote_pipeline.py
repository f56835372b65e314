"""The Ray Serve ingress's stand-in for a model's Pipeline: it plans requests itself and runs them on the
model's replicas, so the routes, the generation queue and the jobs API work unchanged over a cluster.

Planning needs no weights (`Planner`), so only `generate` crosses to a replica. It streams the replica's
sampler steps back as they finish, which keeps the jobs API's progress, ETA and cancellation: a cancelled job
cancels the stream, and the replica stops the generation at its next step; the ingress's worker waits for the
stream's end, so that it counts the work as long as Ray does. What can go wrong on the way becomes the error
a local server would give: Ray's back-pressure (every replica of the model is full) a 429, a replica that
died under the request a 503 (`WorkerLost`: the generation queue runs a job once more), a bad request the
replica refused its own 4xx.
"""

from __future__ import annotations

import threading
from typing import Any

from ...errors import BusyError, SdaotError, ServiceUnavailableError
from ...images import decode_image
from ...pipeline import Cancelled, GenerationResult, Plan, Progress
from ...planning import Planner
from ...previews import PREVIEW_SIDE, PreviewSink
from ...registry import ModelSpec
from ...request import GenerationRequest
from ..generation_queue import WorkerLost
from ..protocol import LivePreview


class RemotePipeline:
    """Model `spec` served by the Ray Serve deployment behind `handle`; `summary` is what its replicas reported
    when the ingress started (weights, compiled resolutions, LoRA files)."""

    def __init__(self, spec: ModelSpec, handle: Any, planner: Planner, summary: dict) -> None:
        self.spec = spec
        self.handle = handle
        self.planner = planner
        self._summary = summary

    def plan(self, req: GenerationRequest) -> Plan:
        """Validate the request against this model and fill in defaults, as the replicas would."""
        return self.planner.plan(req)

    def compiled_resolutions(self) -> list[str]:
        """Resolutions with a compiled UNet, as the replicas reported them."""
        return self._summary["compiled_resolutions"]

    def summary(self) -> dict:
        """What the model's replicas offer, for /v1/models."""
        return self._summary

    def generate(self, plan: Plan, progress: Progress | None = None,
                 stop: threading.Event | None = None, preview: PreviewSink | None = None) -> GenerationResult:
        """Run the plan on a replica, reporting each finished step to `progress` (which may raise Cancelled to
        stop it) and each live preview to `preview`; nothing is sent when `stop` is set already. Blocks: called
        from a generation worker thread, never from the event loop."""
        if stop is not None and stop.is_set():
            raise Cancelled()
        stream = self.handle.options(stream=True).generate.remote(plan)
        try:
            for item in stream:
                if isinstance(item, GenerationResult):
                    return item
                if isinstance(item, LivePreview):
                    if preview is not None:
                        preview(item.step, decode_image(item.image, "preview", PREVIEW_SIDE**2))
                elif progress is not None:
                    progress(*item)
        except Cancelled:
            stream.cancel()
            _wait_for_end(stream)
            raise
        except Exception as exc:
            raise replica_error(self.spec.name, exc) from exc
        raise ServiceUnavailableError(f"a replica of {self.spec.name} ended the generation without a result; "
                                      "retry")


def replica_error(model: str, exc: Exception) -> Exception:
    """The error a client gets for a failed call to one of `model`'s replicas (the exception itself when it is
    not Ray's doing)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return BusyError(f"every replica of {model} is busy and its queue is full; retry later, or POST the same "
                         "body to /v1/jobs to wait in the job queue")
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, SdaotError):
        return exc.cause
    if isinstance(exc, RayActorError):
        return WorkerLost(f"the replica of {model} running this request stopped ({type(exc).__name__}); retry: "
                          "another replica takes it")
    return exc


def _wait_for_end(stream: Any) -> None:
    """Return once a cancelled stream has ended: its error comes when the replica's call has ended, and until
    then the calling worker (one of the ingress's counted slots) stays taken, as Ray's count of the call does.
    Any error is the cancel's own, or the replica's, which the cancelled request no longer needs."""
    try:
        for _ in stream:
            pass
    except Exception:  # see above: the request is cancelled whatever the stream ends with
        return
