"""The rollout tier as a Ray Serve application: N engine deployments behind a routing ingress.

- ``EngineDeployment`` (deployments ``engine_0 .. engine_{N-1}``, one replica each; one
  replica = one inference engine): concurrent single ``generate`` calls are gathered by
  :class:`~slime_ray.rollout.batcher.GapBatcher` into one ``engine.generate(list)`` call, run in a worker thread so the
  replica keeps answering (health, abort, weight updates queue behind the engine's lock).
- ``RolloutIngress`` (FastAPI): routes each request to the healthy engine with the fewest
  outstanding requests (:class:`slime_ray.rollout.router.EngineRouter`: round-robin among
  ties, ``session_id`` keeps a session on one engine, at most ``max_concurrency`` requests in
  flight per engine, the others wait), HTTP ``POST /generate`` (SGLang-shaped),
  ``GET /health``, ``GET /weight_version``, ``POST /abort_request``, ``/pause_generation``,
  ``/continue_generation``, ``/flush_cache``, and the OpenAI-compatible ``/v1/models``,
  ``/v1/completions``, ``/v1/chat/completions`` (:mod:`serve_apps.openai_routes`).

Weight sync does not go through the ingress: the trainer addresses every engine deployment
(see :class:`slime_ray.rollout.engine_client.EngineClient`). In a job, each engine runs in an
``EngineHost`` actor on the job's placement group, owned by its replica
(:mod:`slime_ray.engines.remote`); the ingress's batches and the client's weight syncs then go
to that actor directly (``EngineDeployment.engine_actor``), one Serve hop less per call.

Run alone::

    serve run serve_apps.rollout_app:app model_path=/path/to/hf num_engines=2

or with a config file: ``serve deploy serve_apps/rollout_config.yaml``.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type of the
# route parameters (string annotations are not resolved on Serve ingress methods).
import asyncio
import importlib
import os
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_apps.openai_routes import OpenAIRoutes, fastapi_app
from slime_ray.rollout.batcher import GapBatcher
from slime_ray.rollout.router import EngineRouter
from slime_ray.engines.base import StaleWeightsError, check_sampling_params


# Engines by name; a "pkg.module:Class" path also works.
ENGINES = {"hf": "slime_ray.engines.hf:HFEngine"}
ENGINES["sglang"] = "slime_ray.engines.sglang:SGLangEngine"


def build_engine(engine: str, model_path: str, **kwargs: Any):
    """Instantiate a :class:`~slime_ray.engines.base.RolloutEngine` by name or path.

    Raises:
        ValueError: an unknown engine name that is not a ``module:Class`` path.
    """
    target = ENGINES.get(engine, engine)
    if ":" not in target:
        raise ValueError(f"unknown engine {engine!r}; use one of {sorted(ENGINES)} or 'module:Class'")
    module, cls = target.split(":", 1)
    return getattr(importlib.import_module(module), cls)(model_path, **kwargs)


def with_meta_info(response: dict[str, Any], engine_index: int | None = None) -> dict[str, Any]:
    """Add SGLang's ``meta_info`` block to an engine response (a new dict).

    ``meta_info``: ``finish_reason: {"type": str}``, ``weight_version``, ``prompt_tokens``,
    ``completion_tokens``, ``output_token_logprobs: [[logp, token_id, None], ...]``.
    """
    lps = response.get("output_log_probs") or []
    meta = {
        "finish_reason": {"type": response["finish_reason"]},
        "weight_version": response["weight_version"],
        "prompt_tokens": response.get("prompt_tokens"),
        "completion_tokens": response.get("completion_tokens"),
        "output_token_logprobs": [[lp, tid, None] for lp, tid in zip(lps, response["output_ids"])],
    }
    if engine_index is not None:
        meta["engine_index"] = engine_index
    return {**response, "meta_info": meta}


@serve.deployment(max_ongoing_requests=1024)
class EngineDeployment:
    """One inference engine as a Serve replica (thin shell over a RolloutEngine).

    Args:
        model_path: HF folder of the policy.
        engine: engine name ("hf") or "module:Class".
        engine_kwargs: passed to the engine; ``seed`` is offset by ``engine_index`` so
            engines do not draw identical samples.
        engine_index: position of this engine (0..N-1).
        max_batch_size: most requests in one ``engine.generate`` call.
        batch_wait_timeout_s: a batch closes when no request arrived for this many seconds
            (at the latest 10x this after its first request).
    """

    def __init__(
        self,
        model_path: str,
        engine: str = "hf",
        engine_kwargs: dict[str, Any] | None = None,
        engine_index: int = 0,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.05,
        placement: dict[str, Any] | None = None,
        weight_store: str | None = None,
    ):
        kwargs = dict(engine_kwargs or {})
        if engine == "hf" or "seed" in kwargs:
            kwargs["seed"] = int(kwargs.get("seed") or 0) + engine_index
        if placement:  # the engine runs in an actor pinned to the job's bundle (slime_ray.placement)
            from slime_ray.engines.remote import RemoteEngine

            self.engine = RemoteEngine(engine, model_path, kwargs, placement)
        else:
            self.engine = build_engine(engine, model_path, **kwargs)
        self.engine_index = engine_index
        if weight_store:  # a (re)started replica takes the current weights before Serve routes to it
            from slime_ray.fault import pull_current_weights

            pull_current_weights(self.engine, weight_store)
        # A batch stays open while requests keep arriving (gap batching, see GapBatcher).
        self.batcher = GapBatcher(self._generate_batch, max_batch_size=max_batch_size,
                                  gap_s=batch_wait_timeout_s, max_wait_s=10 * batch_wait_timeout_s)

    async def _generate_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.engine.generate, requests)

    async def generate(self, request: dict[str, Any], burst: tuple[str, int] | None = None) -> dict[str, Any]:
        """Called with ONE request dict; concurrent calls are batched. Returns its response.

        ``burst=(id, count)``: the request is one of ``count`` sent together to this engine; the
        batch holding all of them starts without waiting for more (see ``GapBatcher``).
        """
        return await self.batcher.submit(request, burst=burst)

    async def _check_version(self, min_weight_version: int) -> None:
        """Raise :class:`StaleWeightsError` unless the engine holds ``min_weight_version``.

        An engine in an actor may have been updated without this replica (the trainer's sync
        goes to the actor directly, see :meth:`engine_actor`): its version is read again
        before the request is refused.
        """
        from slime_ray.engines.remote import RemoteEngine

        if self.engine.weight_version < min_weight_version and isinstance(self.engine, RemoteEngine):
            await self.engine.refresh_weight_version_async()
        if self.engine.weight_version < min_weight_version:
            raise StaleWeightsError(f"engine_{self.engine_index} holds weight version "
                                    f"{self.engine.weight_version} < current {min_weight_version}")

    def engine_actor(self) -> tuple[Any, int] | None:
        """``(EngineHost actor handle, max_batch_size)`` when the engine runs in an actor on
        the job's placement group, else None (the engine lives in this replica).

        The ingress sends its batches (:meth:`EngineHost.generate_at_least`) and the engine
        client its weight syncs (:meth:`EngineHost.update_weights_paused`) to that actor
        directly: one Serve hop less per call. This replica still owns the actor (it dies with
        the replica; Serve's health check and restart work as before) and serves single
        requests (HTTP routes) through its batcher.
        """
        from slime_ray.engines.remote import RemoteEngine

        if isinstance(self.engine, RemoteEngine):
            return self.engine.actor, self.batcher.max_batch_size
        return None

    async def generate_at_least(self, request: dict[str, Any], min_weight_version: int,
                                burst: tuple[str, int] | None = None) -> dict[str, Any]:
        """:meth:`generate`, refused unless this engine holds version >= ``min_weight_version``.

        Raises:
            StaleWeightsError: the engine (e.g. a replica that just restarted) is behind; the
                ingress then routes the request elsewhere.
        """
        await self._check_version(min_weight_version)
        return await self.generate(request, burst)

    async def generate_many_at_least(self, requests: list[dict[str, Any]], min_weight_version: int) -> list[dict]:
        """:meth:`generate_at_least` for requests sent together: they are one burst (no gap wait).

        Raises:
            StaleWeightsError: as :meth:`generate_at_least` (none of them is run).
        """
        await self._check_version(min_weight_version)
        import uuid

        burst = (uuid.uuid4().hex, len(requests))
        return list(await asyncio.gather(*(self.batcher.submit(r, burst=burst) for r in requests)))

    async def update_weights(self, weights: Any, weight_version: int) -> int:
        """Load ``weights`` (dict name -> CPU tensor, or an ObjectRef to one); returns the version.

        Sync protocol (slime's): pause (new batches wait; the in-flight batch finishes under
        the engine's lock) -> load -> flush token-keyed caches -> version bump -> resume. So
        every response comes entirely from one weight version.
        """
        if isinstance(weights, (list, tuple)) and len(weights) == 1:
            weights = weights[0]  # [ref] wrapper keeps Ray from resolving the ref in transit
        from slime_ray.engines.remote import RemoteEngine

        if isinstance(self.engine, RemoteEngine):  # one call to the engine's actor, which reads the ref
            return await self.engine.update_weights_paused_async(weights, int(weight_version))
        if isinstance(weights, ray.ObjectRef):
            weights = await weights
        from slime_ray.sync.transport import as_tensors

        weights = as_tensors(weights)  # engines get a dict (the object store carries numpy arrays)
        await asyncio.to_thread(self.engine.pause)
        try:
            await asyncio.to_thread(self.engine.update_weights, weights, int(weight_version))
            await asyncio.to_thread(self.engine.flush_cache)
        finally:
            await asyncio.to_thread(self.engine.resume)
        return self.engine.weight_version

    async def weight_sync_call(self, method: str, *args: Any) -> Any:
        """One step of a GPU weight transport (cuda_ipc bucket, nccl group / broadcast), see
        :mod:`slime_ray.sync.weight_sync`; the caller pauses, flushes and resumes around it."""
        from slime_ray.engines.remote import RemoteEngine
        from slime_ray.sync.receiver import dispatch

        if isinstance(self.engine, RemoteEngine):
            out = await self.engine.actor.weight_sync_call.remote(method, *args)
            if method != "init_weights_update_group":
                self.engine.weight_version = int(args[1])
            return out
        return await asyncio.to_thread(dispatch, self.engine, method, *args)

    async def get_weight_version(self) -> int:
        from slime_ray.engines.remote import RemoteEngine

        if isinstance(self.engine, RemoteEngine):  # the actor may have been synced directly
            await self.engine.refresh_weight_version_async()
        return self.engine.weight_version

    async def get_weights(self) -> dict[str, Any]:
        """The engine's weights as CPU tensors (for sync checks)."""
        return await asyncio.to_thread(self.engine.get_weights)

    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def abort(self, abort_all: bool = True) -> None:
        self.engine.abort(abort_all)

    async def release_memory(self) -> None:
        await asyncio.to_thread(self.engine.release_memory)

    async def resume_memory(self) -> None:
        await asyncio.to_thread(self.engine.resume_memory)

    def health(self) -> dict[str, Any]:
        return {**self.engine.health(), "engine_index": self.engine_index}

    def check_health(self) -> None:
        """Serve's periodic health check: raising (or not answering in time) gets the replica replaced."""
        state = self.engine.health()
        if not state.get("ok", True):
            raise RuntimeError(f"engine {self.engine_index} unhealthy: {state}")


@serve.deployment(max_ongoing_requests=8192, ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class RolloutIngress(OpenAIRoutes):
    """Router over the engine deployments (HTTP and DeploymentHandle entry point).

    Args:
        engines: one DeploymentHandle per engine deployment, in index order.
        model_path: HF folder of the policy (its tokenizer renders OpenAI chat prompts).
        model_name: the model id of ``/v1/models`` (default: the folder's name).
        max_concurrency: most requests in flight per engine; more wait (backpressure).
    """

    def __init__(self, engines: list[DeploymentHandle], model_path: str | None = None,
                 model_name: str | None = None, max_concurrency: int = 512):
        if not engines:
            raise ValueError("RolloutIngress needs at least one engine")
        self.engines = list(engines)
        self.weight_version = 0  # engines below this version get no traffic (set after each sync)
        self.router = EngineRouter(len(self.engines), max_concurrency=max_concurrency)
        self._engine_actors: dict[int, tuple[Any, int] | None] = {}  # see _generate_many
        self.model_path = model_path
        self.model_name = model_name or os.path.basename(os.path.normpath(model_path or "policy"))
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The policy's tokenizer, loaded on first use (OpenAI routes only)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.model_path is None:
                raise ValueError("this rollout app was built without model_path: no tokenizer")
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    async def generate(self, request: dict[str, Any], _first: tuple[int, Any] | None = None) -> dict[str, Any]:
        """Route one request (see :mod:`slime_ray.engines.base`); returns the response + meta_info.

        ``_first=(engine, burst)``: :meth:`generate_batch`'s choice for the first attempt.

        Raises:
            ValueError: a request with neither ``input_ids`` nor ``text``.
        """
        engine_request = self._engine_request(request)
        tried: set[int] = set()
        while True:
            if _first is not None and not tried:
                i, burst = _first
            else:  # a re-routed request is no longer part of a known burst
                i, burst = self.router.pick(request.get("session_id"), exclude=tried), None
            try:
                async with self.router.slot(i):
                    response = await self.engines[i].generate_at_least.remote(
                        engine_request, self.weight_version, burst)
                return with_meta_info(response, i)
            except StaleWeightsError:
                # A (re)joined replica that does not hold the current weights yet: skip it.
                self.router.mark_failed(i)
                tried.add(i)
                if len(tried) == len(self.engines):
                    raise
            except (ray.exceptions.RayActorError, DeploymentUnavailableError):
                # The replica died or is restarting: skip it for a while, try another engine.
                self.router.mark_failed(i)
                tried.add(i)
                if len(tried) == len(self.engines):
                    raise

    async def generate_batch(self, requests: list[dict[str, Any]]) -> list[Any]:
        """Route a list of requests sent together (one call instead of one per request).

        Each request is routed as by :meth:`generate` (least loaded, sessions, concurrency
        bound, stale / failed engines skipped); the requests that go to one engine are tagged as
        one burst, so that engine starts them at once instead of waiting ``batch_wait_timeout_s``
        for more. Returns, in order, each request's response or the exception it raised.
        """
        import uuid

        picks: list[int] = []
        for r in requests:  # count each pick so the next one sees it (least loaded spreads a burst)
            i = self.router.pick(r.get("session_id") if isinstance(r, dict) else None)
            self.router.outstanding[i] += 1
            picks.append(i)
        for i in picks:
            self.router.outstanding[i] -= 1
        burst_id = uuid.uuid4().hex
        results: list[Any] = [None] * len(requests)

        async def one(j: int, first: tuple[int, Any] | None) -> None:
            try:
                results[j] = await self.generate(requests[j], first)
            except Exception as err:  # noqa: BLE001 - returned in the request's place
                results[j] = err

        async def share(i: int, idxs: list[int]) -> None:
            """Engine i's share: one engine call when its slots are free, else one call each."""
            valid = []
            for j in idxs:
                try:
                    valid.append((j, self._engine_request(requests[j])))
                except Exception as err:  # noqa: BLE001 - a bad request fails alone
                    results[j] = err
            if not valid:
                return
            async with self.router.slots_if_free(i, len(valid)) as held:
                if held:
                    try:
                        out = await self._generate_many(i, [r for _, r in valid])
                        for (j, _), resp in zip(valid, out):
                            results[j] = with_meta_info(resp, i)
                        return
                    except (StaleWeightsError, ray.exceptions.RayActorError, DeploymentUnavailableError):
                        self.router.mark_failed(i)  # each request is routed again, alone
                        valid = [(j, None) for j, _ in valid]
                    except Exception as err:  # noqa: BLE001 - the engine's batch failed: each of its requests
                        for j, _ in valid:
                            results[j] = err
                        return
            tag = (f"{burst_id}:{i}", len(valid))
            await asyncio.gather(*(one(j, None if r is None else (i, tag)) for j, r in valid))

        by_engine: dict[int, list[int]] = {}
        for j, i in enumerate(picks):
            by_engine.setdefault(i, []).append(j)
        await asyncio.gather(*(share(i, idxs) for i, idxs in by_engine.items()))
        return results

    async def _generate_many(self, i: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Engine ``i`` runs ``requests`` as one batch, refused if it is behind ``weight_version``.

        An engine in an actor is called directly (:meth:`EngineDeployment.engine_actor`, asked
        once per replica); an engine inside its replica through the replica.

        Raises:
            StaleWeightsError, RayActorError, DeploymentUnavailableError: as the replica path.
        """
        if i not in self._engine_actors:
            self._engine_actors[i] = await self.engines[i].engine_actor.remote()
        target = self._engine_actors[i]
        if target is None:
            return await self.engines[i].generate_many_at_least.remote(requests, self.weight_version)
        actor, max_batch_size = target
        try:
            return await actor.generate_at_least.remote(requests, self.weight_version, max_batch_size)
        except ray.exceptions.RayActorError:
            self._engine_actors.pop(i, None)  # its replica restarts with a new actor: ask again
            raise

    @staticmethod
    def _engine_request(request: dict[str, Any]) -> dict[str, Any]:
        """The engine's part of a request (checked).

        Raises:
            ValueError: a request with neither ``input_ids`` nor ``text``, or bad sampling params.
        """
        if request.get("input_ids") is None and request.get("text") is None:
            raise ValueError("generate: the request needs 'input_ids' or 'text'")
        check_sampling_params(request.get("sampling_params") or {})
        return {k: request[k] for k in ("input_ids", "text", "sampling_params", "return_logprob") if k in request}

    def num_engines(self) -> int:
        return len(self.engines)

    def set_weight_version(self, weight_version: int) -> None:
        """The version every engine must hold to be routed to (the EngineClient sets it after a sync)."""
        self.weight_version = int(weight_version)
        for i in range(len(self.engines)):
            self.router.mark_healthy(i)

    async def weight_versions(self) -> list[int]:
        return list(await asyncio.gather(*[h.get_weight_version.remote() for h in self.engines]))

    async def broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every engine and wait for all (pause, resume, abort, ...)."""
        return list(await asyncio.gather(*[getattr(h, method).remote(*args) for h in self.engines]))

    # ------------------------------------------------------------------ HTTP routes
    @fastapi_app.post("/generate")
    async def http_generate(self, http_request: Request):
        body = await http_request.json()
        try:
            return await self.generate(body)
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)

    def router_state(self) -> dict[str, Any]:
        """Outstanding requests and health per engine, number of pinned sessions."""
        return self.router.state()

    @fastapi_app.get("/health")
    async def http_health(self):
        states = await self.broadcast("health")
        ok = all(s.get("ok") for s in states)
        return JSONResponse({"ok": ok, "engines": states, "router": self.router.state()},
                            status_code=200 if ok else 503)

    @fastapi_app.get("/weight_version")
    async def http_weight_version(self):
        versions = await self.weight_versions()
        return {"weight_version": min(versions), "weight_versions": versions}

    @fastapi_app.post("/abort_request")
    async def http_abort(self):
        await self.broadcast("abort", True)
        return {"ok": True}

    @fastapi_app.post("/pause_generation")
    async def http_pause(self):
        await self.broadcast("pause")
        return {"ok": True}

    @fastapi_app.post("/continue_generation")
    async def http_continue(self):
        await self.broadcast("resume")
        return {"ok": True}

    @fastapi_app.post("/flush_cache")
    async def http_flush(self):
        await self.broadcast("flush_cache")
        return {"ok": True}


def build_rollout_app(
    model_path: str,
    *,
    num_engines: int = 1,
    engine: str = "hf",
    engine_kwargs: dict[str, Any] | None = None,
    max_batch_size: int = 64,
    batch_wait_timeout_s: float = 0.05,
    num_cpus_per_engine: float = 1,
    num_gpus_per_engine: float = 0,
    torch_num_threads: int | None = None,
    max_concurrency: int = 512,
    model_name: str | None = None,
    engine_placements: list[dict[str, Any]] | None = None,
    fault_tolerance: dict[str, Any] | None = None,
) -> serve.Application:
    """Compose N engine deployments (``engine_0..engine_{N-1}``) and the ingress with ``.bind()``.

    Deploy with ``serve.run(app, name="rollout")``; then
    ``EngineClient.from_app("rollout")`` addresses the ingress and every engine.

    ``max_concurrency``: requests in flight per engine (the ingress holds the others back);
    ``model_name``: the id served by ``/v1/models`` (default: the folder's name).
    ``engine_placements``: one :meth:`slime_ray.placement.Placement.engine_placement` per engine;
    each engine then runs in an actor on its bundle of the job's placement group and the
    replica itself reserves nothing.
    ``fault_tolerance``: ``{"health_check_period_s", "health_check_timeout_s", "weight_store"}``
    (see :mod:`slime_ray.fault`): replicas are health-checked and a restarted one loads the
    store's weights before it takes traffic.

    Raises:
        ValueError: ``num_engines``, ``max_batch_size`` or ``max_concurrency`` below 1.
    """
    if min(num_engines, max_batch_size, max_concurrency) < 1:
        raise ValueError(f"num_engines ({num_engines}), max_batch_size ({max_batch_size}) and "
                         f"max_concurrency ({max_concurrency}) must be >= 1")
    engines = [
        EngineDeployment.options(
            name=f"engine_{i}",
            num_replicas=1,
            **{k: v for k, v in (fault_tolerance or {}).items() if k.startswith("health_check")},
            max_ongoing_requests=max(1024, 2 * max_batch_size, max_concurrency),
            ray_actor_options={
                "num_cpus": 0 if engine_placements else num_cpus_per_engine,
                "num_gpus": 0 if engine_placements else num_gpus_per_engine,
                **({"runtime_env": {"env_vars": {"SLIME_RAY_TORCH_THREADS": str(torch_num_threads)}}}
                   if torch_num_threads else {}),
            },
        ).bind(
            model_path,
            engine=engine,
            engine_kwargs=engine_kwargs,
            engine_index=i,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            placement=engine_placements[i] if engine_placements else None,
            weight_store=(fault_tolerance or {}).get("weight_store"),
        )
        for i in range(num_engines)
    ]
    return RolloutIngress.bind(engines, model_path=model_path, model_name=model_name,
                               max_concurrency=max_concurrency)


_ENGINE_ARG_TYPES = {"dtype": str, "device": str, "seed": int, "compile": str, "batch_buckets": str,
                     "decode_loop": str}
_APP_ARG_TYPES = {
    "num_engines": int,
    "engine": str,
    "max_batch_size": int,
    "batch_wait_timeout_s": float,
    "num_cpus_per_engine": float,
    "num_gpus_per_engine": float,
    "max_concurrency": int,
    "model_name": str,
    "torch_num_threads": int,
}


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run serve_apps.rollout_app:app model_path=... [num_engines=2 dtype=bfloat16 ...]``.

    Keys: ``model_path`` (required), the keyword arguments of :func:`build_rollout_app`, and
    the engine's ``dtype``, ``device``, ``seed``.

    Raises:
        ValueError: no ``model_path`` or an unknown key.
    """
    args = dict(args)
    if "model_path" not in args:
        raise ValueError("rollout app: pass model_path=/path/to/hf/folder")
    unknown = set(args) - {"model_path"} - set(_ENGINE_ARG_TYPES) - set(_APP_ARG_TYPES)
    if unknown:
        raise ValueError(f"rollout app: unknown arguments {sorted(unknown)}")
    engine_kwargs = {k: _ENGINE_ARG_TYPES[k](v) for k, v in args.items() if k in _ENGINE_ARG_TYPES}
    app_kwargs = {k: _APP_ARG_TYPES[k](v) for k, v in args.items() if k in _APP_ARG_TYPES}
    return build_rollout_app(os.path.expanduser(args["model_path"]), engine_kwargs=engine_kwargs, **app_kwargs)


app = app_builder
