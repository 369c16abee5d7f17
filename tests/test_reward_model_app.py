"""The reward-model Serve app: a tiny random sequence-classification Llama scores pairs."""

from __future__ import annotations

import asyncio
import os
import socket
from argparse import Namespace
from pathlib import Path

import pytest

REPO_ROOT = str(Path(__file__).resolve().parents[1])
PAIRS = [{"prompt": "What is 3 + 4?", "response": "The answer is 7."},
         {"prompt": [{"role": "user", "content": "Compute 2 * 3."}], "response": "\\boxed{6}"},
         {"prompt": "Tom has 3 apples", "response": ""}]


def _tiny_rm_dir(path: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from slime_ray.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _tiny_rm_dir(tmp_path_factory.mktemp("rm"))


def test_reward_model_scores_batch_independent(rm_dir):
    from serve_apps.reward_model_app import RewardModel

    rm = RewardModel(rm_dir)
    batched = rm.score(PAIRS)
    alone = [rm.score([p])[0] for p in PAIRS]
    assert len(batched) == 3 and len(set(batched)) == 3  # different pairs, different rewards
    assert batched == pytest.approx(alone, abs=1e-5)  # padding does not change a pair's reward
    with pytest.raises(ValueError, match="'prompt' and 'response'"):
        rm.score([{"prompt": "x"}])


@pytest.mark.ray
def test_reward_model_app_over_http_and_remote_rm(rm_dir):
    import httpx
    import ray
    from ray import serve

    from serve_apps.reward_model_app import RewardModel, build_reward_model_app
    from slime_ray.rollout.rewards import remote_reward
    from slime_ray.types import Sample

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    expected = RewardModel(rm_dir).score(PAIRS)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_reward_model_app(rm_dir, num_cpus=0.5), name="rm", route_prefix="/rm")
        url = f"http://127.0.0.1:{port}/rm/score"
        one = httpx.post(url, json={**PAIRS[0], "label": "7"}, timeout=60)
        assert one.status_code == 200 and one.json()["reward"] == pytest.approx(expected[0], abs=1e-5)
        many = httpx.post(url, json={"pairs": PAIRS}, timeout=60).json()["rewards"]
        assert many == pytest.approx(expected, abs=1e-5)
        assert httpx.post(url, json={"prompt": "x"}, timeout=60).status_code == 400
        assert handle.score.remote(PAIRS).result() == pytest.approx(expected, abs=1e-5)

        args = Namespace(rm_url=url, rm_timeout=30)
        sample = Sample(prompt=PAIRS[0]["prompt"], response=PAIRS[0]["response"], label="7")
        assert asyncio.run(remote_reward(args, sample)) == pytest.approx(expected[0], abs=1e-5)
    finally:
        serve.shutdown()
        ray.shutdown()
