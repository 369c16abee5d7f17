"""GPU paths of the torch backend: precision, FSDP2, packed sequences, token-budget micro-batches.

Pure helpers used by :class:`slime_ray.train.backends.torch_backend.TorchTrainer`; every one also
runs on CPU (fp32, no FSDP), which is how the tests check them.

- Precision: parameters and AdamW state stay float32 (the master weights); on GPU the forward
  and backward run under ``torch.autocast(bfloat16)`` (one rank) or FSDP2's
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (several ranks), so matmuls run
  in bf16 and gradients arrive in fp32 on the fp32 shards.
- Packing: the samples of one micro-batch are concatenated into ONE row (no padding), with
  ``position_ids`` restarting at 0 for every sample and attention kept inside each sample by
  the ``"slime_packed"`` attention function (``torch.nn.attention.varlen.varlen_attn`` — flash
  attention over cumulative sequence lengths — on CUDA, one causal SDPA per sample on CPU).
  Only the logits of positions that predict a response token are computed
  (``logits_to_keep`` = those positions), so log-probs are exact per sample.
- Dynamic batch size (``--use-dynamic-batch-size --max-tokens-per-gpu``): micro-batches are
  formed by a token budget instead of a sample count; all ranks use the same number of
  micro-batches (FSDP's collectives pair up). Loss normalisation stays global, so the result
  does not depend on the split.

Notation: b samples in a micro-batch, N packed tokens, M response tokens, L longest response,
V vocabulary.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTN = "slime_packed"
_PACKED = contextvars.ContextVar("slime_packed_forward", default=False)


# ---------------------------------------------------------------------------- device / precision
def train_device(rank: int) -> torch.device:
    """``cuda:i`` when CUDA is visible (Ray gives each rank its GPU as device 0; with several
    visible GPUs rank r takes ``r % count``), else CPU."""
    if torch.cuda.is_available():
        idx = rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def resolve_precision(args: Any, device: torch.device) -> str:
    """"bf16" or "fp32": ``--train-precision`` (auto: bf16 on GPU, fp32 on CPU)."""
    p = getattr(args, "train_precision", "auto") or "auto"
    if p == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return p


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The compute-precision context of a forward (+ backward) pass."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_fsdp2(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard`` per decoder layer, then the root) over the
    default process group. Parameters stay fp32 shards; with bf16 they are all-gathered in bf16
    and gradients reduce-scattered in fp32. Gradients are SUMMED over ranks (divide factor 1),
    matching the trainer's global loss normalisation.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16" else MixedPrecisionPolicy())
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in [*layers, model]:
        m.set_gradient_divide_factor(1.0)
    return model


def compile_layers(model: torch.nn.Module, mode: str | None, world_size: int = 1) -> bool:
    """``--train-compile``: ``torch.compile`` every decoder layer in place (regional compilation).

    The layers share one compiled graph (their parameters are graph inputs), shapes are dynamic
    (``dynamic=True``: packed micro-batches of any token count reuse it), and parameter names do
    not change (``Module.compile``), so checkpoints and weight sync are unaffected. Numerics: the
    same operations, fused (elementwise chains such as RMSNorm, RoPE and SwiGLU become one kernel
    each); equal to eager to float rounding.

    Args:
        model: an HF causal LM (``model.model.layers``).
        mode: "true", "false" or "auto"/None (on when the model is on a CUDA device and there is
            one training rank).
        world_size: training ranks.

    Returns:
        whether the layers were compiled (False when the model has no ``layers`` list).
    """
    on = mode == "true" or (mode in (None, "auto") and next(model.parameters()).is_cuda and world_size == 1)
    layers = _decoder_layers(model) if on else []
    for layer in layers:
        layer.compile(dynamic=True)
    return bool(layers)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with FSDP2 DTensor shards gathered (a collective: every rank must call)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


def batch_to(batch: Any, device: torch.device) -> Any:
    """A :class:`~slime_ray.train.batch.TrainBatch` with its tensors on ``device``, except the
    prompt / response lengths, which stay on the CPU: they size and pack the micro-batches, and
    reading them there never waits for the GPU."""
    if device.type == "cpu":
        return batch
    import dataclasses

    keep = ("prompt_lengths", "response_lengths")
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                                         for f in dataclasses.fields(batch) if f.name not in keep})


# ---------------------------------------------------------------------------- micro-batches
def token_budget_micro_batches(rows: list[int], lengths: list[int], max_tokens: int,
                               num_micro_batches: int | None = None) -> list[list[int]]:
    """Split ``rows`` into micro-batches of at most ``max_tokens`` tokens each.

    Greedy balanced bins: rows by decreasing length, each into the bin with the fewest tokens
    (a new bin when none has room); a row longer than ``max_tokens`` gets a bin of its own.
    ``num_micro_batches`` forces at least that many bins (every rank uses the largest count, so
    FSDP's per-forward collectives pair up); never more bins than rows.

    Args:
        rows: row indices of the batch.
        lengths: prompt + response tokens of each row (same order as ``rows``).
        max_tokens: token budget of one micro-batch (``--max-tokens-per-gpu``).

    Returns:
        non-empty bins, rows in increasing order inside each, bins ordered by first row.
    """
    if max_tokens <= 0:
        raise ValueError(f"--max-tokens-per-gpu must be > 0, got {max_tokens}")
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i]))
    k = min(len(rows), max(num_micro_batches or 1, -(-sum(lengths) // max_tokens)))
    while True:
        bins: list[list[int]] = [[] for _ in range(k)]
        load = [0] * k
        ok = True
        for i in order:
            j = min(range(k), key=lambda b: (load[b], b))
            if load[j] and load[j] + lengths[i] > max_tokens:
                ok = False
                break
            bins[j].append(rows[i])
            load[j] += lengths[i]
        if ok or k >= len(rows):
            break
        k += 1
    out = [sorted(b) for b in bins if b]
    return sorted(out, key=lambda b: b[0])


# ---------------------------------------------------------------------------- packing
@dataclass
class PackedBatch:
    """One micro-batch packed into a single row.

    input_ids, position_ids: [1, N] int64 (positions restart at 0 per sample).
    cu_seqlens: [b+1] int32 cumulative sample lengths; max_len: longest sample.
    pred_pos: [M] int64 packed positions whose logits predict a response token.
    labels: [M] int64 those response tokens.
    row, col: [M] int64 where each log-prob goes in the [b, L] layout.
    width: L.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    pred_pos: torch.Tensor
    labels: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    width: int


def pack_micro_batch(tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                     response_lengths: torch.Tensor, device: torch.device) -> PackedBatch:
    """Pack the right-padded ``tokens`` [b, T] (prompt + response per row) into one row.

    The index arrays are built on the CPU with numpy from the lengths (CPU lengths: no wait for
    the GPU) and go to ``device`` in one copy; the tokens are gathered where they are.
    """
    import numpy as np

    p = torch.as_tensor(prompt_lengths).cpu().long().numpy().reshape(-1)
    n = torch.as_tensor(response_lengths).cpu().long().numpy().reshape(-1)
    b, width = len(p), tokens.shape[1]
    t = p + n
    cu = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(t, out=cu[1:])
    seq = np.arange(b, dtype=np.int64)
    tok_sample = np.repeat(seq, t)
    pos = np.arange(cu[-1], dtype=np.int64) - cu[:-1][tok_sample]  # restarts at 0 per sample
    row = np.repeat(seq, n)
    col = np.arange(int(n.sum()), dtype=np.int64) - (np.cumsum(n) - n)[row]
    pred = cu[:-1][row] + p[row] - 1 + col  # packed position whose logits predict response token col
    flat = tok_sample * width + pos  # position in tokens.reshape(-1)
    sizes = [len(flat), len(pos), len(pred), len(row), len(col), len(cu)]
    host = torch.from_numpy(np.concatenate([flat, pos, pred, row, col, cu]))
    if device.type == "cuda":
        host = host.pin_memory()
    flat_d, pos_d, pred_d, row_d, col_d, cu_d = torch.split(host.to(device, non_blocking=True), sizes)
    ids = tokens.to(device, non_blocking=True).reshape(-1).index_select(0, flat_d).long()
    return PackedBatch(
        input_ids=ids[None], position_ids=pos_d[None], cu_seqlens=cu_d.to(torch.int32),
        max_len=int(t.max()) if b else 0, pred_pos=pred_d, labels=ids.index_select(0, pred_d + 1),
        row=row_d, col=col_d, width=int(n.max()) if b else 0)


def packed_forward_log_probs(model: torch.nn.Module, packed: PackedBatch, batch_size: int,
                             temperature: float, with_entropy: bool = True,
                             entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response log-probs (and entropy) of a packed micro-batch, in the padded layout.

    ``entropy_grad=False`` computes the entropy without autograd (for logging only).

    Returns:
        ``(log_probs [b, L], entropy [b, L] or None)`` float32, 0 beyond each response;
        differentiable. Equal (to float rounding) to the unpacked padded forward.
    """
    from slime_ray.train.logprobs import log_probs_and_entropy

    ensure_packed_attention()
    token = _PACKED.set(True)
    try:
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                    logits_to_keep=packed.pred_pos, cu_seq_lens_q=packed.cu_seqlens,
                    cu_seq_lens_k=packed.cu_seqlens, max_length_q=packed.max_len,
                    max_length_k=packed.max_len, use_cache=False)
    finally:
        _PACKED.reset(token)
    # fused, chunked over rows: no fp32 [M, V] copies; the entropy (for logging unless
    # entropy_grad) comes from the same exp pass as the log-probs
    lp, ent = log_probs_and_entropy(out.logits[0], packed.labels, temperature, with_entropy,
                                    entropy_grad and torch.is_grad_enabled())  # [M]
    del out
    shape = (batch_size, packed.width)
    lp_pad = torch.zeros(shape, dtype=lp.dtype, device=lp.device).index_put((packed.row, packed.col), lp)
    if ent is None:
        return lp_pad, None
    ent_pad = torch.zeros(shape, dtype=ent.dtype, device=ent.device).index_put((packed.row, packed.col), ent)
    return lp_pad, ent_pad


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention inside each packed sample.

    query [1, H, N, D], key/value [1, Hkv, N, D]; ``cu_seq_lens_q`` [b+1] in kwargs. Returns
    ``([1, N, H, D], None)``. Without ``cu_seq_lens_q`` (an ordinary padded call) it is SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    # flash varlen needs fp16/bf16: fp32 q/k/v (fp32 training, or RoPE upcasting under autocast)
    # are cast to the autocast dtype, or take the exact per-sample SDPA path below
    half = query.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cuda")
    varlen_kw = _varlen_kwargs(scaling, query.shape[-1], gqa) if query.is_cuda and half else None
    if varlen_kw is not None:
        from torch.nn.attention.varlen import varlen_attn

        dt = query.dtype if query.dtype != torch.float32 else torch.get_autocast_dtype("cuda")
        q, k, v = (x[0].transpose(0, 1).to(dt) for x in (query, key, value))  # [N, H, D]
        if gqa and not varlen_kw.get("enable_gqa"):  # torch <= 2.11 varlen_attn has no enable_gqa
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mx = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        out = varlen_attn(q, k, v, cu, cu, mx, mx, **varlen_kw)
        return out[None], None  # [1, N, H, D]
    bounds = cu.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        parts.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=None)
def _varlen_kwargs(scaling: float | None, head_dim: int, gqa: bool = False) -> dict[str, Any] | None:
    """Causal keyword arguments for this torch's ``varlen_attn`` (2.11: ``is_causal``; later:
    ``window_size``, and ``enable_gqa`` for grouped KV heads), or None when it cannot apply
    ``scaling`` (then per-sample SDPA). Cached: called by every layer of every forward
    (callers must not modify the returned dict)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    if scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-12:
        if "scale" not in params:
            return None
        kw["scale"] = scaling
    return kw


def _packed_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask function of ``"slime_packed"``: none for packed calls (the kernel masks), else SDPA's."""
    if _PACKED.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def ensure_packed_attention() -> None:
    """Register ``"slime_packed"`` with transformers (attention and mask functions), once."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTN, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTN, _packed_mask)
    _registered = True


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to the ``"slime_packed"`` attention (padded calls still run SDPA)."""
    ensure_packed_attention()
    model.set_attn_implementation(PACKED_ATTN)
