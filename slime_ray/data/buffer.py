"""The sample buffer as Arrow: groups of Samples <-> an Arrow table / a parquet file.

A buffer is slime's ``list[list[Sample]]`` (groups of ``n_samples_per_prompt``). On disk it is
one parquet file with :data:`slime_ray.types.ROLLOUT_SCHEMA` rows, groups contiguous and in
order, so a partial rollout's tokens, log-probs, loss mask and weight versions survive a
restart exactly (log-probs as float32).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from slime_ray.types import ROLLOUT_SCHEMA, Sample, samples_from_arrow, samples_to_arrow


def groups_to_table(groups: list[list[Sample]]) -> pa.Table:
    """Flatten groups into one Arrow table (rows in group order)."""
    return samples_to_arrow([s for g in groups for s in g])


def table_to_groups(table: pa.Table) -> list[list[Sample]]:
    """Inverse of :func:`groups_to_table`: consecutive rows with the same ``group_index``."""
    groups: list[list[Sample]] = []
    for s in samples_from_arrow(table):
        if groups and groups[-1][0].group_index == s.group_index:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def save_buffer(groups: list[list[Sample]], path: str | os.PathLike) -> None:
    """Write the buffer to ``path`` as parquet (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(groups_to_table(groups), tmp)
    os.replace(tmp, path)


def load_buffer(path: str | os.PathLike) -> list[list[Sample]]:
    """Read a buffer written by :func:`save_buffer`; a missing file is an empty buffer."""
    path = Path(path)
    if not path.exists():
        return []
    return table_to_groups(pq.read_table(path, schema=ROLLOUT_SCHEMA))


def buffer_path(state_path: str | os.PathLike) -> Path:
    """Where a data source saved at ``state_path`` keeps its buffer."""
    return Path(str(state_path) + ".buffer.parquet")
