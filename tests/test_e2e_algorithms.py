"""End to end on a local Ray cluster: jobs/grpo.py with PPO (critic group) and the other
advantage estimators, on a tiny random Llama.

Real parts: Ray actors + placement group (actor and, for PPO, critic sharing its bundles), Ray
Serve engine, MLflow sqlite store. Asserts the policy's parameters moved and the estimator's
metrics (PPO: critic value loss, clipfrac, values, grad norm) were logged at every step.
"""

import json
import os

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REWARD = '''
async def reward(args, sample):
    # parity of the last response token: random for a random model, so groups have signal
    return float(sample.tokens[-1] % 2 == 0)
'''

CRITIC_KEYS = ("critic/value_loss", "critic/value_clipfrac", "critic/values_mean", "critic/grad_norm")


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False)  # never join a cluster of another run
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    d = tmp_path_factory.mktemp("e2e_algo")
    make_tiny_model_dir(d / "model")
    with open(d / "train.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"What is {a} + {a + 1}?", "label": str(2 * a + 1)}) + "\n")
    (d / "rm.py").write_text(REWARD)
    return d


def _teardown():
    """Free the job's resources for the next test: Serve app, placement groups (and their actors)."""
    import ray
    from ray import serve

    from slime_ray.job import ROLLOUT_APP_NAME

    serve.delete(ROLLOUT_APP_NAME)
    for pg_id, info in ray.util.placement_group_table().items():
        if info["state"] != "REMOVED":
            ray.util.remove_placement_group(ray.util.get_placement_group(info["name"]) if info["name"]
                                            else _pg_from_id(pg_id))


def _pg_from_id(pg_id):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID.from_hex(pg_id))


def _run(workdir, name, num_rollout, *extra):
    import torch
    import ray
    from transformers import AutoModelForCausalLM

    from jobs.grpo import main

    uri = f"sqlite:///{workdir}/mlflow_{name}.db"
    result = main([
        "--hf-checkpoint", str(workdir / "model"), "--prompt-data", str(workdir / "train.jsonl"),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--custom-rm-path", str(workdir / "rm.py"),
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
        "--micro-batch-size", "4", "--num-rollout", str(num_rollout), "--rollout-max-response-len", "8",
        "--rollout-temperature", "1.0", "--lr", "1e-3", "--mlflow-tracking-uri", uri,
        "--torch-num-threads", "1", *extra,
    ])
    try:
        trained = ray.get(result.actor.actors[0].get_weights.remote())
        initial = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).state_dict()
        moved = max((trained[k] - initial[k]).abs().max().item() for k in initial)
    finally:
        _teardown()
    return result, moved, uri


def _history(uri, run_id, key):
    import mlflow

    return [m.step for m in mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, key)]


def test_ppo_with_critic_two_steps(ray_cluster, workdir):
    result, moved, uri = _run(workdir, "ppo", 2, "--advantage-estimator", "ppo", "--gamma", "1.0",
                              "--lambd", "0.95", "--critic-lr", "1e-3", "--value-clip", "0.2",
                              "--kl-coef", "0.01", "--normalize-advantages")
    assert moved > 1e-5, "policy parameters did not change"
    m = result.metrics
    for key in CRITIC_KEYS + ("train/loss", "train/pg_loss", "train/grad_norm"):
        assert _history(uri, result.run_id, key) == [0, 1], key
    assert m["critic/value_loss"] > 0 and m["critic/grad_norm"] > 0
    assert 0.0 <= m["critic/value_clipfrac"] <= 1.0


def test_ppo_critic_only_steps_keep_the_policy(ray_cluster, workdir):
    result, moved, uri = _run(workdir, "ppo_critic_only", 1, "--advantage-estimator", "ppo",
                              "--num-critic-only-steps", "1")
    assert moved == 0.0
    assert _history(uri, result.run_id, "critic/value_loss") == [0]
    assert "train/loss" not in result.metrics


def test_reinforce_plus_plus_with_kl_reward_two_steps(ray_cluster, workdir):
    result, moved, uri = _run(workdir, "rfpp", 2, "--advantage-estimator", "reinforce_plus_plus",
                              "--kl-coef", "0.01", "--gamma", "0.99")
    assert moved > 1e-5
    assert _history(uri, result.run_id, "train/pg_loss") == [0, 1]
    assert not any(k.startswith("critic/") for k in result.metrics)


@pytest.mark.parametrize("estimator", ["reinforce_plus_plus_baseline", "rloo", "gspo", "cispo"])
def test_estimator_one_step(ray_cluster, workdir, estimator):
    result, moved, uri = _run(workdir, estimator, 1, "--advantage-estimator", estimator)
    assert moved > 1e-5, estimator
    assert _history(uri, result.run_id, "train/loss") == [0]
