"""The torch backend without Ray: step-0 identities and micro-batch invariance of a whole step."""

import copy

import pytest
import torch

from slime_ray.args import parse_args
from slime_ray.train.backends.torch_backend import TorchTrainer
from slime_ray.types import Sample, SampleStatus, samples_to_arrow

import pyarrow as pa


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("m") / "model")


def _args(model_dir, *extra):
    _, args = parse_args(["--hf-checkpoint", str(model_dir), "--prompt-data", "x.jsonl",
                          "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--lr", "1e-2",
                          "--torch-num-threads", "1", *extra])
    return args


def _table(seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(8):
        plen, rlen = 3 + i % 3, 2 + (i * 5) % 7
        toks = torch.randint(3, 400, (plen + rlen,), generator=g).tolist()
        samples.append(Sample(index=i, group_index=i // 4, tokens=toks, response_length=rlen,
                              rollout_log_probs=[-1.0] * rlen, reward=float(i % 2),
                              status=SampleStatus.COMPLETED, weight_versions=[0]))
    t = samples_to_arrow(samples)
    raw = [float(i % 2) for i in range(8)]
    t = t.append_column("raw_reward", pa.array(raw, pa.float32()))
    # hand-normalised group rewards: [0,1,0,1] -> mean .5, unbiased std .57735 -> +-0.866
    return t.append_column("train_reward", pa.array([-0.866, 0.866] * 4, pa.float32()))


def test_step0_ppo_kl_and_kl_loss_are_zero(model_dir):
    tr = TorchTrainer(_args(model_dir, "--use-kl-loss", "--kl-loss-coef", "0.1", "--micro-batch-size", "2"))
    m = tr.train(0, _table())
    assert abs(m["train/ppo_kl"]) < 1e-8
    assert abs(m["train/kl_loss"]) < 1e-8
    assert m["train/pg_clipfrac"] == 0.0
    assert m["train/grad_norm"] > 0
    assert m["train/entropy"] > 0


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean"])
def test_micro_batch_split_does_not_change_the_step(model_dir, mode):
    # 1 micro-batch of 8 vs 8 micro-batches of 1: same loss, same accumulated gradient.
    # (Parameters after AdamW are not compared: its first step is ~lr*sign(g), which turns
    # float noise on near-zero gradients into lr-sized differences.)
    a = TorchTrainer(_args(model_dir, "--micro-batch-size", "8", "--loss-agg-mode", mode, "--clip-grad", "0"))
    b = TorchTrainer(_args(model_dir, "--micro-batch-size", "1", "--loss-agg-mode", mode, "--clip-grad", "0"))
    ma, mb = a.train(0, _table()), b.train(0, _table())
    assert ma["train/loss"] == pytest.approx(mb["train/loss"], rel=1e-5, abs=1e-7)
    assert ma["train/grad_norm"] == pytest.approx(mb["train/grad_norm"], rel=1e-5)
    ga = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        torch.testing.assert_close(p.grad, ga[name].grad, rtol=1e-4, atol=1e-7)


def test_parameters_move_and_two_steps_per_rollout(model_dir):
    tr = TorchTrainer(_args(model_dir, "--global-batch-size", "4", "--micro-batch-size", "2"))
    before = copy.deepcopy(tr.get_weights())
    m = tr.train(0, _table())
    after = tr.get_weights()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    assert set(m) >= {"train/loss", "train/pg_loss", "train/grad_norm", "train/entropy"}


def test_save_and_load_round_trip(model_dir, tmp_path):
    tr = TorchTrainer(_args(model_dir))
    tr.train(0, _table())
    path = tr.save(str(tmp_path), 0, {"note": "x"})
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "0"
    other = TorchTrainer(_args(model_dir))
    meta = other.load(path)
    assert meta["note"] == "x"
    wa, wb = tr.get_weights(), other.get_weights()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) == 0.0


def _count_old_forwards(tr):
    calls = []
    orig = tr._log_probs_rows

    def counted(model, batch, chunks):
        calls.append(model is tr.model)
        return orig(model, batch, chunks)

    tr._log_probs_rows = counted
    return calls


def test_one_optimizer_step_uses_the_training_forward_as_old_log_probs(model_dir):
    # one optimizer step per rollout (global batch = rollout): the old log-probs are the training
    # forward's own, detached -> no separate policy forward, and the same step as with the forward
    args = _args(model_dir, "--use-kl-loss", "--kl-loss-coef", "0.1", "--micro-batch-size", "2",
                 "--use-tis", "--clip-grad", "0")
    skip, full = TorchTrainer(args), TorchTrainer(copy.deepcopy(args))
    full._old_is_current = lambda steps: False  # slime's behaviour: always recompute
    calls_skip, calls_full = _count_old_forwards(skip), _count_old_forwards(full)
    t = _table()
    m_skip, m_full = skip.train(0, t), full.train(0, t)
    assert calls_skip == [False]          # only the reference model's forward
    assert calls_full == [True, False]    # old policy + reference
    for k in ("train/loss", "train/pg_loss", "train/kl_loss", "train/entropy", "train/tis", "train/grad_norm"):
        assert m_skip[k] == pytest.approx(m_full[k], rel=1e-5, abs=1e-7), k
    assert m_skip["train/ppo_kl"] == 0.0 and abs(m_full["train/ppo_kl"]) < 1e-8
    for (n, p), q in zip(skip.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("extra", [
    ["--global-batch-size", "4"],                                   # two optimizer steps per rollout
    ["--advantage-estimator", "reinforce_plus_plus", "--kl-coef", "0.05"],  # KL in the reward needs them
])
def test_old_log_probs_are_recomputed_when_they_differ_from_the_training_forward(model_dir, extra):
    tr = TorchTrainer(_args(model_dir, "--micro-batch-size", "2", *extra))
    calls = _count_old_forwards(tr)
    m = tr.train(0, _table())
    assert calls[0] is True, "the old policy's forward must run"
    if "--global-batch-size" in extra:  # the second step's ratio moved off 1
        assert m["train/ppo_kl"] != 0.0


def test_train_compile_gives_the_eager_step(model_dir):
    # --train-compile true: every decoder layer torch.compile'd (dynamic shapes); same step as eager
    eager = TorchTrainer(_args(model_dir, "--micro-batch-size", "4", "--clip-grad", "0"))
    comp = TorchTrainer(_args(model_dir, "--micro-batch-size", "4", "--clip-grad", "0", "--train-compile", "true"))
    assert comp.compiled and not eager.compiled
    assert [n for n, _ in comp.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    for step in range(2):  # two rollouts: the second reuses the graph (other sequence lengths)
        t = _table(seed=step)
        m_e, m_c = eager.train(step, t), comp.train(step, t)
        for k in ("train/loss", "train/pg_loss", "train/entropy", "train/grad_norm"):
            assert m_c[k] == pytest.approx(m_e[k], rel=1e-4, abs=1e-6), (step, k)
    # the last step's gradients (parameters after AdamW are not compared: its first steps are
    # ~lr*sign(g), which turns float noise on near-zero gradients into lr-sized differences)
    for (n, p), q in zip(comp.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_weights_for_sync_share_memory_and_drop_tied_duplicates(model_dir):
    tr = TorchTrainer(_args(model_dir))
    view, copies = tr.weights_for_sync(), tr.get_weights()
    tied = tr.model.config.tie_word_embeddings
    assert set(copies) - set(view) == ({"lm_head.weight"} if tied else set())
    for k, v in view.items():
        assert torch.equal(v, copies[k]), k
    p = dict(tr.model.named_parameters())["model.embed_tokens.weight"]
    assert view["model.embed_tokens.weight"].data_ptr() == p.data_ptr()      # no copy on CPU
    assert copies["model.embed_tokens.weight"].data_ptr() != p.data_ptr()    # get_weights copies


def test_functional_dropout_in_the_config_keeps_the_old_log_prob_forward(model_dir):
    # e.g. OPT's config.dropout is applied functionally (no nn.Dropout module): train != eval forward
    tr = TorchTrainer(_args(model_dir, "--micro-batch-size", "2"))
    assert tr._old_is_current(1)
    tr.model.config.dropout = 0.1
    assert not tr._old_is_current(1)


def test_adamw_is_fused_on_cpu_and_matches_the_loop():
    """The trainers' AdamW uses torch's fused kernel on CPU (as TRL's default optim does); its
    step equals the per-parameter loop's to float rounding."""
    import torch

    from slime_ray.train.backends import adamw

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    start = [p.detach().clone() for p in a]
    fused = adamw(a, lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    loop = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for step in range(3):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        loop.step()
    for p, q, p0 in zip(a, b, start):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-6)
        assert (p - p0).abs().min() > 1e-3  # three steps of lr 1e-2 moved every element
