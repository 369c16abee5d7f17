"""One GRPO step on one GPU, broken into rollout / log-probs / train / sync / other.

Runs the job's pieces in ONE process without Ray Serve (Ray is not what is measured here):
HFEngine (bf16, transformers generate) samples --prompts x --n responses, the reward is a
length-parity toy, TorchTrainer computes old log-probs + advantages (``compute_advantages``) and
trains one step, and the weights reach the engine through slime_ray.sync's buckets (flatten on
GPU, engine.update_weights; in-process, so no IPC handle). "other" = wall time of the whole step
minus the four phases (table building, rewards, Python glue).

    python bench/grpo_step_breakdown.py [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from bench._common import model_dir, sync  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    if a.tiny:
        a.prompts, a.n, a.max_new, a.steps = 2, 4, 8, 2
    from slime_ray.args import parse_args
    from slime_ray.engines.hf import HFEngine
    from slime_ray.sync.sender import sender_for
    from slime_ray.train.backends.torch_backend import TorchTrainer
    from slime_ray.types import Sample, SampleStatus, samples_to_arrow

    cuda = torch.cuda.is_available()
    path = model_dir("135m", tiny=a.tiny)
    engine = HFEngine(path, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    _, args = parse_args(["--hf-checkpoint", path, "--prompt-data", "x.jsonl", "--rollout-batch-size",
                          str(a.prompts), "--n-samples-per-prompt", str(a.n), "--lr", "1e-6",
                          "--use-dynamic-batch-size", "--max-tokens-per-gpu", "32768",
                          "--rollout-temperature", "1.0"])
    trainer = TorchTrainer(args)
    sender = sender_for(trainer)
    metas = sender.plan()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 40000, (64,), generator=g).tolist() for _ in range(a.prompts)]
    for step in range(a.steps + 1):  # step 0 = warm-up
        sync()
        t0 = time.perf_counter()
        t = {}
        reqs = [{"input_ids": pr, "sampling_params": {"temperature": 1.0, "max_new_tokens": a.max_new}}
                for pr in prompts for _ in range(a.n)]
        s = time.perf_counter()
        outs = engine.generate(reqs)
        sync()
        t["rollout"] = time.perf_counter() - s
        samples = []
        for i, (rq, o) in enumerate(zip(reqs, outs)):
            samples.append(Sample(index=i, group_index=i // a.n, tokens=rq["input_ids"] + o["output_ids"],
                                  response_length=len(o["output_ids"]), rollout_log_probs=o["output_log_probs"],
                                  reward=float(len(o["output_ids"]) % 2), status=SampleStatus.COMPLETED,
                                  weight_versions=[step]))
        rewards = torch.tensor([x.reward for x in samples]).view(a.prompts, a.n)
        norm = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)
        table = samples_to_arrow(samples)
        table = table.append_column("raw_reward", pa.array(rewards.view(-1).tolist(), pa.float32()))
        table = table.append_column("train_reward", pa.array(norm.tolist(), pa.float32()))
        s = time.perf_counter()
        trainer.compute_advantages(step, table)
        sync()
        t["log_probs"] = time.perf_counter() - s
        s = time.perf_counter()
        trainer.train(step, table)
        sync()
        t["train"] = time.perf_counter() - s
        s = time.perf_counter()
        engine.pause()
        for m in metas:
            from slime_ray.sync.buckets import unflatten

            engine.update_weights(unflatten(sender.bucket(m), m), step + 1)
        engine.flush_cache()
        engine.resume()
        sync()
        t["sync"] = time.perf_counter() - s
        total = time.perf_counter() - t0
        t["other"] = total - sum(t.values())
        if step == 0:
            continue
        toks = sum(len(o["output_ids"]) for o in outs)
        print(f"step {step}: total={total:.2f}s " + " ".join(
            f"{k}={v:.3f}s({v / total:.1%})" for k, v in t.items()) + f"  response_tokens={toks}", flush=True)


if __name__ == "__main__":
    main()
