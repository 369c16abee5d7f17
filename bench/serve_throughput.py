"""Rollout throughput through the Serve ingress vs the same HFEngine called in-process.

Same batch both ways: ``--num-requests`` prompts, ``--max-new-tokens`` each (EOS disabled so
every response has exactly that many tokens), temperature 1. In-process: one
``HFEngine.generate(list)`` call. Serve: the requests are sent concurrently over HTTP to
``POST /generate`` of a one-engine rollout app; the engine's ``@serve.batch`` gathers them.
Reported: generated tokens per second (median of ``--repeats``), the ratio Serve / in-process
(target >= 0.9), and how the engine formed its batches (calls, largest batch).

    .venv/bin/python bench/serve_throughput.py [--model PATH] [--num-requests 32] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
DEFAULT_MODEL = os.path.expanduser("~/.cache/slime_ray/models/SmolLM2-135M-Instruct")


def make_requests(tokenizer, n: int, max_new_tokens: int) -> list[dict]:
    prompts = [f"Question {i}: what is {i} + {2 * i}? Think step by step." for i in range(n)]
    return [{"input_ids": tokenizer.encode(p), "return_logprob": True,
             "sampling_params": {"temperature": 1.0, "max_new_tokens": max_new_tokens}} for p in prompts]


def bench_in_process(model: str, requests: list[dict], repeats: int, threads: int) -> list[float]:
    """Tokens/s of one HFEngine.generate(list) call per repeat (after one warm-up call)."""
    import torch

    from slime_ray.engines.hf import HFEngine

    torch.set_num_threads(threads)
    engine = HFEngine(model, seed=0, eos_token_ids=[])
    engine.generate(requests[:2])
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(requests)
        rates.append(sum(r["completion_tokens"] for r in out) / (time.perf_counter() - t0))
    del engine
    gc.collect()
    return rates


async def _burst(url: str, requests: list[dict]) -> tuple[int, float]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(requests))) as client:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*[client.post(url, json=r) for r in requests])
        wall = time.perf_counter() - t0
    for r in responses:
        r.raise_for_status()
    return sum(r.json()["completion_tokens"] for r in responses), wall


def bench_serve(model: str, requests: list[dict], repeats: int, threads: int, max_batch_size: int,
                batch_wait_s: float) -> tuple[list[float], dict]:
    """Tokens/s of a concurrent burst over HTTP per repeat (after one warm-up burst)."""
    import ray
    from ray import serve

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.rollout.engine_client import EngineClient

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        app = build_rollout_app(model, num_engines=1, engine_kwargs={"seed": 0, "eos_token_ids": []},
                                max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s,
                                torch_num_threads=threads, num_cpus_per_engine=1)
        serve.run(app, name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/generate"
        asyncio.run(_burst(url, requests[:2]))
        client = EngineClient.from_app("bench")
        before = client.health()[0]["num_generate_calls"]
        rates = []
        for _ in range(repeats):
            tokens, wall = asyncio.run(_burst(url, requests))
            rates.append(tokens / wall)
        health = client.health()[0]
        batching = {"engine_calls_per_burst": (health["num_generate_calls"] - before) / repeats,
                    "max_batch_size_seen": health["max_batch_size_seen"]}
        return rates, batching
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or 'tiny' (default: SmolLM2-135M-Instruct if cached, else tiny)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-batch-size", type=int, default=64, help="engine batch size (--rollout-max-batch-size)")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="--rollout-batch-wait-s")
    a = p.parse_args(argv)
    sys.path.insert(0, REPO_ROOT)
    from transformers import AutoTokenizer

    model = a.model or (DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else "tiny")
    if model == "tiny":
        from slime_ray.testing import make_tiny_model_dir

        model = str(make_tiny_model_dir(tempfile.mkdtemp(prefix="tiny_")))
    requests = make_requests(AutoTokenizer.from_pretrained(model), a.num_requests, a.max_new_tokens)
    local = bench_in_process(model, requests, a.repeats, a.torch_threads)
    print(f"in-process done: {local}", file=sys.stderr, flush=True)
    served, batching = bench_serve(model, requests, a.repeats, a.torch_threads, a.max_batch_size, a.batch_wait_s)
    local_again = bench_in_process(model, requests, a.repeats, a.torch_threads)  # machine drift check
    base = statistics.median(local + local_again)
    print(f"model: {model}")
    print(f"batch: {a.num_requests} requests x {a.max_new_tokens} new tokens, torch threads {a.torch_threads}, "
          f"engine max batch {a.max_batch_size}, batch wait {a.batch_wait_s}s")
    print(f"in-process HFEngine: {[round(x, 1) for x in local + local_again]} tok/s, median {base:.1f}")
    print(f"Serve ingress (HTTP): {[round(x, 1) for x in served]} tok/s, median {statistics.median(served):.1f}")
    print(f"batching: {batching}")
    print(f"ratio serve / in-process: {statistics.median(served) / base:.3f}")


if __name__ == "__main__":
    main()
