"""The rollout Serve app on a local Ray: HTTP /generate, handles, batching, weight sync."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
import torch

from slime_ray.testing import make_tiny_model_dir

pytestmark = pytest.mark.ray

REPO_ROOT = str(Path(__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Replicas import slime_ray / serve_apps from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    import ray
    from ray import serve

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.rollout.engine_client import EngineClient

    model_dir = str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # never join a running cluster
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_rollout_app(
            model_dir, num_engines=2, max_batch_size=16, batch_wait_timeout_s=0.2, num_cpus_per_engine=1
        )
        serve.run(app, name="rollout", route_prefix="/")
        client = EngineClient.from_app("rollout")
        yield {"port": port, "client": client, "model_dir": model_dir}
    finally:
        serve.shutdown()
        ray.shutdown()


def _request(ids, **sp):
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, **sp}, "return_logprob": True}


def test_http_generate_health_weight_version(rollout):
    import httpx

    base = f"http://127.0.0.1:{rollout['port']}"
    r = httpx.post(f"{base}/generate", json=_request([5, 6, 7], temperature=0.7), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["output_ids"]) == len(body["output_log_probs"]) == body["completion_tokens"] > 0
    assert body["finish_reason"] in ("stop", "length")
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": body["finish_reason"]}
    assert meta["weight_version"] == body["weight_version"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == body["output_ids"]

    text = httpx.post(f"{base}/generate", json={"text": "What is", "sampling_params": {"max_new_tokens": 3}})
    assert text.status_code == 200 and text.json()["prompt_tokens"] > 0
    assert httpx.post(f"{base}/generate", json={"sampling_params": {}}).status_code == 400

    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["ok"] and len(health["engines"]) == 2
    wv = httpx.get(f"{base}/weight_version", timeout=30).json()
    assert wv["weight_versions"] == [wv["weight_version"]] * 2


def test_handle_generate_and_batching(rollout):
    client = rollout["client"]
    assert client.num_engines == 2

    async def many():
        reqs = [_request([3 + i, 9, 11], temperature=1.0, max_new_tokens=6) for i in range(16)]
        return await asyncio.gather(*[client.generate(r) for r in reqs])

    responses = asyncio.run(many())
    assert len(responses) == 16 and all(len(r["output_ids"]) > 0 for r in responses)
    assert {r["meta_info"]["engine_index"] for r in responses} == {0, 1}  # both engines used
    health = client.health()
    assert max(h["max_batch_size_seen"] for h in health) > 1  # concurrent requests were batched


def test_update_weights_object_ref_reaches_every_engine(rollout):
    import ray

    client = rollout["client"]
    current = client.get_engine_weights(0)
    gen = torch.Generator().manual_seed(7)
    new = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in current.items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied in the tiny model
    version = max(client.weight_versions()) + 1

    before = asyncio.run(client.generate(_request([5, 6, 7], temperature=0.0)))
    assert client.update_weights(ray.put(new), version) == [version, version]
    assert client.weight_versions() == [version, version]
    for i in range(client.num_engines):
        got = client.get_engine_weights(i)
        diff = max((got[n] - t).abs().max().item() for n, t in new.items())
        assert diff == 0.0, f"engine {i}: max abs diff {diff}"
    after = asyncio.run(client.generate(_request([5, 6, 7], temperature=0.0)))
    assert after["weight_version"] == version and after["meta_info"]["weight_version"] == version
    assert after["output_log_probs"] != before["output_log_probs"]


def test_bad_update_is_refused(rollout):
    client = rollout["client"]
    versions = client.weight_versions()
    with pytest.raises(Exception, match="shape mismatch"):
        client.update_weights({"model.norm.weight": torch.zeros(3)}, 99)
    assert client.weight_versions() == versions


def test_app_builder_args(rollout):
    from serve_apps.rollout_app import app_builder

    app = app_builder({"model_path": rollout["model_dir"], "num_engines": "3", "dtype": "float32"})
    assert app is not None
    with pytest.raises(ValueError, match="model_path"):
        app_builder({})
    with pytest.raises(ValueError, match="unknown"):
        app_builder({"model_path": "x", "bogus": "1"})


# ----------------------------------------------------------------------------- routing
def test_session_stays_on_one_engine_and_burst_spreads(rollout):
    client = rollout["client"]

    async def run():
        turns = []
        for turn in range(4):  # a multi-turn session: each turn after the previous one
            turns.append(await client.generate({**_request([5, 6, 7 + turn]), "session_id": "conv-a"}))
        burst = await asyncio.gather(*[client.generate(_request([4, 5 + i % 7], max_new_tokens=4))
                                       for i in range(64)])
        return turns, burst

    turns, burst = asyncio.run(run())
    assert len({t["meta_info"]["engine_index"] for t in turns}) == 1
    engines = [r["meta_info"]["engine_index"] for r in burst]
    assert {0, 1} == set(engines)
    assert min(engines.count(0), engines.count(1)) >= 16, engines  # least-loaded, not all on one
    assert all(r["finish_reason"] in ("stop", "length") and r["weight_version"] is not None for r in burst)


def test_concurrency_bound_waits_instead_of_failing(rollout):
    """More requests than --rollout-max-concurrency: the extra ones wait, none fail."""
    from ray import serve

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.rollout.engine_client import EngineClient

    app = build_rollout_app(rollout["model_dir"], num_engines=1, max_batch_size=4, max_concurrency=4,
                            batch_wait_timeout_s=0.05, num_cpus_per_engine=0.5)
    serve.run(app, name="bounded", route_prefix="/bounded")
    try:
        client = EngineClient.from_app("bounded")

        async def run():
            return await asyncio.gather(*[client.generate(_request([3, 4, 5 + i], max_new_tokens=3))
                                          for i in range(12)])

        responses = asyncio.run(run())
        assert len(responses) == 12 and all(r["completion_tokens"] > 0 for r in responses)
        assert client.health()[0]["max_batch_size_seen"] <= 4
    finally:
        serve.delete("bounded")


# ----------------------------------------------------------------------------- OpenAI routes
def test_openai_client_chat_and_stream(rollout):
    import openai

    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{rollout['port']}/v1", api_key="none", timeout=60)
    models = oa.models.list()
    assert len(models.data) == 1
    model = models.data[0].id
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    chat = oa.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.8,
                                      logprobs=True)
    choice = chat.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens == len(choice.logprobs.content) == len(choice.model_extra["token_ids"])
    assert all(lp.logprob <= 0 for lp in choice.logprobs.content)
    assert chat.model_extra["prompt_token_ids"] and choice.model_extra["weight_version"] is not None

    stream = oa.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish and finish[-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1].choices[0]
    tok = __import__("transformers").AutoTokenizer.from_pretrained(rollout["model_dir"])
    assert content == tok.decode(final.model_extra["token_ids"], skip_special_tokens=True)

    comp = oa.completions.create(model=model, prompt=["What is", "Compute"], max_tokens=5, n=2, logprobs=1)
    assert len(comp.choices) == 4
    assert all(len(c.logprobs.token_logprobs) == len(c.model_extra["token_ids"]) for c in comp.choices)


def test_openai_http_stream_is_sse_with_done(rollout):
    import httpx

    base = f"http://127.0.0.1:{rollout['port']}"
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    bad = httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
