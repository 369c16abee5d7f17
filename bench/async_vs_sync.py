"""Wall time per step of the sync loop (jobs/grpo.py) vs the overlapped loop (jobs/grpo_async.py).

Both loops run the same config on a fresh local Ray cluster each (one after the other, in
subprocesses); the time per step is measured in steady state from the MLflow timestamps of
``train/loss`` (``(t_last - t_first) / (steps - 1)``, so start-up is excluded). Prints both, the
ratio sync/async, and appends a section to bench/RESULTS.md (command, machine, date).

CPU (tiny random model, made on the fly)::

    python bench/async_vs_sync.py --steps 4

2-GPU machine (one trainer GPU, one engine GPU; SmolLM2-135M-Instruct)::

    python bench/async_vs_sync.py --model smollm2-135m-instruct --steps 6 \\
        --extra "--rollout-batch-size 8 --n-samples-per-prompt 8 --global-batch-size 64 \\
                 --rollout-max-response-len 256"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, os, sys
sys.path.insert(0, {root!r})
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
from jobs.{mod} import main
r = main({argv!r})
rows = [json.loads(x) for x in open({uri!r}[len("jsonl:"):])]
steps = sorted((x for x in rows if "train/loss" in x.get("metrics", {{}})), key=lambda x: x["step"])
ts = [x["timestamp_ms"] for x in steps]
perf = [{{k: v for k, v in x["metrics"].items() if k.startswith("perf/")}} for x in steps]
extra = {{k: v for k, v in r.metrics.items() if k.startswith(("perf/", "rollout/staleness"))}}
print("BENCH_RESULT " + json.dumps({{"ts": ts, "last": extra, "perf": perf}}))
"""


def machine() -> str:
    """CPU count and, if any, GPU names."""
    gpus = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        gpus = ", ".join(sorted(set(out.stdout.split("\n")) - {""})) and f", GPUs: {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{platform.node()} ({os.cpu_count()} CPUs{gpus})"


def run_loop(mod: str, argv: list[str], uri: str) -> dict:
    """Run one loop in a subprocess; returns ``{"ts": [ms...], "last": {...}}``.

    Raises:
        RuntimeError: the job failed (its output's tail is in the message).
    """
    code = CHILD.format(root=str(ROOT), mod=mod, argv=argv, uri=uri)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    raise RuntimeError(f"{mod} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


def per_step_s(ts: list[int]) -> float:
    """Steady-state seconds per step from ms timestamps of successive steps."""
    if len(ts) < 2:
        raise ValueError("need at least 2 steps to time a step")
    return (ts[-1] - ts[0]) / 1000.0 / (len(ts) - 1)


def breakdown(r: dict) -> dict[str, float]:
    """Median seconds per steady-state step (steps 1..) of the sync loop: wall time (between the
    step's metrics and the previous step's), rollout / log-probs / train / sync phases, and other =
    wall minus the four (driver glue: table building, offload/onload, metric logging, actor calls)."""
    import statistics as st

    rows = []
    for i in range(1, len(r["ts"])):
        p = r["perf"][i]
        wall = (r["ts"][i] - r["ts"][i - 1]) / 1000.0
        ph = {k: float(p.get(f"perf/{k}_time", 0.0)) for k in ("rollout", "logprob", "train", "sync")}
        ph["train"] -= ph["logprob"]  # perf/train_time includes the old/ref log-prob forwards
        rows.append({"wall": wall, **ph, "other": wall - sum(ph.values())})
    out = {k: st.median(x[k] for x in rows) for k in rows[0]} if rows else {}
    if out:
        out["other_share"] = out["other"] / out["wall"]
    return out


def perf_medians(r: dict) -> dict[str, float]:
    """Median over steps 1.. of every ``perf/*`` metric (seconds for ``*_time``) of one loop."""
    import statistics as st

    rows = r["perf"][1:] or r["perf"]
    keys = sorted({k for p in rows for k in p})
    return {k[len("perf/"):]: st.median(p[k] for p in rows if k in p) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder or 'smollm2-135m-instruct' (default: tiny random model)")
    p.add_argument("--prompt-data", default=str(ROOT / "examples/math_grpo/train.jsonl"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--extra", default="", help="more flags for both loops (quoted)")
    p.add_argument("--results", default=str(ROOT / "bench/RESULTS.md"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_async_"))
    model = a.model
    if model is None:
        from slime_ray.testing import make_tiny_model_dir

        model = str(make_tiny_model_dir(work / "tiny"))
    common = ["--hf-checkpoint", model, "--prompt-data", a.prompt_data, "--input-key", "prompt",
              "--label-key", "label", "--apply-chat-template", "--num-rollout", str(a.steps),
              "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "16",
              "--micro-batch-size", "4", "--rollout-max-response-len", "32", "--lr", "1e-5",
              "--ray-address", os.environ.get("RAY_ADDRESS", "local"), "--torch-num-threads", "1",
              *shlex.split(a.extra)]
    results = {}
    for mod, flags in (("grpo", []), ("grpo_async", ["--async-buffer-size", "1", "--max-staleness", "1"])):
        uri = f"jsonl:{work}/{mod}.jsonl"  # timestamps of train/loss per step; no MLflow needed
        r = run_loop(mod, common + flags + ["--mlflow-tracking-uri", uri], uri)
        results[mod] = (per_step_s(r["ts"]), r["last"])
        if mod == "grpo":
            results["breakdown"] = breakdown(r)
        else:
            results["async_perf"] = perf_medians(r)
        print(f"{mod:>10}: {results[mod][0]:.2f} s/step  (last step: " +
              ", ".join(f"{k}={v:.3g}" for k, v in sorted(r["last"].items())) + ")", flush=True)
    ratio = results["grpo"][0] / results["grpo_async"][0]
    bd = results["breakdown"]
    bd_line = " | ".join(f"{k} {v:.3f}" for k, v in bd.items())
    print(f"sync loop step breakdown (median s, steps 1..): {bd_line}")
    ap_line = " | ".join(f"{k} {v:.3f}" for k, v in results["async_perf"].items())
    print(f"async loop perf metrics (median, steps 1..): {ap_line}")
    print(f"speed-up sync/async: {ratio:.2f}x")
    cmd = "python bench/async_vs_sync.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    with open(a.results, "a") as f:
        f.write(f"\n## async_vs_sync — {datetime.datetime.now().isoformat(timespec='seconds')}\n\n"
                f"- command: `{cmd}`\n- machine: {machine()}\n- model: {model}\n"
                f"- config: `{' '.join(common[4:])}`\n\n| loop | s/step | \n|---|---|\n"
                f"| sync (jobs/grpo.py) | {results['grpo'][0]:.2f} |\n"
                f"| async (jobs/grpo_async.py) | {results['grpo_async'][0]:.2f} |\n"
                f"| ratio sync/async | {ratio:.2f}x |\n\n"
                f"sync loop, one step (median s over steps 1..): {bd_line}\n\n"
                f"async loop perf metrics (median over steps 1..): {ap_line}\n")


if __name__ == "__main__":
    main()
