"""Dynamic-sampling filters (slime's ``--dynamic-sampling-filter-path``).

A filter sees one finished, scored group and says whether the step keeps it::

    def my_filter(args, group: list[Sample], **kwargs) -> DynamicFilterOutput | bool

Returning a bare bool is accepted (slime's older contract). A dropped group is counted in
``rollout/dynamic_filter/drop_<reason>`` and replaced by over-sampling (see
:mod:`slime_ray.rollout.rollout_loop`). Source: slime ``slime/rollout/filter_hub/``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from slime_ray.types import Sample


@dataclass
class DynamicFilterOutput:
    """Verdict of a dynamic-sampling filter on one group.

    Attributes:
        keep: train on the group.
        reason: why it was dropped (a short metric-safe word, e.g. ``"zero_std"``).
    """

    keep: bool
    reason: str | None = None


def _reward_values(args: Any, group: list[Sample]) -> list[float]:
    from slime_ray.rollout.rewards import reward_value

    return [reward_value(args, s) for s in group]


def check_reward_nonzero_std(args: Any, group: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group only if its rewards are not all equal (population std > 1e-6).

    A group whose samples all score the same has GRPO advantage 0 everywhere and teaches
    nothing (DAPO's dynamic sampling, Yu et al. 2025, arXiv:2503.14476; slime's
    ``filter_hub/dynamic_sampling_filters.py``).
    """
    values = _reward_values(args, group)
    keep = len(values) > 1 and statistics.pstdev(values) > 1e-6
    return DynamicFilterOutput(keep=keep, reason=None if keep else "zero_std")


def apply_filter(fn: Callable | None, args: Any, group: list[Sample]) -> DynamicFilterOutput:
    """Call a filter and normalise its answer to :class:`DynamicFilterOutput`.

    Raises:
        TypeError: the filter returned something other than a bool or DynamicFilterOutput.
    """
    if fn is None:
        return DynamicFilterOutput(keep=True)
    out = fn(args, group)
    if isinstance(out, DynamicFilterOutput):
        return out
    if hasattr(out, "keep"):  # a user's own dataclass with the same fields
        return DynamicFilterOutput(keep=bool(out.keep), reason=getattr(out, "reason", None))
    if isinstance(out, bool):
        return DynamicFilterOutput(keep=out, reason=None if out else "filtered")
    raise TypeError(f"--dynamic-sampling-filter-path returned {type(out).__name__}; "
                    f"return DynamicFilterOutput(keep, reason) or a bool")
