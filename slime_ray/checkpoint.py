"""Checkpoints of a whole job: what the trainer saves plus the driver's state, and resume.

Layout of ``--save DIR`` (slime's, Megatron-style names)::

    DIR/latest_checkpointed_iteration.txt     rollout id of the newest complete checkpoint
    DIR/iter_0000003/                         one checkpoint (rollout_id = 3), written as
        model/                                  .tmp_iter_0000003 then renamed: a folder with
        trainer_state.pt                        this name is always complete
        meta.json                             driver state (below)
        buffer.parquet                        the data buffer's pending / partial samples
        driver_rng.pt                         the driver's python / numpy / torch RNG states

``meta.json`` holds ``rollout_id`` (the last finished step), ``weight_version`` (of the
weights in the checkpoint), ``mlflow_run_id`` (a resumed job logs to the same run), the data
source cursor (epoch, offset in the epoch's shuffle order, counters) and the group sizes of
the buffer. Everything is loaded with ``torch.load(weights_only=True)``, JSON or parquet:
no pickled code runs on load.

Resume (``--load DIR``): the newest complete ``iter_*`` folder wins; the trainer loads the
model, optimizer and RNG states; the reference model stays the one of ``--ref-load`` or the
initial ``--hf-checkpoint`` (it is built before the checkpoint is loaded); the engines get the
checkpoint's weights and weight version before the first generate.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from slime_ray.types import Sample, samples_from_arrow, samples_to_arrow

logger = logging.getLogger(__name__)

_ITER_RE = re.compile(r"^iter_(\d{7})$")
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A ``--load`` / ``--save`` folder that cannot be used; the message names it and what to do."""


@dataclass
class ResumePoint:
    """A complete checkpoint folder and its ``meta.json``."""

    path: Path
    meta: dict[str, Any]

    @property
    def next_rollout_id(self) -> int:
        return int(self.meta["rollout_id"]) + 1


def should_save(args: Namespace, rollout_id: int) -> bool:
    """slime's rule: every ``--save-interval`` steps and after the last step (needs ``--save``)."""
    if not args.save:
        return False
    if args.save_interval and (rollout_id + 1) % args.save_interval == 0:
        return True
    return rollout_id + 1 == args.num_rollout


def find_latest(root: str | Path) -> Path | None:
    """The newest complete ``iter_XXXXXXX`` folder under ``root`` (one with ``meta.json``), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [d for d in root.iterdir() if _ITER_RE.match(d.name) and (d / "meta.json").is_file()]
    return max(done, key=lambda d: int(d.name[5:]), default=None)


def find_resume(args: Namespace) -> ResumePoint | None:
    """The checkpoint ``--load`` names (a run folder or one ``iter_*`` folder), checked before any resource.

    A ``--load`` folder without a checkpoint starts a fresh run only when it is also the
    ``--save`` folder (the usual auto-resume pattern ``--save D --load D``).

    Raises:
        CheckpointError: no complete checkpoint in ``--load``, or an unreadable ``meta.json``.
    """
    if not args.load:
        return None
    load = Path(args.load).expanduser()
    path = load if _ITER_RE.match(load.name) and (load / "meta.json").is_file() else find_latest(load)
    if path is None:
        if args.save and Path(args.save).expanduser().resolve() == load.resolve():
            logger.info("--load %s holds no checkpoint yet: starting a fresh run", load)
            return None
        raise CheckpointError(
            f"--load {args.load}: no complete checkpoint (an iter_XXXXXXX folder with meta.json) there; "
            f"pass the --save folder of an earlier run, or drop --load to start from --hf-checkpoint")
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["rollout_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--load {args.load}: {path / 'meta.json'} is unreadable ({e}); "
                              f"delete {path} to resume from the checkpoint before it") from e
    logger.info("resuming from %s (rollout %s, weight version %s, MLflow run %s)", path, meta["rollout_id"],
                meta.get("weight_version"), meta.get("mlflow_run_id"))
    return ResumePoint(path=path, meta=meta)


# ----------------------------------------------------------------------------- driver state
def rng_state() -> dict[str, Any]:
    """This process's python ``random``, numpy and torch (CPU) RNG states, in types that
    ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                      "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _rng_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return buf.getvalue()


def _buffer_bytes(groups: list[list[Sample]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(samples_to_arrow([s for g in groups for s in g]), sink)
    return sink.getvalue().to_pybytes()


def driver_state(rollout_id: int, data_source: Any, weight_version: int,
                 run_id: str | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``(meta, files)`` of the driver for a checkpoint after step ``rollout_id``.

    ``meta`` is JSON (see the module docstring); ``files`` maps file names to bytes
    (``buffer.parquet``, ``driver_rng.pt``) written into the checkpoint folder before its rename.
    """
    ds_state = dict(data_source.state_dict()) if hasattr(data_source, "state_dict") else None
    files = {"driver_rng.pt": _rng_bytes()}
    group_sizes: list[int] = []
    if ds_state is not None and "buffer" in ds_state:
        groups = [[s if isinstance(s, Sample) else Sample.from_dict(s) for s in g] for g in ds_state.pop("buffer")]
        group_sizes = [len(g) for g in groups]
        files["buffer.parquet"] = _buffer_bytes(groups)
    meta = {"format": FORMAT_VERSION, "rollout_id": int(rollout_id), "weight_version": int(weight_version),
            "mlflow_run_id": run_id, "data_source": ds_state, "buffer_group_sizes": group_sizes}
    return meta, files


def save(args: Namespace, actor: Any, rollout_id: int, data_source: Any, weight_version: int,
         run_id: str | None) -> str:
    """Save the trainer (model, optimizer, RNG) and the driver state to ``--save`` atomically.

    Returns:
        The checkpoint folder ``<--save>/iter_{rollout_id:07d}``.
    """
    meta, files = driver_state(rollout_id, data_source, weight_version, run_id)
    return actor.save(args.save, rollout_id, {**meta, "_files": files})


def restore_driver(resume: ResumePoint, data_source: Any) -> None:
    """Put the data source cursor, its buffer and the driver's RNG states back."""
    meta, path = resume.meta, resume.path
    ds_state = meta.get("data_source")
    if ds_state is not None and hasattr(data_source, "load_state_dict"):
        ds_state = dict(ds_state)
        if (path / "buffer.parquet").is_file():
            flat = iter(samples_from_arrow(pq.read_table(path / "buffer.parquet")))
            ds_state["buffer"] = [[next(flat).to_dict() for _ in range(n)] for n in meta["buffer_group_sizes"]]
        data_source.load_state_dict(ds_state)
    elif ds_state is None:
        logger.warning("checkpoint %s has no data source state: prompts restart from the first", path)
    if (path / "driver_rng.pt").is_file():
        set_rng_state(torch.load(path / "driver_rng.pt", weights_only=True))


def restore(resume: ResumePoint | None, actor: Any, data_source: Any, client: Any) -> int:
    """Load ``resume`` into the trainer, the data source and the engines; returns the next rollout id.

    The engines receive the checkpoint's weights and weight version before this returns, so
    the first generate after a resume runs on the checkpoint's policy. ``resume=None`` -> 0.
    """
    if resume is None:
        return 0
    actor.load(str(resume.path))
    restore_driver(resume, data_source)
    version = int(resume.meta.get("weight_version", resume.next_rollout_id))
    client.update_weights(actor.weights_ref(), version)
    return resume.next_rollout_id
