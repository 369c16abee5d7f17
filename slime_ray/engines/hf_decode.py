"""Static-cache decode loop of the embedded HF engine (the fast path of :class:`HFEngine`).

transformers' ``generate`` with a static cache and a compiled decode step still pays a few
milliseconds of Python per step (logits processors, stopping criteria, output bookkeeping),
and a per-row stopping criterion that reads the last tokens on the host syncs every step.
:class:`StaticDecoder` replaces it with a loop of its own:

- one :class:`transformers.StaticCache` per shape bucket ``(batch, prompt + new tokens)``,
  allocated once and reset between calls, so the addresses CUDA graphs captured stay valid;
- prefill: one eager forward over the left-padded prompts (per-row ``position_ids`` =
  cumulative sum of the mask - 1) that fills the cache; its last logits give token 0. Repeated
  prompts (the samples of a GRPO group) are prefilled once and their keys / values copied to
  every row of the group (``share_prefill``);
- decode: ONE function per step (:func:`decode_step`) doing the model forward of ``[B, 1]``
  tokens against a full-length static 2D mask (prompt padding 0, everything else 1; the cache's
  own position gives causality), sampling from ``logits.float() / T``, the chosen token's
  log-prob (``logit - logsumexp``) and the per-row ``done`` update, all on the device. With ``compile`` it
  runs under ``torch.compile(fullgraph=True, dynamic=False)`` (inductor kernels); on GPUs the
  loop then records ``graph_steps`` (default 8) consecutive steps -- noise draw, compiled step,
  copies into the output buffers -- as ONE CUDA graph per (bucket, sampling mode) after their
  first eager run, and replays it: one host call per 8 tokens instead of a Python call,
  dynamo guard check and cudagraph-tree replay per token, which had left the GPU idle ~10%
  of each step at batch 256. (``graph_steps=0``: the step compiled with
  ``mode="reduce-overhead"``, one cudagraph-tree replay per token.) A graph may run up to
  ``graph_steps - 1`` steps past the last needed one (rows are done by then: pad tokens, into
  spare cache slots and output columns). Graphs are recorded again when the weights moved
  (``model.to``, a re-laid-out flat buffer); the dynamo graph is not recompiled;
- sampling noise is drawn outside the compiled step into a static buffer from torch's global
  CUDA/CPU generator (inside the captured graphs, whose replays advance the generator), so
  ``torch.manual_seed`` makes a call reproducible. On CUDA: ``[B, V]`` ``Exp(1)`` draws (one
  kernel per step) and token = ``argmax(logits / T - log(noise))`` (exponential race, no scan).
  On CPU: one ``U[0, 1)`` draw per row and token = the inverse CDF of ``softmax(logits / T)``
  at it (a cumulative sum over the vocabulary; drawing ``B x V`` exponentials on the CPU took
  157 us of a ~0.6 ms compiled step for 16 x 443 on the 2-vCPU VM). Both are exact draws from ``softmax(logits / T)``. ``top_k`` /
  ``top_p`` add one sort per step; the RL default (top_p = 1, top_k off) does not sort.
  Greedy (``T <= 0``) is ``argmax``;
- tokens and log-probs go into preallocated ``[B, new tokens (+ graph_steps)]`` device buffers
  at a device-side column index; the host reads
  ``done.all()`` (and the abort flag) only every ``check_every`` steps and copies the buffers
  once at the end.

Finished rows keep emitting ``pad_token_id`` (log-prob 0); the engine cuts every row at its
first stop id (included) or its own ``max_new_tokens``.

Attention: for GQA models (fewer KV heads than query heads) the model runs
:func:`slime_ray.engines.hf_attention.grouped_attention_forward` while the loop runs (its
config is switched back afterwards): decode steps read each KV head once instead of
materialising the repeated heads that transformers' SDPA path builds when a mask is given.

One graph per (shape bucket, sampling mode), where the mode is greedy / sample / sample with
top-k or top-p: temperature, top_p and top_k are device tensors, not graph constants.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from slime_ray.engines.hf_attention import use_grouped_attention
from slime_ray.engines.hf_fused import fused_weights, release_fused_projections, use_fused_projections

GREEDY, SAMPLE, SAMPLE_FILTERED = "greedy", "sample", "sample_filtered"
_TINY = 1e-30  # noise floor: -log(0) would make a token win whatever its probability


def noise_shape(batch: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """Shape of the per-step sampling noise: ``[B, V]`` Exp(1) on CUDA, ``[B, 1]`` U[0, 1) elsewhere."""
    return (batch, vocab) if device.type == "cuda" else (batch, 1)


def draw_noise_(noise: torch.Tensor) -> torch.Tensor:
    """Fill ``noise`` in place for :func:`select_tokens` (``[B, 1]``: uniform, else exponential)."""
    return noise.uniform_() if noise.shape[-1] == 1 else noise.exponential_()


def _draw(scores: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Indices ``[B]`` drawn from ``softmax(scores)`` (``scores`` ``[B, V]``, ``-inf`` allowed).

    ``noise`` ``[B, V]`` Exp(1): exponential race ``argmax(scores - log(noise))``. ``noise``
    ``[B, 1]`` U[0, 1): inverse CDF, the first index whose cumulative probability exceeds
    ``u x total`` (zero-probability indices are never picked; ``total`` absorbs float rounding).
    """
    if noise.shape[-1] == 1:
        cdf = torch.softmax(scores, -1).cumsum(-1)
        idx = (cdf <= noise * cdf[:, -1:]).sum(-1)
        return idx.clamp_max(scores.shape[-1] - 1)
    race = -noise.clamp_min(_TINY).log()  # argmax(scores + race) ~ softmax(scores)
    return (scores + race).argmax(-1)


def sampling_mode(temperature: float, top_p: float, top_k: int) -> str:
    """``"greedy"`` (T <= 0), ``"sample"`` (no top-k/top-p) or ``"sample_filtered"``."""
    if temperature <= 0.0:
        return GREEDY
    return SAMPLE_FILTERED if (top_p < 1.0 or top_k > 0) else SAMPLE


def select_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    noise: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and its log-prob at the sampling temperature.

    Args:
        logits: ``[B, V]`` raw logits (any float dtype; computed in float32).
        temperature: 0-d float32 tensor T (> 0 unless ``mode == "greedy"``, where it is unused).
        noise: float32 ``[B, V]`` ``Exp(1)`` draws or ``[B, 1]`` ``U[0, 1)`` draws (see
            :func:`noise_shape`; unused for greedy).
        top_p: 0-d float32 tensor (nucleus threshold; used only by ``"sample_filtered"``).
        top_k: 0-d int64 tensor (<= 0: off; used only by ``"sample_filtered"``).
        mode: ``"greedy"`` | ``"sample"`` | ``"sample_filtered"``.

    Returns:
        ``(tokens [B] int64, log_probs [B] float32)``: log-probs are
        ``log_softmax(logits / T)[token]`` of the *unfiltered* logits (T = 1 for greedy).
    """
    x = logits.float()
    if mode == GREEDY:
        scaled = x
        tokens = x.argmax(-1)
    else:
        scaled = x / temperature
        if mode == SAMPLE:
            tokens = _draw(scaled, noise)
        else:
            vocab = scaled.shape[-1]
            sorted_s, order = scaled.sort(-1, descending=True)
            ranks = torch.arange(vocab, device=scaled.device)
            k = torch.where(top_k > 0, top_k, vocab)
            sorted_s = sorted_s.masked_fill(ranks >= k, float("-inf"))  # top-k first (as HF)
            probs = torch.softmax(sorted_s, -1)
            # nucleus over the top-k set: keep while the mass *before* the token is < top_p
            # (the first token always stays)
            sorted_s = sorted_s.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
            pick = _draw(sorted_s, noise)
            tokens = order.gather(-1, pick[:, None]).squeeze(-1)
    # log_softmax(scaled)[token] without materialising [B, V] log-probs
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)


def decode_step(
    model: torch.nn.Module,
    cache: Any,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    done: torch.Tensor,
    last_pos: torch.Tensor,
    stop_mask: torch.Tensor,
    temperature: torch.Tensor,
    noise: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    cache_position: torch.Tensor | None,
    *,
    mode: str,
    pad_token_id: int,
    cache_kw: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step for ``[B]`` rows, entirely on the device (no host sync).

    Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids`` and a
            static cache (keyword ``cache_kw``).
        cache: the bucket's ``StaticCache`` (updated in place).
        tokens: ``[B]`` int64, the previous step's tokens (fed at ``positions``).
        positions: ``[B]`` int64 position ids of ``tokens``.
        attention_mask: ``[B, L]`` int64, L = the cache length (0 on prompt padding).
        done: ``[B]`` bool, rows already finished (they emit ``pad_token_id``, log-prob 0).
        last_pos: ``[B]`` int64; a row is done by length once ``positions >= last_pos``.
        stop_mask: ``[B, V]`` bool, True at each row's stop token ids.
        temperature, noise, top_p, top_k: see :func:`select_tokens`.
        cache_position: ``[1]`` int64 cache slot for transformers versions that take
            ``cache_position``; None where the cache tracks its own length.
        mode: sampling mode (graph constant).
        pad_token_id: token emitted by finished rows (graph constant).
        cache_kw: the model's keyword for the cache ("cache" or "past_key_values").

    Returns:
        ``(tokens [B] int64, log_probs [B] float32, done [B] bool)`` after this step.
    """
    kwargs = {cache_kw: cache}
    if cache_position is not None:
        kwargs["cache_position"] = cache_position
    out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                use_cache=True, **kwargs)
    new_tokens, logp = select_tokens(out.logits[:, -1], temperature, noise, top_p, top_k, mode)
    new_tokens = torch.where(done, pad_token_id, new_tokens)
    logp = torch.where(done, 0.0, logp)
    hit_stop = stop_mask.gather(1, new_tokens[:, None]).squeeze(1)
    return new_tokens, logp, done | hit_stop | (positions >= last_pos)


def make_static_cache(model: torch.nn.Module, batch: int, max_len: int, device: torch.device,
                      dtype: torch.dtype) -> Any:
    """A ``transformers.StaticCache`` of ``batch`` rows x ``max_len`` tokens for ``model``.

    Handles both constructor styles (transformers 5: ``config, max_cache_len``, allocated at
    the first update; 4.x: also ``max_batch_size``, ``device``, ``dtype``).
    """
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
    for name, value in (("max_batch_size", batch), ("batch_size", batch), ("device", device), ("dtype", dtype)):
        if name in params:
            kw[name] = value
    return StaticCache(**kw)


def _forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """(the forward's cache keyword, whether it takes ``cache_position``)."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "cache_position" in params


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """``(first, inverse)``: the index of each distinct (prompt, mask) row's first occurrence,
    in order of first occurrence, and for every row the position of its row in ``first``
    (``rows[i] == rows[first[inverse[i]]]``).

    Args:
        input_ids, attention_mask: ``[B, P]`` int64 host tensors.
    """
    keys = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    batch = keys.shape[0]
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # sorted uniques
    first = torch.full((int(inverse.max()) + 1,), batch, dtype=torch.long).scatter_reduce_(
        0, inverse, torch.arange(batch), "amin")
    order = first.argsort()  # renumber the uniques by first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return first[order].tolist(), rank[inverse].tolist()


def plain_static_layers(cache: Any) -> bool:
    """Every layer of ``cache`` a full-length ``StaticLayer`` (no sliding window, no linear /
    quantized state), i.e. a prefill computed elsewhere can be written into it with ``update``."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "StaticLayer" for layer in layers)


@dataclass
class _Slot:
    """Everything allocated once per shape bucket (static addresses for CUDA graphs)."""

    cache: Any
    mask: torch.Tensor  # [B, L] int64
    tokens: torch.Tensor  # [B] int64 (decode input)
    positions: torch.Tensor  # [B] int64
    done: torch.Tensor  # [B] bool
    last_pos: torch.Tensor  # [B] int64
    stop_mask: torch.Tensor  # [B, V] bool
    noise: torch.Tensor  # [B, V] or [B, 1] float32 (see noise_shape)
    temperature: torch.Tensor  # 0-d float32
    top_p: torch.Tensor  # 0-d float32
    top_k: torch.Tensor  # 0-d int64
    cache_position: torch.Tensor  # [1] int64
    out_tokens: torch.Tensor  # [B, max_new + graph steps] int64
    out_logp: torch.Tensor  # [B, max_new + graph steps] float32
    step_idx: torch.Tensor  # [1] int64: the column of out_tokens the next step writes
    graphs: dict  # sampling mode -> (torch.cuda.CUDAGraph of graph_steps steps, weights signature)
    # eager loop only: the decode steps' [B, 1, 1, L] bool mask, one cache column opened per step
    # (see StaticDecoder._eager_mask); None when the model builds its mask from ``mask``
    decode_mask: torch.Tensor | None = None
    next_col: int = 0  # the cache column the next eager step writes


@dataclass
class DecodeResult:
    """Output of :meth:`StaticDecoder.generate` (host tensors).

    Attributes:
        tokens: ``[B, n]`` int64, n = tokens produced per row (finished rows padded).
        log_probs: ``[B, n]`` float32 (0 after a row finished).
        aborted: the abort event ended the loop early.
        stats: ``prefill_ms``, ``decode_ms``, ``decode_steps`` (steps run, including those a
            CUDA graph ran past the last needed one), ``ms_per_step``, ``batch``, ``prefill_rows``
            (rows the prefill forward ran: the distinct prompts when they were shared).
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    aborted: bool
    stats: dict[str, float]


def _with_decode_model(fn):
    """Run ``fn`` (a :class:`StaticDecoder` method) with the model switched to grouped-query
    attention when ``self.grouped_attention`` (see :func:`use_grouped_attention`) and to fused
    q/k/v and gate/up projections when ``self.fused_projections`` (see
    :func:`use_fused_projections`), under ``torch.inference_mode`` when ``self.inference_mode``,
    else under ``torch.no_grad`` (not ``inference_mode(False)``, which turns grad mode on)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            with (torch.inference_mode() if self.inference_mode else torch.no_grad()), \
                    use_grouped_attention(self.model, self.grouped_attention), \
                    use_fused_projections(self.model, self.fused_projections):
                return fn(self, *args, **kwargs)
        finally:
            if self.device.type == "cpu":  # nothing compiled against them: do not keep the copies
                release_fused_projections(self.model)
    return wrapper


class StaticDecoder:
    """Static-KV-cache generation loop for one model (see the module docstring).

    Args:
        model: a transformers causal LM (eval mode, on its device).
        pad_token_id: token fed/emitted after a row finished and on prompt padding.
        compile: run :func:`decode_step` under ``torch.compile``.
        compile_mode: ``torch.compile`` mode ("reduce-overhead" = CUDA graphs on CUDA; with
            ``graph_steps`` > 0 on CUDA the loop records its own graphs and inductor runs without
            cudagraphs: "max-autotune" becomes "max-autotune-no-cudagraphs", others the default).
        compile_options: extra ``torch.compile`` kwargs (e.g. ``{"backend": "aot_eager"}``).
        check_every: decode steps between host checks of ``done.all()`` and the abort event
            (default: 1 eagerly on CPU, else 8).
        max_slots: shape buckets whose caches are kept (least recently used evicted); default
            16 when compiled, 1 eagerly (a new shape then reallocates, as ``generate`` does).
        grouped_attention: run the model with :mod:`slime_ray.engines.hf_attention`'s
            grouped-query attention during :meth:`generate` (GQA models with SDPA or eager
            attention; others keep theirs).
        fused_projections: run q/k/v and gate/up as one GEMM each during :meth:`generate`
            (:mod:`slime_ray.engines.hf_fused`; costs a copy of those weights in memory).
            Default: on, except for the eager loop on CPU, where the fused GEMM plus slicing is
            slower than the separate projections and the copy is refreshed at every call
            (bench/RESULTS.md, 2026-12-01: 6-8% per decode step on the tiny model and SmolLM2).
        graph_steps: decode steps per captured CUDA graph (``compile`` on CUDA only, not with
            the ``cudagraphs`` backend; 0: one cudagraph-tree replay per step with
            ``compile_mode``). ``check_every`` is then effectively rounded up to a multiple of it.
            Each graph keeps its own memory pool (one step's working set) until it is dropped
            (:meth:`release_weights`, :meth:`clear`, weights moved, bucket evicted). A pool
            shared by all graphs would be freed with the last graph using it, and a capture into
            its stale handle fails (torch's caching allocator asserts).
        share_prefill: identical rows (same prompt ids and mask: a GRPO group's samples) are
            prefilled once and their keys / values copied into each row's cache slots (as a
            prefix cache would); every row still draws its own tokens. Only for caches whose
            layers are all plain ``StaticLayer``s, and only when there are at most half as many
            distinct rows as rows (the shared path briefly holds their keys / values twice);
            otherwise every row is prefilled.

    Not thread-safe: the engine serialises calls under its lock.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        compile: bool = False,
        compile_mode: str = "reduce-overhead",
        compile_options: dict[str, Any] | None = None,
        check_every: int | None = None,
        max_slots: int | None = None,
        grouped_attention: bool = True,
        fused_projections: bool | None = None,
        graph_steps: int = 8,
        share_prefill: bool = True,
    ):
        self.model = model
        self.share_prefill = bool(share_prefill)
        self.pad_token_id = int(pad_token_id)
        # eager on CPU a host check costs nothing (no device sync) and ends the loop as soon as
        # every row is done and at an abort; elsewhere every 8 steps
        eager_cpu = not compile and next(model.parameters()).device.type == "cpu"
        self.check_every = max(1, int(check_every if check_every is not None else (1 if eager_cpu else 8)))
        # compiled: a bucket's cache is what its graph was compiled against, keep several; eager:
        # nothing depends on the addresses, keep one (unbucketed CPU calls vary in shape)
        self.max_slots = max(1, int(max_slots if max_slots is not None else (16 if compile else 1)))
        self.compile = bool(compile)
        self.grouped_attention = bool(grouped_attention)
        self.fused_projections = bool(not eager_cpu if fused_projections is None else fused_projections)
        # The eager CPU loop is bound by per-op dispatch; inference mode skips autograd's
        # version counters and view tracking there (tiny model: 0.88x the time of no_grad,
        # bench/RESULTS.md 2026-12-01). Its caches are then inference tensors, only ever touched
        # inside generate. Compiled / CUDA-graph paths keep no_grad (what they were captured under).
        self.inference_mode = eager_cpu
        # K decode steps per captured CUDA graph (compiled step, on CUDA); 0: one cudagraph-tree
        # replay per step (torch.compile's mode="reduce-overhead")
        self.graph_steps = max(0, int(graph_steps))
        self._cuda_graphs = (self.compile and self.graph_steps > 0 and self.device.type == "cuda"
                             and (compile_options or {}).get("backend") != "cudagraphs")
        self._cache_kw, self._takes_cache_position = _forward_kwargs(model)
        self._slots: OrderedDict[tuple[int, int, int], _Slot] = OrderedDict()
        self._step: Callable = decode_step
        if self.compile:
            opts = {"fullgraph": True, "dynamic": False, **(compile_options or {})}
            if "backend" not in opts or opts["backend"] == "inductor":
                if self._cuda_graphs:  # the loop captures its own graphs: inductor without cudagraphs
                    opts["mode"] = "max-autotune-no-cudagraphs" if compile_mode == "max-autotune" else None
                else:
                    opts["mode"] = compile_mode
            self._step = torch.compile(decode_step, **opts)
        self.last_stats: dict[str, float] = {}
        self.graphs_captured = 0  # CUDA graphs recorded (one per bucket and sampling mode, again if weights move)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_slots(self) -> int:
        """Shape buckets with an allocated cache."""
        return len(self._slots)

    def release_weights(self) -> None:
        """Free the fused weight copies and the captured graphs (the model's weights are about to
        move, so the graphs would be recorded again anyway); the buckets' caches and buffers stay."""
        release_fused_projections(self.model)
        for slot in self._slots.values():
            slot.graphs.clear()

    def clear(self) -> None:
        """Drop every bucket's cache and buffers and the fused weight copies (frees accelerator memory)."""
        self._slots.clear()
        release_fused_projections(self.model)

    def _slot(self, batch: int, cache_len: int, max_new: int) -> _Slot:
        extra = self.graph_steps if self._cuda_graphs else 0  # a graph may run past the last step
        cache_len += extra
        key = (batch, cache_len, max_new)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            slot.cache.reset()
            return slot
        while len(self._slots) >= self.max_slots:
            self._slots.popitem(last=False)
        dev, dtype = self.device, next(self.model.parameters()).dtype
        vocab = self.model.get_output_embeddings().weight.shape[0]
        z = lambda *shape, dt: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
        slot = _Slot(
            cache=make_static_cache(self.model, batch, cache_len, dev, dtype),
            mask=z(batch, cache_len, dt=torch.long), tokens=z(batch, dt=torch.long),
            positions=z(batch, dt=torch.long), done=z(batch, dt=torch.bool), last_pos=z(batch, dt=torch.long),
            stop_mask=z(batch, vocab, dt=torch.bool), noise=torch.ones(noise_shape(batch, vocab, dev), dtype=torch.float32, device=dev),
            temperature=torch.ones((), dtype=torch.float32, device=dev),
            top_p=torch.ones((), dtype=torch.float32, device=dev),
            top_k=z(dt=torch.long), cache_position=z(1, dt=torch.long),
            out_tokens=z(batch, max_new + extra, dt=torch.long), out_logp=z(batch, max_new + extra, dt=torch.float32),
            step_idx=z(1, dt=torch.long), graphs={},
        )
        if dev.type == "cuda" and self.compile and not self._cuda_graphs:
            # cudagraph trees: the compiled step reads these in place, no copy per graph replay
            for t in (slot.mask, slot.tokens, slot.positions, slot.done, slot.last_pos, slot.stop_mask,
                      slot.noise, slot.temperature, slot.top_p, slot.top_k, slot.cache_position, slot.step_idx):
                torch._dynamo.mark_static_address(t)
        self._slots[key] = slot
        return slot

    def _steps(self, slot: _Slot, mode: str, count: int) -> None:
        """Run ``count`` decode steps, state in ``slot`` (device work only: capturable)."""
        for _ in range(count):
            if mode != GREEDY:
                draw_noise_(slot.noise)
            if self.compile and not self._cuda_graphs and slot.mask.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: one tree replay per step
            mask = slot.mask
            if slot.decode_mask is not None:
                slot.decode_mask[..., slot.next_col] = True
                slot.next_col += 1
                mask = slot.decode_mask
            tok, logp, done = self._step(
                self.model, slot.cache, slot.tokens, slot.positions, mask, slot.done, slot.last_pos,
                slot.stop_mask, slot.temperature, slot.noise, slot.top_p, slot.top_k,
                slot.cache_position if self._takes_cache_position else None,
                mode=mode, pad_token_id=self.pad_token_id, cache_kw=self._cache_kw)
            # copy out before the next step (or replay) overwrites the step's outputs
            slot.out_tokens.index_copy_(1, slot.step_idx, tok[:, None])
            slot.out_logp.index_copy_(1, slot.step_idx, logp[:, None])
            slot.tokens.copy_(tok)
            slot.done.copy_(done)
            slot.positions.add_(1)
            slot.step_idx.add_(1)
            if self._takes_cache_position:
                slot.cache_position.add_(1)

    def _eager_mask(self, slot: _Slot, prompt_len: int) -> torch.Tensor | None:
        """The eager loop's own 4D decode mask, or None (the model builds it from ``slot.mask``).

        transformers returns a 4D mask as given (``masking_utils``), so an eager step skips
        ``create_causal_mask`` (a tenth of an eager CPU step for a small model). The mask is
        ``[B, 1, 1, L]`` bool, True = attend: the prompt's own tokens, then cache column
        ``prompt_len + i`` opened before decode step ``i`` (the column that step writes), i.e.
        SDPA's padding-and-causal mask for a one-token query. Used only uncompiled (a compiled
        step traces transformers' mask into its kernels), with every cache layer full-length
        (no sliding window) and attention that takes a boolean mask (SDPA or the grouped one).
        """
        from slime_ray.engines.hf_attention import GROUPED_ATTENTION

        impl = getattr(self.model.config, "_attn_implementation", None)
        if self.compile or impl not in ("sdpa", GROUPED_ATTENTION) or not plain_static_layers(slot.cache):
            return None
        mask = slot.mask.bool()
        mask[:, prompt_len:] = False
        return mask[:, None, None, :]

    def _weights_signature(self) -> tuple[int, ...]:
        """Addresses of the tensors a captured graph reads besides the slot's own (they move
        with ``model.to``, a re-laid-out flat buffer, ``load_state_dict(assign=True)``)."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *fused_weights(self.model)]
        return tuple(t.data_ptr() for t in tensors)

    def _graph(self, slot: _Slot, mode: str):
        """The captured graph of ``graph_steps`` steps for this bucket and mode, if still valid."""
        entry = slot.graphs.get(mode)
        if entry is not None and entry[1] == self._weights_signature():
            return entry[0]
        slot.graphs.pop(mode, None)
        return None

    def _capture(self, slot: _Slot, mode: str) -> "torch.cuda.CUDAGraph":
        """Record ``graph_steps`` decode steps into one CUDA graph (recorded, not run: the state
        in ``slot`` is as after the steps that just ran eagerly, and replays continue from it).

        The compiled step already ran with these tensors (no compile inside the capture);
        sampling noise is drawn inside the graph from torch's default CUDA generator (each
        replay advances its offset, so ``torch.manual_seed`` still fixes a call's draws)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._steps(slot, mode, self.graph_steps)
        slot.graphs[mode] = (graph, self._weights_signature())
        self.graphs_captured += 1
        return graph

    def _prefill(self, slot: _Slot, host_ids: torch.Tensor, host_mask: torch.Tensor,
                 positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Fill the slot's cache with the prompts; ``(last-position logits [B, V], rows run)``.

        With ``share_prefill`` and repeated rows, the forward runs on the distinct rows only
        (into a ``DynamicCache``) and each layer's keys / values are gathered back to ``B`` rows
        and written into the static cache at positions ``0 .. P-1``: a row's keys / values and
        logits depend on its own tokens only, so this equals prefilling every row.
        """
        batch, prompt_len = host_ids.shape
        dev = positions.device
        input_ids, prompt_mask = host_ids.to(dev), host_mask.to(dev, torch.long)
        first, inverse = (distinct_rows(host_ids.cpu(), host_mask.cpu().long())
                          if self.share_prefill and batch > 1 and plain_static_layers(slot.cache)
                          else (list(range(batch)), list(range(batch))))
        if 2 * len(first) > batch:
            # the shared path holds the distinct rows' keys / values twice (DynamicCache + static
            # cache) for the prefill: worth it only when it at least halves the prefill
            first, inverse = list(range(batch)), list(range(batch))
        cache_pos = torch.arange(prompt_len, device=dev)
        shared = len(first) < batch
        if shared:  # distinct rows into a DynamicCache; their keys / values gathered below
            from transformers import DynamicCache

            rows, gather = torch.tensor(first, device=dev), torch.tensor(inverse, device=dev)
            cache, input_ids, mask, positions = DynamicCache(), input_ids[rows], prompt_mask[rows], positions[rows]
        else:
            cache, mask = slot.cache, slot.mask
        kwargs = {self._cache_kw: cache}
        if self._takes_cache_position:
            kwargs["cache_position"] = cache_pos
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **kwargs).logits[:, -1]
        if not shared:
            return logits, batch
        for layer_idx, layer in enumerate(cache.layers):
            slot.cache.update(layer.keys.index_select(0, gather), layer.values.index_select(0, gather), layer_idx,
                              {"cache_position": cache_pos})
        return logits.index_select(0, gather), len(first)

    @torch.no_grad()
    @_with_decode_model
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: list[int],
        stop_ids: list[set[int] | list[int]],
        active: list[bool],
        cache_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        abort_event: threading.Event | None = None,
    ) -> DecodeResult:
        """Generate for ``B`` left-padded prompts sharing temperature / top_p / top_k.

        Args:
            input_ids: ``[B, P]`` int64 prompts, left-padded (any device).
            attention_mask: ``[B, P]`` int64, 1 on prompt tokens, 0 on left padding.
            max_new_tokens: per row, the most new tokens (>= 0).
            stop_ids: per row, the token ids that end it (the stop token is emitted).
            active: per row; False rows (bucket padding) are done from the start.
            cache_new_tokens: new-token capacity of the cache (the bucket; >= max(max_new_tokens)).
            temperature: <= 0 for greedy; else the sampling temperature.
            top_p: nucleus threshold (1 = off).
            top_k: top-k (<= 0 = off).
            abort_event: when set, the loop ends at its next check (every ``check_every`` steps).

        Returns:
            :class:`DecodeResult` with ``[B, n]`` host tensors, n <= max(max_new_tokens).

        Raises:
            ValueError: mismatched lengths, or ``cache_new_tokens`` < max(max_new_tokens).
        """
        batch, prompt_len = input_ids.shape
        same_rows = len(max_new_tokens) == len(stop_ids) == len(active) == batch
        if not same_rows or attention_mask.shape != input_ids.shape:
            raise ValueError("StaticDecoder.generate: per-row arguments must all have B entries")
        n_max = max(max_new_tokens)
        if n_max > cache_new_tokens:
            raise ValueError(f"StaticDecoder.generate: max_new_tokens {n_max} > cache_new_tokens {cache_new_tokens}")
        mode = sampling_mode(temperature, top_p, top_k)
        dev = self.device
        cuda = dev.type == "cuda"
        slot = self._slot(batch, prompt_len + cache_new_tokens, cache_new_tokens)
        t_start = time.perf_counter()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else []
        if cuda:
            ev[0].record()

        # ---- per-call state (in place: static addresses)
        prompt_mask = attention_mask.to(dev, torch.long)
        slot.mask.fill_(1)
        slot.mask[:, :prompt_len].copy_(prompt_mask)
        row_len = prompt_mask.sum(-1)  # [B]
        limits = torch.tensor(max_new_tokens, dtype=torch.long).to(dev)
        slot.last_pos.copy_(row_len + limits - 2)
        slot.stop_mask.zero_()
        vocab = slot.stop_mask.shape[1]
        rows = [i for i, ids in enumerate(stop_ids) for t in ids if 0 <= int(t) < vocab]
        cols = [int(t) for ids in stop_ids for t in ids if 0 <= int(t) < vocab]
        if rows:
            slot.stop_mask[torch.tensor(rows).to(dev), torch.tensor(cols).to(dev)] = True
        slot.temperature.fill_(temperature if mode != GREEDY else 1.0)
        slot.top_p.fill_(max(float(top_p), 1e-6))
        slot.top_k.fill_(int(top_k))
        slot.out_tokens.fill_(self.pad_token_id)
        slot.out_logp.zero_()
        not_active = torch.tensor([not a for a in active], dtype=torch.bool).to(dev)

        # ---- prefill (eager): fills the cache, gives token 0
        positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        last_logits, prefill_rows = self._prefill(slot, input_ids, attention_mask, positions)
        if mode != GREEDY:
            draw_noise_(slot.noise)
        tok, logp = select_tokens(last_logits, slot.temperature, slot.noise, slot.top_p, slot.top_k, mode)
        del last_logits
        tok = torch.where(not_active, self.pad_token_id, tok)
        done = not_active | slot.stop_mask.gather(1, tok[:, None]).squeeze(1) | (limits <= 1)
        slot.out_tokens[:, 0].copy_(tok)
        slot.out_logp[:, 0].copy_(torch.where(not_active, 0.0, logp))
        slot.tokens.copy_(tok)
        slot.positions.copy_(row_len)
        slot.done.copy_(done)
        slot.cache_position.fill_(prompt_len)
        slot.decode_mask = self._eager_mask(slot, prompt_len)
        slot.next_col = prompt_len
        if cuda:
            ev[1].record()
        t_prefill = time.perf_counter()

        # ---- decode loop: no host sync except every `check_every` steps
        slot.step_idx.fill_(1)
        n = 1
        aborted = False
        since_check = self.check_every  # check before the first step
        graph = self._graph(slot, mode) if self._cuda_graphs else None
        ran = 0  # decode steps run (a graph may run a few past the last needed one)
        while n < n_max:
            if since_check >= self.check_every:
                since_check = 0
                if abort_event is not None and abort_event.is_set():
                    aborted = True
                    break
                if bool(slot.done.all()):
                    break
            if self._cuda_graphs:
                if graph is not None:
                    graph.replay()
                else:  # first run of this bucket and mode (or weights moved): run the steps, then capture them
                    self._steps(slot, mode, self.graph_steps)
                    graph = self._capture(slot, mode)
                done_steps = self.graph_steps
            else:
                self._steps(slot, mode, 1)
                done_steps = 1
            n += done_steps
            ran += done_steps
            since_check += done_steps
        n = min(n, n_max)
        if cuda:
            ev[2].record()
        tokens, logps = slot.out_tokens[:, :n].cpu(), slot.out_logp[:, :n].cpu()  # the one sync
        if abort_event is not None and abort_event.is_set() and not bool(slot.done.all()):
            aborted = True
        if cuda:
            prefill_ms, decode_ms = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        else:
            prefill_ms, decode_ms = (t_prefill - t_start) * 1e3, (time.perf_counter() - t_prefill) * 1e3
        self.last_stats = {"prefill_ms": prefill_ms, "decode_ms": decode_ms, "decode_steps": float(ran),
                           "ms_per_step": decode_ms / ran if ran else 0.0, "batch": float(batch),
                           "prefill_rows": float(prefill_rows)}
        return DecodeResult(tokens, logps, aborted, dict(self.last_stats))
