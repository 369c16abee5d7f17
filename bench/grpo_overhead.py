"""Where the wall time of one jobs/grpo.py step goes, on CPU (the driver's view).

Runs ``jobs/grpo.py`` ``main()`` in-process on a fresh local Ray (the workload of
``bench/trl_compare.py --model tiny``) with ``time.perf_counter`` spans around the pieces the
driver calls, and prints the median of each span over the steady steps:

- ``rollout``: ``RolloutManager.generate_rollout`` (all engine requests through Serve + rewards);
  inside it ``engine_wall`` (first request sent -> last response back) and ``reward``;
- ``table`` (``build_train_table``), ``put_table`` (``ray.put`` of the Arrow table);
- ``train`` (the trainer actors' ``train`` call, round trip); ``offload_rollout`` /
  ``onload_rollout`` (colocated with ``--offload-rollout``: engines free / retake their memory);
- ``sync`` (``actor.sync_weights``): ``weights_ref`` (trainer -> object store) and
  ``update_weights`` (engines load, ingress version);
- ``log_metrics`` (MLflow), ``print``; ``other`` = step gap minus all of the above.

``w.*`` rows are timed inside the Ray workers (a ``worker_process_setup_hook`` wraps the methods
of ``WORKER_SPANS``): ``w.engine_generate`` is ``HFEngine.generate`` in the engine's actor,
``w.trainer_train`` is ``TorchTrainer.train`` (old log-probs + loss + AdamW) in the trainer actor;
the difference between a driver span and the worker span inside it is framework overhead;
``w.<span>.calls`` counts a worker span's calls in a step (``w.engine_generate.calls`` 1 = the step's rollout
was one engine batch).

    .venv/bin/python bench/grpo_overhead.py [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "jobs"))
DATA = REPO_ROOT / "examples/math_grpo/train.jsonl"

SPANS: dict[str, list[float]] = defaultdict(list)
_CUR: dict[str, float] = defaultdict(float)


def _wrap(obj, name: str, span: str, is_async: bool = False):
    fn = getattr(obj, name)

    if is_async:
        async def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                _CUR[span] += time.perf_counter() - t0
    else:
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _CUR[span] += time.perf_counter() - t0
    setattr(obj, name, wrapped)


SPAN_FILE = os.environ.setdefault("SLIME_RAY_SPAN_FILE", str(Path(tempfile.mkdtemp()) / "spans.jsonl"))
WORKER_SPANS = [  # (module, class, method, span name): timed in every Ray worker process
    ("slime_ray.engines.hf", "HFEngine", "generate", "w.engine_generate"),
    ("slime_ray.engines.hf", "HFEngine", "update_weights", "w.engine_update_weights"),
    ("slime_ray.engines.hf", "HFEngine", "release_memory", "w.engine_release_memory"),
    ("slime_ray.engines.hf", "HFEngine", "resume_memory", "w.engine_resume_memory"),
    ("slime_ray.engines.hf_decode", "StaticDecoder", "_capture", "w.decoder_capture"),
    ("slime_ray.train.backends.torch_backend", "TorchTrainer", "train", "w.trainer_train"),
    ("slime_ray.train.backends.torch_backend", "TorchTrainer", "get_weights", "w.trainer_get_weights"),
    ("slime_ray.train.backends.torch_backend", "TorchTrainer", "_optimizer_step", "w.trainer_optimizer_step"),
    ("slime_ray.train.actor_group", "TrainerActor", "put_weights", "w.trainer_put_weights"),
    ("serve_apps.rollout_app", "EngineDeployment", "_generate_batch", "w.replica_generate_batch"),
    ("serve_apps.rollout_app", "EngineDeployment", "update_weights", "w.replica_update_weights"),
    ("slime_ray.engines.remote", "EngineHost", "generate_at_least", "w.host_generate_at_least"),
]


def worker_hook() -> None:
    """Ray worker set-up hook: wall-clock spans of WORKER_SPANS appended to SLIME_RAY_SPAN_FILE."""
    import functools
    import importlib
    import inspect
    import json

    path = os.environ["SLIME_RAY_SPAN_FILE"]

    def record(name, t0, t1):
        with open(path, "a") as f:
            f.write(json.dumps([name, t0, t1]) + "\n")

    import gc

    gc_t0 = {}

    def on_gc(phase, info):
        if phase == "start":
            gc_t0["t"] = time.time()
        elif "t" in gc_t0:
            record(f"w.gc{info['generation']}", gc_t0.pop("t"), time.time())

    gc.callbacks.append(on_gc)
    for mod, cls, meth, name in WORKER_SPANS:
        try:
            c = getattr(importlib.import_module(mod), cls)
            c = getattr(c, "func_or_class", c)  # a Serve deployment: its class
            fn = getattr(c, meth)
        except Exception:  # noqa: BLE001 - not in this version of the code
            continue
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapped(*a, _fn=fn, _name=name, **k):
                t0 = time.time()
                try:
                    return await _fn(*a, **k)
                finally:
                    record(_name, t0, time.time())
        else:
            @functools.wraps(fn)
            def wrapped(*a, _fn=fn, _name=name, **k):
                t0 = time.time()
                try:
                    return _fn(*a, **k)
                finally:
                    record(_name, t0, time.time())
        setattr(c, meth, wrapped)


def worker_spans(t0: float, t1: float) -> dict[str, float]:
    """Seconds of each worker span that started within [t0, t1) (wall clock)."""
    import json

    out: dict[str, float] = defaultdict(float)
    if not os.path.exists(SPAN_FILE):
        return out
    for line in open(SPAN_FILE):
        name, a, b = json.loads(line)
        if t0 <= a < t1:
            out[name] += b - a
            out[f"{name}.calls"] += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="HF folder (default: a tiny random model)")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--extra", default="", help="extra jobs/grpo.py flags, e.g. '--rollout-compile true'")
    a = p.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "local")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import grpo
    import ray

    from slime_ray import job
    from slime_ray.rollout import engine_client, manager, rewards, rollout_loop
    from slime_ray.sync import weight_sync
    from slime_ray.testing import make_tiny_model_dir
    from slime_ray.tracking import Tracker
    from slime_ray.train import actor_critic, actor_group

    model = a.model or str(make_tiny_model_dir(tempfile.mkdtemp()))
    os.environ.setdefault("RAY_worker_niceness", "0")  # as slime_ray.job.init_ray does for a cluster it starts
    ray.init(address="local", include_dashboard=False, num_cpus=max(4, os.cpu_count() or 2),
             runtime_env={"worker_process_setup_hook": worker_hook,
                          "env_vars": {"SLIME_RAY_SPAN_FILE": SPAN_FILE}})

    # rollout pieces
    _wrap(manager.RolloutManager, "generate_rollout", "rollout", is_async=True)
    orig_generate = engine_client.EngineClient.generate
    window = {"first": None, "last": None}

    async def generate(self, request):
        t0 = time.perf_counter()
        if window["first"] is None:
            window["first"] = t0
        out = await orig_generate(self, request)
        window["last"] = time.perf_counter()
        return out

    engine_client.EngineClient.generate = generate
    _wrap(rollout_loop, "compute_rewards", "rollout.reward", is_async=True)
    _wrap(grpo, "build_train_table", "table")
    orig_put = ray.put

    def put(obj, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig_put(obj, *a, **k)
        finally:
            if type(obj).__name__ == "Table":
                _CUR["put_table"] += time.perf_counter() - t0

    ray.put = put
    _wrap(actor_critic, "train_step", "train")
    grpo.train_step = actor_critic.train_step
    _wrap(job, "offload_rollout", "offload_rollout")  # colocated --offload-rollout only
    _wrap(job, "onload_rollout", "onload_rollout")
    _wrap(actor_group.RayTrainGroup, "sync_weights", "sync")
    _wrap(actor_group.RayTrainGroup, "weights_ref", "sync.weights_ref")
    _wrap(engine_client.EngineClient, "update_weights", "sync.update_weights")
    orig_log = Tracker.log_metrics
    last = {"t": None}

    def log_metrics(self, metrics, step):
        t0 = time.perf_counter()
        out = orig_log(self, metrics, step)
        t1 = time.perf_counter()
        _CUR["log_metrics"] += t1 - t0
        if last["t"] is not None:
            gap = t1 - last["t"]
            for k, v in worker_spans(last["wall"], time.time()).items():
                _CUR[k] += v
            SPANS["step_gap"].append(gap)
            if window["first"] is not None:
                SPANS["rollout.engine_wall"].append(window["last"] - window["first"])
            steps = len(SPANS["step_gap"])
            for k, v in _CUR.items():  # a span missing in a step counts 0 there (lists stay per step)
                SPANS[k].extend([0.0] * (steps - 1 - len(SPANS[k])))
                SPANS[k].append(v)
            named = sum(v for k, v in _CUR.items() if "." not in k)  # nested spans have a dot
            SPANS["other"].append(gap - named)
        _CUR.clear()
        window["first"] = window["last"] = None
        last["t"], last["wall"] = t1, time.time()
        return out

    Tracker.log_metrics = log_metrics
    import builtins

    orig_print = builtins.print

    def timed_print(*x, **k):
        t0 = time.perf_counter()
        orig_print(*x, **k)
        _CUR["print"] += time.perf_counter() - t0
    grpo.print = timed_print

    db = Path(tempfile.mkdtemp()) / "mlflow.db"
    argv = ["--hf-checkpoint", model, "--prompt-data", str(DATA), "--input-key", "prompt",
            "--label-key", "label", "--apply-chat-template", "--rollout-batch-size", str(a.prompts_per_step),
            "--n-samples-per-prompt", str(a.group_size), "--global-batch-size", str(a.prompts_per_step * a.group_size),
            "--micro-batch-size", str(a.prompts_per_step * a.group_size), "--num-rollout", str(a.steps),
            "--rollout-max-response-len", str(a.max_new_tokens), "--rollout-temperature", "1.0",
            "--advantage-estimator", "grpo", "--lr", "1e-6", "--torch-num-threads", str(a.threads),
            "--mlflow-tracking-uri", f"sqlite:///{db}", "--run-name", "overhead"] + a.extra.split()
    t_start = time.perf_counter()
    result = grpo.main(argv)
    t_main = time.perf_counter() - t_start
    job.shutdown(result)
    n = a.warmup
    print(f"\nmedian over steps {n + 1}..{a.steps - 1} (seconds; step gap = log_metrics to log_metrics):")
    order = ["step_gap", "rollout", "rollout.engine_wall", "rollout.reward", "table", "put_table", "offload_rollout", "train", "onload_rollout", "sync",
             "sync.weights_ref", "sync.update_weights", "log_metrics", "print", "other",
             "w.replica_generate_batch", "w.engine_generate", "w.trainer_train", "w.trainer_optimizer_step", "w.trainer_get_weights", "w.trainer_put_weights",
             "w.replica_update_weights", "w.engine_update_weights", "w.engine_release_memory",
             "w.engine_resume_memory", "w.decoder_capture"]
    steps = len(SPANS["step_gap"])
    for k in order + sorted(set(SPANS) - set(order)):
        if k not in SPANS:
            continue
        v = (SPANS[k] + [0.0] * (steps - len(SPANS[k])) if k != "rollout.engine_wall" else SPANS[k])[n:]
        if v:
            orig_print(f"  {k:22s} {statistics.median(v):7.3f} mean {statistics.mean(v):6.3f}  ({' '.join(f'{x:.3f}' for x in v)})")
    orig_print(f"  main() total {t_main:.1f}s for {a.steps} steps")


if __name__ == "__main__":
    main()
