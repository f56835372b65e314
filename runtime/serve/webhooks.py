"""Webhooks: one POST of a job's final state to the URL its creator gave, retried with backoff, bounded in
time, threads and where it may go.

The URL is checked when the job is created (`check_webhook_url`: well formed, http(s), an allowed host,
public addresses only) and again at each delivery attempt, after resolving it, connecting to the address
that was checked (`webhook_address`). A delivery has one deadline for all its attempts and pauses, not a
timeout per read, so a receiver that trickles bytes cannot hold it. Deliveries run on a small pool with a
bounded backlog; past it a delivery is dropped, logged and counted, rather than starting a thread per job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import httpx

from ..errors import InvalidRequestError
from .webhook_address import resolve_target

log = logging.getLogger("sdaot.webhooks")
ATTEMPTS = 4
FIRST_BACKOFF_S = 0.5
DEADLINE_S = 30.0
WORKERS = 4
BACKLOG = 64


def check_webhook_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL if a webhook may go there; InvalidRequestError on `webhook_url` saying why not. Resolves the
    host (blocks on DNS: call it off the event loop)."""
    resolve_target(url, allowed_hosts)
    return url


async def deliver(url: str, content: dict[str, Any], allowed_hosts: list[str], deadline_s: float = DEADLINE_S,
                  attempts: int = ATTEMPTS, backoff_s: float = FIRST_BACKOFF_S) -> str:
    """POST `content` as JSON until a 2xx answer, doubling the pause after each failure, all within
    `deadline_s`; the outcome: delivered, refused (the address check failed), failed or timed out."""
    with anyio.move_on_after(deadline_s):
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=deadline_s) as client:
            for attempt in range(1, attempts + 1):
                try:
                    target = await anyio.to_thread.run_sync(resolve_target, url, allowed_hosts,
                                                            abandon_on_cancel=True)
                except InvalidRequestError as exc:
                    log.error("webhook to %s refused: %s", url, exc.message)
                    return "refused"
                try:
                    async with client.stream("POST", target.pinned_url(), json=content,
                                             headers={"Host": target.host_header()},
                                             extensions={"sni_hostname": target.parts.hostname}) as response:
                        if response.is_success:
                            return "delivered"
                        reason = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                log.warning("webhook %s attempt %d/%d failed: %s", url, attempt, attempts, reason)
                if attempt < attempts:
                    await anyio.sleep(backoff_s * 2 ** (attempt - 1))
        return "failed"
    return "timed out"


class WebhookSender:
    """Deliveries on `workers` threads with room for `backlog` more waiting; `on_outcome` hears each one's
    outcome (delivered, refused, failed, timed out, or dropped when the pool was full)."""

    def __init__(self, allowed_hosts: list[str], workers: int = WORKERS, backlog: int = BACKLOG,
                 deadline_s: float = DEADLINE_S, on_outcome: Callable[[str], None] = lambda _: None) -> None:
        self.allowed_hosts = allowed_hosts
        self.deadline_s = deadline_s
        self._on_outcome = on_outcome
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdaot-webhook")
        self._slots = threading.BoundedSemaphore(workers + backlog)

    def send(self, url: str, content: Callable[[], dict[str, Any]], job_id: str) -> bool:
        """Queue a delivery (`content` is built on the pool); False, logged and counted, when the pool is full."""
        if not self._slots.acquire(blocking=False):
            log.error("webhook for %s to %s dropped: every delivery slot is taken", job_id, url)
            self._on_outcome("dropped")
            return False
        future = self._pool.submit(self._deliver, url, content, job_id)
        future.add_done_callback(lambda _: self._slots.release())
        return True

    def _deliver(self, url: str, content: Callable[[], dict[str, Any]], job_id: str) -> None:
        outcome = anyio.run(deliver, url, content(), self.allowed_hosts, self.deadline_s)
        if outcome != "delivered":
            log.error("webhook for %s to %s: %s", job_id, url, outcome)
        self._on_outcome(outcome)

    def shutdown(self) -> None:
        """Drop waiting deliveries; running ones end by their deadline."""
        self._pool.shutdown(wait=False, cancel_futures=True)
