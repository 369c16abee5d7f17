"""GRPO step time: slime_ray (jobs/grpo.py, in-process, local Ray) vs TRL's GRPOTrainer, on CPU.

Same on both sides: model folder, prompts (examples/math_grpo/train.jsonl, chat template),
``--prompts-per-step`` prompts x ``--group-size`` samples per step, ``--max-new-tokens`` new
tokens, temperature 1, one optimizer step per rollout step, AdamW at ``--lr``, no KL term
(TRL's default beta=0; ours without --use-kl-loss), the same reward (slime_ray's
``math_reward``), fp32, ``--steps`` steps. Reported: median wall seconds per step over the
steady-state steps (the first ``--warmup`` steps are dropped).

What each side's step includes:
- slime_ray: rollout through the Ray Serve engine (HFEngine, generate + log-probs), reward,
  advantages, the trainer actor's log-prob recompute + PPO-clip loss + AdamW step, and the
  weight sync to the engine (every step); step time = gap between consecutive steps' MLflow
  metric timestamps (start-up of Ray, Serve and the actors is excluded).
- TRL: ``model.generate`` (plain transformers, no vLLM), reward, advantages, the loss forward /
  backward and AdamW step (no weight sync: one model); step time = gap between
  ``on_step_end`` callbacks (model loading and Trainer set-up excluded).

Each side's run is its own child process, so a TRL run never shares the machine with the Ray
cluster (raylet, GCS, Serve controller and proxy) that an earlier run of ours started.

    .venv/bin/python bench/trl_compare.py --model tiny --steps 6
    .venv/bin/python bench/trl_compare.py --model ~/.cache/slime_ray/models/SmolLM2-135M-Instruct --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA = REPO_ROOT / "examples/math_grpo/train.jsonl"


def steady(times: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(times, times[1:])][warmup:]
    return statistics.median(gaps) if gaps else float("nan")


def run_ours(args, model: str) -> list[float]:
    """Step-end timestamps of an in-process jobs/grpo.py run."""
    os.environ.setdefault("RAY_ADDRESS", "local")  # never join another cluster on this machine
    import mlflow

    sys.path.insert(0, str(REPO_ROOT / "jobs"))
    import grpo

    from slime_ray import job

    db = Path(tempfile.mkdtemp()) / "mlflow.db"
    argv = ["--hf-checkpoint", model, "--prompt-data", str(DATA), "--input-key", "prompt",
            "--label-key", "label", "--apply-chat-template",
            "--rollout-batch-size", str(args.prompts_per_step), "--n-samples-per-prompt", str(args.group_size),
            "--global-batch-size", str(args.prompts_per_step * args.group_size),
            "--micro-batch-size", str(args.prompts_per_step * args.group_size),
            "--num-rollout", str(args.steps), "--rollout-max-response-len", str(args.max_new_tokens),
            "--rollout-temperature", "1.0", "--advantage-estimator", "grpo", "--lr", str(args.lr),
            "--torch-num-threads", str(args.threads), "--mlflow-tracking-uri", f"sqlite:///{db}",
            "--run-name", "ours"] + args.ours_extra.split()
    result = grpo.main(argv)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    hist = client.get_metric_history(result.run_id, "perf/train_time")
    job.shutdown(result)
    return [m.timestamp / 1000.0 for m in sorted(hist, key=lambda m: m.step)]


def run_trl(args, model: str) -> list[float]:
    """Step-end timestamps of TRL's GRPOTrainer on the same data and settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from slime_ray.rollout.rewards import math_reward

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in DATA.open()][: args.prompts_per_step * (args.steps + 1)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "label": r["label"]}
                            for r in rows])

    def reward(completions, label, **_):
        return [math_reward(c[0]["content"] if isinstance(c, list) else c, lab) for c, lab in zip(completions, label)]

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.time())

    n = args.prompts_per_step * args.group_size
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n, gradient_accumulation_steps=1,
                     num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                     temperature=1.0, top_p=1.0, learning_rate=args.lr, beta=0.0, max_steps=args.steps,
                     use_vllm=False, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
                     save_strategy="no", shuffle_dataset=False, disable_dropout=True, seed=0)
    tok = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                          reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Stamp()])
    trainer.train()
    return stamps


def run_child(side: str, model: str) -> list[float]:
    """Run one side in a fresh Python process (same flags); returns its step-end stamps."""
    import subprocess

    out = Path(tempfile.mkdtemp()) / f"{side}.json"
    # argparse keeps the last of a repeated flag: the child's --model / --json override the parent's
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--model", model,
                    "--child", side, "--json", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (slime_ray.testing.make_tiny_model_dir) or an HF folder")
    p.add_argument("--side", choices=("ours", "trl", "both"), default="both")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="step gaps dropped from the median")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run both sides this many times, alternating which goes first; the ratio is the "
                        "median of the per-round ratios (this VM's speed drifts by +-25%% over minutes)")
    p.add_argument("--ours-extra", default="", help="extra jobs/grpo.py flags for our side, e.g. "
                   "'--rollout-compile true --rollout-batch-buckets 16'")
    p.add_argument("--json", default=None)
    p.add_argument("--child", choices=("ours", "trl"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one side's run, in this (child) process: write its step-end stamps
        stamps = {"ours": run_ours, "trl": run_trl}[args.child](args, args.model)
        Path(args.json).write_text(json.dumps(stamps))
        return
    model = args.model
    if model == "tiny":
        from slime_ray.testing import make_tiny_model_dir

        model = str(make_tiny_model_dir(tempfile.mkdtemp()))
    model = os.path.expanduser(model)
    res = {"model": args.model, "steps": args.steps, "samples_per_step": args.prompts_per_step * args.group_size,
           "max_new_tokens": args.max_new_tokens, "threads": args.threads}
    sides = [("trl", run_trl), ("ours", run_ours)]
    rounds: list[dict] = []
    for r in range(args.rounds):
        one: dict = {}
        for side, fn in (sides if r % 2 == 0 else sides[::-1]):
            if args.side in (side, "both"):
                stamps = run_child(side, model)
                one[f"{side}_step_s"] = steady(stamps, args.warmup)
                one[f"{side}_gaps_s"] = [round(b - a, 2) for a, b in zip(stamps, stamps[1:])]
                print(f"round {r}: {side}: steady step {one[f'{side}_step_s']:.2f}s  gaps {one[f'{side}_gaps_s']}",
                      flush=True)
        if "ours_step_s" in one and "trl_step_s" in one:
            one["ratio"] = one["ours_step_s"] / one["trl_step_s"]
            print(f"round {r}: ours / TRL step time: {one['ratio']:.2f}", flush=True)
        rounds.append(one)
    res.update(rounds[0])
    if args.rounds > 1:
        res["rounds"] = rounds
        for k in ("trl_step_s", "ours_step_s", "ratio"):
            vals = [x[k] for x in rounds if k in x]
            if vals:
                res[f"median_{k}"] = statistics.median(vals)
    if "ratio" in res:
        ratios = [x["ratio"] for x in rounds if "ratio" in x]
        print(f"ours / TRL step time: {statistics.median(ratios):.2f}"
              + (f" (median of {len(ratios)} rounds: {' '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""),
              flush=True)
    print(json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
