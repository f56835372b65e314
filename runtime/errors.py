"""Errors a user can act on: each names the request field (or CLI flag) at fault and why, and its kind
(`error_type`); the serving wing maps kinds to HTTP statuses (`serve.protocol.status_of`).

What a client is told never holds an absolute path or a library's own exception text: such text goes in an
error's `detail`, which is logged under the request's id (`reported`), and the answer names that id.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("sdaot.errors")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?!v1/)(?:[^\s/'\"`]+/)+([^\s/'\"`,;:)]*)")


class SdaotError(Exception):
    """Base class of every error sdaot reports to a user instead of a traceback."""

    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message

    def __reduce__(self) -> tuple:
        """Pickled with its field and detail, so that it crosses process boundaries (Ray) whole."""
        return type(self), (self.message, self.param, self.detail)

    def reported(self, ref: str) -> SdaotError:
        """This error as a client may see it: its detail, if any, logged under `ref` (a request or job id),
        and the message naming `ref` so that an operator can find it."""
        if self.detail is None:
            return self
        log.warning("%s: %s: %s", ref, self.message, self.detail)
        return type(self)(f"{self.message} (details in the server log under request id {ref})", self.param)


class InvalidRequestError(SdaotError):
    """A request value is out of range, unknown, or unreadable."""


class NotFoundError(SdaotError):
    """A named thing (model, artifact) does not exist here."""

    error_type = "not_found_error"


class WeightsNotFoundError(SdaotError):
    """Weights for a model are missing; the message says what to download or which flag to pass."""

    error_type = "weights_not_found"


class ServiceUnavailableError(SdaotError):
    """The server cannot take the request now (models still loading, or failed to load: the message says)."""

    error_type = "service_unavailable"


class BusyError(SdaotError):
    """Every slot for this kind of work is taken; the answer carries Retry-After."""

    error_type = "rate_limit_error"
    retry_after_s = 5


class BackendUnavailableError(SdaotError):
    """The requested backend cannot run this request (no artifact, corrupt artifact, missing runtime)."""


def without_paths(text: str) -> str:
    """`text` with every absolute filesystem path cut to `.../<last part>` (API paths, /v1/..., are kept)."""
    return ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}", text)
