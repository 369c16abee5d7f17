"""What bounds a small-model GRPO step on this CPU machine: hop costs, vCPU interference,
Python overhead of the eager decode step, and what inductor compilation costs and gains.

Parts (``--parts``, default all but ``compile-smol``):

- ``hops``: median round trip of a no-op Ray actor call, a threaded actor call
  (``max_concurrency=16``, as ``EngineHost``), a Serve handle call, and a Serve call that makes a
  second Serve call (ingress -> engine deployment, as a rollout request does).
- ``interference``: ``HFEngine.generate`` (tiny model, default flags, 1 thread) alone vs while
  another process spins on the other vCPU; rounds alternate, medians per side.
- ``python``: the eager static-cache loop vs the same loop with its decode step captured by
  dynamo and run by dynamo's ``eager`` backend (the FX graph's torch ops without transformers'
  Python: module calls, mask and cache bookkeeping). The gap is the share of the step that
  Python overhead costs; the rest is the torch ops themselves (one at a time, no fusion).
- ``compile``: ``HFEngine(compile=True)`` (inductor, one shape bucket) on the tiny model in a
  fresh process with an empty inductor cache (cold), then again with that cache (warm): first
  call, second call (a second prompt-length bucket) and steady-state seconds per call, against
  the eager engine. ``compile-smol``: the same for ``--smol`` (SmolLM2-135M-Instruct; slow: a
  cold compile takes minutes here).

The engine calls are GRPO-shaped: ``P`` prompts x ``G`` samples, ``N`` new tokens, temperature 1
(``--shape PxGxN``, default 4x4x32 for the tiny model, 2x8x16 for SmolLM2: the shapes of
``bench/trl_compare.py``). Every engine measurement runs in its own subprocess.

    .venv/bin/python bench/cpu_limits.py
    .venv/bin/python bench/cpu_limits.py --parts compile-smol --smol ~/.cache/slime_ray/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA = REPO_ROOT / "examples/math_grpo/train.jsonl"


def _median_ms(fn, n: int = 200, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def part_hops() -> dict[str, float]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    ray.init(address="local", include_dashboard=False, num_cpus=4)

    @ray.remote
    class Plain:
        def f(self):
            return 1

    @ray.remote(max_concurrency=16)
    class Threaded:
        def f(self):
            return 1

    @serve.deployment
    class Leaf:
        async def f(self):
            return 1

    @serve.deployment
    class Front:
        def __init__(self, leaf):
            self.leaf = leaf

        async def f(self):
            return await self.leaf.f.remote()

    plain, threaded = Plain.remote(), Threaded.remote()
    leaf = serve.run(Leaf.bind(), name="leaf", route_prefix="/leaf")
    front = serve.run(Front.bind(Leaf.bind()), name="front", route_prefix="/front")
    out = {"actor_call_ms": _median_ms(lambda: ray.get(plain.f.remote())),
           "threaded_actor_call_ms": _median_ms(lambda: ray.get(threaded.f.remote())),
           "serve_call_ms": _median_ms(lambda: leaf.f.remote().result()),
           "serve_two_hops_ms": _median_ms(lambda: front.f.remote().result())}
    serve.shutdown()
    ray.shutdown()
    return out


# ----------------------------------------------------------------------------- engine workers
def _requests(tok, rows, k: int, p: int, g: int, n: int) -> list[dict]:
    out = []
    for r in rows[p * k: p * k + p]:
        ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                      tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out += [{"input_ids": ids, "sampling_params": {"temperature": 1.0, "max_new_tokens": n},
                 "return_logprob": True} for _ in range(g)]
    return out


def engine_worker(model: str, mode: str, shape: str, calls: int) -> dict:
    """Seconds per ``HFEngine.generate`` call; runs in its own process (``--worker``)."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from slime_ray.engines.hf import HFEngine
    from slime_ray.engines.hf_decode import decode_step

    p, g, n = map(int, shape.split("x"))
    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in DATA.open()]
    kw = {"compile": True, "batch_buckets": str(p * g)} if mode == "compile" else {}
    eng = HFEngine(model, **kw)
    if mode == "dynamo_eager":  # the decode step's FX graph, run op by op
        eng._decoder._step = torch.compile(decode_step, fullgraph=True, dynamic=True, backend="eager")
    ts = []
    for k in range(calls):
        rq = _requests(tok, rows, k % 20, p, g, n)
        t0 = time.perf_counter()
        eng.generate(rq)
        ts.append(time.perf_counter() - t0)
    return {"first_s": ts[0], "second_s": ts[1], "steady_s": statistics.median(ts[3:]), "calls_s": ts}


def _run_worker(model: str, mode: str, shape: str, calls: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--shape", shape, "--calls", str(calls)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"engine worker {mode} on {model} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def part_interference(model: str, shape: str, rounds: int) -> dict:
    alone, busy = [], []
    for r in range(rounds):
        for side in (("alone", "busy") if r % 2 == 0 else ("busy", "alone")):
            spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if side == "busy" else None
            try:
                (busy if spin else alone).append(_run_worker(model, "eager", shape, 12)["steady_s"])
            finally:
                if spin:
                    spin.kill()
                    spin.wait()
    return {"alone_s": statistics.median(alone), "busy_s": statistics.median(busy),
            "slowdown": statistics.median(busy) / statistics.median(alone), "alone_rounds": alone, "busy_rounds": busy}


def part_python(model: str, shape: str, rounds: int) -> dict:
    eager, dyn = [], []
    for r in range(rounds):
        for mode in (("eager", "dynamo_eager") if r % 2 == 0 else ("dynamo_eager", "eager")):
            res = _run_worker(model, mode, shape, 14)
            (eager if mode == "eager" else dyn).append(res["steady_s"])
    e, d = statistics.median(eager), statistics.median(dyn)
    return {"eager_s": e, "dynamo_eager_s": d, "python_share": 1 - d / e}


def part_compile(model: str, shape: str, calls: int) -> dict:
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    env = {"TORCHINDUCTOR_CACHE_DIR": cache}
    cold = _run_worker(model, "compile", shape, calls, env)
    warm = _run_worker(model, "compile", shape, calls, env)
    eager = _run_worker(model, "eager", shape, calls)
    return {"cold": {k: cold[k] for k in ("first_s", "second_s", "steady_s")},
            "warm": {k: warm[k] for k in ("first_s", "second_s", "steady_s")},
            "eager_steady_s": eager["steady_s"], "speedup": eager["steady_s"] / warm["steady_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="hops,interference,python,compile")
    p.add_argument("--smol", default=os.path.expanduser("~/.cache/slime_ray/models/SmolLM2-135M-Instruct"))
    p.add_argument("--shape", default="4x4x32", help="tiny model: prompts x samples x new tokens")
    p.add_argument("--smol-shape", default="2x8x16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=12, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(engine_worker(a.model, a.worker, a.shape, a.calls)), flush=True)
        return
    from slime_ray.testing import make_tiny_model_dir

    tiny = str(make_tiny_model_dir(tempfile.mkdtemp()))
    out: dict = {}
    parts = a.parts.split(",")
    if "hops" in parts:
        out["hops"] = part_hops()
        print("hops (median ms):", {k: round(v, 2) for k, v in out["hops"].items()}, flush=True)
    if "interference" in parts:
        out["interference"] = r = part_interference(tiny, a.shape, a.rounds)
        print(f"interference: tiny generate {a.shape} alone {r['alone_s']:.4f}s, other vCPU busy "
              f"{r['busy_s']:.4f}s -> x{r['slowdown']:.2f}", flush=True)
    if "python" in parts:
        out["python"] = r = part_python(tiny, a.shape, a.rounds)
        print(f"python: tiny generate {a.shape} eager {r['eager_s']:.4f}s, dynamo eager backend "
              f"{r['dynamo_eager_s']:.4f}s -> Python overhead {r['python_share'] * 100:.0f}% of the call", flush=True)
    for name, model, shape in (("compile", tiny, a.shape), ("compile-smol", a.smol, a.smol_shape)):
        if name in parts:
            out[name] = r = part_compile(model, shape, 10 if name == "compile" else 8)
            print(f"{name}: {shape} cold first/second {r['cold']['first_s']:.1f}/{r['cold']['second_s']:.1f}s, "
                  f"warm first/second {r['warm']['first_s']:.1f}/{r['warm']['second_s']:.1f}s, steady "
                  f"compiled {r['warm']['steady_s']:.4f}s vs eager {r['eager_steady_s']:.4f}s "
                  f"(x{r['speedup']:.2f})", flush=True)
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
