"""The rollout manager: prompts -> engine requests -> Samples -> rewards -> a training table.

A plain class driven by the job's driver. It talks to the engines only through an
:class:`~slime_ray.rollout.engine_client.EngineClient` (Serve DeploymentHandles), so it never
asks which engine it has. User hooks keep slime's signatures:
``--custom-generate-function-path``: ``async def generate(args, sample, sampling_params) -> Sample``
(or the batch form ``async def custom_generate(args, samples, evaluation=False)``, see
:mod:`slime_ray.rollout.custom_generate`). Generate functions reach the engines with
:func:`get_engine_client` or :func:`slime_ray.rollout.multi_turn.engine_generate`.
"""

from __future__ import annotations

import math
import time
from argparse import Namespace
from typing import Any, Awaitable, Callable

import pyarrow as pa
import torch

from slime_ray.engines.base import default_sampling_params
from slime_ray.rollout.rewards import reward_value
from slime_ray.train import algorithms as algo
from slime_ray.types import Sample, SampleStatus, samples_to_arrow

GenerateFn = Callable[[Namespace, Sample, dict], Awaitable["Sample | list[Sample]"]]

# The engine client of this process, for generate functions that call the engine (slime's
# generate functions reach SGLang through the router URL in args; ours through this client).
_CLIENT: Any = None


def get_engine_client() -> Any:
    """The :class:`EngineClient` of the running job (set by :class:`RolloutManager`)."""
    if _CLIENT is None:
        raise RuntimeError("no engine client: generate functions run inside a RolloutManager")
    return _CLIENT


def sampling_params_from_args(args: Namespace, evaluation: bool = False) -> dict[str, Any]:
    """SGLang-style sampling params from the ``--rollout-*`` (or ``--eval-*``) flags."""
    temp, top_p = args.rollout_temperature, args.rollout_top_p
    max_new = args.rollout_max_response_len
    if evaluation:
        temp = args.eval_temperature if args.eval_temperature is not None else temp
        max_new = args.eval_max_response_len or max_new
        top_p = getattr(args, "eval_top_p", None) or top_p
    return default_sampling_params(
        temperature=temp, top_p=top_p, top_k=args.rollout_top_k, max_new_tokens=max_new,
        stop=args.rollout_stop, stop_token_ids=args.rollout_stop_token_ids)


async def generate(args: Namespace, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """The default generate function (slime's signature): one engine call for one sample.

    Fills ``tokens`` (prompt + response ids as the engine returned them), ``response``,
    ``response_length``, ``rollout_log_probs``, ``loss_mask`` (all ones: the engine stops
    after the first EOS, which is trained on), ``status`` and ``weight_versions``.
    A sample holding part of a response (an aborted partial rollout taken back from the buffer)
    resumes from its stored tokens with ``max_new_tokens`` reduced by what it already has.
    """
    from slime_ray.rollout.multi_turn import append_engine_output, engine_generate

    params = dict(sampling_params)
    if sample.response_length:
        params["max_new_tokens"] = int(params.get("max_new_tokens") or 0) - sample.response_length
        if params["max_new_tokens"] <= 0:
            sample.status = SampleStatus.TRUNCATED
            return sample
    if getattr(args, "deterministic_rollout", False):  # same sample index -> same response, also after resume
        params["seed"] = int(args.rollout_seed) * 1_000_003 + sample.index
    out = await engine_generate(args, sample.tokens, params, session_id=sample.session_id)
    append_engine_output(sample, out)
    return sample


class RolloutManager:
    """Generates one rollout step: ``rollout_batch_size`` groups of ``n_samples_per_prompt``.

    Args:
        args: flat namespace of :func:`slime_ray.args.parse_args`.
        data_source: object with ``get_samples(n) -> list[list[Sample]]`` (slime's shape).
        client: the engine client (Serve handles).
        generate_fn: a custom generate function (``--custom-generate-function-path``), or None.
    """

    def __init__(self, args: Namespace, data_source: Any, client: Any, generate_fn: GenerateFn | None = None):
        global _CLIENT
        from slime_ray.rollout.custom_generate import load_group_generate, make_group_generate
        from slime_ray.rollout.rollout_loop import RolloutLoop

        self.args, self.data_source, self.client = args, data_source, client
        self.group_generate = make_group_generate(generate_fn) if generate_fn else load_group_generate(args)
        self.loop = RolloutLoop(args, data_source, client, self.group_generate)
        _CLIENT = client

    async def generate_rollout(self, rollout_id: int) -> tuple[list[list[Sample]], dict[str, float]]:
        """Generate and score one rollout step.

        Over-sampling, dynamic filtering, abort and partial rollout happen in
        :class:`~slime_ray.rollout.rollout_loop.RolloutLoop`; groups go back to the data source
        (``add_samples``) only when ``--partial-rollout`` returns unfinished work (slime).

        Returns:
            (groups, metrics): ``rollout_batch_size`` groups of scored Samples, and
            ``rollout/*`` / ``perf/*`` metrics (reward mean, accuracy, response lengths,
            truncated ratio, rollout time in seconds, response tokens per second, and the
            loop's kept / dropped / aborted / resumed counters).
        """
        t0 = time.perf_counter()
        confirm = getattr(self.client, "confirm_version", None)
        if confirm is not None:  # the ingress holds the version of the last sync (see EngineClient)
            await confirm()
        groups, stats = await self.loop.generate(rollout_id, sampling_params_from_args(self.args))
        flat = [s for g in groups for s in g]
        elapsed = time.perf_counter() - t0
        return groups, {**rollout_metrics(self.args, flat, elapsed, stats.failed_samples), **stats.metrics()}


def _train_value(args: Namespace, sample: Sample) -> float:
    """The float reward trained on; failed samples and non-finite values count as 0."""
    if sample.status == SampleStatus.FAILED:
        return 0.0
    r = reward_value(args, sample)
    return r if math.isfinite(r) else 0.0


def rollout_metrics(args: Namespace, samples: list[Sample], elapsed_s: float, n_failed: int = 0) -> dict[str, float]:
    """Metrics of a scored rollout (see :meth:`RolloutManager.generate_rollout`)."""
    rewards = [_train_value(args, s) for s in samples]
    lens = [s.response_length for s in samples]
    n = max(len(samples), 1)
    return {
        "rollout/reward_mean": sum(rewards) / n,
        "rollout/accuracy": sum(r > 0 for r in rewards) / n,
        "rollout/response_len/mean": sum(lens) / n,
        "rollout/response_len/max": float(max(lens, default=0)),
        "rollout/truncated_ratio": sum(s.status == SampleStatus.TRUNCATED for s in samples) / n,
        "rollout/failed": float(n_failed),
        "perf/rollout_time": elapsed_s,
        "perf/rollout_tokens_per_s": sum(lens) / max(elapsed_s, 1e-9),
    }


def build_train_table(args: Namespace, groups: list[list[Sample]]) -> tuple[pa.Table, dict[str, float]]:
    """The training table of a rollout: samples + ``raw_reward`` + ``train_reward`` columns.

    ``train_reward`` is the reward after per-group normalisation for the chosen
    ``--advantage-estimator`` (``algorithms.normalize_rewards``); failed samples get reward 0 and
    an all-zero loss mask (never trained on).

    Returns:
        (table, metrics) with ``rollout/zero_std_groups``: groups whose rewards are all equal.
    """
    flat = [s for g in groups for s in g]
    for s in flat:
        if s.status == SampleStatus.FAILED:
            s.loss_mask = [0] * s.response_length
    raw = torch.tensor([_train_value(args, s) for s in flat], dtype=torch.float32)
    gid = torch.tensor([s.group_index for s in flat], dtype=torch.long)
    train = algo.normalize_rewards(raw, gid, args.advantage_estimator,
                                   std_normalize=not args.disable_grpo_std_normalization)
    table = samples_to_arrow(flat)
    table = table.append_column("raw_reward", pa.array(raw.tolist(), pa.float32()))
    table = table.append_column("train_reward", pa.array(train.tolist(), pa.float32()))
    zero_std = sum(1 for g in groups if len(g) > 1 and len({_train_value(args, s) for s in g}) == 1)
    total_tokens = float(sum(len(s.tokens) for s in flat))
    return table, {"rollout/zero_std_groups": float(zero_std), "rollout/total_tokens": total_tokens}
