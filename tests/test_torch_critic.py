"""The PPO critic and the actor's advantage paths without Ray: value alignment, one critic step,
critic values -> GAE in the actor, the KL-in-reward path, and advantage whitening over 2 ranks."""

import os
import socket
import tempfile

import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp

from slime_ray.args import parse_args
from slime_ray.train import algorithms as algo
from slime_ray.train.backends.torch_backend import TorchTrainer
from slime_ray.train.backends.torch_critic import TorchCritic, response_values
from slime_ray.train.batch import batch_from_arrow
from slime_ray.types import Sample, SampleStatus, samples_to_arrow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "model")


def _args(model_dir, *extra):
    _, args = parse_args(["--hf-checkpoint", str(model_dir), "--prompt-data", "x.jsonl",
                          "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--lr", "1e-2",
                          "--micro-batch-size", "2", "--torch-num-threads", "1", *extra])
    return args


def _table(seed=0):
    """8 samples, prompts of 3-5 tokens, responses of 2-8 tokens (the last one partly masked)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(8):
        plen, rlen = 3 + i % 3, 2 + (i * 5) % 7
        toks = torch.randint(3, 400, (plen + rlen,), generator=g).tolist()
        mask = [1] * rlen if i != 7 else [1, 0, 0] + [1] * (rlen - 3)
        samples.append(Sample(index=i, group_index=i // 4, tokens=toks, response_length=rlen,
                              loss_mask=mask, rollout_log_probs=[-1.0] * rlen, reward=float(i % 2),
                              status=SampleStatus.COMPLETED, weight_versions=[0]))
    t = samples_to_arrow(samples)
    raw = [float(i % 2) for i in range(8)]
    t = t.append_column("raw_reward", pa.array(raw, pa.float32()))
    return t.append_column("train_reward", pa.array(raw, pa.float32()))


def test_response_values_alignment_by_hand():
    # sample 0: prompt 2, response 3 -> positions 1, 2, 3; sample 1: prompt 3, response 1 -> 2
    v = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    out = response_values(v, torch.tensor([2, 3]), torch.tensor([3, 1]))
    assert out.tolist() == [[1.0, 2.0, 3.0], [7.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        response_values(v, torch.tensor([0, 3]), torch.tensor([3, 1]))


def test_critic_values_one_per_response_token_aligned_like_log_probs(model_dir):
    args = _args(model_dir, "--advantage-estimator", "ppo")
    critic = TorchCritic(args)
    table = _table()
    values = critic.compute_values(table)
    batch = batch_from_arrow(table)
    assert values.shape == batch.loss_mask.shape  # [B, L], L = longest response, as log-probs
    for b in range(len(batch)):
        p, n = int(batch.prompt_lengths[b]), int(batch.response_lengths[b])
        toks = batch.tokens[b: b + 1, : p + n]  # unpadded, alone
        with torch.no_grad():
            full = critic.model(toks, torch.ones_like(toks))[0]  # [p + n]
        torch.testing.assert_close(values[b, :n], full[p - 1: p + n - 1], rtol=1e-4, atol=1e-5)
        assert (values[b, n:] == 0).all()


def test_one_critic_step_lowers_the_value_loss(model_dir):
    args = _args(model_dir, "--advantage-estimator", "ppo", "--critic-lr", "1e-3")
    critic = TorchCritic(args)
    table = _table()
    mask = batch_from_arrow(table).loss_mask
    returns = torch.linspace(-1, 1, 8)[:, None] * mask  # fixed targets
    old = critic.compute_values(table)
    m = critic.train(0, table, old, returns)
    assert set(m) == {"critic/value_loss", "critic/value_clipfrac", "critic/values_mean", "critic/grad_norm"}
    before = float(algo.aggregate_loss(algo.value_loss(old, old, returns, None), mask, "seq-mean-token-mean"))
    assert m["critic/value_loss"] == pytest.approx(before, rel=1e-4)  # old = values: clip inactive
    assert m["critic/value_clipfrac"] == 0.0 and m["critic/grad_norm"] > 0
    new = critic.compute_values(table)
    after = float(algo.aggregate_loss(algo.value_loss(new, old, returns, None), mask, "seq-mean-token-mean"))
    assert after < before


def test_actor_gae_from_critic_values_and_train(model_dir):
    args = _args(model_dir, "--advantage-estimator", "ppo", "--gamma", "0.9", "--lambd", "0.8")
    actor, critic = TorchTrainer(args), TorchCritic(args)
    table = _table()
    mask = batch_from_arrow(table).loss_mask
    values = critic.compute_values(table)
    out = actor.compute_advantages(0, table, values)
    adv, ret = algo.gae(_rewards_at_last(table, mask), values, mask, 0.9, 0.8)
    torch.testing.assert_close(out["advantages"], adv)
    torch.testing.assert_close(out["returns"], (out["advantages"] + values) * mask)
    before = {k: v.clone() for k, v in actor.get_weights().items()}
    metrics = actor.train(0, table)  # reuses compute_advantages' work
    assert actor._prepared is None and metrics["train/grad_norm"] > 0
    assert max((actor.get_weights()[k] - before[k]).abs().max().item() for k in before) > 0
    with pytest.raises(ValueError, match="critic values"):
        actor.train(1, table)  # ppo without values


def _rewards_at_last(table, mask):
    r = torch.tensor(table.column("train_reward").to_pylist())
    return algo._add_at_last_token(torch.zeros_like(mask), mask, r)


def test_kl_in_reward_uses_reference_model(model_dir):
    # reinforce_plus_plus, --kl-coef 1, γ = 1: after the policy moves away from the reference,
    # the return of the first token = R - Σ_t m_t·kl_t, kl_t = k1(old log-probs, ref log-probs).
    args = _args(model_dir, "--advantage-estimator", "reinforce_plus_plus", "--kl-coef", "1.0",
                 "--kl-loss-type", "k1")
    actor = TorchTrainer(args)
    assert actor.ref_model is not None
    table = _table()
    first = actor.compute_advantages(0, table)
    batch = batch_from_arrow(table)
    # step 0: policy = reference, the KL reward is 0 and returns are the reward on every token
    torch.testing.assert_close(first["returns"], batch.rewards[:, None] * batch.loss_mask)
    actor.train(0, table)
    out = actor.compute_advantages(1, table)
    with torch.no_grad():
        old, _ = actor.forward_log_probs(actor.model, batch, with_entropy=False)
        ref, _ = actor.forward_log_probs(actor.ref_model, batch, with_entropy=False)
    kl_sum = ((old - ref) * batch.loss_mask).sum(-1)  # [B]
    assert kl_sum.abs().max() > 1e-4
    torch.testing.assert_close(out["returns"][:, 0], batch.rewards - kl_sum, rtol=1e-4, atol=1e-5)


def _whiten_worker(rank, world, port, model_dir, out_dir):
    args = _args(model_dir, "--advantage-estimator", "reinforce_plus_plus", "--normalize-advantages",
                 "--actor-num-gpus-per-node", str(world))
    tr = TorchTrainer(args, rank, world)
    tr.init_distributed("127.0.0.1", port)
    try:
        out = tr.compute_advantages(0, _table())["advantages"]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def test_normalize_advantages_across_two_ranks(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_whiten_worker, args=(2, port, str(model_dir), d), nprocs=2, join=True)
        two = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    torch.testing.assert_close(two[0], two[1])  # both ranks see the whole batch
    table = _table()
    mask = batch_from_arrow(table).loss_mask
    one = TorchTrainer(_args(model_dir, "--advantage-estimator", "reinforce_plus_plus",
                             "--normalize-advantages")).compute_advantages(0, table)["advantages"]
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-6)
    n = mask.sum()
    mean = (one * mask).sum() / n
    var = ((one - mean) ** 2 * mask).sum() / (n - 1)
    assert abs(float(mean)) < 1e-5 and float(var) == pytest.approx(1.0, rel=1e-4)
