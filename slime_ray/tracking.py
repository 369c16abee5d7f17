"""Experiment tracking: MLflow (any tracking URI; a local sqlite store by default) and TensorBoard.

One :class:`Tracker` per run, owned by the driver::

    tracker = Tracker(params=vars(args), run_name="grpo-qwen")
    tracker.log_metrics({"rollout/raw_reward": 0.4, "train/loss": 0.1}, step=rollout_id)
    print(format_progress_line(rollout_id, metrics))
    tracker.finish()

Resuming: pass the ``run_id`` of the earlier run (``tracker.run_id``, saved with the
checkpoint) and metrics continue on the same run. Other processes may join the same run
with ``Tracker(run_id=..., params={})`` and must not call :meth:`Tracker.finish`.

MLflow is kept offline and quiet: telemetry is off (``MLFLOW_DISABLE_TELEMETRY``,
``DO_NOT_TRACK``) and alembic's migration chatter is silenced. The sqlite store's artifacts
go next to the database file (``<db dir>/mlartifacts``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Any, Mapping

logger = logging.getLogger(__name__)

__all__ = ["Tracker", "format_progress_line", "flatten_params", "default_tracking_uri"]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000
# Metric writes that arrive within this many seconds go to MLflow in one log_batch: a sqlite
# log_batch of a 60-metric step costs ~28 ms of CPU here, ten steps at once 7-14 ms a step.
METRICS_WRITE_INTERVAL_S = 2.0
_FLUSH = "flush"  # writer-queue marker: write what is pending now
MAX_PARAM_VALUE_LEN = 6000
MAX_KEY_LEN = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def default_tracking_uri() -> str:
    """``sqlite:///<absolute cwd>/mlflow.db`` (MLflow 3 refuses the file store by default)."""
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def _quiet_mlflow() -> None:
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _stringify(value: Any) -> str:
    if isinstance(value, (list, tuple, set, dict)):
        try:
            s = json.dumps(sorted(value) if isinstance(value, set) else value, default=str)
        except (TypeError, ValueError):
            s = str(value)
    else:
        s = str(value)
    if len(s) > MAX_PARAM_VALUE_LEN:
        s = s[: MAX_PARAM_VALUE_LEN - 3] + "..."
    return s


def _clean_key(key: str) -> str:
    """A key MLflow accepts: only ``/ \\w . - : space``, no leading ``/``, no ``..`` / ``//``."""
    k = _BAD_KEY_CHARS.sub("_", str(key))
    k = re.sub(r"/+", "/", k).strip("/")
    k = k.replace("..", "_")
    return k[:MAX_KEY_LEN] or "_"


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a dict / dataclass / argparse Namespace into ``{"a.b": "value"}`` strings.

    Nested dicts and dataclasses give dotted keys; lists, tuples and sets become JSON
    strings; values are cut to MLflow's 6000 characters.
    """
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    elif not isinstance(params, Mapping) and hasattr(params, "__dict__"):
        params = vars(params)
    out: dict[str, str] = {}
    for key, value in dict(params or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[_clean_key(name)] = _stringify(value)
    return out


def _as_float(value: Any) -> float | None:
    """A finite float, or None for None / NaN / inf / non-numbers."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # multi-element tensors / arrays
            return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Tracker:
    """One MLflow run (plus an optional TensorBoard writer) for a training job.

    Args:
        tracking_uri: MLflow tracking URI; default :func:`default_tracking_uri`.
        experiment_name: created if missing.
        run_name: display name of a new run.
        run_id: continue this existing run instead of creating one (resume).
        params: the run's flags/config (dict, dataclass or Namespace); logged as params,
            flattened and stringified, 100 per batch. On resume only new keys are logged
            (MLflow params are immutable; changed values are reported in a warning).
        use_tensorboard: also write every scalar to a ``SummaryWriter``.
        tensorboard_dir: the ``SummaryWriter`` log dir.
        write_interval_s: metrics logged within this many seconds of the first unwritten one
            are written to MLflow together, in one ``log_batch`` (each keeps its own timestamp
            and step); :meth:`flush` and :meth:`finish` write at once.

    Raises:
        ValueError: ``run_id`` is not a run of this tracking store.
        ImportError: ``use_tensorboard`` without the ``tensorboard`` package.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment_name: str = "slime_ray",
        run_name: str | None = None,
        run_id: str | None = None,
        params: Any,
        use_tensorboard: bool = False,
        tensorboard_dir: str = "outputs/",
        write_interval_s: float = METRICS_WRITE_INTERVAL_S,
    ):
        self.write_interval_s = float(write_interval_s)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self._finished = False
        self._writer = None  # background writer thread (started by the first log_metrics)
        self._queue = None
        self._write_error: BaseException | None = None
        self._tb = None
        self._jsonl: str | None = None
        if self.tracking_uri.startswith("jsonl:"):
            # no MLflow (e.g. a machine without it): metrics as JSON lines in that file
            import uuid

            self._jsonl = self.tracking_uri[len("jsonl:"):]
            os.makedirs(os.path.dirname(os.path.abspath(self._jsonl)), exist_ok=True)
            self._run_id = run_id or uuid.uuid4().hex
            self._client = None
            self._append_jsonl({"run_id": self._run_id, "run_name": run_name, "params": flatten_params(params)})
            if use_tensorboard:
                self._tb = self._make_tb_writer(tensorboard_dir)
            return
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id:
            self._run_id = self._resume(run_id)
        else:
            exp_id = self._experiment_id(experiment_name)
            run = self._client.create_run(exp_id, run_name=run_name)
            self._run_id = run.info.run_id
        self.experiment_id = self._client.get_run(self._run_id).info.experiment_id
        self._log_params(flatten_params(params), resuming=bool(run_id))
        if use_tensorboard:
            self._tb = self._make_tb_writer(tensorboard_dir)

    # --------------------------------------------------------------------- setup
    def _artifact_location(self) -> str | None:
        uri = self.tracking_uri
        if uri.startswith("sqlite:///"):
            db = uri[len("sqlite:///") :]
            return os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
        return None

    def _experiment_id(self, name: str) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=self._artifact_location())
        except Exception:  # noqa: BLE001 - another process created it first
            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _resume(self, run_id: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise ValueError(
                f"cannot resume MLflow run {run_id!r}: not found in {self.tracking_uri} ({exc}). "
                f"Pass the run id printed by the first run and the same tracking URI, or no run id "
                f"to start a new run."
            ) from exc
        if run.info.status != "RUNNING":
            self._client.update_run(run_id, status="RUNNING")
        return run.info.run_id

    def _log_params(self, params: dict[str, str], *, resuming: bool) -> None:
        from mlflow.entities import Param

        if resuming:
            existing = self._client.get_run(self._run_id).data.params
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            if changed:
                logger.warning(
                    "resumed MLflow run %s: params %s differ from the first run; MLflow params "
                    "cannot change, the first values are kept", self._run_id, changed,
                )
            params = {k: v for k, v in params.items() if k not in existing}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    @staticmethod
    def _make_tb_writer(log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "--use-tensorboard needs the tensorboard package: pip install tensorboard "
                "(or drop --use-tensorboard; MLflow tracking works without it)"
            ) from exc
        os.makedirs(log_dir, exist_ok=True)
        return SummaryWriter(log_dir=log_dir)

    # --------------------------------------------------------------------- logging
    def _append_jsonl(self, record: dict[str, Any]) -> None:
        import json

        with open(self._jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def run_id(self) -> str:
        """The MLflow run id (save it with checkpoints to resume the same run)."""
        return self._run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> dict[str, float]:
        """Log scalar metrics at ``step``; None, NaN, inf and non-numbers are skipped.

        Keys are made MLflow-safe (e.g. ``pass@k`` -> ``pass_k``); TensorBoard gets the
        original keys. Returns the metrics actually logged (original keys).

        The timestamp is taken here; the writes to MLflow / TensorBoard run on a background
        thread, in call order (a sqlite write costs 15-35 ms a step on a busy CPU machine), and
        the metrics of calls less than ``write_interval_s`` apart go in one write. A reader of
        the store sees them within ``write_interval_s`` plus the write, or after :meth:`flush` /
        :meth:`finish` (which wait for them, as does interpreter exit). A write that failed is
        raised by the next call.
        """
        clean = {k: f for k, v in metrics.items() if (f := _as_float(v)) is not None}
        ts = int(time.time() * 1000)
        self._raise_write_error()
        if self._jsonl is not None:
            self._append_jsonl({"run_id": self._run_id, "step": int(step), "timestamp_ms": ts, "metrics": clean})
            if self._tb is not None:
                self._write_tb(clean, int(step))
            return clean
        self._submit(self._write_metrics, [(clean, ts, int(step))])
        return clean

    def _write_metrics(self, logged: list[tuple[dict[str, float], int, int]]) -> None:
        """Write ``[(metrics, timestamp_ms, step), ...]`` (several steps) in as few batches as MLflow allows."""
        from mlflow.entities import Metric

        items = [Metric(_clean_key(k), v, ts, step) for clean, ts, step in logged for k, v in clean.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])
        if self._tb is not None:
            for clean, _, step in logged:
                self._write_tb(clean, step)

    def _write_tb(self, clean: dict[str, float], step: int) -> None:
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    # --------------------------------------------------------------------- background writer
    def _submit(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread, after every write submitted before it."""
        if self._writer is None:
            import atexit
            import queue
            import threading
            import weakref

            self._queue = queue.Queue()
            self._writer = threading.Thread(target=_writer_loop, args=(self._queue, weakref.ref(self)),
                                            name="slime_ray-tracker", daemon=True)
            self._writer.start()
            atexit.register(_flush_at_exit, weakref.ref(self))
        self._queue.put((fn, args))

    def flush(self) -> None:
        """Wait until every metric logged so far is in the store; raise a failed write's error."""
        if self._writer is not None:
            self._queue.put(_FLUSH)
            self._queue.join()
        self._raise_write_error()

    def _raise_write_error(self) -> None:
        err, self._write_error = self._write_error, None
        if err is not None:
            raise RuntimeError(f"MLflow tracking: a background write failed: {err!r}") from err

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory to the run's artifacts (under ``artifact_path``)."""
        if self._jsonl is not None:
            return
        self.flush()
        if os.path.isdir(path):
            self._client.log_artifacts(self._run_id, path, artifact_path)
        else:
            self._client.log_artifact(self._run_id, path, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified)."""
        if self._jsonl is not None:
            return
        self.flush()
        for k, v in tags.items():
            self._client.set_tag(self._run_id, _clean_key(k), _stringify(v))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) and close TensorBoard. Idempotent."""
        if self._finished:
            return
        self._finished = True
        write_error = None
        try:
            self.flush()
        except RuntimeError as err:  # the run is still ended; the error is raised after
            write_error = err
        if self._writer is not None:
            self._queue.put(None)  # the writer thread ends
            self._writer.join(timeout=60)
            self._writer = None
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._append_jsonl({"run_id": self._run_id, "status": status})
        else:
            self._client.set_terminated(self._run_id, status=status)
        if write_error is not None:
            raise write_error

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")


def _writer_loop(q: Any, tracker_ref: Any) -> None:
    """Body of a Tracker's writer thread: run queued writes in order until ``None``.

    Metric writes are held until ``write_interval_s`` after the first of them (or a ``_FLUSH``
    marker, another write, or ``None``) and then written as one; their queue items are marked
    done only once written, so ``queue.join()`` still means "in the store".
    """
    import queue

    pending: list[tuple] = []  # metric writes (their args lists) held for one batch
    deadline = 0.0

    def run(fn: Any, args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's next call
            tracker = tracker_ref()
            if tracker is not None and tracker._write_error is None:
                tracker._write_error = err
            logger.warning("MLflow tracking: background write failed: %r", err)

    def write_pending() -> None:
        if pending:
            run(pending[0][0], ([one for _, args in pending for one in args[0]],))
            for _ in pending:
                q.task_done()
            pending.clear()

    while True:
        try:
            job = q.get(timeout=max(0.0, deadline - time.monotonic()) if pending else None)
        except queue.Empty:
            write_pending()
            continue
        if job is not None and job != _FLUSH and getattr(job[0], "__func__", None) is Tracker._write_metrics:
            tracker = tracker_ref()
            if not pending:
                deadline = time.monotonic() + (tracker.write_interval_s if tracker is not None else 0.0)
            pending.append(job)
            if tracker is None or time.monotonic() >= deadline:
                write_pending()
            del tracker  # no strong reference while waiting: an abandoned Tracker can be collected
            continue  # marked done when written
        try:
            write_pending()  # everything queued before this job is written first
            if job is None:
                return
            if job != _FLUSH:
                run(*job)
        finally:
            q.task_done()


def _flush_at_exit(tracker_ref: Any) -> None:
    """atexit: metrics logged by a job that never called finish() still reach the store."""
    tracker = tracker_ref()
    if tracker is not None and tracker._writer is not None:
        try:
            tracker._queue.put(_FLUSH)
            tracker._queue.join()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------- console
_PROGRESS_FIELDS: list[tuple[str, tuple[str, ...], str]] = [
    ("reward", ("rollout/reward_mean", "rollout/raw_reward", "rollout/rewards", "rollout/reward", "reward/mean", "reward"), ".3f"),
    ("acc", ("rollout/accuracy", "rollout/acc", "accuracy", "acc"), ".3f"),
    ("resp_len", ("rollout/response_len/mean", "rollout/response_len", "response_len/mean",
                  "response_len"), ".1f"),
    ("loss", ("train/loss", "train/pg_loss", "loss"), ".4g"),
    ("kl", ("train/kl_loss", "train/ppo_kl", "train/kl", "kl"), ".3g"),
]


def format_progress_line(step: int, metrics: Mapping[str, Any]) -> str:
    """One console line for a step: reward mean, accuracy, response length, loss, KL, times.

    Looks for slime's key names (``rollout/raw_reward``, ``rollout/response_len/mean``,
    ``train/loss``, ``train/kl_loss``, ``perf/*_time`` ...) and leaves out what is missing.
    Example: ``step 3 | reward 0.625 | acc 0.500 | resp_len 87.2 | loss 0.0123 | kl 0.0004
    | time rollout 4.1s train 2.0s``.
    """
    parts = [f"step {step}"]
    for label, keys, fmt in _PROGRESS_FIELDS:
        for key in keys:
            value = _as_float(metrics.get(key))
            if value is not None:
                parts.append(f"{label} {value:{fmt}}")
                break
    times = []
    for key, value in metrics.items():
        f = _as_float(value)
        if f is None or not key.endswith("_time"):
            continue
        name = key.split("/")[-1][: -len("_time")]
        times.append(f"{name} {f:.1f}s")
    if times:
        parts.append("time " + " ".join(times))
    return " | ".join(parts)


def _summary_main(argv: list[str] | None = None) -> int:
    """``python -m slime_ray.tracking summary --tracking-uri URI [--run-name N | --run-id ID]``:
    print the last value of every metric of a run (the newest run when neither is given)."""
    import argparse

    from mlflow.tracking import MlflowClient

    p = argparse.ArgumentParser(prog="python -m slime_ray.tracking summary")
    p.add_argument("command", choices=["summary"])
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment-name", default="slime_ray")
    p.add_argument("--run-name", default=None)
    p.add_argument("--run-id", default=None)
    a = p.parse_args(argv)
    _quiet_mlflow()
    client = MlflowClient(a.tracking_uri or default_tracking_uri())
    if a.run_id:
        run = client.get_run(a.run_id)
    else:
        exp = client.get_experiment_by_name(a.experiment_name)
        if exp is None:
            print(f"no experiment {a.experiment_name!r} in {a.tracking_uri}")
            return 1
        filt = f"attributes.run_name = '{a.run_name}'" if a.run_name else ""
        runs = client.search_runs([exp.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if not runs:
            print(f"no run {a.run_name or ''} in experiment {a.experiment_name!r}")
            return 1
        run = runs[0]
    print(f"MLflow run {run.info.run_id} ({run.info.run_name}, {run.info.status}); last values:")
    for key in sorted(run.data.metrics):
        steps = len(client.get_metric_history(run.info.run_id, key))
        print(f"  {key:45s} {run.data.metrics[key]:.6g}   ({steps} steps)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_summary_main())
