"""Turn a rollout batch (Arrow table) into padded training tensors, and split it.

Notation: B samples, T = max(prompt + response) tokens, L = max response length.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch


@dataclass
class TrainBatch:
    """Padded tensors of a list of samples (right padding).

    tokens: [B, T] int64, prompt then response ids, pad 0 after.
    attention_mask: [B, T] int64, 1 on real tokens.
    prompt_lengths, response_lengths: [B] int64.
    loss_mask: [B, L] float32, the sample's loss mask (0 on tool tokens and padding).
    rollout_log_probs: [B, L] float32, the engine's log-probs (0 on padding).
    rewards: [B] float32, the reward trained on (already group-normalised for GRPO-like estimators).
    raw_rewards: [B] float32, the reward before normalisation (for logging).
    sample_index: [B] int64, ``Sample.index``.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    loss_mask: torch.Tensor
    rollout_log_probs: torch.Tensor
    rewards: torch.Tensor
    raw_rewards: torch.Tensor
    sample_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, idx: list[int] | torch.Tensor) -> "TrainBatch":
        """Rows ``idx``, with T and L trimmed to what those rows need."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        rl = self.response_lengths[idx]
        total = self.prompt_lengths[idx] + rl
        t_max = int(total.max()) if len(idx) else 0
        l_max = int(rl.max()) if len(idx) else 0
        return TrainBatch(
            tokens=self.tokens[idx, :t_max],
            attention_mask=self.attention_mask[idx, :t_max],
            prompt_lengths=self.prompt_lengths[idx],
            response_lengths=rl,
            loss_mask=self.loss_mask[idx, :l_max],
            rollout_log_probs=self.rollout_log_probs[idx, :l_max],
            rewards=self.rewards[idx],
            raw_rewards=self.raw_rewards[idx],
            sample_index=self.sample_index[idx],
        )


def batch_from_arrow(table: pa.Table) -> TrainBatch:
    """Build a :class:`TrainBatch` from a rollout table.

    The table has :data:`slime_ray.types.ROLLOUT_SCHEMA` columns plus ``train_reward``
    (float, the reward to train on) and ``raw_reward`` (float).

    Raises:
        KeyError: if ``train_reward`` is missing (the driver adds it after reward normalisation).
    """
    tokens = table.column("tokens").to_pylist()
    rlens = table.column("response_length").to_pylist()
    masks = table.column("loss_mask").to_pylist()
    lps = table.column("rollout_log_probs").to_pylist()
    b = len(tokens)
    t_max = max((len(t) for t in tokens), default=0)
    l_max = max(rlens, default=0)
    tok = torch.zeros(b, t_max, dtype=torch.long)
    att = torch.zeros(b, t_max, dtype=torch.long)
    lm = torch.zeros(b, l_max, dtype=torch.float32)
    rlp = torch.zeros(b, l_max, dtype=torch.float32)
    for i, (t, n, m, lp) in enumerate(zip(tokens, rlens, masks, lps)):
        tok[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        att[i, : len(t)] = 1
        lm[i, :n] = torch.tensor(m[:n], dtype=torch.float32)
        rlp[i, :n] = torch.tensor(lp[:n], dtype=torch.float32)
    rl = torch.tensor(rlens, dtype=torch.long)
    return TrainBatch(
        tokens=tok,
        attention_mask=att,
        prompt_lengths=torch.tensor([len(t) for t in tokens], dtype=torch.long) - rl,
        response_lengths=rl,
        loss_mask=lm,
        rollout_log_probs=rlp,
        rewards=torch.tensor(table.column("train_reward").to_pylist(), dtype=torch.float32),
        raw_rewards=torch.tensor(table.column("raw_reward").to_pylist(), dtype=torch.float32),
        sample_index=torch.tensor(table.column("index").to_pylist(), dtype=torch.long),
    )


def step_rank_indices(n: int, global_batch_size: int, step: int, rank: int, world_size: int) -> list[int]:
    """Row indices of optimizer step ``step`` that data-parallel rank ``rank`` trains on.

    Step s covers rows [s*gbs, (s+1)*gbs); rank r takes every ``world_size``-th of them
    starting at r, so ranks get equal sample counts (gbs is a multiple of world_size).
    """
    start = step * global_batch_size
    return list(range(start + rank, min(start + global_batch_size, n), world_size))


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Split ``indices`` into consecutive chunks of ``micro_batch_size``."""
    return [indices[i : i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
