"""One rollout step: over-sampling, dynamic filtering, abort and partial rollout (slime's loop).

Groups are generated and scored concurrently. While ``kept + in_flight < rollout_batch_size``
another ``--over-sampling-batch-size`` groups are taken from the data source. Each finished
group goes through the ``--dynamic-sampling-filter-path`` filter; a dropped group no longer
counts, so over-sampling replaces it. Once ``rollout_batch_size`` groups are kept, the groups
still in flight are aborted on every engine (``EngineClient.abort_async``, repeated every
``ABORT_POLL_S`` seconds until all requests returned). With ``--partial-rollout`` those groups
go back to the data source (``add_samples``) with their tokens, log-probs and weight versions;
a later step resumes each unfinished sample from its stored tokens (the default generate asks
for ``max_response_len - response_length`` more tokens), so a resumed sample records every
weight version that produced part of it. Without it they are discarded.
Source: slime ``slime/rollout/sglang_rollout.py::generate_rollout_async`` and ``abort``.

Metrics (``rollout/...``): ``generated_groups``, ``dynamic_filter/kept``,
``dynamic_filter/drop_<reason>``, ``aborted_samples``, ``resumed_samples``,
``returned_groups`` (to the buffer), ``surplus_groups`` (finished but not needed, discarded).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from slime_ray.rollout.custom_generate import GroupFn
from slime_ray.rollout.filters import apply_filter
from slime_ray.rollout.rewards import compute_rewards
from slime_ray.types import Sample, SampleStatus

logger = logging.getLogger(__name__)

ABORT_POLL_S = 0.2
UNFINISHED = (SampleStatus.ABORTED, SampleStatus.PENDING)


@dataclass
class LoopStats:
    """Counters of one rollout step (see the module docstring for the metric names)."""

    generated_groups: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    aborted_samples: int = 0
    resumed_samples: int = 0
    returned_groups: int = 0
    surplus_groups: int = 0
    failed_samples: int = 0

    def metrics(self) -> dict[str, float]:
        out = {"rollout/generated_groups": float(self.generated_groups),
               "rollout/dynamic_filter/kept": float(self.kept),
               "rollout/aborted_samples": float(self.aborted_samples),
               "rollout/resumed_samples": float(self.resumed_samples),
               "rollout/returned_groups": float(self.returned_groups),
               "rollout/surplus_groups": float(self.surplus_groups)}
        out.update({f"rollout/dynamic_filter/drop_{r}": float(n) for r, n in self.dropped.items()})
        return out


def is_unfinished(group: list[Sample]) -> bool:
    """A group with an aborted (or never generated) sample."""
    return any(s.status in UNFINISHED for s in group)


async def score_group(args: Any, group: list[Sample]) -> int:
    """Reward the samples of a finished group that have none yet; returns how many failed.

    Samples whose generate function already set ``reward`` are not scored again; with
    ``--group-rm`` the whole group is scored together when any sample lacks a reward.
    """
    todo = [s for s in group if s.reward is None and s.status != SampleStatus.FAILED]
    if getattr(args, "group_rm", False) and todo:
        todo = list(group)
    if not todo:
        return 0
    return (await compute_rewards(args, todo)).num_failed


def load_filter(args: Any) -> Callable | None:
    """The ``--dynamic-sampling-filter-path`` function, or None."""
    path = getattr(args, "dynamic_sampling_filter_path", None)
    if not path:
        return None
    from slime_ray.plugins import load_function

    return load_function(path, flag="--dynamic-sampling-filter-path", expected_params=["args", "group"])


class GroupNormalizer:
    """Turn what a data source returns into groups of ``n_samples_per_prompt`` Samples.

    Accepts slime's ``list[list[Sample]]``, or a flat list of Samples / prompt dicts (each one
    prompt, copied ``n`` times with fresh ``index``/``group_index``), and tokenizes prompts that
    come without ``tokens`` (chat messages through the chat template).
    """

    def __init__(self, args: Any, start_index: int = 10**9):
        self.args, self.next_index, self.next_group = args, start_index, start_index

    def _tokens(self, sample: Sample) -> None:
        if sample.tokens:
            return
        from slime_ray.rollout.multi_turn import encode_text, get_tokenizer

        prompt = sample.prompt
        if not isinstance(prompt, str):
            prompt = get_tokenizer(self.args).apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        sample.tokens = encode_text(self.args, prompt)

    def _expand(self, item: Any) -> list[Sample]:
        proto = item if isinstance(item, Sample) else Sample(
            prompt=item["prompt"], label=item.get("label"), metadata=dict(item.get("metadata") or {}),
            tokens=list(item.get("prompt_ids") or []))
        self._tokens(proto)  # once per group, not once per sample
        group = []
        for _ in range(int(self.args.n_samples_per_prompt)):
            s = copy.deepcopy(proto)
            s.index, s.group_index = self.next_index, self.next_group
            self.next_index += 1
            group.append(s)
        self.next_group += 1
        return group

    def __call__(self, items: list[Any]) -> list[list[Sample]]:
        groups = [list(it) if isinstance(it, (list, tuple)) else self._expand(it) for it in items or []]
        for g in groups:
            for s in g:
                self._tokens(s)
        return groups


class RolloutLoop:
    """Generates one step's ``rollout_batch_size`` kept groups (see the module docstring).

    Args:
        args: flat namespace (``rollout_batch_size``, ``over_sampling_batch_size``,
            ``partial_rollout``, ``dynamic_sampling_filter_path``, reward flags).
        data_source: ``get_samples(n)`` and ``add_samples(groups)`` (slime's shape).
        client: engine client with ``abort_async()``.
        group_generate: from :func:`slime_ray.rollout.custom_generate.make_group_generate`.
    """

    def __init__(self, args: Any, data_source: Any, client: Any, group_generate: GroupFn):
        self.args, self.data_source, self.client = args, data_source, client
        self.group_generate = group_generate
        self.filter_fn = load_filter(args)
        self.normalize = GroupNormalizer(args)
        self._seq = itertools.count()
        self._order: dict[asyncio.Future, int] = {}  # task -> submission number

    def _in_order(self, done: set) -> list:
        """Tasks that finished together, in the order they were submitted (``asyncio.wait``
        returns a set: without this, the training table's row order, and so the float sums
        of the update, would depend on task hashes)."""
        return sorted(done, key=lambda t: self._order.pop(t, 0))

    async def _run_group(self, group: list[Sample], params: dict) -> tuple[list[Sample], int]:
        group = await self.group_generate(self.args, group, params, False)
        if is_unfinished(group):
            return group, 0
        return group, await score_group(self.args, group)

    def _submit(self, params: dict, stats: LoopStats, pending: set) -> int:
        n = getattr(self.args, "over_sampling_batch_size", None) or self.args.rollout_batch_size
        groups = self.normalize(self.data_source.get_samples(n))
        if not groups:
            raise RuntimeError("the data source returned no groups (get_samples gave an empty list)")
        for g in groups:
            stats.resumed_samples += sum(1 for s in g if s.response_length > 0 and s.status in UNFINISHED)
            task = asyncio.ensure_future(self._run_group(g, params))
            self._order[task] = next(self._seq)
            pending.add(task)
        stats.generated_groups += len(groups)
        return len(groups)

    async def generate(self, rollout_id: int, params: dict) -> tuple[list[list[Sample]], LoopStats]:
        """Run the loop; returns ``rollout_batch_size`` kept, scored groups and the counters.

        Raises:
            RuntimeError: the filter dropped ``max(64, 16 x rollout_batch_size)`` groups in a
                row (a reward that never varies would otherwise loop for ever).
        """
        target, stats = self.args.rollout_batch_size, LoopStats()
        kept: list[list[Sample]] = []
        pending: set = set()
        in_play, drops_in_row, max_drops = 0, 0, max(64, 16 * target)
        try:
            while len(kept) < target:
                while in_play < target:
                    in_play += self._submit(params, stats, pending)
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in self._in_order(done):
                    group, n_failed = task.result()
                    stats.failed_samples += n_failed
                    verdict = self._verdict(group, rollout_id, stats)
                    if verdict is None:
                        in_play -= 1
                        drops_in_row += 1
                    elif len(kept) < target:
                        kept.append(group)
                        drops_in_row = 0
                    else:
                        stats.surplus_groups += 1
                if drops_in_row >= max_drops:
                    raise RuntimeError(f"dynamic sampling dropped {drops_in_row} groups in a row "
                                       f"({dict(stats.dropped)}); check the reward function and "
                                       f"--dynamic-sampling-filter-path")
        finally:
            await self._abort_and_drain(pending, rollout_id, stats)
        stats.kept = len(kept)
        return kept, stats

    def _verdict(self, group: list[Sample], rollout_id: int, stats: LoopStats) -> bool | None:
        """True when the group is kept; None when it is dropped (filtered or unfinished)."""
        if is_unfinished(group):
            stats.aborted_samples += sum(s.status in UNFINISHED for s in group)
            self._return_to_buffer([group], rollout_id, stats)
            return None
        out = apply_filter(self.filter_fn, self.args, group)
        if not out.keep:
            stats.dropped[out.reason or "filtered"] += 1
            return None
        return True

    def _return_to_buffer(self, groups: list[list[Sample]], rollout_id: int, stats: LoopStats) -> None:
        if not getattr(self.args, "partial_rollout", False) or not groups:
            return
        for g in groups:
            for s in g:
                if s.response_length and "start_rollout_id" not in s.metadata:
                    s.metadata["start_rollout_id"] = rollout_id
        self.data_source.add_samples(groups)
        stats.returned_groups += len(groups)

    async def _abort_and_drain(self, pending: set, rollout_id: int, stats: LoopStats) -> None:
        """Abort the in-flight groups until all returned; keep their partial work if asked."""
        drained: list[list[Sample]] = []
        while pending:
            await self._abort_engines()
            done, pending = await asyncio.wait(pending, timeout=ABORT_POLL_S)
            for task in self._in_order(done):
                if task.exception() is not None:
                    logger.warning("a group failed while aborting: %r", task.exception())
                    continue
                group, _ = task.result()
                stats.aborted_samples += sum(s.status in UNFINISHED for s in group)
                if not is_unfinished(group):
                    stats.surplus_groups += 1
                drained.append(group)
        self._return_to_buffer(drained, rollout_id, stats)

    async def _abort_engines(self) -> None:
        abort = getattr(self.client, "abort_async", None)
        if abort is not None:
            await abort()
        elif hasattr(self.client, "abort"):
            out = self.client.abort()
            if inspect.isawaitable(out):
                await out
