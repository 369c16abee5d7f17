"""EngineRouter: which engine replica serves a request (plain class; the Serve ingress wraps it).

Policy (slime's router, rebuilt): least outstanding requests among healthy engines
(round-robin among ties); a multi-turn session (same ``session_id``) stays on the engine
that served its first turn, so its prefix stays warm there; an engine whose call failed
with a system error is skipped for ``unhealthy_cooldown_s`` seconds (a session pinned to it
moves to another engine). Concurrency is bounded per engine (slime's
``--sglang-server-concurrency``, here ``--rollout-max-concurrency``): a request over the
bound waits for a slot (backpressure), it is never refused.

All methods run on one asyncio event loop (the ingress replica); no locking is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any


class EngineRouter:
    """Least-loaded routing with session affinity, health and per-engine concurrency bounds.

    Args:
        num_engines: engine replicas (indices 0..N-1).
        max_concurrency: most requests in flight per engine; more wait for a slot.
        unhealthy_cooldown_s: seconds an engine is skipped after a failed call.
        max_sessions: session -> engine entries kept (least recently used are dropped).

    Raises:
        ValueError: ``num_engines < 1`` or ``max_concurrency < 1``.
    """

    def __init__(self, num_engines: int, max_concurrency: int = 512, unhealthy_cooldown_s: float = 10.0,
                 max_sessions: int = 100_000):
        if num_engines < 1 or max_concurrency < 1:
            raise ValueError(f"EngineRouter: num_engines ({num_engines}) and max_concurrency "
                             f"({max_concurrency}) must be >= 1")
        self.num_engines = num_engines
        self.max_concurrency = max_concurrency
        self.unhealthy_cooldown_s = unhealthy_cooldown_s
        self.max_sessions = max_sessions
        self.outstanding = [0] * num_engines  # routed and not finished (waiting + running)
        self.unhealthy_until = [0.0] * num_engines
        self.sessions: OrderedDict[str, int] = OrderedDict()
        self._slots: list[asyncio.Semaphore] | None = None  # created on the serving loop
        self._rr = itertools.count()

    def healthy(self, i: int) -> bool:
        return time.monotonic() >= self.unhealthy_until[i]

    def mark_failed(self, i: int) -> None:
        """Skip engine ``i`` for ``unhealthy_cooldown_s`` seconds."""
        self.unhealthy_until[i] = time.monotonic() + self.unhealthy_cooldown_s

    def mark_healthy(self, i: int) -> None:
        self.unhealthy_until[i] = 0.0

    def pick(self, session_id: Any = None, exclude: set[int] | None = None) -> int:
        """Engine index for a request: its session's engine if healthy, else the least loaded.

        When every engine is unhealthy (or excluded), the least loaded of all is returned.
        """
        exclude = exclude or set()
        key = None if session_id is None else str(session_id)
        if key is not None and key in self.sessions:
            i = self.sessions[key]
            if self.healthy(i) and i not in exclude:
                self.sessions.move_to_end(key)
                return i
        n = self.num_engines
        start = next(self._rr) % n
        order = [(start + k) % n for k in range(n)]
        candidates = [i for i in order if self.healthy(i) and i not in exclude] or \
            [i for i in order if i not in exclude] or order
        i = min(candidates, key=lambda j: self.outstanding[j])
        if key is not None:
            self.sessions[key] = i
            self.sessions.move_to_end(key)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return i

    @contextlib.asynccontextmanager
    async def slot(self, i: int) -> AsyncIterator[None]:
        """Count a request on engine ``i`` and hold one of its ``max_concurrency`` slots."""
        if self._slots is None:
            self._slots = [asyncio.Semaphore(self.max_concurrency) for _ in range(self.num_engines)]
        self.outstanding[i] += 1
        try:
            async with self._slots[i]:
                yield
        finally:
            self.outstanding[i] -= 1

    @contextlib.asynccontextmanager
    async def slots_if_free(self, i: int, k: int) -> AsyncIterator[bool]:
        """Hold ``k`` slots of engine ``i`` at once if they are free now (yields True), else
        take none (yields False; the caller then goes request by request). Never waits, so a
        burst never holds part of the slots while it waits for the rest."""
        if self._slots is None:
            self._slots = [asyncio.Semaphore(self.max_concurrency) for _ in range(self.num_engines)]
        sem = self._slots[i]
        if sem.locked() or sem._value < k:  # asyncio.Semaphore keeps its free count in _value
            yield False
            return
        for _ in range(k):
            await sem.acquire()  # free and nobody waiting: returns without suspending
        self.outstanding[i] += k
        try:
            yield True
        finally:
            self.outstanding[i] -= k
            for _ in range(k):
                sem.release()

    def state(self) -> dict[str, Any]:
        """``{"outstanding": [...], "healthy": [...], "sessions": int}`` for /health and tests."""
        return {"outstanding": list(self.outstanding),
                "healthy": [self.healthy(i) for i in range(self.num_engines)],
                "sessions": len(self.sessions)}
