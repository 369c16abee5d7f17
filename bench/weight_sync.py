"""Weight sync trainer -> engine with slime_ray.sync's sender/receiver, two processes, no Ray.

- cuda_ipc: trainer process (fp32 master model) and engine process (bf16 model) on GPU 0;
  buckets of --buffer-mb handed over by CUDA IPC handle (pipe = the control channel Ray is in a job).
- nccl: trainer on GPU 0, engine on GPU 1, bucketed broadcast in a group of their own; plus a raw
  broadcast of ONE flat buffer of the same bytes between the same GPUs in the same group.
Seconds = median of --reps syncs after one warm-up; GB/s = bf16 bytes moved / seconds.

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


class Engine:
    """What the receiver needs: a bf16 model, its device, update_weights."""

    def __init__(self, path, device):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(self.device)
        self.state = self.model.state_dict()
        self.weight_version = 0

    def update_weights(self, named, version):
        with torch.no_grad():
            for n, t in named.items():
                self.state[n].copy_(t)
        self.weight_version = version


def _trainer(path, device, buffer):
    from transformers import AutoModelForCausalLM

    from slime_ray.sync.sender import WeightSender

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return WeightSender(model, torch.bfloat16, buffer, torch.device(device))


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
                conn.send(s.ipc_bucket(m))
                conn.recv()
                s.release()
            times.append(time.perf_counter() - t)
        conn.send(None)
        out_q.put(("ipc", times[1:], sum(m.nbytes for m in metas)))
    else:
        eng = Engine(path, "cuda:0")
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                return
            load_ipc_bucket(eng, msg, 1)
            conn.send("ok")


def nccl_worker(rank, path, buffer, reps, port, out_q):
    from slime_ray.sync import transport
    from slime_ray.sync.receiver import BroadcastReceiver

    torch.cuda.set_device(rank)
    if rank == 0:
        s = _trainer(path, "cuda:0", buffer)
        metas = s.plan()
        s.init_group("127.0.0.1", port, 2, "w")
        group = s.group
    else:
        eng = Engine(path, "cuda:1")
        s = _trainer(path, "cuda:1", buffer)  # only for the plan (same on every rank)
        metas = s.plan()
        del s
        rx = BroadcastReceiver("127.0.0.1", port, 1, 2, "w", torch.device("cuda:1"))
        group = rx.group
    total = sum(m.nbytes for m in metas)
    flat = torch.empty(total // 2, dtype=torch.bfloat16, device=f"cuda:{rank}")
    sync_t, raw_t = [], []
    for r in range(reps + 1):
        transport.broadcast(group, torch.zeros(1, device=f"cuda:{rank}"))  # align
        torch.cuda.synchronize()
        t = time.perf_counter()
        if rank == 0:
            s.broadcast_all(metas)
        else:
            rx.receive(eng, metas, 1)
        torch.cuda.synchronize()
        sync_t.append(time.perf_counter() - t)
        transport.broadcast(group, torch.zeros(1, device=f"cuda:{rank}"))
        torch.cuda.synchronize()
        t = time.perf_counter()
        transport.broadcast(group, flat)
        torch.cuda.synchronize()
        raw_t.append(time.perf_counter() - t)
    if rank == 1:
        out_q.put(("nccl", sync_t[1:], total, raw_t[1:]))


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
        name, times, nbytes = q.get(timeout=600)
        [x.join() for x in procs]
        med = statistics.median(times)
        print(f"{kind:5s} cuda_ipc colocated GPU0: {nbytes / 1e9:.3f} GB bf16  sync_s={med:.4f}  "
              f"GB/s={nbytes / med / 1e9:.1f}", flush=True)
        if torch.cuda.device_count() < 2:
            print(f"{kind:5s} nccl: skipped (one GPU)")
            continue
        port = _port()
        procs = [ctx.Process(target=nccl_worker, args=(r, path, buffer, a.reps, port, q)) for r in range(2)]
        [x.start() for x in procs]
        name, times, nbytes, raw = q.get(timeout=600)
        [x.join() for x in procs]
        med, rmed = statistics.median(times), statistics.median(raw)
        print(f"{kind:5s} nccl GPU0->GPU1: {nbytes / 1e9:.3f} GB  sync_s={med:.4f}  GB/s={nbytes / med / 1e9:.1f}  "
              f"raw_broadcast_s={rmed:.4f}  raw GB/s={nbytes / rmed / 1e9:.1f}  sync/raw={rmed / med:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
