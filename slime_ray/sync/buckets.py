"""Flat weight buckets: named tensors <-> one contiguous buffer of one dtype.

A bucket holds consecutive parameters (HF names) up to ``--update-weight-buffer-size`` bytes
(a larger tensor travels alone); every transport moves whole buckets (one IPC handle, one
broadcast each), as slime's ``FlattenedTensorBucket``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BucketMeta:
    """What a receiver needs to unpack one bucket: names, shapes, the dtype (name) and bytes."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=_DTYPES[self.dtype]).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_buckets(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 buffer_size_bytes: int) -> list[BucketMeta]:
    """Split ``(name, shape)`` pairs, in order, into buckets of at most ``buffer_size_bytes``.

    Raises:
        ValueError: ``buffer_size_bytes`` <= 0.
    """
    if buffer_size_bytes <= 0:
        raise ValueError(f"--update-weight-buffer-size must be > 0, got {buffer_size_bytes}")
    esize = torch.empty((), dtype=dtype).element_size()
    out: list[BucketMeta] = []
    cur: list[tuple[str, tuple[int, ...]]] = []
    used = 0
    for name, shape in shapes:
        size = int(torch.Size(shape).numel()) * esize
        if cur and used + size > buffer_size_bytes:
            out.append(BucketMeta(tuple(n for n, _ in cur), tuple(s for _, s in cur), dtype_name(dtype)))
            cur, used = [], 0
        cur.append((name, tuple(shape)))
        used += size
    if cur:
        out.append(BucketMeta(tuple(n for n, _ in cur), tuple(s for _, s in cur), dtype_name(dtype)))
    return out


def flatten(tensors: list[torch.Tensor], meta: BucketMeta, device: torch.device | str) -> torch.Tensor:
    """One new contiguous [numel] buffer of ``meta``'s dtype on ``device`` holding ``tensors``."""
    flat = torch.empty(meta.numel, dtype=meta.torch_dtype, device=device)
    off = 0
    for t, n in zip(tensors, meta.numels):
        flat[off: off + n].copy_(t.reshape(-1))
        off += n
    return flat


def unflatten(flat: torch.Tensor, meta: BucketMeta) -> dict[str, torch.Tensor]:
    """Views of ``flat`` by name (no copy)."""
    out, off = {}, 0
    for name, shape, n in zip(meta.names, meta.shapes, meta.numels):
        out[name] = flat[off: off + n].view(shape)
        off += n
    return out
