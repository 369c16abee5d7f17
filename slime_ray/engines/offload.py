"""Move an engine's weights between the accelerator and (pinned) host memory, storage by storage.

``--offload-rollout`` (colocated): the engine gives its accelerator memory to the trainer while
it trains and takes it back before the weight sync. ``model.to("cpu")`` / ``model.to(device)``
does that one parameter at a time, through pageable host memory, and gives every parameter a new
storage: on one H200 with SmolLM2-135M (270 MB bf16) release took 0.51 s and retake 0.16 s, and
the retake also broke the flat buffers the sync receives into (bench/RESULTS.md, 2026-12-01).

:class:`HostOffload` instead copies each distinct *storage* once (with a flat sync layout: one
per bucket) into a host buffer that is allocated once (pinned when CUDA is available) and kept
for the next release, then re-points every tensor that viewed it to the same offset, shape and
stride in the new storage. Tensors that shared a storage (tied embeddings; the parameters of
one flat sync bucket and the bucket's own buffer) still share one afterwards, so a
:class:`slime_ray.sync.receiver.FlatLayout` stays a valid layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class HostOffload:
    """The host side of an engine's released weights.

    Not thread-safe: the engine calls it under its lock.

    Attributes:
        offloaded: whether the tensors currently sit in host memory.
        num_storages: distinct storages moved by the last :meth:`offload`.
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        """``pin_memory``: host buffers in page-locked memory (fast, asynchronous copies); None:
        when CUDA is available."""
        self.pin_memory = pin_memory  # None: pinned when CUDA is available (decided at the first offload)
        self._host: dict[int, list[torch.UntypedStorage]] = {}  # nbytes -> free host storages
        self._groups: list[tuple[torch.UntypedStorage, torch.device, list[torch.Tensor]]] = []
        self.offloaded = False
        self.num_storages = 0

    def _host_storage(self, nbytes: int) -> torch.UntypedStorage:
        free = self._host.get(nbytes)
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory).untyped_storage()

    @staticmethod
    def _repoint(t: torch.Tensor, storage: torch.UntypedStorage) -> None:
        """``t`` views ``storage`` at its current offset, shape and stride (same tensor object)."""
        view = torch.empty(0, dtype=t.dtype, device=storage.device)
        view.set_(storage, t.storage_offset(), t.size(), t.stride())
        t.data = view

    @torch.no_grad()
    def offload(self, tensors: Iterable[torch.Tensor]) -> int:
        """Copy every distinct storage behind ``tensors`` to host memory and re-point the tensors
        there; the device storages are then unreferenced (free them with
        ``torch.cuda.empty_cache()``). Callers pass device tensors (on a CPU engine there is
        nothing to release; the tests move CPU tensors to new CPU storages).

        Args:
            tensors: every tensor that views the storages to move (a model's parameters and
                buffers, a flat sync layout's buffers); duplicates are fine. A view left out
                keeps its old storage alive (and no longer aliases the others).

        Returns:
            bytes copied to host memory.

        Raises:
            RuntimeError: already offloaded (call :meth:`onload` first).
        """
        if self.offloaded:
            raise RuntimeError("HostOffload.offload: the weights are already in host memory; onload them first")
        if self.pin_memory is None:
            self.pin_memory = torch.cuda.is_available()
        by_storage: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
        seen: set[int] = set()
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            s = t.untyped_storage()
            by_storage.setdefault(s.data_ptr(), (s, []))[1].append(t)
        groups, moved = [], 0
        for dev_storage, views in by_storage.values():
            host = self._host_storage(dev_storage.nbytes())
            host.copy_(dev_storage, non_blocking=bool(self.pin_memory))
            groups.append((host, dev_storage.device, views))
            moved += dev_storage.nbytes()
        if self.pin_memory:  # the copies are in host memory before anything reuses the device's
            for dev in {d for _, d, _ in groups if d.type == "cuda"}:
                torch.cuda.synchronize(dev)
        for host, _, views in groups:
            for t in views:
                self._repoint(t, host)
        self._groups, self.offloaded, self.num_storages = groups, True, len(groups)
        return moved

    @torch.no_grad()
    def onload(self) -> int:
        """Copy each offloaded storage back to the device it came from (one new allocation per
        storage) and re-point its tensors there; the host buffers are kept for the next release.

        Every device storage is allocated before anything is copied or re-pointed, so a failed
        allocation leaves the tensors in host memory, intact, and a later call can try again.

        Returns:
            bytes copied to the device (0 when nothing was offloaded).

        Raises:
            torch.OutOfMemoryError: the device cannot hold the weights again (the trainer
                still holds its memory); the tensors stay in host memory.
        """
        if not self.offloaded:
            return 0
        targets = [torch.empty(host.nbytes(), dtype=torch.uint8, device=device).untyped_storage()
                   for host, device, _ in self._groups]
        moved = 0
        for (host, _, views), dev_storage in zip(self._groups, targets):
            dev_storage.copy_(host, non_blocking=bool(self.pin_memory))
            for t in views:
                self._repoint(t, dev_storage)
            moved += host.nbytes()
        for host, _, _ in self._groups:
            self._host.setdefault(host.nbytes(), []).append(host)
        self._groups, self.offloaded = [], False
        return moved
