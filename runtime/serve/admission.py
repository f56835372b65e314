"""Bounded admission of generation work: a slot is taken before a request is queued and given back only
when its work has really ended.

A request that answers 504 (or whose client left) cancels its generation, but the worker stops only at
its next step, and text encoding or VAE decoding cannot be interrupted at all. Counting the slot free
when the HTTP answer goes out let new work pile up behind still-busy workers; here the slot follows the
worker's future instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Admission:
    """`workers` threads running work, and room for `queue_size` more waiting; nothing beyond that."""

    def __init__(self, workers: int, queue_size: int, on_change: Callable[[int], None] = lambda _: None) -> None:
        self.capacity = workers + queue_size
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdaot-worker")
        self._on_change = on_change
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Work items queued or running right now."""
        return self._admitted

    def submit(self, fn: Callable[..., Any], *args: Any, capacity: int | None = None) -> Future | None:
        """Queue `fn(*args)` on a worker, or None (nothing queued) when every slot is taken; `capacity` (room
        for more waiting work, for jobs that are meant to wait) replaces the default for this item."""
        with self._lock:
            if self._admitted >= (capacity or self.capacity):
                return None
            self._admitted += 1
            self._on_change(self._admitted)
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._admitted -= 1
            self._on_change(self._admitted)

    def shutdown(self) -> None:
        """Drop queued work and wait for running work to end."""
        self.pool.shutdown(wait=True, cancel_futures=True)
