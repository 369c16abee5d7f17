"""Shared helpers of the GPU benchmarks: random-init model folders and synthetic rollout tables."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

ASSETS = Path(__file__).parent / "assets" / "smollm2-135m"

# ~1.5B Llama (28 layers, d=2048, ffn 5504, vocab 32000, untied): 1.55e9 parameters
LLAMA_1P5B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096,
                  tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"])
# SmolLM2-135M with 8 heads of 72 (4 KV heads) instead of 9 of 64: same size, but TP=2 can split it
SMOL_TP2 = dict(num_attention_heads=8, num_key_value_heads=4)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def model_dir(kind: str, out: str | None = None, tiny: bool = False, vocab_size: int | None = None) -> str:
    """An HF folder with random weights: kind "135m" (SmolLM2-135M config), "135m-tp2" (the same with
    8 heads / 4 KV heads, so tensor parallelism of 2 can split it) or "1.5b".

    ``vocab_size`` overrides the config's (jobs that tokenize with SmolLM2's tokenizer need 49152)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = out or tempfile.mkdtemp(prefix=f"bench_{kind}_")
    Path(out).mkdir(parents=True, exist_ok=True)
    for f in ASSETS.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out)
    cfg = json.loads((ASSETS / "config.json").read_text())
    if kind == "1.5b":
        cfg.update(LLAMA_1P5B)
    elif kind == "135m-tp2":
        cfg.update(SMOL_TP2)
    if tiny:
        cfg.update(TINY)
    if vocab_size:
        cfg["vocab_size"] = vocab_size
    (Path(out) / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    model.save_pretrained(out)
    return out


def rollout_table(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> pa.Table:
    """n samples of fixed prompt/response lengths, GRPO-like rewards, as the trainer reads them."""
    from slime_ray.types import Sample, SampleStatus, samples_to_arrow

    g = torch.Generator().manual_seed(seed)
    samples = [Sample(index=i, group_index=i // 8,
                      tokens=torch.randint(3, vocab, (prompt_len + response_len,), generator=g).tolist(),
                      response_length=response_len, rollout_log_probs=[-1.0] * response_len,
                      reward=float(i % 2), status=SampleStatus.COMPLETED, weight_versions=[0])
               for i in range(n)]
    t = samples_to_arrow(samples)
    t = t.append_column("raw_reward", pa.array([float(i % 2) for i in range(n)], pa.float32()))
    return t.append_column("train_reward", pa.array([(-1.0) ** (i + 1) for i in range(n)], pa.float32()))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *a, **k):
    sync()
    t = time.perf_counter()
    out = fn(*a, **k)
    sync()
    return out, time.perf_counter() - t
