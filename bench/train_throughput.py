"""Training throughput: slime_ray's torch backend vs a bare HF training loop, same model and batch.

Both: SmolLM2-135M config (random init), fp32 master weights + AdamW (fused on GPU), bf16
autocast on GPU, one optimizer step over N samples of P prompt + R response tokens.
- bare HF: padded micro-batches of --mbs samples, ``model(input_ids, labels=...)`` (mean token CE).
- slime_ray: ``TorchTrainer.train`` (GRPO loss, packed micro-batches of --max-tokens tokens,
  --use-rollout-logprobs so no extra old-log-prob forward; entropy for logging only).
Like for like: both sides use the same AdamW settings (slime_ray's defaults, fused on GPU), the
same gradient clipping and micro-batches of the same token count (--mbs samples); the config of
both sides is printed. ``--profile`` prints, per side, the top-15 GPU kernels of one step by time
and how busy the GPU was (GPU kernel time / wall time: well below 1 means the host is the limit).
Model FLOPs per token: 6*N_params + 6*layers*hidden*seq (causal attention), fwd+bwd.

    python bench/train_throughput.py [--tiny] [--profile] [--compile false|true|both]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._common import model_dir, rollout_table, timed  # noqa: E402

PEAK_BF16 = 790e12


def bare_hf_step(model, opt, tokens, mbs, device, clip=1.0):
    opt.zero_grad(set_to_none=True)
    n = tokens.shape[0]
    for i in range(0, n, mbs):
        x = tokens[i: i + mbs].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss * (x.shape[0] / n)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
    opt.step()


def profile_step(name, fn, device, top=15):
    """Run ``fn`` once under torch.profiler; print its top GPU kernels (CPU ops on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from bench._common import sync

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with profile(activities=acts) as prof:
        fn()
        sync()
    dev = device.type == "cuda"

    def self_time(e):  # microseconds
        if dev:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    evts = list(prof.key_averages())
    if dev:
        evts = [e for e in evts if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    evts = [e for e in evts if self_time(e) > 0]
    total = sum(self_time(e) for e in evts) or 1.0
    wall = max((e.time_range.end for e in prof.events()), default=0) - min((e.time_range.start for e in prof.events()), default=0)
    what = "GPU kernels" if dev else "CPU ops"
    print(f"--- {name}: top {top} {what} of one step by self time (sum {total / 1e3:.1f} ms"
          + (f", wall {wall / 1e3:.1f} ms, GPU busy {total / max(wall, 1):.0%})" if dev else ")"), flush=True)
    for e in sorted(evts, key=self_time, reverse=True)[:top]:
        print(f"  {self_time(e) / 1e3:9.2f} ms {self_time(e) / total:6.1%} x{e.count:<5d} {e.key[:110]}", flush=True)
    if dev:  # where the host spends the step (the GPU waits on it when busy is well below 1)
        cpu = [e for e in prof.key_averages() if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA
               and e.self_cpu_time_total > 0]
        cpu_total = sum(e.self_cpu_time_total for e in cpu) or 1.0
        print(f"--- {name}: top {top} host ops by self CPU time (sum {cpu_total / 1e3:.1f} ms, "
              f"{sum(e.count for e in cpu)} calls)", flush=True)
        for e in sorted(cpu, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
            print(f"  {e.self_cpu_time_total / 1e3:9.2f} ms x{e.count:<6d} {e.key[:100]}", flush=True)


def sync_points(name, fn, device):
    """Run ``fn`` once with CUDA's sync debug mode on; print where it made the host wait for the GPU."""
    import collections
    import warnings

    if device.type != "cuda":
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                if "synchronizing" in str(w.message))
    print(f"--- {name}: {sum(where.values())} host waits for the GPU in one step: "
          + ", ".join(f"{k} x{v}" for k, v in where.most_common(12)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print the top-15 GPU kernels of one step per side")
    p.add_argument("--compile", default="false", choices=("false", "true", "both"),
                   help="slime_ray side with --train-compile true (compiled decoder layers), or both variants")
    a = p.parse_args()
    if a.tiny:
        a.samples, a.prompt_len, a.response_len, a.mbs, a.steps = 8, 8, 24, 4, 2
    from transformers import AutoModelForCausalLM

    from slime_ray.args import parse_args
    from slime_ray.train.backends import torch_gpu as gpu
    from slime_ray.train.backends.torch_backend import TorchTrainer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = model_dir("135m", tiny=a.tiny)
    seq = a.prompt_len + a.response_len
    tokens_per_step = a.samples * seq
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq
    table = rollout_table(a.samples, a.prompt_len, a.response_len, cfg.vocab_size)
    _, args = parse_args(["--hf-checkpoint", path, "--prompt-data", "x.jsonl", "--rollout-batch-size",
                          str(a.samples // 8), "--n-samples-per-prompt", "8", "--lr", "1e-6",
                          "--use-rollout-logprobs", "--use-dynamic-batch-size",
                          "--max-tokens-per-gpu", str(a.mbs * seq)])
    fused = device.type == "cuda" or None
    adamw = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                 weight_decay=args.weight_decay, fused=fused)
    chunks = gpu.token_budget_micro_batches(list(range(a.samples)), [seq] * a.samples, args.max_tokens_per_gpu)
    print(f"model: {n_params / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"{a.samples} samples x ({a.prompt_len} prompt + {a.response_len} response) tokens, 1 optimizer step, "
          f"bf16 autocast={device.type == 'cuda'}, AdamW {adamw}, clip_grad={args.clip_grad}")
    print(f"bare_hf:   {-(-a.samples // a.mbs)} padded micro-batches of {a.mbs} samples = {a.mbs * seq} tokens, "
          f"mean-token CE over all {seq} positions, SDPA attention")
    print(f"slime_ray: {len(chunks)} packed micro-batches of {[len(c) * seq for c in chunks]} tokens "
          f"(--max-tokens-per-gpu {args.max_tokens_per_gpu}), GRPO loss on the {a.response_len} response "
          f"positions, entropy_coef={args.entropy_coef} (entropy for logging), "
          f"attention={'varlen flash' if device.type == 'cuda' else 'per-sample SDPA'}", flush=True)

    # bare HF loop
    model.train()
    opt = torch.optim.AdamW(model.parameters(), **adamw)
    toks = torch.tensor(table.column("tokens").to_pylist())

    def bare():
        bare_hf_step(model, opt, toks, a.mbs, device, args.clip_grad)

    bare()  # warm-up
    _, t_bare = timed(lambda: [bare() for _ in range(a.steps)])
    if a.profile:
        profile_step("bare_hf", bare, device)
        sync_points("bare_hf", bare, device)
    del model, opt
    torch.cuda.empty_cache() if device.type == "cuda" else None

    import copy
    import time

    times = {"bare_hf": t_bare}
    for variant in {"false": ["false"], "true": ["true"], "both": ["false", "true"]}[a.compile]:
        name = "slime_ray" + ("+compile" if variant == "true" else "")
        v_args = copy.deepcopy(args)
        v_args.train_compile = variant
        tr = TorchTrainer(v_args)
        t0 = time.perf_counter()
        tr.train(0, table)  # warm-up (and the compile)
        tr.train(1, table)
        print(f"{name}: first two steps (warm-up{', compile' if variant == 'true' else ''}) "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        _, times[name] = timed(lambda: [tr.train(i + 2, table) for i in range(a.steps)])
        if a.profile:
            profile_step(name, lambda: tr.train(a.steps + 2, table), device)
            sync_points(name, lambda: tr.train(a.steps + 3, table), device)
        del tr
        torch.cuda.empty_cache() if device.type == "cuda" else None

    for name, t in times.items():
        tps = tokens_per_step * a.steps / t
        print(f"{name:17s} tokens/s={tps:,.0f}  model TFLOP/s={tps * flops_per_token / 1e12:.1f}  "
              f"MFU={tps * flops_per_token / PEAK_BF16:.1%}  step_s={t / a.steps:.3f}", flush=True)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    for name, t in times.items():
        if name != "bare_hf":
            print(f"ratio {name}/bare_hf = {t_bare / t:.3f}  (params={n_params / 1e6:.1f}M, "
                  f"{a.samples}x{seq} tokens/step, device={dev_name})")


if __name__ == "__main__":
    main()
