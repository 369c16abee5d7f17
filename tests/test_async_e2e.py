"""End to end on a local Ray cluster (tiny random Llama): async loop, colocated = disaggregated,
and the weight-sync protocol of the rollout app (atomic updates, stale replicas get no traffic).
"""

import asyncio
import json
import os

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REWARD = '''
async def reward(args, sample):
    return float(sample.tokens[-1] % 2 == 0)
'''

# Per-sample seeds make a rollout independent of how requests are batched (invariance test).
SEEDED_GENERATE = '''
from slime_ray.rollout.manager import generate as default_generate

async def generate(args, sample, sampling_params):
    return await default_generate(args, sample, {**sampling_params, "seed": 1000 + sample.index})
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

    d = tmp_path_factory.mktemp("async")
    make_tiny_model_dir(d / "model")
    make_tiny_model_dir(d / "model_b", seed=1)
    with open(d / "train.jsonl", "w") as f:
        for a in range(8):
            f.write(json.dumps({"prompt": f"What is {a} + {a + 1}?", "label": str(2 * a + 1)}) + "\n")
    (d / "rm.py").write_text(REWARD)
    (d / "gen.py").write_text(SEEDED_GENERATE)
    return d


def _flags(workdir, *extra):
    return ["--hf-checkpoint", str(workdir / "model"), "--prompt-data", str(workdir / "train.jsonl"),
            "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
            "--custom-rm-path", str(workdir / "rm.py"), "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--global-batch-size", "8", "--micro-batch-size", "4",
            "--rollout-max-response-len", "8", "--lr", "1e-3", "--torch-num-threads", "1",
            "--mlflow-tracking-uri", f"sqlite:///{workdir}/mlflow.db", *extra]


def _history(workdir, run_id, key):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_async_run_interval_2_staleness_and_tis(ray_cluster, workdir):
    from jobs.grpo_async import main
    from slime_ray import job

    result = main(_flags(workdir, "--num-rollout", "4", "--update-weights-interval", "2",
                         "--max-staleness", "1", "--async-buffer-size", "1", "--use-tis"))
    try:
        h = lambda k: _history(workdir, result.run_id, k)  # noqa: E731
        assert h("rollout/engine_weight_version") == [0.0, 2.0, 2.0, 4.0]  # advances every 2nd step
        assert result.rollout.client.weight_versions() == [4]
        assert not result.rollout.client.idle_during_sync  # requests are in flight while the async loop syncs
        assert max(h("rollout/staleness_max")) <= 1  # no trained sample older than --max-staleness
        assert sum(h("rollout/stale_dropped_samples")) == 0  # the producer waited instead
        assert all(0.0 < v <= 2.0 for v in h("train/tis"))  # TIS weights against rollout log-probs
        assert len(h("train/loss")) == 4
        for key in ("perf/train_wait_time", "perf/rollout_wait_weights_time", "perf/overlap_ratio",
                    "rollout/staleness_0", "sync/bytes"):
            assert h(key), key
        assert h("sync/bytes")[0] > 0 and len(h("perf/sync_time")) == 2
    finally:
        job.shutdown(result)


def _first_step_losses(workdir, *extra):
    from jobs.grpo import main
    from slime_ray import job

    result = main(_flags(workdir, "--num-rollout", "1", "--custom-generate-function-path",
                         str(workdir / "gen.py") + ":generate", *extra))
    try:
        return {k: _history(workdir, result.run_id, k)[0] for k in
                ("train/loss", "train/pg_loss", "train/entropy", "rollout/reward_mean")}, result
    finally:
        job.shutdown(result)


def test_colocated_equals_disaggregated_first_step(ray_cluster, workdir):
    colo, r1 = _first_step_losses(workdir, "--colocate", "--offload-rollout")
    disagg, r2 = _first_step_losses(workdir)
    assert r1.placement is not None and r1.placement.colocate and not r2.placement.colocate
    assert colo == disagg
    for phase in ("offload_rollout", "onload_rollout"):  # timed phases, only when they run
        assert len(_history(workdir, r1.run_id, f"perf/{phase}_time")) == 1
        assert _history(workdir, r2.run_id, f"perf/{phase}_time") == []


def test_weight_update_is_atomic_and_matches_a_fresh_engine(ray_cluster, workdir):
    import torch
    from ray import serve
    from transformers import AutoModelForCausalLM

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.engines.hf import HFEngine
    from slime_ray.rollout.engine_client import EngineClient
    from slime_ray.testing import build_tiny_tokenizer

    ids = build_tiny_tokenizer().encode("What is 3 + 4?")
    req = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": 24}, "return_logprob": True}
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(workdir / "model").state_dict()
    new_weights = {k: v + 0.3 * torch.randn_like(v) for k, v in base.items() if k != "lm_head.weight"}
    fresh = HFEngine(str(workdir / "model"))
    expect = {0: fresh.generate([req])[0]}
    fresh.update_weights(new_weights, 1)  # a fresh engine loaded with the new weights
    expect[1] = fresh.generate([req])[0]
    assert expect[0]["output_ids"] != expect[1]["output_ids"]

    def same(r, v):
        return r["output_ids"] == expect[v]["output_ids"] and all(
            abs(a - b) < 1e-4 for a, b in zip(r["output_log_probs"], expect[v]["output_log_probs"]))

    serve.run(build_rollout_app(str(workdir / "model"), num_engines=1, max_batch_size=4,
                                batch_wait_timeout_s=0.01, num_cpus_per_engine=1), name="sync_test",
              route_prefix="/sync_test")
    client = EngineClient.from_app("sync_test")
    try:
        async def traffic_during_update():
            reqs = [asyncio.create_task(client.generate(dict(req))) for _ in range(12)]
            await asyncio.sleep(0.05)
            upd = asyncio.create_task(client.update_weights_async(new_weights, 1))
            reqs += [asyncio.create_task(client.generate(dict(req))) for _ in range(12)]
            await upd
            first_after = await client.generate(dict(req))
            return await asyncio.gather(*reqs), first_after

        responses, first_after = asyncio.run(traffic_during_update())
        seen = {r["weight_version"] for r in responses}
        assert seen <= {0, 1}
        for r in responses:  # every response entirely from one version: exactly that version's output
            assert same(r, r["weight_version"])
        assert first_after["weight_version"] == 1 and same(first_after, 1)
    finally:
        serve.delete("sync_test")


@pytest.mark.parametrize("idle_during_sync,in_actors", [(False, False), (True, False), (True, True)])
def test_stale_replica_gets_no_traffic_until_current(ray_cluster, workdir, idle_during_sync, in_actors):
    """in_actors: each engine runs in an actor on a placement-group bundle (as in a job); the
    ingress's batches and the client's syncs then go to the actors directly, not the replicas."""
    import ray
    from ray import serve
    from transformers import AutoModelForCausalLM

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.rollout.engine_client import EngineClient

    pg = placements = None
    if in_actors:
        pg = ray.util.placement_group([{"CPU": 0.5}, {"CPU": 0.5}], name="rejoin_test_pg")
        ray.get(pg.ready())
        placements = [{"pg": pg, "pg_name": "rejoin_test_pg", "bundle_index": i, "options": {"num_cpus": 0.5}}
                      for i in range(2)]
    serve.run(build_rollout_app(str(workdir / "model"), num_engines=2, num_cpus_per_engine=0.5,
                                engine_placements=placements),
              name="rejoin_test", route_prefix="/rejoin_test")
    client = EngineClient.from_app("rejoin_test")
    client.idle_during_sync = idle_during_sync  # True: the ingress takes the version alongside the engines' load
    try:
        actors = client.engine_actors()
        assert all((a is not None) == in_actors for a in actors)
        w0 = AutoModelForCausalLM.from_pretrained(workdir / "model").state_dict()
        w1 = AutoModelForCausalLM.from_pretrained(workdir / "model_b").state_dict()
        client.update_weights(w1, 1)
        # engine_1 "rejoins" holding the initial weights (as a restarted replica would)
        client.engines[1].update_weights.remote([w0], 0).result()
        req = {"input_ids": [1, 5, 6], "sampling_params": {"max_new_tokens": 2}}

        async def burst():
            return await asyncio.gather(*(client.generate(dict(req)) for _ in range(8)))

        out = asyncio.run(burst())
        assert all(r["weight_version"] == 1 and r["meta_info"]["engine_index"] == 0 for r in out)
        client.update_weights(w1, 2)  # the next sync brings it back
        if in_actors:  # the sync went to the actors; each replica reads the version again when asked
            assert ray.get([a.weight_version.remote() for a in actors]) == [2, 2]
        assert client.weight_versions() == [2, 2]
        out = asyncio.run(burst())
        assert {r["weight_version"] for r in out} == {2}
        assert {r["meta_info"]["engine_index"] for r in out} == {0, 1}
        # a single request goes through a replica, whose cached version predates the direct sync
        one = client.ingress.generate.remote(dict(req)).result()
        assert one["weight_version"] == 2
    finally:
        serve.delete("rejoin_test")
        if pg is not None:
            ray.util.remove_placement_group(pg)


def test_engine_actor_control_calls_get_through_while_generate_calls_wait(ray_cluster, workdir):
    """More direct generate calls than the actor's 16 control threads wait on a paused engine;
    resume (a control call) still gets a thread, and every call then completes."""
    import time

    import ray

    from slime_ray.engines.remote import RemoteEngine

    pg = ray.util.placement_group([{"CPU": 0.5}], name="control_test_pg")
    ray.get(pg.ready())
    engine = RemoteEngine("hf", str(workdir / "model"), {"seed": 0},
                          {"pg": pg, "pg_name": "control_test_pg", "bundle_index": 0, "options": {"num_cpus": 0.5}})
    try:
        engine.pause()
        req = {"input_ids": [1, 5, 6], "sampling_params": {"max_new_tokens": 2}}
        refs = [engine.actor.generate_at_least.remote([dict(req), dict(req)], 0, 64) for _ in range(20)]
        time.sleep(1.0)
        assert ray.wait(refs, num_returns=len(refs), timeout=0.1)[0] == []  # all held by the pause
        ray.get(engine.actor.call.remote("resume"), timeout=30)
        out = ray.get(refs, timeout=120)
        assert [len(o) for o in out] == [2] * 20
        assert all(r["weight_version"] == 0 and len(r["output_ids"]) >= 1 for o in out for r in o)
    finally:
        ray.kill(engine.actor)
        ray.util.remove_placement_group(pg)
