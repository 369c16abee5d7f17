"""Hand-derived numeric tests for slime_ray.train.algorithms (no Ray, milliseconds)."""

from __future__ import annotations

import math

import pytest
import torch

from slime_ray.train.algorithms import (
    KL_TYPES,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    aggregate_loss,
    compute_advantages,
    compute_approx_kl,
    compute_cispo_loss,
    compute_gspo_loss,
    compute_policy_loss,
    compute_tis_weights,
    discounted_returns,
    gae,
    group_advantages,
    normalize_rewards,
    response_loss_mask,
    value_loss,
    whiten_advantages,
)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ----------------------------------------------------------------------------- loss mask


def test_loss_mask_eos_set_with_pad_in_set():
    # EOS set {7, 9}, pad = 9. The mask ends at the FIRST id of the set; pad copies are after it.
    ids = torch.tensor([[5, 6, 9, 9, 9], [5, 6, 7, 9, 9], [5, 6, 8, 8, 8]])
    mask, truncated = response_loss_mask(ids, {7, 9}, torch.tensor([3, 3, 5]))
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_loss_mask_respects_length_and_no_pad_comparison():
    # length 2 stops before the EOS at index 2 -> truncated; pad id 0 inside response is a token
    ids = torch.tensor([[0, 0, 7, 0], [4, 0, 0, 0]])
    mask, truncated = response_loss_mask(ids, [7], [2, 4])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [True, True]
    with pytest.raises(ValueError):
        response_loss_mask(ids, [7], [5, 1])


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_unequal_shuffled_groups():
    # A=[1,0,1,0]: mean .5, unbiased std sqrt(4*.25/3)=.57735 -> ±.5/.57735 = ±0.866
    # B=[1,1,1]: all equal -> 0 exactly
    # C=[0,0,0,1]: mean .25, std sqrt((3*.0625+.5625)/3)=0.5 -> -0.5, 1.5
    rewards = [1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1]
    groups = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    expected = [0.866, -0.866, 0.866, -0.866, 0, 0, 0, -0.5, -0.5, -0.5, 1.5]
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(3))
    r = t(rewards)[perm]
    g = torch.tensor(groups)[perm] * 17 + 5  # arbitrary, non-contiguous ids
    adv = group_advantages(r, g, std_normalize=True, eps=1e-6, baseline="mean")
    torch.testing.assert_close(adv, t(expected)[perm], atol=1e-3, rtol=0)
    assert adv[(g == 1 * 17 + 5)].eq(0).all()
    assert not torch.isnan(adv).any()


def test_group_advantages_rloo_and_singleton():
    # RLOO, group [1,0,0,0]: A_i = r_i - mean(others) -> [1-0, 0-1/3, 0-1/3, 0-1/3]
    # group [2,4]: [2-4, 4-2] = [-2, 2]; singleton [5] -> 0 (no NaN)
    r = t([0, 1, 4, 0, 5, 2, 0])
    g = torch.tensor([0, 0, 1, 0, 2, 1, 0])
    adv = group_advantages(r, g, std_normalize=False, baseline="leave_one_out")
    torch.testing.assert_close(adv, t([-1 / 3, 1.0, 2.0, -1 / 3, 0.0, -2.0, -1 / 3]))
    adv_mean = group_advantages(t([3.0]), [0], std_normalize=True)
    assert adv_mean.tolist() == [0.0]


def test_group_advantages_all_equal_non_representable_is_exact_zero():
    adv = group_advantages(t([0.1, 0.1, 0.1, 0.7, 0.7]), [1, 1, 1, 2, 2])
    assert adv.tolist() == [0.0] * 5


def test_normalize_rewards_dispatch():
    r, g = t([1, 0, 0, 0]), [0, 0, 0, 0]
    # mean .25, std .5 -> [1.5, -.5, -.5, -.5]
    torch.testing.assert_close(normalize_rewards(r, g, "grpo", True), t([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_rewards(r, g, "grpo", False), t([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(normalize_rewards(r, g, "reinforce_plus_plus_baseline", True), t([0.75, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(normalize_rewards(r, g, "rloo", True), t([1.0, -1 / 3, -1 / 3, -1 / 3]))
    for est in ("ppo", "reinforce_plus_plus"):
        torch.testing.assert_close(normalize_rewards(r, g, est, True), r)
    with pytest.raises(ValueError):
        normalize_rewards(r, g, "nope", True)


# ----------------------------------------------------------------------------- KL


def test_kl_types_values():
    # Δ = -1 - (-1.5) = 0.5: k1 .5, k2 .125, k3 = e^-.5 - 1 + .5 = 0.1065307
    lp, ref = t([-1.0]), t([-1.5])
    assert compute_approx_kl(lp, ref, "k1").item() == pytest.approx(0.5)
    assert compute_approx_kl(lp, ref, "k2").item() == pytest.approx(0.125)
    assert compute_approx_kl(lp, ref, "k3").item() == pytest.approx(0.1065307, abs=1e-6)
    # Δ = -20: exp(20) - 21 ≈ 4.85e8; low_var_kl clamps to 10, k3 does not
    assert compute_approx_kl(t([-20.0]), t([0.0]), "low_var_kl").item() == 10.0
    assert compute_approx_kl(t([-20.0]), t([0.0]), "k3").item() > 1e8
    with pytest.raises(ValueError):
        compute_approx_kl(lp, ref, "k4")


def test_kl_loss_direction():
    # one token, log p = -1.0, log p_ref = -1.5, A = 0, kl coef 0.1, low_var_kl.
    # Δ = 0.5; kl = e^-.5 - 1 + .5 = 0.1065307 -> loss = 0.1 * kl = 0.010653.
    # d kl/dΔ = 1 - e^-Δ = 0.3934693 -> d loss / d log p = +0.039347 (pushes log p toward ref).
    lp = t([[-1.0]], requires_grad=True)
    old, ref, adv, mask = t([[-1.0]]), t([[-1.5]]), t([[0.0]]), t([[1.0]])
    pg, _, _ = compute_policy_loss(lp, old, adv)
    kl = compute_approx_kl(lp, ref, "low_var_kl")
    loss = aggregate_loss(pg, mask, "token-mean") + 0.1 * aggregate_loss(kl, mask, "token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(0.010653, abs=1e-6)
    assert lp.grad.item() == pytest.approx(0.039347, abs=1e-6)


def test_step0_identities():
    # policy = old = reference: ratio 1, ppo_kl 0, every KL 0, nothing clipped
    lp = torch.randn(3, 5) - 2
    adv = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    for name, fn in POLICY_LOSSES.items():
        _, clipped, ppo_kl = fn(lp, lp.clone(), adv, mask, eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=None)
        assert ppo_kl.abs().max().item() <= 1e-8, name
        assert clipped.sum().item() == 0, name
    for kt in KL_TYPES:
        assert compute_approx_kl(lp, lp.clone(), kt).abs().max().item() <= 1e-8


# ----------------------------------------------------------------------------- policy losses


def test_ppo_clip_and_clip_higher():
    # A = +1. r = e^0.25 = 1.2840. symmetric ε=.2: L = max(-1.284, -1.2) = -1.2 (clipped)
    # clip-higher ε_high=.28: L = max(-1.284, -1.28) = -1.28 (clipped)
    # r = e^0.2 = 1.2214 with ε_high=.28: unclipped, L = -1.2214
    lp, old, adv = t([[0.25, 0.2]]), t([[0.0, 0.0]]), t([[1.0, 1.0]])
    loss, clipped, ppo_kl = compute_policy_loss(lp, old, adv, eps_clip=0.2)
    torch.testing.assert_close(loss, t([[-1.2, -1.2]]))
    assert clipped.tolist() == [[1.0, 1.0]]
    torch.testing.assert_close(ppo_kl, t([[-0.25, -0.2]]))
    loss, clipped, _ = compute_policy_loss(lp, old, adv, eps_clip=0.2, eps_clip_high=0.28)
    torch.testing.assert_close(loss, t([[-1.28, -math.exp(0.2)]]))
    assert clipped.tolist() == [[1.0, 0.0]]


def test_ppo_no_gradient_when_clipped():
    lp = t([[0.25]], requires_grad=True)
    loss, _, _ = compute_policy_loss(lp, t([[0.0]]), t([[1.0]]))
    loss.sum().backward()
    assert lp.grad.item() == 0.0


def test_dual_clip():
    # A = -1, r = e^2 = 7.389: PPO L = max(7.389, 0.8) = 7.389; dual clip c=3: min(3, 7.389) = 3
    # A = -1, r = e^0.5 = 1.6487 < c: L = 1.6487 unchanged; A = +1, r = e^2: L = -1.2 (dual n/a)
    lp, old = t([[2.0, 0.5, 2.0]]), t([[0.0, 0.0, 0.0]])
    adv = t([[-1.0, -1.0, 1.0]])
    loss, _, _ = compute_policy_loss(lp, old, adv, eps_clip=0.2, eps_clip_c=3.0)
    torch.testing.assert_close(loss, t([[3.0, math.exp(0.5), -1.2]]))
    loss_nodc, _, _ = compute_policy_loss(lp, old, adv, eps_clip=0.2)
    assert loss_nodc[0, 0].item() == pytest.approx(math.exp(2.0), rel=1e-6)
    with pytest.raises(ValueError):
        compute_policy_loss(lp, old, adv, eps_clip_c=1.0)


def test_gspo_sequence_ratio():
    # sample 0: log-ratios [0.1, 0.3, (masked 5.0)] -> s = -(0.1+0.3)/2 = -0.2, r = e^0.2 = 1.2214
    #   A = 1, ε = ε_high = 0.2: L = max(-1.2214, -1.2) = -1.2 on every token, clipped
    # sample 1: log-ratios [-0.1, 0.1, 0] -> s = 0, r = 1 -> L = -A = 2 (A = -2), not clipped
    lp = t([[0.1, 0.3, 5.0], [-0.1, 0.1, 0.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = t([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    loss, clipped, ppo_kl = compute_gspo_loss(lp, old, adv, mask, eps_clip=0.2)
    torch.testing.assert_close(loss, t([[-1.2] * 3, [2.0] * 3]))
    assert clipped.tolist() == [[1, 1, 1], [0, 0, 0]]
    torch.testing.assert_close(ppo_kl, t([[-0.2] * 3, [0.0] * 3]))
    # gradient of sample 1 (unclipped): L_t = -A·r, dr/dlp_k = r·m_k/3 -> Σ_t over 3 tokens
    # d(Σ_t L_t)/dlp_k = 3 · (2 · 1 · 1/3) = 2 for each k
    (loss * mask).sum().backward()
    torch.testing.assert_close(lp.grad[1], t([2.0, 2.0, 2.0]))
    torch.testing.assert_close(lp.grad[0], t([0.0, 0.0, 0.0]))


def test_cispo_loss():
    # r = [e^0.5=1.6487, e^-0.5=0.6065, 1.1]; ε=0.2, ε_high=0.28 -> w = [1.28, 0.8, 1.1]
    # A = 1: L = -w·logp, logp = old + log r with old = -1 -> logp = [-0.5, -1.5, -1+ln1.1]
    # dL/dlogp = -w (weight is stop-gradient): [-1.28, -0.8, -1.1]
    old = t([[-1.0, -1.0, -1.0]])
    lp = (old + t([[0.5, -0.5, math.log(1.1)]])).requires_grad_(True)
    adv = torch.ones(1, 3)
    loss, clipped, _ = compute_cispo_loss(lp, old, adv, torch.ones(1, 3), eps_clip=0.2, eps_clip_high=0.28)
    expected = -t([1.28, 0.8, 1.1]) * lp.detach()
    torch.testing.assert_close(loss, expected[None].reshape(1, 3))
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, t([[-1.28, -0.8, -1.1]]))
    with pytest.raises(ValueError):
        compute_cispo_loss(lp, old, adv, torch.ones(1, 3), eps_clip_c=3.0)


def test_policy_losses_table():
    assert set(POLICY_LOSSES) == {
        "grpo", "gspo", "cispo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "rloo"
    }
    assert POLICY_LOSSES["gspo"] is compute_gspo_loss
    assert POLICY_LOSSES["cispo"] is compute_cispo_loss


# ----------------------------------------------------------------------------- returns / GAE


def test_multi_turn_returns_pass_through_tool_tokens():
    # gamma 1, rewards [0,0,0,0,0,1], mask [1,1,0,0,1,1]: every trainable token sees return 1
    r = t([[0, 0, 0, 0, 0, 1]])
    m = t([[1, 1, 0, 0, 1, 1]])
    ret = discounted_returns(r, m, 1.0)
    assert ret[m.bool()].tolist() == [1.0, 1.0, 1.0, 1.0]
    # gamma 0.5: discount counts trainable tokens only: [0.125, 0.25, -, -, 0.5, 1]
    ret = discounted_returns(r, m, 0.5)
    torch.testing.assert_close(ret, t([[0.125, 0.25, 0, 0, 0.5, 1.0]]))


def test_gae_hand_derived():
    # γ=1, λ=0.5, r=[0,1], V=[0.5,0.2], mask all ones
    # t=1: δ = 1 + 0 - 0.2 = 0.8, A = 0.8
    # t=0: δ = 0 + 0.2 - 0.5 = -0.3, A = -0.3 + 0.5·0.8 = 0.1; returns = A + V = [0.6, 1.0]
    adv, ret = gae(t([[0.0, 1.0]]), t([[0.5, 0.2]]), t([[1, 1]]), 1.0, 0.5)
    torch.testing.assert_close(adv, t([[0.1, 0.8]]))
    torch.testing.assert_close(ret, t([[0.6, 1.0]]))
    # a tool token (mask 0) between the two is skipped: same numbers, 0 at the tool token
    adv, ret = gae(t([[0.0, 9.0, 1.0]]), t([[0.5, 9.0, 0.2]]), t([[1, 0, 1]]), 1.0, 0.5)
    torch.testing.assert_close(adv, t([[0.1, 0.0, 0.8]]))
    torch.testing.assert_close(ret, t([[0.6, 0.0, 1.0]]))


def test_compute_advantages_estimators():
    mask = t([[1, 1, 1, 0], [1, 0, 1, 1]])
    R = t([2.0, -1.0])
    for est in ("grpo", "gspo", "cispo", "rloo"):
        adv, ret = compute_advantages(est, rewards=R, loss_mask=mask)
        torch.testing.assert_close(adv, t([[2, 2, 2, 0], [-1, 0, -1, -1]]))
        assert ret is None
    # rf++ with k1 KL: Δ = 0.1 on every token, kl_coef 0.5 -> r_t = -0.05·m, last trainable += R
    lp, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -1.1)
    adv, ret = compute_advantages("reinforce_plus_plus", rewards=R, loss_mask=mask, log_probs=lp,
                                  ref_log_probs=ref, kl_coef=0.5, kl_type="k1", gamma=1.0)
    # sample 0: tokens r = [-.05, -.05, 2-.05]: returns [1.85, 1.9, 1.95, 0]
    # sample 1: r = [-.05, -, -.05, -1.05]: returns [-1.15, 0, -1.1, -1.05]
    torch.testing.assert_close(adv, t([[1.85, 1.9, 1.95, 0], [-1.15, 0, -1.1, -1.05]]))
    torch.testing.assert_close(ret, adv)
    adv, _ = compute_advantages("reinforce_plus_plus_baseline", rewards=R, loss_mask=mask,
                                log_probs=lp, ref_log_probs=ref, kl_coef=0.5)
    torch.testing.assert_close(adv, t([[1.95, 1.95, 1.95, 0], [-1.05, 0, -1.05, -1.05]]))
    # ppo with γ=λ=1 and V=0: A = rf++ returns, returns = A + V = A
    adv, ret = compute_advantages("ppo", rewards=R, loss_mask=mask, log_probs=lp, ref_log_probs=ref,
                                  values=torch.zeros(2, 4), kl_coef=0.5)
    torch.testing.assert_close(adv, t([[1.85, 1.9, 1.95, 0], [-1.15, 0, -1.1, -1.05]]))
    with pytest.raises(ValueError):
        compute_advantages("ppo", rewards=R, loss_mask=mask)
    with pytest.raises(ValueError):
        compute_advantages("reinforce_plus_plus", rewards=R, loss_mask=mask, kl_coef=0.1)


def test_whiten_advantages():
    # masked values [1, 2, 3]: μ=2, Bessel var = (1+0+1)/2 = 1 -> [-1, 0, 1]; masked 9 -> 0
    a = t([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    out = whiten_advantages(a, m, eps=0.0)
    torch.testing.assert_close(out, t([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- value loss, TIS


def test_value_loss_clip():
    # V_old=0, c=0.2, G=1. V=0.5: clipped V=0.2 -> (0.2-1)²=0.64 vs (0.5-1)²=0.25 -> 0.64
    # V=1.0: clipped 0.2 -> 0.64 vs 0 -> 0.64; V=-0.1: clipped -0.1 -> 1.21 both -> 1.21
    loss = value_loss(t([0.5, 1.0, -0.1]), torch.zeros(3), torch.ones(3), 0.2)
    torch.testing.assert_close(loss, t([0.64, 0.64, 1.21]))
    torch.testing.assert_close(value_loss(t([0.5]), t([0.0]), t([1.0]), None), t([0.25]))


def test_tis_weights():
    # old - rollout = [ln 3, ln 0.5, 0, ln 5 (masked)]: raw [3, 0.5, 1, 5]
    # clamp [0, 2] -> [2, 0.5, 1, 1 (masked -> 1)]; clipfrac = 1 of 3 masked tokens
    old = t([[math.log(3), math.log(0.5), 0.0, math.log(5)]])
    roll = torch.zeros(1, 4)
    w, clipfrac = compute_tis_weights(old, roll, t([[1, 1, 1, 0]]), tis_clip=2.0)
    torch.testing.assert_close(w, t([[2.0, 0.5, 1.0, 1.0]]))
    assert clipfrac.item() == pytest.approx(1 / 3)
    w, _ = compute_tis_weights(old, roll, t([[1, 1, 1, 0]]), tis_clip=2.0, tis_clip_low=0.8)
    torch.testing.assert_close(w, t([[2.0, 0.8, 1.0, 1.0]]))


# ----------------------------------------------------------------------------- aggregation

# Toy batch (peers.md §2): sample A 2 tokens of loss 1, sample B 4 tokens of loss 0, width 4.
_X = t([[1, 1, 0, 0], [0, 0, 0, 0]])
_M = t([[1, 1, 0, 0], [1, 1, 1, 1]])


def test_agg_token_mean():
    # (1+1)/6 tokens = 0.333
    assert aggregate_loss(_X, _M, "token-mean").item() == pytest.approx(1 / 3)


def test_agg_seq_mean_token_mean():
    # (2/2 + 0/4) / 2 samples = 0.5
    assert aggregate_loss(_X, _M, "seq-mean-token-mean").item() == pytest.approx(0.5)


def test_agg_seq_mean_token_sum():
    # (2 + 0) / 2 samples = 1.0
    assert aggregate_loss(_X, _M, "seq-mean-token-sum").item() == pytest.approx(1.0)


def test_agg_seq_mean_token_sum_norm():
    # 2 / (2 samples · width 4) = 0.25 (Dr.GRPO)
    assert aggregate_loss(_X, _M, "seq-mean-token-sum-norm").item() == pytest.approx(0.25)


def test_agg_global_denominators_and_errors():
    # split the toy batch in two micro-batches with the global denominators: sums match
    for mode, kw in [("token-mean", {"num_tokens": 6}), ("seq-mean-token-mean", {"num_samples": 2}),
                     ("seq-mean-token-sum", {"num_samples": 2}),
                     ("seq-mean-token-sum-norm", {"num_samples": 2, "max_len": 4})]:
        split = sum(aggregate_loss(_X[i:i + 1], _M[i:i + 1], mode, **kw) for i in range(2))
        assert split.item() == pytest.approx(aggregate_loss(_X, _M, mode).item()), mode
    assert set(LOSS_AGG_MODES) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                   "seq-mean-token-sum-norm"}
    with pytest.raises(ValueError):
        aggregate_loss(_X, _M, "sum")
    with pytest.raises(ValueError):
        aggregate_loss(_X, _M, "token-mean", num_tokens=0)
