"""One placement group per job: bundles for the training ranks (and, later, engines).

On a machine without GPUs the bundles are CPU bundles (``--num-cpus-per-actor`` logical CPUs
each); with GPUs each bundle is ``{"GPU": 1, "CPU": 1}`` as in slime. Engine replicas are
Ray Serve deployments; Serve places them itself.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested bundles; the message says what is missing."""


@dataclass
class Placement:
    """The job's placement group and where each role's bundles start."""

    pg: PlacementGroup
    actor_bundle_offset: int
    num_actor_bundles: int
    use_gpu: bool


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster reports any GPU."""
    return ray.cluster_resources().get("GPU", 0) > 0


def create_placement(args: Namespace, timeout_s: float = 120.0) -> Placement:
    """Reserve bundles for the trainer ranks (PACK strategy) and wait until they are placed.

    Raises:
        PlacementError: if the bundles cannot be placed within ``timeout_s`` seconds; the
            message names the resources asked for and what the cluster has.
    """
    world = args.actor_num_nodes * args.actor_num_gpus_per_node
    use_gpu = cluster_has_gpus()
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": args.num_cpus_per_actor}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise PlacementError(
            f"could not place {world} training bundles of {bundle} within {timeout_s:.0f}s; the "
            f"cluster has {ray.cluster_resources()}. Lower --actor-num-gpus-per-node / "
            f"--num-cpus-per-actor or start Ray with more resources (ray start --head --num-cpus N)")
    return Placement(pg=pg, actor_bundle_offset=0, num_actor_bundles=world, use_gpu=use_gpu)
