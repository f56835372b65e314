"""How many job event streams (Server-Sent Events) may be open: in all, and per API key.

Each stream holds a connection and a coroutine for as long as its client keeps it open, so without a bound a
client could open them until the server runs out of sockets; the per-key bound keeps one key from taking
every place. The count is kept on the event loop's thread only (no lock needed).
"""

from __future__ import annotations

from collections import Counter

from ..errors import BusyError


class StreamLimit:
    """At most `total` open streams, `per_key` of them for one owner."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self._open: Counter[str] = Counter()

    def take(self, owner: str) -> None:
        """Count a new stream of `owner`; BusyError (429) when a bound is reached."""
        if self._open[owner] >= self.per_key:
            raise BusyError(f"this API key has {self._open[owner]} event streams open, the most one key may have; "
                            "close one, or poll GET /v1/jobs/{id}")
        if sum(self._open.values()) >= self.total:
            raise BusyError("the server has as many event streams open as it allows; retry later, or poll "
                            "GET /v1/jobs/{id}")
        self._open[owner] += 1

    def give_back(self, owner: str) -> None:
        """A stream of `owner` has ended."""
        self._open[owner] -= 1
        if self._open[owner] <= 0:
            del self._open[owner]

