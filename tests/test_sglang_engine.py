"""SGLangEngine against the SGLang TEST DOUBLE (tests/sglang_double.py), launched for real as
the server command; plus the flag pass-through, weight bucketing and the "no SGLang" check.

Tests taking the ``engine`` fixture also run against a real SGLang server when SGLang is
importable (``pytest -m sglang``; model from $SLIME_RAY_SGLANG_TEST_MODEL, default: the tiny
test model); those reading the double's ``/_test/`` routes are skipped there.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from slime_ray.args import ConfigError, parse_args
from slime_ray.engines import sglang as sg
from slime_ray.engines.sglang import (
    SGLangClient,
    SGLangEngine,
    SGLangError,
    bucket_named_tensors,
    build_server_cmd,
    check_engine_choice,
    sglang_engine_kwargs,
)
from slime_ray.testing import make_tiny_model_dir

DOUBLE_CMD = [sys.executable, str(Path(__file__).with_name("sglang_double.py"))]
DELAY = {"double-token-delay-s": "0.01"}  # passed through as --double-token-delay-s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def state_dict(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


@pytest.fixture(scope="module", params=[
    "double",
    pytest.param("sglang", marks=[pytest.mark.sglang, pytest.mark.skipif(
        not sg.sglang_available(), reason="SGLang is not installed (opt-in: pip install 'slime_ray[sglang]')")]),
])
def engine(request, model_dir):
    if request.param == "double":
        eng = SGLangEngine(model_dir, launch_cmd=DOUBLE_CMD, sglang_args=DELAY, start_timeout_s=60)
    else:
        eng = SGLangEngine(os.environ.get("SLIME_RAY_SGLANG_TEST_MODEL", model_dir),
                           sglang_args={"mem-fraction-static": "0.3"}, start_timeout_s=900)
    eng.is_double = request.param == "double"
    yield eng
    eng.shutdown()


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "engine" in request.fixturenames:
        eng = request.getfixturevalue("engine")
        if eng._paused:
            eng.resume()


def double(engine, route: str = "calls"):
    """GET a /_test/ route of the double (skips on a real server)."""
    if not engine.is_double:
        pytest.skip("inspects the test double's recorded calls")
    return httpx.get(f"{engine.client.base_url}/_test/{route}", timeout=10).json()


def calls(engine, route: str) -> list[dict]:
    return [c["body"] for c in double(engine) if c["route"] == route]


def req(ids=(5, 6, 7), n=4, **sp):
    return {"input_ids": list(ids), "sampling_params": {"max_new_tokens": n, **sp}, "return_logprob": True}


def scaled(state_dict, factor):
    return {k: v * factor for k, v in state_dict.items()}


def run_in_thread(fn, *args):
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(out=fn(*args)), daemon=True)
    t.start()
    return t, box


# ---------------------------------------------------------------- launch and flags
def test_server_cmd_passes_sglang_flags_through_exactly():
    _, args = parse_args(["--prompt-data", "p.jsonl", "--hf-checkpoint", "/ckpt", "--rollout-engine", "sglang",
                          "--rollout-num-gpus-per-engine", "2", "--sglang-mem-fraction-static", "0.8",
                          "--sglang-context-length", "8192", "--sglang-log-level", "INFO",
                          "--sglang-enable-memory-saver"])
    kw = sglang_engine_kwargs(args)
    cmd = build_server_cmd(args.hf_checkpoint, port=31000, tp_size=kw["tp_size"], sglang_args=kw["sglang_args"])
    assert cmd == [sys.executable, "-m", "sglang.launch_server", "--model-path", "/ckpt", "--tp-size", "2",
                   "--host", "127.0.0.1", "--port", "31000", "--mem-fraction-static", "0.8",
                   "--context-length", "8192", "--log-level", "INFO", "--enable-memory-saver"]
    seeded = build_server_cmd("/ckpt", port=1, sglang_args={"x": ["a", "b"], "off": False}, seed=kw["seed"])
    assert seeded[-5:] == ["--x", "a", "b", "--random-seed", str(args.rollout_seed)]


@pytest.mark.parametrize("flag", ["port", "model-path", "tp-size"])
def test_flags_the_adapter_sets_are_refused(flag):
    with pytest.raises(ValueError, match=f"--sglang-{flag} is set by slime_ray"):
        build_server_cmd("/m", port=1, sglang_args={flag: "1"})


def test_launched_server_gets_the_exact_command_line(engine):
    state = double(engine, "state")
    assert engine.process.cmd[:2] == DOUBLE_CMD
    assert state["argv"] == engine.process.cmd[2:]
    assert state["argv"][state["argv"].index("--model-path") + 1] == engine.model_path
    assert ["--double-token-delay-s", "0.01"] == state["argv"][-2:]


# ---------------------------------------------------------------- generate
def test_generate_maps_request_and_response(engine):
    out = engine.generate([req(n=5, temperature=0.7, seed=11), req(ids=[9], n=3)])
    for o, n in zip(out, (5, 3)):
        assert len(o["output_ids"]) == len(o["output_log_probs"]) == o["completion_tokens"] == n
        assert o["finish_reason"] == "length" and isinstance(o["weight_version"], int)
        assert all(lp <= 0 for lp in o["output_log_probs"]) and isinstance(o["text"], str)
    assert out[0]["prompt_tokens"] == 3
    sent = calls(engine, "/generate")[-2:]
    first = next(s for s in sent if s["input_ids"] == [5, 6, 7])
    assert first["sampling_params"] == {"max_new_tokens": 5, "temperature": 0.7, "sampling_seed": 11,
                                        "no_stop_trim": True}
    assert first["return_logprob"] is True and len(first["rid"]) == 32


def test_stop_token_text_prompt_and_no_logprob(engine):
    base = engine.generate([req(n=6)])[0]["output_ids"]
    stopped = engine.generate([req(n=6, stop_token_ids=[base[2]])])[0]
    assert stopped["finish_reason"] == "stop" and stopped["output_ids"] == base[:3]
    text = engine.generate([{"text": "2 + 2 =", "sampling_params": {"max_new_tokens": 2}, "return_logprob": False}])[0]
    assert text["output_log_probs"] == [] and len(text["output_ids"]) == 2
    with pytest.raises(ValueError, match="input_ids' or 'text'"):
        engine.generate([{"sampling_params": {}}])


def test_abort_during_generation_returns_partial_output(engine):
    t0 = time.monotonic()
    t, box = run_in_thread(engine.generate, [req(n=4000, ignore_eos=True)])
    time.sleep(0.5)
    engine.abort()
    t.join(timeout=20)
    out = box["out"][0]
    assert out["finish_reason"] == "abort" and 0 < len(out["output_ids"]) < 4000
    assert len(out["output_log_probs"]) == len(out["output_ids"]) and time.monotonic() - t0 < 20
    assert {"rid": "", "abort_all": True} in calls(engine, "/abort_request")


def test_abort_only_own_requests_sends_their_rids(engine):
    t, box = run_in_thread(engine.generate, [req(n=4000)])
    time.sleep(0.3)
    engine.abort(abort_all=False)
    t.join(timeout=20)
    assert box["out"][0]["finish_reason"] == "abort"
    rid = calls(engine, "/generate")[-1]["rid"]
    assert {"rid": rid, "abort_all": False} in calls(engine, "/abort_request")


def test_pause_aborts_in_flight_then_requests_wait_for_resume(engine):
    t, box = run_in_thread(engine.generate, [req(n=4000)])
    time.sleep(0.3)
    engine.pause()  # mode "abort": in-flight requests come back as aborted
    t.join(timeout=20)
    assert box["out"][0]["finish_reason"] == "abort"
    assert calls(engine, "/pause_generation")[-1] == {"mode": "abort"}
    t2, box2 = run_in_thread(engine.generate, [req(n=3)])
    time.sleep(0.5)
    assert t2.is_alive() and engine.health()["paused"]  # blocked while paused
    engine.resume()
    t2.join(timeout=20)
    assert box2["out"][0]["finish_reason"] == "length"


def test_weight_update_while_paused_gives_new_version_after_continue(engine, state_dict):
    before = engine.generate([req(n=6)])[0]
    version = engine.weight_version + 1
    engine.pause()
    t, box = run_in_thread(engine.generate, [req(n=6)])  # issued while paused
    time.sleep(0.5)
    assert t.is_alive()
    engine.update_weights(scaled(state_dict, 1.5 + version), version)
    engine.flush_cache()
    engine.resume()
    t.join(timeout=20)
    out = box["out"][0]
    assert out["weight_version"] == version == engine.weight_version
    assert out["output_ids"] == engine.generate([req(n=6)])[0]["output_ids"]  # the new weights' output
    if engine.is_double:
        assert out["output_ids"] != before["output_ids"]
        order = [c["route"] for c in double(engine) if c["route"] != "/health_generate"]
        i = order.index("/update_weights_from_disk")
        assert order[i - 2:i + 3] == ["/pause_generation", "/generate", "/update_weights_from_disk",
                                      "/flush_cache", "/continue_generation"]


# ---------------------------------------------------------------- weights
def test_update_weights_writes_hf_safetensors_and_cleans_up(engine, state_dict):
    engine.update_weight_buffer_size = 40_000  # several shards
    try:
        new = scaled(state_dict, 0.5)
        engine.update_weights(new, 7)
    finally:
        engine.update_weight_buffer_size = 512 * 1024**2
    body = calls(engine, "/update_weights_from_disk")[-1]
    assert body["weight_version"] == "7" and engine.weight_version == 7 and body["flush_cache"] is True
    assert body["loaded"]["names"] == sorted(new)
    assert body["loaded"]["checksum"] == pytest.approx(sum(float(t.double().sum()) for t in new.values()), rel=1e-6)
    shards = [f for f in body["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and {"config.json", "model.safetensors.index.json"} <= set(body["files"])
    assert not Path(body["model_path"]).exists()  # temp folder deleted
    assert engine.generate([req(n=2)])[0]["weight_version"] == 7


def test_refused_weights_raise_and_keep_the_version(engine, state_dict):
    v = engine.weight_version
    bad = {"model.not_a_layer.weight": torch.zeros(2, 2)}
    with pytest.raises(SGLangError, match="unknown names"):
        engine.update_weights(bad, v + 1)
    assert engine.weight_version == v
    double(engine)  # the refusal above comes from the double's name check


def test_distributed_update_routes(engine):
    engine.init_weights_update_group("10.0.0.1", 29555, rank_offset=1, world_size=3, group_name="slime-pp_0")
    engine.update_weights_from_distributed(["model.norm.weight"], ["bfloat16"], [[64]], 8, group_name="slime-pp_0")
    assert engine.weight_version == 8
    assert calls(engine, "/init_weights_update_group")[-1] == {
        "master_address": "10.0.0.1", "master_port": 29555, "rank_offset": 1, "world_size": 3,
        "group_name": "slime-pp_0", "backend": "nccl"}
    assert calls(engine, "/update_weights_from_distributed")[-1] == {
        "names": ["model.norm.weight"], "dtypes": ["bfloat16"], "shapes": [[64]], "group_name": "slime-pp_0",
        "weight_version": "8", "flush_cache": True, "load_format": None}
    with pytest.raises(SGLangError, match="never initialized"):
        engine.update_weights_from_distributed(["x"], ["float32"], [[1]], 9, group_name="nope")
    assert engine.weight_version == 8


def test_update_from_tensor_sends_base64_payload_per_tp_rank(engine):
    engine.update_weights_from_tensor([b"rank0-bytes", b"rank1-bytes!"], 9, load_format="flattened_bucket")
    body = calls(engine, "/update_weights_from_tensor")[-1]
    assert body["payload_bytes"] == [11, 12] and body["weight_version"] == "9"
    assert body["load_format"] == "flattened_bucket" and engine.weight_version == 9
    assert engine.generate([req(n=1)])[0]["weight_version"] == 9


# ---------------------------------------------------------------- memory, cache, health
def test_release_resume_memory_with_tags(engine):
    engine.release_memory(["kv_cache", "cuda_graph"])
    engine.release_memory(["weights"])
    assert double(engine, "state")["released_tags"] == ["cuda_graph", "kv_cache", "weights"]
    engine.resume_memory(["weights"])
    engine.resume_memory(["kv_cache", "cuda_graph"])
    assert calls(engine, "/release_memory_occupation")[-2:] == [{"tags": ["kv_cache", "cuda_graph"]}, {"tags": ["weights"]}]
    assert double(engine, "state")["released_tags"] == []


def test_flush_cache_retries_while_requests_run(engine):
    t, _ = run_in_thread(engine.generate, [req(n=40)])
    time.sleep(0.15)
    engine.flush_cache()  # refused while generating, retried until done
    t.join(timeout=20)
    flushes = calls(engine, "/flush_cache")
    assert flushes[-1] == {"refused": False} and {"refused": True} in flushes


def test_client_works_against_any_url(engine):
    attached = SGLangEngine(engine.model_path, url=engine.client.base_url)
    assert attached.process is None and attached.health()["ok"]
    client = SGLangClient(engine.client.base_url)
    out = client.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "return_logprob": True})
    assert [t[1] for t in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert client.get_weight_version() == out["meta_info"]["weight_version"]
    client.close()
    attached.shutdown()


def test_dead_server_is_unhealthy_and_named_in_errors(model_dir):
    eng = SGLangEngine(model_dir, launch_cmd=DOUBLE_CMD, start_timeout_s=60)
    try:
        assert eng.health()["ok"]
        httpx.post(f"{eng.client.base_url}/_test/exit", json={"code": 3})
        eng.process.proc.wait(timeout=10)
        h = eng.health()
        assert not h["ok"] and "exited with code 3" in h["reason"] and "TEST DOUBLE" in h["reason"]
        with pytest.raises(SGLangError, match="exited with code 3"):
            eng.generate([req(n=1)])
    finally:
        eng.shutdown()


def test_server_that_exits_at_start_reports_its_log_tail(model_dir):
    with pytest.raises(SGLangError, match=r"(?s)exited with code 1.*simulated startup failure"):
        SGLangEngine(model_dir, launch_cmd=DOUBLE_CMD, sglang_args={"double-fail-on-start": True},
                     start_timeout_s=60)


def test_start_waits_for_health_and_times_out(model_dir):
    eng = SGLangEngine(model_dir, launch_cmd=DOUBLE_CMD, sglang_args={"double-startup-delay-s": "1.0"},
                       start_timeout_s=60)
    try:
        health = [c for c in httpx.get(f"{eng.client.base_url}/_test/calls").json() if c["route"] == "/health_generate"]
        assert len(health) >= 2  # 503 while "starting", then 200
    finally:
        eng.shutdown()
    with pytest.raises(SGLangError, match="not healthy after 2 s"):
        SGLangEngine(model_dir, launch_cmd=DOUBLE_CMD, sglang_args={"double-startup-delay-s": "60"},
                     start_timeout_s=2)


# ---------------------------------------------------------------- engine choice, buckets
def test_no_sglang_gives_one_line_reason_before_any_resource(monkeypatch, model_dir):
    monkeypatch.setattr(sg, "sglang_available", lambda: False)
    monkeypatch.setattr(sg.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    monkeypatch.setattr(sg, "find_free_port", lambda *a: pytest.fail("a port was taken"))
    _, args = parse_args(["--prompt-data", "p.jsonl", "--hf-checkpoint", model_dir, "--rollout-engine", "sglang"])
    with pytest.raises(ConfigError) as e:
        check_engine_choice(args)
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'slime_ray[sglang]'" in msg and "--rollout-engine hf" in msg
    with pytest.raises(ConfigError, match=r"slime_ray\[sglang\]"):
        SGLangEngine(model_dir)
    with pytest.raises(ConfigError):
        SGLangEngine.from_args(args)
    args.rollout_engine = "hf"
    check_engine_choice(args)
    assert sg.default_engine() == "hf"


def test_default_engine_needs_sglang_and_cuda(monkeypatch):
    monkeypatch.setattr(sg, "sglang_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sg.default_engine() == "sglang"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sg.default_engine() == "hf"


def test_bucket_named_tensors_respects_the_buffer_size():
    ts = {"a": torch.zeros(10), "b": torch.zeros(10), "c": torch.zeros(30), "d": torch.zeros(5, dtype=torch.float64)}
    buckets = bucket_named_tensors(ts, buffer_size_bytes=80)  # float32: a,b = 40 B each, c = 120 B
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]
    assert all(t is ts[n] for b in buckets for n, t in b)
    assert bucket_named_tensors(list(ts.items()), 10**9) == [list(ts.items())]
    assert bucket_named_tensors({}, 8) == []
    with pytest.raises(ValueError):
        bucket_named_tensors(ts, 0)
