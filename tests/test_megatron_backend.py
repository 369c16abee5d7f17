"""Megatron backend: HF <-> Megatron conversion, vocab-parallel log-probs, MODEL_ARGS checks, and
HF / Megatron forward parity on CPU (gloo).

The conversion and vocab-parallel tests are pure torch and always run; the tests that build a
Megatron ``GPTModel`` are skipped when megatron-core is not installed
(``pip install 'slime_ray[megatron]'``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slime_ray.train.backends import megatron_convert as conv
from slime_ray.train.backends.vocab_parallel import vocab_parallel_log_probs_and_entropy
from slime_ray.train.logprobs import entropy_from_logits, log_probs_from_logits

HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None and \
    importlib.util.find_spec("megatron.core") is not None
needs_megatron = pytest.mark.skipif(
    not HAVE_MEGATRON, reason="megatron-core not installed: pip install 'slime_ray[megatron]'")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- helpers
def _tiny_hf(kind: str, tie: bool = True, seed: int = 0, **overrides):
    """A random tiny HF model of family ``kind`` (llama / qwen2 / qwen3)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, \
        Qwen3ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[kind]
    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, tie_word_embeddings=tie)
    if kind == "qwen3":
        kw["head_dim"] = 16  # != hidden / heads, as in Qwen3-4B
    kw.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).float().eval()
    with torch.no_grad():  # random (non-unit) norms and biases so the layout is really checked
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return model


def _hf_state(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max abs diff {(a[k] - b[k]).abs().max()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank, fn, world_size, port, out_dir, args):
    torch.set_num_threads(1)
    torch.save(fn(rank, world_size, port, *args), os.path.join(out_dir, f"{rank}.pt"))


def _run_gloo(fn, world_size: int, *args) -> list:
    """Run ``fn(rank, world_size, port, *args)`` on ``world_size`` spawned gloo ranks; their results."""
    import tempfile

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_entry, args=(fn, world_size, _free_port(), out_dir, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


# ---------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("kind, tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_hf_megatron_hf_is_exact(kind, tie, tp):
    model = _tiny_hf(kind, tie)
    spec = conv.ModelSpec.from_hf_config(model.config, make_vocab_size_divisible_by=128, tp=tp)
    assert spec.padded_vocab_size == (512 if tp == 2 else 384)  # 300 padded: vocab padding exercised
    hf = _hf_state(model)
    shards = [conv.hf_to_megatron_shard(hf, spec, r, tp) for r in range(tp)]
    if tp == 2:  # each rank holds half of every split tensor
        name = "decoder.layers.0.mlp.linear_fc1.weight"
        assert shards[0][name].shape == (spec.ffn_hidden_size, spec.hidden_size)
        assert shards[0]["embedding.word_embeddings.weight"].shape[0] == spec.padded_vocab_size // 2
    _assert_same(conv.megatron_shards_to_hf(shards, spec), hf)


def test_qkv_layout_is_per_query_group():
    spec = conv.ModelSpec(num_layers=1, hidden_size=1, ffn_hidden_size=2, num_attention_heads=4,
                          num_query_groups=2, kv_channels=1, vocab_size=4, padded_vocab_size=4,
                          tie_embeddings=True, qkv_bias=False, qk_layernorm=False, norm_epsilon=1e-6,
                          rotary_base=1e4, max_position_embeddings=8)
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # heads q0..q3
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = conv.fuse_qkv(q, k, v, spec).flatten().tolist()
    assert fused == [0, 1, 10, 20, 2, 3, 11, 21]  # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    # TP=2 rank 1 holds exactly group 1; linear_fc1 rank r holds [gate_r; up_r]
    assert conv.shard_param("decoder.layers.0.self_attention.linear_qkv.weight",
                            torch.tensor(fused).unsqueeze(1), 1, 2).flatten().tolist() == [2, 3, 11, 21]
    fc1 = torch.arange(4.0).unsqueeze(1)  # gate = [0, 1], up = [2, 3]
    assert conv.shard_param("decoder.layers.0.mlp.linear_fc1.weight", fc1, 0, 2).flatten().tolist() == [0, 2]


def test_streamed_buckets_respect_buffer_size_and_cover_every_weight():
    model = _tiny_hf("llama", tie=False)
    spec = conv.ModelSpec.from_hf_config(model.config, tp=2)
    hf = _hf_state(model)
    shards = [conv.hf_to_megatron_shard(hf, spec, r, 2) for r in range(2)]

    def gather(name, shard):  # stands in for the TP all-gather
        return [s[name] for s in shards]

    buffer = 20_000
    buckets = list(conv.iter_hf_buckets(shards[0].items(), spec, buffer, gather))
    assert len(buckets) > 3
    for b in buckets:  # never over the buffer, except the 38 kB embedding / lm_head on their own
        assert sum(t.numel() * 4 for _, t in b) <= buffer or len(b) == 1
    _assert_same(dict(kv for b in buckets for kv in b), hf)


def test_smollm2_135m_shape_round_trip():
    """SmolLM2-135M's config (576 hidden, 9 heads / 3 groups, head_dim 64, vocab 49152, tied),
    2 of its 30 layers to keep the test light; TP=3 splits its 3 query groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    hf = _hf_state(LlamaForCausalLM(cfg))
    spec = conv.ModelSpec.from_hf_config(cfg, tp=3)
    assert (spec.kv_channels, spec.num_query_groups, spec.rotary_base) == (64, 3, 100000.0)
    shards = [conv.hf_to_megatron_shard(hf, spec, r, 3) for r in range(3)]
    assert shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((3 + 2) * 64, 576)
    _assert_same(conv.megatron_shards_to_hf(shards, spec), hf)


# ---------------------------------------------------------------------------------------- MODEL_ARGS
def _model_args(script: str) -> dict:
    """The MODEL_ARGS array of an examples/models script, parsed like slime_ray.args does."""
    out = subprocess.run(["bash", "-c", f"source {shlex.quote(str(script))}; printf '%s\\n' \"${{MODEL_ARGS[@]}}\""],
                         capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    args, i = {}, 0
    while i < len(out):
        name = out[i][2:]
        if i + 1 < len(out) and not out[i + 1].startswith("--"):
            args[name], i = out[i + 1], i + 2
        else:
            args[name], i = True, i + 1
    return args


def _public_configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "smollm2-135M": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
        "qwen3-4B": Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
        "qwen2.5-7B": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
        "llama3-8B": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    }


@pytest.mark.parametrize("name", ["smollm2-135M", "qwen3-4B", "qwen2.5-7B", "llama3-8B"])
def test_example_model_args_match_public_configs(name):
    conv.check_model_args(_model_args(REPO / "examples" / "models" / f"{name}.sh"), _public_configs()[name])


def test_glm4_script_defines_the_model_args():
    args = _model_args(REPO / "examples" / "models" / "glm4-9B.sh")
    assert args["num-layers"] == "40" and args["num-query-groups"] == "2" and args["add-qkv-bias"] is True


def test_check_model_args_names_the_mismatched_fields():
    args = _model_args(REPO / "examples" / "models" / "qwen3-4B.sh")
    cfg = _public_configs()["qwen3-4B"]
    with pytest.raises(ValueError) as e:
        conv.check_model_args({**args, "kv-channels": "80", "rotary-base": "10000"}, cfg)
    assert "--kv-channels 80" in str(e.value) and "head_dim=128" in str(e.value)
    assert "--rotary-base 10000" in str(e.value)
    with pytest.raises(ValueError, match="--qk-layernorm is missing"):
        conv.check_model_args({k: v for k, v in args.items() if k != "qk-layernorm"}, cfg)
    with pytest.raises(ValueError, match="--untie-embeddings-and-output-weights is given"):
        conv.check_model_args({**args, "untie-embeddings-and-output-weights": True}, cfg)
    conv.check_model_args({}, cfg)  # no MODEL_ARGS: the model comes from the HF config


def test_missing_megatron_names_the_extra(monkeypatch):
    from slime_ray.train.backends import megatron as backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n.startswith("megatron") else real(n, *a))
    with pytest.raises(ImportError, match=re.escape("pip install 'slime_ray[megatron]'")):
        backend.check_megatron_available()


# ---------------------------------------------------------------------------------------- vocab parallel
def test_vocab_parallel_single_rank_equals_logprobs_module():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    lp, ent = vocab_parallel_log_probs_and_entropy(logits, labels, 0, 11, temperature=0.7)
    assert torch.allclose(lp, log_probs_from_logits(logits, labels, 0.7), atol=1e-5)
    assert torch.allclose(ent, entropy_from_logits(logits, 0.7), atol=1e-5)
    padded = torch.cat([logits, torch.full((2, 5, 5), 50.0)], dim=-1)  # vocab padding is ignored
    lp2, ent2 = vocab_parallel_log_probs_and_entropy(padded, labels, 0, 11, temperature=0.7)
    assert torch.allclose(lp2, lp) and torch.allclose(ent2, ent)


def _vocab_parallel_worker(rank, world, port, logits, labels):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    width = 8  # 13 true columns + 3 padding over 2 ranks
    local = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    lp, ent = vocab_parallel_log_probs_and_entropy(local, labels, rank * width, 13, 0.8, dist.group.WORLD)
    (lp.sum() + 0.5 * ent.sum()).backward()
    dist.destroy_process_group()
    return lp.detach(), ent.detach(), local.grad


def test_vocab_parallel_two_gloo_ranks_match_full_vocab_values_and_grads():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 16) * 2
    labels = torch.randint(0, 13, (2, 3))
    (lp0, ent0, g0), (lp1, ent1, g1) = _run_gloo(_vocab_parallel_worker, 2, logits, labels)
    full = logits[..., :13].clone().requires_grad_(True)
    lp, ent = log_probs_from_logits(full, labels, 0.8), entropy_from_logits(full, 0.8)
    (lp.sum() + 0.5 * ent.sum()).backward()
    for got in (lp0, lp1):
        assert torch.allclose(got, lp, atol=1e-5)
    assert torch.allclose(ent0, ent, atol=1e-5) and torch.allclose(ent1, ent, atol=1e-5)
    assert torch.allclose(torch.cat([g0, g1[..., :5]], dim=-1), full.grad, atol=1e-5)
    assert torch.all(g1[..., 5:] == 0)


# ---------------------------------------------------------------------------------------- Megatron model
def _rollout_table(vocab: int, seed: int = 0):
    """4 samples (2 groups of 2), varied prompt / response lengths, rewards and a tool-token mask."""
    import pyarrow as pa

    from slime_ray.types import Sample, samples_to_arrow

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (p, r) in enumerate([(3, 4), (5, 2), (2, 6), (4, 3)]):
        tokens = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        mask = [1] * r
        if r > 3:
            mask[1] = 0  # a tool token
        samples.append(Sample(index=i, group_index=i // 2, tokens=tokens, response_length=r, loss_mask=mask,
                              rollout_log_probs=[-1.0] * r, reward=float(i % 2)))
    table = samples_to_arrow(samples)
    rewards = [-0.7, 0.7, 0.7, -0.7]
    table = table.append_column("train_reward", pa.array(rewards, pa.float32()))
    return table.append_column("raw_reward", pa.array([float(i % 2) for i in range(4)], pa.float32()))


def _args(hf_dir, *extra):
    from slime_ray.args import parse_args

    _, args = parse_args(["--prompt-data", "x.jsonl", "--hf-checkpoint", str(hf_dir), "--rollout-batch-size", "2",
                          "--n-samples-per-prompt", "2", "--global-batch-size", "4", "--micro-batch-size", "1",
                          "--advantage-estimator", "grpo", "--use-kl-loss", "--kl-loss-coef", "0.01",
                          "--entropy-coef", "0.01", "--lr", "1e-3", "--rollout-temperature", "0.8",
                          "--torch-num-threads", "1", "--train-backend", "megatron", *extra])
    return args


def _hf_response_log_probs(hf_dir, batch, temperature):
    from transformers import AutoModelForCausalLM

    from slime_ray.train.logprobs import response_log_probs_from_model_logits

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    return response_log_probs_from_model_logits(logits, batch.tokens, batch.prompt_lengths,
                                                batch.response_lengths, temperature)


def _megatron_worker(rank, world, port, dirs):
    """Phase A: TP=2 (parity, exact weights, one train step) on several families.
    Phase B: TP=1 x DP=2 (one train step on the same data)."""
    from megatron.core import parallel_state as ps

    from slime_ray.train.backends.megatron import MegatronTrainer
    from slime_ray.train.batch import batch_from_arrow

    out = {}
    for phase, tp in (("tp2", "2"), ("dp2", "1")):
        for name, hf_dir in dirs.items():
            if phase == "dp2" and name != "llama":
                continue
            trainer = MegatronTrainer(_args(hf_dir, "--tensor-model-parallel-size", tp), rank, world)
            trainer.init_distributed("127.0.0.1", port)
            table = _rollout_table(trainer.spec.vocab_size)
            batch = batch_from_arrow(table)
            with torch.no_grad():
                lp, ent = trainer.forward_log_probs(trainer.model, batch)
            ref_lp, ref_ent = _hf_response_log_probs(hf_dir, batch, 0.8)
            res = {"lp_diff": float((lp - ref_lp).abs().max()), "ent_diff": float((ent - ref_ent).abs().max())}
            if name == "llama":
                res["weights_before"] = trainer.get_weights()
                res["sync_weights"] = trainer.weights_for_sync()  # what an object-store push sends
                res["metrics"] = trainer.train(0, table)
                res["weights_after"] = trainer.get_weights()
                ckpt = trainer.save(str(Path(hf_dir).parent / f"ckpt_{phase}"), 0, {"note": phase})
                trainer.train(1, table)  # move away, then restore
                res["meta"] = trainer.load(ckpt)
                res["weights_loaded"] = trainer.get_weights()
            out[f"{phase}/{name}"] = res
        ps.destroy_model_parallel()
    return out


@pytest.mark.slow
@needs_megatron
def test_megatron_tp2_and_dp2_match_hf_and_torch_backend(tmp_path):
    """One 2-rank gloo run: TP=2 forward parity (Llama tied, Qwen2 untied + qkv bias, Qwen3 qk-norm),
    exact weights out of a TP=2 model, and one RL step at TP=2 and at DP=2 that agrees with the
    torch backend's step on the same data."""
    from slime_ray.testing import make_tiny_model_dir
    from slime_ray.train.backends.torch_backend import TorchTrainer

    dirs = {"llama": make_tiny_model_dir(tmp_path / "llama")}
    for kind, tie in (("qwen2", False), ("qwen3", True)):
        _tiny_hf(kind, tie, vocab_size=512).save_pretrained(tmp_path / kind)
        dirs[kind] = tmp_path / kind
    results = _run_gloo(_megatron_worker, 2, dirs)[0]  # rank 0 (ranks agree on metrics)

    for key, res in results.items():
        assert res["lp_diff"] < 1e-4 and res["ent_diff"] < 1e-4, (key, res)
    from transformers import AutoModelForCausalLM

    hf = _hf_state(AutoModelForCausalLM.from_pretrained(dirs["llama"], dtype=torch.float32))
    _assert_same(results["tp2/llama"]["weights_before"], hf)
    _assert_same(results["tp2/llama"]["sync_weights"], hf)  # HF names, full (TP-gathered) tensors

    torch_trainer = TorchTrainer(_args(dirs["llama"]), 0, 1)
    expected = torch_trainer.train(0, _rollout_table(torch_trainer.model.config.vocab_size))
    after = {k: v for k, v in torch_trainer.get_weights().items() if k in hf}
    for phase in ("tp2", "dp2"):
        got = results[f"{phase}/llama"]["metrics"]
        for k in ("train/loss", "train/pg_loss", "train/entropy", "train/kl_loss", "train/grad_norm"):
            assert abs(got[k] - expected[k]) <= 1e-4 * max(1.0, abs(expected[k])), (phase, k, got[k], expected[k])
        assert results[f"{phase}/llama"]["meta"]["note"] == phase
        _assert_same(results[f"{phase}/llama"]["weights_loaded"], results[f"{phase}/llama"]["weights_after"])
        moved = max(float((results[f"{phase}/llama"]["weights_after"][k] - hf[k]).abs().max()) for k in hf)
        assert moved > 1e-4  # the step changed the weights ...
        for k in hf:  # ... like the torch backend's AdamW step did
            assert torch.allclose(results[f"{phase}/llama"]["weights_after"][k], after[k], atol=2e-5), (phase, k)
