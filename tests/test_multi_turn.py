"""Multi-turn token bookkeeping, the calculator tool, eval metrics, and the seed's
custom_generate / data-source classes run as written (no Ray: a scripted engine client)."""

import asyncio
import json
import math
from argparse import Namespace

import pytest

from examples.multi_turn_tools.generate import extract_tool_call, generate, safe_eval
from slime_ray.rollout import manager as mgr
from slime_ray.rollout.eval import dataset_metrics, pass_at_k, pass_ks
from slime_ray.types import Sample, SampleStatus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def char_ids(tok, text):
    """Ids of ``text`` one byte-level character per token (what an engine may well sample)."""
    return tok.convert_tokens_to_ids(list(text))


class TurnClient:
    """Engine double that answers each call with the next scripted list of ids."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.requests = tok, list(turns), []

    async def generate(self, request):
        self.requests.append(request)
        ids, reason = self.turns.pop(0)
        return {"text": self.tok.decode(ids), "output_ids": ids, "output_log_probs": [-0.1] * len(ids),
                "finish_reason": reason, "weight_version": 3}


def test_safe_eval_arithmetic_only():
    assert safe_eval("12 + 3 * (4 - 1)") == 21 and safe_eval("-2 ** 3") == -8 and safe_eval("7 / 2") == 3.5
    for bad in ("__import__('os')", "x + 1", "(1).real", "2 ** 1000", "1 / 0", "[1]"):
        with pytest.raises(ValueError):
            safe_eval(bad)
    assert extract_tool_call("so <calc>12+3</calc>") == "12+3"


def test_tool_tokens_masked_and_engine_ids_kept(model_dir, tok):
    turn1 = char_ids(tok, "<calc>12+3</calc>")
    # the ids the engine sampled are not what decode + encode gives back
    assert tok(tok.decode(turn1), add_special_tokens=False)["input_ids"] != turn1
    turn2 = char_ids(tok, "15") + [tok.eos_token_id]
    client = TurnClient(tok, [(turn1, "stop"), (turn2, "stop")])
    mgr._CLIENT = client
    args = Namespace(max_turns=3, rollout_max_response_len=64, hf_checkpoint=str(model_dir))
    prompt = [5, 6, 7]
    sample = asyncio.run(generate(args, Sample(tokens=list(prompt)), {"max_new_tokens": 64, "stop": None}))

    obs = tok("<result>15</result>\n", add_special_tokens=False)["input_ids"]
    assert sample.tokens == prompt + turn1 + obs + turn2
    assert sample.loss_mask == [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
    assert sample.rollout_log_probs == [-0.1] * len(turn1) + [0.0] * len(obs) + [-0.1] * len(turn2)
    assert sample.response_length == len(turn1) + len(obs) + len(turn2)
    assert sample.status == SampleStatus.COMPLETED and sample.weight_versions == [3]
    # the second call continued from the exact ids, with the budget reduced by turn 1 + tool
    second = client.requests[1]
    assert second["input_ids"] == prompt + turn1 + obs
    assert second["sampling_params"]["max_new_tokens"] == 64 - len(turn1) - len(obs)
    assert "</calc>" in second["sampling_params"]["stop"]


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]


def test_dataset_metrics_by_hand():
    args = Namespace(reward_key=None)
    g1 = [Sample(reward=1.0, response_length=4), Sample(reward=0.0, response_length=2,
                                                        status=SampleStatus.TRUNCATED)]
    g2 = [Sample(reward=0.0, response_length=2), Sample(reward=0.0, response_length=2)]
    m = dataset_metrics(args, "x", [g1, g2])
    assert m["eval/x/reward_mean"] == 0.25 and m["eval/x/truncated_ratio"] == 0.25
    assert m["eval/x/pass_at_1"] == pytest.approx(0.25) and m["eval/x/pass_at_2"] == pytest.approx(0.5)
    assert m["eval/x/response_len/mean"] == 2.5


def test_seed_custom_generate_and_data_sources_work_as_written(tmp_path, model_dir, tok, monkeypatch):
    from slime_ray import job
    from slime_ray.rollout.manager import RolloutManager, build_train_table

    monkeypatch.setenv("SEED_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("SEED_PROMPTS_PATH", str(tmp_path / "p.jsonl"))
    with open(tmp_path / "p.jsonl", "w") as f:
        for a in range(4):
            f.write(json.dumps({"prompt": f"What is {a} + 1?", "label": str(a + 1)}) + "\n")
    fixture = "tests/fixtures/seed_custom_generate.py"
    args = Namespace(rollout_batch_size=2, n_samples_per_prompt=2, over_sampling_batch_size=None,
                     dynamic_sampling_filter_path=None, partial_rollout=False, custom_rm_path=None,
                     rm_type="math", group_rm=False, reward_key=None, rm_timeout=None, rollout_temperature=1.0,
                     rollout_top_p=1.0, rollout_top_k=-1, rollout_max_response_len=8, rollout_stop=None,
                     rollout_stop_token_ids=None, advantage_estimator="grpo", disable_grpo_std_normalization=False,
                     custom_generate_function_path=f"{fixture}:custom_generate", hf_checkpoint=str(model_dir),
                     max_turns=2, data_source_path=f"{fixture}:RolloutDataSourceWithBuffer")
    source = job.make_data_source(args, [])
    assert type(source).__name__ == "RolloutDataSourceWithBuffer" and source.buffer == []
    answer = char_ids(tok, "2") + [tok.eos_token_id]
    client = TurnClient(tok, [(answer, "stop")] * 8)
    manager = RolloutManager(args, source, client)
    groups, metrics = asyncio.run(manager.generate_rollout(0))
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    s = groups[0][0]
    assert s.reward == compute_expected(s) and s.metadata["retokenized"]
    assert s.response_length > 0 and s.loss_mask == [1] * s.response_length
    prompt_ids = tok(tok.apply_chat_template(s.prompt, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    assert s.tokens[:len(prompt_ids)] == prompt_ids
    table, _ = build_train_table(args, groups)
    assert table.num_rows == 4
    # the seed's WithBuffer class stores what it is given and its buffer_filter selects from it
    source.add_samples(groups)
    assert source.buffer_filter(args, source.buffer, 1) == groups[:1]


def compute_expected(sample):
    return float(str(sample.label) in sample.response)
