"""``--streaming-data``: prompts read as a Ray Data stream, for prompt files larger than memory.

:class:`StreamingRolloutDataSource` has the data-source shape of
:class:`~slime_ray.data.dataset.RolloutDataSourceWithBuffer` (``get_samples(n)`` -> groups,
``add_samples(groups)`` into a buffer drained first, ``state_dict``/``save``/``load``) but
never holds the file: ``ray.data.read_json`` / ``read_parquet`` (``--num-data-workers`` read
tasks) feed ``iter_rows()`` and rows are parsed and tokenized as they arrive. An epoch ends
when the stream does; the next epoch opens a new stream. The cursor is (epoch, rows consumed
in the epoch); resuming skips that many rows of the stream.

Departure from the in-memory source: ``--rollout-shuffle`` shuffles the order of the file's
blocks (``randomize_block_order(seed + epoch)``), not individual rows (a full row shuffle
needs the whole file), and ``--rollout-max-prompt-len`` is applied as rows arrive.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator

from slime_ray.data.dataset import DataError, _arg, _with_system, pop_first
from slime_ray.types import Sample


def _plain(value: Any) -> Any:
    """Ray Data values (numpy arrays of structs) -> plain Python lists / dicts."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_stream(path: str, num_workers: int = 1) -> Any:
    """A Ray Data dataset over a .jsonl/.json/.parquet file or a folder of parquet files."""
    import ray.data

    p = Path(path)
    if not p.exists():
        raise DataError(f"--prompt-data {path}: no such file or folder")
    kw = {"override_num_blocks": max(1, int(num_workers))}
    if p.suffix.lower() == ".parquet" or p.is_dir():
        return ray.data.read_parquet(str(p), **kw)
    return ray.data.read_json(str(p), lines=True, **kw) if p.suffix.lower() == ".jsonl" \
        else ray.data.read_json(str(p), **kw)


class StreamingRolloutDataSource:
    """Prompts from a Ray Data stream, in groups of ``n_samples_per_prompt`` (see module doc).

    Args:
        args: flat namespace (``prompt_data``, ``input_key``, ``label_key``, ``metadata_key``,
            ``apply_chat_template``, ``system_prompt``, ``rollout_max_prompt_len``,
            ``n_samples_per_prompt``, ``rollout_shuffle``, ``rollout_seed``, ``num_data_workers``,
            ``buffer_filter_path``).
        tokenizer: HF tokenizer (default: the one of ``args.hf_checkpoint``).
    """

    def __init__(self, args: Any, tokenizer: Any = None):
        self.args = args
        self.path = _arg(args, "prompt_data")
        self.n_samples_per_prompt = int(_arg(args, "n_samples_per_prompt", 1))
        self.num_workers = int(_arg(args, "num_data_workers", 1) or 1)
        self.shuffle, self.seed = bool(_arg(args, "rollout_shuffle", False)), int(_arg(args, "rollout_seed", 42))
        if tokenizer is None and _arg(args, "hf_checkpoint"):
            from slime_ray.rollout.multi_turn import get_tokenizer

            tokenizer = get_tokenizer(args)
        self.tokenizer = tokenizer
        self.dataset = read_stream(self.path, self.num_workers)
        self.epoch_id, self.sample_offset = 0, 0
        self.sample_index, self.sample_group_index = 0, 0
        self.buffer: list[list[Sample]] = []
        self.buffer_filter = pop_first
        if _arg(args, "buffer_filter_path"):
            from slime_ray.plugins import load_function

            self.buffer_filter = load_function(_arg(args, "buffer_filter_path"), flag="--buffer-filter-path",
                                               expected_params=["args", "rollout_id", "buffer", "num_samples"])
        self._rows: Iterator[dict] | None = None

    def _open(self) -> Iterator[dict]:
        ds = self.dataset.randomize_block_order(seed=self.seed + self.epoch_id) if self.shuffle else self.dataset
        it = iter(ds.iter_rows())
        for _ in range(self.sample_offset):  # resume: skip what this epoch already handed out
            next(it)
        return it

    def _next_row(self) -> dict:
        for _ in range(2):
            if self._rows is None:
                self._rows = self._open()
            try:
                row = next(self._rows)
            except StopIteration:
                if self.sample_offset == 0:
                    raise DataError(f"--prompt-data {self.path}: the stream holds no prompts") from None
                self.epoch_id, self.sample_offset, self._rows = self.epoch_id + 1, 0, None
                continue
            self.sample_offset += 1
            return {k: _plain(v) for k, v in dict(row).items()}
        raise DataError(f"--prompt-data {self.path}: the stream holds no prompts")

    def _parse(self, raw: dict) -> dict | None:
        key = _arg(self.args, "input_key", "input")
        if key not in raw:
            raise DataError(f"{self.path}: row {self.sample_offset}: no key {key!r} (--input-key); keys {sorted(raw)}")
        prompt, label_key = raw[key], _arg(self.args, "label_key")
        meta = raw.get(_arg(self.args, "metadata_key", "metadata")) or {}
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)
        row = {"prompt": prompt, "label": raw.get(label_key) if label_key else None, "metadata": meta}
        if self.tokenizer is None:
            return row
        system = _arg(self.args, "system_prompt")
        if _arg(self.args, "apply_chat_template", False) or not isinstance(prompt, str):
            text = self.tokenizer.apply_chat_template(_with_system(prompt, system), tokenize=False,
                                                      add_generation_prompt=True)
            if _arg(self.args, "apply_chat_template", False):
                row["prompt"] = text
        else:
            text = f"{system}\n\n{prompt}" if system else prompt
        row["prompt_ids"] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        max_len = _arg(self.args, "rollout_max_prompt_len")
        return None if max_len is not None and len(row["prompt_ids"]) > max_len else row

    def get_samples(self, num_prompts: int) -> list[list[Sample]]:
        """Up to ``num_prompts`` buffered groups first, then new prompts from the stream."""
        groups = list(self.buffer_filter(self.args, None, self.buffer, num_prompts)) if self.buffer else []
        while len(groups) < num_prompts:
            row = self._parse(self._next_row())
            if row is None:
                continue
            group = []
            for _ in range(self.n_samples_per_prompt):
                group.append(Sample(index=self.sample_index, group_index=self.sample_group_index,
                                    prompt=copy.deepcopy(row["prompt"]), label=copy.deepcopy(row["label"]),
                                    metadata=copy.deepcopy(row["metadata"]), tokens=list(row.get("prompt_ids") or [])))
                self.sample_index += 1
            self.sample_group_index += 1
            groups.append(group)
        return groups

    def add_samples(self, samples: list[list[Sample]]) -> None:
        """Append groups to the buffer (handed out again before new prompts)."""
        self.buffer.extend(list(g) for g in samples or [])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_id": self.epoch_id, "sample_offset": self.sample_offset,
                "sample_index": self.sample_index, "sample_group_index": self.sample_group_index,
                "buffer": [[s.to_dict() for s in g] for g in self.buffer]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch_id, self.sample_offset = int(state["epoch_id"]), int(state["sample_offset"])
        self.sample_index, self.sample_group_index = int(state["sample_index"]), int(state["sample_group_index"])
        self.buffer = [[Sample.from_dict(d) for d in g] for g in state.get("buffer", [])]
        self._rows = None

    def save(self, path: str | os.PathLike) -> None:
        """Cursor as JSON at ``path``, buffer as parquet next to it."""
        from slime_ray.data.buffer import buffer_path, save_buffer

        save_buffer(self.buffer, buffer_path(path))
        state = {k: v for k, v in self.state_dict().items() if k != "buffer"}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(state))

    def load(self, path: str | os.PathLike) -> None:
        from slime_ray.data.buffer import buffer_path, load_buffer

        if Path(path).exists():
            self.load_state_dict(json.loads(Path(path).read_text()))
            self.buffer = load_buffer(buffer_path(path))
