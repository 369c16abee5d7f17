"""Engine side of the weight transports: rebuild or receive a bucket and load it.

Works with any engine that has ``update_weights(named_tensors, weight_version)`` and a
``device`` (HFEngine); the engine's own checks (names, shapes, tied weights) apply to each bucket.
"""

from __future__ import annotations

from typing import Any

import torch

from slime_ray.sync import transport
from slime_ray.sync.buckets import BucketMeta, unflatten


def _local_device(uuid: str) -> int:
    """This process's index of the GPU with ``uuid`` (CUDA_VISIBLE_DEVICES renumbers them)."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"cuda_ipc: the sender's GPU {uuid} is not visible here; the engine must share "
                       "the trainer rank's GPU (use --update-weight-transport nccl)")


def load_ipc_bucket(engine: Any, payload: dict[str, Any], weight_version: int) -> None:
    """Open the CUDA IPC handle of one bucket, copy it into ``engine``; returns after the copy."""
    fn, args = payload["handle"]
    args = list(args)
    args[6] = _local_device(payload["uuid"])  # storage device of rebuild_cuda_tensor
    flat = fn(*args)
    engine.update_weights(unflatten(flat, payload["meta"]), weight_version)
    torch.cuda.current_stream(flat.device).synchronize()
    del flat


class BroadcastReceiver:
    """One engine's membership in the trainer's broadcast group."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str, device: torch.device) -> None:
        self.device = torch.device(device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.group = transport.new_broadcast_group(master_address, master_port, rank, world_size,
                                                   group_name, backend)

    def receive(self, engine: Any, metas: list[BucketMeta], weight_version: int) -> int:
        """Receive every bucket from rank 0 and load it; returns bytes received."""
        got = 0
        for meta in metas:
            flat = torch.empty(meta.numel, dtype=meta.torch_dtype, device=self.device)
            transport.broadcast(self.group, flat, root=0)
            engine.update_weights(unflatten(flat, meta), weight_version)
            got += meta.nbytes
        return got


def dispatch(engine: Any, method: str, *args: Any) -> Any:
    """Run one engine-side sync step on ``engine`` (called by the engine's deployment / host actor).

    Methods (SGLang's names): ``update_weights_from_tensor(payload, weight_version)``,
    ``init_weights_update_group(master_address, master_port, rank, world_size, group_name)``,
    ``update_weights_from_distributed(metas, weight_version, group_name)``.

    Raises:
        ValueError: an unknown method, or a group that was never initialised.
    """
    groups = engine.__dict__.setdefault("_weight_groups", {})
    if method == "update_weights_from_tensor":
        return load_ipc_bucket(engine, *args)
    if method == "init_weights_update_group":
        addr, port, rank, world, name = args
        groups[name] = BroadcastReceiver(addr, port, rank, world, name, getattr(engine, "device", "cpu"))
        return None
    if method == "update_weights_from_distributed":
        metas, version, name = args
        if name not in groups:
            raise ValueError(f"update_weights_from_distributed: no weight group {name!r} on this engine")
        return groups[name].receive(engine, metas, version)
    raise ValueError(f"unknown weight sync method {method!r}")
