"""EngineClient: the driver's / trainer's view of a deployed rollout app.

Generation goes through the ingress (routing, batching); weight sync and control calls go to
every engine deployment directly, so each engine is addressed exactly once::

    client = EngineClient.from_app("rollout")
    response = await client.generate({"input_ids": [...], "sampling_params": {...}})
    client.update_weights(ray.put(cpu_state_dict), weight_version=step + 1)

The blocking methods (``update_weights``, ``weight_versions``, ...) wait with
``DeploymentResponse.result()`` and must not be called from inside an asyncio event loop;
use the ``*_async`` variants there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

INGRESS_NAME = "RolloutIngress"

logger = logging.getLogger(__name__)


def _is_replica_failure(err: BaseException) -> bool:
    """A replica died / restarts (retry the request), as opposed to a bad request (do not)."""
    from ray.serve.exceptions import DeploymentUnavailableError

    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        DeploymentUnavailableError)):
        return True
    cause = getattr(err, "cause", None)
    return isinstance(err, ray.exceptions.RayTaskError) and cause is not None and _is_replica_failure(cause)


class EngineClient:
    """Handles to the ingress and to each engine deployment of one rollout app.

    Args:
        ingress: handle of ``RolloutIngress``.
        engines: handles of ``engine_0 .. engine_{N-1}``, in index order.
    """

    def __init__(self, ingress: DeploymentHandle, engines: list[DeploymentHandle]):
        self.ingress = ingress
        self.engines = list(engines)
        self.retry_s = 0.0  # seconds a request is retried while its replica restarts (fault tolerance)
        self.weight_store: Any = None  # fault.WeightStore: gets every weight push first
        self.num_retries = 0
        self.coalesce = True  # concurrent generate calls go to the ingress in one call (see generate)
        # The caller guarantees that no generate request (through this client or the ingress's
        # HTTP routes) is in flight while update_weights runs, as in jobs/grpo.py's synchronous
        # loop: the ingress then takes the new version in the same round trip as the engines'
        # load instead of after it (no request can meet an engine that is not there yet), and
        # update_weights returns without waiting for the ingress's answer: this client's next
        # request waits for it instead (confirm_version).
        self.idle_during_sync = False
        self._pending: dict[Any, list] = {}  # event loop -> [(request, future)] not sent yet
        self._pending_lock = threading.Lock()  # loops of several threads may share this client
        self._engine_actors: dict[int, Any] = {}  # engine index -> its actor, or None (see engine_actors)
        self._version_ack: Any = None  # see confirm_version

    @classmethod
    def from_app(cls, app_name: str = "rollout", num_engines: int | None = None) -> "EngineClient":
        """Build from a running Serve app; ``num_engines`` defaults to the ``engine_*`` count.

        Raises:
            ValueError: the app is not running or has no ``engine_*`` deployments.
        """
        if num_engines is None:
            apps = serve.status().applications
            if app_name not in apps:
                raise ValueError(f"no Serve application {app_name!r}; running: {sorted(apps)}")
            names = [d for d in apps[app_name].deployments if d.startswith("engine_")]
            num_engines = len(names)
        if num_engines < 1:
            raise ValueError(f"Serve application {app_name!r} has no engine_* deployments")
        ingress = serve.get_deployment_handle(INGRESS_NAME, app_name)
        engines = [serve.get_deployment_handle(f"engine_{i}", app_name) for i in range(num_engines)]
        return cls(ingress, engines)

    @property
    def num_engines(self) -> int:
        return len(self.engines)

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request through the ingress; the engine response dict plus ``meta_info``.

        Requests issued on one event loop while it is busy (a rollout step starting its groups)
        go to the ingress together, in one ``generate_batch`` call, once the loop has gone a
        full iteration without a new one (no timer: a lone request waits two loop iterations).
        The ingress routes each as it routes a single request and tells each engine how many
        it sends, so the engine batches them without waiting for stragglers.

        A request whose replica dies is sent again (every 0.5 s, for up to ``retry_s`` seconds)
        until a live replica, or the restarted one, answers; other errors are raised as they are.
        """
        if not self.coalesce:
            return await self._generate_one(request)
        loop = asyncio.get_running_loop()
        with self._pending_lock:
            pending = self._pending.get(loop)
            if pending is None:
                pending = self._pending[loop] = []
                loop.call_soon(self._flush_when_idle, loop, 0)
        future = loop.create_future()
        pending.append((request, future))
        return await future

    def _flush_when_idle(self, loop: asyncio.AbstractEventLoop, seen: int) -> None:
        """Send the loop's pending requests once an iteration added none (else look again)."""
        pending = self._pending.get(loop)
        if pending is None:
            return
        if len(pending) != seen:
            loop.call_soon(self._flush_when_idle, loop, len(pending))
            return
        with self._pending_lock:
            del self._pending[loop]
        batch = [(r, f) for r, f in pending if not f.done()]  # a cancelled caller sends nothing
        if len(batch) == 1:
            self._track(loop.create_task(self._generate_one(batch[0][0])), batch)
        elif batch:
            self._track(loop.create_task(self._generate_batch([r for r, _ in batch])), batch)

    @staticmethod
    def _track(task: asyncio.Task, batch: list) -> None:
        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                for _, f in batch:
                    f.cancel()
                return
            err = t.exception()
            results = [err] * len(batch) if err is not None else (t.result() if len(batch) > 1 else [t.result()])
            for (_, f), out in zip(batch, results):
                if f.done():
                    continue
                if isinstance(out, BaseException):
                    f.set_exception(out)
                else:
                    f.set_result(out)
        task.add_done_callback(done)

    async def _generate_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        """One ``generate_batch`` call; each failed request is retried alone as :meth:`_generate_one`
        retries (replica failures within ``retry_s``), other errors are returned as they are."""
        await self.confirm_version()
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                results = await self.ingress.generate_batch.remote(requests)
                break
            except Exception as err:  # noqa: BLE001 - the ingress itself failed
                if not _is_replica_failure(err) or time.monotonic() > deadline:
                    raise
                self.num_retries += 1
                logger.warning("generate_batch: ingress unavailable (%s); retrying", type(err).__name__)
                await asyncio.sleep(0.5)
        retry = [k for k, out in enumerate(results)
                 if isinstance(out, BaseException) and _is_replica_failure(out) and self.retry_s > 0]
        if retry:
            again = await asyncio.gather(*(self._generate_one(requests[k]) for k in retry), return_exceptions=True)
            for k, out in zip(retry, again):
                results[k] = out
        return results

    async def _generate_one(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request, one ingress call (with the replica-failure retries of :meth:`generate`)."""
        await self.confirm_version()
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                return await self.ingress.generate.remote(request)
            except Exception as err:  # noqa: BLE001 - filtered below
                if not _is_replica_failure(err) or time.monotonic() > deadline:
                    raise
                self.num_retries += 1
                logger.warning("generate: engine replica unavailable (%s); retrying", type(err).__name__)
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ weight sync
    def _calls(self, method: str, *args: Any) -> list:
        return [getattr(h, method).remote(*args) for h in self.engines]

    @staticmethod
    def _as_ref(weights: Any) -> list:
        """A dict is put in the object store once; the ref travels wrapped in a list."""
        if isinstance(weights, dict):
            weights = ray.put({k: v.detach().cpu() for k, v in weights.items()})
        return [weights]

    def engine_actors(self) -> list[Any]:
        """Per engine, the Ray actor that hosts it (``EngineDeployment.engine_actor``), or None
        where the engine lives inside its Serve replica. Asked once per engine, and again after
        its actor died (its replica restarts with a new one)."""
        for i, h in enumerate(self.engines):
            if i not in self._engine_actors:
                try:
                    self._remember_actor(i, h.engine_actor.remote().result())
                except Exception as err:  # noqa: BLE001 - see _remember_actor
                    self._remember_actor(i, err)
        return [self._engine_actors.get(i) for i in range(len(self.engines))]

    def _remember_actor(self, i: int, answer: Any) -> None:
        """Cache engine ``i``'s ``engine_actor`` answer: its actor, or None for an engine inside
        its replica (or a deployment class without ``engine_actor``). A failed call (the replica
        is restarting) is not cached: this sync goes through the replica, the next one asks again."""
        if isinstance(answer, AttributeError):
            self._engine_actors[i] = None
        elif not isinstance(answer, BaseException):
            self._engine_actors[i] = answer[0] if answer else None

    async def engine_actors_async(self) -> list[Any]:
        """:meth:`engine_actors` for callers inside an event loop."""
        for i, h in enumerate(self.engines):
            if i not in self._engine_actors:
                try:
                    self._remember_actor(i, await h.engine_actor.remote())
                except Exception as err:  # noqa: BLE001 - see _remember_actor
                    self._remember_actor(i, err)
        return [self._engine_actors.get(i) for i in range(len(self.engines))]

    def _load_calls(self, actors: list[Any], ref: list, weight_version: int) -> list:
        """Start every engine's load: ``EngineHost.update_weights_paused`` on its actor (one Ray
        call; the ref, passed at top level, is resolved there from the object store), else
        ``EngineDeployment.update_weights`` through its replica."""
        return [a.update_weights_paused.remote(ref[0], int(weight_version)) if a is not None
                else h.update_weights.remote(ref, int(weight_version)) for a, h in zip(actors, self.engines)]

    def _through_replica_if_dead(self, i: int, err: BaseException, ref: list, weight_version: int) -> Any:
        """Engine ``i``'s actor failed a direct load: forget it and load through the replica
        (once Serve has restarted it, the replica owns a new actor; until then this fails too).
        Other errors are raised as they are."""
        if not isinstance(err, ray.exceptions.RayActorError) or self._engine_actors.get(i) is None:
            raise err
        logger.warning("engine_%d: its actor is gone (%s); loading through the replica", i, type(err).__name__)
        del self._engine_actors[i]  # asked again at the next sync
        return self.engines[i].update_weights.remote(ref, int(weight_version))

    def update_weights(self, weights: Any, weight_version: int) -> list[int]:
        """Send ``weights`` to every engine and wait for all; returns their new versions.

        Each engine hosted in an actor (the job's placement group) gets one direct Ray call;
        others go through their Serve replica. The ingress learns the version afterwards, or,
        with ``idle_during_sync``, at the same time (its answer is then awaited by
        :meth:`confirm_version`, before the next request).

        Args:
            weights: ``ray.put(dict[str, Tensor])`` (CPU tensors, HF names) or the dict itself.
            weight_version: the version every engine reports afterwards.

        Raises:
            the engine's KeyError / ValueError (unknown name, shape mismatch), wrapped by Ray.
        """
        ack, self._version_ack = self._version_ack, None
        if ack is not None:  # the last sync's answer, never awaited: keep the versions in order
            ack.result()
        ref = self._as_ref(weights)
        self.publish_weights(ref[0], weight_version)  # first: a replica starting now already gets this version
        loads = self._load_calls(self.engine_actors(), ref, weight_version)
        ack = self.ingress.set_weight_version.remote(int(weight_version)) if self.idle_during_sync else None
        versions = []
        for i, call in enumerate(loads):
            try:
                versions.append(ray.get(call) if isinstance(call, ray.ObjectRef) else call.result())
            except Exception as err:  # noqa: BLE001 - filtered in _through_replica_if_dead
                versions.append(self._through_replica_if_dead(i, err, ref, weight_version).result())
        if ack is not None:
            self._version_ack = ack  # confirmed before this client's next request is sent
        else:
            self.ingress.set_weight_version.remote(int(weight_version)).result()
        return versions

    async def confirm_version(self) -> None:
        """Wait for the ingress's answer to the last ``set_weight_version`` that
        :meth:`update_weights` sent without waiting (``idle_during_sync``); raises its error.
        Called before this client sends a request, and by the rollout manager before a rollout
        starts (so requests that its generate functions send over HTTP also meet the new version).
        Only the first caller waits; requests sent alongside it may still reach the ingress
        first, and are then held to the previous version (every engine has loaded the new one
        by then, as update_weights waited for the loads)."""
        ack, self._version_ack = self._version_ack, None
        if ack is not None:
            await ack

    def publish_weights(self, weights: Any, weight_version: int) -> None:
        """Hand ``weights`` to the weight store (fault tolerance) without pushing them to the engines."""
        if self.weight_store is not None:
            ray.get(self.weight_store.publish.remote(self._as_ref(weights), int(weight_version)))

    async def update_weights_async(self, weights: Any, weight_version: int) -> list[int]:
        """Async :meth:`update_weights` (for callers inside an event loop)."""
        await self.confirm_version()  # an earlier sync's answer first: the versions stay in order
        ref = self._as_ref(weights)
        if self.weight_store is not None:
            await self.weight_store.publish.remote(ref, int(weight_version))
        actors = await self.engine_actors_async()
        outs = await asyncio.gather(*self._load_calls(actors, ref, weight_version), return_exceptions=True)
        versions = []
        for i, out in enumerate(outs):
            if isinstance(out, BaseException):
                out = await self._through_replica_if_dead(i, out, ref, weight_version)
            versions.append(out)
        await self.ingress.set_weight_version.remote(int(weight_version))
        return versions

    def weight_versions(self) -> list[int]:
        """``weight_version`` of each engine, in index order."""
        return [r.result() for r in self._calls("get_weight_version")]

    def get_engine_weights(self, i: int) -> dict[str, torch.Tensor]:
        """Engine ``i``'s current weights (CPU tensors by HF name)."""
        return self.engines[i].get_weights.remote().result()

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """New generate batches wait on every engine (in-flight ones finish)."""
        [r.result() for r in self._calls("pause")]

    def resume(self) -> None:
        [r.result() for r in self._calls("resume")]

    def flush_cache(self) -> None:
        [r.result() for r in self._calls("flush_cache")]

    def abort(self) -> None:
        """Abort in-flight batches on every engine (they return finish reason "abort")."""
        [r.result() for r in self._calls("abort", True)]

    async def abort_async(self) -> None:
        await asyncio.gather(*self._calls("abort", True))

    def release_memory(self) -> None:
        """Every engine frees accelerator memory (colocated: before the trainer runs)."""
        [r.result() for r in self._calls("release_memory")]

    def resume_memory(self) -> None:
        """Every engine takes back what :meth:`release_memory` freed (before the weight sync)."""
        [r.result() for r in self._calls("resume_memory")]

    def health(self) -> list[dict[str, Any]]:
        """Each engine's ``health()`` dict."""
        return [r.result() for r in self._calls("health")]
