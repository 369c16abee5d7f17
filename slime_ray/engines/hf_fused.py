"""Fused input projections for the static decode loop: one GEMM for q/k/v, one for gate/up.

A decoder layer of a Llama-style model runs seven small GEMMs per token step (q, k, v, o,
gate, up, down). At decode time (``[B, 1]`` tokens) each is a few microseconds of mostly fixed
cost, so the three projections that read the same input (``q_proj``, ``k_proj``, ``v_proj``)
and the two of the MLP (``gate_proj``, ``up_proj``) are better run as one GEMM each against
the concatenated weights: 3 fewer kernels per layer and step.

:func:`use_fused_projections` does that for the duration of a ``with`` block without touching
the model's code or parameters: for every module with such a group of ``nn.Linear`` children
it swaps the children for :class:`ProjectionSlice` modules sharing one :class:`FusedProjection`.
The first slice called with an input computes ``x @ W_cat.T (+ b_cat)`` once; every slice
returns its column range of that result (a view), and the shared result is dropped once all
of them took theirs. The model's forward code (transformers' own, any version) is unchanged;
it still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``.

``W_cat`` is a copy (``torch.cat`` into a buffer allocated once), refreshed from the original
``Linear`` weights each time the block is entered, so weight updates of any kind (in place,
re-laid-out flat buffers) are picked up at the next generate call; it costs one extra copy of
those weights in memory (about half of a Llama-style model's non-embedding weights). The
fused buffers are the same tensor objects from call to call (static addresses for CUDA
graphs; ``torch.compile`` sees the same modules, so entering the block again does not
recompile). :func:`release_fused_projections` frees them (e.g. when the engine releases its
accelerator memory); the next block re-allocates.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch

#: groups of sibling ``nn.Linear`` children that read the same input, in output order
FUSABLE_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_ATTR = "_slime_ray_fused"  # per-model cache: list of (parent module, group names, FusedProjection)


class FusedProjection(torch.nn.Module):
    """One GEMM for sibling ``nn.Linear`` layers ``linears`` that read the same input.

    Not registered in the model (it is kept out of ``state_dict`` / ``parameters``).

    Args:
        linears: ``nn.Linear`` modules with equal ``in_features``, dtype and device, all with or
            all without bias; their outputs are concatenated along the last dimension in order.

    Attributes:
        weight: ``[sum(out_features), in_features]`` buffer (None until :meth:`refresh`).
        bias: ``[sum(out_features)]`` buffer or None.
        bounds: ``(start, end)`` column range of each linear's output.
    """

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        self._linears = list(linears)  # plain list: not submodules
        ends = list(itertools.accumulate(lin.out_features for lin in linears))
        self.bounds = [(e - lin.out_features, e) for lin, e in zip(linears, ends)]
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self._out: torch.Tensor | None = None
        self._src: torch.Tensor | None = None
        self._left = 0

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the linears' current weights (and biases) into the fused buffers (allocated
        on first use, or after :meth:`release`, on the weights' device)."""
        ws = [lin.weight for lin in self._linears]
        if self.weight is None or self.weight.device != ws[0].device or self.weight.dtype != ws[0].dtype:
            self.weight = torch.empty(self.bounds[-1][1], ws[0].shape[1], dtype=ws[0].dtype, device=ws[0].device)
            if self._linears[0].bias is not None:
                self.bias = torch.empty(self.bounds[-1][1], dtype=ws[0].dtype, device=ws[0].device)
            if self.weight.is_cuda:  # cudagraph trees read them in place (no copy per replay); not
                # guarded: a re-allocation after release() re-records the graph, it does not recompile
                torch._dynamo.mark_static_address(self.weight, guard=False)
                if self.bias is not None:
                    torch._dynamo.mark_static_address(self.bias, guard=False)
        torch.cat(ws, 0, out=self.weight)
        if self.bias is not None:
            torch.cat([lin.bias for lin in self._linears], 0, out=self.bias)

    def release(self) -> None:
        """Drop the fused buffers (the next :meth:`refresh` allocates again)."""
        self.weight = self.bias = None
        self._out = self._src = None

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output of linear ``index`` for input ``x`` (``[..., in_features]``): a column view
        ``[..., out_features_index]`` of one fused GEMM shared by the group's calls on ``x``."""
        if self._out is None or self._src is not x:
            self._out = torch.nn.functional.linear(x, self.weight, self.bias)
            self._src, self._left = x, len(self.bounds)
        start, end = self.bounds[index]
        piece = self._out[..., start:end]
        self._left -= 1
        if self._left <= 0:  # every linear of the group took its part: drop the shared result
            self._out = self._src = None
        return piece


class ProjectionSlice(torch.nn.Module):
    """Stands in for linear ``index`` of a :class:`FusedProjection` group (same call signature
    as the ``nn.Linear`` it replaces: ``[..., in] -> [..., out]``)."""

    def __init__(self, fused: FusedProjection, index: int):
        super().__init__()
        self.index = index
        object.__setattr__(self, "fused", fused)  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.take(x, self.index)


def _fusable(parent: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Linear] | None:
    linears = [parent._modules.get(n) for n in names]
    if not all(type(m) is torch.nn.Linear for m in linears):  # exact type: no LoRA / quantised wrappers
        return None
    first = linears[0]
    same = all(
        m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
        for m in linears
    )
    return linears if same else None


def _groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, tuple[str, ...], FusedProjection, list]]:
    """The model's fusable groups (found once, cached on the model)."""
    cached = getattr(model, _ATTR, None)
    if cached is None:
        cached = []
        for parent in model.modules():
            for names in FUSABLE_GROUPS:
                linears = _fusable(parent, names)
                if linears is not None:
                    fused = FusedProjection(linears)
                    slices = [ProjectionSlice(fused, i) for i in range(len(names))]
                    cached.append((parent, names, fused, slices))
        object.__setattr__(model, _ATTR, cached)
    return cached


def fusable_groups(model: torch.nn.Module) -> int:
    """How many projection groups :func:`use_fused_projections` would fuse in ``model``."""
    return len(_groups(model))


def fused_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The fused weight / bias buffers currently allocated for ``model``."""
    out = []
    for _, _, fused, _ in getattr(model, _ATTR, None) or []:
        out.extend(t for t in (fused.weight, fused.bias) if t is not None)
    return out


def release_fused_projections(model: torch.nn.Module) -> None:
    """Free the fused weight copies of ``model`` (no-op if none were made)."""
    for _, _, fused, _ in getattr(model, _ATTR, None) or []:
        fused.release()


@contextlib.contextmanager
def use_fused_projections(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, ``model``'s q/k/v and gate/up projections run as one GEMM per group.

    Refreshes the fused weights from the current ones on entry; restores the original
    ``nn.Linear`` children on exit (also on error). Yields the number of fused groups (0 when
    ``enabled`` is False or the model has none).
    """
    groups = _groups(model) if enabled else []
    swapped = []
    try:
        for parent, names, fused, slices in groups:
            originals = [parent._modules[n] for n in names]
            if any(m is not lin for m, lin in zip(originals, fused._linears)):  # replaced since: leave it
                continue
            fused.refresh()
            for n, s in zip(names, slices):
                parent._modules[n] = s
            swapped.append((parent, names, originals))
        yield len(swapped)
    finally:
        for parent, names, originals in swapped:
            for n, m in zip(names, originals):
                parent._modules[n] = m
