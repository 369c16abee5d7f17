"""End to end on a local Ray cluster with a tiny random Llama: the rollout-loop features.

- the multi-turn calculator example trains 2 steps through jobs/grpo.py, evaluating two sets
  (step 0 and after step 2) into MLflow; jobs/eval.py then evaluates the saved checkpoint alone;
- dynamic sampling: groups whose reward is constant are dropped, over-sampling replaces them,
  and the step trains on --rollout-batch-size groups.
"""

import json
import os
import socket

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONST_RM = '''
async def reward(args, sample):
    # label "const": the whole group scores 1 (zero std, dropped); else the parity of the last token
    return 1.0 if sample.label == "const" else float(sample.tokens[-1] % 2 == 0)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["SLIME_RAY_SERVE_PORT"] = str(_free_port())
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    d = tmp_path_factory.mktemp("e2e_rollout")
    make_tiny_model_dir(d / "model")
    rows = [json.loads(line) for line in open(os.path.join(REPO, "examples/multi_turn_tools/test.jsonl"))]
    for name, part in (("eval_a.jsonl", rows[:2]), ("eval_b.jsonl", rows[2:4])):
        with open(d / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    with open(d / "mixed.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "label": "const" if i % 2 == 0 else str(i + 1)}) + "\n")
    (d / "rm.py").write_text(CONST_RM)
    return d


COMMON = ["--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--micro-batch-size", "2",
          "--rollout-temperature", "1.0", "--lr", "1e-3", "--torch-num-threads", "1"]


def _release(result):
    """Give back what a finished job holds (trainer actors, the Serve app, the placement group)."""
    import ray
    from ray import serve

    from slime_ray.job import ROLLOUT_APP_NAME
    from slime_ray.placement import remove_placement

    for a in getattr(result.actor, "actors", []) if result.actor is not None else []:
        ray.kill(a)
    serve.delete(ROLLOUT_APP_NAME)
    if result.actor is not None:
        remove_placement(result.actor.placement)


def _history(uri, run_id, key):
    import mlflow

    return [(m.step, m.value) for m in mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, key)]


def test_multi_turn_example_trains_two_steps_with_eval(ray_cluster, workdir):
    from jobs.grpo import main

    uri = f"sqlite:///{workdir}/mlflow.db"
    result = main([
        "--hf-checkpoint", str(workdir / "model"), "--prompt-data", os.path.join(REPO, "examples/multi_turn_tools/train.jsonl"),
        "--custom-generate-function-path", os.path.join(REPO, "examples/multi_turn_tools/generate.py:generate"),
        "--max-turns", "2", "--rm-type", "math",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--global-batch-size", "4", "--num-rollout", "2",
        "--rollout-max-response-len", "10", "--mlflow-tracking-uri", uri, "--save", str(workdir / "ckpt"),
        "--save-interval", "2",
        "--eval-prompt-data", "calc_a", str(workdir / "eval_a.jsonl"), "calc_b", str(workdir / "eval_b.jsonl"),
        "--eval-interval", "2", "--n-samples-per-eval-prompt", "2", "--eval-max-response-len", "8", *COMMON,
    ])
    _release(result)
    assert [s for s, _ in _history(uri, result.run_id, "train/loss")] == [0, 1]
    for name in ("calc_a", "calc_b"):
        for key in ("reward_mean", "pass_at_1", "pass_at_2", "truncated_ratio"):
            hist = _history(uri, result.run_id, f"eval/{name}/{key}")
            assert [s for s, _ in hist] == [0, 2], (name, key)  # before training, after step 2
            assert all(0.0 <= v <= 1.0 for _, v in hist)


def test_eval_job_on_saved_checkpoint(ray_cluster, workdir):
    from jobs import eval as eval_job

    if not (workdir / "ckpt").exists():
        pytest.skip("needs the checkpoint of test_multi_turn_example_trains_two_steps_with_eval")
    uri = f"sqlite:///{workdir}/mlflow.db"
    out = eval_job.main(["--hf-checkpoint", str(workdir / "model"), "--load", str(workdir / "ckpt"),
                         "--eval-prompt-data", "calc_a", str(workdir / "eval_a.jsonl"),
                         "--n-samples-per-eval-prompt", "2", "--eval-max-response-len", "8",
                         "--custom-generate-function-path",
                         os.path.join(REPO, "examples/multi_turn_tools/generate.py:generate"),
                         "--mlflow-tracking-uri", uri, *COMMON])
    assert _history(uri, out.run_id, "eval/calc_a/pass_at_1")[0][0] == 2  # the checkpoint saw 2 steps
    assert out.rollout.client.weight_versions() == [0]
    _release(out)


def test_dynamic_sampling_replaces_constant_groups(ray_cluster, workdir):
    from jobs.grpo import main

    uri = f"sqlite:///{workdir}/mlflow_ds.db"
    result = main([
        "--hf-checkpoint", str(workdir / "model"), "--prompt-data", str(workdir / "mixed.jsonl"),
        "--custom-rm-path", str(workdir / "rm.py"),
        "--dynamic-sampling-filter-path", "slime_ray.rollout.filters.check_reward_nonzero_std",
        "--over-sampling-batch-size", "3",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8", "--num-rollout", "1",
        "--rollout-max-response-len", "6", "--mlflow-tracking-uri", uri, *COMMON,
    ])
    _release(result)
    m = result.metrics
    assert m["rollout/dynamic_filter/kept"] == 2
    assert m["rollout/dynamic_filter/drop_zero_std"] >= 1
    assert m["rollout/generated_groups"] >= 3
    assert "train/loss" in m and _history(uri, result.run_id, "rollout/dynamic_filter/drop_zero_std")


def test_streaming_data_source_reads_a_ray_data_stream(ray_cluster, workdir, tmp_path):
    from argparse import Namespace

    from slime_ray.data.streaming import StreamingRolloutDataSource

    args = Namespace(prompt_data=str(workdir / "mixed.jsonl"), input_key="prompt", label_key="label",
                     metadata_key="metadata", apply_chat_template=True, system_prompt=None,
                     rollout_max_prompt_len=None, n_samples_per_prompt=2, rollout_shuffle=False, rollout_seed=1,
                     num_data_workers=2, buffer_filter_path=None, hf_checkpoint=str(workdir / "model"))
    source = StreamingRolloutDataSource(args)
    groups = source.get_samples(5)
    assert [g[0].prompt.count("What is") for g in groups] == [1] * 5 and all(len(g) == 2 for g in groups)
    assert [g[0].label for g in groups] == ["const", "2", "const", "4", "const"]
    assert all(g[0].tokens and g[0].tokens == g[1].tokens for g in groups)
    source.add_samples([groups[0]])
    source.save(tmp_path / "ds.json")
    resumed = StreamingRolloutDataSource(args)
    resumed.load(tmp_path / "ds.json")
    nxt = resumed.get_samples(3)
    assert nxt[0][0].group_index == groups[0][0].group_index          # the buffered group first
    assert [g[0].label for g in nxt[1:]] == ["6", "const"]           # then the stream where it stopped
    more = resumed.get_samples(8)                                     # crosses the end: epoch 1
    assert resumed.epoch_id == 1 and [g[0].label for g in more[-3:]] == ["const", "2", "const"]
