"""Prompt datasets and rollout data sources (slime's ``--prompt-data`` and ``RolloutDataSource``).

Files are JSONL (one JSON object per line), JSON (an array of objects), parquet, or a folder
written by ``datasets.Dataset.save_to_disk``. Each row holds the prompt under ``--input-key``
(a string, or chat messages ``[{"role", "content"}, ...]``), optionally the reference answer
under ``--label-key``, a metadata dict under ``--metadata-key`` and a tools list under
``--tool-key``::

    {"prompt": "What is 2 + 2?", "label": "4"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "label": "42"}

Every row is parsed and checked before anything is tokenized, so a bad file fails in
milliseconds with the file, the line and the flag to change.

:class:`RolloutDataSource` hands out prompts in groups of ``n_samples_per_prompt``
:class:`~slime_ray.types.Sample` objects, epoch after epoch, with slime's shuffle semantics
(epoch ``e`` is ``random.Random(rollout_seed + e)``'s permutation of the file order) and a
cursor (epoch, offset, counters) that :meth:`~RolloutDataSource.state_dict` captures so a
resumed run continues exactly where it stopped. Source: slime ``slime/rollout/data_source.py``
and ``slime/utils/data.py``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator

from slime_ray.types import Sample

logger = logging.getLogger(__name__)

ALLOWED_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A prompt file that cannot be used: the message names the file, the line and the flag."""


# ----------------------------------------------------------------------------- reading rows
def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_or_row_number, row)`` (1-based) from a JSONL/JSON/parquet file or HF folder."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            for i, row in enumerate(datasets.load_from_disk(str(path)), start=1):
                yield i, row
            return
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(
                f"--prompt-data {path}: folder holds neither parquet files nor a dataset saved "
                f"with datasets.save_to_disk; pass a .jsonl/.json/.parquet file"
            )
        n = 0
        for f in files:
            for _, row in _iter_rows(f):
                n += 1
                yield n, row
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise DataError(f"--prompt-data {path}: cannot read parquet: {e}") from e
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
        for i, row in enumerate(rows, start=1):
            yield i, row
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {lineno}: invalid JSON: {e.msg} (column {e.colno}); "
                f"each line must be one JSON object"
            ) from e


def _check_prompt(prompt: Any, *, path: Path, lineno: int, input_key: str) -> None:
    where = f"{path}: line {lineno}"
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt under key {input_key!r}")
        return
    if isinstance(prompt, list):
        if not prompt:
            raise DataError(f"{where}: empty prompt (no chat messages) under key {input_key!r}")
        for j, msg in enumerate(prompt):
            if not isinstance(msg, dict) or "role" not in msg:
                raise DataError(
                    f"{where}: message {j} of {input_key!r} is not a {{'role', 'content'}} dict: {msg!r}"
                )
            if msg["role"] not in ALLOWED_ROLES:
                raise DataError(
                    f"{where}: message {j} has unknown role {msg['role']!r}; allowed roles: "
                    f"{', '.join(ALLOWED_ROLES)}"
                )
        if not any(str(m.get("content") or "").strip() for m in prompt):
            raise DataError(f"{where}: empty prompt (all messages have empty content)")
        return
    raise DataError(
        f"{where}: prompt under key {input_key!r} must be a string or a list of chat messages, "
        f"got {type(prompt).__name__}"
    )


def _with_system(prompt: str | list[dict], system_prompt: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def load_prompt_data(
    path: str | os.PathLike,
    *,
    input_key: str = "input",
    label_key: str | None = None,
    metadata_key: str = "metadata",
    tool_key: str | None = None,
    apply_chat_template: bool = False,
    apply_chat_template_kwargs: dict | None = None,
    tokenizer: Any = None,
    max_prompt_len: int | None = None,
    system_prompt: str | None = None,
    return_stats: bool = False,
) -> list[dict] | tuple[list[dict], dict[str, int]]:
    """Load and check the prompts of ``--prompt-data``.

    Args:
        path: a ``.jsonl``, ``.json``, ``.parquet`` file, a folder of parquet files or a
            ``datasets.save_to_disk`` folder.
        input_key: key of the prompt (``--input-key``), a string or chat messages.
        label_key: key of the reference answer (``--label-key``); ``None`` -> label None.
        metadata_key: key of a metadata dict, or a JSON string of one (``--metadata-key``).
        tool_key: key of a tools list passed to ``apply_chat_template(tools=...)``; also kept
            in ``metadata["tools"]``.
        apply_chat_template: render the prompt (messages, or a string wrapped as one user
            message) with ``tokenizer.apply_chat_template(add_generation_prompt=True)``;
            ``prompt`` becomes the rendered text (slime's behaviour).
        apply_chat_template_kwargs: extra keyword arguments for ``apply_chat_template``.
        tokenizer: a HF tokenizer; when given, every row gets ``prompt_ids``. Message prompts
            are tokenized through the chat template even without ``apply_chat_template``.
        max_prompt_len: drop prompts longer than this many tokens (needs ``tokenizer``).
        system_prompt: a system message prepended (when none is there) to prompts rendered
            with the chat template; with plain-text prompts it is prepended as text.
        return_stats: also return ``{"num_rows", "num_kept", "num_filtered_too_long"}``.

    Returns:
        A list of dicts ``{"prompt", "label", "metadata", "prompt_ids"?}`` in file order
        (``prompt_ids`` is a ``list[int]`` when a tokenizer is given), or ``(rows, stats)``.

    Raises:
        DataError: missing file, unreadable/malformed line, missing input key, empty prompt,
            unknown chat role, or options that need a tokenizer without one. Raised before any
            tokenization.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--prompt-data {path}: no such file or folder")
    if (apply_chat_template or max_prompt_len is not None) and tokenizer is None:
        flag = "--apply-chat-template" if apply_chat_template else "--rollout-max-prompt-len"
        raise DataError(f"{flag} needs a tokenizer (from --hf-checkpoint); none was given")

    rows: list[dict] = []
    for lineno, raw in _iter_rows(p):
        if not isinstance(raw, dict):
            raise DataError(f"{p}: line {lineno}: expected a JSON object, got {type(raw).__name__}")
        if input_key not in raw:
            raise DataError(
                f"{p}: line {lineno}: no key {input_key!r} (set by --input-key); the row has keys "
                f"{sorted(raw)}. Pass --input-key with one of them."
            )
        prompt = raw[input_key]
        _check_prompt(prompt, path=p, lineno=lineno, input_key=input_key)
        if label_key is not None and label_key not in raw:
            raise DataError(
                f"{p}: line {lineno}: no key {label_key!r} (set by --label-key); the row has keys "
                f"{sorted(raw)}"
            )
        metadata = raw.get(metadata_key) or {}
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{p}: line {lineno}: {metadata_key!r} (--metadata-key) is a string that is not JSON: {e}"
                ) from e
        if not isinstance(metadata, dict):
            raise DataError(
                f"{p}: line {lineno}: {metadata_key!r} (--metadata-key) must be a dict, "
                f"got {type(metadata).__name__}"
            )
        metadata = dict(metadata)
        tools = raw.get(tool_key) if tool_key else None
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {lineno}: {tool_key!r} (--tool-key) is not JSON: {e}") from e
        if tools is not None:
            metadata["tools"] = tools
        rows.append({"prompt": prompt, "label": raw.get(label_key) if label_key else None,
                     "metadata": metadata, "_tools": tools})
    if not rows:
        raise DataError(f"--prompt-data {path}: the file holds no prompts")

    # Tokenization (the heavy part) only after every row checked out.
    kwargs = dict(apply_chat_template_kwargs or {})
    out: list[dict] = []
    n_long = 0
    for row in rows:
        tools = row.pop("_tools")
        prompt = row["prompt"]
        if apply_chat_template:
            msgs = _with_system(prompt, system_prompt)
            row["prompt"] = tokenizer.apply_chat_template(
                msgs, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
            )
        elif system_prompt:
            row["prompt"] = (f"{system_prompt}\n\n{prompt}" if isinstance(prompt, str)
                             else _with_system(prompt, system_prompt))
        if tokenizer is not None:
            if isinstance(row["prompt"], str):
                ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            else:
                text = tokenizer.apply_chat_template(
                    row["prompt"], tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            row["prompt_ids"] = list(ids)
            if max_prompt_len is not None and len(ids) > max_prompt_len:
                n_long += 1
                continue
        out.append(row)
    if n_long:
        logger.warning("--prompt-data %s: dropped %d of %d prompts longer than "
                       "--rollout-max-prompt-len %d tokens", path, n_long, len(rows), max_prompt_len)
    if not out:
        raise DataError(
            f"--prompt-data {path}: all {len(rows)} prompts are longer than "
            f"--rollout-max-prompt-len {max_prompt_len} tokens"
        )
    stats = {"num_rows": len(rows), "num_kept": len(out), "num_filtered_too_long": n_long}
    return (out, stats) if return_stats else out


# ----------------------------------------------------------------------------- data sources
def _arg(args: Any, name: str, default: Any = None) -> Any:
    """``args.name``, looking also in config sections (``args.data.name`` ...) of a nested config."""
    if args is None:
        return default
    if hasattr(args, name):
        return getattr(args, name)
    sections = ("data", "rollout", "checkpoint", "train", "eval", "reward", "algorithm", "sync", "cluster")
    for section in sections:
        sub = getattr(args, section, None)
        if sub is not None and hasattr(sub, name):
            return getattr(sub, name)
    return default


def _tokenizer_for(args: Any) -> Any:
    ckpt = _arg(args, "hf_checkpoint")
    if ckpt is None:
        return None
    from transformers import AutoTokenizer

    from slime_ray.models import resolve_hf_checkpoint

    return AutoTokenizer.from_pretrained(resolve_hf_checkpoint(ckpt))


def epoch_order(num_prompts: int, epoch: int, *, shuffle: bool, seed: int) -> list[int]:
    """Indices of the prompts in the order epoch ``epoch`` visits them.

    Without shuffle: file order. With shuffle: ``random.Random(seed + epoch).shuffle`` of
    ``range(num_prompts)`` (slime's ``Dataset.shuffle``), so each epoch is an independent
    permutation of the file order.
    """
    order = list(range(num_prompts))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


class RolloutDataSource:
    """Prompts handed out in groups, epoch after epoch, with a resumable cursor.

    Build it from an args-like object (slime style: ``prompt_data``, ``input_key``,
    ``label_key``, ``metadata_key``, ``tool_key``, ``apply_chat_template``,
    ``system_prompt``, ``rollout_max_prompt_len``, ``hf_checkpoint``,
    ``n_samples_per_prompt``, ``rollout_shuffle``, ``rollout_seed``; flat or in config
    sections) or from explicit keyword arguments, which win over ``args``.

    Args:
        args: args-like object (may be None when ``prompts`` is given).
        prompts: rows as returned by :func:`load_prompt_data` (skips loading the file).
        n_samples_per_prompt: group size G.
        rollout_shuffle: shuffle each epoch with seed ``rollout_seed + epoch``.
        rollout_seed: base seed of the shuffle.
        tokenizer: tokenizer for loading (default: from ``args.hf_checkpoint`` when needed).
    """

    def __init__(
        self,
        args: Any = None,
        *,
        prompts: list[dict] | None = None,
        n_samples_per_prompt: int | None = None,
        rollout_shuffle: bool | None = None,
        rollout_seed: int | None = None,
        tokenizer: Any = None,
    ):
        self.args = args
        self.n_samples_per_prompt = int(n_samples_per_prompt if n_samples_per_prompt is not None
                                        else _arg(args, "n_samples_per_prompt", 1))
        self.rollout_shuffle = bool(rollout_shuffle if rollout_shuffle is not None
                                    else _arg(args, "rollout_shuffle", False))
        self.rollout_seed = int(rollout_seed if rollout_seed is not None else _arg(args, "rollout_seed", 42))
        if self.n_samples_per_prompt < 1:
            raise ValueError(f"--n-samples-per-prompt must be >= 1, got {self.n_samples_per_prompt}")
        if prompts is None:
            prompts = self._load(args, tokenizer)
        if not prompts:
            raise DataError("RolloutDataSource: no prompts")
        self.prompts: list[dict] = list(prompts)
        self.epoch_id = 0
        self.sample_offset = 0  # position inside the current epoch's order
        self.sample_group_index = 0
        self.sample_index = 0
        self.metadata: dict[str, Any] = {}
        self._order = epoch_order(len(self.prompts), 0, shuffle=self.rollout_shuffle, seed=self.rollout_seed)

    @staticmethod
    def _load(args: Any, tokenizer: Any) -> list[dict]:
        path = _arg(args, "prompt_data")
        if path is None:
            raise DataError("no prompts: pass --prompt-data path/to/prompts.jsonl")
        apply_ct = bool(_arg(args, "apply_chat_template", False))
        max_len = _arg(args, "rollout_max_prompt_len")
        if tokenizer is None and (apply_ct or max_len is not None or _arg(args, "hf_checkpoint")):
            tokenizer = _tokenizer_for(args)
        return load_prompt_data(
            path,
            input_key=_arg(args, "input_key", "input"),
            label_key=_arg(args, "label_key"),
            metadata_key=_arg(args, "metadata_key", "metadata"),
            tool_key=_arg(args, "tool_key"),
            apply_chat_template=apply_ct,
            apply_chat_template_kwargs=_arg(args, "apply_chat_template_kwargs"),
            tokenizer=tokenizer,
            max_prompt_len=max_len,
            system_prompt=_arg(args, "system_prompt"),
        )

    def __len__(self) -> int:
        """Number of prompts in one epoch."""
        return len(self.prompts)

    def _next_prompts(self, num_prompts: int) -> list[dict]:
        out = []
        while len(out) < num_prompts:
            if self.sample_offset >= len(self.prompts):
                self.epoch_id += 1
                self.sample_offset = 0
                self._order = epoch_order(len(self.prompts), self.epoch_id,
                                          shuffle=self.rollout_shuffle, seed=self.rollout_seed)
            take = min(num_prompts - len(out), len(self.prompts) - self.sample_offset)
            out += [self.prompts[i] for i in self._order[self.sample_offset:self.sample_offset + take]]
            self.sample_offset += take
        return out

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """The next ``num_prompts`` prompts, each as a group of ``n_samples_per_prompt`` Samples.

        ``index`` and ``group_index`` increase across calls and never repeat; ``tokens`` holds
        the prompt ids (empty without a tokenizer). Crossing the end of the prompts starts the
        next epoch (reshuffled when ``rollout_shuffle``).

        Returns:
            ``num_prompts`` groups (lists) of ``n_samples_per_prompt`` Samples.
        """
        groups = []
        for row in self._next_prompts(num_prompts):
            group = []
            for _ in range(self.n_samples_per_prompt):
                group.append(Sample(
                    index=self.sample_index,
                    group_index=self.sample_group_index,
                    prompt=copy.deepcopy(row["prompt"]),
                    label=copy.deepcopy(row.get("label")),
                    metadata=copy.deepcopy(row.get("metadata") or {}),
                    tokens=list(row.get("prompt_ids") or []),
                ))
                self.sample_index += 1
            self.sample_group_index += 1
            groups.append(group)
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        """Return groups to the source; a plain source drops them (slime's behaviour)."""

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The cursor: epoch, offset in the epoch, sample/group counters, user metadata."""
        return {
            "epoch_id": self.epoch_id,
            "sample_offset": self.sample_offset,
            "sample_group_index": self.sample_group_index,
            "sample_index": self.sample_index,
            "num_prompts": len(self.prompts),
            "rollout_shuffle": self.rollout_shuffle,
            "rollout_seed": self.rollout_seed,
            "metadata": copy.deepcopy(self.metadata),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor from :meth:`state_dict`.

        Raises:
            ValueError: the saved cursor was taken over a different number of prompts.
        """
        n = state.get("num_prompts")
        if n is not None and n != len(self.prompts):
            raise ValueError(
                f"data source state was saved over {n} prompts but --prompt-data now has "
                f"{len(self.prompts)}; resume with the same prompt file and filters"
            )
        self.epoch_id = int(state["epoch_id"])
        self.sample_offset = int(state["sample_offset"])
        self.sample_group_index = int(state["sample_group_index"])
        self.sample_index = int(state["sample_index"])
        self.metadata = copy.deepcopy(state.get("metadata", {}))
        self._order = epoch_order(len(self.prompts), self.epoch_id,
                                  shuffle=self.rollout_shuffle, seed=self.rollout_seed)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`state_dict` as JSON to ``path`` (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the cursor written by :meth:`save`; a missing file leaves a fresh source."""
        path = Path(path)
        if not path.exists():
            logger.info("no data source state at %s; starting from the first prompt", path)
            return
        self.load_state_dict(json.loads(path.read_text()))


def pop_first(args: Any, rollout_id: int | None, buffer: list[list[Sample]], num_samples: int) -> list[list[Sample]]:
    """Default ``--buffer-filter-path``: remove and return the first ``num_samples`` groups."""
    n = min(len(buffer), num_samples)
    out = buffer[:n]
    del buffer[:n]
    return out


class RolloutDataSourceWithBuffer(RolloutDataSource):
    """A :class:`RolloutDataSource` with a buffer of returned groups that is drained first.

    Groups given back with :meth:`add_samples` (e.g. aborted partial rollouts, or groups
    over-sampled but not used) are handed out again by :meth:`get_samples` before new prompts,
    selected by ``buffer_filter(args, rollout_id, buffer, num_samples)`` (default
    :func:`pop_first`; ``--buffer-filter-path`` names another), which must remove what it
    returns from ``buffer``.
    """

    def __init__(self, args: Any = None, *, buffer_filter: Callable | None = None, **kwargs: Any):
        super().__init__(args, **kwargs)
        self.buffer: list[list[Sample]] = []
        if buffer_filter is None and _arg(args, "buffer_filter_path"):
            from slime_ray.plugins import load_function

            buffer_filter = load_function(
                _arg(args, "buffer_filter_path"), flag="--buffer-filter-path",
                expected_params=["args", "rollout_id", "buffer", "num_samples"],
            )
        self.buffer_filter = buffer_filter or pop_first

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """Up to ``num_prompts`` groups from the buffer, then new prompts for the rest."""
        groups = self.buffer_filter(self.args, None, self.buffer, num_prompts) if self.buffer else []
        if len(groups) < num_prompts:
            groups = list(groups) + super().get_samples(num_prompts - len(groups))
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        """Append groups to the buffer.

        Raises:
            ValueError: not a list of groups, or a group of the wrong size.
        """
        for group in samples or []:
            if not isinstance(group, list) or len(group) != self.n_samples_per_prompt:
                raise ValueError(
                    f"add_samples takes groups (lists) of n_samples_per_prompt="
                    f"{self.n_samples_per_prompt} Samples, got {type(group).__name__} of "
                    f"{len(group) if isinstance(group, list) else '?'}"
                )
            self.buffer.append(group)

    def state_dict(self) -> dict[str, Any]:
        """The cursor plus the buffered groups (as Sample dicts)."""
        state = super().state_dict()
        state["buffer"] = [[s.to_dict() for s in g] for g in self.buffer]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = [[Sample.from_dict(d) for d in g] for g in state.get("buffer", [])]

    def save(self, path: str | os.PathLike) -> None:
        """The cursor as JSON at ``path``, the buffer as Arrow (parquet) next to it.

        See :func:`slime_ray.data.buffer.buffer_path` for the buffer's file name.
        """
        from slime_ray.data.buffer import buffer_path, save_buffer

        save_buffer(self.buffer, buffer_path(path))
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(RolloutDataSource.state_dict(self)))
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the cursor and the parquet buffer written by :meth:`save`."""
        from slime_ray.data.buffer import buffer_path, load_buffer

        super().load(path)
        if buffer_path(path).exists():
            self.buffer = load_buffer(buffer_path(path))
