"""Hand-derived tests for slime_ray.train.logprobs (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from slime_ray.train.logprobs import (
    entropy_from_logits,
    log_probs_from_logits,
    response_log_probs_from_model_logits,
)


def test_temperature_log_prob_and_entropy():
    # logits [2, 0] / T=0.5 -> [4, 0]; log p0 = -log(1 + e^-4) = -0.018150
    # p = [0.982014, 0.017986]; H = -(p0 ln p0 + p1 ln p1) = 0.017824 + 0.072271 = 0.090095 nats
    logits = torch.tensor([[[2.0, 0.0]]])
    lp = log_probs_from_logits(logits, torch.tensor([[0]]), temperature=0.5)
    ent = entropy_from_logits(logits, temperature=0.5)
    assert lp.item() == pytest.approx(-0.018150, abs=1e-6)
    assert ent.item() == pytest.approx(0.090095, abs=1e-6)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32


def test_bf16_logits_computed_in_fp32():
    logits = torch.tensor([[[2.0, 0.0]]], dtype=torch.bfloat16)
    lp = log_probs_from_logits(logits, torch.tensor([[0]]), temperature=0.5)
    assert lp.dtype == torch.float32
    assert lp.item() == pytest.approx(-math.log1p(math.exp(-4)), abs=1e-6)
    with pytest.raises(ValueError):
        log_probs_from_logits(logits, torch.tensor([[0]]), temperature=0.0)


class _OneLayerLM(torch.nn.Module):
    """logits[t] = W · E[token_t] + b: the logits at a position depend on that token only."""

    def __init__(self, vocab: int = 11, dim: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.out(self.emb(tokens))


def _hand_log_prob(model, prev_token: int, token: int, temperature: float) -> float:
    e = model.emb.weight[prev_token].double()
    z = (model.out.weight.double() @ e + model.out.bias.double()) / temperature
    return (z[token] - torch.logsumexp(z, 0)).item()


def test_response_boundary_one_logprob_per_token():
    # prompt [p1,p2,p3] = [3,4,5], response [r1,r2,EOS] = [6,8,2]:
    # exactly 3 log-probs, from the logits at the positions of p3, r1, r2.
    torch.manual_seed(0)
    model = _OneLayerLM()
    tokens = torch.tensor([[3, 4, 5, 6, 8, 2]])
    with torch.no_grad():
        logits = model(tokens)
    T = 0.7
    lp, ent = response_log_probs_from_model_logits(logits, tokens, [3], [3], T)
    assert lp.shape == (1, 3) and ent.shape == (1, 3)
    expected = [_hand_log_prob(model, 5, 6, T), _hand_log_prob(model, 6, 8, T), _hand_log_prob(model, 8, 2, T)]
    torch.testing.assert_close(lp[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_right_padded_batch_zero_beyond_response_and_grad():
    torch.manual_seed(1)
    model = _OneLayerLM()
    # sample 0: prompt 2, response 3; sample 1: prompt 4, response 1, right-padded with 0
    tokens = torch.tensor([[1, 3, 5, 7, 9, 0], [2, 4, 6, 8, 10, 0]])
    logits = model(tokens)
    lp, ent = response_log_probs_from_model_logits(
        logits, tokens, torch.tensor([2, 4]), torch.tensor([3, 1]), 1.0
    )
    assert lp.shape == (2, 3)
    exp0 = [_hand_log_prob(model, 3, 5, 1.0), _hand_log_prob(model, 5, 7, 1.0), _hand_log_prob(model, 7, 9, 1.0)]
    exp1 = [_hand_log_prob(model, 8, 10, 1.0), 0.0, 0.0]
    torch.testing.assert_close(lp.detach().double(), torch.tensor([exp0, exp1], dtype=torch.float64), atol=1e-6, rtol=0)
    assert ent[1, 1:].eq(0).all() and (ent[0] > 0).all()
    lp.sum().backward()
    assert model.out.weight.grad is not None and model.out.weight.grad.abs().sum() > 0


def test_matches_tiny_llama_per_sample():
    # A right-padded batch through a causal model gives the same response log-probs as each
    # sample alone (padding sits after the response and causal attention never sees it).
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    seqs = [([5, 6, 7], [8, 9, 2]), ([4, 3], [11, 12, 13, 2])]
    T = max(len(p) + len(r) for p, r in seqs)
    tokens = torch.zeros(2, T, dtype=torch.long)
    for b, (p, r) in enumerate(seqs):
        tokens[b, : len(p) + len(r)] = torch.tensor(p + r)
    with torch.no_grad():
        logits = model(tokens).logits
        lp, _ = response_log_probs_from_model_logits(logits, tokens, [3, 2], [3, 4], 0.8)
        for b, (p, r) in enumerate(seqs):
            ids = torch.tensor([p + r])
            own = model(ids).logits[0] / 0.8
            ref = torch.log_softmax(own.float(), -1)[len(p) - 1 : len(p) + len(r) - 1]
            ref = ref.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(lp[b, : len(r)], ref, atol=1e-5, rtol=0)
    assert lp[0, 3].item() == 0.0


def test_response_errors():
    logits = torch.zeros(1, 4, 5)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError):
        response_log_probs_from_model_logits(logits, tokens, [0], [2], 1.0)
    with pytest.raises(ValueError):
        response_log_probs_from_model_logits(logits, tokens, [2], [3], 1.0)
    with pytest.raises(ValueError):
        response_log_probs_from_model_logits(logits, tokens[:, :3], [2], [1], 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_fused_chunked_log_probs_match_autograd_reference(monkeypatch, temperature, entropy_grad):
    import slime_ray.train.logprobs as lpm

    monkeypatch.setattr(lpm, "_CHUNK_ELEMS", 3 * 11)  # 3 rows per chunk, last chunk partial
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 11, generator=g) * 3
    if not entropy_grad:  # a masked vocabulary entry (entropy is then nan, as in slime's formula)
        base[0, 1, 4] = float("-inf")
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = 2
    w_lp, w_ent = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)

    ref_x = base.clone().requires_grad_(True)
    z = ref_x / temperature
    ref_lp = z.gather(-1, labels[..., None])[..., 0] - torch.logsumexp(z, -1)
    ref_ent = entropy_from_logits(ref_x, temperature)
    ((ref_lp * w_lp).sum() + ((ref_ent * w_ent).sum() if entropy_grad else 0)).backward()

    x = base.clone().requires_grad_(True)
    lp, ent = lpm.log_probs_and_entropy(x, labels, temperature, entropy_grad=entropy_grad)
    assert ent.requires_grad == entropy_grad
    ((lp * w_lp).sum() + ((ent * w_ent).sum() if entropy_grad else 0)).backward()
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=1e-6, equal_nan=True)  # nan at -inf, as slime
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-6, rtol=1e-5)
    assert lpm.log_probs_and_entropy(x, labels, temperature, with_entropy=False)[1] is None


def test_fused_log_probs_bf16_input_grad_in_bf16():
    from slime_ray.train.logprobs import log_probs_and_entropy

    g = torch.Generator().manual_seed(1)
    x16 = (torch.randn(7, 13, generator=g) * 4).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 13, (7,), generator=g)
    ref_x = x16.detach().float().requires_grad_(True)
    ref_lp = ref_x.gather(-1, labels[:, None])[:, 0] - torch.logsumexp(ref_x, -1)
    ref_lp.sum().backward()
    lp, ent = log_probs_and_entropy(x16, labels, 1.0, entropy_grad=False)
    lp.sum().backward()
    assert lp.dtype == ent.dtype == torch.float32 and x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, entropy_from_logits(ref_x.detach()), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x16.grad.float(), ref_x.grad.bfloat16().float(), atol=1e-2, rtol=1e-2)
