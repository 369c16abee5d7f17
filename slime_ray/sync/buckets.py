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


def bucket_views(flat: torch.Tensor, meta: BucketMeta) -> list[torch.Tensor]:
    """Views of ``flat`` (a 1-D buffer of at least ``meta.numel`` elements) shaped as ``meta``'s
    tensors, in order (no copy).

    Raises:
        ValueError: ``flat`` is not 1-D or has fewer than ``meta.numel`` elements.
    """
    if flat.dim() != 1 or flat.numel() < meta.numel:
        raise ValueError(f"bucket_views: need a 1-D buffer of >= {meta.numel} elements, got {tuple(flat.shape)}")
    out, off = [], 0
    for shape, n in zip(meta.shapes, meta.numels):
        out.append(flat[off: off + n].view(shape))
        off += n
    return out


def copy_into(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dsts[i].copy_(srcs[i])`` for all i (casting dtype, any device), as few kernels as possible.

    Pairs are grouped by (devices, dtypes, contiguity): each same-device group is one
    ``torch._foreach_copy_`` (on CUDA one multi-tensor kernel per ~100 tensors, casting on the
    fly, when sources and destinations are contiguous; per-tensor copies otherwise, same
    result); cross-device pairs are plain ``copy_``. Shapes must match.
    """
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dsts, srcs):
        g = groups.setdefault((s.device, s.dtype, d.device, d.dtype, s.is_contiguous() and d.is_contiguous()), ([], []))
        g[0].append(d)
        g[1].append(s)
    for (s_dev, _, d_dev, _, _), (d, s) in groups.items():
        if s_dev == d_dev:
            torch._foreach_copy_(d, s)
        else:  # across devices: plain copies (no mixed-device foreach)
            for dt, st in zip(d, s):
                dt.copy_(st)


def flatten(tensors: list[torch.Tensor], meta: BucketMeta, device: torch.device | str) -> torch.Tensor:
    """One new contiguous [meta.numel] buffer of ``meta``'s dtype on ``device`` holding ``tensors``
    (shapes as ``meta.shapes``, any dtype/device; cast on copy)."""
    flat = torch.empty(meta.numel, dtype=meta.torch_dtype, device=device)
    copy_into(bucket_views(flat, meta), [t.reshape(s) for t, s in zip(tensors, meta.shapes)])
    return flat


def unflatten(flat: torch.Tensor, meta: BucketMeta) -> dict[str, torch.Tensor]:
    """Views of ``flat`` by name (no copy)."""
    out, off = {}, 0
    for name, shape, n in zip(meta.names, meta.shapes, meta.numels):
        out[name] = flat[off: off + n].view(shape)
        off += n
    return out
