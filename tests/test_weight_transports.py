"""Weight transports (slime_ray.sync): bucket planning, transport choice, broadcast over gloo."""

import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from slime_ray.sync import choose_transport
from slime_ray.sync.buckets import flatten, plan_buckets, unflatten


def _tiny_llama(seed):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


class _Engine:  # what the receiver needs of an engine
    def __init__(self, model):
        self.model, self.device, self.weight_version = model, torch.device("cpu"), 0

    def update_weights(self, named, version):
        state = self.model.state_dict()
        for n, t in named.items():
            state[n].copy_(t)
        self.weight_version = version


def test_buckets_round_trip_and_size_bound():
    shapes = [("a", (4, 4)), ("b", (10,)), ("c", (100,)), ("d", (3,))]
    metas = plan_buckets(shapes, torch.float32, 128)
    assert [m.names for m in metas] == [("a", "b"), ("c",), ("d",)]  # c (400 B) travels alone
    ts = {n: torch.randn(s) for n, s in shapes}
    for m in metas:
        flat = flatten([ts[n] for n in m.names], m, "cpu")
        assert flat.numel() * 4 == m.nbytes
        for n, v in unflatten(flat, m).items():
            assert torch.equal(v, ts[n])


def test_choose_transport():
    assert choose_transport("auto", use_gpu=False, colocate=True) == "object_store"
    assert choose_transport("auto", use_gpu=True, colocate=True, num_engines=2, world_size=2) == "cuda_ipc"
    assert choose_transport("auto", use_gpu=True, colocate=False) == "nccl"
    assert choose_transport("auto", use_gpu=True, colocate=True, num_engines=4, world_size=2) == "nccl"
    assert choose_transport("nccl", use_gpu=False, colocate=False) == "nccl"  # gloo on CPU
    with pytest.raises(ValueError, match="colocate"):
        choose_transport("cuda_ipc", use_gpu=True, colocate=False)


def _worker(rank, port, out):
    from slime_ray.sync.receiver import dispatch
    from slime_ray.sync.sender import WeightSender

    if rank == 0:
        s = WeightSender(_tiny_llama(1), torch.float32, 4096, torch.device("cpu"))
        metas = s.plan()
        s.init_group("127.0.0.1", port, 2, "g")
        torch.save(len(metas), os.path.join(out, "n.pt"))
        s.broadcast_all(metas)
    else:
        eng = _Engine(_tiny_llama(2))
        dispatch(eng, "init_weights_update_group", "127.0.0.1", port, 1, 2, "g")
        metas = WeightSender(_tiny_llama(3), torch.float32, 4096, torch.device("cpu")).plan()
        dispatch(eng, "update_weights_from_distributed", metas, 7, "g")
        torch.save({"state": eng.model.state_dict(), "version": eng.weight_version}, os.path.join(out, "r.pt"))


def test_broadcast_transport_over_gloo_loads_the_trainer_weights():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        got = torch.load(os.path.join(out, "r.pt"))
        assert torch.load(os.path.join(out, "n.pt")) > 1  # several buckets
    assert got["version"] == 7
    want = _tiny_llama(1).state_dict()
    for k, v in want.items():
        assert torch.equal(got["state"][k], v), k
