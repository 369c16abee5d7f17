"""Embedded engine throughput: HFEngine fast path (static cache + torch.compile + shape buckets)
vs plain HF eager ``generate`` (the same HFEngine with ``compile=False``), on one GPU.

The fast path is HFEngine's own decode loop (:mod:`slime_ray.engines.hf_decode`: one compiled
CUDA-graph step per token); ``--decode-loop generate`` measures transformers' compiled
``generate`` instead. Per batch the bench prints ms per decode step: for the static loop from
CUDA events around the decode loop (prefill excluded, ``decode ms/step``), for every mode
also the wall time of a call divided by the new tokens (``wall ms/token-step``).

Per ``--batches`` (default 64, 256): ``--new-tokens`` (256) new tokens for each of B prompts
(math_grpo test prompts with the chat template), EOS disabled so every row has exactly that
many tokens, temperature 1, bf16. Reported per mode and batch: first call (compile + run) and
steady-state tokens/s (median of ``--repeats`` timed calls after it).

``--mode fast`` also checks:
- log-probs: fast-engine ``output_log_probs`` vs a trainer-style forward (one bf16 forward
  over prompt + response, left-padded, logits at the previous position, ``log_softmax`` in
  float32): mean and max abs difference (target mean < 0.02);
- recompiles: a sequence of varying batch sizes (``--varying``), counting dynamo graphs and
  shape buckets (target: graphs <= buckets, i.e. at most one compile per bucket).

The two modes can run at once on two GPUs (one process each), then ``--merge`` prints the table::

    CUDA_VISIBLE_DEVICES=0 python bench/engine_throughput.py --mode fast  --json $OUT/fast.json &
    CUDA_VISIBLE_DEVICES=1 python bench/engine_throughput.py --mode eager --json $OUT/eager.json
    python bench/engine_throughput.py --merge $OUT/fast.json $OUT/eager.json

``--random-init DIR``: build a random-weight model from the config + tokenizer at ``--model``
(for machines where the weights cannot travel; throughput does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_MODEL = os.path.expanduser("~/.cache/slime_ray/models/SmolLM2-135M-Instruct")


def random_model_dir(src: str, dst: str) -> str:
    """A bf16 random-init copy of the model at ``src`` (config + tokenizer files) in ``dst``."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (Path(dst) / "config.json").exists():
        return dst
    Path(dst).mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
    model.save_pretrained(dst)
    return dst


def make_requests(tokenizer, n: int, new_tokens: int, temperature: float = 1.0, group_size: int = 1) -> list[dict]:
    """``n`` requests: test prompts with the chat template, each repeated ``group_size`` times in a row."""
    rows = [json.loads(line) for line in (REPO_ROOT / "examples/math_grpo/test.jsonl").open()]
    reqs = []
    for i in range(n):
        msgs = [{"role": "user", "content": rows[(i // group_size) % len(rows)]["prompt"]}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        reqs.append({"input_ids": ids, "return_logprob": True,
                     "sampling_params": {"temperature": temperature, "max_new_tokens": new_tokens}})
    return reqs


def timed(engine, reqs) -> tuple[float, list[dict]]:
    import torch

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    sync()
    return time.perf_counter() - t0, out


def trainer_log_probs(model, reqs, outs, temperature: float):
    """Trainer-style log-probs: one forward over left-padded prompt+response, [B, R] float32."""
    import torch

    seqs = [r["input_ids"] + o["output_ids"] for r, o in zip(reqs, outs)]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    dev = next(model.parameters()).device
    diffs = []
    with torch.no_grad():
        for lo in range(0, len(seqs), 32):
            sl = slice(lo, lo + 32)
            logits = model(input_ids=ids[sl].to(dev), attention_mask=mask[sl].to(dev)).logits
            for j, (r, o) in enumerate(zip(reqs[sl], outs[sl])):
                R = len(o["output_ids"])
                lg = logits[j, L - R - 1: L - 1].float() / temperature  # [R, V]
                ref = torch.log_softmax(lg, -1).gather(-1, torch.tensor(o["output_ids"], device=dev)[:, None])
                diffs.append((ref.squeeze(-1).cpu() - torch.tensor(o["output_log_probs"])).abs())
    d = torch.cat(diffs)
    return float(d.mean()), float(d.max())


def run(args) -> dict:
    import torch

    from slime_ray.engines.hf import HFEngine

    model = args.model
    if args.random_init:
        model = random_model_dir(args.model, args.random_init)
    fast = args.mode == "fast"
    # eager mode is the baseline: transformers' own generate unless a loop is asked for
    decode_loop = "generate" if args.decode_loop == "auto" and not fast else args.decode_loop
    t0 = time.perf_counter()
    engine = HFEngine(model, dtype="bfloat16", device=args.device, eos_token_ids=[], compile=fast, bucket=fast,
                      decode_loop=decode_loop, compile_mode=args.compile_mode)
    if engine._decoder is not None:
        from slime_ray.engines.hf_decode import StaticDecoder

        engine._decoder = StaticDecoder(engine.model, pad_token_id=engine.pad_token_id, compile=engine.compile,
                                        compile_mode=args.compile_mode, fused_projections=not args.no_fused,
                                        graph_steps=args.graph_steps)
    res: dict = {"mode": args.mode, "fused_projections": bool(engine._decoder and engine._decoder.fused_projections),
                 "graph_steps": engine._decoder.graph_steps if engine._decoder is not None else None,
                 "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
                 "load_s": time.perf_counter() - t0, "decode_loop": engine.decode_loop, "batches": {}}
    import transformers

    res["transformers"] = transformers.__version__
    for b in args.batches:
        reqs = make_requests(engine.tokenizer, b, args.new_tokens, group_size=args.group_size)
        first_s, out = timed(engine, reqs)
        steady, stats = [], []
        for _ in range(args.repeats):
            steady.append(timed(engine, reqs)[0])
            stats.append(dict(engine.last_decode_stats))
        ntok = sum(len(o["output_ids"]) for o in out)
        s = statistics.median(steady)
        steps = max(len(o["output_ids"]) for o in out)  # token steps per call (prefill + decode)
        res["batches"][b] = {"first_call_s": first_s, "steady_s": s, "tokens": ntok,
                             "tokens_per_s": ntok / s, "first_call_tokens_per_s": ntok / first_s,
                             "compilations_total": engine.num_compilations,
                             "wall_ms_per_step": 1e3 * s / steps}
        line = (f"[{args.mode}/{engine.decode_loop}] batch {b}: first call {first_s:.1f}s, steady {s:.2f}s, "
                f"{ntok / s:,.0f} tok/s, wall ms/token-step {1e3 * s / steps:.2f}")
        if stats and stats[-1]:  # the static loop's own timings (CUDA events on GPU)
            step_ms = statistics.median(st["ms_per_step"] for st in stats)
            prefill_ms = statistics.median(st["prefill_ms"] for st in stats)
            res["batches"][b].update(decode_ms_per_step=step_ms, prefill_ms=prefill_ms,
                                     decode_steps=stats[-1]["decode_steps"], batch_bucket=stats[-1]["batch"])
            res["batches"][b]["prefill_rows"] = stats[-1].get("prefill_rows")
            line += (f", decode ms/step {step_ms:.3f} (bucket {int(stats[-1]['batch'])}), prefill {prefill_ms:.1f} ms "
                     f"({int(stats[-1].get('prefill_rows', 0))} rows)")
        print(line + f", graphs so far {engine.num_compilations}", flush=True)
        if b == args.batches[0]:
            mean_d, max_d = trainer_log_probs(engine.model, reqs, out, 1.0)
            res["logprob_vs_trainer"] = {"batch": b, "mean_abs": mean_d, "max_abs": max_d}
            print(f"[{args.mode}] log-probs vs trainer forward (bf16): mean |d| {mean_d:.4f}, max {max_d:.3f}",
                  flush=True)
    if fast:  # same torch seed -> same sampled tokens (noise drawn inside the captured graphs)
        reqs = make_requests(engine.tokenizer, args.batches[0], 64)
        torch.manual_seed(123)
        a = engine.generate(reqs)
        torch.manual_seed(123)
        b = engine.generate(reqs)
        torch.manual_seed(124)
        c = engine.generate(reqs)
        same = [x["output_ids"] for x in a] == [x["output_ids"] for x in b]
        differ = sum(x["output_ids"] != y["output_ids"] for x, y in zip(a, c))
        res["seeded"] = {"same_seed_same_tokens": same, "rows_differing_other_seed": differ}
        print(f"[fast] seed 123 twice: same tokens {same}; seed 124: {differ}/{len(a)} rows differ", flush=True)
    if fast and args.profile:
        res["profile"] = profile_call(engine, make_requests(engine.tokenizer, args.batches[-1], args.new_tokens))
    if fast and args.varying:
        g0, buckets0 = engine.num_compilations, set(engine.buckets_seen)
        t0 = time.perf_counter()
        for b in args.varying:
            engine.generate(make_requests(engine.tokenizer, b, args.new_tokens))
        new_buckets = engine.buckets_seen - buckets0
        res["varying"] = {"batch_sizes": args.varying, "seconds": time.perf_counter() - t0,
                          "new_graphs": engine.num_compilations - g0, "new_buckets": len(new_buckets),
                          "buckets_total": len(engine.buckets_seen), "graphs_total": engine.num_compilations}
        print(f"[fast] varying batches {args.varying}: {len(new_buckets)} new buckets, "
              f"{engine.num_compilations - g0} new graphs; total buckets {len(engine.buckets_seen)}, "
              f"graphs {engine.num_compilations}", flush=True)
    return res


def profile_call(engine, reqs) -> dict:
    """One generate call under torch.profiler: top GPU kernels and GPU busy ms per decode step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = timed(engine, reqs)
    steps = max(1.0, engine.last_decode_stats.get("decode_steps", 1.0) + 1)
    kernels = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0
               and e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"[profile] batch {len(reqs)}: wall {wall * 1e3:.0f} ms (profiled), GPU busy {busy_ms:.0f} ms = "
          f"{busy_ms / steps:.3f} ms per token step, {sum(e.count for e in kernels) / steps:.0f} kernels per step", flush=True)
    top = []
    for e in kernels[:20]:
        share = e.self_device_time_total / 1e3 / busy_ms
        top.append({"name": e.key[:90], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                    "calls_per_step": e.count / steps, "share": share})
        print(f"[profile]   {share:6.1%} {e.self_device_time_total / 1e3 / steps:7.4f} ms/step "
              f"{e.count / steps:6.1f}/step  {e.key[:90]}", flush=True)
    return {"busy_ms_per_step": busy_ms / steps, "kernels_per_step": sum(e.count for e in kernels) / steps, "top": top}


def merge(paths: list[str]) -> None:
    by = {r["mode"]: r for r in (json.load(open(p)) for p in paths)}
    fast, eager = by.get("fast"), by.get("eager")
    nan = float("nan")
    print("| batch | eager tok/s | fast tok/s | speed-up | eager ms/step | fast ms/step (wall) "
          "| fast decode ms/step | fast first call (compile + run) s |")
    print("|---|---|---|---|---|---|---|---|")
    for b in (fast or eager)["batches"]:
        eb, fb = (eager or {}).get("batches", {}).get(b, {}), (fast or {}).get("batches", {}).get(b, {})
        e, f = eb.get("tokens_per_s", nan), fb.get("tokens_per_s", nan)
        print(f"| {b} | {e:,.0f} | {f:,.0f} | {f / e:.1f}x | {eb.get('wall_ms_per_step', nan):.2f} "
              f"| {fb.get('wall_ms_per_step', nan):.2f} | {fb.get('decode_ms_per_step', nan):.3f} "
              f"| {fb.get('first_call_s', nan):.1f} |")
    for r in by.values():
        print(f"{r['mode']}: log-probs vs trainer forward {r.get('logprob_vs_trainer')}")
    if fast and "varying" in fast:
        print(f"fast: recompiles {fast['varying']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--random-init", default=None, help="write a random-weight copy here and use it")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mode", choices=("fast", "eager"), default="fast")
    p.add_argument("--decode-loop", choices=("auto", "static", "generate"), default="auto",
                   help="HFEngine decode_loop (auto: the static loop in fast mode, generate in eager mode)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the fast path (reduce-overhead | max-autotune: CUDA graphs both)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--group-size", type=int, default=1,
                   help="samples per prompt (consecutive requests share a prompt, as a GRPO group; the static loop "
                        "prefills each distinct prompt once)")
    p.add_argument("--varying", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[40, 200, 256, 100, 50, 256, 120, 64])
    p.add_argument("--no-fused", action="store_true",
                   help="fast mode: separate q/k/v and gate/up projections (default: one GEMM per group)")
    p.add_argument("--graph-steps", type=int, default=8,
                   help="fast mode: decode steps per captured CUDA graph (0: one cudagraph-tree replay per step)")
    p.add_argument("--profile", action="store_true",
                   help="fast mode: one more call of the last batch under torch.profiler; prints the top "
                        "GPU kernels and the GPU busy time per decode step")
    p.add_argument("--json", default=None)
    p.add_argument("--merge", nargs="+", default=None)
    args = p.parse_args()
    if args.merge:
        return merge(args.merge)
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
