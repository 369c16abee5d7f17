"""The training actor group: one Ray actor per data-parallel rank, torch.distributed between them.

Thin Ray shells over :class:`slime_ray.train.backends.torch_backend.TorchTrainer`; all the
training logic lives in that plain class.
"""

from __future__ import annotations

import socket
from argparse import Namespace
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime_ray.placement import Placement


class TrainerActor:
    """Ray actor body: owns one :class:`TorchTrainer` (built lazily in the actor process)."""

    def __init__(self, args: Namespace, rank: int, world_size: int) -> None:
        from slime_ray.train.backends.torch_backend import TorchTrainer

        self.trainer = TorchTrainer(args, rank, world_size)

    def free_port(self) -> tuple[str, int]:
        """An address and a free TCP port on this actor's node (for rank 0's rendezvous)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def init_distributed(self, addr: str, port: int) -> None:
        self.trainer.init_distributed(addr, port)

    def train(self, rollout_id: int, table: Any) -> dict[str, float]:
        return self.trainer.train(rollout_id, table)

    def put_weights(self) -> list[ray.ObjectRef]:
        """Put the weights in the object store; returns ``[ref]`` (wrapped so Ray does not inline it)."""
        return [ray.put(self.trainer.get_weights())]

    def get_weights(self) -> dict:
        return self.trainer.get_weights()

    def save(self, save_dir: str, rollout_id: int, extra: dict | None = None) -> str:
        return self.trainer.save(save_dir, rollout_id, extra)

    def load(self, ckpt_dir: str) -> dict:
        return self.trainer.load(ckpt_dir)


class RayTrainGroup:
    """``world_size`` trainer actors placed on the job's training bundles.

    Args:
        args: flat namespace of :func:`slime_ray.args.parse_args`.
        placement: from :func:`slime_ray.placement.create_placement`.
    """

    def __init__(self, args: Namespace, placement: Placement) -> None:
        self.world_size = placement.num_actor_bundles
        opts: dict[str, Any] = {"num_cpus": 1 if placement.use_gpu else args.num_cpus_per_actor}
        if placement.use_gpu:
            opts["num_gpus"] = 1
        remote_cls = ray.remote(**opts)(TrainerActor)
        self.actors = [
            remote_cls.options(
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement.pg,
                    placement_group_bundle_index=placement.actor_bundle_offset + rank),
            ).remote(args, rank, self.world_size)
            for rank in range(self.world_size)
        ]
        addr, port = ray.get(self.actors[0].free_port.remote())
        ray.get([a.init_distributed.remote(addr, port) for a in self.actors])

    def train(self, rollout_id: int, table_ref: ray.ObjectRef) -> dict[str, float]:
        """Train every rank on the rollout in ``table_ref``; returns rank 0's metrics."""
        return ray.get([a.train.remote(rollout_id, table_ref) for a in self.actors])[0]

    def weights_ref(self) -> ray.ObjectRef:
        """An object-store reference to rank 0's weights (HF names -> CPU tensors)."""
        return ray.get(self.actors[0].put_weights.remote())[0]

    def save(self, save_dir: str, rollout_id: int, extra: dict | None = None) -> str:
        return ray.get([a.save.remote(save_dir, rollout_id, extra) for a in self.actors])[0]

    def load(self, ckpt_dir: str) -> dict:
        return ray.get([a.load.remote(ckpt_dir) for a in self.actors])[0]
