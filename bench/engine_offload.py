"""``--offload-rollout`` on one GPU: the embedded engine's release_memory / resume_memory alone (no Ray).

HFEngine (bf16, eager, static loop) on GPU 0, its weights re-laid out into flat sync buckets
(as after the first weight sync). Then --reps cycles of: release (weights to pinned host memory,
CUDA cache emptied), retake (weights back), one in-place sync fill (the layout must still be
valid: no re-layout). Prints the median seconds of each, the GB moved and GB/s, the GPU memory
the release gave back (``torch.cuda.memory_reserved`` before / after), and whether greedy outputs
after the last cycle equal those before the first.

For comparison, ``--reps`` cycles of what the engine did before (``model.to("cpu")`` /
``model.to("cuda")``, pageable, one parameter at a time, the layout lost) are timed on the same
engine first.

    python bench/engine_offload.py --model /tmp/smol [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF folder")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--buffer-mb", type=int, default=512, help="sync bucket size (--update-weight-buffer-size)")
    a = p.parse_args()
    from slime_ray.engines.hf import HFEngine
    from slime_ray.sync.sender import WeightSender
    from slime_ray.testing import engine_request

    eng = HFEngine(a.model, dtype="bfloat16", device="cuda", compile=False)
    metas = WeightSender(eng.model, torch.bfloat16, a.buffer_mb << 20, torch.device("cuda")).plan()
    nbytes = sum(m.nbytes for m in metas)
    reqs = [engine_request(eng, q, temperature=0.0, max_new_tokens=32) for q in ("What is 3 + 4?", "Name a colour.")]
    ref = [o["output_ids"] for o in eng.generate(reqs)]

    def t(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    old_out, old_in = [], []
    for _ in range(a.reps):  # the former release / retake, for the side-by-side figure
        old_out.append(t(lambda: (eng.model.to("cpu"), torch.cuda.empty_cache())))
        old_in.append(t(lambda: eng.model.to("cuda")))
    assert eng.update_weights_in_place(metas, lambda bufs: None, 1)  # lay out, as the first sync does
    lay = eng._flat_layout
    rel, res, fill, freed = [], [], [], []
    for _ in range(a.reps):
        before = torch.cuda.memory_reserved()
        rel.append(t(eng.release_memory))
        freed.append(before - torch.cuda.memory_reserved())
        res.append(t(eng.resume_memory))
        fill.append(t(lambda: eng.update_weights_in_place(metas, lambda bufs: None, 2)))
        assert eng._flat_layout is lay, "the layout was rebuilt"
    out = [o["output_ids"] for o in eng.generate(reqs)]
    med = statistics.median
    gb = nbytes / 1e9
    print(f"model {a.model}: {gb:.3f} GB bf16 in {len(metas)} flat buckets, {a.reps} cycles (median s)")
    print(f"  before (model.to, pageable, per parameter): release {med(old_out):.4f}  retake {med(old_in):.4f}")
    print(f"  now (HostOffload, pinned, per storage):     release {med(rel):.4f}  retake {med(res):.4f}  "
          f"({gb / med(rel):.1f} / {gb / med(res):.1f} GB/s)  sync fill after retake {med(fill):.4f} (no re-layout)")
    print(f"  GPU memory given back by a release: {med(freed) / 1e9:.3f} GB (reserved before - after)")
    print(f"  greedy outputs after {a.reps} cycles equal those before: {out == ref}")


if __name__ == "__main__":
    main()
