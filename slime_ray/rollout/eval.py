"""Evaluation on held-out prompt sets (slime's ``--eval-prompt-data NAME PATH ...``).

Every prompt of every set is sampled ``--n-samples-per-eval-prompt`` times with the eval
sampling flags (``--eval-temperature``, ``--eval-top-p``, ``--eval-max-response-len``; each
defaults to its ``--rollout-*`` twin), through the job's generate function (called with
``evaluation=True`` when it accepts it) and reward. No dynamic filter, no abort.

Metrics per set ``<name>`` (logged as ``eval/<name>/...``): ``reward_mean``, ``pass_at_1`` and
``pass_at_<k>`` (pass@k; MLflow keys cannot hold ``@``) for k = 2, 4, 8, ... up to n and k = n
(unbiased estimator of Chen et al. 2021, arXiv:2107.03374, averaged over prompts), ``truncated_ratio``, ``response_len/mean``. A sample
counts as correct when its reward is > 0 (as ``rollout/accuracy``).

Schedule (slime's ``train.py``): at step 0 before training unless ``--skip-eval-before-train``,
then after every ``--eval-interval``-th training step. Departure: the step an eval is logged
at is the number of training steps its weights have seen (0, then ``rollout_id + 1``), so the
step-0 eval and the eval after the first step never share a step.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from slime_ray.rollout.rewards import reward_value
from slime_ray.types import Sample, SampleStatus


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, eq. 1).

    Args:
        n: samples drawn for the prompt; c: how many were correct; k: budget, ``1 <= k <= n``.

    Raises:
        ValueError: ``k`` outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, 2, 4, ... <= n, and n."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks + ([n] if ks[-1] != n else [])


def parse_eval_sets(pairs: list[str] | None) -> list[tuple[str, str]]:
    """``[NAME, PATH, NAME, PATH, ...]`` -> ``[(NAME, PATH), ...]``.

    Raises:
        ValueError: an odd number of values or a repeated name.
    """
    pairs = list(pairs or [])
    if len(pairs) % 2:
        raise ValueError(f"--eval-prompt-data takes NAME PATH pairs, got {pairs}")
    sets = list(zip(pairs[0::2], pairs[1::2]))
    names = [n for n, _ in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"--eval-prompt-data: repeated set name in {names}")
    return sets


def dataset_metrics(args: Any, name: str, groups: list[list[Sample]]) -> dict[str, float]:
    """``eval/<name>/...`` metrics of scored groups (one group per prompt)."""
    flat = [s for g in groups for s in g]
    n_all = max(len(flat), 1)
    rewards = [0.0 if s.status == SampleStatus.FAILED else reward_value(args, s) for s in flat]
    out = {f"eval/{name}/reward_mean": sum(rewards) / n_all,
           f"eval/{name}/truncated_ratio": sum(s.status == SampleStatus.TRUNCATED for s in flat) / n_all,
           f"eval/{name}/response_len/mean": sum(s.response_length for s in flat) / n_all}
    n = min(len(g) for g in groups) if groups else 0
    if n:
        correct = [sum(1 for s in g[:n] if s.status != SampleStatus.FAILED and reward_value(args, s) > 0)
                   for g in groups]
        for k in pass_ks(n):
            out[f"eval/{name}/pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(groups)
    return out


class Evaluator:
    """Holds the eval sets and runs them (see the module docstring).

    Args:
        args: flat namespace (eval flags, reward flags, ``hf_checkpoint``).
        sets: ``{name: prompt rows}`` as returned by :func:`slime_ray.data.dataset.load_prompt_data`.
    """

    def __init__(self, args: Any, sets: dict[str, list[dict]]):
        self.args, self.sets = args, sets

    @classmethod
    def from_args(cls, args: Any, tokenizer: Any = None) -> "Evaluator | None":
        """Load every ``--eval-prompt-data`` set (checked before any resource); None if none."""
        sets = parse_eval_sets(getattr(args, "eval_prompt_data", None))
        if not sets:
            return None
        from slime_ray.data.dataset import load_prompt_data
        from slime_ray.rollout.multi_turn import get_tokenizer

        tokenizer = tokenizer or get_tokenizer(args)
        from slime_ray.data.dataset import DataError

        loaded = {}
        for name, path in sets:
            try:
                loaded[name] = load_prompt_data(
                    path, input_key=args.input_key, label_key=args.label_key, metadata_key=args.metadata_key,
                    apply_chat_template=args.apply_chat_template, tokenizer=tokenizer,
                    system_prompt=getattr(args, "system_prompt", None))
            except DataError as err:  # name the flag the user actually passed
                raise DataError(str(err).replace("--prompt-data", f"--eval-prompt-data {name}", 1)) from None
        return cls(args, loaded)

    def due(self, rollout_id: int) -> bool:
        """Evaluate after training step ``rollout_id`` (every ``--eval-interval`` steps)?"""
        interval = getattr(self.args, "eval_interval", None)
        return bool(interval) and (rollout_id + 1) % interval == 0

    def _groups(self, rows: list[dict]) -> list[list[Sample]]:
        n = int(getattr(self.args, "n_samples_per_eval_prompt", 1) or 1)
        return [[Sample(index=i * n + j, group_index=i, prompt=r["prompt"], label=r.get("label"),
                        metadata=dict(r.get("metadata") or {}), tokens=list(r.get("prompt_ids") or []))
                 for j in range(n)] for i, r in enumerate(rows)]

    async def evaluate(self, group_generate: Any) -> dict[str, float]:
        """Generate and score every set; returns the ``eval/<name>/...`` metrics of all sets.

        Args:
            group_generate: ``async (args, group, params, evaluation)`` (the rollout manager's).
        """
        from slime_ray.rollout.manager import sampling_params_from_args
        from slime_ray.rollout.rollout_loop import score_group

        params = sampling_params_from_args(self.args, evaluation=True)

        async def one(group: list[Sample]) -> list[Sample]:
            group = await group_generate(self.args, group, params, True)
            await score_group(self.args, group)
            return group

        metrics: dict[str, float] = {}
        for name, rows in self.sets.items():
            groups = list(await asyncio.gather(*(one(g) for g in self._groups(rows))))
            metrics.update(dataset_metrics(self.args, name, groups))
        return metrics
