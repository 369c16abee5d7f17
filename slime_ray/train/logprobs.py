"""Token log-probabilities and entropy from model logits.

Pure torch, no I/O. Every function divides the logits by the sampling temperature first and
computes in float32, whatever the model's dtype (slime: ``logits / rollout_temperature``, fp32;
the rollout engine reports log-probs of the same tempered distribution, so trainer and engine agree).

Notation: B batch, T full sequence length (prompt + response, right-padded), L response length
(padded to the longest response in the batch), V vocabulary size.

The log-prob / entropy path (:func:`log_probs_and_entropy`) is one autograd function that works
on chunks of rows: it never materialises fp32 copies of the whole [N, V] logits, keeps only the
logits (in their own dtype) and two floats per row for the backward, and computes the entropy
from the same exp pass as the logsumexp. Same formulas as the plain-autograd reference
(``entropy_from_logits`` and ``z[label] - logsumexp(z)``), equal to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch

# elements of one fp32 work buffer of the chunked log-prob path (64 Mi elements = 256 MiB)
_CHUNK_ELEMS = 1 << 26

__all__ = [
    "log_probs_and_entropy",
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
    return log_probs_and_entropy(logits, labels, temperature, with_entropy=False)[0]


def log_probs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each label and entropy of ``softmax(logits / temperature)``, fused and chunked.

    Notation: any leading shape S, V vocabulary.

    Args:
        logits: [*S, V] any float dtype (bf16 logits are read as bf16 and computed in fp32).
        labels: [*S] int token ids (``logits[s]`` predicts ``labels[s]``).
        temperature: sampling temperature (> 0).
        with_entropy: also return the entropy (else None).
        entropy_grad: the entropy is differentiable (else it is returned detached, for logging).

    Returns:
        ``(log_probs [*S], entropy [*S] or None)`` float32; log-probs differentiable w.r.t.
        ``logits``. ``log_probs = z[label] - logsumexp(z)``, ``entropy = logsumexp(z) -
        sum_v softmax(z)_v z_v`` with ``z = logits / T`` in fp32.

    Raises:
        ValueError: temperature <= 0, or shapes of logits and labels disagree.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    lp, ent = _FusedLogProbs.apply(logits, labels, float(temperature), bool(with_entropy),
                                   bool(with_entropy and entropy_grad))
    return lp, (ent if with_entropy else None)


def _tempered_chunk(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``x / T`` of one chunk (x itself when it is fp32 and T == 1)."""
    z = x.float()
    return z / temperature if temperature != 1.0 else z


def _chunk_forward(x: torch.Tensor, labels: torch.Tensor, temperature: float,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lse [n], picked z [n], entropy [n] or None) of one chunk x [n, V], all fp32.

    Same steps as ``torch.logsumexp`` (max, exp of the shifted values, sum, log, + max; an
    infinite max is replaced by 0). With T == 1 the bf16 -> fp32 conversion is fused into the
    subtraction, so no fp32 copy of x is made.
    """
    if temperature == 1.0 and x.dtype in (torch.bfloat16, torch.float16):
        z = x  # converted to fp32 inside the subtraction below (type promotion)
    else:
        z = _tempered_chunk(x, temperature)  # x itself when x is fp32 and T == 1
    m = z.amax(dim=-1, keepdim=True).float()
    m = m.masked_fill(m.abs() == float("inf"), 0.0)
    d = z - m  # fp32, a fresh buffer
    e = torch.exp(d) if with_entropy else d.exp_()
    s = e.sum(dim=-1)
    lse = s.log() + m.squeeze(-1)
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    ent = None
    if with_entropy:  # H = lse - sum(p z) = log s - sum(e d) / s   (z = d + m, sum p = 1)
        ent = s.log() - d.mul_(e).sum(dim=-1) / s
    return lse, picked, ent


class _FusedLogProbs(torch.autograd.Function):
    """logits [*S, V], labels [*S] -> (log_probs [*S], entropy [*S]) in row chunks (see module doc)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy, entropy_grad):  # noqa: ANN001, ANN205
        shape, V = logits.shape[:-1], logits.shape[-1]
        x = logits.reshape(-1, V)
        lab = labels.reshape(-1).long()
        n = x.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        lp = torch.empty(n, dtype=torch.float32, device=x.device)
        ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=x.device)
        rows = max(1, _CHUNK_ELEMS // max(V, 1))
        for a in range(0, n, rows):
            b = min(a + rows, n)
            c_lse, c_picked, c_ent = _chunk_forward(x[a:b], lab[a:b], temperature, with_entropy)
            lse[a:b] = c_lse
            lp[a:b] = c_picked - c_lse
            if with_entropy:
                ent[a:b] = c_ent
        ctx.temperature, ctx.entropy_grad, ctx.shape = temperature, entropy_grad, logits.shape
        ctx.save_for_backward(x, lab, lse, ent if entropy_grad else None)
        ctx.set_materialize_grads(False)
        lp, ent = lp.view(shape), (ent.view(shape) if with_entropy else ent)
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):  # noqa: ANN001, ANN205
        x, lab, lse, ent = ctx.saved_tensors
        T = ctx.temperature
        if g_lp is None and (g_ent is None or not ctx.entropy_grad):
            return None, None, None, None, None
        n, V = x.shape
        g_lp = g_lp.reshape(-1).float() if g_lp is not None else torch.zeros(n, dtype=torch.float32, device=x.device)
        g_ent = g_ent.reshape(-1).float() if (g_ent is not None and ctx.entropy_grad) else None
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rows = max(1, _CHUNK_ELEMS // max(V, 1))
        for a in range(0, n, rows):
            b = min(a + rows, n)
            xc, out = x[a:b], grad[a:b]
            # grad_z = g_lp (onehot - p) - g_ent p (log p + H);  grad_x = grad_z / T
            lse_c = lse[a:b, None]
            if T == 1.0 and xc.dtype == torch.float32:
                logp = torch.sub(xc, lse_c, out=out)  # worked on in the output buffer
            elif T == 1.0 and xc.dtype in (torch.bfloat16, torch.float16):
                logp = xc - lse_c  # fp32 by type promotion
            else:
                logp = _tempered_chunk(xc, T).sub_(lse_c)
            if g_ent is None:
                p = logp.exp_()
                # p - onehot, then * (-g_lp / T) on the way to the output dtype
                p.scatter_add_(-1, lab[a:b, None], torch.full((b - a, 1), -1.0, dtype=p.dtype, device=p.device))
                torch.mul(p, (g_lp[a:b] / -T)[:, None], out=out)
            else:
                p = logp.exp()
                gz = logp.add_(ent[a:b, None]).mul_(g_ent[a:b, None]).add_(g_lp[a:b, None]).mul_(p).neg_()
                gz.scatter_add_(-1, lab[a:b, None], g_lp[a:b, None])
                if T != 1.0:
                    gz.div_(T)
                out.copy_(gz)
        return grad.view(ctx.shape), None, None, None, None


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
    log_probs, entropy = log_probs_and_entropy(logits, labels, temperature)
    zero = torch.zeros((), dtype=log_probs.dtype, device=device)
    return torch.where(valid, log_probs, zero), torch.where(valid, entropy, zero)
