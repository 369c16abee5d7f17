"""Weight sync trainer -> engines, one call per version, whatever the transport.

``sync_weights(actor_group, client, weight_version, state)`` runs slime's protocol: engines
pause (in-flight batches finish) -> the transport moves every bucket -> caches flushed ->
engines resume -> the ingress' current weight version is set (stale replicas get no traffic).

The trainer actors expose ``weight_sync(method, *args)`` (-> :class:`~slime_ray.sync.sender.WeightSender`),
the engine deployments ``weight_sync_call(method, *args)`` (-> the engine's
``update_weights_from_tensor`` / ``init_weights_update_group`` / ``update_weights_from_distributed``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray


@dataclass
class SyncState:
    """Per-job transport state: the transport name and, for nccl, the group once built."""

    transport: str
    group_name: str | None = None
    metas: list = field(default_factory=list)
    nbytes: int | None = None  # object store: bytes of one copy of the weights (shapes never change)


@ray.remote(num_cpus=0)
def _nbytes(weights: Any) -> int:
    from slime_ray.sync.transport import as_tensors

    return int(sum(t.numel() * t.element_size() for t in as_tensors(weights).values()))


def sync_weights(actor_group: Any, client: Any, weight_version: int, state: SyncState) -> dict[str, float]:
    """Move the policy to every engine with ``state.transport``; returns ``{"sync/bytes", "sync/seconds"}``.

    Raises:
        whatever an engine or trainer raises (unknown name, shape mismatch), wrapped by Ray.
    """
    t0 = time.perf_counter()
    if state.transport == "object_store":
        ref = actor_group.weights_ref()
        client.update_weights(ref, weight_version)
        elapsed = time.perf_counter() - t0
        if state.nbytes is None:  # measured once, off the timed path
            state.nbytes = ray.get(_nbytes.remote(ref)) * client.num_engines
        return {"sync/seconds": elapsed, "sync/bytes": float(state.nbytes)}
    actors, engines = actor_group.actors, client.engines
    if getattr(client, "weight_store", None) is not None:  # fault tolerance: restarted replicas pull these
        client.publish_weights(actor_group.weights_ref(), weight_version)
    if not state.metas:
        state.metas = ray.get(actors[0].weight_sync.remote("plan"))
    client.pause()
    try:
        if state.transport == "cuda_ipc":
            nbytes = _ipc(actors, engines, state.metas, weight_version)
        else:
            nbytes = _broadcast(actors, engines, state, weight_version)
        client.flush_cache()
    finally:
        client.resume()
    client.ingress.set_weight_version.remote(int(weight_version)).result()
    return {"sync/seconds": time.perf_counter() - t0, "sync/bytes": float(nbytes)}


def _ipc(actors: list, engines: list, metas: list, version: int) -> int:
    """Engine i loads from trainer rank i (same GPU), one bucket at a time."""
    sent = 0
    try:
        for meta in metas:
            payloads = ray.get([a.weight_sync.remote("ipc_bucket", meta) for a in actors])
            [r.result() for r in [e.weight_sync_call.remote("update_weights_from_tensor", payloads[i], version)
                                  for i, e in enumerate(engines)]]
            ray.get([a.weight_sync.remote("release") for a in actors])
            sent += meta.nbytes * len(engines)
    finally:
        ray.get([a.weight_sync.remote("release") for a in actors])
    return sent


def _broadcast(actors: list, engines: list, state: SyncState, version: int) -> int:
    """Trainer rank 0 broadcasts every bucket to the group {trainer rank 0, engines}."""
    if state.group_name is None:
        addr, port = ray.get(actors[0].free_port.remote())
        name = f"slime_ray_weights_{uuid.uuid4().hex[:8]}"
        world = 1 + len(engines)
        t = actors[0].weight_sync.remote("init_group", addr, port, world, name)
        es = [e.weight_sync_call.remote("init_weights_update_group", addr, port, 1 + i, world, name)
              for i, e in enumerate(engines)]
        ray.get(t)
        [r.result() for r in es]
        state.group_name = name
    trainer = [a.weight_sync.remote("broadcast_all", state.metas) for a in actors]
    recv = [e.weight_sync_call.remote("update_weights_from_distributed", state.metas, version, state.group_name)
            for e in engines]
    [r.result() for r in recv]
    return int(ray.get(trainer)[0]) * len(engines)  # bytes received by the engines, as for the other transports
