"""The reward hub: built-in verifiers and user reward functions, behind one call.

Selection (slime's flags and attribute names):

- ``args.custom_rm_path`` (``--custom-rm-path``), if set, wins. Three forms:
    (a) per sample: ``[async] def reward(args, sample) -> float | dict``;
    (b) with ``args.group_rm`` (``--group-rm``): ``[async] def reward(args, samples) -> list``;
    (c) a class ``CustomRewardModel(model_path)`` with
        ``compute_reward(prompts, responses) -> list[float]`` (sync or async). It is built
        once per process (cached by path and model path); ``model_path`` is
        ``args.rm_model_path`` or else ``args.hf_checkpoint``.
- otherwise ``args.rm_type`` (``--rm-type``; a sample's ``metadata["rm_type"]`` overrides it):
    ``math``        math-verify equivalence of the answer (last ``\\boxed{}``, else the last
                    number in the text) with the label: 1.0 / 0.0;
    ``boxed_<t>``   rm type ``<t>`` applied to the last ``\\boxed{}`` content only (no box
                    gives 0.0), e.g. ``boxed_math``, ``boxed_f1``;
    ``f1``          token-level F1 of the response against the label (SQuAD normalisation;
                    a list label takes the best);
    ``remote_rm``   POST ``{"prompt", "response", "label"}`` to ``args.rm_url``; the reply is
                    a number or ``{"reward": x}``;
    ``random``      0 or 1 at random (smoke tests).

Failures: a reward call that raises, times out (``args.rm_timeout`` seconds, default none)
or returns NaN/inf marks that sample ``SampleStatus.FAILED`` with reward 0.0; the error is
logged once with the sample index and the batch goes on. :func:`compute_rewards` returns a
:class:`RewardBatch` (a list) whose ``num_failed`` / ``failed_indices`` count them.

Dict rewards are stored whole on ``sample.reward``; :func:`reward_value` selects
``args.reward_key`` (``--reward-key``) for training.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread; off
the main thread (Ray async actors, executors) they are turned off and ``rm_timeout``
bounds the call instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import random
import re
import string
import threading
from collections import Counter, OrderedDict
from typing import Any, Awaitable, Callable

from slime_ray.plugins import PluginError, check_signature, load_function
from slime_ray.types import Sample, SampleStatus

logger = logging.getLogger(__name__)

__all__ = [
    "RewardBatch",
    "compute_rewards",
    "compute_reward",
    "reward_value",
    "math_reward",
    "boxed_math_reward",
    "f1_reward",
    "remote_reward",
    "extract_boxed",
    "last_number",
    "extract_answer",
    "load_custom_rm",
    "BUILTIN_RM_TYPES",
    "CUSTOM_RM_DEFAULT_NAMES",
]

CUSTOM_RM_FLAG = "--custom-rm-path"
CUSTOM_RM_DEFAULT_NAMES = (
    "reward",
    "custom_rm",
    "compute_reward",
    "reward_func",
    "reward_fn",
    "rm",
    "CustomRewardModel",
    "RewardModel",
)

Reward = float | dict[str, float]


class RewardBatch(list):
    """The rewards of a batch (``list[float | dict]``, same order as the samples).

    Attributes:
        num_failed: how many samples were marked FAILED (reward 0.0).
        failed_indices: their ``Sample.index`` values.
    """

    def __init__(self, rewards=(), failed_indices: list[int] | None = None):
        super().__init__(rewards)
        self.failed_indices: list[int] = list(failed_indices or [])

    @property
    def num_failed(self) -> int:
        return len(self.failed_indices)


class RewardFailure(Exception):
    """A reward call failed for one sample (message carries the cause)."""


# ----------------------------------------------------------------------------- extraction
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched.

    ``\\boxed 5`` (no braces) gives ``"5"``. Returns None when there is none.
    """
    if not text:
        return None
    found = None
    for m in _BOXED_RE.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        found = text[i + 1 : j]
                        break
                j += 1
        elif m.group(0)[-1].isspace():  # "\\boxed 5"
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                found = tok.group(0)
    return found.strip() if found is not None else None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (integers, decimals, ``1,000``, ``3/4``, negatives), commas removed."""
    if not text:
        return None
    nums = _NUMBER_RE.findall(text)
    return nums[-1].replace(",", "").replace(" ", "") if nums else None


def extract_answer(text: str, *, boxed_only: bool = False) -> str | None:
    """The answer in a response: the last ``\\boxed{}``, else (unless boxed_only) the last number."""
    boxed = extract_boxed(text)
    if boxed is not None or boxed_only:
        return boxed
    return last_number(text)


# ----------------------------------------------------------------------------- math
class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutWarning())


def _mv_timeout() -> int | None:
    """math-verify's signal-based timeout (s) in the main thread, None elsewhere."""
    return 5 if threading.current_thread() is threading.main_thread() else None


_PARSED: "OrderedDict[str, tuple]" = OrderedDict()  # text -> math-verify parse (least recently used first)
_PARSED_MAX = 4096
_PARSED_LOCK = threading.Lock()


def _mv_parse(text: str, timeout: int | None) -> list:
    """``math_verify.parse(text)``, cached by text: a group's samples share one label and short
    answers such as ``\\boxed{12}`` recur, and each parse runs the LaTeX grammar (~1 ms)."""
    with _PARSED_LOCK:
        hit = _PARSED.get(text)
        if hit is not None:
            _PARSED.move_to_end(text)
            return list(hit)
    from math_verify import parse

    out = parse(text, parsing_timeout=timeout)
    with _PARSED_LOCK:
        _PARSED[text] = tuple(out)
        while len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    return out


def _parse_label(label: Any, timeout: int | None) -> list:
    s = str(label).strip()
    if not s:
        return []
    if "\\boxed" in s or "$" in s:
        return _mv_parse(s, timeout)
    return _mv_parse(f"\\boxed{{{s}}}", timeout) or _mv_parse(s, timeout)


def _normalize_str(s: str) -> str:
    return re.sub(r"\s+", "", str(s)).strip("$.").lower()


def math_equal(answer: str, label: Any) -> bool:
    """Whether ``answer`` (an extracted answer string) equals ``label`` (math-verify, then string match)."""
    from math_verify import verify

    timeout = _mv_timeout()
    labels = label if isinstance(label, (list, tuple)) else [label]
    for lab in labels:
        if lab is None:
            continue
        gold = _parse_label(lab, timeout)
        pred = _mv_parse(f"\\boxed{{{answer}}}", timeout)
        if gold and pred and verify(gold, pred, timeout_seconds=timeout):
            return True
        if _normalize_str(answer) == _normalize_str(lab):
            return True
    return False


def math_reward(response: str, label: Any, *, boxed_only: bool = False) -> float:
    """1.0 if the response's answer equals the label (math-verify), else 0.0.

    The answer is the last ``\\boxed{}`` content, else (unless ``boxed_only``) the last
    number in the response. A list label accepts any of its entries.
    """
    answer = extract_answer(response or "", boxed_only=boxed_only)
    if answer is None or label is None:
        return 0.0
    return 1.0 if math_equal(answer, label) else 0.0


def boxed_math_reward(response: str, label: Any) -> float:
    """:func:`math_reward` where only a ``\\boxed{}`` answer counts."""
    return math_reward(response, label, boxed_only=True)


# ----------------------------------------------------------------------------- f1
def _normalize_answer(s: str) -> str:
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_reward(response: str, label: Any) -> float:
    """Token-level F1 between response and label after SQuAD normalisation (0..1).

    Lower-case, punctuation and articles removed, whitespace tokens. A list label gives
    the best F1 over its entries.
    """
    labels = label if isinstance(label, (list, tuple)) else [label]
    best = 0.0
    pred = _normalize_answer(response or "").split()
    for lab in labels:
        if lab is None:
            continue
        gold = _normalize_answer(lab).split()
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        if same == 0:
            continue
        p, r = same / len(pred), same / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best


# ----------------------------------------------------------------------------- remote
async def remote_reward(args, sample: Sample) -> Reward:
    """POST ``{"prompt", "response", "label"}`` to ``args.rm_url``; read a number or ``{"reward": x}``.

    A dict reply without ``"reward"`` is returned whole (select a key with ``--reward-key``).

    Raises:
        ValueError: ``args.rm_url`` is not set.
        httpx.HTTPError: on connection errors or a non-2xx status.
    """
    import httpx

    url = getattr(args, "rm_url", None)
    if not url:
        raise ValueError("--rm-type remote_rm needs --rm-url http://host:port/path")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    timeout = getattr(args, "rm_timeout", None)
    async with httpx.AsyncClient(timeout=timeout if timeout else 60.0) as client:
        resp = await client.post(url, json=payload)
        resp.raise_for_status()
        data = resp.json()
    if isinstance(data, dict) and "reward" in data:
        data = data["reward"]
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if isinstance(data, dict):
        return data
    raise ValueError(f"{url} replied {data!r}; expected a number or {{'reward': x}}")


# ----------------------------------------------------------------------------- built-in table
def _sync_builtin(fn: Callable[[str, Any], float]) -> Callable[[Any, Sample], float]:
    def call(args, sample: Sample) -> float:
        return fn(sample.response, sample.label)

    return call


_BUILTINS: dict[str, Callable[[Any, Sample], Any]] = {
    "math": _sync_builtin(math_reward),
    "boxed_math": _sync_builtin(boxed_math_reward),
    "f1": _sync_builtin(f1_reward),
    "boxed_f1": _sync_builtin(
        lambda r, l: 0.0 if extract_boxed(r or "") is None else f1_reward(extract_boxed(r), l)
    ),
    "remote_rm": remote_reward,
    "random": lambda args, sample: float(random.randint(0, 1)),
}
BUILTIN_RM_TYPES = tuple(sorted(_BUILTINS))


def _builtin_for(rm_type: str) -> Callable[[Any, Sample], Any]:
    if rm_type in _BUILTINS:
        return _BUILTINS[rm_type]
    if rm_type.startswith("boxed_") and rm_type[6:] in _BUILTINS:
        base = _BUILTINS[rm_type[6:]]

        def boxed(args, sample: Sample):
            boxed_text = extract_boxed(sample.response or "")
            if boxed_text is None:
                return 0.0
            view = dataclasses.replace(sample, response=boxed_text)
            return base(args, view)

        return boxed
    raise ValueError(
        f"--rm-type {rm_type!r} is not a built-in reward; choose one of {list(BUILTIN_RM_TYPES)} "
        f"(or boxed_<type>), or give your own with --custom-rm-path path/to/file.py:reward."
    )


# ----------------------------------------------------------------------------- custom RM
_CUSTOM_CACHE: dict[tuple[str, bool, str | None], tuple[str, Any]] = {}
_INSTANCE_CACHE: dict[tuple[str, str | None], Any] = {}
_CACHE_LOCK = threading.Lock()


def load_custom_rm(args) -> tuple[str, Any]:
    """Load ``args.custom_rm_path`` once per process.

    Returns:
        ``(form, obj)``: ``("sample", fn)``, ``("group", fn)`` or ``("class", instance)``.

    Raises:
        PluginError: the path does not load, or the object has the wrong shape.
    """
    path = args.custom_rm_path
    group = bool(getattr(args, "group_rm", False))
    model_path = getattr(args, "rm_model_path", None) or getattr(args, "hf_checkpoint", None)
    key = (path, group, model_path)
    if key in _CUSTOM_CACHE:
        return _CUSTOM_CACHE[key]
    obj = load_function(path, flag=CUSTOM_RM_FLAG, default_names=CUSTOM_RM_DEFAULT_NAMES)
    source = f"{path!r}"
    if inspect.isclass(obj):
        if not callable(getattr(obj, "compute_reward", None)):
            raise PluginError(
                f"{CUSTOM_RM_FLAG}: class {obj.__name__} in {source} has no compute_reward method; "
                f"define compute_reward(self, prompts, responses) -> list[float]."
            )
        check_signature(obj, ["model_path"], flag=CUSTOM_RM_FLAG, source=source)
        check_signature(
            getattr(obj, "compute_reward"), ["self", "prompts", "responses"],
            flag=CUSTOM_RM_FLAG, source=source,
        )
        with _CACHE_LOCK:
            ikey = (path, model_path)
            if ikey not in _INSTANCE_CACHE:
                _INSTANCE_CACHE[ikey] = obj(model_path)
        result = ("class", _INSTANCE_CACHE[ikey])
    else:
        params = ["args", "samples"] if group else ["args", "sample"]
        check_signature(obj, params, flag=CUSTOM_RM_FLAG, source=source)
        result = ("group" if group else "sample", obj)
    _CUSTOM_CACHE[key] = result
    return result


# ----------------------------------------------------------------------------- calling
async def _call(fn: Callable, *call_args, timeout: float | None) -> Any:
    """Call a sync or async function; sync ones run in a thread when a timeout is set."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
        coro: Awaitable = fn(*call_args)
    elif timeout:
        coro = asyncio.to_thread(fn, *call_args)
    else:
        out = fn(*call_args)
        if inspect.isawaitable(out):
            return await out
        return out
    if timeout:
        return await asyncio.wait_for(coro, timeout)
    out = await coro
    return await out if inspect.isawaitable(out) else out


def _check_value(value: Any, reward_key: str | None) -> Reward:
    """Validate one reward: a finite number, or a dict of them (with ``reward_key`` in it)."""
    if isinstance(value, bool) or value is None:
        raise RewardFailure(f"returned {value!r}; expected a float or a dict of floats")
    if isinstance(value, dict):
        if reward_key is not None and reward_key not in value:
            raise RewardFailure(
                f"returned a dict with keys {sorted(value)} but --reward-key is {reward_key!r}"
            )
        for k, v in value.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise RewardFailure(f"returned non-finite {k}={v!r}")
        if reward_key is not None:
            _check_value(value[reward_key], None)
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise RewardFailure(f"returned {value!r}; expected a float or a dict of floats") from exc
    if not math.isfinite(f):
        raise RewardFailure(f"returned non-finite {f!r}")
    return f


def reward_value(args, reward: Reward | Sample) -> float:
    """The float trained on: the reward itself, or its ``args.reward_key`` entry for a dict.

    Raises:
        ValueError: a dict reward without ``--reward-key``, or without that key.
    """
    if isinstance(reward, Sample):
        reward = reward.reward
    if isinstance(reward, dict):
        key = getattr(args, "reward_key", None)
        if key is None:
            raise ValueError(
                f"the reward is a dict with keys {sorted(reward)}; choose one with --reward-key"
            )
        if key not in reward:
            raise ValueError(f"--reward-key {key!r} is not in the reward's keys {sorted(reward)}")
        return float(reward[key])
    return 0.0 if reward is None else float(reward)


def _mark_failed(sample: Sample, position: int, exc: BaseException, *, first: bool) -> None:
    sample.status = SampleStatus.FAILED
    sample.reward = 0.0
    what = "timed out" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
    msg = "reward for sample index=%s (batch position %d) failed, marked FAILED with reward 0.0: %s"
    if first:
        logger.warning(msg, sample.index, position, what, exc_info=not isinstance(exc, RewardFailure))
    else:
        logger.warning(msg, sample.index, position, what)


async def _one(args, sample: Sample) -> Any:
    """The raw (unchecked) reward of one sample by the per-sample path."""
    timeout = getattr(args, "rm_timeout", None)
    if getattr(args, "custom_rm_path", None):
        form, obj = load_custom_rm(args)
        if form == "sample":
            return await _call(obj, args, sample, timeout=timeout)
        if form == "group":
            return (await _call(obj, args, [sample], timeout=timeout))[0]
        return (await _call(obj.compute_reward, [sample.prompt], [sample.response], timeout=timeout))[0]
    rm_type = ((sample.metadata or {}).get("rm_type") or getattr(args, "rm_type", None) or "").strip()
    if not rm_type:
        raise ValueError("no reward configured: set --rm-type (e.g. math) or --custom-rm-path")
    return await _call(_builtin_for(rm_type), args, sample, timeout=timeout)


async def compute_reward(args, sample: Sample) -> Reward:
    """Reward of one sample; sets ``sample.reward`` (and ``status=FAILED`` on failure).

    Returns:
        The reward (float or dict); 0.0 when the call failed.
    """
    batch = await compute_rewards(args, [sample])
    return batch[0]


def _config_error(exc: BaseException) -> bool:
    return isinstance(exc, PluginError) or (
        isinstance(exc, ValueError) and str(exc).startswith(("--rm-type", "no reward configured"))
    )


async def _batch_raw(args, samples: list[Sample]) -> list[Any]:
    """Raw rewards (value or exception per sample)."""
    timeout = getattr(args, "rm_timeout", None)
    if getattr(args, "custom_rm_path", None):
        form, obj = load_custom_rm(args)  # PluginError propagates: a config error
        if form in ("group", "class"):
            try:
                if form == "group":
                    out = await _call(obj, args, list(samples), timeout=timeout)
                else:
                    prompts = [s.prompt for s in samples]
                    responses = [s.response for s in samples]
                    out = await _call(obj.compute_reward, prompts, responses, timeout=timeout)
                if hasattr(out, "tolist"):
                    out = out.tolist()
                out = list(out)
                if len(out) != len(samples):
                    raise RewardFailure(
                        f"{CUSTOM_RM_FLAG} returned {len(out)} rewards for {len(samples)} samples"
                    )
                return out
            except Exception as exc:  # noqa: BLE001 - the whole group fails
                return [exc] * len(samples)
    else:
        rm_type = (getattr(args, "rm_type", None) or "").strip()
        if rm_type and not any((s.metadata or {}).get("rm_type") for s in samples):
            _builtin_for(rm_type)  # a wrong --rm-type is a config error, raised at once
    return list(await asyncio.gather(*(_one(args, s) for s in samples), return_exceptions=True))


async def compute_rewards(args, samples: list[Sample]) -> RewardBatch:
    """Rewards of a batch, by ``args.custom_rm_path`` or ``args.rm_type``.

    Sets ``sample.reward`` on each sample; a failed one (exception, timeout, NaN/inf,
    wrong type, missing ``--reward-key``) gets ``status=FAILED`` and reward 0.0.

    Args:
        args: any object with slime's attribute names (``rm_type``, ``custom_rm_path``,
            ``group_rm``, ``reward_key``, ``rm_url``, ``rm_timeout``, ``rm_model_path``,
            ``hf_checkpoint``); missing ones default to None/False.
        samples: the samples to score (a group for ``--group-rm``).

    Returns:
        :class:`RewardBatch` — ``list[float | dict]`` in sample order, with ``num_failed``.

    Raises:
        PluginError: ``--custom-rm-path`` does not load or has the wrong shape.
        ValueError: unknown ``--rm-type`` or no reward configured (configuration errors are
            not per-sample failures).
    """
    if not samples:
        return RewardBatch()
    raw = await _batch_raw(args, samples)
    reward_key = getattr(args, "reward_key", None)
    rewards, failed, logged_first = [], [], False
    for pos, (sample, value) in enumerate(zip(samples, raw)):
        try:
            if isinstance(value, BaseException):
                raise value
            value = _check_value(value, reward_key)
        except Exception as exc:  # noqa: BLE001
            if _config_error(exc):
                raise
            _mark_failed(sample, pos, exc, first=not logged_first)
            logged_first = True
            failed.append(sample.index)
            rewards.append(0.0)
            continue
        sample.reward = value
        rewards.append(value)
    return RewardBatch(rewards, failed)
