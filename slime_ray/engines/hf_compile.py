"""Fast path of the embedded HF engine: static KV cache, ``torch.compile``, shape buckets.

transformers' ``generate`` compiles the decode step when it runs with a static KV cache and a
``CompileConfig`` (``cache_implementation="static"``; the prefill stays eager). A compiled
decode graph is specialised on the batch size and the cache length, so an RL job whose
batches vary (dynamic filtering, partial rollouts, uneven engine loads) would recompile at
almost every step. :class:`ShapeBuckets` pads each ``generate`` call to one of a few fixed
shapes instead:

- batch: the smallest of ``batch_sizes`` (default 8, 32, 64, 128, 256) that holds the group;
  a larger group is split into chunks of the largest bucket; padding rows are copies of a
  real prompt that stop at once and are dropped;
- prompt length: left-padded up to a multiple of ``prompt_multiple`` (64);
- new tokens: ``max_new_tokens`` rounded up to a multiple of ``new_tokens_multiple`` (64); each
  row still stops at its own limit (the engine's per-row stopping criterion), so the bucket
  only sizes the cache.

So a job compiles at most once per (batch bucket, cache length) pair. The padding is masked
out: outputs and log-probs equal those of the unpadded call (tested greedy on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BATCH_BUCKETS = (8, 32, 64, 128, 256)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (``n`` itself when multiple <= 1)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


@dataclass(frozen=True)
class ShapeBuckets:
    """The fixed shapes generate calls are padded to (see the module docstring).

    Attributes:
        batch_sizes: ascending batch buckets (rows).
        prompt_multiple: prompt lengths are rounded up to a multiple of this (tokens).
        new_tokens_multiple: ``max_new_tokens`` is rounded up to a multiple of this (tokens).
    """

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    prompt_multiple: int = 64
    new_tokens_multiple: int = 64

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError(f"ShapeBuckets: batch_sizes must be positive, got {self.batch_sizes}")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(int(b) for b in self.batch_sizes))))

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def batch(self, n: int) -> int:
        """Batch bucket for ``n`` rows (``n <= max_batch``; split larger groups first)."""
        for b in self.batch_sizes:
            if n <= b:
                return b
        raise ValueError(f"ShapeBuckets.batch: {n} rows exceed the largest bucket {self.max_batch}")

    def chunks(self, n: int) -> list[range]:
        """Row ranges of at most ``max_batch`` rows covering ``range(n)``."""
        return [range(i, min(n, i + self.max_batch)) for i in range(0, n, self.max_batch)]

    def prompt_len(self, n: int) -> int:
        return round_up(n, self.prompt_multiple)

    def new_tokens(self, n: int) -> int:
        return round_up(n, self.new_tokens_multiple)


def parse_batch_buckets(spec: str | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    """``"8,32,64"`` or a list of ints -> a tuple of batch buckets (default when empty/None)."""
    if spec is None or spec == "":
        return DEFAULT_BATCH_BUCKETS
    if isinstance(spec, str):
        return tuple(int(x) for x in spec.split(",") if x.strip())
    return tuple(int(x) for x in spec)


def resolve_compile(compile: bool | str | None, device: torch.device) -> bool:
    """``None``/"auto" -> on for CUDA devices, off elsewhere; "true"/"false" strings accepted."""
    if compile is None or compile == "auto":
        return device.type == "cuda"
    if isinstance(compile, str):
        if compile.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ValueError(f"HFEngine: compile must be auto/true/false, got {compile!r}")
        return compile.lower() in ("true", "1", "on")
    return bool(compile)


def compile_generate_kwargs(mode: str = "reduce-overhead") -> dict[str, Any]:
    """``generate`` kwargs that make transformers compile the decode step (static KV cache).

    ``dynamic=False``: one graph per shape bucket, never a dynamic-shape graph.
    """
    from transformers import CompileConfig

    return {
        "cache_implementation": "static",
        "compile_config": CompileConfig(fullgraph=True, dynamic=False, mode=mode),
    }


def raise_recompile_limit(limit: int = 64) -> None:
    """Let dynamo keep one graph per bucket (its default limit of 8 would fall back to eager)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def dynamo_graph_count() -> int:
    """Graphs dynamo compiled so far in this process (``torch._dynamo`` counters)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - dynamo unavailable: nothing was compiled
        return 0
    return int(counters["stats"]["unique_graphs"])
