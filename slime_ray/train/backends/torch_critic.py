"""The torch PPO critic: one instance per data-parallel rank, value model + AdamW, gloo/NCCL.

A plain class (no Ray): :mod:`slime_ray.train.actor_group` wraps it in Ray actors (role
``"critic"``) that share the actor's bundles, as slime's critic does; tests build it directly.

The value model is the policy's architecture with a scalar head: the HF backbone of
``--hf-checkpoint`` (``AutoModel``, the LM head is dropped) and ``nn.Linear(hidden, 1)`` on
its last hidden states. The value of response token ``j`` of sample ``b`` is read at position
``p_b + j - 1``, the position whose logits predict that token (the same alignment as the
log-probs in :func:`slime_ray.train.logprobs.response_log_probs_from_model_logits`; slime's
``get_values`` slices ``[-response_length - 1 : -1]``).

Per rollout step (slime's order): :meth:`TorchCritic.compute_values` -> the actor computes GAE
advantages and returns from those values -> :meth:`TorchCritic.train` regresses the values on
the returns with the clipped value loss (``algorithms.value_loss``), normalised over the whole
global batch exactly as the actor's policy loss (``algorithms.aggregate_loss``).

Notation: B samples of the rollout, T padded full length, L padded response length, H hidden.
"""

from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from slime_ray.train import algorithms as algo
from slime_ray.train.batch import TrainBatch, batch_from_arrow, micro_batches, step_rank_indices

CRITIC_METRIC_KEYS = ("value_loss", "value_clipfrac", "values_mean")


class ValueModel(torch.nn.Module):
    """HF backbone + scalar head: ``values = head(last_hidden_state)``.

    Args:
        hf_checkpoint: a causal-LM folder; its backbone weights are loaded (``AutoModel``
            strips the LM wrapper's prefix), the head is new: weight ~ N(0, 1/(H+1)), bias 0
            (OpenRLHF's value-head init).
    """

    def __init__(self, hf_checkpoint: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(hf_checkpoint, dtype=torch.float32)
        self.backbone.config.use_cache = False
        hidden = int(self.backbone.config.hidden_size)
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] ids and mask -> [B, T] float32 values (one per position)."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.value_head(h.float()).squeeze(-1)


def response_values(all_values: torch.Tensor, prompt_lengths: torch.Tensor,
                    response_lengths: torch.Tensor) -> torch.Tensor:
    """Pick one value per response token from per-position values.

    Args:
        all_values: [B, T] values at every position.
        prompt_lengths: [B] (>= 1), response_lengths: [B] (>= 0), prompt + response <= T.

    Returns:
        [B, L] with L = max(response_lengths): ``out[b, j] = all_values[b, p_b + j - 1]`` for
        j < n_b, 0 beyond (differentiable).

    Raises:
        ValueError: a prompt length < 1 or prompt + response longer than T.
    """
    B, T = all_values.shape
    p, n = prompt_lengths.long(), response_lengths.long()
    if (p < 1).any() or (p + n > T).any():
        raise ValueError(f"prompt lengths {p.tolist()} / responses {n.tolist()} do not fit T={T}")
    L = int(n.max()) if B else 0
    j = torch.arange(L, device=all_values.device)
    pos = (p[:, None] - 1 + j[None, :]).clamp(max=T - 1)  # [B, L]
    out = all_values.gather(1, pos)
    return torch.where(j[None, :] < n[:, None], out, torch.zeros_like(out))


class TorchCritic:
    """Value model of one training rank (PPO).

    Args:
        args: the flat namespace of :func:`slime_ray.args.parse_args` (fields used:
            hf_checkpoint, critic_lr, adam_*, weight_decay, clip_grad, seed, value_clip,
            global_batch_size, micro_batch_size, loss_agg_mode, torch_num_threads).
        rank, world_size: data-parallel position of this rank (same layout as the actor's).
    """

    def __init__(self, args: Namespace, rank: int = 0, world_size: int = 1) -> None:
        self.args, self.rank, self.world_size = args, rank, world_size
        if getattr(args, "torch_num_threads", None):
            torch.set_num_threads(int(args.torch_num_threads))
        torch.manual_seed(args.seed)  # same head init on every rank
        self.model = ValueModel(args.hf_checkpoint)
        self.model.train()
        from slime_ray.train.backends import adamw

        self.optimizer = adamw(
            self.model.parameters(), lr=args.critic_lr, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps, weight_decay=args.weight_decay,
        )
        self.step = 0

    # ------------------------------------------------------------------ distributed
    def init_distributed(self, master_addr: str, master_port: int, backend: str = "gloo") -> None:
        """Join the critic's own process group (no-op for a single rank)."""
        if self.world_size == 1:
            return
        dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world_size)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _chunks(self, n: int) -> list[list[int]]:
        """This rank's micro-batches of every optimizer step (the actor's split)."""
        a = self.args
        gbs = a.global_batch_size
        return [c for s in range(n // gbs) for c in micro_batches(
            step_rank_indices(n, gbs, s, self.rank, self.world_size), a.micro_batch_size)]

    # ------------------------------------------------------------------ values
    def forward_values(self, mb: TrainBatch) -> torch.Tensor:
        """Per response token values [b, L] of a micro-batch (differentiable)."""
        v = self.model(mb.tokens, mb.attention_mask)
        return response_values(v, mb.prompt_lengths, mb.response_lengths)

    @torch.no_grad()
    def compute_values(self, table: pa.Table) -> torch.Tensor:
        """Values of every response token of the rollout, before this step's update.

        Each rank computes its own rows (the actor's split) and the rows are summed over ranks,
        so every rank returns the whole batch.

        Args:
            table: the rollout (``batch_from_arrow`` columns).

        Returns:
            [B, L] float32, 0 beyond each response (L = longest response of the table).
        """
        batch = batch_from_arrow(table)
        out = torch.zeros_like(batch.loss_mask)
        self.model.eval()
        for chunk in self._chunks(len(batch)):
            v = self.forward_values(batch.select(chunk))
            out[chunk, : v.shape[1]] = v
        self.model.train()
        return self._all_reduce(out)

    # ------------------------------------------------------------------ training
    def train(self, rollout_id: int, table: pa.Table, old_values: torch.Tensor,
              returns: torch.Tensor) -> dict[str, float]:
        """``num_steps_per_rollout`` optimizer steps of the clipped value loss.

        Args:
            rollout_id: the rollout step (for logging).
            table: the rollout (every rank gets all rows and takes its share).
            old_values: [B, L] from :meth:`compute_values` on this table (the clip anchor).
            returns: [B, L] GAE returns (targets) from the actor.

        Returns:
            ``{"critic/value_loss", "critic/value_clipfrac", "critic/values_mean",
            "critic/grad_norm"}`` averaged over the steps, identical on every rank.

        Raises:
            ValueError: old_values / returns are not [B, >= L].
        """
        batch = batch_from_arrow(table)
        n, width = batch.loss_mask.shape
        for name, t in (("old_values", old_values), ("returns", returns)):
            if t.shape[0] != n or t.shape[1] < width:
                raise ValueError(f"{name} is {tuple(t.shape)}, expected [{n}, >= {width}]")
        steps = n // self.args.global_batch_size
        totals: dict[str, float] = {}
        for s in range(steps):
            for k, v in self._optimizer_step(batch, s, old_values.float(), returns.float()).items():
                totals[k] = totals.get(k, 0.0) + v / steps
        self.step += 1
        return {f"critic/{k}": v for k, v in totals.items()}

    def _optimizer_step(self, batch: TrainBatch, step: int, old_values: torch.Tensor,
                        returns: torch.Tensor) -> dict[str, float]:
        a = self.args
        gbs = a.global_batch_size
        all_rows = list(range(step * gbs, (step + 1) * gbs))
        norm = dict(num_samples=gbs, num_tokens=float(batch.loss_mask[all_rows].sum().clamp(min=1)),
                    max_len=int(batch.response_lengths[all_rows].max()))
        rows = step_rank_indices(len(batch), gbs, step, self.rank, self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(CRITIC_METRIC_KEYS), dtype=torch.float64)
        for chunk in micro_batches(rows, a.micro_batch_size):
            mb = batch.select(chunk)
            w = mb.loss_mask.shape[1]
            mask, old, ret = mb.loss_mask, old_values[chunk, :w], returns[chunk, :w]
            values = self.forward_values(mb)
            per_token = algo.value_loss(values, old, ret, a.value_clip)

            def agg(x: torch.Tensor) -> torch.Tensor:
                return algo.aggregate_loss(x, mask, a.loss_agg_mode, **norm)

            loss = agg(per_token)
            loss.backward()
            with torch.no_grad():
                clipped = (per_token > (values - ret).square()).float()
                sums += torch.tensor([float(loss), float(agg(clipped)), float(agg(values))],
                                     dtype=torch.float64)
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), a.clip_grad if a.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        out = dict(zip(CRITIC_METRIC_KEYS, self._all_reduce(sums).tolist()))
        out["grad_norm"] = float(grad_norm)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, save_dir: str, rollout_id: int, extra: dict[str, Any] | None = None) -> str:
        """Write ``save_dir/iter_{rollout_id:07d}/critic.pt`` (value model + optimizer) atomically (rank 0)."""
        final = Path(save_dir) / f"iter_{rollout_id:07d}"
        if self.rank != 0:
            return str(final)
        tmp = Path(save_dir) / f".tmp_iter_{rollout_id:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step}, tmp / "critic.pt")
        (tmp / "meta.json").write_text(json.dumps({"rollout_id": rollout_id, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (Path(save_dir) / "latest_checkpointed_iteration.txt").write_text(str(rollout_id))
        return str(final)

    def load(self, ckpt_dir: str) -> dict[str, Any]:
        """Load a folder written by :meth:`save`; returns its meta.json."""
        state = torch.load(Path(ckpt_dir) / "critic.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        return json.loads((Path(ckpt_dir) / "meta.json").read_text())

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The value model's weights, detached CPU copies."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
