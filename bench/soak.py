"""Soak test (not in CI): demo GRPO training on a local Ray cluster while an engine replica is
killed every few minutes; reports steps done, samples lost (must be 0) and memory growth per step.

    python bench/soak.py                                # 30 minutes, a replica killed every 5 minutes
    python bench/soak.py --minutes 3 --kill-every 60    # short version

Runs ``jobs/grpo.py``'s ``main`` in this process (tiny random Llama unless ``--hf-checkpoint``),
with ``--use-fault-tolerance``; a background thread ``ray.kill``s the replica actor of
``engine_0``. A ledger reward function records every scored sample, so a lost sample (one of the
step's ``rollout_batch_size x n_samples_per_prompt`` missing, or one without a response) is
counted. Memory: resident set size of this process and every process it started (the local Ray
cluster: GCS, raylet, workers, Serve replicas), after each step; growth per step is the slope of
a least-squares line over the second half of the steps (the first half includes warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LEDGER_RM = '''
import json, os
async def reward(args, sample):
    with open(os.environ["SLIME_RAY_SOAK_LEDGER"], "a") as f:
        f.write(json.dumps({"index": sample.index, "status": sample.status.value,
                            "len": sample.response_length, "version": sample.weight_version}) + "\\n")
    return float(sample.tokens[-1] % 2 == 0)
'''


class _Done(Exception):
    pass


def tree_rss_mb() -> float:
    """RSS of this process and all its descendants, MiB."""
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..n-1 (units of y per step)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def killer(stop: threading.Event, every_s: float, kills: list) -> None:
    """Kill the engine_0 replica actor every ``every_s`` seconds."""
    import ray

    while not stop.wait(every_s):
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith("SERVE_REPLICA") and "engine_0" in a["name"]:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
                kills.append((time.time(), a["name"]))
                print(f"[soak] killed {a['name']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--kill-every", type=float, default=300.0, help="seconds between replica kills")
    p.add_argument("--hf-checkpoint", default=None, help="model folder (default: a tiny random Llama)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    opts = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from jobs.grpo import main as grpo_main
    from slime_ray import tracking
    from slime_ray.testing import make_tiny_model_dir

    work = Path(tempfile.mkdtemp(prefix="slime_ray_soak_"))
    model = opts.hf_checkpoint or str(make_tiny_model_dir(work / "model"))
    with open(work / "train.jsonl", "w") as f:
        for a in range(64):
            f.write(json.dumps({"prompt": f"What is {a} + {a % 7}?", "label": str(a + a % 7)}) + "\n")
    (work / "rm.py").write_text(LEDGER_RM)
    os.environ["SLIME_RAY_SOAK_LEDGER"] = str(work / "ledger.jsonl")
    rbs, n = 4, 4
    ray.init(address="local", num_cpus=4, include_dashboard=False)

    steps: list[dict] = []
    deadline = time.time() + opts.minutes * 60
    original = tracking.Tracker.log_metrics

    def log_metrics(self, metrics, step=None):  # called once per step by the driver
        original(self, metrics, step=step)
        if "rollout/reward_mean" in metrics:
            steps.append({"step": step, "t": time.time(), "rss_mb": tree_rss_mb()})
            print(f"[soak] step {step} rss {steps[-1]['rss_mb']:.0f} MiB", flush=True)
        if time.time() > deadline:
            raise _Done

    tracking.Tracker.log_metrics = log_metrics
    stop, kills = threading.Event(), []
    threading.Thread(target=killer, args=(stop, opts.kill_every, kills), daemon=True).start()
    t0 = time.time()
    try:
        grpo_main([
            "--hf-checkpoint", model, "--prompt-data", str(work / "train.jsonl"), "--input-key", "prompt",
            "--label-key", "label", "--apply-chat-template", "--custom-rm-path", str(work / "rm.py"),
            "--rollout-batch-size", str(rbs), "--n-samples-per-prompt", str(n), "--global-batch-size", str(rbs * n),
            "--num-rollout", "1000000", "--rollout-max-response-len", "16", "--lr", "1e-4",
            "--use-fault-tolerance", "--rollout-health-check-interval", "2", "--rollout-health-check-timeout", "10",
            "--torch-num-threads", "1", "--mlflow-tracking-uri", f"sqlite:///{work}/mlflow.db"])
    except _Done:
        pass
    finally:
        stop.set()
    rows = [json.loads(line) for line in open(work / "ledger.jsonl")]
    done_indices = set(range(len(steps) * rbs * n))
    good = {r["index"] for r in rows if r["status"] in ("completed", "truncated") and r["len"] > 0}
    rss = [s["rss_mb"] for s in steps]
    half = rss[len(rss) // 2:]
    report = {
        "minutes": round((time.time() - t0) / 60, 2), "steps_done": len(steps), "replica_kills": len(kills),
        "samples_expected": len(done_indices), "samples_lost": len(done_indices - good),
        "rss_mb_first": round(rss[0], 1) if rss else None, "rss_mb_last": round(rss[-1], 1) if rss else None,
        "rss_growth_mb_per_step_second_half": round(slope(half), 3),
        "s_per_step": round((steps[-1]["t"] - steps[0]["t"]) / max(len(steps) - 1, 1), 2) if steps else None,
    }
    print("[soak] " + json.dumps(report), flush=True)
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=1))
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    sys.exit(0 if report["samples_lost"] == 0 else 1)


if __name__ == "__main__":
    main()
