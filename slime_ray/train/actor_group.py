"""The training actor group: one Ray actor per data-parallel rank, torch.distributed between them.

Thin Ray shells over :class:`slime_ray.train.backends.torch_backend.TorchTrainer` (role
``"actor"``) and :class:`slime_ray.train.backends.torch_critic.TorchCritic` (role ``"critic"``,
PPO); all the training logic lives in those plain classes.
"""

from __future__ import annotations

import socket
from argparse import Namespace
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime_ray.placement import Placement


class TrainerActor:
    """Ray actor body: owns one :class:`TorchTrainer` or, for ``role="critic"``, one
    :class:`TorchCritic` (built lazily in the actor process)."""

    def __init__(self, args: Namespace, rank: int, world_size: int, role: str = "actor") -> None:
        if role == "critic":
            from slime_ray.train.backends.torch_critic import TorchCritic

            self.trainer = TorchCritic(args, rank, world_size)
        elif args.train_backend == "megatron":
            from slime_ray.train.backends.megatron import MegatronTrainer

            self.trainer = MegatronTrainer(args, rank, world_size)
        else:
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

    def train(self, rollout_id: int, table: Any, *tensors: Any) -> dict[str, float]:
        """Actor: ``train(rollout_id, table[, values])``; critic: ``train(rollout_id, table, old_values, returns)``."""
        return self.trainer.train(rollout_id, table, *tensors)

    def compute_values(self, table: Any) -> Any:
        """Critic only: [B, L] values of every response token."""
        return self.trainer.compute_values(table)

    def compute_advantages(self, rollout_id: int, table: Any, values: Any = None) -> Any:
        """Actor only: advantages for the next ``train``; returns the [B, L] returns (or None)."""
        return self.trainer.compute_advantages(rollout_id, table, values)["returns"]

    def train_and_put_weights(self, rollout_id: int, table: Any, *tensors: Any) -> tuple[dict[str, float], list]:
        """:meth:`train`, then :meth:`put_weights`: one call when a sync follows (saves a round trip)."""
        return self.train(rollout_id, table, *tensors), self.put_weights()

    def put_weights(self) -> list[ray.ObjectRef]:
        """Put the weights in the object store; returns ``[ref]`` (wrapped so Ray does not inline it).
        Under FSDP every rank takes part in the gather; only rank 0 puts."""
        from slime_ray.sync.transport import PackedStateDict

        sync_view = getattr(self.trainer, "weights_for_sync", None)  # torch backend: no copy on CPU
        weights = sync_view() if sync_view is not None else self.trainer.get_weights()
        if getattr(self.trainer, "global_rank", self.trainer.rank) != 0:
            return []
        return [ray.put(PackedStateDict(weights))]  # numpy arrays: one memcpy in, zero-copy out

    def get_weights(self) -> dict:
        return self.trainer.get_weights()

    def weight_sync(self, method: str, *args: Any) -> Any:
        """One trainer-side step of a GPU weight transport (:class:`slime_ray.sync.sender.WeightSender`)."""
        if not hasattr(self, "_sender"):
            from slime_ray.sync.sender import sender_for

            self._sender = sender_for(self.trainer)
        return getattr(self._sender, method)(*args)

    def save(self, save_dir: str, rollout_id: int, extra: dict | None = None) -> str:
        return self.trainer.save(save_dir, rollout_id, extra)

    def load(self, ckpt_dir: str) -> dict:
        return self.trainer.load(ckpt_dir)


class RayTrainGroup:
    """``world_size`` trainer actors placed on the job's training bundles.

    Args:
        args: flat namespace of :func:`slime_ray.args.parse_args`.
        placement: from :func:`slime_ray.placement.create_placement`.
        role: "actor" (policy) or "critic" (PPO value model).
        resource_fraction: share of each bundle one rank takes (in (0, 1]); the actor and the
            critic groups share the same bundles with 0.5 each (slime: both on the actor GPUs).
    """

    def __init__(self, args: Namespace, placement: Placement, role: str = "actor",
                 resource_fraction: float = 1.0) -> None:
        self.world_size = placement.num_actor_bundles
        self.args, self.placement, self._sync_state, self.role = args, placement, None, role
        self._trained_weights: ray.ObjectRef | None = None  # rank 0's weights put by the last train
        base = getattr(placement, "actor_options", None) or (
            {"num_cpus": 1, "num_gpus": 1} if placement.use_gpu else {"num_cpus": args.num_cpus_per_actor})
        opts: dict[str, Any] = {k: v * resource_fraction for k, v in base.items()}
        remote_cls = ray.remote(**opts)(TrainerActor)
        self.actors = [
            remote_cls.options(
                name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement.pg,
                    placement_group_bundle_index=placement.actor_bundle_offset + rank),
            ).remote(args, rank, self.world_size, role)
            for rank in range(self.world_size)
        ]
        addr, port = ray.get(self.actors[0].free_port.remote())
        ray.get([a.init_distributed.remote(addr, port) for a in self.actors])

    def train(self, rollout_id: int, table_ref: ray.ObjectRef, *tensor_refs: ray.ObjectRef) -> dict[str, float]:
        """Train every rank on the rollout in ``table_ref``; returns rank 0's metrics.

        ``tensor_refs``: actor: ``[values]`` (optional); critic: ``old_values, returns``.
        """
        self._trained_weights = None
        if self._put_weights_with_train(rollout_id):
            first = self.actors[0].train_and_put_weights.remote(rollout_id, table_ref, *tensor_refs)
            rest = [a.train.remote(rollout_id, table_ref, *tensor_refs) for a in self.actors[1:]]
            (metrics, refs), *_ = ray.get([first, *rest])
            self._trained_weights = refs[0]
            return metrics
        return ray.get(self.async_train(rollout_id, table_ref, *tensor_refs))[0]

    def _put_weights_with_train(self, rollout_id: int) -> bool:
        """Whether rank 0 puts its weights in the object store in the same call as ``train``: the
        policy on CPU, synced through the object store after this step (the sync then takes the
        ref without another trainer call). GPU transports and gathering backends sync otherwise."""
        a = self.args
        return (self.role == "actor" and not self.placement.use_gpu and a.train_backend != "megatron"
                and getattr(a, "update_weight_transport", "auto") in ("auto", "object_store")
                and (rollout_id + 1) % max(1, int(getattr(a, "update_weights_interval", 1) or 1)) == 0)

    def async_train(self, rollout_id: int, table_ref: ray.ObjectRef, *tensor_refs: ray.ObjectRef) -> list[ray.ObjectRef]:
        """Start :meth:`train` on every rank; returns one metrics ref per rank."""
        return [a.train.remote(rollout_id, table_ref, *tensor_refs) for a in self.actors]

    def compute_values(self, table_ref: ray.ObjectRef) -> ray.ObjectRef:
        """Critic: a ref to the [B, L] values of the rollout (rank 0's; all ranks agree)."""
        return self._rank0_ref([a.compute_values.remote(table_ref) for a in self.actors])

    def compute_advantages(self, rollout_id: int, table_ref: ray.ObjectRef,
                           values_ref: ray.ObjectRef | None = None) -> ray.ObjectRef:
        """Actor: advantages for the next :meth:`train`; a ref to the [B, L] returns (or None)."""
        return self._rank0_ref([a.compute_advantages.remote(rollout_id, table_ref, values_ref)
                                for a in self.actors])

    @staticmethod
    def _rank0_ref(refs: list[ray.ObjectRef]) -> ray.ObjectRef:
        ray.get(refs[1:])  # surface errors of every rank (their collectives pair with rank 0's)
        ray.wait(refs[:1])
        return refs[0]

    def weights_ref(self) -> ray.ObjectRef:
        """An object-store reference to rank 0's weights (HF names -> CPU tensors).

        The ref put by the last :meth:`train` when there is one (taken once: the weights have
        not changed since), else the trainer puts them now."""
        if self._trained_weights is not None:
            ref, self._trained_weights = self._trained_weights, None
            return ref
        gathers = self.args.train_backend == "megatron" or self.placement.use_gpu
        if gathers and self.world_size > 1:  # FSDP / tensor parallel: every rank gathers
            return ray.get([a.put_weights.remote() for a in self.actors])[0][0]
        return ray.get(self.actors[0].put_weights.remote())[0]

    def sync_weights(self, client: Any, weight_version: int) -> dict[str, float]:
        """Send the policy to every engine of ``client`` with ``--update-weight-transport``
        (auto: object store on CPU, CUDA IPC colocated, NCCL disaggregated); see
        :func:`slime_ray.sync.weight_sync.sync_weights`."""
        from slime_ray.sync import choose_transport
        from slime_ray.sync.weight_sync import SyncState, sync_weights

        if self._sync_state is None:
            self._sync_state = SyncState(choose_transport(
                getattr(self.args, "update_weight_transport", "auto"), use_gpu=self.placement.use_gpu,
                colocate=self.placement.colocate, num_engines=client.num_engines, world_size=self.world_size))
        return sync_weights(self, client, weight_version, self._sync_state)

    def save(self, save_dir: str, rollout_id: int, extra: dict | None = None) -> str:
        return ray.get([a.save.remote(save_dir, rollout_id, extra) for a in self.actors])[0]

    def load(self, ckpt_dir: str) -> dict:
        self._trained_weights = None  # the loaded weights replace the trained ones
        return ray.get([a.load.remote(ckpt_dir) for a in self.actors])[0]
