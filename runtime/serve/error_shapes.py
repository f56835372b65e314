"""One place decides how an error answers: by the path it answers on. The reference API's shape everywhere,
but OpenAI's under /v1/images/ (where validation failures are 400, as OpenAI's clients expect) and
AUTOMATIC1111's under /sdapi/ (whose 401 asks for HTTP Basic credentials, as its clients send)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from .a1111_protocol import A1111_PREFIX, a1111_error_content
from .access import route_path
from .openai_protocol import OPENAI_PREFIX, openai_error_content
from .protocol import error_content


@dataclass(frozen=True)
class ErrorDialect:
    """How one API spoken here answers errors: its body shape, the status of a body that fails validation,
    and the `WWW-Authenticate` challenge of a 401 (None: none)."""

    prefix: str
    content: Callable[[int, str, str | None, str | None], dict[str, object]]
    invalid_status: int = 422
    challenge: str | None = None


REFERENCE = ErrorDialect("", error_content)
DIALECTS = (ErrorDialect(OPENAI_PREFIX, openai_error_content, invalid_status=400),
            ErrorDialect(A1111_PREFIX, a1111_error_content, challenge='Basic realm="sdaot"'))


def dialect_of(path: str) -> ErrorDialect:
    """The error dialect of a router path."""
    return next((d for d in DIALECTS if path.startswith(d.prefix)), REFERENCE)


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None,
               path: str = "") -> JSONResponse:
    """An error answer in the shape of the API that router path `path` belongs to."""
    dialect = dialect_of(path)
    response = JSONResponse(dialect.content(status, message, param, kind), status_code=status)
    if status == 401 and dialect.challenge:
        response.headers["WWW-Authenticate"] = dialect.challenge
    return response


def error_app(status: int, message: str, param: str | None = None) -> Callable[..., Any]:
    """An error answer as an ASGI app that takes its shape from the path it answers: what middleware
    refusals send, before any route has matched."""

    async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await error_body(status, message, param, path=route_path(scope))(scope, receive, send)

    return answer
