"""The Megatron-core training backend (``--train-backend megatron``): tensor parallelism on a GPTModel.

One :class:`MegatronTrainer` per training rank, same methods as
:class:`~slime_ray.train.backends.torch_backend.TorchTrainer` (whose RL step it reuses: old/ref
log-probs -> advantages -> one optimizer step per global batch). What differs:

- the model is a Megatron-core ``GPTModel`` built from the HF config of ``--hf-checkpoint``
  (Llama / Qwen2 / Qwen3 / Mistral: RMSNorm, SwiGLU, RoPE, GQA, tied or untied embeddings,
  Qwen3 qk-layernorm, Qwen2 qkv bias), local layer spec (Transformer Engine spec when TE is
  importable and CUDA is available), weights converted by
  :mod:`slime_ray.train.backends.megatron_convert`;
- ranks form ``tensor-model-parallel-size`` x data-parallel groups
  (``parallel_state.initialize_model_parallel``); each TP group trains the same rows;
- log-probs / entropy come from vocab-parallel logits (:mod:`.vocab_parallel`), never gathered;
- optimizer: plain ``torch.optim.AdamW`` over the local parameters, gradients all-reduced (SUM)
  over the data-parallel group, gradient norm computed over TP shards (Megatron's DDP and
  distributed optimizer are CUDA-only and not used).

Megatron is imported only in this module (lazily); :func:`check_megatron_available` lets the
driver refuse ``--train-backend megatron`` before allocating anything.

Not supported yet: pipeline / context / expert parallelism, sequence parallelism, MoE, rope
scaling, bf16/fp16 mixed precision (parameters are fp32), Megatron-format checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
from argparse import Namespace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from slime_ray.train import algorithms as algo
from slime_ray.train.backends import megatron_convert as conv
from slime_ray.train.backends.torch_backend import METRIC_KEYS, TorchTrainer
from slime_ray.train.backends.vocab_parallel import response_log_probs_vocab_parallel
from slime_ray.train.batch import TrainBatch

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'slime_ray[megatron]'"


def check_megatron_available() -> None:
    """Raise ImportError (naming the extra to install) when megatron-core is not importable.

    Call it in the driver before creating placement groups or actors for ``--train-backend megatron``.
    """
    try:
        found = importlib.util.find_spec("megatron") is not None and \
            importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(f"--train-backend megatron needs megatron-core, which is not installed: "
                          f"run `{INSTALL_HINT}` (or pick --train-backend torch)")


def parallel_sizes(megatron_args: Mapping[str, Any], world_size: int) -> tuple[int, int, int]:
    """``(tp, pp, dp)`` from ``args.megatron_args`` and the number of training ranks.

    Raises:
        ValueError: tp*pp does not divide world_size; NotImplementedError: pp, cp or ep > 1.
    """
    tp = int(megatron_args.get("tensor-model-parallel-size", 1))
    pp = int(megatron_args.get("pipeline-model-parallel-size", 1))
    for flag in ("pipeline-model-parallel-size", "context-parallel-size", "expert-model-parallel-size"):
        if int(megatron_args.get(flag, 1)) != 1:
            raise NotImplementedError(f"--{flag} > 1 is not supported by the megatron backend yet")
    if megatron_args.get("sequence-parallel"):
        raise NotImplementedError("--sequence-parallel is not supported by the megatron backend yet")
    if world_size % (tp * pp):
        raise ValueError(f"{world_size} training ranks are not a multiple of "
                         f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}")
    return tp, pp, world_size // (tp * pp)


def model_spec(megatron_args: Mapping[str, Any], hf_config: Any, tp: int) -> conv.ModelSpec:
    """The Megatron spec of an HF config, checked against ``MODEL_ARGS`` and split ``tp`` ways.

    Called by the driver before any resource is taken (``job.prepare_inputs``) and by each rank.

    Raises:
        ValueError: a ``MODEL_ARGS`` value that contradicts the HF config (the field is named), or a
            size that ``tp`` does not divide; NotImplementedError: a model family or feature the
            converter does not handle (rope scaling, MLP biases, non-SwiGLU, MoE).
    """
    conv.check_model_args(megatron_args, hf_config)
    divisible = int(megatron_args.get("make-vocab-size-divisible-by", 128))
    spec = conv.ModelSpec.from_hf_config(hf_config, divisible, tp)
    spec.check_tp(tp)
    return spec


def _patch_for_cpu() -> None:
    """Let Megatron-core's forward run without CUDA (no-op when CUDA is available).

    Two patches: ``torch.cuda.current_device`` (queried by RoPE and attention) answers the CPU
    device, and the CUDA RNG tracker is replaced by Megatron's inference tracker, whose
    ``fork()`` is a no-op (dropout is 0 in RL training, so no RNG stream is needed).
    """
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def transformer_config(spec: conv.ModelSpec, megatron_args: Mapping[str, Any]):  # noqa: ANN201
    """A Megatron ``TransformerConfig`` for ``spec`` (fp32 params, no dropout, no fusions on CPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels, normalization="RMSNorm", layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_layernorm,
        tensor_model_parallel_size=int(megatron_args.get("tensor-model-parallel-size", 1)),
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        use_cpu_initialization=not cuda, perform_initialization=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    )


def _layer_spec(spec: conv.ModelSpec):  # noqa: ANN202
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if torch.cuda.is_available() and getattr(specs, "HAVE_TE", False):
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")


def build_gpt_model(spec: conv.ModelSpec, megatron_args: Mapping[str, Any]) -> torch.nn.Module:
    """An (uninitialised) ``GPTModel`` of this rank's TP shard; ``parallel_state`` must be set up."""
    from megatron.core.models.gpt import GPTModel

    _patch_for_cpu()
    model = GPTModel(
        config=transformer_config(spec, megatron_args), transformer_layer_spec=_layer_spec(spec),
        vocab_size=spec.padded_vocab_size, max_sequence_length=spec.max_position_embeddings,
        pre_process=True, post_process=True, parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_embeddings, position_embedding_type="rope",
        rotary_base=int(spec.rotary_base), rotary_percent=1.0,
    )
    return model.cuda() if torch.cuda.is_available() else model


class LazyHFState(Mapping):
    """Read-only mapping HF name -> tensor over a checkpoint folder, loading tensors on demand.

    Reads ``*.safetensors`` (lazily, one tensor at a time) or ``pytorch_model*.bin`` (whole file).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self._files: dict[str, Any] = {}
        self._eager: dict[str, torch.Tensor] = {}
        folder = Path(folder)
        for f in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            for k in handle.keys():
                self._files[k] = handle
        if not self._files:
            for f in sorted(folder.glob("pytorch_model*.bin")):
                self._eager.update(torch.load(f, map_location="cpu", weights_only=True))
        if not self._files and not self._eager:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._eager:
            return self._eager[key]
        return self._files[key].get_tensor(key).float()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._files) + list(self._eager))

    def __len__(self) -> int:
        return len(self._files) + len(self._eager)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], spec: conv.ModelSpec,
                    tp_rank: int, tp_size: int) -> None:
    """Copy HF weights into this rank's ``GPTModel`` shard, one parameter at a time.

    Raises:
        KeyError: a model parameter has no conversion or an HF tensor is missing.
    """
    for name, param in model.named_parameters():
        full = conv.hf_to_megatron_param(name, hf_state, spec)
        shard = conv.shard_param(name, full, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: converted shard {tuple(shard.shape)} != parameter {tuple(param.shape)}")
        param.copy_(shard.to(param.dtype))


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] bool, True where attention is masked (Megatron's convention)."""
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MegatronTrainer(TorchTrainer):
    """Policy (and frozen reference) ``GPTModel`` shard of one training rank.

    Args:
        args: the flat namespace of :func:`slime_ray.args.parse_args` (the fields TorchTrainer
            uses, plus ``megatron_args`` and ``update_weight_buffer_size``).
        rank, world_size: global position among the training ranks. Ranks ``[k*tp, (k+1)*tp)``
            form TP group k (= data-parallel rank k).

    The model is built in :meth:`init_distributed` (Megatron needs its process groups first);
    a single rank that never calls it gets a private one-process gloo group on first use.
    After construction ``self.rank`` / ``self.world_size`` are the data-parallel coordinates
    (what the inherited RL step splits rows by); the global ones are ``global_rank`` /
    ``global_world_size``.

    Raises:
        ImportError: megatron-core is missing (message names the extra).
        ValueError / NotImplementedError: parallel sizes or model family not supported.
    """

    def __init__(self, args: Namespace, rank: int = 0, world_size: int = 1) -> None:
        from transformers import AutoConfig

        check_megatron_available()
        self.args = args
        self.global_rank, self.global_world_size = rank, world_size
        self.megatron_args = dict(getattr(args, "megatron_args", None) or {})
        self.tp, _, self.dp = parallel_sizes(self.megatron_args, world_size)
        self.rank, self.world_size = rank // self.tp, self.dp  # data-parallel coordinates
        self.tp_rank = rank % self.tp
        if getattr(args, "torch_num_threads", None):
            torch.set_num_threads(int(args.torch_num_threads))
        self.hf_config = AutoConfig.from_pretrained(args.hf_checkpoint)
        self.spec = model_spec(self.megatron_args, self.hf_config, self.tp)
        self.model = self.ref_model = self.optimizer = None
        self.step = 0
        self._prepared = None  # TorchTrainer.compute_advantages -> train cache
        # attributes the inherited RL step reads: fp32 padded micro-batches, no FSDP
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.precision, self.pack, self.fsdp = None, False, False
        self._tp_group = self._dp_group = None

    # ------------------------------------------------------------------ distributed
    def init_distributed(self, master_addr: str, master_port: int, backend: str | None = None) -> None:
        """Join the process group, set up Megatron's TP/DP groups, build and load the models."""
        from megatron.core import parallel_state as ps

        if not dist.is_initialized():
            # CPU tensors (metrics, grad-norm pieces) travel on gloo, CUDA tensors on NCCL
            backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                    rank=self.global_rank, world_size=self.global_world_size)
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=1)
        if torch.cuda.is_available():  # Megatron's CUDA RNG tracker needs its model-parallel stream
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(self.args.seed)
        if ps.get_tensor_model_parallel_rank() != self.tp_rank or ps.get_data_parallel_rank() != self.rank:
            raise RuntimeError("Megatron's rank layout differs from rank // tp, rank % tp")
        self._tp_group = ps.get_tensor_model_parallel_group()
        self._dp_group = ps.get_data_parallel_group()
        self._build_models()

    def _ensure_initialized(self) -> None:
        if self.model is None:
            if self.global_world_size != 1:
                raise RuntimeError("call init_distributed(addr, port) on every rank first")
            self.init_distributed("127.0.0.1", _free_port())

    def _build_models(self) -> None:
        a = self.args
        torch.manual_seed(a.seed + self.global_rank)
        self.model = build_gpt_model(self.spec, self.megatron_args)
        load_hf_weights(self.model, LazyHFState(a.hf_checkpoint), self.spec, self.tp_rank, self.tp)
        self.model.train()
        if a.use_kl_loss or a.kl_coef != 0:
            self.ref_model = build_gpt_model(self.spec, self.megatron_args)
            load_hf_weights(self.ref_model, LazyHFState(a.ref_load or a.hf_checkpoint), self.spec,
                            self.tp_rank, self.tp)
            self.ref_model.eval().requires_grad_(False)
        from slime_ray.train.backends import adamw

        self.optimizer = adamw(
            self.model.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2),
            eps=a.adam_eps, weight_decay=a.weight_decay)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """SUM over the data-parallel group (TP ranks hold replicated metrics already)."""
        if self.dp > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._dp_group)
        return t

    # ------------------------------------------------------------------ forward
    def forward_log_probs(self, model: torch.nn.Module, mb: TrainBatch,
                          with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per response token log-probs [b, L] (and entropy [b, L]) from vocab-parallel logits."""
        dev = self.device
        tokens = mb.tokens.to(dev)
        b, t = tokens.shape
        pos = torch.arange(t, device=dev).unsqueeze(0).expand(b, t)
        logits = model(tokens, pos, attention_mask=causal_mask(t, dev))  # [b, T, Vp/tp]
        vocab_start = self.tp_rank * (self.spec.padded_vocab_size // self.tp)
        lp, ent = response_log_probs_vocab_parallel(
            logits, tokens, mb.prompt_lengths, mb.response_lengths, vocab_start, self.spec.vocab_size,
            self.args.rollout_temperature, self._tp_group if self.tp > 1 else None, with_entropy)
        return lp, ent

    # ------------------------------------------------------------------ training
    def compute_advantages(self, rollout_id: int, table: Any, values: torch.Tensor | None = None) -> dict:
        """See :meth:`TorchTrainer.compute_advantages` (rows split by data-parallel rank)."""
        self._ensure_initialized()
        return super().compute_advantages(rollout_id, table, values)

    def train(self, rollout_id: int, table: Any, values: torch.Tensor | None = None) -> dict[str, float]:
        """Train on one rollout batch (see :meth:`TorchTrainer.train`); identical metrics on every rank."""
        self._ensure_initialized()
        return super().train(rollout_id, table, values)

    def _grad_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's gradient: TP-sharded parameters summed over the TP group."""
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for name, p in self.model.named_parameters():
            sq = p.grad.detach().double().pow(2).sum().cpu()
            # by name: Megatron only tags ``tensor_model_parallel`` when it initialises weights
            if conv.partition_kind(name) != "replicated":
                sharded += sq
            else:
                replicated += sq
        if self.tp > 1:
            dist.all_reduce(sharded, op=dist.ReduceOp.SUM, group=self._tp_group)
        return (sharded + replicated).sqrt()

    def _optimizer_step(self, batch: TrainBatch, step: int, old_lp: torch.Tensor,
                        ref_lp: torch.Tensor | None, adv: torch.Tensor,
                        chunks: list[list[int]] | None = None) -> dict[str, float]:
        """TorchTrainer's step with a TP-aware gradient norm (same losses and normalisation)."""
        a = self.args
        gbs = a.global_batch_size
        all_rows = list(range(step * gbs, (step + 1) * gbs))
        norm = dict(num_samples=gbs, num_tokens=float(batch.loss_mask[all_rows].sum().clamp(min=1)),
                    max_len=int(batch.response_lengths[all_rows].max()))
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        for chunk in (chunks if chunks is not None else self._step_chunks(batch, step)):
            sums += self._micro_batch_backward(batch.select(chunk), chunk, old_lp, ref_lp, adv, norm)
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._all_reduce(p.grad)
        grad_norm = self._grad_norm()
        if a.clip_grad > 0:
            coef = (a.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0)
            for p in self.model.parameters():
                p.grad.mul_(coef.to(p.grad.dtype).to(p.grad.device))
        self.optimizer.step()
        out = dict(zip(METRIC_KEYS, self._all_reduce(sums).tolist()))
        out["grad_norm"] = float(grad_norm)
        return out

    def _micro_batch_backward(self, mb: TrainBatch, chunk: list[int], old_lp: torch.Tensor,
                              ref_lp: torch.Tensor | None, adv: torch.Tensor, norm: dict) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its METRIC_KEYS sums (float64)."""
        a = self.args
        width, mask = mb.loss_mask.shape[1], mb.loss_mask
        lp, ent = self.forward_log_probs(self.model, mb)
        old = lp.detach() if old_lp is None else old_lp[chunk, :width]  # None: see TorchTrainer._old_is_current
        terms = self._loss_terms(lp, ent, old, adv[chunk, :width], mask,
                                 None if ref_lp is None else ref_lp[chunk, :width], mb.rollout_log_probs)

        def agg(x: torch.Tensor) -> torch.Tensor:
            return algo.aggregate_loss(x, mask, a.loss_agg_mode, **norm)

        loss = agg(terms["pg_loss"])
        if a.entropy_coef:
            loss = loss - a.entropy_coef * agg(ent)
        if terms.get("kl") is not None and a.use_kl_loss:
            loss = loss + a.kl_loss_coef * agg(terms["kl"])
        loss.backward()
        with torch.no_grad():
            vals = {"loss": loss, "pg_loss": agg(terms["pg_loss"]), "pg_clipfrac": agg(terms["clipped"]),
                    "ppo_kl": agg(terms["ppo_kl"]), "entropy": agg(ent),
                    "kl_loss": agg(terms["kl"]) if terms.get("kl") is not None else torch.tensor(0.0),
                    "tis": agg(terms["tis"]), "tis_clipfrac": agg(terms["tis_clipped"]),
                    "train_rollout_logprob_abs_diff": agg((lp - mb.rollout_log_probs).abs())}
            return torch.tensor([float(vals[k]) for k in METRIC_KEYS], dtype=torch.float64)

    # ------------------------------------------------------------------ weights / checkpoints
    def _gather_tp(self, name: str, shard: torch.Tensor) -> list[torch.Tensor]:
        if self.tp == 1 or conv.partition_kind(name) == "replicated":
            return [shard]
        parts = [torch.empty_like(shard) for _ in range(self.tp)]
        dist.all_gather(parts, shard.detach().contiguous(), group=self._tp_group)
        return parts

    def iter_weight_buckets(self, buffer_size: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named weights in buckets of about ``buffer_size`` bytes (default
        ``--update-weight-buffer-size``); collective over the TP group (every TP rank must iterate)."""
        self._ensure_initialized()
        size = int(buffer_size or getattr(self.args, "update_weight_buffer_size", 512 * 1024**2))
        params = ((conv.local_name(n), p) for n, p in self.model.named_parameters())
        yield from conv.iter_hf_buckets(params, self.spec, size, self._gather_tp)

    def weights_for_sync(self) -> dict[str, torch.Tensor]:
        """What an object-store weight push sends: :meth:`get_weights` (HF names, TP shards
        gathered; a collective), not TorchTrainer's views of the local (Megatron-named) parameters."""
        return self.get_weights()

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights by HF name, CPU float32 copies (no ``lm_head`` when tied).

        Collective over the TP group: with tp > 1 every rank of (at least) one TP group must call it.
        """
        out: dict[str, torch.Tensor] = {}
        for bucket in self.iter_weight_buckets():
            out.update(bucket)
        return out

    def save(self, save_dir: str, rollout_id: int, extra: dict[str, Any] | None = None) -> str:
        """Write ``save_dir/iter_{rollout_id:07d}/``: HF weights folder, per-rank optimizer state.

        Collective: every rank must call it. Rank 0 writes the HF folder (and ``extra`` as in
        :meth:`TorchTrainer.save`, ``"_files"`` included) under a temporary name, every rank adds
        ``trainer_state_rank{r}.pt``, then rank 0 renames the folder and replaces
        ``latest_checkpointed_iteration.txt``.
        """
        from slime_ray.checkpoint import rng_state

        self._ensure_initialized()
        root = Path(save_dir)
        final, tmp = root / f"iter_{rollout_id:07d}", root / f".tmp_iter_{rollout_id:07d}"
        weights = self.get_weights()
        if self.global_rank == 0:
            extra = dict(extra or {})
            files = extra.pop("_files", {})
            shutil.rmtree(tmp, ignore_errors=True)
            self._write_hf_folder(weights, tmp / "model")
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            (tmp / "meta.json").write_text(json.dumps({"rollout_id": rollout_id, **extra}))
        self._barrier()
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "rng": rng_state()},
                   tmp / f"trainer_state_rank{self.global_rank}.pt")
        self._barrier()
        if self.global_rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (root / ".latest.tmp").write_text(str(rollout_id))
            os.replace(root / ".latest.tmp", root / "latest_checkpointed_iteration.txt")
        self._barrier()
        if getattr(self.args, "save_hf", None):
            self.export_hf(self.args.save_hf.replace("{rollout_id}", str(rollout_id)))
        return str(final)

    def _write_hf_folder(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        """HF folder: model.safetensors + config / generation config / tokenizer files of --hf-checkpoint."""
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        for f in Path(self.args.hf_checkpoint).glob("*"):
            if f.is_file() and (f.suffix in (".json", ".txt", ".jinja", ".model") and "index" not in f.name):
                shutil.copy2(f, path / f.name)

    def export_hf(self, out_dir: str) -> str:
        """Write the policy to ``out_dir`` as an HF folder (collective; rank 0 writes, atomically)."""
        weights = self.get_weights()
        out = Path(out_dir)
        if self.global_rank == 0:
            tmp = out.with_name(f".tmp_{out.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            self._write_hf_folder(weights, tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        self._barrier()
        return str(out)

    def load(self, ckpt_dir: str) -> dict[str, Any]:
        """Load a folder written by :meth:`save` (same parallel layout); returns its meta.json."""
        self._ensure_initialized()
        d = Path(ckpt_dir)
        load_hf_weights(self.model, LazyHFState(d / "model"), self.spec, self.tp_rank, self.tp)
        from slime_ray.checkpoint import set_rng_state

        ts = torch.load(d / f"trainer_state_rank{self.global_rank}.pt", weights_only=True)
        self.optimizer.load_state_dict(ts["optimizer"])
        self.step = ts["step"]
        set_rng_state(ts["rng"])
        return json.loads((d / "meta.json").read_text())

    def _barrier(self) -> None:
        if self.global_world_size > 1:
            dist.barrier()
