"""A per-address sliding-window rate limit, in memory (one process serves the blog)."""

from __future__ import annotations

import time
from collections import deque


class RateLimit:
    """At most ``limit`` requests per ``window`` seconds from one address."""

    def __init__(self, limit: int, window: float, max_addresses: int = 10_000) -> None:
        self._limit = limit
        self._window = window
        self._max = max_addresses
        self._seen: dict[str, deque[float]] = {}

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        if len(self._seen) >= self._max:  # forget idle addresses before growing further
            for key in [k for k, v in self._seen.items() if not v or now - v[-1] > self._window]:
                del self._seen[key]
        hits = self._seen.setdefault(address, deque())
        while hits and now - hits[0] > self._window:
            hits.popleft()
        if len(hits) >= self._limit:
            return False
        hits.append(now)
        return True
