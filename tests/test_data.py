"""Prompt loading (slime's data flags) and the rollout data sources (order, resume, buffer)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slime_ray.data.dataset import (
    DataError,
    RolloutDataSource,
    RolloutDataSourceWithBuffer,
    epoch_order,
    load_prompt_data,
)
from slime_ray.testing import build_tiny_tokenizer
from slime_ray.types import Sample


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# ----------------------------------------------------------------------------- loading
def test_jsonl_string_and_chat_prompts(tmp_path):
    msgs = [{"role": "system", "content": "You are a math tutor."}, {"role": "user", "content": "What is 15 + 27?"}]
    f = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 2 + 2?", "label": "4", "metadata": {"src": "a"}},
        "",
        {"prompt": msgs, "label": "42"},
    ])
    rows = load_prompt_data(f, input_key="prompt", label_key="label")
    assert [r["prompt"] for r in rows] == ["What is 2 + 2?", msgs]
    assert [r["label"] for r in rows] == ["4", "42"]
    assert rows[0]["metadata"] == {"src": "a"} and rows[1]["metadata"] == {}
    assert "prompt_ids" not in rows[0]


def test_label_key_none_gives_no_label(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": "hi", "label": "x"}])
    assert load_prompt_data(f)[0]["label"] is None


def test_parquet_matches_jsonl(tmp_path, tokenizer):
    rows = [{"prompt": f"What is {i} + 1?", "label": str(i + 1), "metadata": json.dumps({"i": i})} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    _write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_prompt_data(tmp_path / "d.parquet", input_key="prompt", label_key="label", tokenizer=tokenizer)
    b = load_prompt_data(tmp_path / "d.jsonl", input_key="prompt", label_key="label", tokenizer=tokenizer)
    assert a == b
    assert a[3]["metadata"] == {"i": 3}
    assert a[3]["prompt_ids"] == tokenizer("What is 3 + 1?", add_special_tokens=False)["input_ids"]


def test_parquet_chat_messages(tmp_path):
    msgs = [{"role": "user", "content": "What is 1 + 1?"}]
    pq.write_table(pa.Table.from_pylist([{"prompt": msgs, "label": "2"}]), tmp_path / "c.parquet")
    assert load_prompt_data(tmp_path / "c.parquet", input_key="prompt")[0]["prompt"] == msgs


def test_apply_chat_template_string_and_messages(tmp_path, tokenizer):
    f = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 2 + 2?"},
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]},
    ])
    rows = load_prompt_data(f, input_key="prompt", apply_chat_template=True, tokenizer=tokenizer,
                            system_prompt="Be brief.")
    assert rows[0]["prompt"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # An existing system message is kept, not doubled.
    assert rows[1]["prompt"] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert rows[1]["prompt_ids"] == tokenizer(rows[1]["prompt"], add_special_tokens=False)["input_ids"]
    assert rows[1]["prompt_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_tools_reach_template_and_metadata(tmp_path):
    calls = []

    class Tok:
        def apply_chat_template(self, msgs, tools=None, tokenize=False, add_generation_prompt=True, **kw):
            calls.append(tools)
            return "T:" + msgs[-1]["content"]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(text)]}

    tools = [{"type": "function", "function": {"name": "calc"}}]
    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": "q", "tools": tools}])
    rows = load_prompt_data(f, tool_key="tools", apply_chat_template=True, tokenizer=Tok())
    assert calls == [tools]
    assert rows[0]["prompt"] == "T:q" and rows[0]["prompt_ids"] == [3]
    assert rows[0]["metadata"]["tools"] == tools


def test_max_prompt_len_filters_and_counts(tmp_path, tokenizer):
    short, long_ = "What is 2 + 2?", "What is 2 + 2? " * 20
    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": short}, {"input": long_}, {"input": short}])
    limit = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    rows, stats = load_prompt_data(f, tokenizer=tokenizer, max_prompt_len=limit, return_stats=True)
    assert [r["prompt"] for r in rows] == [short, short]
    assert stats == {"num_rows": 3, "num_kept": 2, "num_filtered_too_long": 1}


# ----------------------------------------------------------------------------- errors
def test_missing_file_names_flag(tmp_path):
    with pytest.raises(DataError, match=r"--prompt-data .*nope\.jsonl: no such file"):
        load_prompt_data(tmp_path / "nope.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    f = _write_jsonl(tmp_path / "bad.jsonl", [{"input": "ok"}, {"input": "ok"}, '{"input": "oops",'])
    with pytest.raises(DataError) as e:
        load_prompt_data(f)
    msg = str(e.value)
    assert "bad.jsonl: line 3: invalid JSON" in msg and "column" in msg


def test_missing_input_key_names_key_line_keys_and_flag(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": "ok"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        load_prompt_data(f)
    msg = str(e.value)
    assert "d.jsonl: line 2" in msg and "'input'" in msg and "--input-key" in msg
    assert "['answer', 'question']" in msg


def test_missing_label_key(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": "q"}])
    with pytest.raises(DataError, match=r"d\.jsonl: line 1: no key 'label' \(set by --label-key\)"):
        load_prompt_data(f, label_key="label")


@pytest.mark.parametrize("prompt", ["", "   ", [], [{"role": "user", "content": ""}]])
def test_empty_prompt(tmp_path, prompt):
    f = _write_jsonl(tmp_path / "e.jsonl", [{"input": "fine"}, {"input": prompt}])
    with pytest.raises(DataError, match=r"e\.jsonl: line 2: empty prompt"):
        load_prompt_data(f)


def test_unknown_role(tmp_path):
    f = _write_jsonl(tmp_path / "r.jsonl", [{"input": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}])
    with pytest.raises(DataError) as e:
        load_prompt_data(f)
    msg = str(e.value)
    assert "r.jsonl: line 1" in msg and "'robot'" in msg and "system, user, assistant, tool" in msg


def test_chat_template_needs_tokenizer(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": "q"}])
    with pytest.raises(DataError, match="--apply-chat-template needs a tokenizer"):
        load_prompt_data(f, apply_chat_template=True)


def test_errors_raised_before_tokenizing(tmp_path):
    class Boom:
        def __call__(self, *a, **k):
            raise AssertionError("tokenized before checking")

        apply_chat_template = __call__

    f = _write_jsonl(tmp_path / "d.jsonl", [{"input": "q"}, {"x": 1}])
    with pytest.raises(DataError, match="line 2"):
        load_prompt_data(f, tokenizer=Boom())


# ----------------------------------------------------------------------------- data source
def _prompts(n):
    return [{"prompt": f"p{i}", "label": str(i), "metadata": {"i": i}, "prompt_ids": [i, i]} for i in range(n)]


def _ledger(src, sizes):
    return [[g[0].prompt for g in src.get_samples(k)] for k in sizes]


def test_epoch_order_is_slime_shuffle():
    # slime: random.Random(rollout_seed + epoch).shuffle(range(n)), from the file order each epoch.
    e0, e1 = epoch_order(5, 0, shuffle=True, seed=42), epoch_order(5, 1, shuffle=True, seed=42)
    assert e0 == [3, 1, 2, 4, 0] and e1 == [1, 4, 3, 2, 0]
    exp = list(range(5))
    random.Random(43).shuffle(exp)
    assert e1 == exp
    assert epoch_order(5, 7, shuffle=False, seed=42) == [0, 1, 2, 3, 4]


def test_shuffled_order_over_two_epochs_and_groups():
    src = RolloutDataSource(prompts=_prompts(5), n_samples_per_prompt=2, rollout_shuffle=True, rollout_seed=42)
    assert len(src) == 5
    groups = src.get_samples(3) + src.get_samples(3) + src.get_samples(4)
    assert [g[0].prompt for g in groups] == ["p3", "p1", "p2", "p4", "p0", "p1", "p4", "p3", "p2", "p0"]
    assert [s.index for g in groups for s in g] == list(range(20))
    assert [g[0].group_index for g in groups] == list(range(10))
    assert all(g[0].group_index == g[1].group_index and g[0].prompt == g[1].prompt for g in groups)
    s = groups[0][0]
    assert (s.label, s.metadata, s.tokens) == ("3", {"i": 3}, [3, 3])
    s.metadata["x"] = 1  # samples own their copies
    assert groups[0][1].metadata == {"i": 3} and src.prompts[3]["metadata"] == {"i": 3}
    assert src.state_dict()["epoch_id"] == 1 and src.state_dict()["sample_offset"] == 5


def test_no_shuffle_and_large_request_spans_epochs():
    src = RolloutDataSource(prompts=_prompts(3), n_samples_per_prompt=1)
    assert [g[0].prompt for g in src.get_samples(7)] == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]
    assert src.epoch_id == 2


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_resume_continues_exactly(tmp_path, split):
    sizes = [2, 3, 4, 1, 5, 2]
    kw = dict(prompts=_prompts(7), n_samples_per_prompt=3, rollout_shuffle=True, rollout_seed=1)
    full = RolloutDataSource(**kw)
    ledger_full = [[(g[0].prompt, g[0].group_index, g[-1].index) for g in full.get_samples(k)] for k in sizes]

    first = RolloutDataSource(**kw)
    ledger = [[(g[0].prompt, g[0].group_index, g[-1].index) for g in first.get_samples(k)] for k in sizes[:split]]
    first.save(tmp_path / "ds.json")
    resumed = RolloutDataSource(**kw)
    resumed.load(tmp_path / "ds.json")
    ledger += [[(g[0].prompt, g[0].group_index, g[-1].index) for g in resumed.get_samples(k)] for k in sizes[split:]]
    assert ledger == ledger_full


def test_load_state_rejects_other_prompt_count():
    a = RolloutDataSource(prompts=_prompts(4))
    b = RolloutDataSource(prompts=_prompts(5))
    with pytest.raises(ValueError, match="saved over 4 prompts"):
        b.load_state_dict(a.state_dict())


def test_missing_state_file_starts_fresh(tmp_path):
    src = RolloutDataSource(prompts=_prompts(3))
    src.load(tmp_path / "absent.json")
    assert src.get_samples(1)[0][0].prompt == "p0"


def test_from_args_with_flat_and_nested_config(tmp_path, tokenizer):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(4)])
    flat = SimpleNamespace(prompt_data=str(f), input_key="question", label_key="answer", n_samples_per_prompt=2,
                           rollout_shuffle=False, rollout_seed=42)
    nested = SimpleNamespace(data=SimpleNamespace(prompt_data=str(f), input_key="question", label_key="answer"),
                             rollout=SimpleNamespace(n_samples_per_prompt=2))
    for args in (flat, nested):
        src = RolloutDataSource(args, tokenizer=tokenizer)
        g = src.get_samples(2)
        assert [x[0].prompt for x in g] == ["q0", "q1"] and g[1][0].label == "1" and len(g[0]) == 2
        assert g[0][0].tokens == tokenizer("q0", add_special_tokens=False)["input_ids"]


def test_from_args_without_prompt_data():
    with pytest.raises(DataError, match="--prompt-data"):
        RolloutDataSource(SimpleNamespace(n_samples_per_prompt=1))


def test_buffer_drained_first_and_saved():
    src = RolloutDataSourceWithBuffer(prompts=_prompts(4), n_samples_per_prompt=2)
    first = src.get_samples(2)
    src.add_samples([first[1]])
    again = src.get_samples(2)
    assert [g[0].prompt for g in again] == ["p1", "p2"]
    assert again[0] is first[1] and src.buffer == []
    src.add_samples([again[1]])
    state = json.loads(json.dumps(src.state_dict()))
    other = RolloutDataSourceWithBuffer(prompts=_prompts(4), n_samples_per_prompt=2)
    other.load_state_dict(state)
    nxt = other.get_samples(2)
    assert [g[0].prompt for g in nxt] == ["p2", "p3"] and nxt[0][0].index == again[1][0].index
    with pytest.raises(ValueError, match="n_samples_per_prompt=2"):
        src.add_samples([[Sample()]])


def test_custom_buffer_filter():
    def newest_first(args, rollout_id, buffer, num_samples):
        out = buffer[-num_samples:][::-1]
        del buffer[-num_samples:]
        return out

    src = RolloutDataSourceWithBuffer(prompts=_prompts(5), n_samples_per_prompt=1, buffer_filter=newest_first)
    src.add_samples(src.get_samples(3))
    assert [g[0].prompt for g in src.get_samples(2)] == ["p2", "p1"]
    assert [g[0].prompt for g in src.get_samples(2)] == ["p0", "p3"]


def test_plain_source_add_samples_is_noop():
    src = RolloutDataSource(prompts=_prompts(2))
    src.add_samples(src.get_samples(1))
    assert src.get_samples(1)[0][0].prompt == "p1"
