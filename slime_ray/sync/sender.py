"""Trainer side of the weight transports: bucket the policy and send it (all ranks call).

Under FSDP every rank gathers each parameter (``full_tensor``, a collective) in the same
order; for ``cuda_ipc`` every rank then hands its colocated engine an IPC handle, for ``nccl``
rank 0 broadcasts. Tied parameters (one tensor under two names) travel once.
"""

from __future__ import annotations

from typing import Any

import torch

from slime_ray.sync import transport
from slime_ray.sync.buckets import BucketMeta, bucket_views, copy_into, flatten, plan_buckets


def _named_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State-dict entries with tied duplicates removed (first name kept), in state-dict order."""
    seen, out = set(), []
    for name, t in model.state_dict().items():
        key = id(t) if hasattr(t, "full_tensor") else t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class WeightSender:
    """Buckets of one model, sent by IPC handle or broadcast.

    Args:
        model: the policy (plain or FSDP2-sharded).
        dtype: dtype on the wire (the trainer's compute dtype: bf16 on GPU, fp32 on CPU).
        buffer_size_bytes: ``--update-weight-buffer-size``.
        device: where buckets are built (the rank's GPU, or CPU).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, buffer_size_bytes: int,
                 device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.buffer_size = int(buffer_size_bytes)
        self._held: list[torch.Tensor] = []  # IPC buckets alive until the engine has copied them
        self.group: Any = None
        self.group_rank = -1
        self._buffers: list[torch.Tensor] = []  # the two persistent broadcast buffers
        self._views: tuple | None = None  # (plan, per slot and bucket: views of the slot's buffer)
        self._where: tuple | None = None  # (plan, name -> (module, key) or None)
        self._side: Any = None  # CUDA side stream of the bucket fills

    def plan(self) -> list[BucketMeta]:
        """The bucket layout (same on every rank; no communication)."""
        return plan_buckets([(n, tuple(t.shape)) for n, t in _named_params(self.model)], self.dtype,
                            self.buffer_size)

    def bucket(self, meta: BucketMeta) -> torch.Tensor:
        """The flat buffer of ``meta`` (FSDP: every rank must call, same order)."""
        params = dict(_named_params(self.model))
        ts = [params[n] for n in meta.names]
        ts = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in ts]
        with torch.no_grad():
            return flatten([t.detach() for t in ts], meta, self.device)

    # ------------------------------------------------------------------ cuda_ipc
    def ipc_bucket(self, meta: BucketMeta) -> dict[str, Any]:
        """Flatten ``meta`` on this GPU and return ``{"meta", "handle", "uuid"}`` for the engine on
        the same GPU; the buffer stays alive until :meth:`release`."""
        from torch.multiprocessing.reductions import reduce_tensor

        flat = self.bucket(meta)
        torch.cuda.current_stream(self.device).synchronize()
        self._held.append(flat)
        return {"meta": meta, "handle": reduce_tensor(flat), "uuid": gpu_uuid(self.device)}

    def release(self) -> None:
        """Drop the IPC buckets (after the engines copied them) and collect their handles."""
        self._held.clear()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()

    # ------------------------------------------------------------------ nccl / gloo broadcast
    def init_group(self, master_address: str, master_port: int, world_size: int, group_name: str) -> None:
        """Rank 0 of the broadcast group (trainer rank 0 only)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.group = transport.new_broadcast_group(master_address, master_port, 0, world_size, group_name, backend)
        self.group_rank = 0

    def broadcast_all(self, metas: list[BucketMeta]) -> int:
        """Broadcast every bucket of ``metas`` from this rank (group rank 0); other trainer ranks
        (FSDP) call it too with no group, to take part in the gathers. Returns bytes sent.

        Buckets are built in two persistent flat buffers of ``max(meta.numel)`` elements of the
        wire dtype on ``device`` (allocated on the first call, reused after; 2 x the bucket size
        of memory, whatever the model size). On CUDA with plain (non-DTensor) parameters bucket
        i+1 is filled (``torch._foreach_copy_``, fp32 -> wire dtype) on a side stream while bucket
        i is broadcast; CUDA events order fill -> broadcast of a buffer and broadcast -> refill of
        the same buffer. Under FSDP2 (DTensor parameters, ``full_tensor`` is a collective) and on
        CPU (gloo) buckets are built and sent one after the other on the current stream.

        Raises:
            KeyError: a name of ``metas`` that the model does not have.
        """
        if not metas:
            return 0
        srcs = self._sources(metas)
        fsdp = any(hasattr(t, "full_tensor") for ts in srcs for t in ts)
        if self.group is None and not fsdp:
            return 0  # nothing to gather, nothing to send
        slots = self._slots(metas) if self.group is not None else None
        use_side = self.device.type == "cuda" and not fsdp and self.group is not None
        with torch.no_grad():
            if use_side:
                return self._broadcast_pipelined(metas, srcs, slots)
            sent = 0
            for i, (meta, ts) in enumerate(zip(metas, srcs)):
                ts = [t.full_tensor() if hasattr(t, "full_tensor") else t for t in ts]  # FSDP: every rank
                if self.group is None:
                    continue
                copy_into(slots[i % 2][i], ts)
                transport.broadcast(self.group, self._buffers[i % 2][: meta.numel], root=0)
                sent += meta.nbytes
            return sent

    def _broadcast_pipelined(self, metas: list[BucketMeta], srcs: list[list[torch.Tensor]],
                             slots: list[list[list[torch.Tensor]]]) -> int:
        """CUDA, plain parameters: fill of bucket i+1 (side stream) overlaps broadcast of bucket i."""
        cur = torch.cuda.current_stream(self.device)
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        side = self._side
        side.wait_stream(cur)  # the fills read the parameters as the optimizer left them
        free: list[Any] = [None, None]  # event: the last broadcast out of slot k is done
        sent = 0
        for i, meta in enumerate(metas):
            k = i % 2
            with torch.cuda.stream(side):
                if free[k] is not None:
                    side.wait_event(free[k])  # do not overwrite a buffer NCCL is still reading
                copy_into(slots[k][i], srcs[i])
                filled = side.record_event()
            cur.wait_event(filled)  # the NCCL stream waits for the current stream, hence the fill
            transport.broadcast(self.group, self._buffers[k][: meta.numel], root=0)
            free[k] = cur.record_event()  # after work.wait(): the broadcast of slot k is done
            sent += meta.nbytes
        cur.wait_stream(side)
        return sent

    def _sources(self, metas: list[BucketMeta]) -> list[list[torch.Tensor]]:
        """The model's tensors of each bucket, in plan order (parameters or buffers, possibly DTensors).

        Looked up through ``module._parameters`` / ``_buffers`` (the (module, key) pairs are
        resolved once per plan), so a replaced parameter object is still found; names that do
        not resolve that way (wrapper prefixes hidden by state-dict hooks) come from
        ``state_dict()`` on every call.
        """
        key = tuple(metas)
        if self._where is None or self._where[0] != key:
            where: dict[str, tuple[Any, str] | None] = {}
            for meta in metas:
                for name in meta.names:
                    mod_name, _, attr = name.rpartition(".")
                    try:
                        mod = self.model.get_submodule(mod_name) if mod_name else self.model
                    except AttributeError:
                        mod = None
                    ok = mod is not None and (attr in mod._parameters or attr in mod._buffers)
                    where[name] = (mod, attr) if ok else None
            self._where = (key, where)
        where = self._where[1]
        state = None
        out = []
        for meta in metas:
            ts = []
            for name in meta.names:
                loc = where[name]
                t = None
                if loc is not None:
                    mod, attr = loc
                    t = mod._parameters.get(attr)
                    if t is None:
                        t = mod._buffers.get(attr)
                if t is None:
                    if state is None:
                        state = dict(_named_params(self.model))
                    if name not in state:
                        raise KeyError(f"WeightSender: the model has no tensor {name!r} of the bucket plan")
                    t = state[name]
                ts.append(t)  # used under no_grad only
            out.append(ts)
        return out

    def _slots(self, metas: list[BucketMeta]) -> list[list[list[torch.Tensor]]]:
        """Per slot (0, 1) and bucket: views of that slot's persistent buffer shaped as the bucket.

        The two buffers (``max(meta.numel)`` elements of the wire dtype) and the views are cached
        for the plan; a plan needing more room reallocates them.
        """
        key = tuple(metas)
        if self._views is not None and self._views[0] == key:
            return self._views[1]
        need = max(m.numel for m in metas)
        dtype = metas[0].torch_dtype
        if any(m.torch_dtype != dtype for m in metas):
            raise ValueError("WeightSender: a bucket plan of mixed dtypes")
        if not self._buffers or self._buffers[0].numel() < need or self._buffers[0].dtype != dtype:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # old buffers idle before freeing
            self._buffers = []
            self._buffers = [torch.empty(need, dtype=dtype, device=self.device) for _ in range(2)]
        views = [[bucket_views(buf, m) for m in metas] for buf in self._buffers]
        self._views = (key, views)
        return views

    def free_buffers(self) -> None:
        """Drop the persistent broadcast buffers (reallocated by the next :meth:`broadcast_all`)."""
        if self.device.type == "cuda" and self._buffers:
            torch.cuda.current_stream(self.device).synchronize()
        self._buffers, self._views = [], None


def sender_for(trainer: Any) -> WeightSender:
    """The :class:`WeightSender` of a :class:`~slime_ray.train.backends.torch_backend.TorchTrainer`."""
    dtype = torch.bfloat16 if getattr(trainer, "precision", "fp32") == "bf16" else torch.float32
    size = int(getattr(trainer.args, "update_weight_buffer_size", 512 * 1024**2))
    return WeightSender(trainer.model, dtype, size, getattr(trainer, "device", torch.device("cpu")))
