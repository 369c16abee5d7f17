"""Weight sync trainer -> engine with slime_ray.sync's sender/receiver, two processes, no Ray.

- cuda_ipc: trainer process (fp32 master model) and engine process (HFEngine, bf16) on GPU 0;
  buckets of --buffer-mb handed over by CUDA IPC handle (pipe = the control channel Ray is in a job).
- nccl: trainer on GPU 0, engine (HFEngine, bf16) on GPU 1, bucketed broadcast in a group of their
  own (sender: two persistent buffers, fill of bucket i+1 overlapping the broadcast of bucket i;
  engine: zero-copy into its parameters, re-laid out on the first sync); plus a raw broadcast of
  ONE flat buffer of the same bytes between the same GPUs in the same group.
Both nccl figures time the same thing on the engine's process: from both ranks aligned and
synchronized to the last byte usable on the engine (its version bumped) and the GPU synchronized.
Seconds = median of --reps syncs after one warm-up (the first sync, which re-lays the engine's
parameters out, is printed apart); GB/s = bf16 bytes moved / seconds; raw/sync = raw seconds /
sync seconds (1.0 = the sync costs no more than moving the bytes). The trainer negates its
weights before syncing and the engine's weights are compared with them after the last sync.

    python bench/weight_sync.py [--tiny]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _engine(path, device):
    from slime_ray.engines.hf import HFEngine

    return HFEngine(path, dtype="bfloat16", device=device, compile=False)


def _trainer(path, device, buffer):
    from transformers import AutoModelForCausalLM

    from slime_ray.sync.sender import WeightSender

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.neg_()  # new weights: the engine starts from the checkpoint's
    return WeightSender(model, torch.bfloat16, buffer, torch.device(device))


def _checksum(named, metas):
    """Sum of the bf16 values of the plan's tensors, per bucket (float64, on the host)."""
    return [float(sum(named[n].to(torch.bfloat16).double().sum() for n in m.names)) for m in metas]


def ipc_worker(rank, path, buffer, reps, conn_pair, out_q):
    from slime_ray.sync.receiver import load_ipc_bucket

    torch.cuda.set_device(0)
    conn = conn_pair[rank]
    if rank == 0:
        s = _trainer(path, "cuda:0", buffer)
        metas = s.plan()
        conn.recv()  # engine built
        times = []
        for r in range(reps + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for m in metas:
                conn.send((s.ipc_bucket(m), r + 1))
                conn.recv()
                s.release()
            times.append(time.perf_counter() - t)
        conn.send(None)
        ok = conn.recv() == _checksum(s.model.state_dict(), metas)
        out_q.put(("ipc", times[1:], sum(m.nbytes for m in metas), ok))
    else:
        eng = _engine(path, "cuda:0")
        conn.send("ready")
        metas = []
        while True:
            msg = conn.recv()
            if msg is None:
                conn.send(_checksum(eng.model.state_dict(), metas))
                return
            load_ipc_bucket(eng, msg[0], msg[1])
            if msg[1] == 1:  # the first sync: collect the plan for the final check
                metas.append(msg[0]["meta"])
            conn.send("ok")


def nccl_worker(rank, path, buffer, reps, port, out_q, plan_q):
    from slime_ray.sync import transport
    from slime_ray.sync.receiver import BroadcastReceiver

    torch.cuda.set_device(rank)
    dev = f"cuda:{rank}"
    if rank == 0:
        s = _trainer(path, dev, buffer)
        metas = s.plan()
        plan_q.put(metas)  # in a job the plan reaches the engines through Ray
        s.init_group("127.0.0.1", port, 2, "w")
        group = s.group
    else:
        eng = _engine(path, dev)
        metas = plan_q.get(timeout=600)
        rx = BroadcastReceiver("127.0.0.1", port, 1, 2, "w", torch.device(dev))
        group = rx.group
    total = sum(m.nbytes for m in metas)
    flat = torch.empty(total // 2, dtype=torch.bfloat16, device=dev)
    one = torch.zeros(1, device=dev)
    sync_t, raw_t = [], []
    for r in range(reps + 1):
        transport.broadcast(group, one)  # align
        torch.cuda.synchronize()
        t = time.perf_counter()
        if rank == 0:
            s.broadcast_all(metas)
        else:
            rx.receive(eng, metas, r + 1)
            assert eng.weight_version == r + 1
        torch.cuda.synchronize()
        sync_t.append(time.perf_counter() - t)
        transport.broadcast(group, one)
        torch.cuda.synchronize()
        t = time.perf_counter()
        transport.broadcast(group, flat)
        torch.cuda.synchronize()
        raw_t.append(time.perf_counter() - t)
    if rank == 0:
        plan_q.put(_checksum(s.model.state_dict(), metas))
    else:
        want = plan_q.get(timeout=600)
        ok = want == _checksum(eng.model.state_dict(), metas)
        in_place = eng._flat_layout is not None
        out_q.put(("nccl", sync_t[1:], total, raw_t[1:], sync_t[0], ok, in_place))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    from bench._common import model_dir

    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--buffer-mb", type=int, default=512)
    p.add_argument("--models", default="135m,1.5b")
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    for kind in a.models.split(","):
        path = model_dir(kind, tiny=a.tiny)
        buffer = a.buffer_mb * 1024**2
        q = ctx.Queue()
        pair = ctx.Pipe()
        procs = [ctx.Process(target=ipc_worker, args=(r, path, buffer, a.reps, pair, q)) for r in range(2)]
        [x.start() for x in procs]
        name, times, nbytes, ok = q.get(timeout=600)
        [x.join() for x in procs]
        med = statistics.median(times)
        print(f"{kind:5s} cuda_ipc colocated GPU0: {nbytes / 1e9:.3f} GB bf16  sync_s={med:.4f}  "
              f"GB/s={nbytes / med / 1e9:.1f}  weights_match={ok}", flush=True)
        if torch.cuda.device_count() < 2:
            print(f"{kind:5s} nccl: skipped (one GPU)")
            continue
        port = _port()
        plan_q = ctx.Queue()
        procs = [ctx.Process(target=nccl_worker, args=(r, path, buffer, a.reps, port, q, plan_q))
                 for r in range(2)]
        [x.start() for x in procs]
        name, times, nbytes, raw, first, ok, in_place = q.get(timeout=600)
        [x.join() for x in procs]
        med, rmed = statistics.median(times), statistics.median(raw)
        print(f"{kind:5s} nccl GPU0->GPU1: {nbytes / 1e9:.3f} GB  sync_s={med:.4f}  GB/s={nbytes / med / 1e9:.1f}  "
              f"raw_broadcast_s={rmed:.4f}  raw GB/s={nbytes / rmed / 1e9:.1f}  raw/sync={rmed / med:.2f}  "
              f"first_sync_s={first:.4f}  zero_copy={in_place}  weights_match={ok}", flush=True)


if __name__ == "__main__":
    main()
