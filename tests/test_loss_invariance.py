"""Loss aggregation is independent of the micro-batch / data-parallel split.

Sample 1 has 2 response tokens with per-token loss 1.0, sample 2 has 6 tokens with loss 0.0.
Global token mean = (1 + 1 + 0·6) / 8 = 0.25 whether both samples share a micro-batch, sit in
two micro-batches, or live on two gloo ranks, provided each piece divides by the GLOBAL
denominators (num_tokens = 8, num_samples = 2) and the pieces / gradients are summed.
Seq-mean-token-mean: (2/2 + 0/6) / 2 = 0.5 under the same splits.

The per-token loss is ``target + (logp - sg(logp))``: its value is exactly the target, its
gradient is that of the response log-probs of a tiny LM, so gradients are non-trivial.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_ray.train.algorithms import aggregate_loss
from slime_ray.train.logprobs import response_log_probs_from_model_logits

# (prompt, response, per-token loss value)
SAMPLES = [([1, 2], [3, 4], 1.0), ([5], [6, 7, 8, 9, 10, 11], 0.0)]
GLOBAL = {"token-mean": ({"num_tokens": 8}, 0.25), "seq-mean-token-mean": ({"num_samples": 2}, 0.5)}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))


def _micro_batch_loss(model, samples, mode) -> torch.Tensor:
    T = max(len(p) + len(r) for p, r, _ in samples)
    L = max(len(r) for _, r, _ in samples)
    tokens = torch.zeros(len(samples), T, dtype=torch.long)
    target = torch.zeros(len(samples), L)
    mask = torch.zeros(len(samples), L)
    for b, (p, r, value) in enumerate(samples):
        tokens[b, : len(p) + len(r)] = torch.tensor(p + r)
        target[b, : len(r)] = value
        mask[b, : len(r)] = 1
    lp, _ = response_log_probs_from_model_logits(
        model(tokens), tokens, [len(p) for p, _, _ in samples], [len(r) for _, r, _ in samples], 1.0
    )
    per_token = target + (lp - lp.detach())  # value = target, gradient = d logp
    return aggregate_loss(per_token, mask, mode, **GLOBAL[mode][0])


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _run_split(splits, mode):
    """Accumulate gradients over micro-batches, as a trainer does; return (Σ loss, grads)."""
    model = _model()
    total = 0.0
    for micro_batch in splits:
        loss = _micro_batch_loss(model, micro_batch, mode)
        loss.backward()
        total += float(loss.detach())
    return total, _grads(model)


def _assert_grads_equal(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", list(GLOBAL))
def test_micro_batch_split_invariance(mode):
    expected = GLOBAL[mode][1]
    loss_one, g_one = _run_split([SAMPLES], mode)
    loss_two, g_two = _run_split([[SAMPLES[0]], [SAMPLES[1]]], mode)
    assert loss_one == pytest.approx(expected, abs=1e-7)
    assert loss_two == pytest.approx(expected, abs=1e-7)
    assert any(g.abs().sum() > 0 for g in g_one)
    _assert_grads_equal(g_one, g_two)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for mode in GLOBAL:
            model = _model()
            loss = _micro_batch_loss(model, [SAMPLES[rank]], mode)
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            total = loss.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            result[mode] = (float(total), _grads(model))
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_two_ranks_match_single_batch():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        result = torch.load(os.path.join(out_dir, "rank0.pt"))
    for mode, (_, expected) in GLOBAL.items():
        loss, grads = result[mode]
        assert loss == pytest.approx(expected, abs=1e-7), mode
        _, g_one = _run_split([SAMPLES], mode)
        _assert_grads_equal(g_one, grads)
