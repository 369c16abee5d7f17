"""What the overlapped (async) training loop needs: a background rollout producer, staleness
control by weight version, and the overlap / wait / sync metrics.

Versions: the trainer's version is the number of rollout steps it has trained on (the loop's
``rollout_id``); a sync after step ``s`` gives the engines version ``s + 1``. A sample's
staleness is ``trainer_version - v`` where ``v`` is the oldest version among its engine tokens
(``Sample.token_weight_versions``; ``weight_versions`` as fallback).

Staleness control, two layers:

1. at the source, :class:`RolloutProducer` starts rollout ``r`` only once the engines hold a
   version ``>= r - max_staleness`` (it waits for weights; the wait is reported), so it does not
   generate samples that would be dropped;
2. before training, :func:`filter_stale` drops every group holding a sample older than
   ``--max-staleness`` versions (partial rollouts resumed from a buffer, custom rollout
   functions), counted in ``rollout/stale_dropped_*``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from argparse import Namespace
from typing import Any

from slime_ray.args import ConfigError
from slime_ray.types import Sample


def check_async_args(args: Namespace) -> None:
    """Flags the async loop cannot honour.

    Raises:
        ConfigError: ``--colocate`` (trainer and engines take turns on the same devices, so
            nothing can overlap: use jobs/grpo.py, as slime's train_async.py refuses it too);
            ``--advantage-estimator ppo`` (no critic in this loop); ``--async-buffer-size < 1``; ``--max-staleness`` smaller than
            ``--update-weights-interval - 1`` (every rollout between two syncs would be dropped).
    """
    if args.colocate:
        raise ConfigError("jobs/grpo_async.py overlaps generation with training, which --colocate rules out "
                          "(trainer and engines take turns on the same bundles); drop --colocate or run "
                          "jobs/grpo.py (slime's train_async.py refuses colocation as well)")
    if args.advantage_estimator == "ppo":
        raise ConfigError("jobs/grpo_async.py trains the policy only (no critic yet); use jobs/grpo.py for "
                          "--advantage-estimator ppo")
    if args.async_buffer_size < 1:
        raise ConfigError(f"--async-buffer-size must be >= 1, got {args.async_buffer_size}")
    k, interval = args.max_staleness, args.update_weights_interval
    if k is not None and k < interval - 1:
        raise ConfigError(f"--max-staleness {k} is below --update-weights-interval {interval} - 1: rollouts "
                          f"between two syncs are up to {interval - 1} versions old and would all be "
                          f"dropped; raise --max-staleness to >= {interval - 1} or lower the interval")


def sample_version(sample: Sample) -> int | None:
    """Oldest weight version among the sample's engine tokens (None if it has none)."""
    tv = [v for v in (sample.token_weight_versions or []) if v >= 0]
    if tv:
        return min(tv)
    return min(sample.weight_versions) if sample.weight_versions else None


def filter_stale(groups: list[list[Sample]], trainer_version: int,
                 max_staleness: int | None) -> tuple[list[list[Sample]], dict[str, float]]:
    """Drop groups holding a sample more than ``max_staleness`` versions behind the trainer.

    A whole group goes, since its advantages are normalised within the group.

    Returns:
        (kept groups, metrics): ``rollout/staleness_{k}`` (samples k versions old, before
        dropping), ``rollout/staleness_mean`` / ``_max`` (of the kept samples),
        ``rollout/stale_dropped_samples`` / ``_groups``, ``rollout/weight_version_min`` / ``_max``
        (over all samples, -1 when none).
    """
    hist: dict[int, int] = {}
    kept: list[list[Sample]] = []
    dropped_samples = dropped_groups = 0
    for g in groups:
        ages = [trainer_version - v for v in (sample_version(s) for s in g) if v is not None]
        for a in ages:
            hist[a] = hist.get(a, 0) + 1
        if max_staleness is not None and ages and max(ages) > max_staleness:
            dropped_groups += 1
            dropped_samples += len(g)
        else:
            kept.append(g)
    kept_ages = [trainer_version - v for g in kept for v in (sample_version(s) for s in g) if v is not None]
    versions = [v for g in groups for s in g for v in s.weight_versions]
    metrics = {f"rollout/staleness_{k}": float(n) for k, n in sorted(hist.items())}
    metrics.update({
        "rollout/staleness_mean": sum(kept_ages) / max(len(kept_ages), 1),
        "rollout/staleness_max": float(max(kept_ages, default=0)),
        "rollout/stale_dropped_samples": float(dropped_samples),
        "rollout/stale_dropped_groups": float(dropped_groups),
        "rollout/weight_version_min": float(min(versions, default=-1)),
        "rollout/weight_version_max": float(max(versions, default=-1)),
    })
    return kept, metrics


class BusyLog:
    """Thread-safe record of the intervals (``time.perf_counter`` seconds) a worker was busy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[tuple[float, float]] = []
        self._open: float | None = None

    def start(self) -> None:
        with self._lock:
            self._open = time.perf_counter()

    def stop(self) -> None:
        with self._lock:
            if self._open is not None:
                self._spans.append((self._open, time.perf_counter()))
                self._open = None

    def overlap(self, t0: float, t1: float) -> float:
        """Seconds of ``[t0, t1]`` during which the worker was busy."""
        with self._lock:
            spans = self._spans + ([(self._open, t1)] if self._open is not None else [])
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)


class RolloutProducer:
    """Generates rollouts ``start .. num_rollout-1`` in a background thread, ahead of training.

    At most ``--async-buffer-size`` finished rollouts wait in the queue (one more may be in
    generation). Runs the manager's coroutine on the thread's own event loop.

    Args:
        manager: a :class:`~slime_ray.rollout.manager.RolloutManager`.
        args: flags (``async_buffer_size``, ``max_staleness``).
        num_rollout: rollouts to produce; ``start``: first rollout id.
        engine_version: the version the engines hold at start.
    """

    def __init__(self, manager: Any, args: Namespace, num_rollout: int, start: int = 0, engine_version: int = 0):
        self.manager, self.args = manager, args
        self.num_rollout, self.start_id = num_rollout, start
        self.queue: queue.Queue = queue.Queue(maxsize=args.async_buffer_size)
        self.busy = BusyLog()
        self._version = engine_version
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutProducer":
        self._thread.start()
        return self

    @property
    def engine_version(self) -> int:
        """The version the engines hold (as last told by :meth:`set_engine_version`)."""
        return self._version

    def set_engine_version(self, version: int) -> None:
        """Called by the trainer thread after each sync; wakes a producer waiting for weights."""
        with self._cond:
            self._version = int(version)
            self._cond.notify_all()

    def _wait_for_weights(self, rollout_id: int) -> float:
        """Block until the engines hold version >= rollout_id - max_staleness; returns seconds waited."""
        k = self.args.max_staleness
        t0 = time.perf_counter()
        with self._cond:
            while k is not None and self._version < rollout_id - k and not self._stop.is_set():
                self._cond.wait(timeout=0.5)
        return time.perf_counter() - t0

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            for rid in range(self.start_id, self.num_rollout):
                wait_weights = self._wait_for_weights(rid)
                if self._stop.is_set():
                    return
                self.busy.start()
                try:
                    groups, metrics = loop.run_until_complete(self.manager.generate_rollout(rid))
                finally:
                    self.busy.stop()
                metrics = {**metrics, "perf/rollout_wait_weights_time": wait_weights}
                t0 = time.perf_counter()
                while not self._stop.is_set():
                    try:
                        self.queue.put((rid, groups, metrics, t0), timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # noqa: BLE001 - handed to the trainer thread, raised there
            self.queue.put((None, err, None, None))
        finally:
            loop.close()

    def get(self) -> tuple[int, list[list[Sample]], dict[str, float]]:
        """The next rollout ``(rollout_id, groups, metrics)``; waits for it.

        ``metrics`` gains ``perf/rollout_wait_buffer_time``: seconds the finished rollout sat
        in the queue waiting for the trainer.

        Raises:
            whatever the producer thread raised.
        """
        rid, groups, metrics, t_put = self.queue.get()
        if rid is None:
            raise groups
        return rid, groups, {**metrics, "perf/rollout_wait_buffer_time": time.perf_counter() - t_put}

    def stop(self) -> None:
        """Stop producing (a rollout in generation finishes first) and drop what is queued."""
        self._stop.set()
        self.set_engine_version(self._version)
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)


class WeightSyncer:
    """Trainer -> engines weight sync with version bookkeeping, time and bytes.

    Args:
        actor: the :class:`~slime_ray.train.actor_group.RayTrainGroup`.
        client: the :class:`~slime_ray.rollout.engine_client.EngineClient`.
        producer: told the new version after each sync (may be None).
    """

    def __init__(self, actor: Any, client: Any, producer: RolloutProducer | None = None):
        self.actor, self.client, self.producer = actor, client, producer

    def __call__(self, weight_version: int) -> dict[str, float]:
        """Push the trainer's weights as ``weight_version`` with ``--update-weight-transport``
        (the sync loop's :meth:`~slime_ray.train.actor_group.RayTrainGroup.sync_weights`: object
        store on CPU, CUDA IPC colocated, NCCL across GPUs); returns ``perf/sync_time`` (s),
        ``sync/bytes`` (bytes sent to the engines) and ``sync/weight_version``."""
        t0 = time.perf_counter()
        out = self.actor.sync_weights(self.client, weight_version)
        elapsed = time.perf_counter() - t0
        if self.producer is not None:
            self.producer.set_engine_version(weight_version)
        return {"perf/sync_time": elapsed, "sync/bytes": float(out.get("sync/bytes", 0.0)),
                "sync/weight_version": float(weight_version)}
