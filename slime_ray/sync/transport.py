"""Which weight transport a job uses, and the process groups the broadcast transport builds.

Transports (one contract, :mod:`slime_ray.sync.weight_sync`):

- ``object_store``: rank 0's CPU state dict in the Ray object store, every engine loads it
  (CPU clusters; also restore / fault recovery).
- ``cuda_ipc``: colocated on GPUs: every trainer rank flattens a bucket on its GPU and hands the
  engine on the same GPU a CUDA IPC handle (``reduce_tensor``); no host copy.
- ``nccl``: disaggregated GPUs: trainer rank 0 and every engine form one broadcast group
  (rank 0 = trainer); buckets are broadcast from rank 0 out of two persistent buffers, the fill
  of the next bucket overlapping the current broadcast; an HFEngine receives straight into its
  parameters (re-laid out as one flat buffer per bucket on the first sync). On CPU the same
  code runs over gloo.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TRANSPORTS = ("object_store", "cuda_ipc", "nccl")


def choose_transport(requested: str | None, *, use_gpu: bool, colocate: bool,
                     num_engines: int = 1, world_size: int = 1) -> str:
    """``--update-weight-transport`` (auto: object_store on CPU, cuda_ipc when colocated on GPUs
    with one trainer rank per engine GPU, nccl when disaggregated on GPUs).

    Raises:
        ValueError: a GPU transport asked for on a cluster without GPUs, or cuda_ipc without
            colocation (the engine must share the trainer rank's GPU).
    """
    req = requested or "auto"
    if req == "auto":
        if not use_gpu:
            return "object_store"
        return "cuda_ipc" if colocate and num_engines <= world_size else "nccl"
    if req not in TRANSPORTS:
        raise ValueError(f"--update-weight-transport {req!r}: choose auto or one of {TRANSPORTS}")
    if req != "object_store" and not use_gpu and req == "cuda_ipc":
        raise ValueError("--update-weight-transport cuda_ipc needs GPUs; use object_store (or auto)")
    if req == "cuda_ipc" and not (colocate and num_engines <= world_size):
        raise ValueError("--update-weight-transport cuda_ipc needs --colocate with at most one engine per "
                         "trainer GPU; use nccl (or auto)")
    return req


def new_broadcast_group(master_address: str, master_port: int, rank: int, world_size: int,
                        group_name: str, backend: str, timeout_s: float = 600.0) -> Any:
    """A process group of its own (not the default group) over a TCP store at the master.

    Rank 0 hosts the store. ``backend``: "nccl" (GPU tensors) or "gloo" (CPU tensors).
    Returns a ``ProcessGroupNCCL`` / ``ProcessGroupGloo`` whose ``broadcast`` works on lists.
    """
    store = dist.TCPStore(master_address, int(master_port), world_size, is_master=rank == 0,
                          timeout=timedelta(seconds=timeout_s))
    store = dist.PrefixStore(group_name, store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))


def broadcast(group: Any, tensor: torch.Tensor, root: int = 0) -> None:
    """In-place broadcast of ``tensor`` from ``root`` over a group of :func:`new_broadcast_group`."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()
