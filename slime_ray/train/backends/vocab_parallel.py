"""Log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds the logits of its vocabulary slice ``[start, start + V_local)``.
The softmax statistics are combined with all-reduces over the TP group: MAX of the row maxima
(a constant shift, no gradient), then SUM of ``exp(z - max)``, of the picked label logit and of
``exp(z - max) * z``. Same semantics as :mod:`slime_ray.train.logprobs` (temperature-scaled,
fp32): with one rank the results equal ``log_probs_from_logits`` / ``entropy_from_logits``.

The SUM reductions are "all-reduce forward, identity backward" (Megatron's
``reduce_from_tensor_model_parallel_region``): the loss after them is replicated on every TP rank
and each rank back-propagates only into its own vocabulary slice, which is exactly the gradient
of one copy of the loss.

Notation: B batch, L positions, V vocabulary (unpadded), V_local this rank's logits columns.
Pure torch + torch.distributed; no Megatron import.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "vocab_parallel_log_probs_and_entropy",
    "response_log_probs_vocab_parallel",
]


class _ReduceSumIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return grad, None


def _reduce_sum(x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _ReduceSumIdentityBackward.apply(x, group)


def vocab_parallel_log_probs_and_entropy(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    temperature: float = 1.0,
    group=None,  # noqa: ANN001
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-prob of ``labels`` and entropy of ``softmax(logits / T)`` over all ranks.

    Args:
        local_logits: [B, L, V_local] any float dtype, this rank's vocabulary columns
            ``[vocab_start, vocab_start + V_local)``; columns at or beyond ``vocab_size``
            (Megatron's vocabulary padding) are ignored.
        labels: [B, L] int64 global token ids (< vocab_size).
        vocab_start: global id of this rank's first column.
        vocab_size: the true (unpadded) vocabulary size V.
        temperature: sampling temperature (> 0).
        group: the tensor-parallel process group (``None`` = single rank, no communication).
        with_entropy: also compute the entropy (one more all-reduce).

    Returns:
        ``(log_probs, entropy)`` each [B, L] float32 (nats; entropy ``None`` unless asked),
        differentiable w.r.t. ``local_logits``. Identical on every rank of ``group``.

    Raises:
        ValueError: temperature <= 0 or shapes disagree.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if local_logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(local_logits.shape)} do not match labels {tuple(labels.shape)}")
    n_valid = max(0, min(local_logits.shape[-1], vocab_size - vocab_start))
    z = local_logits[..., :n_valid].float() / temperature  # [B, L, V_valid]
    if n_valid > 0:
        local_max = z.detach().max(dim=-1).values
    else:
        local_max = torch.full(labels.shape, torch.finfo(torch.float32).min, device=z.device)
    m = local_max.clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = (z - m.unsqueeze(-1)).exp()  # [B, L, V_valid]
    sum_exp = _reduce_sum(e.sum(dim=-1), group)  # [B, L]
    lse = m + sum_exp.log()  # [B, L]
    local_ids = labels.long() - vocab_start
    mine = (local_ids >= 0) & (local_ids < n_valid)
    picked_local = z.gather(-1, local_ids.clamp(0, max(n_valid - 1, 0)).unsqueeze(-1)).squeeze(-1) \
        if n_valid > 0 else torch.zeros_like(lse)
    picked = _reduce_sum(torch.where(mine, picked_local, torch.zeros_like(picked_local)), group)
    log_probs = picked - lse
    entropy = None
    if with_entropy:
        # E_p[z] = sum(e * z) / sum(e): both sums are reductions of local terms, so everything
        # after them is replicated (writing it with p = exp(z - lse) would make the local term
        # depend on the replicated lse, and identity-backward would drop the other ranks' share).
        weighted = _reduce_sum((e * z).sum(dim=-1), group)  # [B, L]
        entropy = lse - weighted / sum_exp
    return log_probs, entropy


def response_log_probs_vocab_parallel(
    local_logits: torch.Tensor,
    tokens: torch.Tensor,
    prompt_lengths: torch.Tensor | Sequence[int],
    response_lengths: torch.Tensor | Sequence[int],
    vocab_start: int,
    vocab_size: int,
    temperature: float = 1.0,
    group=None,  # noqa: ANN001
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response-token log-probs and entropy of a right-padded batch from vocab-parallel logits.

    Same positions as :func:`slime_ray.train.logprobs.response_log_probs_from_model_logits`:
    response token ``j`` of sample ``b`` sits at ``p_b + j`` and is predicted by the logits at
    ``p_b + j - 1``.

    Args:
        local_logits: [B, T, V_local] this rank's vocabulary slice of the model output.
        tokens: [B, T] int64 prompt + response ids, right-padded.
        prompt_lengths, response_lengths: [B] (prompt lengths >= 1).
        vocab_start, vocab_size, temperature, group, with_entropy: see
            :func:`vocab_parallel_log_probs_and_entropy`.

    Returns:
        ``(log_probs, entropy)`` each [B, L] float32, L = max(response_lengths), 0 beyond each
        sample's response (entropy ``None`` unless asked).

    Raises:
        ValueError: shapes disagree, a prompt length < 1, or prompt + response longer than T.
    """
    B, T, V = local_logits.shape
    if tokens.shape != (B, T):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match logits {(B, T, V)}")
    dev = local_logits.device
    p = torch.as_tensor(prompt_lengths, device=dev).long().reshape(-1)
    n = torch.as_tensor(response_lengths, device=dev).long().reshape(-1)
    if (p < 1).any():
        raise ValueError(f"prompt lengths must be >= 1: {p.tolist()}")
    if (n < 0).any() or (p + n > T).any():
        raise ValueError(f"prompt + response lengths {(p + n).tolist()} exceed T={T}")
    L = int(n.max().item()) if B > 0 else 0
    j = torch.arange(L, device=dev)
    valid = j[None, :] < n[:, None]  # [B, L]
    pred_pos = (p[:, None] - 1 + j[None, :]).clamp(max=T - 1)  # [B, L]
    label_pos = (pred_pos + 1).clamp(max=T - 1)
    logits = local_logits.gather(1, pred_pos.unsqueeze(-1).expand(B, L, V))  # [B, L, V_local]
    labels = tokens.gather(1, label_pos)  # [B, L]
    lp, ent = vocab_parallel_log_probs_and_entropy(
        logits, labels, vocab_start, vocab_size, temperature, group, with_entropy)
    zero = torch.zeros((), dtype=lp.dtype, device=dev)
    lp = torch.where(valid, lp, zero)
    ent = torch.where(valid, ent, zero) if ent is not None else None
    return lp, ent
