"""Reward hub: built-in verifiers on real strings, custom RM forms, failure handling."""

import asyncio
import http.server
import json
import threading
import textwrap
from types import SimpleNamespace

import pytest

from slime_ray.plugins import PluginError
from slime_ray.rollout import rewards as R
from slime_ray.rollout.rewards import (
    compute_reward,
    compute_rewards,
    extract_boxed,
    f1_reward,
    last_number,
    math_reward,
    reward_value,
)
from slime_ray.types import Sample, SampleStatus


def make_args(**kw):
    base = dict(rm_type=None, custom_rm_path=None, group_rm=False, reward_key=None, rm_url=None,
                rm_timeout=None, rm_model_path=None, hf_checkpoint=None)
    base.update(kw)
    return SimpleNamespace(**base)


def samples(*pairs):
    return [Sample(index=i, group_index=i // 2, prompt=f"p{i}", response=r, label=l,
                   status=SampleStatus.COMPLETED) for i, (r, l) in enumerate(pairs)]


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- extraction
def test_extract_boxed_nested_and_last():
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed("no box here 5") is None
    assert extract_boxed(r"\boxed 7 done") == "7"
    assert extract_boxed(r"\fbox{3}") == "3"


def test_last_number():
    assert last_number("I think 41") == "41"
    assert last_number("it costs 1,000 dollars, not 12.5 or -3") == "-3"
    assert last_number("ratio 3/4") == "3/4"
    assert last_number("x = 4.") == "4"
    assert last_number("no digits") is None


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize(
    "response,label,expected",
    [
        (r"The answer is \boxed{42}", "42", 1.0),
        ("I think 41", "42", 0.0),
        ("so x = 4", "x = 4", 1.0),
        (r"\boxed{4}", "x = 4", 1.0),
        (r"\boxed{x = 4}", "4", 1.0),
        (r"thus \boxed{0.5}", r"\frac{1}{2}", 1.0),
        ("The answer is 42.", "42", 1.0),
        (r"\boxed{41} but 42", "42", 0.0),  # the box wins over the last number
        (r"\boxed{\frac{\sqrt3}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
        ("total: 1,000", "1000", 1.0),
        ("nothing numeric", "42", 0.0),
        ("", "42", 0.0),
    ],
)
def test_math_reward(response, label, expected):
    assert math_reward(response, label) == expected


def test_math_reward_off_main_thread():
    out = {}

    def work():
        out["r"] = math_reward(r"The answer is \boxed{42}", "42")
        out["w"] = math_reward("I think 41", "42")

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert out == {"r": 1.0, "w": 0.0}


def test_math_via_hub_sets_sample_reward():
    ss = samples((r"The answer is \boxed{42}", "42"), ("I think 41", "42"), ("x = 4", "x = 4"))
    out = run(compute_rewards(make_args(rm_type="math"), ss))
    assert list(out) == [1.0, 0.0, 1.0]
    assert [s.reward for s in ss] == [1.0, 0.0, 1.0]
    assert out.num_failed == 0


def test_math_with_timeout_runs_in_thread():
    ss = samples((r"\boxed{42}", "42"))
    assert list(run(compute_rewards(make_args(rm_type="math", rm_timeout=30), ss))) == [1.0]


def test_boxed_math_only_counts_box():
    ss = samples(("The answer is 42", "42"), (r"\boxed{42}", "42"))
    assert list(run(compute_rewards(make_args(rm_type="boxed_math"), ss))) == [0.0, 1.0]


def test_metadata_rm_type_overrides():
    ss = samples(("the cat sat", "the cat sat"))
    ss[0].metadata = {"rm_type": "f1"}
    assert list(run(compute_rewards(make_args(rm_type="math"), ss))) == [1.0]


def test_f1():
    assert f1_reward("The Cat sat.", "cat sat") == 1.0
    assert f1_reward("cat dog", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert f1_reward("bird", "cat") == 0.0
    assert f1_reward("paris", ["london", "Paris"]) == 1.0


def test_unknown_rm_type_is_config_error():
    with pytest.raises(ValueError, match="--rm-type 'nope'"):
        run(compute_rewards(make_args(rm_type="nope"), samples(("a", "b"))))


# ----------------------------------------------------------------------------- custom
def write(tmp_path, name, src):
    p = tmp_path / name
    p.write_text(textwrap.dedent(src))
    return str(p)


def test_custom_per_sample_async(tmp_path):
    path = write(tmp_path, "rm.py", """
        async def reward(args, sample):
            return 1.0 if sample.label in sample.response else 0.0
    """)
    ss = samples(("yes 42", "42"), ("no", "42"))
    assert list(run(compute_rewards(make_args(custom_rm_path=path), ss))) == [1.0, 0.0]


def test_custom_per_sample_sync_named(tmp_path):
    path = write(tmp_path, "rm2.py", """
        def my_reward(args, sample):
            return {"acc": float(sample.response == sample.label), "len": len(sample.response)}
    """)
    ss = samples(("42", "42"), ("4", "42"))
    args = make_args(custom_rm_path=f"{path}:my_reward", reward_key="acc")
    out = run(compute_rewards(args, ss))
    assert out[0] == {"acc": 1.0, "len": 2}
    assert [reward_value(args, s) for s in ss] == [1.0, 0.0]
    with pytest.raises(ValueError, match="--reward-key"):
        reward_value(make_args(), ss[0])


def test_custom_class_form_as_in_seed(tmp_path):
    path = write(tmp_path, "custom_rm.py", """
        CALLS = {"init": 0}

        def load_model(model_path):
            CALLS["init"] += 1
            return lambda texts: [float(len(t)) for t in texts]

        class CustomRewardModel:
            def __init__(self, model_path):
                self.model_path = model_path
                self.model = load_model(model_path)

            def tokenize(self, prompts, responses):
                return [p + r for p, r in zip(prompts, responses)]

            def compute_reward(self, prompts, responses):
                inputs = self.tokenize(prompts, responses)
                scores = self.model(inputs)
                return scores
    """)
    args = make_args(custom_rm_path=path, hf_checkpoint="/models/x")
    ss = samples(("ab", None), ("abcd", None))
    assert list(run(compute_rewards(args, ss))) == [4.0, 6.0]  # "p0ab", "p1abcd"
    run(compute_rewards(args, samples(("a", None))))
    form, inst = R.load_custom_rm(args)
    assert form == "class" and inst.model_path == "/models/x"
    import sys
    mod = sys.modules[type(inst).__module__]
    assert mod.CALLS["init"] == 1  # built once per process
    # per-sample entry point works with the class form too
    s = samples(("xyz", None))[0]
    assert run(compute_reward(args, s)) == 5.0 and s.reward == 5.0


def test_custom_group_form(tmp_path):
    path = write(tmp_path, "group_rm.py", """
        def reward(args, samples):
            best = max(len(s.response) for s in samples)
            return [float(len(s.response) == best) for s in samples]
    """)
    ss = samples(("a", None), ("abc", None), ("ab", None))
    out = run(compute_rewards(make_args(custom_rm_path=path, group_rm=True), ss))
    assert list(out) == [0.0, 1.0, 0.0]


def test_group_form_wrong_length_fails_all(tmp_path):
    path = write(tmp_path, "group_bad.py", """
        def reward(args, samples):
            return [1.0]
    """)
    ss = samples(("a", None), ("b", None))
    out = run(compute_rewards(make_args(custom_rm_path=path, group_rm=True), ss))
    assert out.num_failed == 2 and all(s.status == SampleStatus.FAILED for s in ss)


def test_raising_reward_marks_failed_and_counts(tmp_path, caplog):
    path = write(tmp_path, "raising.py", """
        def reward(args, sample):
            if sample.index == 1:
                raise RuntimeError("boom")
            return 1.0
    """)
    ss = samples(("a", None), ("b", None), ("c", None))
    with caplog.at_level("WARNING", logger="slime_ray.rollout.rewards"):
        out = run(compute_rewards(make_args(custom_rm_path=path), ss))
    assert list(out) == [1.0, 0.0, 1.0]
    assert out.num_failed == 1 and out.failed_indices == [1]
    assert ss[1].status == SampleStatus.FAILED and ss[1].reward == 0.0
    assert ss[0].status == SampleStatus.COMPLETED
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "index=1" in msgs[0] and "boom" in msgs[0]


@pytest.mark.parametrize("bad", ["float('nan')", "float('inf')", "None", "{'acc': float('nan')}"])
def test_nonfinite_reward_marks_failed(tmp_path, bad):
    path = write(tmp_path, "nan_rm.py", f"""
        def reward(args, sample):
            return {bad} if sample.index == 0 else 0.5
    """)
    ss = samples(("a", None), ("b", None))
    out = run(compute_rewards(make_args(custom_rm_path=path), ss))
    assert list(out) == [0.0, 0.5] and out.num_failed == 1
    assert ss[0].status == SampleStatus.FAILED


def test_timeout_marks_failed(tmp_path):
    path = write(tmp_path, "slow.py", """
        import asyncio
        async def reward(args, sample):
            if sample.index == 0:
                await asyncio.sleep(10)
            return 1.0
    """)
    ss = samples(("a", None), ("b", None))
    out = run(compute_rewards(make_args(custom_rm_path=path, rm_timeout=0.2), ss))
    assert list(out) == [0.0, 1.0] and ss[0].status == SampleStatus.FAILED


def test_bad_custom_path_is_config_error(tmp_path):
    with pytest.raises(PluginError, match="--custom-rm-path"):
        run(compute_rewards(make_args(custom_rm_path=str(tmp_path / "missing.py")), samples(("a", 1))))
    path = write(tmp_path, "wrong_sig.py", """
        def reward(sample):
            return 1.0
    """)
    with pytest.raises(PluginError, match="reward"):
        run(compute_rewards(make_args(custom_rm_path=path), samples(("a", 1))))


# ----------------------------------------------------------------------------- remote
@pytest.fixture
def rm_server():
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(body)
            if self.path == "/dict":
                reply = {"reward": 1.0 if body["label"] in body["response"] else 0.0}
            elif self.path == "/error":
                self.send_response(500)
                self.end_headers()
                return
            else:
                reply = 0.25
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_remote_rm(rm_server):
    base, received = rm_server
    ss = samples(("answer 42", "42"), ("nope", "42"))
    out = run(compute_rewards(make_args(rm_type="remote_rm", rm_url=f"{base}/dict"), ss))
    assert list(out) == [1.0, 0.0]
    assert {"prompt": "p0", "response": "answer 42", "label": "42"} in received
    out = run(compute_rewards(make_args(rm_type="remote_rm", rm_url=f"{base}/float"), ss[:1]))
    assert list(out) == [0.25]
    out = run(compute_rewards(make_args(rm_type="remote_rm", rm_url=f"{base}/error"), ss[:1]))
    assert out.num_failed == 1 and ss[0].status == SampleStatus.FAILED
