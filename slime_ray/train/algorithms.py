"""RL post-training algorithms: loss masks, reward normalisation, advantages, KL, policy and
value losses, importance weights, loss aggregation.

Pure torch functions on tensors and scalars: no Ray, no config objects, no I/O. Formulas follow
slime (``slime/utils/ppo_utils.py``, ``backends/megatron_utils/loss.py``, ``ray/rollout.py``);
where a peer (verl, OpenRLHF, TRL) differs, the docstring says so. docs/algorithms.md has the
tables of loss-aggregation modes, estimators and KL types with hand-checked numbers.

Notation used in every docstring: B batch (samples), L response length (padded), N number of
samples in a reward vector, m loss mask, A advantage, r = pi/pi_old ratio,
Δ = log_probs - ref_log_probs.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_TYPES",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "aggregate_loss",
    "compute_advantages",
    "compute_approx_kl",
    "compute_cispo_loss",
    "compute_gspo_loss",
    "compute_policy_loss",
    "compute_tis_weights",
    "discounted_returns",
    "gae",
    "group_advantages",
    "normalize_rewards",
    "response_loss_mask",
    "value_loss",
    "whiten_advantages",
]

KL_TYPES = ("k1", "k2", "k3", "low_var_kl")
LOSS_AGG_MODES = (
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
ADVANTAGE_ESTIMATORS = (
    "grpo",
    "gspo",
    "cispo",
    "ppo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "rloo",
)


# --------------------------------------------------------------------------- loss mask


def response_loss_mask(
    response_ids: torch.Tensor,
    eos_token_ids: Iterable[int],
    response_lengths: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss mask of generated responses, from token positions.

    Notation: B batch, L padded response length.

    The mask is 1 from the first response token up to and including the first token whose id is
    in ``eos_token_ids`` (any id of the set), 0 after it and beyond ``response_lengths``. It is
    never built by comparing ids with a pad id: a pad id that is also an EOS id (Qwen's
    ``<|endoftext|>``) ends the response at its first occurrence and later copies are padding.

    Args:
        response_ids: [B, L] int token ids of the responses, right-padded.
        eos_token_ids: the EOS id set (e.g. ``{im_end, endoftext}``); may be empty.
        response_lengths: [B] number of generated tokens of each sample; None = L for all.

    Returns:
        ``(mask, truncated)``: mask [B, L] float32 of 0/1; truncated [B] bool, True where no EOS
        id occurs within the sample's length (the response hit the length limit).

    Raises:
        ValueError: response_lengths has the wrong size or a length outside [0, L].
    """
    B, L = response_ids.shape
    device = response_ids.device
    if response_lengths is None:
        lengths = torch.full((B,), L, dtype=torch.long, device=device)
    else:
        lengths = torch.as_tensor(response_lengths, device=device).long().reshape(-1)
    if lengths.numel() != B or (lengths < 0).any() or (lengths > L).any():
        raise ValueError(f"response_lengths must be {B} values in [0, {L}], got {lengths.tolist()}")
    pos = torch.arange(L, device=device)[None, :]  # [1, L]
    in_len = pos < lengths[:, None]  # [B, L]
    eos = torch.as_tensor(sorted(set(int(i) for i in eos_token_ids)), dtype=response_ids.dtype)
    is_eos = torch.isin(response_ids, eos.to(device)) & in_len  # [B, L]
    has_eos = is_eos.any(dim=1)  # [B]
    first_eos = is_eos.int().argmax(dim=1)  # [B] first max = first EOS
    end = torch.where(has_eos, first_eos + 1, lengths)  # [B] exclusive end
    mask = (pos < end[:, None]).float()
    return mask, ~has_eos


# --------------------------------------------------------------------------- rewards


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[int],
    std_normalize: bool = True,
    eps: float = 1e-6,
    baseline: str = "mean",
) -> torch.Tensor:
    """Group-relative advantages, per explicit group id (GRPO / RLOO / Dr.GRPO).

    Notation: N samples; a group is the set of samples sharing a group id (the G responses to
    one prompt). Groups may differ in size and arrive in any order: nothing is reshaped.

    ``baseline="mean"``: ``A_i = r_i - mean_g`` (GRPO, Shao et al. 2024, arXiv:2402.03300).
    ``baseline="leave_one_out"``: ``A_i = r_i - mean_{j != i} r_j`` (RLOO, Ahmadian et al. 2024,
    arXiv:2402.14740; OpenRLHF ``rloo``, verl ``rloo``).
    ``std_normalize``: divide by the group's unbiased std (N-1, ``torch.std``) + eps
    (slime, verl, OpenRLHF; TRL uses eps 1e-4). False gives Dr.GRPO (arXiv:2503.20783).

    A group whose rewards are all equal gets exactly 0; a group of one sample gets 0 (slime:
    centring a lone sample gives 0; verl/SkyRL instead return the raw reward there).

    Args:
        rewards: [N] scalar rewards.
        group_ids: [N] int group id of each sample.
        std_normalize: divide by group std + eps.
        eps: added to the std.
        baseline: "mean" or "leave_one_out".

    Returns:
        [N] float32 advantages, in the order of ``rewards``.

    Raises:
        ValueError: unknown baseline, or rewards and group_ids of different sizes.
    """
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
    r = torch.as_tensor(rewards).reshape(-1).double()
    gid = torch.as_tensor(group_ids, device=r.device).reshape(-1)
    if gid.numel() != r.numel():
        raise ValueError(f"{r.numel()} rewards but {gid.numel()} group ids")
    _, inv = torch.unique(gid, return_inverse=True)  # [N] dense group index
    G = int(inv.max().item()) + 1 if r.numel() else 0
    count = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    total = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, r)
    mean = total / count  # [G]
    n_i = count[inv]  # [N] size of each sample's group
    if baseline == "mean":
        adv = r - mean[inv]
    else:  # leave one out; singleton groups handled below
        adv = r - (total[inv] - r) / (n_i - 1).clamp(min=1)
    if std_normalize:
        sq = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # [G] unbiased
        adv = adv / (std[inv] + eps)
    gmax = torch.full((G,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce_(
        0, inv, r, reduce="amax"
    )
    gmin = torch.full((G,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce_(
        0, inv, r, reduce="amin"
    )
    flat = (gmax == gmin)[inv] | (n_i < 2)  # [N] all-equal or singleton groups -> exactly 0
    return torch.where(flat, torch.zeros_like(adv), adv).float()


def normalize_rewards(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence[int],
    estimator: str,
    std_normalize: bool = True,
) -> torch.Tensor:
    """The reward normalisation the driver applies before ``compute_advantages``.

    Notation: N samples.

    - grpo / gspo / cispo: group mean baseline, divided by group std + 1e-6 if ``std_normalize``
      (slime ``_post_process_rewards``; slime turns std off when n_samples_per_prompt = 1).
    - reinforce_plus_plus_baseline: group mean baseline only (slime, OpenRLHF).
    - rloo: leave-one-out baseline, never std-normalised (RLOO paper, verl, OpenRLHF).
    - ppo, reinforce_plus_plus: identity (the critic / the discounted return is the baseline).

    Args:
        rewards: [N] scalar rewards.
        group_ids: [N] group (prompt) id of each sample.
        estimator: one of ``ADVANTAGE_ESTIMATORS``.
        std_normalize: see above (grpo/gspo/cispo only).

    Returns:
        [N] float32 normalised rewards.

    Raises:
        ValueError: unknown estimator.
    """
    if estimator in ("grpo", "gspo", "cispo"):
        return group_advantages(rewards, group_ids, std_normalize=std_normalize, eps=1e-6)
    if estimator == "reinforce_plus_plus_baseline":
        return group_advantages(rewards, group_ids, std_normalize=False)
    if estimator == "rloo":
        return group_advantages(rewards, group_ids, std_normalize=False, baseline="leave_one_out")
    if estimator in ("ppo", "reinforce_plus_plus"):
        return torch.as_tensor(rewards).reshape(-1).float()
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose from {ADVANTAGE_ESTIMATORS}")


# --------------------------------------------------------------------------- KL


def compute_approx_kl(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str
) -> torch.Tensor:
    """Per-token approximation of KL(pi || pi_ref) from sampled-token log-probs.

    Notation: B batch, L length; Δ = log_probs - ref_log_probs (Schulman 2020, "Approximating KL
    divergence", http://joschu.net/blog/kl-approx.html).

    - k1: Δ
    - k2: Δ² / 2
    - k3: exp(-Δ) - 1 + Δ (unclamped)
    - low_var_kl: exp(-Δ) - 1 + Δ clamped to [-10, 10]

    k3 and low_var_kl are the same formula; as in slime, only low_var_kl is clamped (verl clamps
    both, OpenRLHF clamps every type, TRL none). The clamp only matters for |Δ| ≳ 2.4.

    Args:
        log_probs: [B, L] log-probs of the policy being trained (or old policy for the reward KL).
        ref_log_probs: [B, L] reference-model log-probs of the same tokens.
        kl_type: one of ``KL_TYPES``.

    Returns:
        [B, L] per-token KL estimate (same dtype as inputs), differentiable.

    Raises:
        ValueError: unknown kl_type.
    """
    delta = log_probs - ref_log_probs
    if kl_type == "k1":
        return delta
    if kl_type == "k2":
        return delta.square() / 2
    if kl_type in ("k3", "low_var_kl"):
        kl = torch.exp(-delta) - 1 + delta
        return kl.clamp(-10.0, 10.0) if kl_type == "low_var_kl" else kl
    raise ValueError(f"unknown kl_type {kl_type!r}; choose from {KL_TYPES}")


# --------------------------------------------------------------------------- policy losses


def _clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None,
    eps_clip_c: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate on a ratio tensor -> (per-token loss, clipped indicator)."""
    high = eps_clip if eps_clip_high is None else eps_clip_high
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + high)
    loss = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"dual-clip constant eps_clip_c must be > 1, got {eps_clip_c}")
        pg3 = -advantages * eps_clip_c
        loss = torch.where(advantages < 0, torch.minimum(pg3, loss), loss)
    return loss, clipped


def compute_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped policy loss with clip-higher and dual clip (slime ``compute_policy_loss``).

    Notation: B batch, L length, r = exp(log_probs - old_log_probs), A advantages.

    ``L = max(-r·A, -clip(r, 1-ε, 1+ε_high)·A)`` (PPO, Schulman et al. 2017; asymmetric
    ε_high = DAPO clip-higher, arXiv:2503.14476). Dual clip (Ye et al. 2020, arXiv:1912.09729):
    where A < 0, ``L = min(-ε_c·A, L)``; off when ``eps_clip_c`` is None (slime, OpenRLHF,
    NeMo-RL; verl always applies c = 3). No clamp on the log-ratio (slime; verl/OpenRLHF clamp ±20).

    Args:
        log_probs: [B, L] current policy log-probs (requires grad).
        old_log_probs: [B, L] log-probs of the policy that produced the data.
        advantages: [B, L].
        eps_clip: lower clip ε.
        eps_clip_high: upper clip ε_high; None = eps_clip.
        eps_clip_c: dual-clip constant (> 1) or None.

    Returns:
        ``(loss, clipped, ppo_kl)`` each [B, L]: per-token loss (unmasked; aggregate with
        ``aggregate_loss``), clipped = 1.0 where the clipped term is the larger (slime's clipfrac;
        dual-clip engagement is not counted), ppo_kl = old_log_probs - log_probs.

    Raises:
        ValueError: eps_clip_c <= 1.
    """
    ppo_kl = old_log_probs - log_probs
    loss, clipped = _clipped_surrogate(
        torch.exp(-ppo_kl), advantages, eps_clip, eps_clip_high, eps_clip_c
    )
    return loss, clipped, ppo_kl


def _masked_seq_mean(x: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, 1]: Σ_t x·m / max(Σ_t m, 1)."""
    m = loss_mask.to(x.dtype)
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)


def compute_gspo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO: PPO clip on the sequence-level ratio (Zheng et al. 2025, arXiv:2507.18071; slime).

    Notation: B batch, L length, m loss mask.

    ``s_b = Σ_t (old - new)·m / max(Σ_t m, 1)``, ``r_b = exp(-s_b)`` broadcast to every token of
    sample b, then the clipped surrogate of ``compute_policy_loss`` token by token. The gradient
    flows to every masked token through the mean. GSPO uses tiny ε (the paper's scripts use
    3e-4 to 4e-4).

    Args:
        log_probs, old_log_probs, advantages, loss_mask: [B, L].
        eps_clip, eps_clip_high, eps_clip_c: as in ``compute_policy_loss``.

    Returns:
        ``(loss, clipped, ppo_kl)`` each [B, L]; ppo_kl is s_b broadcast.

    Raises:
        ValueError: eps_clip_c <= 1.
    """
    seq_kl = _masked_seq_mean(old_log_probs - log_probs, loss_mask)  # [B, 1]
    ppo_kl = seq_kl.expand_as(log_probs)  # [B, L]
    loss, clipped = _clipped_surrogate(
        torch.exp(-ppo_kl), advantages, eps_clip, eps_clip_high, eps_clip_c
    )
    return loss, clipped, ppo_kl


def compute_cispo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_clip: float = 0.2,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO: REINFORCE with a clipped, stop-gradient IS weight (MiniMax-M1, arXiv:2506.13585).

    Notation: B batch, L length, r = exp(log_probs - old_log_probs).

    ``L = -sg(clip(r, 1-ε, 1+ε_high))·A·log_probs`` (slime). Every token keeps a gradient
    (``-w·A·∇logπ``), unlike PPO where clipped tokens get none.

    Args:
        log_probs, old_log_probs, advantages: [B, L].
        loss_mask: [B, L] (accepted for the uniform signature; not used).
        eps_clip, eps_clip_high: clip range of the weight.
        eps_clip_c: must be None (dual clip is not defined for CISPO).

    Returns:
        ``(loss, clipped, ppo_kl)`` each [B, L]; clipped = 1.0 where r is outside the range.

    Raises:
        ValueError: eps_clip_c is not None.
    """
    if eps_clip_c is not None:
        raise ValueError("CISPO has no dual clip: leave eps_clip_c (--eps-clip-c) unset")
    high = eps_clip if eps_clip_high is None else eps_clip_high
    ppo_kl = old_log_probs - log_probs
    ratio = torch.exp(-ppo_kl).detach()
    weight = ratio.clamp(1.0 - eps_clip, 1.0 + high)
    clipped = (weight != ratio).float()
    return -weight * advantages * log_probs, clipped, ppo_kl


def _ppo_clip_loss(log_probs, old_log_probs, advantages, loss_mask, *, eps_clip=0.2,
                   eps_clip_high=None, eps_clip_c=None):
    """``compute_policy_loss`` with the uniform dispatch signature (loss_mask unused)."""
    return compute_policy_loss(
        log_probs, old_log_probs, advantages, eps_clip, eps_clip_high, eps_clip_c
    )


PolicyLossFn = Callable[..., "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]

#: --advantage-estimator -> policy loss; call as
#: ``fn(log_probs, old_log_probs, advantages, loss_mask, *, eps_clip, eps_clip_high, eps_clip_c)``
#: -> (per-token loss, clipped indicator, ppo_kl), all [B, L].
POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "grpo": _ppo_clip_loss,
    "gspo": compute_gspo_loss,
    "cispo": compute_cispo_loss,
    "ppo": _ppo_clip_loss,
    "reinforce_plus_plus": _ppo_clip_loss,
    "reinforce_plus_plus_baseline": _ppo_clip_loss,
    "rloo": _ppo_clip_loss,
}


# --------------------------------------------------------------------------- returns / GAE


def discounted_returns(
    token_rewards: torch.Tensor, loss_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Discounted return over the trainable tokens of each trajectory (REINFORCE++).

    Notation: B batch, L length, m loss mask, r token rewards.

    ``G_t = r_t + γ·G_next`` where next is the next token with m = 1; tokens with m = 0 inside
    the trajectory (tool / observation tokens of a multi-turn rollout) carry the return through
    unchanged and undiscounted; they are not the end of the sequence (verl reset the scan at
    every m = 0 until PR #7300). REINFORCE++: Hu 2025, arXiv:2501.03262.

    Args:
        token_rewards: [B, L] per-token rewards; values at m = 0 are ignored.
        loss_mask: [B, L] 0/1.
        gamma: discount in [0, 1].

    Returns:
        [B, L] float32 returns, 0 where m = 0.
    """
    m = loss_mask.float()
    r = token_rewards.float() * m
    if gamma == 1.0:
        out = r.flip(-1).cumsum(-1).flip(-1)  # reverse cumulative sum
        return out * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t] > 0, r[:, t] + gamma * running, running)
        out[:, t] = running
    return out * m


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the trainable tokens (PPO critic).

    Notation: B batch, L length, m loss mask, V values, r token rewards.

    ``δ_t = r_t + γ·V_next - V_t``, ``A_t = δ_t + γλ·A_next`` (Schulman et al. 2016,
    arXiv:1506.02438), where next is the next token with m = 1 (V = 0, A = 0 after the last one).
    Tokens with m = 0 inside the trajectory (tool output) are skipped: they carry V_next and
    A_next through.

    Args:
        token_rewards: [B, L]; values at m = 0 are ignored.
        values: [B, L] critic values (no grad needed).
        loss_mask: [B, L] 0/1.
        gamma, lam: discount and GAE λ.

    Returns:
        ``(advantages, returns)`` [B, L] float32, returns = advantages + values; both 0 at m = 0.
    """
    m = loss_mask.float()
    r = token_rewards.float().detach()
    v = values.float().detach()
    adv = torch.zeros_like(r)
    next_v = torch.zeros_like(r[:, 0])  # [B]
    next_a = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a_t = delta + gamma * lam * next_a
        keep = m[:, t] > 0
        next_a = torch.where(keep, a_t, next_a)
        next_v = torch.where(keep, v[:, t], next_v)
        adv[:, t] = a_t
    adv = adv * m
    return adv, (adv + v) * m


def _add_at_last_token(token_rewards: torch.Tensor, loss_mask: torch.Tensor, rewards: torch.Tensor):
    """token_rewards[b, last t with m=1] += rewards[b]; rows without a trainable token unchanged."""
    m = loss_mask > 0
    L = m.shape[1]
    last = (L - 1) - m.flip(-1).int().argmax(-1)  # [B]
    onehot = torch.nn.functional.one_hot(last, L).to(token_rewards.dtype)  # [B, L]
    onehot = onehot * m.any(-1, keepdim=True)
    return token_rewards + onehot * rewards[:, None].to(token_rewards.dtype)


def compute_advantages(
    estimator: str,
    *,
    rewards: torch.Tensor,
    loss_mask: torch.Tensor,
    log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k1",
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (and returns) for one batch (slime ``compute_advantages_and_returns``).

    Notation: B batch, L response length, R [B] (normalised) reward, m loss mask,
    kl_t = compute_approx_kl(log_probs, ref_log_probs, kl_type) (0 if kl_coef = 0).

    - grpo / gspo / cispo / rloo: ``A_t = R`` on every token (the KL is not in the reward).
    - reinforce_plus_plus: ``r_t = -kl_coef·kl_t·m_t``, ``r_last += R``, A = returns =
      ``discounted_returns(r, m, γ)``.
    - reinforce_plus_plus_baseline: ``A_t = R - kl_coef·kl_t``.
    - ppo: same token rewards as rf++, then ``gae(r, values, m, γ, λ)``; returns = A + V.

    ``rewards`` must already be normalised by the driver (``normalize_rewards``).
    ``log_probs`` are those of the rollout policy (slime uses the old-actor log-probs).

    Args:
        estimator: one of ``ADVANTAGE_ESTIMATORS``.
        rewards: [B] scalar rewards.
        loss_mask: [B, L].
        log_probs, ref_log_probs: [B, L], required when kl_coef != 0.
        values: [B, L] critic values, required for ppo.
        kl_coef, kl_type, gamma, lam: see above.

    Returns:
        ``(advantages [B, L], returns [B, L] or None)`` float32, 0 where m = 0; returns is None
        for grpo/gspo/cispo/rloo/reinforce_plus_plus_baseline.

    Raises:
        ValueError: unknown estimator, missing log-probs for the KL, missing values for ppo.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose from {ADVANTAGE_ESTIMATORS}")
    m = loss_mask.float()
    R = torch.as_tensor(rewards, device=m.device).reshape(-1).float()
    if R.numel() != m.shape[0]:
        raise ValueError(f"{R.numel()} rewards for a batch of {m.shape[0]} samples")
    if kl_coef != 0.0 and estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"):
        if log_probs is None or ref_log_probs is None:
            raise ValueError(f"kl_coef={kl_coef} needs log_probs and ref_log_probs")
        kl = compute_approx_kl(log_probs.float(), ref_log_probs.float(), kl_type).detach()
    else:
        kl = torch.zeros_like(m)
    if estimator in ("grpo", "gspo", "cispo", "rloo"):
        return R[:, None] * m, None
    if estimator == "reinforce_plus_plus_baseline":
        return (R[:, None] - kl_coef * kl) * m, None
    token_rewards = _add_at_last_token(-kl_coef * kl * m, m, R)
    if estimator == "reinforce_plus_plus":
        ret = discounted_returns(token_rewards, m, gamma)
        return ret, ret
    if values is None:
        raise ValueError("the ppo estimator needs critic values")
    return gae(token_rewards, values, m, gamma, lam)


def whiten_advantages(
    advantages: torch.Tensor, loss_mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Masked whitening of advantages (``--normalize-advantages``; slime, OpenRLHF).

    Notation: B batch, L length, m loss mask, N = Σ m.

    ``μ = Σ A·m / N``, ``var = Σ (A-μ)²·m / N · N/(N-1)`` (Bessel), ``(A-μ)/sqrt(var + eps)``.
    Statistics are over the tensors given: for data-parallel training pass the whole global
    batch (slime all-reduces the sums over DP×CP).

    Args:
        advantages: [B, L].
        loss_mask: [B, L] 0/1.
        eps: added to the variance.

    Returns:
        [B, L] float32, 0 where m = 0. With N <= 1 the variance is taken as 0.
    """
    m = loss_mask.float()
    a = advantages.float()
    n = m.sum()
    mean = (a * m).sum() / n.clamp(min=1)
    var = ((a - mean).square() * m).sum() / (n - 1).clamp(min=1)
    return (a - mean) * torch.rsqrt(var + eps) * m


# --------------------------------------------------------------------------- value loss, IS


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    value_clip: float | None,
) -> torch.Tensor:
    """Clipped value loss, per token (slime; PPO2 baselines). No ½ factor (slime).

    Notation: B batch, L length, V values, G returns, c value_clip.

    ``max((V_old + clip(V - V_old, -c, c) - G)², (V - G)²)``; ``(V - G)²`` if c is None.

    Args:
        values: [B, L] current critic values (requires grad).
        old_values: [B, L] critic values at rollout time.
        returns: [B, L] targets.
        value_clip: c, or None for no clipping.

    Returns:
        [B, L] per-token loss (aggregate with ``aggregate_loss``).
    """
    unclipped = (values - returns).square()
    if value_clip is None:
        return unclipped
    v_clip = old_values + (values - old_values).clamp(-value_clip, value_clip)
    return torch.maximum((v_clip - returns).square(), unclipped)


def compute_tis_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    tis_clip: float = 2.0,
    tis_clip_low: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance-sampling weights for train/rollout mismatch (``--use-tis``).

    Notation: B batch, L length, m loss mask.

    ``w = clamp(exp(old_log_probs - rollout_log_probs), tis_clip_low, tis_clip)`` (slime TIS;
    Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
    The caller multiplies the per-token policy loss by ``w``.

    Args:
        old_log_probs: [B, L] trainer-side log-probs of the rollout policy.
        rollout_log_probs: [B, L] log-probs reported by the inference engine.
        loss_mask: [B, L] 0/1.
        tis_clip, tis_clip_low: upper and lower truncation.

    Returns:
        ``(weights [B, L] float32, detached, 1.0 where m = 0; clipfrac scalar)``: clipfrac is
        the fraction of masked tokens whose weight was truncated.
    """
    m = loss_mask > 0
    raw = torch.exp(old_log_probs.float() - rollout_log_probs.float()).detach()
    w = raw.clamp(tis_clip_low, tis_clip)
    clipfrac = ((w != raw) & m).float().sum() / m.sum().clamp(min=1)
    return torch.where(m, w, torch.ones_like(w)), clipfrac


# --------------------------------------------------------------------------- aggregation


def aggregate_loss(
    per_token: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str,
    *,
    num_samples: int | float | None = None,
    num_tokens: int | float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar (mode names as verl's ``loss_agg_mode``).

    Notation: B batch (this micro-batch), L width, x per-token loss, m loss mask.

    - "seq-mean-token-mean" (slime default; verl/ROLL, TRL ``grpo``, OpenRLHF seq-level):
      ``Σ_i (Σ_t x·m / max(Σ_t m, 1)) / num_samples``.
    - "token-mean" (slime ``--calculate-per-token-loss``; verl ``token-mean``, TRL ``dapo``,
      OpenRLHF/NeMo token-level): ``Σ x·m / num_tokens``.
    - "seq-mean-token-sum" (verl/ROLL): ``Σ x·m / num_samples``.
    - "seq-mean-token-sum-norm" (Dr.GRPO, arXiv:2503.20783; TRL ``dr_grpo``, SkyRL):
      ``Σ x·m / (num_samples·max_len)``. verl's mode of this name divides by max_len only.

    num_samples / num_tokens / max_len default to this batch's own B, Σ m (min 1) and L. The
    trainer passes the GLOBAL batch's values (all micro-batches and data-parallel ranks of the
    optimizer step): then the per-micro-batch results summed, with gradients all-reduced by SUM,
    equal the loss of the whole global batch whatever the split.

    Args:
        per_token: [B, L].
        loss_mask: [B, L] 0/1.
        mode: one of ``LOSS_AGG_MODES``.
        num_samples, num_tokens, max_len: global denominators (> 0) or None.

    Returns:
        scalar tensor.

    Raises:
        ValueError: unknown mode or a denominator <= 0.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose from {LOSS_AGG_MODES}")
    for name, val in (("num_samples", num_samples), ("num_tokens", num_tokens), ("max_len", max_len)):
        if val is not None and val <= 0:
            raise ValueError(f"{name} must be > 0, got {val}")
    m = loss_mask.to(per_token.dtype)
    B, L = per_token.shape
    n_samples = B if num_samples is None else num_samples
    masked = per_token * m
    if mode == "token-mean":
        n_tokens = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked.sum() / n_tokens
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).sum() / max(n_samples, 1)
    if mode == "seq-mean-token-sum":
        return masked.sum() / max(n_samples, 1)
    width = L if max_len is None else max_len
    return masked.sum() / (max(n_samples, 1) * max(width, 1))
