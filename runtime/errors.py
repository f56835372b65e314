"""Errors a user can act on: each names the request field (or CLI flag) at fault and why."""

from __future__ import annotations


class SdaotError(Exception):
    """Base class of every error sdaot reports to a user instead of a traceback."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class InvalidRequestError(SdaotError):
    """A request value is out of range, unknown, or unreadable."""


class NotFoundError(SdaotError):
    """A named thing (model, artifact) does not exist here."""

    status_code = 404
    error_type = "not_found_error"


class WeightsNotFoundError(SdaotError):
    """Weights for a model are missing; the message says what to download or which flag to pass."""

    status_code = 503
    error_type = "weights_not_found"


class BackendUnavailableError(SdaotError):
    """The requested backend cannot run this request (no artifact, corrupt artifact, missing runtime)."""
