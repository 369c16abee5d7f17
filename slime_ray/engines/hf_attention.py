"""Grouped-query attention for the static decode loop, without repeated KV heads.

transformers' SDPA attention, given an attention mask on CUDA and traced by ``torch.compile``,
expands the ``kv_heads`` key/value heads to all ``heads`` query heads (``repeat_kv``) in every
layer at every step: for a static cache of ``L`` positions that writes and re-reads
``heads / kv_heads`` times the cache, most of a decode step's memory traffic at large batch.

:func:`grouped_attention_forward` computes the same attention with the query heads of a group
stacked along the query axis, ``q [B, kv_heads, groups * Lq, D]`` against ``K, V
[B, kv_heads, L, D]``: one batched matmul reading K once, the mask, a float32 softmax, one
batched matmul reading V once. Under inductor that is two matmuls and one fused softmax kernel.
Queries longer than :data:`MAX_GROUPED_QUERY` (prefill) go to transformers' SDPA function as
before, where a fused kernel beats materialising ``[Lq, L]`` scores.

It is registered under :data:`GROUPED_ATTENTION` in transformers' ``AttentionInterface``,
with a mask function in ``AttentionMaskInterface`` (a name missing there gets *no* mask from
``create_causal_mask``): the boolean ``[B, 1, Lq, L]`` mask of SDPA, never skipped, since the
function relies on it for causality. :func:`use_grouped_attention` switches one model's config
to it for the duration of a ``with`` block; other models (the trainer's, freshly loaded ones)
keep their own implementation.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

GROUPED_ATTENTION = "slime_ray_grouped"
MAX_GROUPED_QUERY = 16  # longer queries (prefill) use transformers' SDPA function
_REPLACEABLE = ("sdpa", "eager")  # implementations whose results this one reproduces
_registered = False


def _grouped_mask(*args, **kwargs):
    """transformers' SDPA boolean mask, always materialised (True = attend)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def grouped_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query [B, H, Lq, D]`` over ``key / value [B, Hkv, L, D]`` (Hkv divides H).

    Query head ``h`` attends with key/value head ``h // (H / Hkv)`` (as ``repeat_kv``).
    ``attention_mask``: boolean (True = attend) or additive float, broadcastable to
    ``[B, 1 or H, Lq, L]``; None means causal (upper-left aligned, as SDPA's ``is_causal``)
    for ``Lq > 1`` if the module is causal, else no mask.

    Returns:
        ``(out [B, Lq, H, D], None)``, the layout of transformers' attention functions.

    Raises:
        NotImplementedError: attention sinks (``s_aux``), which this function does not model.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("grouped_attention_forward: attention sinks (s_aux) are not supported")
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_len > MAX_GROUPED_QUERY and kwargs.get("softcap") is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    # [B, H, Lq, D] -> [B, Hkv, G * Lq, D]: head h = kv * G + g, row g * Lq + q
    q = query.reshape(batch, kv_heads, groups * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [B, Hkv, G * Lq, L]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
    mask = attention_mask
    if mask is None and q_len > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        ar_q, ar_k = torch.arange(q_len, device=query.device), torch.arange(kv_len, device=query.device)
        mask = (ar_q[:, None] >= ar_k[None, :])[None, None]
    if mask is not None:
        # [b, 1 or H, Lq, L] -> [b, 1 or Hkv, 1 or G, Lq, L]
        if mask.shape[1] == 1:
            mask = mask[:, :, None]
        else:
            mask = mask.reshape(mask.shape[0], kv_heads, groups, mask.shape[-2], mask.shape[-1])
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0.0 and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.view(batch, kv_heads, groups * q_len, kv_len), value)  # [B, Hkv, G * Lq, D]
    out = out.view(batch, heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


def register_grouped_attention() -> str:
    """Register :func:`grouped_attention_forward` and its mask (idempotent); returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface

        AttentionInterface.register(GROUPED_ATTENTION, grouped_attention_forward)
        AttentionMaskInterface.register(GROUPED_ATTENTION, _grouped_mask)
        _registered = True
    return GROUPED_ATTENTION


def _attn_config(model: torch.nn.Module):
    """The config whose ``_attn_implementation`` the model's attention layers read."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def supports_grouped_attention(model: torch.nn.Module) -> bool:
    """True for a model with fewer KV heads than query heads running SDPA or eager attention,
    and without attention sinks (gpt-oss style ``sinks`` parameters, which the grouped path does
    not model: such a model keeps its own attention)."""
    config = _attn_config(model)
    if any(hasattr(m, "sinks") for m in model.modules()):
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (
        getattr(config, "_attn_implementation", None) in _REPLACEABLE
        and isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads < heads and heads % kv_heads == 0
    )


@contextlib.contextmanager
def use_grouped_attention(model: torch.nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model`` runs :func:`grouped_attention_forward` (if it supports it).

    Only ``model``'s own config changes (restored on exit, also on error). Yields whether the
    switch happened.
    """
    if not enabled or not supports_grouped_attention(model):
        yield False
        return
    config = _attn_config(model)
    before = config._attn_implementation
    config._attn_implementation = register_grouped_attention()
    try:
        yield True
    finally:
        config._attn_implementation = before
