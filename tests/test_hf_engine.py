"""HFEngine without Ray: log-probs vs a trainer forward, finish reasons, seeds, weight updates."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from slime_ray.engines.hf import HFEngine
from slime_ray.testing import engine_request as _req
from slime_ray.testing import make_tiny_model_dir
from slime_ray.testing import trainer_log_probs as _trainer_log_probs

PROMPTS = ["What is 3 + 4?", "Tom has 12 apples and buys 7 more. How many", "hi"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine(model_dir)




@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_log_probs_match_trainer_forward(engine, temperature):
    reqs = [_req(engine, p, temperature=temperature, max_new_tokens=24) for p in PROMPTS]
    out = engine.generate(reqs)  # one batch, left-padded prompts of different lengths
    for r, o in zip(reqs, out):
        assert len(o["output_log_probs"]) == len(o["output_ids"]) == o["completion_tokens"] > 0
        ref = _trainer_log_probs(engine.model, r["input_ids"], o["output_ids"], temperature)
        assert (ref - torch.tensor(o["output_log_probs"])).abs().max().item() < 1e-4
        assert all(lp <= 0.0 for lp in o["output_log_probs"])


def test_greedy_log_probs_at_t1_and_deterministic(engine):
    reqs = [_req(engine, p, temperature=0.0, max_new_tokens=16) for p in PROMPTS]
    a, b = engine.generate(reqs), engine.generate(reqs[::-1])[::-1]
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
    for r, o in zip(reqs, a):
        ref = _trainer_log_probs(engine.model, r["input_ids"], o["output_ids"], 1.0)
        assert (ref - torch.tensor(o["output_log_probs"])).abs().max().item() < 1e-4


def test_finish_length_and_stop_token_included(engine):
    base = engine.generate([_req(engine, PROMPTS[0], temperature=0.0, max_new_tokens=12)])[0]
    assert base["finish_reason"] == "length" and len(base["output_ids"]) == 12
    stop_id = base["output_ids"][5]
    first = base["output_ids"].index(stop_id)
    reqs = [
        _req(engine, PROMPTS[0], temperature=0.0, max_new_tokens=12, stop_token_ids=[stop_id]),
        _req(engine, PROMPTS[0], temperature=0.0, max_new_tokens=3),  # same batch, no stop
    ]
    stopped, short = engine.generate(reqs)
    assert stopped["finish_reason"] == "stop"
    assert stopped["output_ids"] == base["output_ids"][: first + 1]  # stop token included
    assert len(stopped["output_log_probs"]) == first + 1
    assert short["finish_reason"] == "length" and short["output_ids"] == base["output_ids"][:3]


def test_model_eos_included(model_dir, engine):
    base = engine.generate([_req(engine, PROMPTS[1], temperature=0.0, max_new_tokens=10)])[0]
    eos = base["output_ids"][4]
    eng = HFEngine(model_dir, eos_token_ids=[eos])
    out = eng.generate([_req(eng, PROMPTS[1], temperature=0.0, max_new_tokens=10)])[0]
    k = base["output_ids"].index(eos)
    assert out["finish_reason"] == "stop" and out["output_ids"] == base["output_ids"][: k + 1]


def test_stop_string(engine):
    base = engine.generate([_req(engine, PROMPTS[2], temperature=0.0, max_new_tokens=16)])[0]
    text = base["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = engine.generate([_req(engine, PROMPTS[2], temperature=0.0, max_new_tokens=16, stop=[stop])])[0]
    assert out["finish_reason"] == "stop" and stop in out["text"]
    assert out["output_ids"] == base["output_ids"][: len(out["output_ids"])]
    # the shortest prefix: one token less no longer contains the stop string
    shorter = engine.tokenizer.decode(out["output_ids"][:-1], skip_special_tokens=True)
    assert stop not in shorter


def test_seeded_sampling_is_reproducible(engine):
    req = _req(engine, PROMPTS[0], temperature=1.0, max_new_tokens=20, seed=123)
    a = engine.generate([req])[0]
    b = engine.generate([_req(engine, PROMPTS[1], temperature=1.0, max_new_tokens=5), req])[1]
    assert a["output_ids"] == b["output_ids"]
    c = engine.generate([_req(engine, PROMPTS[0], temperature=1.0, max_new_tokens=20, seed=124)])[0]
    assert c["output_ids"] != a["output_ids"]


def test_text_request_and_no_logprob(engine):
    out = engine.generate([{"text": "What is", "sampling_params": {"max_new_tokens": 4}, "return_logprob": False}])
    assert out[0]["output_log_probs"] == [] and len(out[0]["output_ids"]) == 4
    assert out[0]["prompt_tokens"] == len(engine.tokenizer.encode("What is"))
    with pytest.raises(ValueError):
        engine.generate([{"sampling_params": {}}])


def test_update_weights_changes_outputs_and_version(model_dir):
    eng = HFEngine(model_dir)
    req = _req(eng, PROMPTS[0], temperature=0.0, max_new_tokens=10)
    before = eng.generate([req])[0]
    assert before["weight_version"] == 0
    weights = eng.get_weights()
    gen = torch.Generator().manual_seed(1)
    new = {n: torch.randn(t.shape, generator=gen) * 0.5 for n, t in weights.items() if "norm" not in n}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied: one tensor, same values
    eng.update_weights(new, weight_version=3)
    after = eng.generate([req])[0]
    assert eng.weight_version == 3 and after["weight_version"] == 3
    assert after["output_log_probs"] != before["output_log_probs"]
    got = eng.get_weights()
    for n, t in new.items():
        assert torch.equal(got[n], t), n
    # log-probs still match a trainer forward on the new weights
    ref = _trainer_log_probs(eng.model, req["input_ids"], after["output_ids"], 1.0)
    assert (ref - torch.tensor(after["output_log_probs"])).abs().max().item() < 1e-4


def test_update_weights_tied_embedding(model_dir):
    eng = HFEngine(model_dir)
    emb = torch.randn_like(eng.get_weights()["model.embed_tokens.weight"])
    eng.update_weights({"model.embed_tokens.weight": emb}, 1)
    assert torch.equal(eng.model.get_output_embeddings().weight, emb)
    with pytest.raises(ValueError, match="tied"):
        eng.update_weights({"model.embed_tokens.weight": emb, "lm_head.weight": emb + 1}, 2)


def test_update_weights_errors_leave_weights_untouched(model_dir):
    eng = HFEngine(model_dir)
    w = eng.get_weights()
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="shape mismatch.*q_proj"):
        eng.update_weights({"model.norm.weight": w["model.norm.weight"] + 1, name: torch.zeros(3, 3)}, 1)
    with pytest.raises(KeyError, match="no_such"):
        eng.update_weights({"no_such.weight": torch.zeros(1)}, 1)
    assert eng.weight_version == 0
    assert torch.equal(eng.get_weights()["model.norm.weight"], w["model.norm.weight"])


def test_abort_in_flight(model_dir):
    eng = HFEngine(model_dir)
    reqs = [_req(eng, p, temperature=1.0, max_new_tokens=450) for p in PROMPTS * 4]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("out", eng.generate(reqs)))
    t.start()
    while not eng._lock.locked() and t.is_alive():
        time.sleep(0.001)
    time.sleep(0.05)
    eng.abort()
    t.join(timeout=60)
    out = result["out"]
    assert any(o["finish_reason"] == "abort" for o in out)
    assert all(len(o["output_ids"]) < 450 for o in out if o["finish_reason"] == "abort")
    assert eng.generate(reqs[:1])[0]["finish_reason"] != "abort"  # the flag does not stick


def test_pause_blocks_until_resume(engine):
    engine.pause()
    assert engine.health()["paused"]
    done = threading.Event()
    t = threading.Thread(
        target=lambda: (engine.generate([_req(engine, "hi", max_new_tokens=2)]), done.set())
    )
    t.start()
    assert not done.wait(0.2)
    engine.resume()
    assert done.wait(30)
    t.join()


def test_shape_buckets_give_same_greedy_outputs_and_log_probs(model_dir, engine):
    """Padding to shape buckets (batch 8, prompt x64, new tokens x64) changes nothing (greedy)."""
    bucketed = HFEngine(model_dir, bucket=True, batch_buckets="2,8")
    assert bucketed.compile is False and engine.buckets is None  # CPU default: no compile, no buckets
    reqs = [_req(engine, p, temperature=0.0, max_new_tokens=n) for p, n in zip(PROMPTS, (12, 20, 7))]
    ref, out = engine.generate(reqs), bucketed.generate(reqs)
    for a, b in zip(ref, out):
        assert a["output_ids"] == b["output_ids"] and a["finish_reason"] == b["finish_reason"]
        assert max(abs(x - y) for x, y in zip(a["output_log_probs"], b["output_log_probs"])) < 1e-4
    assert bucketed.buckets_seen == {(8, 64 + 64)}  # 3 rows -> batch 8; prompt <= 64; 20 new -> 64
    many = bucketed.generate(reqs * 3)  # 9 rows: chunks of 8 + 1 (-> bucket 2)
    assert [o["output_ids"] for o in many] == [o["output_ids"] for o in ref] * 3
    assert bucketed.buckets_seen == {(8, 128), (2, 128)} and bucketed.health()["num_buckets_seen"] == 2


def test_shape_bucket_arithmetic():
    from slime_ray.engines.hf_compile import ShapeBuckets, resolve_compile

    b = ShapeBuckets()
    assert [b.batch(n) for n in (1, 8, 9, 64, 65, 256)] == [8, 8, 32, 64, 128, 256]
    assert [len(c) for c in b.chunks(600)] == [256, 256, 88]
    assert (b.prompt_len(1), b.prompt_len(64), b.prompt_len(65), b.new_tokens(200)) == (64, 64, 128, 256)
    assert resolve_compile(None, torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True and resolve_compile("false", torch.device("cuda")) is False
