"""Training throughput: slime_ray's torch backend vs a bare HF training loop, same model and batch.

Both: SmolLM2-135M config (random init), fp32 master weights + AdamW (fused on GPU), bf16
autocast on GPU, one optimizer step over N samples of P prompt + R response tokens.
- bare HF: padded micro-batches of --mbs samples, ``model(input_ids, labels=...)`` (mean token CE).
- slime_ray: ``TorchTrainer.train`` (GRPO loss, packed micro-batches of --max-tokens tokens,
  --use-rollout-logprobs so no extra old-log-prob forward; entropy for logging only).
Model FLOPs per token: 6*N_params + 6*layers*hidden*seq (causal attention), fwd+bwd.

    python bench/train_throughput.py [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._common import model_dir, rollout_table, timed  # noqa: E402

PEAK_BF16 = 790e12


def bare_hf_step(model, opt, tokens, mbs, device):
    opt.zero_grad(set_to_none=True)
    n = tokens.shape[0]
    for i in range(0, n, mbs):
        x = tokens[i: i + mbs].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss * (x.shape[0] / n)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--mbs", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    if a.tiny:
        a.samples, a.prompt_len, a.response_len, a.mbs, a.steps = 8, 8, 24, 4, 2
    from transformers import AutoModelForCausalLM

    from slime_ray.args import parse_args
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

    # bare HF loop
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda" or None)
    toks = torch.tensor(table.column("tokens").to_pylist())
    bare_hf_step(model, opt, toks, a.mbs, device)  # warm-up
    _, t_bare = timed(lambda: [bare_hf_step(model, opt, toks, a.mbs, device) for _ in range(a.steps)])
    del model, opt
    torch.cuda.empty_cache() if device.type == "cuda" else None

    _, args = parse_args(["--hf-checkpoint", path, "--prompt-data", "x.jsonl", "--rollout-batch-size",
                          str(a.samples // 8), "--n-samples-per-prompt", "8", "--lr", "1e-6",
                          "--use-rollout-logprobs", "--use-dynamic-batch-size",
                          "--max-tokens-per-gpu", str(a.mbs * seq)])
    tr = TorchTrainer(args)
    tr.train(0, table)  # warm-up
    _, t_ours = timed(lambda: [tr.train(i + 1, table) for i in range(a.steps)])

    for name, t in (("bare_hf", t_bare), ("slime_ray", t_ours)):
        tps = tokens_per_step * a.steps / t
        print(f"{name:10s} tokens/s={tps:,.0f}  model TFLOP/s={tps * flops_per_token / 1e12:.1f}  "
              f"MFU={tps * flops_per_token / PEAK_BF16:.1%}  step_s={t / a.steps:.3f}", flush=True)
    print(f"ratio slime_ray/bare_hf = {t_bare / t_ours:.3f}  (params={n_params / 1e6:.1f}M, "
          f"{a.samples}x{seq} tokens/step, device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})")


if __name__ == "__main__":
    main()
