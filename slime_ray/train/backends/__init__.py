"""Training backends (torch, Megatron-core) and what they share."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)`` with its fused kernel where torch has one.

    Fused (one kernel over all parameters) on CPU and CUDA; otherwise torch's default. On CPU
    the default is the per-parameter loop, which took 1.11 s against 0.21 s fused for one step of
    SmolLM2-135M (272 tensors, one thread; bench/RESULTS.md, 2026-12-01). TRL's default
    (``optim="adamw_torch_fused"``) is the fused one too. The update is the same formula
    (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"); results agree to float
    rounding.
    """
    params = [p for p in params]
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=True if fusable else None, **kwargs)
