"""The torch training backend: one instance per data-parallel rank, HF model, AdamW, gloo/NCCL.

A plain class (no Ray): :mod:`slime_ray.train.actor_group` wraps it in Ray actors, and tests
build it directly. One call of :meth:`TorchTrainer.train` does slime's actor step:
reference and old log-probs -> advantages -> ``num_steps_per_rollout`` optimizer steps over
global batches split into micro-batches.

Loss normalisation is global: every micro-batch loss is divided by the token / sample count
of the whole global batch (all micro-batches, all ranks), gradients are accumulated and
all-reduced with SUM, so the step equals one big batch (see ``aggregate_loss``).

On GPU (see :mod:`slime_ray.train.backends.torch_gpu`): fp32 master weights with bf16 compute,
FSDP2 over NCCL when there are several ranks, packed micro-batches (``--use-dynamic-batch-size
--max-tokens-per-gpu``, always packed on GPU), ``--recompute-activations``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from slime_ray.train import algorithms as algo
from slime_ray.train.backends import torch_gpu as gpu
from slime_ray.train.batch import TrainBatch, batch_from_arrow, index_on, micro_batches, step_rank_indices
from slime_ray.train.logprobs import response_log_probs_from_model_logits

logger = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "kl_loss", "entropy", "tis", "tis_clipfrac",
               "train_rollout_logprob_abs_diff")


class TorchTrainer:
    """Policy (and frozen reference) model of one training rank.

    Args:
        args: the flat namespace of :func:`slime_ray.args.parse_args` (fields used: hf_checkpoint,
            ref_load, lr, adam_*, weight_decay, clip_grad, seed, global_batch_size,
            micro_batch_size, num_steps_per_rollout, rollout_temperature, advantage_estimator,
            eps_clip*, use_kl_loss, kl_loss_coef, kl_loss_type, kl_coef, entropy_coef, gamma,
            lambd, loss_agg_mode, normalize_advantages, use_tis, tis_clip*, use_rollout_logprobs,
            torch_num_threads).
        rank, world_size: data-parallel position of this rank.
    """

    def __init__(self, args: Namespace, rank: int = 0, world_size: int = 1) -> None:
        from transformers import AutoModelForCausalLM

        self.args, self.rank, self.world_size = args, rank, world_size
        if getattr(args, "torch_num_threads", None):
            torch.set_num_threads(int(args.torch_num_threads))
        torch.manual_seed(args.seed + rank)
        self.device = gpu.train_device(rank)
        self.precision = gpu.resolve_precision(args, self.device)
        self.pack = bool(getattr(args, "use_dynamic_batch_size", False)) or self.device.type == "cuda"
        self.fsdp = False
        self.model = AutoModelForCausalLM.from_pretrained(args.hf_checkpoint, dtype=torch.float32).to(self.device)
        self.model.train()
        self.model.config.use_cache = False
        if self.pack:
            gpu.use_packed_attention(self.model)
        if getattr(args, "recompute_activations", False):
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if args.use_kl_loss or args.kl_coef != 0:
            if args.ref_load:
                self.ref_model = AutoModelForCausalLM.from_pretrained(args.ref_load, dtype=torch.float32).to(self.device)
                if self.pack:
                    gpu.use_packed_attention(self.ref_model)
            else:
                self.ref_model = copy.deepcopy(self.model)
            self.ref_model.eval().requires_grad_(False)
        self.compiled = gpu.compile_layers(self.model, getattr(args, "train_compile", "auto"), world_size)
        if self.ref_model is not None:
            gpu.compile_layers(self.ref_model, getattr(args, "train_compile", "auto"), world_size)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self._prepared: tuple[int, dict[str, Any]] | None = None  # compute_advantages -> train

    def _make_optimizer(self) -> torch.optim.Optimizer:
        a = self.args
        from slime_ray.train.backends import adamw

        return adamw(self.model.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2),
                     eps=a.adam_eps, weight_decay=a.weight_decay)

    # ------------------------------------------------------------------ distributed
    def init_distributed(self, master_addr: str, master_port: int, backend: str | None = None) -> None:
        """Join the training process group (no-op for a single rank); on GPU: NCCL + FSDP2."""
        if self.world_size == 1:
            return
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world_size,
                                **({"device_id": self.device} if self.device.type == "cuda" else {}))
        if self.device.type == "cuda":  # shard policy (and reference) over the ranks
            gpu.apply_fsdp2(self.model, self.precision)
            if self.ref_model is not None:
                gpu.apply_fsdp2(self.ref_model, self.precision)
            self.fsdp = True
            self.optimizer = self._make_optimizer()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------------ forward
    def forward_log_probs(self, model: torch.nn.Module, mb: TrainBatch,
                          with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per response token log-probs [b, L] (and entropy [b, L], nats) at the rollout temperature.

        Packed (one row, no padding) when packing is on, else the padded micro-batch; both give
        the same numbers per sample.
        """
        with gpu.autocast(self.device, self.precision):
            if self.pack:
                packed = gpu.pack_micro_batch(mb.tokens, mb.prompt_lengths, mb.response_lengths, self.device)
                return gpu.packed_forward_log_probs(model, packed, len(mb), self.args.rollout_temperature,
                                                    with_entropy, entropy_grad=bool(self.args.entropy_coef))
            # logits only from the first position that predicts a response token on (as TRL's
            # logits_to_keep): the LM head over the prompts is skipped
            start = max(int(torch.as_tensor(mb.prompt_lengths).min()) - 1, 0) if len(mb) else 0
            logits = model(input_ids=mb.tokens, attention_mask=mb.attention_mask,
                           logits_to_keep=mb.tokens.shape[1] - start).logits
        lp, ent = response_log_probs_from_model_logits(
            logits, mb.tokens[:, start:], mb.prompt_lengths - start, mb.response_lengths,
            self.args.rollout_temperature)
        return lp, (ent if with_entropy else None)

    def _step_chunks(self, batch: TrainBatch, step: int) -> list[list[int]]:
        """This rank's micro-batches (row lists) of optimizer step ``step``.

        ``--micro-batch-size`` samples each, or with ``--use-dynamic-batch-size`` at most
        ``--max-tokens-per-gpu`` tokens each, with the same count on every rank.
        """
        a = self.args
        rows = step_rank_indices(len(batch), a.global_batch_size, step, self.rank, self.world_size)
        if not getattr(a, "use_dynamic_batch_size", False):
            return micro_batches(rows, a.micro_batch_size)
        lengths = (batch.prompt_lengths + batch.response_lengths)[rows].tolist()
        chunks = gpu.token_budget_micro_batches(rows, lengths, a.max_tokens_per_gpu)
        if self.world_size > 1:  # equal counts on every rank
            k = self._all_reduce_max(len(chunks))
            if k != len(chunks):
                chunks = gpu.token_budget_micro_batches(rows, lengths, a.max_tokens_per_gpu, k)
        return chunks

    def _all_reduce_max(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    @torch.no_grad()
    def _log_probs_rows(self, model: torch.nn.Module, batch: TrainBatch, chunks: list[list[int]]) -> torch.Tensor:
        """Log-probs [B, L] for the rows in ``chunks`` of ``batch`` (other rows stay 0), no grad.

        ``chunks`` are the training micro-batches, so old log-probs are computed on exactly the
        shapes the training forward sees (ppo_kl is 0 to float precision at step 0).
        """
        out = torch.zeros_like(batch.loss_mask)
        was_training = model.training
        model.eval()
        for chunk in chunks:
            mb = batch.select(chunk)
            lp, _ = self.forward_log_probs(model, mb, with_entropy=False)
            out[:, : lp.shape[1]].index_copy_(0, index_on(chunk, out.device), lp)
        model.train(was_training)
        return out

    # ------------------------------------------------------------------ training
    def compute_advantages(self, rollout_id: int, table: pa.Table,
                           values: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Old / reference log-probs and advantages of one rollout, kept for :meth:`train`.

        Called before :meth:`train` when the returns are needed elsewhere first (PPO: the critic
        trains on them); :meth:`train` with the same ``rollout_id`` then reuses this work.

        Args:
            rollout_id: the rollout step; the result is cached under it.
            table: the whole rollout (every rank gets all rows and takes its share).
            values: [B, >= L] critic values of every response token (required for ppo).

        Returns:
            ``{"advantages": [B, L], "returns": [B, L] or None}`` float32 for the whole batch
            (each rank fills its rows, summed over ranks), 0 where the loss mask is 0.

        Raises:
            ValueError: ppo without values (from ``algorithms.compute_advantages``).
        """
        prep = self._prepare(table, values)
        self._prepared = (rollout_id, prep)
        m = torch.zeros_like(prep["batch"].loss_mask)
        m[prep["rows"]] = 1.0
        ret = prep["returns"]
        return {"advantages": self._all_reduce(prep["adv"] * m).cpu(),
                "returns": None if ret is None else self._all_reduce(ret * m).cpu()}

    def _prepare(self, table: pa.Table, values: torch.Tensor | None) -> dict[str, Any]:
        """Batch, this rank's micro-batches, old/ref log-probs, advantages and returns."""
        a = self.args
        batch = gpu.batch_to(batch_from_arrow(table), self.device)
        n, gbs = len(batch), a.global_batch_size
        step_chunks = [self._step_chunks(batch, s) for s in range(n // gbs)]
        chunks = [c for sc in step_chunks for c in sc]
        my_rows = sorted(r for c in chunks for r in c)
        if a.use_rollout_logprobs:
            old_lp = batch.rollout_log_probs.clone()
        elif self._old_is_current(n // gbs):
            old_lp = None  # each micro-batch takes its own training forward's log-probs, detached
        else:
            old_lp = self._log_probs_rows(self.model, batch, chunks)
        ref_lp = self._log_probs_rows(self.ref_model, batch, chunks) if self.ref_model is not None else None
        if values is not None:
            values = values[:, : batch.loss_mask.shape[1]].float().to(self.device)  # [B, L]
        adv, returns = algo.compute_advantages(
            a.advantage_estimator, rewards=batch.rewards, loss_mask=batch.loss_mask, log_probs=old_lp,
            ref_log_probs=ref_lp, values=values, kl_coef=a.kl_coef, kl_type=a.kl_loss_type,
            gamma=a.gamma, lam=a.lambd)
        if a.normalize_advantages:
            adv = self._whiten(adv, batch.loss_mask, my_rows)
        return {"batch": batch, "rows": my_rows, "old_lp": old_lp, "ref_lp": ref_lp, "adv": adv,
                "returns": returns, "chunks": step_chunks}

    def train(self, rollout_id: int, table: pa.Table, values: torch.Tensor | None = None) -> dict[str, float]:
        """Train on one rollout batch; returns metrics averaged over the global batch.

        Args:
            rollout_id: the rollout step (for logging; reuses :meth:`compute_advantages` of the
                same step if it was called).
            table: the whole rollout (every rank gets all rows and takes its share).
            values: [B, >= L] critic values (ppo), unless :meth:`compute_advantages` ran.

        Returns:
            ``{"train/loss", "train/pg_loss", "train/pg_clipfrac", "train/ppo_kl", "train/kl_loss",
            "train/entropy", "train/grad_norm", ...}``, identical on every rank.
        """
        cached, self._prepared = self._prepared, None
        t0 = time.perf_counter()
        prep = cached[1] if cached is not None and cached[0] == rollout_id else self._prepare(table, values)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logprob_time = time.perf_counter() - t0  # old/ref log-prob forwards + advantages
        batch = prep["batch"]
        steps = len(batch) // self.args.global_batch_size
        totals: dict[str, float] = {}
        for s in range(steps):
            step_metrics = self._optimizer_step(batch, s, prep["old_lp"], prep["ref_lp"], prep["adv"],
                                                prep["chunks"][s])
            for k, v in step_metrics.items():
                totals[k] = totals.get(k, 0.0) + v / steps
        self.step += 1
        return {**{f"train/{k}": v for k, v in totals.items()}, "perf/logprob_time": logprob_time}

    def _old_is_current(self, optimizer_steps: int) -> bool:
        """Whether the old policy's log-probs equal the training forward's own (detached).

        True with one optimizer step per rollout, when the advantages do not need the old
        log-probs (no reward-side KL: ``--kl-coef 0`` or an estimator without it) and the model has
        no dropout: every micro-batch of that step is then computed with the weights the old
        log-probs would be computed with, on the same shapes, so the separate no-grad forward
        (one full forward pass over the batch) is skipped; ``train/ppo_kl`` is 0 and the clip
        inactive, as they would be up to float rounding. TRL's GRPOTrainer and verl skip it in
        the same case; slime recomputes it.
        """
        a = self.args
        if optimizer_steps != 1 or (a.kl_coef and a.advantage_estimator in (
                "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")):
            return False
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()):
            return False
        cfg = getattr(self.model, "config", None)  # functional dropout / layer drop / router noise
        items = cfg.to_dict().items() if hasattr(cfg, "to_dict") else vars(cfg).items() if cfg is not None else ()
        return not any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                       and ("dropout" in k or "layerdrop" in k or "jitter" in k) for k, v in items)

    def _whiten(self, adv: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Masked whitening over every rank's rows (Bessel-corrected), see ``whiten_advantages``."""
        m = torch.zeros_like(mask)
        m[rows] = mask[rows]
        stats = self._all_reduce(torch.stack([(adv * m).sum(), (adv * adv * m).sum(), m.sum()]).double())
        s, ss, cnt = stats.tolist()
        mean = s / max(cnt, 1)
        var = (ss / max(cnt, 1) - mean * mean) * cnt / max(cnt - 1, 1)
        return (adv - mean) / (var + 1e-8) ** 0.5 * mask

    def _optimizer_step(self, batch: TrainBatch, step: int, old_lp: torch.Tensor,
                        ref_lp: torch.Tensor | None, adv: torch.Tensor,
                        chunks: list[list[int]] | None = None) -> dict[str, float]:
        a = self.args
        gbs = a.global_batch_size
        all_rows = list(range(step * gbs, (step + 1) * gbs))
        # one host read per step (the lengths live on the CPU); nothing below waits for the GPU
        # until the metrics are read after the optimizer step
        norm = dict(num_samples=gbs, num_tokens=float(batch.loss_mask[all_rows[0]: all_rows[-1] + 1].sum().clamp(min=1)),
                    max_len=int(batch.response_lengths[all_rows].max()))
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=self.device)
        for chunk in (chunks if chunks is not None else self._step_chunks(batch, step)):
            mb = batch.select(chunk)
            width = mb.loss_mask.shape[1]
            mask = mb.loss_mask
            rows = index_on(chunk, adv.device)

            def take(t: torch.Tensor) -> torch.Tensor:
                return t[:, :width].index_select(0, rows)

            lp, ent = self.forward_log_probs(self.model, mb)
            terms = self._loss_terms(lp, ent, lp.detach() if old_lp is None else take(old_lp), take(adv), mask,
                                     None if ref_lp is None else take(ref_lp), mb.rollout_log_probs)

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
                        "kl_loss": agg(terms["kl"]) if terms.get("kl") is not None else lp.new_zeros(()),
                        "tis": agg(terms["tis"]), "tis_clipfrac": agg(terms["tis_clipped"]),
                        "train_rollout_logprob_abs_diff": agg((lp - mb.rollout_log_probs).abs())}
                sums += torch.stack([vals[k].double() for k in METRIC_KEYS])
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if not self.fsdp and self.world_size > 1:  # FSDP2 reduce-scatters (sums) the gradients itself
                self._all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), a.clip_grad if a.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        host = torch.cat([sums, grad_norm.detach().reshape(1).to(sums)]).cpu()  # the step's one wait
        sums = self._all_reduce(host[:-1])
        out = dict(zip(METRIC_KEYS, sums.tolist()))
        out["grad_norm"] = float(host[-1])
        return out

    def _loss_terms(self, lp: torch.Tensor, ent: torch.Tensor, old: torch.Tensor, adv: torch.Tensor,
                    mask: torch.Tensor, ref: torch.Tensor | None, rollout_lp: torch.Tensor) -> dict[str, Any]:
        """Per-token policy loss (TIS-weighted), clip indicator, ppo_kl and KL to the reference."""
        a = self.args
        pg, clipped, ppo_kl = algo.POLICY_LOSSES[a.advantage_estimator](
            lp, old, adv, mask, eps_clip=a.eps_clip, eps_clip_high=a.eps_clip_high, eps_clip_c=a.eps_clip_c)
        tis = torch.ones_like(pg)
        tis_clipped = torch.zeros_like(pg)
        if a.use_tis:
            tis, _ = algo.compute_tis_weights(old, rollout_lp, mask, tis_clip=a.tis_clip, tis_clip_low=a.tis_clip_low)
            raw = torch.exp(old - rollout_lp)
            tis_clipped = ((raw > a.tis_clip) | (raw < a.tis_clip_low)).float()
            pg = pg * tis
        kl = algo.compute_approx_kl(lp, ref, a.kl_loss_type) if ref is not None else None
        return {"pg_loss": pg, "clipped": clipped, "ppo_kl": ppo_kl, "kl": kl, "tis": tis,
                "tis_clipped": tis_clipped}

    # ------------------------------------------------------------------ weights / checkpoints
    def weights_for_sync(self) -> dict[str, torch.Tensor]:
        """The policy's weights by HF name for one weight push: CPU float32 tensors that share
        memory with the live parameters when those are on the CPU (no copy), a tied
        ``lm_head.weight`` left out (engines update both names from either one).

        Valid until the next optimizer step: the caller copies them at once (``ray.put``).
        Under FSDP this gathers the shards: a collective, every rank must call it.
        """
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        for k, v in gpu.full_state_dict(self.model).items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key not in seen:  # tied parameters: one storage, several names
                seen.add(key)
                out[k] = v.detach().cpu()
        return out

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The policy's weights by HF name, detached CPU copies (float32).

        Under FSDP this gathers the shards: a collective, every rank must call it.
        """
        return {k: v.detach().to("cpu", copy=True) for k, v in gpu.full_state_dict(self.model).items()}

    def save(self, save_dir: str, rollout_id: int, extra: dict[str, Any] | None = None) -> str:
        """Write ``save_dir/iter_{rollout_id:07d}/`` (HF model, optimizer, RNG) atomically (rank 0).

        The folder is written under a temporary name and renamed, then
        ``latest_checkpointed_iteration.txt`` is replaced, so the newest complete checkpoint wins.
        ``extra`` goes to ``meta.json``; its ``"_files"`` entry (name -> bytes) is written as files
        into the folder before the rename. With ``--save-hf`` an HF folder is exported too.
        """
        from slime_ray.checkpoint import rng_state

        root = Path(save_dir)
        final = root / f"iter_{rollout_id:07d}"
        if self.rank != 0:
            return str(final)
        extra = dict(extra or {})
        files = extra.pop("_files", {})
        tmp = root / f".tmp_iter_{rollout_id:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._save_hf_folder(tmp / "model")
        torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step, "rng": rng_state()},
                   tmp / "trainer_state.pt")
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(json.dumps({"rollout_id": rollout_id, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / ".latest.tmp").write_text(str(rollout_id))
        os.replace(root / ".latest.tmp", root / "latest_checkpointed_iteration.txt")
        if getattr(self.args, "save_hf", None):
            self.export_hf(self.args.save_hf.replace("{rollout_id}", str(rollout_id)))
        return str(final)

    def _save_hf_folder(self, path: Path) -> None:
        """The policy as an HF folder (safetensors + config + the tokenizer files of --hf-checkpoint)."""
        self.model.save_pretrained(path)
        src = Path(self.args.hf_checkpoint)
        for f in src.glob("*"):
            if f.is_file() and ("token" in f.name or f.name in ("vocab.json", "merges.txt", "chat_template.jinja")):
                shutil.copy2(f, path / f.name)

    def export_hf(self, out_dir: str) -> str:
        """Write the policy to ``out_dir`` (atomically) as a folder ``AutoModelForCausalLM.from_pretrained`` loads."""
        out = Path(out_dir)
        tmp = out.with_name(f".tmp_{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_hf_folder(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return str(out)

    def load(self, ckpt_dir: str) -> dict[str, Any]:
        """Load a folder written by :meth:`save` (weights_only loading); returns its meta.json."""
        from safetensors.torch import load_file

        d = Path(ckpt_dir)
        state = {}
        for f in sorted((d / "model").glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise KeyError(f"checkpoint {d}: unexpected weights {unexpected[:5]}")
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        ts = torch.load(d / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(ts["optimizer"])
        self.step = ts["step"]
        if "rng" in ts:
            from slime_ray.checkpoint import set_rng_state

            set_rng_state(ts["rng"])
        else:
            torch.set_rng_state(ts["torch_rng"])
        return json.loads((d / "meta.json").read_text())
