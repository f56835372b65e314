"""Webhooks: one POST of a job's final state to the URL its creator gave, retried with backoff.

A webhook makes the server send a request where a client says, so the URL is checked before the job is
accepted: http or https only, and, when the operator lists hosts (`--webhook-allow`), one of those hosts.
Delivery runs on its own thread, never on a generation worker, and gives up after a few tries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from .errors import InvalidRequestError

log = logging.getLogger("sdaot.webhooks")
ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5
TIMEOUT_S = 10.0


def check_webhook_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL if a webhook may go there; InvalidRequestError on `webhook_url` saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"webhook_url must be an http(s) URL with a host (got {url!r})",
                                  param="webhook_url")
    if allowed_hosts and parts.hostname.lower() not in {h.lower() for h in allowed_hosts}:
        raise InvalidRequestError(f"webhook_url host {parts.hostname!r} is not allowed on this server; allowed: "
                                  f"{', '.join(allowed_hosts)}", param="webhook_url")
    return url


def deliver(url: str, content: dict[str, Any], attempts: int = ATTEMPTS, backoff_s: float = FIRST_BACKOFF_S,
            timeout_s: float = TIMEOUT_S) -> bool:
    """POST `content` as JSON until a 2xx answer, doubling the pause after each failure; whether it arrived."""
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(url, json=content, timeout=timeout_s, follow_redirects=False)
            if response.is_success:
                return True
            reason = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("webhook %s attempt %d/%d failed: %s", url, attempt, attempts, reason)
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return False


def deliver_in_background(url: str, content: Callable[[], dict[str, Any]], job_id: str) -> None:
    """Deliver on a daemon thread; `content` is built there (encoding the images takes a moment)."""
    def send() -> None:
        if not deliver(url, content()):
            log.error("webhook for %s to %s gave up after %d attempts", job_id, url, ATTEMPTS)

    threading.Thread(target=send, name=f"webhook-{job_id}", daemon=True).start()
