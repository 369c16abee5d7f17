"""Token log-probabilities and entropy from model logits.

Pure torch, no I/O. Every function divides the logits by the sampling temperature first and
computes in float32, whatever the model's dtype (slime: ``logits / rollout_temperature``, fp32;
the rollout engine reports log-probs of the same tempered distribution, so trainer and engine agree).

Notation: B batch, T full sequence length (prompt + response, right-padded), L response length
(padded to the longest response in the batch), V vocabulary size.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "log_probs_from_logits",
    "entropy_from_logits",
    "response_log_probs_from_model_logits",
]


def _tempered_fp32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Notation: B batch, L positions, V vocabulary.

    Args:
        logits: [B, L, V] any float dtype; ``logits[b, t]`` is the distribution that predicts
            ``labels[b, t]`` (already shifted by the caller).
        labels: [B, L] int64 token ids.
        temperature: sampling temperature (> 0); logits are divided by it before the softmax.

    Returns:
        [B, L] float32 log-probs (nats), differentiable w.r.t. ``logits``.
        Computed as ``z[label] - logsumexp(z)`` with ``z = logits / T`` in fp32.

    Raises:
        ValueError: temperature <= 0, or shapes of logits and labels disagree.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    z = _tempered_fp32(logits, temperature)
    picked = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` at each position.

    Notation: B batch, L positions, V vocabulary.

    Args:
        logits: [B, L, V] any float dtype.
        temperature: sampling temperature (> 0).

    Returns:
        [B, L] float32, ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` with ``z = logits / T``
        (slime's formula; differentiable).

    Raises:
        ValueError: temperature <= 0.
    """
    z = _tempered_fp32(logits, temperature)
    probs = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)


def response_log_probs_from_model_logits(
    full_logits: torch.Tensor,
    tokens: torch.Tensor,
    prompt_lengths: torch.Tensor | Sequence[int],
    response_lengths: torch.Tensor | Sequence[int],
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of the response tokens of a right-padded batch.

    Notation: B batch, T padded full length, V vocabulary, L = max(response_lengths).

    Response token ``j`` of sample ``b`` sits at position ``p_b + j`` (``p_b`` its prompt length)
    and is predicted by the logits at position ``p_b + j - 1``: exactly one log-prob per response
    token, the first one coming from the last prompt position.

    Args:
        full_logits: [B, T, V] the model's output on ``tokens`` (no shift applied).
        tokens: [B, T] int64 prompt + response ids, right-padded.
        prompt_lengths: [B] prompt length of each sample (>= 1).
        response_lengths: [B] response length of each sample (>= 0).
        temperature: rollout temperature (> 0).

    Returns:
        ``(log_probs, entropy)``, each [B, L] float32, 0 beyond each sample's response.
        Both are differentiable w.r.t. ``full_logits``.

    Raises:
        ValueError: shapes disagree, a prompt length < 1, or prompt + response longer than T.
    """
    B, T, V = full_logits.shape
    if tokens.shape != (B, T):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match logits {(B, T, V)}")
    device = full_logits.device
    p = torch.as_tensor(prompt_lengths, device=device).long().reshape(-1)
    n = torch.as_tensor(response_lengths, device=device).long().reshape(-1)
    if p.numel() != B or n.numel() != B:
        raise ValueError(f"need {B} prompt and response lengths, got {p.numel()} and {n.numel()}")
    if (p < 1).any():
        raise ValueError(f"prompt lengths must be >= 1 (no logits predict token 0): {p.tolist()}")
    if (n < 0).any() or (p + n > T).any():
        raise ValueError(
            f"prompt + response lengths {(p + n).tolist()} exceed the sequence length T={T}"
        )
    L = int(n.max().item()) if B > 0 else 0
    j = torch.arange(L, device=device)
    valid = j[None, :] < n[:, None]  # [B, L]
    pred_pos = (p[:, None] - 1 + j[None, :]).clamp(max=T - 1)  # [B, L] logits positions
    label_pos = (pred_pos + 1).clamp(max=T - 1)  # [B, L] response-token positions
    logits = full_logits.gather(1, pred_pos.unsqueeze(-1).expand(B, L, V))  # [B, L, V]
    labels = tokens.gather(1, label_pos)  # [B, L]
    log_probs = log_probs_from_logits(logits, labels, temperature)
    entropy = entropy_from_logits(logits, temperature)
    zero = torch.zeros((), dtype=log_probs.dtype, device=device)
    return torch.where(valid, log_probs, zero), torch.where(valid, entropy, zero)
