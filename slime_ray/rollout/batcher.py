"""GapBatcher: gathers concurrent single requests into one batched call (plain asyncio class).

Why not a fixed deadline (``@serve.batch``'s ``batch_wait_timeout_s`` counted from the first
request)? A burst of N requests reaches the engine replica spread over time (HTTP proxy ->
ingress -> engine); on a loaded machine that spread exceeds the deadline, so the first batch
leaves with a handful of requests, the rest waits for it, and one burst costs 2-3 full
generate calls. Here a batch stays open while requests keep arriving: it closes when no new
request came for ``gap_s`` seconds, after ``max_wait_s`` seconds, or at ``max_batch_size``.
An isolated request waits ``gap_s`` (the same as a ``gap_s`` deadline). Requests that queue
while a batch runs all go into the next one. One batch runs at a time.

Known bursts: a caller that sends a burst of requests at once (the ingress splitting one
``generate_batch`` call over the engines) tags each request with ``burst=(burst_id, count)``.
A batch whose every request belongs to a burst it holds completely (all ``count`` members
arrived) closes as soon as the queue is empty, without waiting ``gap_s`` for stragglers that
cannot come. Any untagged request, or a burst with a member missing (re-routed, held back by
the concurrency bound), falls back to the gap rule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class GapBatcher:
    """``await batcher.submit(item)`` -> ``fn(batch)[position of item]``.

    Args:
        fn: ``async fn(items: list) -> list`` (one result per item, in order).
        max_batch_size: most items per ``fn`` call.
        gap_s: a batch closes once no new item arrived for this many seconds.
        max_wait_s: a batch closes at the latest this many seconds after its first item.

    An exception raised by ``fn`` is raised to every caller of that batch.
    """

    def __init__(self, fn: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int = 64,
                 gap_s: float = 0.05, max_wait_s: float = 0.5):
        if max_batch_size < 1:
            raise ValueError(f"GapBatcher: max_batch_size must be >= 1, got {max_batch_size}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.gap_s = gap_s
        self.max_wait_s = max(max_wait_s, gap_s)
        self._queue: asyncio.Queue | None = None
        self._burst_taken: dict[str, int] = {}  # burst id -> members already batched
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any, burst: tuple[str, int] | None = None) -> Any:
        """Queue ``item`` (optionally a member of a known burst, see the module docstring)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future, tuple(burst) if burst else None))
        return await future

    def _bursts_complete(self, batch: list[tuple[Any, asyncio.Future, Any]]) -> bool:
        """Every item is tagged and every burst in the batch has all its members (counting those
        an earlier batch took when the burst was larger than ``max_batch_size``)."""
        seen: dict[str, list[int]] = {}
        for _, _, burst in batch:
            if burst is None:
                return False
            seen.setdefault(burst[0], [self._burst_taken.get(burst[0], 0), int(burst[1])])[0] += 1
        return all(n >= count for n, count in seen.values())

    def _count_taken(self, batch: list[tuple[Any, asyncio.Future, Any]]) -> None:
        """Remember how many members of a burst left in this batch (for the next batch's check)."""
        for _, _, burst in batch:
            if burst is not None:
                self._burst_taken[burst[0]] = self._burst_taken.get(burst[0], 0) + 1
        for key, count in {b[0]: int(b[1]) for _, _, b in batch if b is not None}.items():
            if self._burst_taken[key] >= count:
                del self._burst_taken[key]

    async def _collect(self) -> list[tuple[Any, asyncio.Future, Any]]:
        batch = [await self._queue.get()]
        start = time.monotonic()
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if self._bursts_complete(batch):
                break
            remaining = self.max_wait_s - (time.monotonic() - start)
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), min(self.gap_s, remaining)))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            collected = await self._collect()
            self._count_taken(collected)
            batch = [(item, fut) for item, fut, _ in collected if not fut.done()]
            if not batch:
                continue
            try:
                results = await self.fn([item for item, _ in batch])
            except Exception as err:  # noqa: BLE001 - handed to every caller of the batch
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)


class MergingRunner:
    """``runner.run(items)`` -> ``fn(batch)`` results for ``items``, from caller threads.

    For a threaded Ray actor whose batched function runs one call at a time: lists submitted
    while a call runs are merged into the next call (at most ``max_batch_size`` items, a list
    longer than that is split), so concurrent callers share engine batches without waiting for
    a gap (:class:`GapBatcher` is the asyncio counterpart with gap waiting, for single requests).
    Each caller runs queued work itself when it gets the turn, oldest first, and returns as soon
    as its own items are done. An exception raised by ``fn`` goes to every caller of that call.
    """

    class _Piece:
        __slots__ = ("items", "results", "error", "done")

        def __init__(self, items: list[Any]):
            self.items, self.results, self.error, self.done = items, None, None, False

    def __init__(self, fn: Callable[[list[Any]], list[Any]]):
        import threading
        from collections import deque

        self.fn = fn
        self._queue: deque = deque()
        self._queue_lock = threading.Lock()
        self._turn = threading.Lock()  # one fn call at a time

    def run(self, items: list[Any], max_batch_size: int = 64) -> list[Any]:
        """Results of ``fn`` for ``items``, in order.

        Raises:
            ValueError: ``max_batch_size`` < 1.
            whatever ``fn`` raised for a call that held some of ``items``.
        """
        if max_batch_size < 1:
            raise ValueError(f"MergingRunner: max_batch_size must be >= 1, got {max_batch_size}")
        pieces = [self._Piece(items[k:k + max_batch_size]) for k in range(0, len(items), max_batch_size)]
        with self._queue_lock:
            self._queue.extend(pieces)
        while not all(p.done for p in pieces):
            with self._turn:  # a call holding my pieces has finished once I get the turn
                if all(p.done for p in pieces):
                    break  # another caller ran them: return without running later work
                with self._queue_lock:
                    batch, n = [], 0
                    while self._queue and (not batch or n + len(self._queue[0].items) <= max_batch_size):
                        piece = self._queue.popleft()
                        batch.append(piece)
                        n += len(piece.items)
                if not batch:
                    continue
                try:
                    out = list(self.fn([item for p in batch for item in p.items]))
                    k = 0
                    for p in batch:
                        p.results, k = out[k:k + len(p.items)], k + len(p.items)
                except BaseException as err:  # noqa: BLE001 - handed to every caller of the call
                    for p in batch:
                        p.error = err
                finally:
                    for p in batch:
                        p.done = True
        for p in pieces:
            if p.error is not None:
                raise p.error
        return [r for p in pieces for r in p.results]
