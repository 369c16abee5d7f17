"""An engine hosted in a Ray actor pinned to a placement-group bundle, and its local proxy.

Ray Serve cannot put a replica into the job's placement group (see
:mod:`slime_ray.placement`), so a Serve engine replica that was given a bundle starts the
engine in an :class:`EngineHost` actor scheduled on that bundle and talks to it through
:class:`RemoteEngine`, which implements the same :class:`~slime_ray.engines.base.RolloutEngine`
contract by forwarding each call (blocking ``ray.get``; the deployment already calls the
engine from worker threads).
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime_ray.engines.base import RolloutEngine


class EngineHost:
    """Ray actor body: owns one engine built by ``serve_apps.rollout_app.build_engine``.

    Runs with ``max_concurrency > 1`` so control calls (pause, abort, health) reach the engine
    while a ``generate`` is in flight.
    """

    def __init__(self, engine: str, model_path: str, kwargs: dict[str, Any]):
        from serve_apps.rollout_app import build_engine
        from slime_ray.rollout.batcher import MergingRunner

        self.engine = build_engine(engine, model_path, **kwargs)
        self._runner = MergingRunner(self.engine.generate)

    @ray.method(concurrency_group="generate")
    def generate_at_least(self, requests: list[dict[str, Any]], min_weight_version: int,
                          max_batch_size: int = 64) -> list[dict[str, Any]]:
        """``engine.generate(requests)``, refused unless the engine holds ``min_weight_version``.

        The ingress calls this directly for requests sent together (one hop less than through
        the Serve replica). Lists that arrive while a batch runs are merged into the next
        ``engine.generate`` call (at most ``max_batch_size`` requests each). These calls have
        their own thread pool (concurrency group ``generate``): callers waiting for their turn
        never take the threads of control calls (pause, resume, abort, health, weight loads).

        Raises:
            StaleWeightsError: the engine holds an older version on arrival (checked once, as
                the replica's ``generate_many_at_least`` does).
        """
        from slime_ray.engines.base import StaleWeightsError

        if self.engine.weight_version < min_weight_version:
            raise StaleWeightsError(f"engine holds weight version {self.engine.weight_version} "
                                    f"< current {min_weight_version}")
        return self._runner.run(list(requests), max_batch_size)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.engine, method)(*args)

    def weight_version(self) -> int:
        return int(self.engine.weight_version)

    def update_weights_paused(self, weights: Any, weight_version: int) -> int:
        """The whole sync protocol in one call: pause -> load -> flush caches -> resume.

        ``weights``: the dict, or an ObjectRef to it (passed at top level, Ray resolves it here,
        straight from the object store: the Serve replica in front never deserializes it).
        """
        from slime_ray.sync.transport import as_tensors

        self.engine.pause()
        try:
            self.engine.update_weights(as_tensors(weights), int(weight_version))  # a dict, whatever the engine
            self.engine.flush_cache()
        finally:
            self.engine.resume()
        return int(self.engine.weight_version)

    def weight_sync_call(self, method: str, *args: Any) -> Any:
        """One engine-side step of a GPU weight transport (:func:`slime_ray.sync.receiver.dispatch`)."""
        from slime_ray.sync.receiver import dispatch

        out = dispatch(self.engine, method, *args)
        if method != "init_weights_update_group":
            self.engine.weight_version = int(args[1])
        return out


class RemoteEngine(RolloutEngine):
    """Proxy of an engine living in an :class:`EngineHost` actor.

    Args:
        engine, model_path, kwargs: as for ``build_engine``.
        placement: ``{"pg_name", "bundle_index", "options": {"num_cpus", "num_gpus"}}`` from
            :meth:`slime_ray.placement.Placement.engine_placement`.

    Raises:
        ValueError: no placement group of that name exists.
    """

    def __init__(self, engine: str, model_path: str, kwargs: dict[str, Any], placement: dict[str, Any]):
        pg = placement.get("pg") or ray.util.get_placement_group(placement["pg_name"])
        if pg is None:
            raise ValueError(f"RemoteEngine: no placement group named {placement['pg_name']!r}")
        opts = dict(placement.get("options") or {})
        threads = os.environ.get("SLIME_RAY_TORCH_THREADS")  # the replica's, handed down
        env = {"env_vars": {"SLIME_RAY_TORCH_THREADS": threads}} if threads else None
        # control calls (default group) keep their threads however many generate calls wait
        cls = ray.remote(max_concurrency=16, concurrency_groups={"generate": 64}, **opts)(EngineHost)
        self.actor = cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=int(placement["bundle_index"])),
            **({"runtime_env": env} if env else {}),
        ).remote(engine, model_path, kwargs)
        self.weight_version = ray.get(self.actor.weight_version.remote())

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(self.actor.call.remote(method, *args))

    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._call("generate", requests)

    def update_weights(self, named_tensors: dict[str, torch.Tensor], weight_version: int) -> None:
        self._call("update_weights", named_tensors, int(weight_version))
        self.weight_version = int(weight_version)

    async def update_weights_paused_async(self, weights: Any, weight_version: int) -> int:
        """:meth:`EngineHost.update_weights_paused` in one actor call (``weights``: a dict or
        an ObjectRef to one, resolved by the host)."""
        version = await self.actor.update_weights_paused.remote(weights, int(weight_version))
        self.weight_version = int(version)
        return self.weight_version

    async def refresh_weight_version_async(self) -> int:
        """Read the actor's version again (it may have been synced directly, not through this proxy)."""
        self.weight_version = int(await self.actor.weight_version.remote())
        return self.weight_version

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self._call("get_weights")

    def pause(self) -> None:
        self._call("pause")

    def resume(self) -> None:
        self._call("resume")

    def flush_cache(self) -> None:
        self._call("flush_cache")

    def abort(self, abort_all: bool = True) -> None:
        self._call("abort", abort_all)

    def release_memory(self) -> None:
        self._call("release_memory")

    def resume_memory(self) -> None:
        self._call("resume_memory")

    def health(self) -> dict[str, Any]:
        return self._call("health")
