"""HFEngine: the embedded transformers rollout engine (CPU or one GPU).

Implements :class:`slime_ray.engines.base.RolloutEngine` (``model.generate`` semantics):

- one ``generate`` call per group of requests that share ``temperature / top_p / top_k``
  (requests with a ``seed`` run alone, so their output does not depend on what they were
  batched with), left padding with an attention mask;
- per-row stopping (model EOS ids + the request's ``stop_token_ids``, ``max_new_tokens``,
  ``stop`` strings, abort) through one :class:`transformers.StoppingCriteria` that returns a
  ``[B]`` bool tensor, so a finished row stops early while the others go on;
- per-token log-probs from the *raw* logits (``output_logits=True``) at the sampling
  temperature, ``log_softmax(logits / T)[token]`` (T=1 for greedy), so they equal a trainer
  forward pass on prompt + response with the logits divided by T;
- the decode loop is by default the engine's own (:mod:`slime_ray.engines.hf_decode`: a
  static KV cache, one step doing forward + sampling + log-prob + stop checks on the device,
  host checks every few steps, repeated prompts prefilled once) instead of ``generate``, for
  every model transformers can run with a static cache; requests with stop *strings* still go
  through ``generate``;
- on CUDA by default (``compile``) that step is compiled (``torch.compile``, 8 steps per CUDA
  graph), with batch / prompt length / new tokens padded to a few shape buckets so varying
  RL batches compile once per bucket (:mod:`slime_ray.engines.hf_compile`); on CPU it runs
  eagerly (``--rollout-compile true`` compiles it there too).

Text stays consistent with token ids: ``text = decode(output_ids)`` (the stop string and the
EOS token are kept, like slime's ``no_stop_trim=True``; special tokens are skipped in text).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import torch

from slime_ray.engines.base import RolloutEngine, default_sampling_params
from slime_ray.engines.hf_compile import (
    ShapeBuckets,
    compile_generate_kwargs,
    dynamo_graph_count,
    parse_batch_buckets,
    raise_recompile_limit,
    resolve_compile,
)
from slime_ray.engines.hf_decode import StaticDecoder
from slime_ray.engines.offload import HostOffload
from slime_ray.sync.buckets import copy_into
from slime_ray.train.logprobs import log_probs_from_logits

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _apply_torch_threads() -> None:
    """``torch.set_num_threads`` from env ``SLIME_RAY_TORCH_THREADS`` when it is set."""
    n = os.environ.get("SLIME_RAY_TORCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


class _RowStopper:
    """Per-row stopping criterion for ``model.generate`` (returns a ``[B]`` bool tensor).

    A row is done once it emitted one of its stop token ids, reached its own
    ``max_new_tokens``, or its decoded output contains one of its stop strings. Every row is
    done once ``abort_event`` is set.
    """

    def __init__(self, rows: list[dict[str, Any]], prompt_len: int, tokenizer, abort_event):
        self.rows = rows
        self.prompt_len = prompt_len
        self.tokenizer = tokenizer
        self.abort_event = abort_event

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        batch, total = input_ids.shape
        if self.abort_event.is_set():
            return torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        n_new = total - self.prompt_len
        last = input_ids[:, -1].tolist()
        done = []
        for i, row in enumerate(self.rows):
            if row.get("padding"):  # a bucket's padding row: done from the start
                done.append(True)
                continue
            stop = last[i] in row["stop_ids"] or n_new >= row["max_new_tokens"]
            if not stop and row["stop"]:
                text = self.tokenizer.decode(input_ids[i, self.prompt_len :], skip_special_tokens=True)
                stop = any(s in text for s in row["stop"])
            done.append(stop)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFEngine(RolloutEngine):
    """Embedded transformers engine: batched sampling with log-probs and weight updates.

    Args:
        model_path: an HF folder (``AutoModelForCausalLM`` + tokenizer).
        dtype: "float32" | "bfloat16" | "float16" (weights and logits).
        device: torch device string ("cpu", "cuda", "cuda:0").
        seed: seeds torch's RNG at start (unseeded requests draw from it afterwards).
        eos_token_ids: ids that end a response for every request; default: the model's
            ``generation_config.eos_token_id`` (or the tokenizer's eos).
        compile: static KV cache + ``torch.compile`` of the decode step ("auto"/None: on for
            CUDA, off on CPU).
        bucket: pad calls to shape buckets (default: same as ``compile``).
        batch_buckets: batch buckets, e.g. "8,32,64,128,256" (default) or a list of ints.
        compile_mode: ``torch.compile`` mode ("reduce-overhead" = CUDA graphs).
        decode_loop: "auto" (the static-cache loop of :mod:`slime_ray.engines.hf_decode` when
            ``compile`` is on, or when transformers gives the model a static cache
            (``_can_compile_fullgraph``) whose layers are all full-length attention; else
            ``generate``), "static" (that loop, compiled only
            with ``compile``), "generate" (transformers ``generate``). Calls with stop strings
            always use ``generate``.

    Raises:
        ValueError: unknown ``dtype`` or ``decode_loop``.

    Attributes:
        weight_version: version of the loaded weights (0 = as loaded from ``model_path``).
        max_batch_size_seen: largest number of requests one :meth:`generate` call received.
        num_generate_calls: number of :meth:`generate` calls served.
        buckets_seen: the (batch, cache length) shapes the model ran with (bucketed or not).
        num_compilations: graphs dynamo compiled during this engine's ``generate`` calls.
        decode_loop: "static" or "generate" (resolved from the argument).
        last_decode_stats: timings of the last static-loop chunk (``prefill_ms``,
            ``decode_ms``, ``decode_steps``, ``ms_per_step``, ``batch``); empty before one.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        eos_token_ids: list[int] | None = None,
        compile: bool | str | None = None,
        bucket: bool | None = None,
        batch_buckets: str | list[int] | None = None,
        compile_mode: str = "reduce-overhead",
        decode_loop: str = "auto",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        _apply_torch_threads()
        if dtype not in _DTYPES:
            raise ValueError(f"HFEngine: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype])
        self.model.to(self.device).eval()
        if eos_token_ids is None:
            eos = self.model.generation_config.eos_token_id
            if eos is None:
                eos = self.tokenizer.eos_token_id
            eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos_token_ids = [int(e) for e in eos_token_ids]
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])
        # A clean generation config: the model's own defaults (repetition penalty, top-k, ...)
        # must not leak into rollouts, or log-probs would no longer match the trainer.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_token_ids or None, pad_token_id=self.pad_token_id
        )
        self.compile = resolve_compile(compile, self.device)
        self.buckets = ShapeBuckets(parse_batch_buckets(batch_buckets)) if (
            self.compile if bucket is None else bucket) else None
        self._compile_kwargs = compile_generate_kwargs(compile_mode) if self.compile else {}
        if self.compile:
            raise_recompile_limit()
        if decode_loop not in ("auto", "static", "generate"):
            raise ValueError(f"HFEngine: decode_loop must be auto/static/generate, got {decode_loop!r}")
        # auto: the static loop wherever transformers says the model runs with a static cache
        # (``_can_compile_fullgraph``), compiled or not; it is also the faster loop eagerly on CPU
        # (no logits processors, one prefill per distinct prompt; bench/RESULTS.md, 2026-12-01)
        static_ok = bool(getattr(self.model, "_can_compile_fullgraph", False)) and self._plain_static_cache()
        self.decode_loop = "static" if decode_loop == "static" or (
            decode_loop == "auto" and (self.compile or static_ok)) else "generate"
        self._decoder = StaticDecoder(self.model, pad_token_id=self.pad_token_id, compile=self.compile,
                                      compile_mode=compile_mode) if self.decode_loop == "static" else None
        self.last_decode_stats: dict[str, float] = {}
        self.buckets_seen: set[tuple[int, int]] = set()
        self.num_compilations = 0
        self.weight_version = 0
        self.max_batch_size_seen = 0
        self.num_generate_calls = 0
        self._lock = threading.Lock()  # generate vs update_weights: never interleaved
        self._flat_layout = None  # slime_ray.sync.receiver.FlatLayout of the last bucket plan
        self._offload = HostOffload()  # where release_memory puts the weights (host buffers kept)
        self._abort = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def _plain_static_cache(self) -> bool:
        """The model's static cache is full-length attention in every layer (no sliding-window,
        linear-attention or state-space layers, which the loop is not tested with uncompiled)."""
        from slime_ray.engines.hf_decode import make_static_cache, plain_static_layers

        try:
            probe = make_static_cache(self.model, 1, 8, self.device, next(self.model.parameters()).dtype)
        except Exception:  # noqa: BLE001 - a model transformers cannot give a static cache
            return False
        return plain_static_layers(probe)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate for a batch of requests (fields: see :mod:`slime_ray.engines.base`).

        Blocks while the engine is paused. Requests are grouped by (temperature, top_p,
        top_k); a request with ``sampling_params["seed"]`` runs alone after
        ``torch.manual_seed(seed)`` so it is reproducible whatever it is batched with.

        Returns:
            One response dict per request, in order: ``text``, ``output_ids`` (list[int]),
            ``output_log_probs`` (list[float], log-prob at the sampling temperature; empty
            when ``return_logprob`` is false), ``finish_reason`` ("stop" if the response
            ends on a stop/EOS token, which is included, or on a stop string; "length";
            "abort"), ``weight_version``, ``prompt_tokens``, ``completion_tokens``.

        Raises:
            ValueError: a request with neither ``input_ids`` nor ``text``, or an empty prompt.
            RuntimeError: the weights were released (:meth:`release_memory`) and not taken
                back (:meth:`resume_memory`).
        """
        if not requests:
            return []
        self._running.wait()
        rows = [self._normalize(r) for r in requests]
        with self._lock:
            if self._offload.offloaded:
                raise RuntimeError("HFEngine.generate: the weights are in host memory (release_memory, "
                                   "--offload-rollout); call resume_memory before generating")
            self._abort.clear()
            self.num_generate_calls += 1
            self.max_batch_size_seen = max(self.max_batch_size_seen, len(rows))
            out: list[dict[str, Any] | None] = [None] * len(rows)
            for idx in self._groups(rows):
                group = [rows[i] for i in idx]
                for i, resp in zip(idx, self._generate_group(group)):
                    out[i] = resp
        return out  # type: ignore[return-value]

    def _normalize(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request -> an internal row with resolved ids and sampling params."""
        sp = default_sampling_params(**(request.get("sampling_params") or {}))
        if request.get("input_ids") is not None:
            ids = [int(t) for t in request["input_ids"]]
        elif request.get("text") is not None:
            ids = self.tokenizer.encode(request["text"])
        else:
            raise ValueError("HFEngine.generate: a request needs 'input_ids' or 'text'")
        if not ids:
            raise ValueError("HFEngine.generate: empty prompt")
        stop = sp["stop"]
        return {
            "ids": ids,
            "temperature": float(sp["temperature"]),
            "top_p": float(sp["top_p"]),
            "top_k": int(sp["top_k"]),
            "seed": sp["seed"],
            "max_new_tokens": int(sp["max_new_tokens"]),
            "stop": [stop] if isinstance(stop, str) else list(stop or []),
            "stop_ids": set(self.eos_token_ids) | set(sp["stop_token_ids"] or []),
            "return_logprob": bool(request.get("return_logprob", True)),
        }

    @staticmethod
    def _groups(rows: list[dict[str, Any]]) -> list[list[int]]:
        """Indices grouped by sampling params; seeded rows each form their own group."""
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            key = ("seed", i) if r["seed"] is not None else (r["temperature"], r["top_p"], r["top_k"])
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _generate_group(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows sharing temperature / top_p / top_k: one ``generate`` call (per bucket chunk)."""
        if self.buckets is None:
            return self._generate_chunk(rows)
        out: list[dict[str, Any]] = []
        for chunk in self.buckets.chunks(len(rows)):
            out.extend(self._generate_chunk([rows[i] for i in chunk]))
        return out

    def _pad_to_bucket(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
        """(rows + padding rows, prompt length, max new tokens) of the call's shape bucket."""
        prompt_len = max(len(r["ids"]) for r in rows)
        max_new = max(r["max_new_tokens"] for r in rows)
        if self.buckets is None:
            return rows, prompt_len, max_new
        pad_rows = [{**rows[0], "padding": True}] * (self.buckets.batch(len(rows)) - len(rows))
        return rows + pad_rows, self.buckets.prompt_len(prompt_len), self.buckets.new_tokens(max_new)

    @torch.no_grad()
    def _generate_chunk(self, real_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One static-loop or ``model.generate`` call for rows sharing temperature / top_p / top_k."""
        from transformers import StoppingCriteriaList

        if self._abort.is_set():
            return self._with_texts([self._response(r, [], [], "abort") for r in real_rows])
        if max(r["max_new_tokens"] for r in real_rows) <= 0:
            return self._with_texts([self._response(r, [], [], "length") for r in real_rows])
        rows, prompt_len, max_new = self._pad_to_bucket(real_rows)
        temp, top_p, top_k, seed = rows[0]["temperature"], rows[0]["top_p"], rows[0]["top_k"], rows[0]["seed"]
        greedy = temp <= 0.0
        input_ids = torch.full((len(rows), prompt_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), prompt_len), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            input_ids[i, prompt_len - len(r["ids"]) :] = torch.tensor(r["ids"])
            attention_mask[i, prompt_len - len(r["ids"]) :] = 1
        if seed is not None:
            torch.manual_seed(int(seed))
        self.buckets_seen.add((len(rows), prompt_len + max_new))
        graphs_before = dynamo_graph_count()
        if self._decoder is not None and not any(r["stop"] for r in real_rows):
            res = self._decoder.generate(
                input_ids, attention_mask,
                max_new_tokens=[0 if r.get("padding") else r["max_new_tokens"] for r in rows],
                stop_ids=[r["stop_ids"] for r in rows], active=[not r.get("padding") for r in rows],
                cache_new_tokens=max_new, temperature=temp, top_p=top_p, top_k=top_k, abort_event=self._abort)
            self.num_compilations += dynamo_graph_count() - graphs_before
            self.last_decode_stats = res.stats
            aborted = res.aborted or self._abort.is_set()
            tokens, logps = res.tokens.tolist(), res.log_probs.tolist()
            return self._with_texts([self._finish(r, tokens[i], logps[i], aborted) for i, r in enumerate(real_rows)])
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            do_sample=not greedy,
            temperature=1.0 if greedy else temp,
            top_p=top_p,
            top_k=top_k if top_k > 0 else 0,
            max_new_tokens=max_new,
            eos_token_id=self.eos_token_ids or None,
            pad_token_id=self.pad_token_id,
            stopping_criteria=StoppingCriteriaList(
                [_RowStopper(rows, prompt_len, self.tokenizer, self._abort)]
            ),
            output_logits=True,
            return_dict_in_generate=True,
            **self._compile_kwargs,
        )
        self.num_compilations += dynamo_graph_count() - graphs_before
        n = len(real_rows)
        new_ids = out.sequences[:n, prompt_len:]  # [B, S], on the model's device
        scale = 1.0 if greedy else temp
        # log_softmax(raw logits / T)[token], one step at a time on the device (a [B, S, V]
        # float copy of all logits would not fit in host memory for large batches).
        # the trainer's formula (z[t] - logsumexp(z), no [B, V] log-softmax per step)
        logp = torch.stack([log_probs_from_logits(step[:n], new_ids[:, s], scale)
                            for s, step in enumerate(out.logits)], dim=1).cpu()  # [B, S]
        new_ids = new_ids.cpu()
        aborted = self._abort.is_set()
        tokens, logps = new_ids.tolist(), logp.tolist()
        return self._with_texts([self._finish(r, tokens[i], logps[i], aborted) for i, r in enumerate(real_rows)])

    def _finish(self, row: dict[str, Any], ids: list[int], lps: list[float], aborted: bool) -> dict:
        """Cut one row's output at its first stop (token, string) or its max_new_tokens."""
        limit = min(len(ids), row["max_new_tokens"])
        stop_ids = row["stop_ids"]
        k = next((k for k, t in enumerate(ids[:limit]) if t in stop_ids), None) if stop_ids else None
        if k is not None:
            return self._response(row, ids[: k + 1], lps[: k + 1], "stop")
        if row["stop"]:
            text = self.tokenizer.decode(ids[:limit], skip_special_tokens=True)
            if any(s in text for s in row["stop"]):
                for k in range(1, limit + 1):
                    text = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
                    if any(s in text for s in row["stop"]):
                        return self._response(row, ids[:k], lps[:k], "stop")
        if limit >= row["max_new_tokens"]:
            return self._response(row, ids[:limit], lps[:limit], "length")
        # Neither stopped nor at the limit: generation was cut short by abort.
        reason = "abort" if aborted else "length"
        return self._response(row, ids[:limit], lps[:limit], reason)

    def _with_texts(self, outs: list[dict]) -> list[dict]:
        """Fill every response's ``text`` in one call: the Rust tokenizer's ``decode_batch``
        (rows decoded in parallel) where transformers' ``batch_decode`` would do nothing more
        (no ``clean_up_tokenization_spaces``), else ``batch_decode``. (256 rows x 256 tokens:
        ~12 ms vs ~30 ms for ``batch_decode``, most of it in its per-token type checks.)"""
        if outs:
            ids = [o["output_ids"] for o in outs]
            backend = getattr(self.tokenizer, "_tokenizer", None)
            if backend is not None and hasattr(backend, "decode_batch") and not getattr(
                    self.tokenizer, "clean_up_tokenization_spaces", False):
                texts = backend.decode_batch(ids, skip_special_tokens=True)
            else:
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for o, text in zip(outs, texts):
                o["text"] = text
        return outs

    def _response(self, row: dict[str, Any], ids: list[int], lps: list[float], reason: str) -> dict:
        """One response dict; ``text`` is filled by :meth:`_with_texts`."""
        return {
            "text": None,
            "output_ids": list(ids),  # Python ints / floats already (from Tensor.tolist)
            "output_log_probs": list(lps) if row["return_logprob"] else [],
            "finish_reason": reason,
            "weight_version": self.weight_version,
            "prompt_tokens": len(row["ids"]),
            "completion_tokens": len(ids),
        }

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: dict[str, torch.Tensor], weight_version: int) -> None:
        """Copy ``named_tensors`` (HF names -> tensors, any device/dtype) into the model.

        Strict on the given names (a subset of the state dict is fine, e.g. one bucket);
        every name and shape is checked before anything is copied, so a bad call leaves the
        weights untouched. Tied embeddings: ``lm_head.weight`` and the input embedding share
        storage, so sending either one updates both (sending both requires equal values).
        Waits for an in-flight ``generate``.

        Raises:
            KeyError: a name the model does not have (the unknown names are listed).
            ValueError: a tensor whose shape differs from the model's, or tied names sent
                with different values.
        """
        names = list(named_tensors)
        with self._lock, torch.no_grad():  # the state dict under the lock: a running static loop swaps modules
            state = self.model.state_dict()
            self._check_names_shapes(state, {n: tuple(t.shape) for n, t in named_tensors.items()})
            self._check_tied(state, named_tensors)
            copy_into([state[n] for n in names], [named_tensors[n] for n in names])
            self.weight_version = int(weight_version)

    def update_weights_in_place(self, metas: list, fill: Callable[[list[torch.Tensor]], None],
                                weight_version: int, device: torch.device | str | None = None) -> bool:
        """Zero-copy update: ``fill`` writes the new values straight into the parameters.

        On the first call with a bucket plan (or after the layout was lost, e.g. by a
        ``model.to``), names and shapes are checked as in :meth:`update_weights`, then
        the parameters are re-laid out as one flat buffer per bucket
        (:class:`slime_ray.sync.receiver.FlatLayout`; tied embeddings stay one storage). Later
        calls with the same plan reuse those buffers (no allocation, no copy). Holds the lock
        that :meth:`generate` takes, so no generation sees half-written weights.

        Args:
            metas: the bucket plan, a list of :class:`slime_ray.sync.buckets.BucketMeta`.
            fill: called once with ``buffers``: ``buffers[j]`` is 1-D, ``metas[j].numel``
                elements of ``metas[j]``'s dtype on the engine's device, laid out as
                ``metas[j]`` (names in order, each flattened); it must overwrite every element
                (e.g. one broadcast per buffer).
            weight_version: set once ``fill`` returned.
            device: where the buffers must be (the transport's device); default: anywhere.

        Returns:
            True when ``fill`` ran and the version was set; False when the model cannot be laid
            out for this plan (the plan's dtype differs from the model's, tied names both in the
            plan, weights not on ``device``) or the weights are released
            (:meth:`release_memory`): then nothing ran and the caller uses :meth:`update_weights`.

        Raises:
            KeyError: a name of the plan the model does not have.
            ValueError: a shape of the plan that differs from the model's.
            whatever ``fill`` raises (weights then partly written, version unchanged).
        """
        from slime_ray.sync.receiver import FlatLayout

        metas = tuple(metas)
        with self._lock, torch.no_grad():
            if self._offload.offloaded:  # a layout built on the host copies would be lost at the retake
                return False
            lay = self._flat_layout
            if lay is None or lay.metas != metas or not lay.valid():
                self._flat_layout = None
                self._check_names_shapes(self.model.state_dict(),
                                         {n: s for m in metas for n, s in zip(m.names, m.shapes)})
                lay = FlatLayout.build(self.model, metas, device)
                if lay is None:
                    return False
                self._flat_layout = lay
            fill(lay.buffers)
            self.weight_version = int(weight_version)
        return True

    @staticmethod
    def _check_names_shapes(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
        """KeyError for names the model lacks, ValueError for shapes that differ (up to 10 listed)."""
        unknown = sorted(set(shapes) - set(state))
        if unknown:
            raise KeyError(f"HFEngine.update_weights: unknown parameter names {unknown[:10]}")
        bad = [
            f"{n}: got {tuple(s)}, model has {tuple(state[n].shape)}"
            for n, s in shapes.items()
            if tuple(s) != tuple(state[n].shape)
        ]
        if bad:
            raise ValueError(f"HFEngine.update_weights: shape mismatch: {'; '.join(bad[:10])}")

    @staticmethod
    def _check_tied(state: dict[str, torch.Tensor], named_tensors: dict[str, torch.Tensor]) -> None:
        """Names that share storage (tied embeddings) must not be sent with different values."""
        by_storage: dict[int, str] = {}
        for name in named_tensors:
            ptr = state[name].data_ptr()
            other = by_storage.setdefault(ptr, name)
            if other != name and not torch.equal(named_tensors[other], named_tensors[name]):
                raise ValueError(
                    f"HFEngine.update_weights: {other} and {name} are tied (one tensor) "
                    "but were sent with different values"
                )

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the state dict (HF names -> tensors; tied names share values)."""
        with self._lock:
            return {n: t.detach().to("cpu", copy=True) for n, t in self.model.state_dict().items()}

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """New :meth:`generate` calls block until :meth:`resume`; in-flight ones finish."""
        self._running.clear()

    def resume(self) -> None:
        """Unblock :meth:`generate` after :meth:`pause`."""
        self._running.set()

    def flush_cache(self) -> None:
        """No cross-request cache here (the KV cache lives only inside one generate call)."""

    def abort(self, abort_all: bool = True) -> None:
        """End the in-flight :meth:`generate` early: unfinished rows return finish "abort"."""
        self._abort.set()

    def _weight_tensors(self) -> list[torch.Tensor]:
        """Parameters, buffers and the flat sync layout's buffers: every tensor on the weights' storages."""
        from slime_ray.sync.receiver import model_tensors

        tensors = list(model_tensors(self.model).values())
        if self._flat_layout is not None:
            tensors += self._flat_layout.tensors()
        return tensors

    def release_memory(self) -> None:
        """Free accelerator memory (no-op on CPU): the weights go to host memory (pinned, one
        copy per storage, :class:`slime_ray.engines.offload.HostOffload`), the static loop's
        fused weight copies and captured CUDA graphs are dropped. Its KV caches (one per shape
        bucket seen) stay allocated: they are what its compiled step was compiled against, and
        new cache tensors would mean a recompile per bucket after every release. The flat
        layout the sync receives into survives (same buckets, new storages after the retake)."""
        if self.device.type != "cpu":
            with self._lock:
                if self._offload.offloaded:
                    return
                if self._flat_layout is not None and not self._flat_layout.valid():
                    self._flat_layout = None  # stale buffers: not worth a copy, the next sync re-lays out
                if self._decoder is not None:
                    self._decoder.release_weights()  # fused copies and graphs; the KV caches stay
                self._offload.offload(self._weight_tensors())
                torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Move the weights back to the engine's device (no-op on CPU or when not released).

        Raises:
            torch.OutOfMemoryError: the device cannot hold them yet; they stay in host memory
                and a later call can try again."""
        if self.device.type != "cpu":
            with self._lock:
                self._offload.onload()

    def health(self) -> dict[str, Any]:
        """``{"ok", "weight_version", "paused", "released", "max_batch_size_seen",
        "num_generate_calls", "compile", "decode_loop", "num_buckets_seen", "num_compilations"}``
        (``released``: the weights are in host memory, :meth:`release_memory`)."""
        return {
            "ok": True,
            "weight_version": self.weight_version,
            "paused": not self._running.is_set(),
            "released": self._offload.offloaded,
            "max_batch_size_seen": self.max_batch_size_seen,
            "num_generate_calls": self.num_generate_calls,
            "compile": self.compile,
            "decode_loop": self.decode_loop,
            "num_buckets_seen": len(self.buckets_seen),
            "num_compilations": self.num_compilations,
        }
