"""HFEngine's static-cache decode loop (slime_ray.engines.hf_decode) on CPU vs the generate path."""

from __future__ import annotations

import threading

import pytest
import torch

from transformers import AutoModelForCausalLM

from slime_ray.engines.hf import HFEngine
from slime_ray.engines.hf_attention import (
    GROUPED_ATTENTION,
    grouped_attention_forward,
    supports_grouped_attention,
    use_grouped_attention,
)
from slime_ray.engines.hf_compile import dynamo_graph_count
from slime_ray.engines.hf_decode import (
    SAMPLE,
    SAMPLE_FILTERED,
    StaticDecoder,
    distinct_rows,
    draw_noise_,
    select_tokens,
)
from slime_ray.testing import engine_request as _req
from slime_ray.testing import make_tiny_model_dir
from slime_ray.testing import trainer_log_probs as _trainer_log_probs

PROMPTS = ["What is 3 + 4?", "Tom has 12 apples and buys 7 more. How many", "hi", "Compute 6 * 9."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny_decode")))


@pytest.fixture(scope="module")
def gen(model_dir):
    return HFEngine(model_dir, decode_loop="generate")  # transformers generate, no buckets


@pytest.fixture(scope="module")
def static(model_dir):
    return HFEngine(model_dir, decode_loop="static", bucket=True, batch_buckets="2,8")




def test_modes_resolved(gen, static, model_dir):
    assert gen.decode_loop == "generate" and gen._decoder is None and not gen.compile
    default = HFEngine(model_dir)  # CPU, auto: the static loop, eager, one kept cache, no buckets
    assert default.decode_loop == "static" and not default.compile and default.buckets is None
    assert default._decoder.max_slots == 1 and default._decoder.share_prefill
    assert static.decode_loop == "static" and not static.compile and static.health()["decode_loop"] == "static"
    with pytest.raises(ValueError, match="decode_loop"):
        HFEngine(model_dir, decode_loop="fast")


def test_greedy_ids_equal_generate_path(gen, static):
    base = gen.generate([_req(gen, PROMPTS[0], temperature=0.0, max_new_tokens=16)])[0]
    stop_id = base["output_ids"][6]
    reqs = [
        _req(gen, PROMPTS[0], temperature=0.0, max_new_tokens=16, stop_token_ids=[stop_id]),
        _req(gen, PROMPTS[1], temperature=0.0, max_new_tokens=20),
        _req(gen, PROMPTS[2], temperature=0.0, max_new_tokens=5),
        _req(gen, PROMPTS[3], temperature=0.0, max_new_tokens=11, stop_token_ids=[stop_id]),
    ]
    ref, out = gen.generate(reqs), static.generate(reqs)
    for r, a, b in zip(reqs, ref, out):
        assert b["output_ids"] == a["output_ids"] and b["finish_reason"] == a["finish_reason"]
        assert len(b["output_log_probs"]) == len(b["output_ids"]) == b["completion_tokens"]
        assert max(abs(x - y) for x, y in zip(a["output_log_probs"], b["output_log_probs"])) < 1e-4
        assert len(b["output_ids"]) <= r["sampling_params"]["max_new_tokens"]
    first = base["output_ids"].index(stop_id)
    assert out[0]["finish_reason"] == "stop" and out[0]["output_ids"] == base["output_ids"][: first + 1]
    assert out[1]["finish_reason"] == "length" and len(out[1]["output_ids"]) == 20
    assert out[2]["finish_reason"] == "length" and len(out[2]["output_ids"]) == 5
    assert static.last_decode_stats["decode_steps"] == 19 and static.last_decode_stats["batch"] == 8


@pytest.mark.parametrize("sp", [{"temperature": 0.7}, {"temperature": 1.0},
                                {"temperature": 1.3, "top_p": 0.9, "top_k": 20}])
def test_sampled_log_probs_match_trainer_forward(static, sp):
    reqs = [_req(static, p, max_new_tokens=n, **sp) for p, n in zip(PROMPTS, (24, 9, 30, 17))]
    out = static.generate(reqs)
    for r, o in zip(reqs, out):
        assert 0 < len(o["output_log_probs"]) == len(o["output_ids"]) <= r["sampling_params"]["max_new_tokens"]
        ref = _trainer_log_probs(static.model, r["input_ids"], o["output_ids"], sp["temperature"])
        assert (ref - torch.tensor(o["output_log_probs"])).abs().max().item() < 1e-4


def test_top_k_1_and_tiny_top_p_are_greedy(gen, static):
    greedy = gen.generate([_req(gen, p, temperature=0.0, max_new_tokens=12) for p in PROMPTS[:2]])
    for sp in ({"top_k": 1}, {"top_p": 1e-4}):
        out = static.generate([_req(static, p, temperature=0.8, max_new_tokens=12, **sp) for p in PROMPTS[:2]])
        assert [o["output_ids"] for o in out] == [o["output_ids"] for o in greedy]


def test_model_eos_included(model_dir, gen):
    base = gen.generate([_req(gen, PROMPTS[1], temperature=0.0, max_new_tokens=10)])[0]
    eos = base["output_ids"][4]
    eng = HFEngine(model_dir, eos_token_ids=[eos], decode_loop="static")
    out = eng.generate([_req(eng, PROMPTS[1], temperature=0.0, max_new_tokens=10)])[0]
    k = base["output_ids"].index(eos)
    assert out["finish_reason"] == "stop" and out["output_ids"] == base["output_ids"][: k + 1]
    assert eng.last_decode_stats["decode_steps"] < 9  # the loop ended once every row was done


def test_bucket_reuse_and_padding_rows_dropped(static):
    reqs = [_req(static, p, temperature=0.0, max_new_tokens=n) for p, n in zip(PROMPTS, (12, 20, 7, 3))]
    a = static.generate(reqs[:3])  # 3 rows -> batch bucket 8
    seen, slots = set(static.buckets_seen), static._decoder.num_slots
    b = static.generate(reqs)  # 4 rows -> the same bucket: same cache, reset
    assert len(a) == 3 and len(b) == 4 and static.buckets_seen == seen and static._decoder.num_slots == slots
    assert (8, 128) in seen
    assert [o["output_ids"] for o in b[:3]] == [o["output_ids"] for o in a]
    assert [len(o["output_ids"]) for o in b] == [12, 20, 7, 3]


def test_seeded_sampling_reproducible(static):
    req = _req(static, PROMPTS[0], temperature=1.0, max_new_tokens=20, seed=7)
    a = static.generate([req])[0]
    b = static.generate([_req(static, PROMPTS[1], temperature=1.0, max_new_tokens=5), req])[1]
    assert a["output_ids"] == b["output_ids"]


def test_stop_strings_use_generate_path(gen, static):
    base = gen.generate([_req(gen, PROMPTS[2], temperature=0.0, max_new_tokens=16)])[0]
    stop = base["text"][len(base["text"]) // 2 :][:2]
    req = _req(gen, PROMPTS[2], temperature=0.0, max_new_tokens=16, stop=[stop])
    static.last_decode_stats = {}
    assert static.generate([req]) == gen.generate([req])
    assert static.last_decode_stats == {}  # the static loop did not run


def test_abort_ends_loop(static):
    dec = static._decoder
    ids = torch.tensor([static.tokenizer.encode(PROMPTS[0])])
    ev = threading.Event()
    ev.set()
    res = dec.generate(ids, torch.ones_like(ids), max_new_tokens=[30], stop_ids=[set()], active=[True],
                       cache_new_tokens=64, temperature=1.0, abort_event=ev)
    assert res.aborted and res.tokens.shape == (1, 1) and res.log_probs.dtype == torch.float32
    with pytest.raises(ValueError, match="cache_new_tokens"):
        dec.generate(ids, torch.ones_like(ids), max_new_tokens=[65], stop_ids=[set()], active=[True],
                     cache_new_tokens=64, temperature=1.0)


def test_compiled_step_one_graph_per_bucket_and_mode(model_dir, static):
    """The step traces with fullgraph=True (aot_eager: no C++ compiler needed, fast)."""
    eng = HFEngine(model_dir, decode_loop="static", bucket=True, batch_buckets="2,8")
    eng._decoder = StaticDecoder(eng.model, pad_token_id=eng.pad_token_id, compile=True,
                                 compile_options={"backend": "aot_eager"})
    reqs = [_req(eng, p, temperature=0.0, max_new_tokens=n) for p, n in zip(PROMPTS, (12, 20, 7, 3))]
    g0 = dynamo_graph_count()
    out = eng.generate(reqs[:3])
    assert dynamo_graph_count() - g0 == eng.num_compilations == 1
    assert [o["output_ids"] for o in out] == [o["output_ids"] for o in static.generate(reqs[:3])]
    eng.generate(reqs)  # 4 rows: same bucket, same mode -> no new graph
    assert eng.num_compilations == 1
    torch.manual_seed(3)
    sampled = eng.generate([_req(eng, p, temperature=0.9, max_new_tokens=10) for p in PROMPTS])
    torch.manual_seed(3)
    ref = static.generate([_req(eng, p, temperature=0.9, max_new_tokens=10) for p in PROMPTS])
    assert [o["output_ids"] for o in sampled] == [o["output_ids"] for o in ref]
    assert eng.num_compilations == 2  # one more for the sampling mode


@pytest.mark.parametrize("inference_mode", [True, False], ids=["inference_mode", "no_grad"])
def test_decode_runs_without_grad_in_either_mode(model_dir, inference_mode):
    """The loop runs the model with grad mode off whether or not it enters inference mode (the
    eager CPU loop does; compiled and CUDA loops do not). ``inference_mode(False)`` would turn
    grad mode on, building an autograd graph of every decode step (2x slower on an H200)."""
    eng = HFEngine(model_dir, decode_loop="static")
    assert eng._decoder.inference_mode is True  # eager on CPU
    eng._decoder.inference_mode = inference_mode  # what a compiled or CUDA decoder sets
    seen = []
    hook = eng.model.model.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())))
    try:
        out = eng.generate([_req(eng, p, temperature=0.0, max_new_tokens=5) for p in PROMPTS[:2]])
    finally:
        hook.remove()
    assert len(seen) >= 5  # the prefill and the decode steps
    assert set(seen) == {(False, inference_mode)}
    assert all(len(o["output_ids"]) == 5 for o in out) and torch.is_grad_enabled()


def test_compiled_decode_step_runs_without_grad(model_dir):
    """A compiled decoder (no inference mode) calls its compiled step with grad mode off."""
    eng = HFEngine(model_dir, decode_loop="static")
    eng._decoder = StaticDecoder(eng.model, pad_token_id=eng.pad_token_id, compile=True,
                                 compile_options={"backend": "eager"})
    assert eng._decoder.inference_mode is False
    compiled, seen = eng._decoder._step, []

    def step(*a, **k):
        seen.append(torch.is_grad_enabled())
        return compiled(*a, **k)
    eng._decoder._step = step
    out = eng.generate([_req(eng, p, temperature=0.0, max_new_tokens=4) for p in PROMPTS[:2]])
    assert len(seen) >= 3 and not any(seen)
    assert all(len(o["output_ids"]) == 4 for o in out)


# ---------------------------------------------------------------- grouped-query attention
def _attn_spy(model):
    """Records the attention implementation each attention call of layer 0 ran with."""
    seen = []
    layer = model.model.layers[0].self_attn
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.config._attn_implementation))
    return seen, handle


def test_tiny_model_is_gqa(static):
    cfg = static.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and supports_grouped_attention(static.model)


def test_model_with_attention_sinks_keeps_its_attention(model_dir):
    """A model whose attention has sinks (gpt-oss) is not switched: the grouped path does not model them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert supports_grouped_attention(model)
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(model.config.num_attention_heads))
    assert not supports_grouped_attention(model)
    with use_grouped_attention(model) as switched:
        assert switched is False and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("q_len", [1, 3, 40])
@pytest.mark.parametrize("mask_kind", ["bool", "bool_heads", "float", "none"])
def test_grouped_attention_equals_sdpa(q_len, mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 3, True

    torch.manual_seed(0)
    kv_len = 50 if mask_kind != "none" else q_len
    q, k, v = torch.randn(2, 6, q_len, 16), torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
    mask = torch.rand(2, 6 if mask_kind == "bool_heads" else 1, q_len, kv_len) > 0.4
    mask[..., 0] = True
    mask = {"bool": mask, "bool_heads": mask, "none": None,
            "float": torch.where(mask, 0.0, torch.finfo(torch.float32).min)}[mask_kind]
    mod = Attn().eval()
    out, weights = grouped_attention_forward(mod, q, k, v, mask, scaling=0.2)
    ref, _ = sdpa_attention_forward(mod, q, k, v, mask, scaling=0.2)
    assert weights is None and out.shape == ref.shape == (2, q_len, 6, 16)
    assert (out - ref).abs().max().item() < 1e-5


def test_static_loop_uses_grouped_attention_only_while_it_runs(model_dir, static):
    seen, handle = _attn_spy(static.model)
    try:
        static.generate([_req(static, PROMPTS[0], temperature=0.0, max_new_tokens=4)])
    finally:
        handle.remove()
    # prefill + 3 decode steps, all with the grouped function (prefill > 16 tokens goes on to SDPA inside it)
    assert seen == [GROUPED_ATTENTION] * 4
    assert static.model.config._attn_implementation == "sdpa"  # switched back
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    assert fresh.config._attn_implementation == "sdpa"
    with use_grouped_attention(static.model, enabled=False) as on:
        assert not on and static.model.config._attn_implementation == "sdpa"


def test_grouped_attention_restored_after_error(static):
    with pytest.raises(RuntimeError):
        with use_grouped_attention(static.model) as on:
            assert on and static.model.config._attn_implementation == GROUPED_ATTENTION
            raise RuntimeError("boom")
    assert static.model.config._attn_implementation == "sdpa"


def test_generate_path_keeps_sdpa(gen):
    seen, handle = _attn_spy(gen.model)
    try:
        gen.generate([_req(gen, PROMPTS[0], temperature=0.0, max_new_tokens=3)])
    finally:
        handle.remove()
    assert seen and set(seen) == {"sdpa"}


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_static_loop_matches_generate_and_trainer(model_dir, gen, grouped):
    """No shape buckets: left padding, per-row lengths; the prompts' padded length is 23 (prefill
    through SDPA inside the grouped function), then 5 (prefill in the grouped matmuls too)."""
    eng = HFEngine(model_dir, decode_loop="static")
    eng._decoder = StaticDecoder(eng.model, pad_token_id=eng.pad_token_id, grouped_attention=grouped)
    prompts = [PROMPTS[2], PROMPTS[1] + " apples does he have now? " + PROMPTS[3], PROMPTS[3]]
    lens = (13, 21, 6)
    seen, handle = _attn_spy(eng.model)
    try:
        for plen in (None, 3):  # full prompts, then their first 3, 4, 5 tokens
            reqs = [_req(gen, p, temperature=0.0, max_new_tokens=n) for p, n in zip(prompts, lens)]
            if plen is not None:
                reqs = [{**r, "input_ids": r["input_ids"][: plen + i]} for i, r in enumerate(reqs)]
            ref, out = gen.generate(reqs), eng.generate(reqs)
            for a, b in zip(ref, out):
                assert b["output_ids"] == a["output_ids"] and b["finish_reason"] == a["finish_reason"]
                assert max(abs(x - y) for x, y in zip(a["output_log_probs"], b["output_log_probs"])) < 1e-4
            torch.manual_seed(11)
            sampled = [{**r, "sampling_params": {"temperature": 0.8, "max_new_tokens": n}} for r, n in zip(reqs, lens)]
            for r, o in zip(sampled, eng.generate(sampled)):
                assert len(o["output_ids"]) == r["sampling_params"]["max_new_tokens"]
                ref_lp = _trainer_log_probs(gen.model, r["input_ids"], o["output_ids"], 0.8)
                assert (ref_lp - torch.tensor(o["output_log_probs"])).abs().max().item() < 1e-4
    finally:
        handle.remove()
    assert set(seen) == ({GROUPED_ATTENTION} if grouped else {"sdpa"})
    assert eng.model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- fused q/k/v and gate/up projections
def test_fused_projections_match_separate_and_follow_weight_updates(model_dir):
    """One GEMM per q/k/v and gate/up group gives the separate projections' tokens and log-probs,
    leaves the model's modules and state dict as they were, and picks up weight updates."""
    from slime_ray.engines.hf_fused import FusedProjection, ProjectionSlice, fusable_groups, use_fused_projections

    eng = HFEngine(model_dir, decode_loop="static")
    sep = HFEngine(model_dir, decode_loop="static")
    assert not eng._decoder.fused_projections  # the eager CPU loop's default: separate projections
    eng._decoder = StaticDecoder(eng.model, pad_token_id=eng.pad_token_id, fused_projections=True)
    layers = eng.model.config.num_hidden_layers
    assert fusable_groups(eng.model) == 2 * layers and eng._decoder.fused_projections
    assert StaticDecoder(eng.model, pad_token_id=0, compile=True).fused_projections  # compiled: on
    names = list(eng.model.state_dict())
    attn = eng.model.model.layers[0].self_attn
    q_proj = attn.q_proj
    with use_fused_projections(eng.model) as n:
        assert n == 2 * layers and isinstance(attn.q_proj, ProjectionSlice)
        assert not set(eng.model.state_dict()) - set(names)  # the fused copy is not in the state dict
        fused = attn.q_proj.fused
        assert isinstance(fused, FusedProjection)
        k_proj, v_proj = fused._linears[1:]
        assert fused._linears[0] is q_proj and [type(m) for m in (k_proj, v_proj)] == [torch.nn.Linear] * 2
        assert torch.equal(fused.weight, torch.cat([q_proj.weight, k_proj.weight, v_proj.weight]))
    assert attn.q_proj is q_proj and list(eng.model.state_dict()) == names
    with pytest.raises(RuntimeError), use_fused_projections(eng.model):
        raise RuntimeError("boom")
    assert attn.q_proj is q_proj

    def run(e):
        torch.manual_seed(5)
        return e.generate([_req(e, p, temperature=0.8, max_new_tokens=n) for p, n in zip(PROMPTS, (9, 14, 4, 11))])

    for step in range(2):
        a, b = run(eng), run(sep)
        for x, y in zip(a, b):
            assert x["output_ids"] == y["output_ids"]
            assert max(abs(u - v) for u, v in zip(x["output_log_probs"], y["output_log_probs"])) < 1e-5
        if step == 0:  # new weights for the projections: the fused copy must follow
            new = {k: v * 0.7 for k, v in eng.model.state_dict().items() if k.endswith(("k_proj.weight", "up_proj.weight"))}
            before = [o["output_log_probs"] for o in a]
            for e in (eng, sep):
                e.update_weights(new, 1)
    assert max(abs(u - v) for p, q in zip(before, (o["output_log_probs"] for o in a)) for u, v in zip(p, q)) > 1e-3


def test_fused_projections_only_for_plain_linear_groups():
    from slime_ray.engines.hf_fused import fusable_groups, use_fused_projections

    class Block(torch.nn.Module):
        def __init__(self, bias_k: bool):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(8, 8, bias=True), torch.nn.Linear(8, 4, bias=True)
            self.k_proj = torch.nn.Linear(8, 4, bias=bias_k)
            self.gate_proj, self.up_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1), self.gate_proj(x) * self.up_proj(x)

    torch.manual_seed(0)
    mixed, with_bias = Block(bias_k=False), Block(bias_k=True)
    assert fusable_groups(mixed) == 1  # q/k/v with and without bias: left alone; gate/up fused
    x = torch.randn(3, 2, 8)
    for block in (mixed, with_bias):
        ref = block(x)
        with use_fused_projections(block) as n:
            out = block(x)
        assert n == fusable_groups(block)
        assert all(torch.allclose(r, o, atol=1e-6) for r, o in zip(ref, out))
    assert fusable_groups(with_bias) == 2


def test_release_weights_keeps_bucket_caches(model_dir):
    """Offloading the engine's weights frees the fused copies and graphs only: the buckets' caches
    (what the compiled step was compiled against) stay, and the next call refills the fused
    weights. On CPU the copies are freed after every call (nothing is compiled against them)."""
    from slime_ray.engines.hf_fused import fused_weights, use_fused_projections

    eng = HFEngine(model_dir, decode_loop="static", bucket=True, batch_buckets="2,8")
    req = [_req(eng, PROMPTS[0], temperature=0.0, max_new_tokens=6)]
    first = eng.generate(req)
    cache = next(iter(eng._decoder._slots.values())).cache
    assert eng._decoder.num_slots == 1 and fused_weights(eng.model) == []  # CPU: freed after the call
    with use_fused_projections(eng.model):
        pass
    assert len(fused_weights(eng.model)) == 2 * eng.model.config.num_hidden_layers
    eng._decoder.release_weights()
    assert fused_weights(eng.model) == [] and eng._decoder.num_slots == 1
    again = eng.generate(req)
    assert again[0]["output_ids"] == first[0]["output_ids"]
    assert next(iter(eng._decoder._slots.values())).cache is cache
    eng._decoder.clear()
    assert eng._decoder.num_slots == 0 and fused_weights(eng.model) == []


def test_full_weight_update_during_static_generate_waits(model_dir):
    """A weight update that arrives while the static loop runs (its projections swapped for the
    fused ones) waits for the call instead of failing on the swapped state dict."""
    import time

    eng = HFEngine(model_dir, decode_loop="static")
    started = threading.Event()

    def slow(module, args):
        started.set()
        time.sleep(0.01)

    handle = eng.model.model.layers[0].register_forward_pre_hook(slow)
    new = {k: v.clone() for k, v in eng.model.state_dict().items()}
    out = []
    worker = threading.Thread(target=lambda: out.extend(
        eng.generate([_req(eng, PROMPTS[0], temperature=0.0, max_new_tokens=20)])))
    worker.start()
    try:
        assert started.wait(10)
        eng.update_weights(new, 3)
    finally:
        worker.join()
        handle.remove()
    assert eng.weight_version == 3 and out and out[0]["weight_version"] == 0


@pytest.mark.parametrize("noise_cols", [1, 5], ids=["inverse_cdf", "exponential_race"])
def test_sampling_draws_follow_softmax(noise_cols):
    """Both noise forms draw from softmax(logits / T): 40,000 draws of one 5-token row at T=2
    land within 4 standard errors of the hand-computed probabilities, a -inf token never wins,
    and top-k 2 only ever returns the two largest logits (with renormalised probabilities)."""
    torch.manual_seed(0)
    n, t = 40_000, 2.0
    logits = torch.tensor([2.0, 0.0, -2.0, float("-inf"), 1.0]).repeat(n, 1)
    probs = torch.softmax(logits[0] / t, -1)  # (e^1, e^0, e^-1, 0, e^.5) / 5.7349
    assert probs.tolist() == pytest.approx([0.4740, 0.1744, 0.0641, 0.0, 0.2875], abs=1e-4)
    noise = draw_noise_(torch.empty(n, noise_cols))
    temp, top_p, top_k = torch.tensor(t), torch.tensor(1.0), torch.tensor(0)
    tokens, logp = select_tokens(logits, temp, noise, top_p, top_k, SAMPLE)
    freq = torch.bincount(tokens, minlength=5).double() / n
    se = (probs * (1 - probs) / n).sqrt().double()
    assert freq[3] == 0
    assert ((freq - probs.double()).abs() <= 4 * se + 1e-12).all(), (freq, probs)
    assert torch.allclose(logp, probs.log()[tokens])  # log-prob of the drawn token, unfiltered
    tokens, _ = select_tokens(logits, temp, draw_noise_(noise), top_p, torch.tensor(2), SAMPLE_FILTERED)
    freq = torch.bincount(tokens, minlength=5).double() / n
    p2 = probs[0] / (probs[0] + probs[4])  # 0.4740 / 0.7615 = 0.6225
    assert set(tokens.unique().tolist()) == {0, 4}
    assert abs(freq[0] - p2) <= 4 * (p2 * (1 - p2) / n) ** 0.5


def test_distinct_rows_by_prompt_and_mask():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    # row 3 has row 0's ids but attends to the leading 0: a different prompt
    assert distinct_rows(ids, mask) == ([0, 1, 3], [0, 1, 0, 2, 1])


def test_shared_prefill_equals_prefill_per_row(model_dir):
    """A GRPO-shaped call (3 prompts x 3 samples, interleaved): the prefill runs on the 3 distinct
    prompts, and greedy ids / log-probs equal the loop that prefills all 9 rows; sampled rows of
    one prompt draw their own tokens, with log-probs equal to the trainer's forward."""
    shared = HFEngine(model_dir, decode_loop="static")
    separate = HFEngine(model_dir, decode_loop="static")
    separate._decoder.share_prefill = False
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]] * 3
    reqs = [_req(shared, p, temperature=0.0, max_new_tokens=12) for p in prompts]
    a, b = shared.generate(reqs), separate.generate(reqs)
    assert shared.last_decode_stats["prefill_rows"] == 3 and separate.last_decode_stats["prefill_rows"] == 9
    for x, y in zip(a, b):
        assert x["output_ids"] == y["output_ids"]
        assert max(abs(u - v) for u, v in zip(x["output_log_probs"], y["output_log_probs"])) < 1e-5
    assert a[0]["output_ids"] == a[3]["output_ids"] == a[6]["output_ids"]  # greedy: same prompt, same ids

    torch.manual_seed(0)
    reqs = [_req(shared, PROMPTS[1], temperature=1.0, max_new_tokens=16) for _ in range(6)]
    out = shared.generate(reqs)
    assert shared.last_decode_stats["prefill_rows"] == 1
    assert len({tuple(o["output_ids"]) for o in out}) >= 5  # 6 independent draws over a 443-token vocabulary
    for r, o in zip(reqs, out):
        ref = _trainer_log_probs(shared.model, r["input_ids"], o["output_ids"], 1.0)
        assert (ref - torch.tensor(o["output_log_probs"])).abs().max().item() < 1e-4


def test_prefill_shared_only_when_it_halves_the_rows(model_dir):
    """4 rows of 3 distinct prompts: sharing would save one row and hold the keys / values twice,
    so every row is prefilled; 4 rows of 2 prompts: 2 rows prefilled."""
    eng = HFEngine(model_dir, decode_loop="static")
    eng.generate([_req(eng, p, temperature=0.0, max_new_tokens=4) for p in PROMPTS[:3] + PROMPTS[:1]])
    assert eng.last_decode_stats["prefill_rows"] == 4
    eng.generate([_req(eng, p, temperature=0.0, max_new_tokens=4) for p in PROMPTS[:2] * 2])
    assert eng.last_decode_stats["prefill_rows"] == 2


@pytest.fixture(scope="module")
def sliding_window_dir(tmp_path_factory):
    """A tiny random Mistral with a 4-token sliding window (transformers gives it
    StaticSlidingWindowLayer caches), saved with the tiny tokenizer."""
    from transformers import MistralConfig, MistralForCausalLM

    from slime_ray.testing import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_sliding_window")
    cfg = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=256)
    MistralForCausalLM(cfg).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_auto_loop_needs_full_attention_static_layers(sliding_window_dir):
    """A sliding-window model keeps ``generate`` by default on CPU; the eager loop checks for
    finished rows every step there."""
    eng = HFEngine(sliding_window_dir)
    assert eng.model._can_compile_fullgraph and eng.decode_loop == "generate" and eng._decoder is None
    assert HFEngine(sliding_window_dir, decode_loop="static")._decoder.check_every == 1


def test_eager_loop_builds_its_own_decode_mask(model_dir, monkeypatch):
    """Uncompiled, the loop hands the model a 4D mask that opens one cache column per step, so
    transformers builds a mask for the prefill only; left-padded rows of different lengths then
    decode to the same greedy ids and log-probs (bit for bit) as with transformers' own mask."""
    from transformers import masking_utils

    calls = []  # masks transformers builds (the grouped attention's mask function calls sdpa_mask)
    real_mask = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **k: calls.append(1) or real_mask(*a, **k))
    own = HFEngine(model_dir, decode_loop="static")
    theirs = HFEngine(model_dir, decode_loop="static")
    theirs._decoder._eager_mask = lambda slot, prompt_len: None
    reqs = [_req(own, p, temperature=0.0, max_new_tokens=10) for p in PROMPTS]  # 4 prompt lengths
    calls.clear()
    a = own.generate(reqs)
    own_calls, steps = len(calls), own.last_decode_stats["decode_steps"]
    (slot,) = own._decoder._slots.values()
    prompt_len = max(len(r["input_ids"]) for r in reqs)
    assert slot.decode_mask.shape == (4, 1, 1, slot.mask.shape[1]) and slot.decode_mask.dtype == torch.bool
    assert slot.next_col == prompt_len + steps == prompt_len + 9
    assert not slot.decode_mask[..., slot.next_col:].any()  # columns no step has written stay closed
    calls.clear()
    b = theirs.generate(reqs)
    assert own_calls == 1 and len(calls) == 1 + steps  # the prefill's only, against one per forward
    for x, y in zip(a, b):
        assert x["output_ids"] == y["output_ids"] and x["output_log_probs"] == y["output_log_probs"]


def test_eager_decode_mask_only_for_full_attention(sliding_window_dir):
    """A sliding-window model run with the static loop keeps transformers' mask (its layers do
    not attend to the whole cache)."""
    eng = HFEngine(sliding_window_dir, decode_loop="static")
    eng.generate([_req(eng, "What is 3 + 4?", temperature=0.0, max_new_tokens=6)])
    (slot,) = eng._decoder._slots.values()
    assert slot.decode_mask is None
