"""Load ``--custom-generate-function-path`` and run any of its accepted forms on a group.

Accepted forms (told apart by signature):

* slime's per-sample form ``async def generate(args, sample, sampling_params[, evaluation])
  -> Sample | list[Sample]`` (the parameter named ``sampling_params`` marks it);
* a batch form ``async def custom_generate(args, samples, evaluation=False) -> list[Sample]``
  that fills ``sample.response`` (and optionally ``sample.reward``) for a list of samples.

Samples that come back with a reward are not scored again (the reward model is skipped for
them). A batch-form function usually fills only the response *text*, so there are no engine
ids and log-probs to train on; for those samples (``response_length == 0`` and a non-empty
response) the text is tokenized once after the prompt tokens (:func:`retokenize_response`)
and the sample is marked ``metadata["retokenized"] = True`` with ``rollout_log_probs`` of
0.0: the trainer recomputes the old policy's log-probs itself, so the PPO ratio is exact, but
the ids may differ from what the engine sampled (decode + encode is not the identity), so the
tokens are slightly off-policy and ``--use-rollout-logprobs`` / ``--use-tis`` cannot use them
(the rollout loop refuses that combination). No EOS is appended (whether the engine stopped
or was cut off is unknown). Functions that build tokens themselves
(:mod:`slime_ray.rollout.multi_turn`) keep the exact engine ids.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

from slime_ray.types import Sample, SampleStatus

GroupFn = Callable[[Any, list[Sample], dict, bool], Awaitable[list[Sample]]]


def check_generate_signature(fn: Callable, spec: str) -> None:
    """Refuse a generate function that has neither supported shape.

    Per-sample (slime): ``async def generate(args, sample, sampling_params[, evaluation])``;
    batch (the seed's): ``async def custom_generate(args, samples, evaluation=False)``.

    Raises:
        slime_ray.plugins.PluginError: naming the flag, the file and both accepted signatures.
    """
    from slime_ray.plugins import PluginError

    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    batch = len(names) >= 2 and (names[1] == "samples" or "evaluation" in names) and "sampling_params" not in names
    per_sample = len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)
    if not (batch or per_sample):
        raise PluginError(
            f"--custom-generate-function-path {spec}: {getattr(fn, '__name__', fn)}{inspect.signature(fn)} has "
            f"neither accepted signature: per sample `async def generate(args, sample, sampling_params)` or "
            f"batch `async def custom_generate(args, samples, evaluation=False)`")


def check_generate_output(out: Any, spec: str) -> None:
    """A generate function must return a Sample or a list of Samples.

    Raises:
        slime_ray.plugins.PluginError: naming the flag and what came back.
    """
    from slime_ray.plugins import PluginError

    items = out if isinstance(out, list) else [out]
    if not items or not all(isinstance(x, Sample) for x in items):
        raise PluginError(
            f"--custom-generate-function-path {spec}: returned {type(out).__name__} ({out!r:.80}); it must "
            f"return the Sample (per-sample form), a list of Samples, or fill and return the samples (batch form)")


def is_batch_form(fn: Callable) -> bool:
    """True for ``(args, samples, evaluation=False)``; False for ``(args, sample, sampling_params)``."""
    params = list(inspect.signature(fn).parameters.values())
    names = [p.name for p in params]
    if "sampling_params" in names:
        return False
    if len(names) >= 2 and names[1] == "samples":
        return True
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 2


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def retokenize_response(args: Any, sample: Sample) -> None:
    """Give a text-only response token ids: prompt ids + ``encode(response)`` (see module doc)."""
    from slime_ray.rollout.multi_turn import encode_text

    ids = encode_text(args, sample.response) if sample.response else []
    text = sample.response
    sample.response = ""
    sample.append_response_tokens(ids, [0.0] * len(ids), trainable=True, text=text)
    sample.metadata = {**(sample.metadata or {}), "retokenized": True}
    if sample.status == SampleStatus.PENDING:
        sample.status = SampleStatus.COMPLETED


def _flatten(results: list[Any]) -> list[Sample]:
    out: list[Sample] = []
    for r in results:
        out.extend(r if isinstance(r, list) else [r])
    return out


def make_group_generate(fn: Callable) -> GroupFn:
    """Wrap a per-sample or batch generate function into ``async (args, group, params, evaluation)``.

    The per-sample form runs concurrently over the group; the batch form gets the whole group
    in one call. Samples already finished (COMPLETED / TRUNCATED, e.g. the done part of a
    partially rolled-out group taken back from the buffer) are not generated again.
    """
    import asyncio

    batch = is_batch_form(fn)
    pass_eval = _accepts(fn, "evaluation")
    spec = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__name__', fn)}"

    async def run(args: Any, group: list[Sample], params: dict, evaluation: bool = False) -> list[Sample]:
        todo = [s for s in group if s.status not in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED)]
        todo_ids = {id(s) for s in todo}
        done = [s for s in group if id(s) not in todo_ids]
        if not todo:
            return group
        if batch:
            out = await (fn(args, todo, evaluation=evaluation) if pass_eval else fn(args, todo))
            out = _flatten([out if out is not None else todo])
            check_generate_output(out, spec)
            for s in out:
                if s.response_length == 0 and s.response:
                    retokenize_response(args, s)
            if all(s.response_length == 0 and not s.response for s in out):
                from slime_ray.plugins import PluginError

                raise PluginError(f"--custom-generate-function-path {spec}: the batch form returned samples with "
                                  f"no response; set sample.response (text) or append tokens to each sample")
        else:
            kw = {"evaluation": evaluation} if pass_eval and evaluation else {}
            results = list(await asyncio.gather(*(fn(args, s, dict(params), **kw) for s in todo)))
            for r in results:
                check_generate_output(r, spec)
            out = _flatten(results)
        return done + out

    return run


def load_group_generate(args: Any) -> GroupFn:
    """The group generate of ``args.custom_generate_function_path``, or of the default generate."""
    path = getattr(args, "custom_generate_function_path", None)
    if not path:
        from slime_ray.rollout.manager import generate

        return make_group_generate(generate)
    from slime_ray.plugins import load_function

    fn = load_function(path, flag="--custom-generate-function-path",
                       default_names=("generate", "custom_generate"))
    return make_group_generate(fn)
