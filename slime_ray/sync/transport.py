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


class PackedStateDict:
    """A CPU state dict as numpy arrays, for the object store (``object_store`` transport).

    Ray serializes numpy arrays out of band: :func:`ray.put` is one memcpy per tensor into shared
    memory and :func:`ray.get` maps them without a copy, where ``torch.Tensor`` values are
    pickled (copied) on both sides (measured on the 2-vCPU VM, 644 MB fp32: put 0.55-1.37 s /
    get 0.20-0.72 s as tensors, put 0.38-0.46 s / get 0.001 s as arrays). Dtypes numpy lacks
    (bfloat16, float8) travel as same-width integer views.

    Args:
        state_dict: name -> tensor (any device; copied to CPU when elsewhere).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.arrays: dict[str, Any] = {}
        self.views: dict[str, torch.dtype] = {}  # name -> the real dtype, for integer views
        for name, t in state_dict.items():
            t = t.detach().cpu().contiguous()
            try:
                self.arrays[name] = t.numpy()
            except TypeError:  # no numpy dtype (bfloat16, float8): same-width integer view
                self.views[name] = t.dtype
                self.arrays[name] = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """name -> CPU tensor sharing memory with the arrays (read-only when they come from
        :func:`ray.get`: callers copy them into their own parameters, never write them)."""
        import warnings

        out = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, a in self.arrays.items():
                t = torch.from_numpy(a)
                out[name] = t.view(self.views[name]) if name in self.views else t
        return out


def as_tensors(weights: Any) -> dict[str, torch.Tensor]:
    """``weights`` (a :class:`PackedStateDict` or a dict of tensors) as a dict of tensors."""
    return weights.to_tensors() if isinstance(weights, PackedStateDict) else weights


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
