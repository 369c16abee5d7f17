"""One placement group per job: bundles for the training ranks and the engine replicas.

Layout (slime's ``slime/ray/placement_group.py``):

- disaggregated: ``world + num_engines`` bundles; trainer ranks on bundles ``0..world-1``,
  engine ``i`` on bundle ``world + i``. Each role owns its bundles.
- ``--colocate``: ``max(world, num_engines)`` bundles shared by both roles; trainer rank ``r``
  on bundle ``r``, engine ``i`` on bundle ``i``. They take turns: with ``--offload-rollout`` the
  engines release weights/KV while the trainer runs and take them back before the sync.

Bundles are ``{"GPU": 1, "CPU": 1}`` when the cluster has GPUs, else
``{"CPU": --num-cpus-per-actor}`` (disaggregated engines: ``--num-cpus-per-engine``). Inside a
shared bundle each role asks for a fraction (GPU: trainer 0.5, engine 0.4; CPU: half the bundle
each), so both fit, as slime's ``num_gpus=0.4 / 0.2`` split.

How engines get into the bundles: Ray Serve 2.60 cannot schedule a replica into an existing
placement group (``placement_group_bundles`` on a deployment creates a *new* group per replica,
the replica in its bundle 0; ``ray_actor_options`` takes no scheduling strategy). So when a
:class:`Placement` is given, each engine deployment's replica is a thin router shell (no
accelerator) and the engine itself runs in an :class:`~slime_ray.engines.remote.EngineHost`
actor pinned to its bundle with ``PlacementGroupSchedulingStrategy`` (the pattern the Serve docs
recommend for replicas that drive worker actors). The placement group is named, so the replica
finds it with ``ray.util.get_placement_group(name)``.
"""

from __future__ import annotations

import logging
import uuid
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group


logger = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested bundles; the message says what is missing."""


@dataclass
class Placement:
    """The job's placement group and where each role's bundles start.

    Attributes:
        pg: the placement group (named ``pg_name``).
        actor_bundle_offset / num_actor_bundles: trainer rank ``r`` uses bundle ``offset + r``.
        rollout_bundle_offset / num_rollout_bundles: engine ``i`` uses bundle ``offset + i``.
        use_gpu: bundles hold one GPU each.
        colocate: trainer and engines share bundles.
        actor_options / engine_options: Ray resource requests (``num_cpus``, ``num_gpus``) of one
            trainer rank / one engine inside its bundle.
    """

    pg: PlacementGroup
    actor_bundle_offset: int
    num_actor_bundles: int
    use_gpu: bool
    colocate: bool = False
    rollout_bundle_offset: int = 0
    num_rollout_bundles: int = 0
    pg_name: str = ""
    actor_options: dict[str, float] = field(default_factory=dict)
    engine_options: dict[str, float] = field(default_factory=dict)

    def engine_placement(self, engine_index: int) -> dict[str, Any]:
        """What an engine deployment needs to start its engine in its bundle (picklable)."""
        # the group object itself travels (a name lookup from a Serve replica depends on the
        # driver's namespace, and fails for a second driver of the same cluster)
        return {"pg": self.pg, "pg_name": self.pg_name, "bundle_index": self.rollout_bundle_offset + engine_index,
                "options": dict(self.engine_options)}


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster reports any GPU."""
    return ray.cluster_resources().get("GPU", 0) > 0


def plan_bundles(world: int, num_engines: int, *, colocate: bool, use_gpu: bool, cpus_per_actor: float,
                 cpus_per_engine: float) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Bundles and per-role offsets/resources (pure function, no Ray).

    Returns:
        (bundles, layout) where layout has ``rollout_bundle_offset``, ``actor_options``,
        ``engine_options``.
    """
    if colocate:
        n = max(world, num_engines)
        bundle = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": float(cpus_per_actor)}
        if use_gpu:
            actor, engine = {"num_cpus": 0.5, "num_gpus": 0.5}, {"num_cpus": 0.25, "num_gpus": 0.4}
        else:
            actor, engine = {"num_cpus": cpus_per_actor / 2}, {"num_cpus": cpus_per_actor / 2}
        return [dict(bundle) for _ in range(n)], {"rollout_bundle_offset": 0, "actor_options": actor,
                                                 "engine_options": engine}
    if use_gpu:
        bundles = [{"GPU": 1.0, "CPU": 1.0} for _ in range(world + num_engines)]
        actor, engine = {"num_cpus": 1.0, "num_gpus": 1.0}, {"num_cpus": 1.0, "num_gpus": 1.0}
    else:
        bundles = ([{"CPU": float(cpus_per_actor)} for _ in range(world)]
                   + [{"CPU": float(cpus_per_engine)} for _ in range(num_engines)])
        actor, engine = {"num_cpus": cpus_per_actor}, {"num_cpus": cpus_per_engine}
    return bundles, {"rollout_bundle_offset": world, "actor_options": actor, "engine_options": engine}


def create_placement(args: Namespace, timeout_s: float = 120.0, num_engines: int | None = None) -> Placement:
    """Reserve the job's bundles (PACK strategy) and wait until they are placed.

    Args:
        args: flags (``actor_num_nodes``, ``actor_num_gpus_per_node``, ``colocate``,
            ``rollout_num_engines`` / ``rollout_num_gpus``, ``num_cpus_per_actor/engine``).
        num_engines: engine replicas (default: ``--rollout-num-engines``, or on GPUs
            ``--rollout-num-gpus // --rollout-num-gpus-per-engine``, else 1).

    Raises:
        PlacementError: if the bundles cannot be placed within ``timeout_s`` seconds; the
            message names the resources asked for and what the cluster has.
    """
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    use_gpu = cluster_has_gpus()
    if num_engines is None:
        num_engines = engines_for(args, use_gpu)
    colocate = bool(getattr(args, "colocate", False))
    bundles, layout = plan_bundles(world, num_engines, colocate=colocate, use_gpu=use_gpu,
                                   cpus_per_actor=args.num_cpus_per_actor,
                                   cpus_per_engine=getattr(args, "num_cpus_per_engine", 1.0))
    total = ray.cluster_resources()
    for res in ("CPU", "GPU"):
        need = sum(b.get(res, 0) for b in bundles)
        if need > total.get(res, 0) + 1e-9 and not _autoscaling():
            raise PlacementError(
                f"{len(bundles)} bundles ({world} training ranks, {num_engines} engines, colocate={colocate}) "
                f"need {need:g} {res} but the cluster has {total.get(res, 0):g}. Lower --actor-num-gpus-per-node "
                f"/ --rollout-num-gpus / --rollout-num-engines / --num-cpus-per-actor, use --colocate, or start "
                f"Ray with more resources (ray start --head --num-cpus N)")
    name = f"slime_ray_pg_{uuid.uuid4().hex[:8]}"
    pg = placement_group(bundles, strategy="PACK", name=name)
    logger.info("waiting for %d bundles (%s) to be placed", len(bundles), bundles[0])
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise PlacementError(
            f"could not place {len(bundles)} bundles ({world} training ranks, {num_engines} engines, "
            f"colocate={colocate}) of {bundles[0]} within {timeout_s:.0f}s; the cluster has "
            f"{ray.cluster_resources()}. Lower --actor-num-gpus-per-node / --rollout-num-engines / "
            f"--num-cpus-per-actor, use --colocate, or start Ray with more resources")
    return Placement(pg=pg, actor_bundle_offset=0, num_actor_bundles=world, use_gpu=use_gpu, colocate=colocate,
                     rollout_bundle_offset=layout["rollout_bundle_offset"], num_rollout_bundles=num_engines,
                     pg_name=name, actor_options=layout["actor_options"], engine_options=layout["engine_options"])


def _autoscaling() -> bool:
    """Whether the cluster may grow (then a shortfall now is not an error yet)."""
    import os

    return bool(os.environ.get("SLIME_RAY_ALLOW_AUTOSCALE"))


def engines_for(args: Namespace, use_gpu: bool) -> int:
    """Number of engine replicas the flags ask for (see :func:`create_placement`)."""
    if getattr(args, "rollout_num_engines", None):
        return int(args.rollout_num_engines)
    if use_gpu:
        gpus = args.rollout_num_gpus
        if gpus is None:
            gpus = args.actor_num_nodes * args.actor_num_gpus_per_node if args.colocate else 1
        return max(1, gpus // max(1, args.rollout_num_gpus_per_engine))
    return 1


def remove_placement(placement: Placement | None) -> None:
    """Release the job's bundles (after its actors are gone)."""
    if placement is not None:
        ray.util.remove_placement_group(placement.pg)
