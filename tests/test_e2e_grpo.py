"""End to end on a local Ray cluster: jobs/grpo.py with a tiny random Llama, 2 steps.

Real parts: Ray actors + placement group (trainer), Ray Serve (engine + ingress), MLflow sqlite
store. Asserts the trainer's parameters moved, the engine holds exactly the trainer's weights
after sync (max abs diff 0), Samples carry weight versions 0 then 1, and metrics are in MLflow.
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


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    d = tmp_path_factory.mktemp("e2e")
    make_tiny_model_dir(d / "model")
    with open(d / "train.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"What is {a} + {a + 1}?", "label": str(2 * a + 1)}) + "\n")
    (d / "rm.py").write_text(REWARD)
    return d


def test_grpo_two_steps_end_to_end(ray_cluster, workdir):
    import mlflow
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.grpo import main

    uri = f"sqlite:///{workdir}/mlflow.db"
    result = main([
        "--hf-checkpoint", str(workdir / "model"), "--prompt-data", str(workdir / "train.jsonl"),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--custom-rm-path", str(workdir / "rm.py"),
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
        "--micro-batch-size", "2", "--num-rollout", "2", "--rollout-max-response-len", "8",
        "--rollout-temperature", "1.0", "--use-kl-loss", "--kl-loss-coef", "0.01", "--lr", "1e-3",
        "--mlflow-tracking-uri", uri, "--torch-num-threads", "1",
    ])
    trained = ray.get(result.actor.actors[0].get_weights.remote())
    initial = AutoModelForCausalLM.from_pretrained(workdir / "model").state_dict()
    moved = max((trained[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-5, "parameters did not change"
    engine = result.rollout.client.get_engine_weights(0)
    assert set(engine) >= set(trained)
    diff = max((engine[k].float() - trained[k].float()).abs().max().item() for k in trained)
    assert diff == 0.0
    assert result.rollout.client.weight_versions() == [2]
    assert result.rollout.client.idle_during_sync  # the synchronous loop: ingress version set alongside the load

    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(result.run_id)
    for key in ("rollout/reward_mean", "rollout/accuracy", "rollout/response_len/mean",
                "rollout/response_len/max", "rollout/truncated_ratio", "train/loss", "train/pg_clipfrac",
                "train/ppo_kl", "train/kl_loss", "train/entropy", "train/grad_norm", "perf/rollout_time",
                "perf/train_time", "perf/sync_time", "perf/rollout_tokens_per_s"):
        hist = client.get_metric_history(result.run_id, key)
        assert [m.step for m in hist] == [0, 1], key
    versions = [m.value for m in client.get_metric_history(result.run_id, "rollout/weight_version")]
    assert versions == [0.0, 1.0]
    # step 0: policy = old = reference -> ppo_kl and kl_loss are 0 (to float precision)
    kl0 = client.get_metric_history(result.run_id, "train/kl_loss")[0].value
    ppo_kl0 = client.get_metric_history(result.run_id, "train/ppo_kl")[0].value
    assert abs(kl0) < 1e-8 and abs(ppo_kl0) < 1e-8
    # the trainer's log-probs of the sampled responses equal the engine's (fp32)
    lp_diff = client.get_metric_history(result.run_id, "train/train_rollout_logprob_abs_diff")
    assert all(m.value < 1e-4 for m in lp_diff), [m.value for m in lp_diff]
    assert run.data.params["rollout_batch_size"] == "2"


def test_grpo_megatron_backend_pushes_hf_weights_to_the_engine(ray_cluster, workdir):
    """--train-backend megatron through the whole job on CPU: the object-store push carries HF names and
    full tensors (the engine ends with exactly the trainer's weights, version 2)."""
    pytest.importorskip("megatron.core")
    import ray

    from jobs.grpo import main

    result = main([
        "--hf-checkpoint", str(workdir / "model"), "--prompt-data", str(workdir / "train.jsonl"),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--custom-rm-path", str(workdir / "rm.py"), "--train-backend", "megatron",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--global-batch-size", "8",
        "--micro-batch-size", "4", "--num-rollout", "2", "--rollout-max-response-len", "8",
        "--lr", "1e-3", "--mlflow-tracking-uri", f"sqlite:///{workdir}/mlflow_megatron.db",
        "--torch-num-threads", "1",
    ])
    trained = ray.get(result.actor.actors[0].get_weights.remote())
    assert "model.embed_tokens.weight" in trained  # HF names
    engine = result.rollout.client.get_engine_weights(0)
    diff = max((engine[k].float() - trained[k].float()).abs().max().item() for k in trained)
    assert diff == 0.0
    assert result.rollout.client.weight_versions() == [2]
