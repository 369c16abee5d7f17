"""Weight transports (slime_ray.sync): bucket planning, transport choice, broadcast over gloo
(zero-copy into HFEngine's re-laid-out parameters, and the copy path)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from slime_ray.sync import choose_transport
from slime_ray.sync.buckets import flatten, plan_buckets, unflatten


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


# ---------------------------------------------------------------- zero-copy receive (HFEngine)
BUF = 64 * 1024  # bytes per bucket: several buckets for the tiny model


def _plan(model, dtype=torch.float32):
    from slime_ray.sync.sender import WeightSender

    return WeightSender(model, dtype, BUF, torch.device("cpu")).plan()


def _tied(model):
    return model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()


def _zero_copy_worker(rank, port, out, dirs):
    from transformers import AutoModelForCausalLM

    from slime_ray.engines.hf import HFEngine
    from slime_ray.sync.receiver import dispatch
    from slime_ray.sync.sender import WeightSender

    torch.set_num_threads(1)
    if rank == 0:
        model = AutoModelForCausalLM.from_pretrained(dirs["b"], dtype=torch.float32)
        s = WeightSender(model, torch.float32, BUF, torch.device("cpu"))
        metas = s.plan()
        s.init_group("127.0.0.1", port, 2, "g")
        s.broadcast_all(metas)
        ptrs1 = [b.data_ptr() for b in s._buffers]
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-0.5).add_(0.01)
        model.save_pretrained(dirs["c"])  # the new weights, for a fresh engine (tokenizer already there)
        s.broadcast_all(metas)
        s.broadcast_all(metas)  # 3rd: to an engine without update_weights_in_place (copy path)
        torch.save({"state": model.state_dict(), "ptrs": (ptrs1, [b.data_ptr() for b in s._buffers]),
                    "n": len(metas)}, os.path.join(out, "s.pt"))
    else:
        eng = HFEngine(dirs["a"])
        dispatch(eng, "init_weights_update_group", "127.0.0.1", port, 1, 2, "g")
        metas = _plan(eng.model)
        seen = []
        for version in (7, 8):
            dispatch(eng, "update_weights_from_distributed", metas, version, "g")
            lay = eng._flat_layout
            seen.append({"version": eng.weight_version, "tied": _tied(eng.model),
                         "bufs": [b.data_ptr() for b in lay.buffers],
                         "params": {n: t.data_ptr() for n, t in eng.model.state_dict().items()},
                         "state": {n: t.clone() for n, t in eng.model.state_dict().items()}})
        req = {"input_ids": [5, 9, 14, 3], "sampling_params": {"temperature": 0.0, "max_new_tokens": 8}}
        plain = _Engine(AutoModelForCausalLM.from_pretrained(dirs["a"], dtype=torch.float32))
        plain._weight_groups = eng._weight_groups  # same group, copy path
        dispatch(plain, "update_weights_from_distributed", metas, 9, "g")
        torch.save({"seen": seen, "gen": eng.generate([req])[0],
                    "plain": {"version": plain.weight_version, "state": plain.model.state_dict()},
                    "buf_range": [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size())
                                  for b in eng._flat_layout.buffers]}, os.path.join(out, "r.pt"))


def test_zero_copy_broadcast_twice_over_gloo(tmp_path):
    from transformers import AutoModelForCausalLM

    from slime_ray.engines.hf import HFEngine
    from slime_ray.testing import make_tiny_model_dir

    dirs = {k: str(make_tiny_model_dir(tmp_path / k, seed=seed)) for k, seed in (("a", 0), ("b", 1), ("c", 1))}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_zero_copy_worker, args=(port, str(tmp_path), dirs), nprocs=2, join=True)
    sent, got = torch.load(tmp_path / "s.pt"), torch.load(tmp_path / "r.pt")
    assert sent["n"] > 2  # several buckets
    first, second = got["seen"]
    # 1st sync: the sender's first weights (checkpoint b), 2nd: the modified ones; versions bumped.
    want1 = AutoModelForCausalLM.from_pretrained(dirs["b"], dtype=torch.float32).state_dict()
    for k, v in want1.items():
        assert torch.equal(first["state"][k], v), k
    for k, v in sent["state"].items():
        assert torch.equal(second["state"][k], v), k
        assert not torch.equal(second["state"][k], want1[k]), k  # the 2nd sync moved new values
    assert (first["version"], second["version"]) == (7, 8)
    # tied embeddings still one storage, inside the flat buffers; the 2nd sync reused everything.
    assert first["tied"] and second["tied"]
    emb = second["params"]["model.embed_tokens.weight"]
    assert second["params"]["lm_head.weight"] == emb
    assert any(lo <= emb < hi for lo, hi in got["buf_range"])
    assert all(any(lo <= p < hi for lo, hi in got["buf_range"]) for p in second["params"].values())
    assert first["bufs"] == second["bufs"] and first["params"] == second["params"]
    assert sent["ptrs"][0] == sent["ptrs"][1] and len(sent["ptrs"][0]) == 2  # sender: 2 persistent buffers
    # generation after the update == a fresh engine loaded with the new weights
    fresh = HFEngine(dirs["c"])
    req = {"input_ids": [5, 9, 14, 3], "sampling_params": {"temperature": 0.0, "max_new_tokens": 8}}
    want = fresh.generate([req])[0]
    assert got["gen"]["output_ids"] == want["output_ids"] and len(want["output_ids"]) > 0
    assert got["gen"]["output_log_probs"] == pytest.approx(want["output_log_probs"], abs=1e-6)
    assert got["gen"]["weight_version"] == 8
    # an engine without update_weights_in_place: receive buffer + update_weights per bucket
    assert got["plain"]["version"] == 9
    for k, v in sent["state"].items():
        assert torch.equal(got["plain"]["state"][k], v), k


def test_in_place_update_checks_and_fallbacks(tmp_path):
    from slime_ray.engines.hf import HFEngine
    from slime_ray.sync.buckets import BucketMeta
    from slime_ray.sync.receiver import FlatLayout
    from slime_ray.testing import make_tiny_model_dir

    eng = HFEngine(str(make_tiny_model_dir(tmp_path / "m", seed=0)))
    before = {n: t.clone() for n, t in eng.model.state_dict().items()}
    called = []
    # names / shapes checked before anything runs, as update_weights does
    bad = [BucketMeta(("nope.weight",), ((3,),), "float32")]
    with pytest.raises(KeyError, match="nope.weight"):
        eng.update_weights_in_place(bad, called.append, 3)
    norm = "model.norm.weight"
    with pytest.raises(ValueError, match="shape mismatch"):
        eng.update_weights_in_place([BucketMeta((norm,), ((5,),), "float32")], called.append, 3)
    # a plan in another dtype: no layout, nothing run, copy path left to the caller
    assert not eng.update_weights_in_place(_plan(eng.model, torch.bfloat16), called.append, 3)
    assert FlatLayout.build(eng.model, _plan(eng.model, torch.bfloat16)) is None
    # both tied names in the plan (sent separately): no layout
    both = [BucketMeta(("model.embed_tokens.weight", "lm_head.weight"),
                       (tuple(eng.model.lm_head.weight.shape),) * 2, "float32")]
    assert FlatLayout.build(eng.model, both) is None
    assert called == [] and eng.weight_version == 0
    for n, t in eng.model.state_dict().items():
        assert torch.equal(t, before[n]), n
    # the layout keeps the values; a fill writing the buffers updates the model, version bumped
    metas = _plan(eng.model)
    assert eng.update_weights_in_place(metas, lambda bufs: called.append([b.data_ptr() for b in bufs]), 4)
    for n, t in eng.model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert eng.update_weights_in_place(metas, lambda bufs: [b.fill_(0.25) for b in bufs], 5)
    assert eng.weight_version == 5 and _tied(eng.model)
    assert torch.equal(eng.model.lm_head.weight, torch.full_like(eng.model.lm_head.weight, 0.25))
    assert [b.data_ptr() for b in eng._flat_layout.buffers] == called[0]
    # the copy path still works on the re-laid-out model and writes into the same buffers
    eng.update_weights({norm: torch.full((eng.model.model.norm.weight.numel(),), 2.0)}, 6)
    assert eng.model.model.norm.weight.eq(2.0).all() and eng.weight_version == 6
    assert eng._flat_layout.valid()


def test_release_and_resume_keep_ties_flat_layout_and_values(tmp_path, monkeypatch):
    """--offload-rollout on an accelerator: HFEngine.release_memory / resume_memory move each storage
    once (HostOffload) and keep what the sync relies on: tied embeddings one storage, the flat
    layout valid (no rebuild), values unchanged, the old storages freed; generate refuses while
    released. On CPU both are no-ops, so the engine's device is set to a non-CPU one here (the
    tensors stay on CPU)."""
    import gc
    import weakref

    from slime_ray.engines.hf import HFEngine
    from slime_ray.testing import engine_request, make_tiny_model_dir

    eng = HFEngine(str(make_tiny_model_dir(tmp_path / "m", seed=0)))
    metas = _plan(eng.model)
    assert len(metas) > 1 and eng.update_weights_in_place(metas, lambda bufs: None, 1)
    lay = eng._flat_layout
    req = [engine_request(eng, "What is 3 + 4?", temperature=0.0, max_new_tokens=8)]
    ref = eng.generate(req)[0]["output_ids"]
    before = {n: t.clone() for n, t in eng.model.state_dict().items()}
    monkeypatch.setattr(eng, "device", torch.device("meta"))  # only release/resume read it here
    eng.resume_memory()  # not released: a no-op
    assert lay.valid() and eng._flat_layout is lay
    hosts = []
    for cycle in range(2):
        old = {id(s): weakref.ref(s) for s in (t.untyped_storage() for t in eng._weight_tensors())}
        eng.release_memory()
        eng.release_memory()  # a second release is a no-op, not a second copy
        off = eng._offload
        # one copy per storage: a buffer per bucket plus the model's own buffers (rotary inv_freq, ...)
        others = {t.untyped_storage().data_ptr() for t in eng.model.buffers()} - {b.data_ptr() for b in lay.buffers}
        assert off.offloaded and off.num_storages == len(metas) + len(others) and eng.health()["released"]
        hosts.append([h for h, _, _ in off._groups])
        gc.collect()
        assert [r for r in old.values() if r() is not None] == []  # nothing keeps the old storages
        assert _tied(eng.model) and lay.valid()  # the layout moved with its tensors
        with pytest.raises(RuntimeError, match="resume_memory"):
            eng.generate(req)
        eng.resume_memory()
        assert not off.offloaded and lay.valid() and eng._flat_layout is lay and _tied(eng.model)
        for n, t in eng.model.state_dict().items():
            assert torch.equal(t, before[n]), n
        del n, t
    # the host buffers are allocated once (the same storage objects, not just a reused address)
    assert sorted(map(id, hosts[0])) == sorted(map(id, hosts[1]))
    # a sync while released takes the copy path into the host copies, which the retake brings back
    eng.release_memory()
    assert not eng.update_weights_in_place(metas, lambda bufs: [b.fill_(9.0) for b in bufs], 7)
    eng.update_weights({"lm_head.weight": torch.full_like(before["lm_head.weight"], 0.5)}, 7)
    eng.resume_memory()
    assert eng.model.model.embed_tokens.weight.eq(0.5).all() and lay.valid() and eng.weight_version == 7
    eng.update_weights({"lm_head.weight": before["lm_head.weight"]}, 1)
    monkeypatch.setattr(eng, "device", torch.device("cpu"))
    assert eng.generate(req)[0]["output_ids"] == ref
    # the sync writes into the kept layout's buffers, and they are the model's weights
    assert eng.update_weights_in_place(metas, lambda bufs: [b.fill_(0.25) for b in bufs], 2)
    assert eng._flat_layout is lay and eng.model.lm_head.weight.eq(0.25).all()
    # a tensor moved off its bucket buffer breaks the layout (the next sync re-lays out)
    eng.model.model.norm.weight.data = eng.model.model.norm.weight.data.clone()
    assert not lay.valid()


def test_host_offload_moves_each_storage_once_and_survives_a_failed_onload(monkeypatch):
    from slime_ray.engines import offload as offload_mod
    from slime_ray.engines.offload import HostOffload

    flat = torch.arange(10.0)
    a, b = flat[:4].view(2, 2), flat[4:]  # two views of one storage
    c = torch.ones(3)
    off = HostOffload(pin_memory=False)
    assert off.offload([flat, a, b, c, a]) == 10 * 4 + 3 * 4  # bytes, each storage once
    assert off.num_storages == 2 and a.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat[0] = 7.0  # still views of one storage, at the same offsets
    assert a[0, 0].item() == 7.0 and b.tolist() == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    with pytest.raises(RuntimeError, match="already in host memory"):
        off.offload([c])
    hosts = [c.data_ptr(), flat.data_ptr()]
    # the second device allocation fails: nothing was re-pointed, a retry works
    real_empty, calls = torch.empty, []

    def failing_empty(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("test: device full")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(offload_mod.torch, "empty", failing_empty)
    with pytest.raises(torch.OutOfMemoryError):
        off.onload()
    monkeypatch.undo()
    assert off.offloaded and sorted([c.data_ptr(), flat.data_ptr()]) == sorted(hosts)
    assert off.onload() == 52 and off.onload() == 0
    assert b.storage_offset() == 4 and a.stride() == (2, 1) and c.tolist() == [1.0, 1.0, 1.0]
    assert flat[0].item() == 7.0 and a[0, 0].item() == 7.0


def test_packed_state_dict_round_trip_is_exact_for_every_dtype():
    import pickle

    from slime_ray.sync.transport import PackedStateDict, as_tensors

    sd = {"w32": torch.randn(3, 5), "wbf16": torch.randn(4, 2).to(torch.bfloat16),
          "w16": torch.randn(2, 2).half(), "ids": torch.arange(6).reshape(2, 3),
          "t": torch.randn(5, 3).t()}  # non-contiguous
    packed = pickle.loads(pickle.dumps(PackedStateDict(sd), protocol=5))
    out = as_tensors(packed)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k
    assert packed.views == {"wbf16": torch.bfloat16}  # numpy has no bfloat16: an int16 view
    assert as_tensors(sd) is sd  # plain dicts pass through
