"""Trainer side of the weight transports: bucket the policy and send it (all ranks call).

Under FSDP every rank gathers each parameter (``full_tensor``, a collective) in the same
order; for ``cuda_ipc`` every rank then hands its colocated engine an IPC handle, for ``nccl``
rank 0 broadcasts. Tied parameters (one tensor under two names) travel once.
"""

from __future__ import annotations

from typing import Any

import torch

from slime_ray.sync import transport
from slime_ray.sync.buckets import BucketMeta, flatten, plan_buckets


def _named_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State-dict entries with tied duplicates removed (first name kept), in state-dict order."""
    seen, out = set(), []
    for name, t in model.state_dict().items():
        key = id(t) if hasattr(t, "full_tensor") else t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class WeightSender:
    """Buckets of one model, sent by IPC handle or broadcast.

    Args:
        model: the policy (plain or FSDP2-sharded).
        dtype: dtype on the wire (the trainer's compute dtype: bf16 on GPU, fp32 on CPU).
        buffer_size_bytes: ``--update-weight-buffer-size``.
        device: where buckets are built (the rank's GPU, or CPU).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, buffer_size_bytes: int,
                 device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.buffer_size = int(buffer_size_bytes)
        self._held: list[torch.Tensor] = []  # IPC buckets alive until the engine has copied them
        self.group: Any = None
        self.group_rank = -1

    def plan(self) -> list[BucketMeta]:
        """The bucket layout (same on every rank; no communication)."""
        return plan_buckets([(n, tuple(t.shape)) for n, t in _named_params(self.model)], self.dtype,
                            self.buffer_size)

    def bucket(self, meta: BucketMeta) -> torch.Tensor:
        """The flat buffer of ``meta`` (FSDP: every rank must call, same order)."""
        params = dict(_named_params(self.model))
        ts = [params[n] for n in meta.names]
        ts = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in ts]
        with torch.no_grad():
            return flatten([t.detach() for t in ts], meta, self.device)

    # ------------------------------------------------------------------ cuda_ipc
    def ipc_bucket(self, meta: BucketMeta) -> dict[str, Any]:
        """Flatten ``meta`` on this GPU and return ``{"meta", "handle", "uuid"}`` for the engine on
        the same GPU; the buffer stays alive until :meth:`release`."""
        from torch.multiprocessing.reductions import reduce_tensor

        flat = self.bucket(meta)
        torch.cuda.current_stream(self.device).synchronize()
        self._held.append(flat)
        return {"meta": meta, "handle": reduce_tensor(flat), "uuid": gpu_uuid(self.device)}

    def release(self) -> None:
        """Drop the IPC buckets (after the engines copied them) and collect their handles."""
        self._held.clear()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()

    # ------------------------------------------------------------------ nccl / gloo broadcast
    def init_group(self, master_address: str, master_port: int, world_size: int, group_name: str) -> None:
        """Rank 0 of the broadcast group (trainer rank 0 only)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.group = transport.new_broadcast_group(master_address, master_port, 0, world_size, group_name, backend)
        self.group_rank = 0

    def broadcast_all(self, metas: list[BucketMeta]) -> int:
        """Broadcast every bucket from this rank (group rank 0); other trainer ranks (FSDP) call it
        too with no group, to take part in the gathers. Returns bytes sent."""
        sent = 0
        for meta in metas:
            flat = self.bucket(meta)
            if self.group is not None:
                transport.broadcast(self.group, flat, root=0)
                sent += meta.nbytes
        return sent


def sender_for(trainer: Any) -> WeightSender:
    """The :class:`WeightSender` of a :class:`~slime_ray.train.backends.torch_backend.TorchTrainer`."""
    dtype = torch.bfloat16 if getattr(trainer, "precision", "fp32") == "bf16" else torch.float32
    size = int(getattr(trainer.args, "update_weight_buffer_size", 512 * 1024**2))
    return WeightSender(trainer.model, dtype, size, getattr(trainer, "device", torch.device("cpu")))
