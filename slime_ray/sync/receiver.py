"""Engine side of the weight transports: rebuild or receive a bucket and load it.

Works with any engine that has ``update_weights(named_tensors, weight_version)`` and a
``device`` (HFEngine); the engine's own checks (names, shapes, tied weights) apply to each bucket.

Zero-copy broadcast: an engine that also has ``update_weights_in_place(metas, fill,
weight_version) -> bool`` (HFEngine, through :class:`FlatLayout`) has its parameters re-laid out
once per bucket plan as one flat buffer per bucket; every later broadcast lands straight in the
parameters (no receive buffer, no unpack copy). When the layout is impossible (dtype of the plan
differs from the engine's, tied names sent separately, ...) it returns False and the receiver
takes the copy path (receive into a new buffer, ``update_weights``).
"""

from __future__ import annotations

from typing import Any

import torch

from slime_ray.sync import transport
from slime_ray.sync.buckets import BucketMeta, bucket_views, copy_into, unflatten


def _local_device(uuid: str) -> int:
    """This process's index of the GPU with ``uuid`` (CUDA_VISIBLE_DEVICES renumbers them)."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"cuda_ipc: the sender's GPU {uuid} is not visible here; the engine must share "
                       "the trainer rank's GPU (use --update-weight-transport nccl)")


def load_ipc_bucket(engine: Any, payload: dict[str, Any], weight_version: int) -> None:
    """Open the CUDA IPC handle of one bucket, copy it into ``engine``; returns after the copy."""
    fn, args = payload["handle"]
    args = list(args)
    args[6] = _local_device(payload["uuid"])  # storage device of rebuild_cuda_tensor
    flat = fn(*args)
    engine.update_weights(unflatten(flat, payload["meta"]), weight_version)
    torch.cuda.current_stream(flat.device).synchronize()
    del flat


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """``a`` and ``b`` are one device ("cuda" = the current CUDA device)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        cur = torch.cuda.current_device()
        return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)
    return a.index == b.index or a.index is None or b.index is None


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and registered buffer of ``model`` by name, tied names included."""
    named = dict(model.named_buffers(remove_duplicate=False))
    named.update(model.named_parameters(remove_duplicate=False))
    return named


class FlatLayout:
    """A model's tensors re-pointed to one contiguous buffer per bucket of a plan.

    After :meth:`build`, the tensors named in bucket j (``param.data``, or a registered buffer)
    are views of ``buffers[j]`` (1-D, ``metas[j].numel`` elements of ``metas[j]``'s dtype, on the
    tensors' device) in plan order; tensors tied to one of them (the same ``Parameter`` under two
    names, e.g. ``lm_head.weight`` / ``model.embed_tokens.weight`` with ``tie_word_embeddings``,
    or another tensor object on the same storage and view) are re-pointed too, so they stay one
    storage. Values are kept (copied in once). Receiving into ``buffers`` then updates the model.

    Attributes:
        metas: the plan (tuple of :class:`~slime_ray.sync.buckets.BucketMeta`).
        buffers: one flat buffer per bucket.
    """

    def __init__(self, metas: tuple[BucketMeta, ...], buffers: list[torch.Tensor],
                 bound: list[tuple[torch.Tensor, int, int]]) -> None:
        # bound: (tensor, bucket index, byte offset of its data in that bucket's buffer)
        self.metas, self.buffers, self._bound = metas, buffers, bound

    def valid(self) -> bool:
        """Whether every re-pointed tensor still views its bucket buffer at its place.

        ``model.to(...)``, ``load_state_dict(assign=True)`` or a re-assigned ``param.data``
        breaks the layout; moving the buffers and the tensors together, offsets kept (as
        :class:`slime_ray.engines.offload.HostOffload` does), does not."""
        # the buffer is alive, so a tensor at its address + offset is inside its storage
        return all(t.data_ptr() - self.buffers[j].data_ptr() == off for t, j, off in self._bound)

    def tensors(self) -> list[torch.Tensor]:
        """The bucket buffers and every tensor re-pointed into them (what a mover such as
        :class:`slime_ray.engines.offload.HostOffload` must move together)."""
        return [*self.buffers, *(t for t, _, _ in self._bound)]


    @classmethod
    def build(cls, model: torch.nn.Module, metas: list[BucketMeta] | tuple[BucketMeta, ...],
              device: torch.device | str | None = None) -> "FlatLayout | None":
        """Re-lay ``model``'s tensors out per ``metas``; None (model untouched) when not possible.

        Not possible: a name of the plan that the model lacks, a shape or dtype differing from
        the plan, tensors not all on one device (or not on ``device`` when given, e.g. weights
        released to CPU while the transport is on the GPU), two names of the plan on one engine storage
        (tied in the engine, sent separately), or a tensor sharing storage with a planned one
        through a different view. Callers check names/shapes first to raise their own errors.
        """
        metas = tuple(metas)
        want = device
        named = model_tensors(model)
        planned: list[torch.Tensor] = []
        for meta in metas:
            for name, shape in zip(meta.names, meta.shapes):
                t = named.get(name)
                if t is None or tuple(t.shape) != tuple(shape) or t.dtype != meta.torch_dtype:
                    return None
                planned.append(t)
        if not planned:
            return None
        device = planned[0].device
        if any(t.device != device for t in planned):
            return None
        if want is not None and not same_device(device, want):
            return None

        def view_key(t: torch.Tensor) -> tuple:
            return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())

        keys = [view_key(t) for t in planned]
        if len(set(keys)) != len(keys):
            return None  # two planned names share one engine tensor
        by_storage = {k[0]: k for k in keys}
        aliases: dict[tuple, list[torch.Tensor]] = {k: [] for k in keys}
        seen: set[int] = set()
        for t in named.values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.device != device:
                continue
            k = view_key(t)
            if k in aliases:
                aliases[k].append(t)
            elif k[0] in by_storage:
                return None  # another view of a planned tensor's storage: cannot keep it in sync
        buffers: list[torch.Tensor] = []
        bound: list[tuple[torch.Tensor, int, int]] = []
        pos = 0
        with torch.no_grad():
            for meta in metas:
                flat = torch.empty(meta.numel, dtype=meta.torch_dtype, device=device)
                views = bucket_views(flat, meta)
                olds = planned[pos: pos + len(views)]
                copy_into(views, olds)
                for old, k, view in zip(olds, keys[pos: pos + len(views)], views):
                    for t in aliases[k]:
                        t.data = view
                        bound.append((t, len(buffers), view.data_ptr() - flat.data_ptr()))
                pos += len(views)
                buffers.append(flat)
        return cls(metas, buffers, bound)


class BroadcastReceiver:
    """One engine's membership in the trainer's broadcast group."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str, device: torch.device) -> None:
        self.device = torch.device(device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.group = transport.new_broadcast_group(master_address, master_port, rank, world_size,
                                                   group_name, backend)

    def receive(self, engine: Any, metas: list[BucketMeta], weight_version: int) -> int:
        """Receive every bucket of ``metas`` from rank 0 and load it; returns bytes received.

        Zero-copy into the engine's parameters when the engine has ``update_weights_in_place``
        and accepts the plan; otherwise one new receive buffer per bucket and
        ``engine.update_weights`` (per bucket, same version).

        Raises:
            KeyError, ValueError: the engine's checks of names and shapes (in place: the whole
                plan, before anything is received; copy path: each bucket once received).
        """
        in_place = getattr(engine, "update_weights_in_place", None)
        if in_place is not None:
            def fill(buffers: list[torch.Tensor]) -> None:
                for buf in buffers:
                    transport.broadcast(self.group, buf, root=0)

            if in_place(metas, fill, weight_version, self.device):
                return sum(m.nbytes for m in metas)
        got = 0
        for meta in metas:
            flat = torch.empty(meta.numel, dtype=meta.torch_dtype, device=self.device)
            transport.broadcast(self.group, flat, root=0)
            engine.update_weights(unflatten(flat, meta), weight_version)
            got += meta.nbytes
        return got


def dispatch(engine: Any, method: str, *args: Any) -> Any:
    """Run one engine-side sync step on ``engine`` (called by the engine's deployment / host actor).

    Methods (SGLang's names): ``update_weights_from_tensor(payload, weight_version)``,
    ``init_weights_update_group(master_address, master_port, rank, world_size, group_name)``,
    ``update_weights_from_distributed(metas, weight_version, group_name)``.

    Raises:
        ValueError: an unknown method, or a group that was never initialised.
    """
    groups = engine.__dict__.setdefault("_weight_groups", {})
    if method == "update_weights_from_tensor":
        return load_ipc_bucket(engine, *args)
    if method == "init_weights_update_group":
        addr, port, rank, world, name = args
        groups[name] = BroadcastReceiver(addr, port, rank, world, name, getattr(engine, "device", "cpu"))
        return None
    if method == "update_weights_from_distributed":
        metas, version, name = args
        if name not in groups:
            raise ValueError(f"update_weights_from_distributed: no weight group {name!r} on this engine")
        return groups[name].receive(engine, metas, version)
    raise ValueError(f"unknown weight sync method {method!r}")
