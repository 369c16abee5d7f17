"""The rollout loop without Ray: over-sampling + dynamic filter, abort, partial rollout, custom
generate forms, multi-turn token bookkeeping. A scripted engine client stands in for Serve."""

import asyncio
import json
from argparse import Namespace

import pytest

from slime_ray.data.dataset import RolloutDataSource, RolloutDataSourceWithBuffer
from slime_ray.rollout import manager as mgr
from slime_ray.rollout.custom_generate import is_batch_form, make_group_generate
from slime_ray.rollout.filters import DynamicFilterOutput, apply_filter, check_reward_nonzero_std
from slime_ray.rollout.manager import RolloutManager, build_train_table
from slime_ray.types import Sample, SampleStatus


class ScriptedClient:
    """Engine double: returns ``[7, 8, 9, ...]`` (max_new_tokens ids, log-prob -0.5 each).

    Requests whose prompt's first id is in ``hang`` emit ``partial`` ids and then wait for
    :meth:`abort_async`, returning finish "abort" (SGLang's abort semantics).
    """

    def __init__(self, hang=(), partial=2):
        self.weight_version, self.hang, self.partial = 0, set(hang), partial
        self.requests, self.aborts = [], 0
        self._abort = asyncio.Event()

    async def generate(self, request):
        self.requests.append(request)
        n = request["sampling_params"]["max_new_tokens"]
        await asyncio.sleep(0)
        if request["input_ids"][0] in self.hang:
            await self._abort.wait()
            ids, reason = list(range(7, 7 + self.partial)), "abort"
        else:
            ids, reason = list(range(7, 7 + n)), "length"
        return {"text": " ".join(map(str, ids)), "output_ids": ids, "output_log_probs": [-0.5] * len(ids),
                "finish_reason": reason, "weight_version": self.weight_version}

    async def abort_async(self):
        self.aborts += 1
        self._abort.set()


def make_args(tmp_path, **kw):
    rm = tmp_path / "rm.py"
    # label "const": every sample scores 1 (zero std); else the parity of the sample index
    rm.write_text("def reward(args, sample):\n"
                  "    return 1.0 if sample.label == 'const' else float(sample.index % 2)\n")
    base = dict(rollout_batch_size=2, n_samples_per_prompt=2, over_sampling_batch_size=None,
                dynamic_sampling_filter_path=None, partial_rollout=False, custom_rm_path=str(rm),
                rm_type=None, group_rm=False, reward_key=None, rm_timeout=None, rollout_temperature=1.0,
                rollout_top_p=1.0, rollout_top_k=-1, rollout_max_response_len=4, rollout_stop=None,
                rollout_stop_token_ids=None, eval_temperature=None, eval_max_response_len=None,
                advantage_estimator="grpo", disable_grpo_std_normalization=False,
                custom_generate_function_path=None, hf_checkpoint=None, max_turns=1, buffer_filter_path=None)
    base.update(kw)
    return Namespace(**base)


def prompts(labels):
    return [{"prompt": f"q{i}", "label": lab, "metadata": {}, "prompt_ids": [100 + i, 1, 2]}
            for i, lab in enumerate(labels)]


def test_check_reward_nonzero_std_and_bool_filters():
    args = Namespace(reward_key=None)
    same = [Sample(reward=1.0), Sample(reward=1.0)]
    diff = [Sample(reward=1.0), Sample(reward=0.0)]
    assert check_reward_nonzero_std(args, same) == DynamicFilterOutput(False, "zero_std")
    assert check_reward_nonzero_std(args, diff).keep
    assert apply_filter(lambda a, g: False, args, diff) == DynamicFilterOutput(False, "filtered")


def test_dynamic_sampling_drops_constant_groups_and_over_samples(tmp_path):
    args = make_args(tmp_path, over_sampling_batch_size=3,
                     dynamic_sampling_filter_path="slime_ray.rollout.filters.check_reward_nonzero_std")
    source = RolloutDataSource(prompts=prompts(["const", "vary", "const", "const", "vary", "vary"]),
                               n_samples_per_prompt=2)
    manager = RolloutManager(args, source, ScriptedClient())
    groups, metrics = asyncio.run(manager.generate_rollout(0))
    assert len(groups) == args.rollout_batch_size
    assert all(s.label == "vary" for g in groups for s in g)
    assert metrics["rollout/dynamic_filter/drop_zero_std"] >= 2
    assert metrics["rollout/dynamic_filter/kept"] == 2
    assert metrics["rollout/generated_groups"] == 6  # 3, then 3 more after the drops
    table, _ = build_train_table(args, groups)
    assert table.num_rows == args.rollout_batch_size * args.n_samples_per_prompt


def test_partial_rollout_resumes_from_stored_tokens_with_two_weight_versions(tmp_path):
    args = make_args(tmp_path, partial_rollout=True, over_sampling_batch_size=3)
    source = RolloutDataSourceWithBuffer(prompts=prompts(["vary"] * 8), n_samples_per_prompt=2)
    client = ScriptedClient(hang={102}, partial=2)  # the third prompt's requests stall until abort
    manager = RolloutManager(args, source, client)
    groups, m0 = asyncio.run(manager.generate_rollout(0))
    assert client.aborts >= 1 and m0["rollout/aborted_samples"] == 2 and m0["rollout/returned_groups"] == 1
    assert len(source.buffer) == 1
    stored = source.buffer[0][0]
    assert stored.status == SampleStatus.ABORTED and stored.tokens == [102, 1, 2, 7, 8]
    assert stored.weight_versions == [0] and stored.metadata["start_rollout_id"] == 0

    # weights updated; the engine answers now; the buffered group comes first
    client.hang, client.weight_version = set(), 1
    args.over_sampling_batch_size = 2  # exactly the buffered group + one new prompt
    client.requests.clear()
    groups, m1 = asyncio.run(manager.generate_rollout(1))
    assert m1["rollout/resumed_samples"] == 2
    resumed = [s for g in groups for s in g if s.group_index == stored.group_index]
    assert len(resumed) == 2
    req = next(r for r in client.requests if r["input_ids"][0] == 102)
    assert req["input_ids"] == [102, 1, 2, 7, 8]               # from the stored tokens
    assert req["sampling_params"]["max_new_tokens"] == 4 - 2   # budget reduced by what it had
    s = resumed[0]
    assert s.weight_versions == [0, 1]
    assert s.tokens == [102, 1, 2, 7, 8, 7, 8] and s.response_length == 4
    assert s.loss_mask == [1, 1, 1, 1] and s.rollout_log_probs == [-0.5] * 4
    assert s.status == SampleStatus.TRUNCATED and s.reward is not None


def test_without_partial_rollout_aborted_groups_are_discarded(tmp_path):
    args = make_args(tmp_path, over_sampling_batch_size=3)
    source = RolloutDataSourceWithBuffer(prompts=prompts(["vary"] * 4), n_samples_per_prompt=2)
    groups, m = asyncio.run(RolloutManager(args, source, ScriptedClient(hang={102})).generate_rollout(0))
    assert len(groups) == 2 and source.buffer == [] and m["rollout/aborted_samples"] == 2


BATCH_FORM = '''
async def custom_generate(args, samples, evaluation=False):
    for sample in samples:
        sample.response = "12"
        sample.reward = 0.25
    return samples
'''


def test_batch_form_sets_reward_and_text_is_tokenized_once(tmp_path):
    from slime_ray.testing import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "m")
    (tmp_path / "gen.py").write_text(BATCH_FORM)
    args = make_args(tmp_path, custom_generate_function_path=str(tmp_path / "gen.py"), hf_checkpoint=str(model),
                     custom_rm_path=str(tmp_path / "nope.py"))  # would fail if the RM were called
    source = RolloutDataSource(prompts=prompts(["a", "b"]), n_samples_per_prompt=2)
    groups, _ = asyncio.run(RolloutManager(args, source, ScriptedClient()).generate_rollout(0))
    s = groups[0][0]
    assert s.reward == 0.25 and s.metadata["retokenized"] and s.response == "12"
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)("12", add_special_tokens=False)["input_ids"]
    assert s.tokens[1:] == [1, 2] + ids and s.loss_mask == [1] * len(ids)


def test_signature_detection():
    async def single(args, sample, sampling_params): ...
    async def single_eval(args, sample, sampling_params, evaluation=False): ...
    async def batch(args, samples, evaluation=False): ...
    assert not is_batch_form(single) and not is_batch_form(single_eval) and is_batch_form(batch)


def test_buffer_roundtrips_through_parquet(tmp_path):
    source = RolloutDataSourceWithBuffer(prompts=prompts(["a", "b"]), n_samples_per_prompt=2)
    g = source.get_samples(1)[0]
    g[0].append_response_tokens([5, 6], [-0.25, -0.5], trainable=True, weight_version=3)
    g[0].append_response_tokens([9], None, trainable=False)
    g[0].status = SampleStatus.ABORTED
    source.add_samples([g])
    source.save(tmp_path / "ds.json")
    assert (tmp_path / "ds.json.buffer.parquet").exists()
    assert "buffer" not in json.loads((tmp_path / "ds.json").read_text())
    fresh = RolloutDataSourceWithBuffer(prompts=prompts(["a", "b"]), n_samples_per_prompt=2)
    fresh.load(tmp_path / "ds.json")
    back = fresh.buffer[0][0]
    assert back.tokens == g[0].tokens and back.loss_mask == [1, 1, 0] and back.weight_versions == [3]
    assert back.rollout_log_probs == [-0.25, -0.5, 0.0] and back.status == SampleStatus.ABORTED
    assert fresh.sample_group_index == 1
