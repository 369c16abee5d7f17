"""Turn a rollout batch (Arrow table) into padded training tensors, and split it.

Notation: B samples, T = max(prompt + response) tokens, L = max response length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        """Rows ``idx``, with T and L trimmed to what those rows need.

        The fields may live on different devices (on GPU the trainer keeps the lengths on the
        CPU): each is indexed where it is, so with CPU lengths this never waits for the GPU.
        """
        idx = torch.as_tensor(idx, dtype=torch.long)
        on = {idx.device: idx}

        def take(t: torch.Tensor) -> torch.Tensor:
            if t.device not in on:
                on[t.device] = index_on(idx, t.device)
            return t.index_select(0, on[t.device])

        rl = take(self.response_lengths)
        total = take(self.prompt_lengths) + rl
        t_max = int(total.max()) if len(idx) else 0
        l_max = int(rl.max()) if len(idx) else 0
        return TrainBatch(
            tokens=take(self.tokens[:, :t_max]),
            attention_mask=take(self.attention_mask[:, :t_max]),
            prompt_lengths=take(self.prompt_lengths),
            response_lengths=rl,
            loss_mask=take(self.loss_mask[:, :l_max]),
            rollout_log_probs=take(self.rollout_log_probs[:, :l_max]),
            rewards=take(self.rewards),
            raw_rewards=take(self.raw_rewards),
            sample_index=take(self.sample_index),
        )


def index_on(idx: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row indices as an int64 tensor on ``device``; to a GPU through pinned memory, without
    waiting for the GPU (a plain host-to-device copy synchronises the stream)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.device == device:
        return idx
    if device.type == "cuda" and idx.device.type == "cpu":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def batch_from_arrow(table: pa.Table) -> TrainBatch:
    """Build a :class:`TrainBatch` from a rollout table.

    The table has :data:`slime_ray.types.ROLLOUT_SCHEMA` columns plus ``train_reward``
    (float, the reward to train on) and ``raw_reward`` (float).

    Raises:
        KeyError: if ``train_reward`` is missing (the driver adds it after reward normalisation).
    """
    rl_np = _int_column(table, "response_length")
    tok_np, tlen = _padded_lists(table, "tokens", None, np.int64)
    lm_np, _ = _padded_lists(table, "loss_mask", rl_np, np.float32)
    rlp_np, _ = _padded_lists(table, "rollout_log_probs", rl_np, np.float32)
    tok, lm, rlp = torch.from_numpy(tok_np), torch.from_numpy(lm_np), torch.from_numpy(rlp_np)
    att = (torch.arange(tok.shape[1])[None, :] < torch.from_numpy(tlen)[:, None]).long()
    rlens = torch.from_numpy(rl_np)
    return TrainBatch(
        tokens=tok,
        attention_mask=att,
        prompt_lengths=torch.from_numpy(tlen) - rlens,
        response_lengths=rlens,
        loss_mask=lm,
        rollout_log_probs=rlp,
        rewards=torch.tensor(table.column("train_reward").to_pylist(), dtype=torch.float32),
        raw_rewards=torch.tensor(table.column("raw_reward").to_pylist(), dtype=torch.float32),
        sample_index=torch.from_numpy(_int_column(table, "index")),
    )


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    """An integer column as an int64 numpy array (a fresh, writable copy)."""
    return np.array(table.column(name).to_numpy(), dtype=np.int64)


def _padded_lists(table: pa.Table, name: str, lengths: np.ndarray | None,
                  dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A list column as a right-padded (zeros) [B, W] array, without Python loops over rows.

    ``lengths`` None keeps every list whole (W = the longest); else row i keeps its first
    ``lengths[i]`` values (W = max(lengths)) and must have at least that many.

    Returns:
        (padded [B, W] ``dtype``, list lengths [B] int64).
    """
    col = table.column(name)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    b = len(arr)
    if b == 0:
        return np.zeros((0, 0), dtype=dtype), np.zeros(0, dtype=np.int64)
    if arr.null_count:
        raise ValueError(f"column {name!r} has null lists")
    offsets = arr.offsets.to_numpy().astype(np.int64)  # [B+1] into arr.values (slice-aware)
    values = arr.values.to_numpy(zero_copy_only=False)
    have = offsets[1:] - offsets[:-1]
    keep = have if lengths is None else lengths
    if lengths is not None and (have < lengths).any():
        i = int(np.argmax(have < lengths))
        raise ValueError(f"column {name!r}: row {i} has {int(have[i])} values, needs {int(lengths[i])}")
    width = int(keep.max()) if b else 0
    pos = np.arange(width, dtype=np.int64)[None, :]
    valid = pos < keep[:, None]  # [B, W]
    out = np.zeros((b, width), dtype=dtype)
    out[valid] = values[(offsets[:-1, None] + pos)[valid]]
    return out, have


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
