"""slime-compatible command line -> typed config, with validation that says what to change.

The flags are generated from small dataclasses, one per concern (cluster, data, rollout,
reward, algorithm, train, checkpoint, sync, eval, tracking); every field carries its help
text. Flag names are slime's (``--rollout-batch-size``, ``--use-kl-loss``, ...). Besides the
typed :class:`Config`, :func:`parse_args` returns a flat ``argparse.Namespace`` holding every
field under slime's attribute name: user plug-ins receive that ``args`` object, as in slime.

Pass-through flags:
  * ``--sglang-*`` are kept (prefix removed) in ``args.sglang_args`` for the SGLang engine;
  * Megatron-LM's model / parallelism flags (``--num-layers``, ``--tensor-model-parallel-size``
    ...) are kept in ``args.megatron_args`` for the Megatron backend.
Any other unknown flag is an error that names it and suggests the closest known flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin


class ConfigError(ValueError):
    """A flag value that cannot work; the message names the flag and what to change."""


def arg(default: Any = None, help: str = "", *, choices: tuple | None = None, nargs: str | None = None,
        flag: str | None = None) -> Any:
    """A dataclass field carrying its CLI help (and optional choices / nargs / flag name)."""
    meta = {"help": help, "choices": choices, "nargs": nargs, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ClusterConfig:
    actor_num_nodes: int = arg(1, "Nodes for the training actor group.")
    actor_num_gpus_per_node: int = arg(1, "Training ranks per node (GPUs; CPU actors on a machine without GPUs).")
    rollout_num_gpus: int | None = arg(None, "GPUs for rollout engines in total (default: the actor's when --colocate).")
    rollout_num_gpus_per_engine: int = arg(1, "GPUs per engine replica (tensor parallel of one engine).")
    rollout_num_engines: int | None = arg(None, "Engine replicas on a machine without GPUs (default 1).")
    colocate: bool = arg(False, "Trainer and engines share the same bundles and take turns.")
    offload: bool = arg(False, "Offload both train and rollout memory when the other runs.")
    offload_train: bool = arg(False, "Release trainer memory while the engines generate.")
    offload_rollout: bool = arg(False, "Release engine weights/KV while the trainer runs.")
    num_cpus_per_actor: float = arg(1.0, "Ray logical CPUs reserved per training rank on a CPU-only cluster.")
    num_cpus_per_engine: float = arg(1.0, "Ray logical CPUs reserved per engine replica on a CPU-only cluster.")
    torch_num_threads: int | None = arg(None, "torch intra-op threads per actor/engine (default: all cores).")
    ray_address: str | None = arg(None, "Ray cluster address (default: the one the job was submitted to, else a new local one).")


@dataclass
class DataConfig:
    prompt_data: str | None = arg(None, "Prompt file (.jsonl or .parquet) with one prompt per row.")
    input_key: str = arg("input", "Key of the prompt in each row (str or chat messages).")
    label_key: str | None = arg(None, "Key of the reference answer in each row.")
    metadata_key: str = arg("metadata", "Key of a per-row metadata dict.")
    tool_key: str = arg("tools", "Key of a tools list passed to apply_chat_template(tools=...).")
    apply_chat_template: bool = arg(False, "Render prompts with the tokenizer's chat template.")
    system_prompt: str | None = arg(None, "A system message added to every prompt with --apply-chat-template.")
    rollout_shuffle: bool = arg(False, "Shuffle prompts each epoch (seed --rollout-seed + epoch).")
    rollout_seed: int = arg(42, "Seed of the prompt shuffle and of sampling.")
    rollout_max_prompt_len: int | None = arg(None, "Drop prompts longer than this many tokens at load (count logged).")
    num_epoch: int | None = arg(None, "Epochs over the prompts (sets --num-rollout when that is not given).")
    data_source_path: str | None = arg(None, "Custom data source class 'file.py:Name' (slime's RolloutDataSource shape).")
    buffer_filter_path: str | None = arg(None, "Buffer filter (args, rollout_id, buffer, num_samples) -> groups popped from the buffer (default pop_first).")
    streaming_data: bool = arg(False, "Stream --prompt-data with Ray Data instead of loading it into memory (files larger than RAM).")
    num_data_workers: int = arg(1, "Parallelism (read tasks) of the --streaming-data reader.")


@dataclass
class RolloutConfig:
    rollout_batch_size: int = arg(4, "Prompts per rollout step.")
    n_samples_per_prompt: int = arg(4, "Responses sampled per prompt (the group size).")
    num_rollout: int | None = arg(None, "Rollout steps to run.")
    rollout_max_response_len: int = arg(64, "Max new tokens per response.")
    rollout_temperature: float = arg(1.0, "Sampling temperature (> 0); log-probs are taken at this temperature.")
    rollout_top_p: float = arg(1.0, "Nucleus sampling threshold.")
    rollout_top_k: int = arg(-1, "Top-k sampling (-1 = off).")
    rollout_stop: list[str] | None = arg(None, "Stop strings.", nargs="+")
    rollout_stop_token_ids: list[int] | None = arg(None, "Extra stop token ids (besides the model's EOS).", nargs="+")
    rollout_engine: str = arg("hf", "Inference engine behind the Serve deployment.", choices=("hf", "sglang"))
    rollout_compile: str = arg("auto", "hf engine: static KV cache + torch.compile of the decode step, padded to "
                               "shape buckets (auto: on for CUDA, off on CPU).", choices=("auto", "true", "false"))
    rollout_batch_buckets: str = arg("8,32,64,128,256", "hf engine with --rollout-compile: batch sizes calls are "
                                     "padded to (one compile per bucket).")
    rollout_decode_loop: str = arg("auto", "hf engine decode loop: static (own static-cache loop, 8 steps per CUDA "
                                   "graph when compiled), generate (transformers generate); auto: static for models transformers "
                                   "runs with a static cache (or when compiled), else generate.",
                                   choices=("auto", "static", "generate"))
    custom_generate_function_path: str | None = arg(None, "async def generate(args, sample, sampling_params) -> Sample | list[Sample].")
    max_turns: int = arg(1, "Max turns of a multi-turn custom generate function.")
    over_sampling_batch_size: int | None = arg(None, "Groups requested from the data source at a time while fewer than --rollout-batch-size are kept or in flight (default --rollout-batch-size).")
    dynamic_sampling_filter_path: str | None = arg(None, "Group filter (args, group, **kw) -> DynamicFilterOutput | bool, e.g. slime_ray.rollout.filters.check_reward_nonzero_std.")
    partial_rollout: bool = arg(False, "Return aborted groups to the buffer and resume them in a later step from their tokens.")
    rollout_max_batch_size: int = arg(64, "Largest batch one engine forms from concurrent requests.")
    rollout_batch_wait_s: float = arg(0.05, "How long an engine waits to fill a batch, seconds.")
    rollout_max_concurrency: int = arg(512, "Requests in flight per engine (slime's --sglang-server-concurrency); "
                                       "more wait in the ingress (backpressure).")
    deterministic_rollout: bool = arg(False, "Seed each sample's sampling with --rollout-seed + sample index: "
                                      "rollouts repeat exactly (also across resume); hf engine runs such requests unbatched.")


@dataclass
class RewardConfig:
    rm_type: str | None = arg("math", "Built-in reward: math, boxed_math, f1, remote_rm.")
    custom_rm_path: str | None = arg(None, "Custom reward 'file.py:name' (per-sample async fn, group fn or class).")
    group_rm: bool = arg(False, "The custom reward scores a whole group: (args, samples) -> list.")
    reward_key: str | None = arg(None, "Key to train on when rewards are dicts.")
    rm_url: str | None = arg(None, "URL of a remote reward model (--rm-type remote_rm).")
    rm_timeout: float | None = arg(None, "Seconds before a reward call is abandoned (sample marked failed).")


@dataclass
class AlgorithmConfig:
    advantage_estimator: str = arg("grpo", "Advantage estimator.", choices=(
        "grpo", "gspo", "cispo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "rloo"))
    disable_grpo_std_normalization: bool = arg(False, "GRPO without dividing by the group std (Dr.GRPO).")
    normalize_advantages: bool = arg(False, "Whiten advantages over the batch's loss-mask tokens.")
    eps_clip: float = arg(0.2, "PPO clip range (lower).")
    eps_clip_high: float | None = arg(None, "PPO clip range upper (DAPO clip-higher; default --eps-clip).")
    eps_clip_c: float | None = arg(None, "Dual-clip constant (> 1) for negative advantages.")
    use_kl_loss: bool = arg(False, "Add a KL(policy || reference) loss term.")
    kl_loss_coef: float = arg(0.0, "Coefficient of the KL loss.")
    kl_loss_type: str = arg("low_var_kl", "KL estimator of the KL loss.", choices=("k1", "k2", "k3", "low_var_kl"))
    kl_coef: float = arg(0.0, "KL penalty folded into the reward (PPO / REINFORCE++).")
    entropy_coef: float = arg(0.0, "Entropy bonus coefficient.")
    gamma: float = arg(1.0, "Discount (PPO / REINFORCE++).")
    lambd: float = arg(1.0, "GAE lambda (PPO).")
    calculate_per_token_loss: bool = arg(False, "Global token-mean loss (same as --loss-agg-mode token-mean).")
    loss_agg_mode: str | None = arg(None, "Loss aggregation (default seq-mean-token-mean, slime's).", choices=(
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
    use_tis: bool = arg(False, "Truncated importance sampling against the rollout log-probs.")
    tis_clip: float = arg(2.0, "Upper clip of the TIS weight.")
    tis_clip_low: float = arg(0.0, "Lower clip of the TIS weight.")
    use_rollout_logprobs: bool = arg(False, "Use the engine's log-probs as the old policy's.")
    critic_lr: float | None = arg(None, "Learning rate of the critic (PPO; default --lr).")
    value_clip: float = arg(0.2, "Value clip range (PPO critic).")
    num_critic_only_steps: int = arg(0, "PPO: for the first N rollout steps only the critic trains (policy fixed).")


@dataclass
class TrainConfig:
    train_backend: str = arg("torch", "Training backend.", choices=("torch", "megatron"))
    global_batch_size: int | None = arg(None, "Samples per optimizer step (default: one step per rollout).")
    micro_batch_size: int = arg(1, "Samples per forward/backward pass.")
    num_steps_per_rollout: int | None = arg(None, "Optimizer steps per rollout.")
    lr: float = arg(1e-6, "Learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.98, "AdamW beta2.")
    adam_eps: float = arg(1e-8, "AdamW epsilon.")
    clip_grad: float = arg(1.0, "Gradient clipping by global norm (0 = off).")
    seed: int = arg(1234, "Seed of the trainer.")
    train_precision: str = arg("auto", "Compute precision of the torch backend: bf16 (fp32 master weights and "
                               "optimizer) or fp32; auto = bf16 on GPU, fp32 on CPU.", choices=("auto", "bf16", "fp32"))
    use_dynamic_batch_size: bool = arg(False, "Form micro-batches by a token budget (--max-tokens-per-gpu) and pack "
                                       "each into one row; the loss does not depend on the split.")
    max_tokens_per_gpu: int | None = arg(None, "Token budget of one micro-batch with --use-dynamic-batch-size.")
    recompute_activations: bool = arg(False, "Gradient checkpointing of every decoder layer (less memory, ~1/3 more compute).")
    train_compile: str = arg("auto", "torch backend: torch.compile each decoder layer (dynamic shapes, one graph "
                             "for all layers): fewer kernels and less host work per step, a compile on the first "
                             "step (auto: on for a single CUDA rank; FSDP2 across ranks with compiled layers is "
                             "not verified yet, pass true to try it).", choices=("auto", "true", "false"))


@dataclass
class CheckpointConfig:
    hf_checkpoint: str | None = arg(None, "Local HF model folder (or 'smollm2-135m-instruct', fetched into the cache).")
    ref_load: str | None = arg(None, "Reference model folder (default --hf-checkpoint).")
    load: str | None = arg(None, "Resume from this checkpoint dir.")
    save: str | None = arg(None, "Save checkpoints here.")
    save_interval: int | None = arg(None, "Save every N rollout steps (and after the last step).")
    save_hf: str | None = arg(None, "Export an HF folder here at each save ('{rollout_id}' in the path is filled in).")


@dataclass
class FaultToleranceConfig:
    use_fault_tolerance: bool = arg(False, "Health-check engine replicas; a restarted replica pulls the current "
                                    "weights before it takes traffic; requests of a dead replica are retried.")
    rollout_health_check_interval: float = arg(30.0, "Seconds between health checks of an engine replica.")
    rollout_health_check_timeout: float = arg(30.0, "Seconds a replica's health check may take before it is "
                                              "declared dead and replaced.")
    rollout_request_retry_s: float = arg(300.0, "Seconds a generate request keeps being retried while its "
                                         "replica restarts (fault tolerance).")
    max_train_restarts: int = arg(3, "Times a dead trainer group is restarted from the last checkpoint "
                                  "before the job stops (needs --save).")


@dataclass
class SyncConfig:
    update_weights_interval: int = arg(1, "Sync weights to the engines every N rollout steps.")
    update_weight_buffer_size: int = arg(512 * 1024**2, "Bucket size of a weight transfer, bytes.")
    update_weight_transport: str = arg("auto", "Weight transport trainer -> engines: object_store, cuda_ipc "
                                       "(colocated GPUs), nccl (disaggregated GPUs); auto picks by placement.",
                                       choices=("auto", "object_store", "cuda_ipc", "nccl"))
    async_buffer_size: int = arg(1, "Rollouts generated ahead of training (async loop).")
    max_staleness: int | None = arg(None, "Drop samples more than K weight versions old (async loop).")


@dataclass
class EvalConfig:
    eval_prompt_data: list[str] | None = arg(None, "Eval sets as NAME PATH pairs.", nargs="+")
    eval_interval: int | None = arg(None, "Evaluate every N rollout steps.")
    n_samples_per_eval_prompt: int = arg(1, "Samples per eval prompt.")
    eval_temperature: float | None = arg(None, "Eval temperature (default --rollout-temperature).")
    eval_max_response_len: int | None = arg(None, "Eval max new tokens (default --rollout-max-response-len).")
    eval_top_p: float | None = arg(None, "Eval nucleus sampling threshold (default --rollout-top-p).")
    skip_eval_before_train: bool = arg(False, "Do not evaluate at step 0, before training.")


@dataclass
class TrackingConfig:
    mlflow_tracking_uri: str | None = arg(None, "MLflow tracking URI (default sqlite:///<cwd>/mlflow.db); jsonl:PATH writes metrics as JSON lines without MLflow.")
    mlflow_experiment_name: str = arg("slime_ray", "MLflow experiment.")
    run_name: str | None = arg(None, "MLflow run name.")
    use_tensorboard: bool = arg(False, "Also write the scalars for TensorBoard under --tensorboard-dir.")
    tensorboard_dir: str = arg("outputs/", "TensorBoard log dir.")


SECTIONS: dict[str, type] = {
    "cluster": ClusterConfig,
    "data": DataConfig,
    "rollout": RolloutConfig,
    "reward": RewardConfig,
    "algorithm": AlgorithmConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "fault_tolerance": FaultToleranceConfig,
    "sync": SyncConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
}


@dataclass
class Config:
    cluster: ClusterConfig
    data: DataConfig
    rollout: RolloutConfig
    reward: RewardConfig
    algorithm: AlgorithmConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    fault_tolerance: FaultToleranceConfig
    sync: SyncConfig
    eval: EvalConfig
    tracking: TrackingConfig


# Megatron-LM flags accepted and passed through to the Megatron backend (slime's MODEL_ARGS).
MEGATRON_FLAGS = {
    "tensor-model-parallel-size", "pipeline-model-parallel-size", "context-parallel-size",
    "expert-model-parallel-size", "expert-tensor-parallel-size", "sequence-parallel",
    "recompute-granularity", "recompute-method", "recompute-num-layers",
    "num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads", "group-query-attention",
    "num-query-groups", "kv-channels", "max-position-embeddings", "seq-length", "swiglu",
    "normalization", "norm-epsilon", "use-rotary-position-embeddings", "rotary-base",
    "rotary-percent", "disable-bias-linear", "add-qkv-bias", "untie-embeddings-and-output-weights",
    "vocab-size", "padded-vocab-size", "make-vocab-size-divisible-by", "position-embedding-type",
    "qk-layernorm", "num-experts", "moe-router-topk", "moe-ffn-hidden-size", "bf16", "fp16",
    "attention-dropout", "hidden-dropout", "optimizer", "lr-decay-style", "min-lr", "lr-warmup-iters", "attention-backend",
    "rotary-scaling-factor", "use-rope-scaling", "moe-shared-expert-intermediate-size",
}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, {"list": list, "dict": dict})  # noqa: S307 - our own annotations only
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if args and get_origin(tp) is not list else tp


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`ConfigError` (one line from the CLI), not usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see `python {self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every flag, generated from the config dataclasses."""
    p = _Parser(
        prog="jobs/grpo.py", description="slime_ray: GRPO/PPO post-training on Ray (slime's flags).",
        allow_abbrev=False,
    )
    for section, cls in SECTIONS.items():
        g = p.add_argument_group(section)
        for f in dataclasses.fields(cls):
            tp = _base_type(f.type)
            kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", ""), "default": f.default
                                  if f.default is not dataclasses.MISSING else f.default_factory()}
            if tp is bool:
                g.add_argument(_flag(f), action="store_true", **kw)
                continue
            if get_origin(tp) is list:
                kw["type"] = get_args(tp)[0]
                kw["nargs"] = f.metadata.get("nargs") or "+"
            else:
                kw["type"] = tp
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            g.add_argument(_flag(f), **kw)
    return p


def _split_passthrough(unknown: list[str], parser: argparse.ArgumentParser) -> tuple[dict, dict]:
    """Split unknown tokens into --sglang-* and Megatron flags; anything else is an error."""
    sglang, megatron = {}, {}
    known_flags = [o for a in parser._actions for o in a.option_strings]
    i = 0
    while i < len(unknown):
        tok = unknown[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: values must follow a flag")
        name, _, inline = tok[2:].partition("=")
        values = [inline] if inline else []
        while not inline and i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
            values.append(unknown[i + 1])
            i += 1
        value: Any = True if not values else (values[0] if len(values) == 1 else values)
        if name.startswith("sglang-"):
            sglang[name[len("sglang-"):]] = value
        elif name in MEGATRON_FLAGS:
            megatron[name] = value
        else:
            close = difflib.get_close_matches(tok.split("=")[0], known_flags, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see `python jobs/grpo.py --help`"
            raise ConfigError(f"unknown flag {tok.split('=')[0]}{hint}")
        i += 1
    return sglang, megatron


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse and validate slime-style flags.

    Returns:
        (config, args): typed sections, and a flat namespace of every field (slime's
        attribute names) plus ``sglang_args`` / ``megatron_args`` dicts.

    Raises:
        ConfigError: an unknown flag or an inconsistent combination (message says what to change).
    """
    parser = build_parser()
    ns, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    ns.sglang_args, ns.megatron_args = _split_passthrough(unknown, parser)
    sections = {name: cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
                for name, cls in SECTIONS.items()}
    cfg = Config(**sections)
    validate(cfg, ns)
    return cfg, ns


def validate(cfg: Config, ns: argparse.Namespace) -> None:
    """Check flag combinations and fill derived values (on both cfg and the flat namespace).

    Raises:
        ConfigError: with the flags and numbers involved.
    """
    r, t, a = cfg.rollout, cfg.train, cfg.algorithm

    def setv(section: Any, name: str, value: Any) -> None:
        setattr(section, name, value)
        setattr(ns, name, value)

    if r.rollout_temperature <= 0:
        raise ConfigError(f"--rollout-temperature must be > 0, got {r.rollout_temperature}")
    for name in ("rollout_batch_size", "n_samples_per_prompt", "micro_batch_size"):
        v = getattr(r if hasattr(r, name) else t, name)
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    total = r.rollout_batch_size * r.n_samples_per_prompt
    gbs, steps = t.global_batch_size, t.num_steps_per_rollout
    if gbs is None:
        gbs = total // (steps or 1)
    if steps is None:
        steps = total // gbs if gbs else 0
    if gbs < 1 or gbs * steps != total:
        raise ConfigError(
            "batch invariant broken: rollout_batch_size x n_samples_per_prompt must equal "
            "global_batch_size x num_steps_per_rollout, but "
            f"--rollout-batch-size {r.rollout_batch_size} x --n-samples-per-prompt {r.n_samples_per_prompt} = {total} "
            f"while --global-batch-size {t.global_batch_size if t.global_batch_size is not None else gbs} x "
            f"--num-steps-per-rollout {t.num_steps_per_rollout if t.num_steps_per_rollout is not None else steps} "
            f"= {gbs * steps}; change --global-batch-size (e.g. to {total}) or --num-steps-per-rollout")
    setv(t, "global_batch_size", gbs)
    setv(t, "num_steps_per_rollout", steps)
    world = cfg.cluster.actor_num_nodes * cfg.cluster.actor_num_gpus_per_node
    if gbs % world != 0:
        raise ConfigError(f"--global-batch-size {gbs} must be divisible by the number of training ranks "
                          f"{world} (--actor-num-nodes x --actor-num-gpus-per-node)")
    if a.use_kl_loss and a.kl_coef != 0:
        raise ConfigError("--use-kl-loss and --kl-coef are both set: use the KL loss (--use-kl-loss "
                          "--kl-loss-coef) or the KL reward penalty (--kl-coef), not both (as in slime)")
    if a.kl_loss_coef != 0 and not a.use_kl_loss:
        raise ConfigError(f"--kl-loss-coef {a.kl_loss_coef} has no effect without --use-kl-loss; add --use-kl-loss")
    if a.loss_agg_mode is None:
        setv(a, "loss_agg_mode", "token-mean" if a.calculate_per_token_loss else "seq-mean-token-mean")
    elif a.calculate_per_token_loss and a.loss_agg_mode != "token-mean":
        raise ConfigError(f"--calculate-per-token-loss means --loss-agg-mode token-mean, "
                          f"but --loss-agg-mode {a.loss_agg_mode} was given; drop one")
    if a.eps_clip_high is None:
        setv(a, "eps_clip_high", a.eps_clip)
    if a.eps_clip_c is not None and a.eps_clip_c <= 1:
        raise ConfigError(f"--eps-clip-c must be > 1 (dual clip), got {a.eps_clip_c}")
    if a.use_tis and a.use_rollout_logprobs:
        raise ConfigError("--use-tis corrects old log-probs toward the rollout's; with "
                          "--use-rollout-logprobs they are the same: drop one")
    if a.critic_lr is None:
        setv(a, "critic_lr", t.lr)
    if cfg.data.prompt_data is None:
        raise ConfigError("--prompt-data is required: a .jsonl or .parquet file of prompts "
                          "(e.g. examples/math_grpo/train.jsonl)")
    if cfg.checkpoint.hf_checkpoint is None:
        raise ConfigError("--hf-checkpoint is required: a local HF model folder, or "
                          "'smollm2-135m-instruct' (fetched once into the cache)")
    if cfg.eval.eval_prompt_data and len(cfg.eval.eval_prompt_data) % 2:
        raise ConfigError("--eval-prompt-data takes NAME PATH pairs, got an odd number of values: "
                          f"{cfg.eval.eval_prompt_data}")
    osbs = r.over_sampling_batch_size
    if osbs is not None and osbs < 1:
        raise ConfigError(f"--over-sampling-batch-size must be >= 1, got {osbs}")
    if cfg.train.use_dynamic_batch_size and not cfg.train.max_tokens_per_gpu:
        raise ConfigError("--use-dynamic-batch-size needs --max-tokens-per-gpu N (tokens per micro-batch)")
    if t.train_backend == "torch":  # Megatron parallelism flags that the torch backend would ignore
        for flag in ("tensor-model-parallel-size", "pipeline-model-parallel-size", "context-parallel-size",
                     "expert-model-parallel-size"):
            v = (getattr(ns, "megatron_args", None) or {}).get(flag)
            try:
                size = int(v) if v is not None else 1
            except (TypeError, ValueError):
                raise ConfigError(f"--{flag} takes one integer, got {v!r}") from None
            if size > 1:  # a warning, not an error: slime scripts carry these in MODEL_ARGS / PERF_ARGS
                logging.getLogger("slime_ray.args").warning(
                    "--%s %d has no effect with --train-backend torch (no model parallelism: FSDP2 shards "
                    "every layer over the data-parallel ranks); add --train-backend megatron for it", flag, size)
    elif t.train_compile == "true":
        raise ConfigError("--train-compile true applies to --train-backend torch (the Megatron backend runs its "
                          "own layers, not compiled); drop --train-compile")
    if cfg.sync.update_weights_interval < 1:
        raise ConfigError(f"--update-weights-interval must be >= 1, got {cfg.sync.update_weights_interval}")
    _validate_checkpoint_ft(cfg)
    if cfg.cluster.offload:
        setv(cfg.cluster, "offload_train", True)
        setv(cfg.cluster, "offload_rollout", True)
    if cfg.cluster.torch_num_threads is None:
        setv(cfg.cluster, "torch_num_threads", os.cpu_count() or 1)


def _validate_checkpoint_ft(cfg: Config) -> None:
    """Checkpoint and fault-tolerance flags (see :func:`validate`)."""
    c, ft = cfg.checkpoint, cfg.fault_tolerance
    if c.save_interval is not None and c.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1, got {c.save_interval}")
    if c.save_hf and not c.save:
        raise ConfigError("--save-hf exports at each save: add --save DIR (and --save-interval N)")
    if ft.use_fault_tolerance and (ft.rollout_health_check_interval <= 0 or ft.rollout_health_check_timeout <= 0):
        raise ConfigError("--rollout-health-check-interval and --rollout-health-check-timeout must be > 0 seconds, "
                          f"got {ft.rollout_health_check_interval} and {ft.rollout_health_check_timeout}")
    if ft.max_train_restarts < 0:
        raise ConfigError(f"--max-train-restarts must be >= 0, got {ft.max_train_restarts}")


def config_to_params(ns: argparse.Namespace) -> dict[str, Any]:
    """Every flag as a flat dict (for MLflow params)."""
    return {k: v for k, v in sorted(vars(ns).items())}
