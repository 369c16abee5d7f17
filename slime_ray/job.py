"""What the job entry points call: connect to Ray, start the rollout tier, the trainer, tracking.

Everything here checks its inputs before it takes a resource: bad flags, a missing model
folder or a malformed prompt file stop the job before any actor or Serve app starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from argparse import Namespace
from dataclasses import dataclass
from typing import Any

import ray

logger = logging.getLogger("slime_ray")

ROLLOUT_APP_NAME = "slime_ray_rollout"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "httpx", "alembic", "mlflow", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_ray(args: Namespace) -> None:
    """Connect to the cluster the job was submitted to, or start a local one (127.0.0.1 only)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        # Ray starts workers at nice 15 (RAY_worker_niceness) so that they yield to its daemons;
        # here the actors (engine, trainer) are the workload, and at nice 15 every nice-0
        # process (this driver, its MLflow writer, the raylet) takes the CPU from them: the
        # engine's decode ran ~1.5x slower on a 2-vCPU machine (bench/RESULTS.md, 2026-12-01).
        # A cluster this job starts runs them at 0; `ray start` reads the same variable.
        os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 num_cpus=max(4, (os.cpu_count() or 2)))


def check_backends(args: Namespace) -> None:
    """Stop before any resource is taken when the chosen engine or training backend is missing.

    Raises:
        ConfigError: naming the extra to install (``slime_ray[sglang]``, ``slime_ray[megatron]``)
        or the parallel size that does not fit.
    """
    from slime_ray.engines.sglang import check_engine_choice

    check_engine_choice(args)
    if args.train_backend == "megatron":
        from slime_ray.train.backends.megatron import check_megatron_available, parallel_sizes

        from slime_ray.args import ConfigError

        try:
            check_megatron_available()
        except ImportError as err:  # bad input (a flag for a missing extra), not a bug: one line
            raise ConfigError(str(err)) from None
        try:
            parallel_sizes(args.megatron_args, args.actor_num_nodes * args.actor_num_gpus_per_node)
        except (ValueError, NotImplementedError) as err:
            raise ConfigError(f"{err} (the training ranks are --actor-num-nodes x --actor-num-gpus-per-node)") from None


def check_megatron_model(args: Namespace) -> None:
    """``--train-backend megatron``: the model converts and splits (before any resource is taken).

    Raises:
        ConfigError: naming ``--hf-checkpoint`` and the field or feature that does not fit.
    """
    from transformers import AutoConfig

    from slime_ray.args import ConfigError
    from slime_ray.train.backends.megatron import model_spec, parallel_sizes

    tp = parallel_sizes(args.megatron_args, args.actor_num_nodes * args.actor_num_gpus_per_node)[0]
    try:
        model_spec(args.megatron_args, AutoConfig.from_pretrained(args.hf_checkpoint), tp)
    except (ValueError, NotImplementedError) as err:
        raise ConfigError(f"--hf-checkpoint {args.hf_checkpoint} with --train-backend megatron: {err}") from None


def prepare_inputs(args: Namespace) -> tuple[Any, list[dict]]:
    """Resolve the model folder and load the prompts (before any resource is taken).

    Returns:
        (tokenizer, prompts) — ``args.hf_checkpoint`` is replaced by the resolved local folder.

    Raises:
        slime_ray.data.dataset.DataError, FileNotFoundError / ValueError from model resolution.
    """
    from transformers import AutoTokenizer

    from slime_ray.data.dataset import load_prompt_data
    from slime_ray.models import resolve_hf_checkpoint

    check_backends(args)
    args.hf_checkpoint = resolve_hf_checkpoint(args.hf_checkpoint)
    if args.train_backend == "megatron":
        check_megatron_model(args)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
    if getattr(args, "streaming_data", False):  # read as a Ray Data stream by make_data_source
        if args.num_rollout is None:
            raise ValueError("--streaming-data does not count the prompts up front: pass --num-rollout")
        return tokenizer, []
    prompts = load_prompt_data(
        args.prompt_data, input_key=args.input_key, label_key=args.label_key,
        metadata_key=args.metadata_key, tool_key=None, apply_chat_template=args.apply_chat_template,
        tokenizer=tokenizer, max_prompt_len=args.rollout_max_prompt_len, system_prompt=args.system_prompt)
    from slime_ray.validation import check_inputs

    check_inputs(args, prompts)  # plug-ins, label types, prompt + response within the context
    if args.num_rollout is None:
        epochs = args.num_epoch or 1
        args.num_rollout = max(1, len(prompts) * epochs // args.rollout_batch_size)
    return tokenizer, prompts


def make_data_source(args: Namespace, prompts: list[dict]) -> Any:
    """The data source of the job.

    ``--data-source-path``: the user's class, built as ``cls(args)`` (or ``cls()`` when its
    constructor takes no arguments, as in slime's docs). ``--streaming-data``: a Ray Data stream
    (:class:`~slime_ray.data.streaming.StreamingRolloutDataSource`). Otherwise slime's
    RolloutDataSource over the loaded prompts, with a buffer (``RolloutDataSourceWithBuffer``)
    when ``--partial-rollout`` or ``--buffer-filter-path`` needs one.
    """
    import inspect

    from slime_ray.data.dataset import RolloutDataSource, RolloutDataSourceWithBuffer

    if args.data_source_path:
        from slime_ray.plugins import load_function

        cls = load_function(args.data_source_path, flag="--data-source-path")
        takes_args = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                         for p in inspect.signature(cls).parameters.values())
        return cls(args) if takes_args else cls()
    if getattr(args, "streaming_data", False):
        from slime_ray.data.streaming import StreamingRolloutDataSource

        return StreamingRolloutDataSource(args)
    buffered = getattr(args, "partial_rollout", False) or getattr(args, "buffer_filter_path", None)
    cls = RolloutDataSourceWithBuffer if buffered else RolloutDataSource
    return cls(args, prompts=prompts, n_samples_per_prompt=args.n_samples_per_prompt,
               rollout_shuffle=args.rollout_shuffle, rollout_seed=args.rollout_seed)


def start_rollout_app(args: Namespace, placement: Any = None) -> Any:
    """Deploy the rollout Serve app (engines + router ingress); returns an EngineClient.

    With ``placement`` (:class:`slime_ray.placement.Placement`) engine ``i`` runs on bundle
    ``placement.rollout_bundle_offset + i`` of the job's placement group (shared with the
    trainer under ``--colocate``); without it Serve places the engine replicas itself, as many
    as :func:`slime_ray.placement.engines_for` derives from ``--rollout-num-gpus`` /
    ``--rollout-num-gpus-per-engine`` (GPUs) or ``--rollout-num-engines`` (CPU).

    Raises:
        ConfigError: ``--rollout-engine sglang`` where SGLang is not installed.
    """
    from ray import serve

    from serve_apps.rollout_app import build_rollout_app
    from slime_ray.engines.sglang import check_engine_choice, sglang_engine_kwargs
    from slime_ray.placement import cluster_has_gpus, engines_for
    from slime_ray.rollout.engine_client import EngineClient

    check_engine_choice(args)
    use_gpu = placement.use_gpu if placement is not None else cluster_has_gpus()
    num_engines = placement.num_rollout_bundles if placement is not None else engines_for(args, use_gpu)
    placements = [placement.engine_placement(i) for i in range(num_engines)] if placement is not None else None
    if args.rollout_engine == "sglang":
        engine_kwargs = {**sglang_engine_kwargs(args), "max_concurrency": args.rollout_max_concurrency}
    else:
        engine_kwargs = {"seed": args.rollout_seed, **({"device": "cuda"} if use_gpu else {}),
                         "compile": getattr(args, "rollout_compile", "auto"),
                         "batch_buckets": getattr(args, "rollout_batch_buckets", None),
                         "decode_loop": getattr(args, "rollout_decode_loop", "auto")}
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ.get("SLIME_RAY_SERVE_PORT", 8000))})
    app = build_rollout_app(
        args.hf_checkpoint, num_engines=num_engines, engine=args.rollout_engine,
        engine_kwargs=engine_kwargs, torch_num_threads=args.torch_num_threads,
        max_batch_size=args.rollout_max_batch_size, batch_wait_timeout_s=args.rollout_batch_wait_s,
        num_cpus_per_engine=args.num_cpus_per_engine, engine_placements=placements,
        num_gpus_per_engine=args.rollout_num_gpus_per_engine if use_gpu and placement is None else 0,
        max_concurrency=args.rollout_max_concurrency, fault_tolerance=_fault_tolerance_options(args))
    serve.run(app, name=ROLLOUT_APP_NAME, route_prefix="/", blocking=False,
              logging_config={"enable_access_log": False, "log_level": "WARNING"})  # no line per request
    client = EngineClient.from_app(ROLLOUT_APP_NAME, num_engines)
    if args.use_fault_tolerance:
        from slime_ray.fault import start_weight_store

        client.weight_store = start_weight_store(f"{ROLLOUT_APP_NAME}_weights")
        client.retry_s = args.rollout_request_retry_s
    return client


def _fault_tolerance_options(args: Namespace) -> dict[str, Any] | None:
    """Serve health-check options and the weight store of ``--use-fault-tolerance`` (else None)."""
    if not args.use_fault_tolerance:
        return None
    return {"health_check_period_s": args.rollout_health_check_interval,
            "health_check_timeout_s": args.rollout_health_check_timeout,
            "weight_store": f"{ROLLOUT_APP_NAME}_weights"}


def offload_rollout(args: Namespace, client: Any, timer: "StepTimer | None" = None) -> None:
    """Colocated with ``--offload-rollout``: engines release weights/KV before the trainer runs.
    With ``timer``, its seconds go to ``perf/offload_rollout_time``."""
    if args.colocate and args.offload_rollout:
        _timed(timer, "offload_rollout", client.release_memory)


def onload_rollout(args: Namespace, client: Any, timer: "StepTimer | None" = None) -> None:
    """Colocated with ``--offload-rollout``: engines take their memory back (before the sync).
    With ``timer``, its seconds go to ``perf/onload_rollout_time``."""
    if args.colocate and args.offload_rollout:
        _timed(timer, "onload_rollout", client.resume_memory)


def _timed(timer: "StepTimer | None", name: str, fn: Any) -> Any:
    return fn() if timer is None else timer.run(name, fn)


def shutdown(result: "JobResult") -> None:
    """Tear a finished job down: its Serve app, trainer actors and placement group."""
    from ray import serve

    from slime_ray.placement import remove_placement

    serve.delete(ROLLOUT_APP_NAME)
    for group in (result.actor, getattr(result, "critic", None)):
        for a in getattr(group, "actors", []) or []:
            ray.kill(a)
    remove_placement(getattr(result, "placement", None))


@dataclass
class JobResult:
    """What a finished job hands back (tests inspect the live actors and engines)."""

    metrics: dict[str, float]
    actor: Any
    rollout: Any
    run_id: str | None
    placement: Any = None


@dataclass
class StepTimer:
    """Wall-clock seconds of each phase of a step."""

    times: dict[str, float]

    def __init__(self) -> None:
        self.times = {}

    def run(self, name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.times[f"perf/{name}_time"] = time.perf_counter() - t0
        return out


def run_async(coro: Any) -> Any:
    """Run a coroutine to completion from the (synchronous) driver."""
    return asyncio.run(coro)
