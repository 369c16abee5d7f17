"""MLflow tracking against a real sqlite store; TensorBoard mirror; console line."""

import glob
import math

import pytest

from slime_ray.tracking import Tracker, flatten_params, format_progress_line


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    # one store for the module: creating a sqlite store runs MLflow's migrations (seconds)
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_params_and_metrics_round_trip(uri, tmp_path):
    params = {f"flag_{i}": i for i in range(150)}  # > 100: needs chunking
    params.update(eval_prompt_data=["aime", "/data/aime.jsonl"], long="x" * 7000,
                  rollout={"temperature": 1.0}, none_flag=None)
    tr = Tracker(tracking_uri=uri, experiment_name="t", run_name="r1", params=params)
    for step in range(3):
        tr.log_metrics({"rollout/raw_reward": 0.1 * step, "train/loss": 1.0 / (step + 1),
                        "skip_none": None, "skip_nan": math.nan, "eval/pass@k": 0.5}, step=step)
    art = tmp_path / "note.txt"
    art.write_text("hello")
    tr.log_artifact(str(art))
    tr.finish()
    tr.finish()  # idempotent

    run = client(uri).get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    p = run.data.params
    assert len([k for k in p if k.startswith("flag_")]) == 150
    assert p["flag_7"] == "7" and p["eval_prompt_data"] == '["aime", "/data/aime.jsonl"]'
    assert p["rollout.temperature"] == "1.0" and p["none_flag"] == "None"
    assert len(p["long"]) == 6000
    hist = client(uri).get_metric_history(tr.run_id, "rollout/raw_reward")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert len(client(uri).get_metric_history(tr.run_id, "train/loss")) == 3
    assert "skip_none" not in run.data.metrics and "skip_nan" not in run.data.metrics
    assert run.data.metrics["eval/pass_k"] == 0.5
    arts = [a.path for a in client(uri).list_artifacts(tr.run_id)]
    assert arts == ["note.txt"]
    db_dir = uri[len("sqlite:///"):].rsplit("/", 1)[0]
    assert glob.glob(f"{db_dir}/mlartifacts/*/artifacts/note.txt")  # next to the db, not in cwd


def test_resume_by_run_id_appends(uri):
    tr = Tracker(tracking_uri=uri, experiment_name="resume", params={"lr": 1e-6, "seed": 1})
    for step in range(2):
        tr.log_metrics({"train/loss": float(step)}, step=step)
    tr.finish("KILLED")
    run_id = tr.run_id

    tr2 = Tracker(tracking_uri=uri, run_id=run_id, params={"lr": 1e-6, "seed": 2, "new": "x"})
    assert tr2.run_id == run_id
    assert client(uri).get_run(run_id).info.status == "RUNNING"
    tr2.log_metrics({"train/loss": 2.0}, step=2)
    tr2.finish()
    run = client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "1e-06", "seed": "1", "new": "x"}  # first values kept
    hist = client(uri).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    runs = client(uri).search_runs([run.info.experiment_id])
    assert sum(r.info.run_id == run_id for r in runs) == 1


def test_resume_unknown_run_id(uri):
    with pytest.raises(ValueError, match="cannot resume MLflow run"):
        Tracker(tracking_uri=uri, run_id="0123456789abcdef0123456789abcdef", params={})


def test_default_uri_is_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Tracker(params={"a": 1}) as tr:
        tr.log_metrics({"m": 1.0}, step=0)
        assert tr.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()


def test_tensorboard_event_files(uri, tmp_path):
    pytest.importorskip("tensorboard")
    tb_dir = tmp_path / "tb"
    tr = Tracker(tracking_uri=uri, params={}, use_tensorboard=True, tensorboard_dir=str(tb_dir))
    for step in range(3):
        tr.log_metrics({"rollout/raw_reward": step * 0.5, "bad": math.inf}, step=step)
    tr.finish()
    files = glob.glob(str(tb_dir / "events.out.tfevents.*"))
    assert files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["rollout/raw_reward"]
    assert [(e.step, e.value) for e in acc.Scalars("rollout/raw_reward")] == [(0, 0.0), (1, 0.5), (2, 1.0)]


def test_flatten_params_namespace_and_dataclass():
    import argparse
    from dataclasses import dataclass, field

    @dataclass
    class Rollout:
        temperature: float = 0.7
        stop: list = field(default_factory=lambda: ["</s>"])

    @dataclass
    class Cfg:
        rollout: Rollout = field(default_factory=Rollout)
        lr: float = 1e-6

    assert flatten_params(Cfg()) == {"rollout.temperature": "0.7", "rollout.stop": '["</s>"]',
                                     "lr": "1e-06"}
    assert flatten_params(argparse.Namespace(a=1, b=(1, 2))) == {"a": "1", "b": "[1, 2]"}


def test_format_progress_line():
    line = format_progress_line(3, {
        "rollout/raw_reward": 0.625, "rollout/accuracy": 0.5, "rollout/response_len/mean": 87.25,
        "train/loss": 0.0123, "train/kl_loss": 0.0004, "perf/rollout_time": 4.12,
        "perf/actor_train_time": 2.0, "unrelated": "text",
    })
    assert line == ("step 3 | reward 0.625 | acc 0.500 | resp_len 87.2 | loss 0.0123 | kl 0.0004"
                    " | time rollout 4.1s actor_train 2.0s")
    assert format_progress_line(0, {"train/loss": None}) == "step 0"


def test_jsonl_tracking_without_mlflow(tmp_path):
    """`--mlflow-tracking-uri jsonl:PATH` writes params, metrics per step and the end status as JSON lines."""
    import json

    from slime_ray.tracking import Tracker

    path = tmp_path / "m" / "metrics.jsonl"
    t = Tracker(tracking_uri=f"jsonl:{path}", run_name="r", params={"lr": 1e-6})
    t.log_metrics({"train/loss": 0.5, "bad": float("nan")}, step=0)
    t.log_metrics({"train/loss": 0.25}, step=1)
    t.finish()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0]["params"] == {"lr": "1e-06"} and rows[0]["run_name"] == "r"
    assert [r["metrics"] for r in rows[1:3]] == [{"train/loss": 0.5}, {"train/loss": 0.25}]
    assert [r["step"] for r in rows[1:3]] == [0, 1] and rows[3]["status"] == "FINISHED"


def test_metrics_written_in_background_keep_order_and_timestamps(uri):
    """log_metrics returns before the write; flush/finish wait; timestamps are the call times."""
    import time

    tr = Tracker(tracking_uri=uri, experiment_name="bg", params={})
    before = int(time.time() * 1000)
    for step in range(20):
        tr.log_metrics({"train/loss": float(step), "perf/x": 2.0 * step}, step=step)
    after = int(time.time() * 1000)
    tr.flush()
    hist = client(uri).get_metric_history(tr.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(s, float(s)) for s in range(20)]
    assert all(before <= m.timestamp <= after for m in hist)
    tr.log_metrics({"train/loss": 99.0}, step=20)
    tr.finish()  # waits for the last write, then ends the run
    run = client(uri).get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 99.0
    assert len(client(uri).get_metric_history(tr.run_id, "perf/x")) == 20


def test_background_write_error_is_raised_by_the_next_call(uri, monkeypatch):
    tr = Tracker(tracking_uri=uri, experiment_name="bg_err", params={})

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tr._client, "log_batch", broken)
    tr.log_metrics({"m": 1.0}, step=0)
    with pytest.raises(RuntimeError, match="disk full"):
        tr.flush()
    monkeypatch.undo()
    tr.log_metrics({"m": 2.0}, step=1)  # the store works again: later writes land
    tr.finish()
    assert [m.value for m in client(uri).get_metric_history(tr.run_id, "m")] == [2.0]


def test_metrics_logged_close_together_go_in_one_write(uri):
    """Steps logged within write_interval_s reach MLflow in one log_batch (each with its own
    step and timestamp); flush writes at once instead of waiting out the interval."""
    import time

    tr = Tracker(tracking_uri=uri, experiment_name="coalesce", params={}, write_interval_s=60.0)
    batches = []
    real = tr._client.log_batch

    def counting(run_id, metrics=(), **kw):
        batches.append(sorted({m.step for m in metrics}))
        return real(run_id, metrics=metrics, **kw)

    tr._client.log_batch = counting
    stamps = []
    for step in range(6):
        before = int(time.time() * 1000)
        tr.log_metrics({"train/loss": float(step), "rollout/raw_reward": 0.5}, step=step)
        stamps.append((before, int(time.time() * 1000)))
        time.sleep(0.002)
    t0 = time.monotonic()
    tr.flush()
    assert time.monotonic() - t0 < 30.0  # did not sit out the 60 s interval
    assert batches == [[0, 1, 2, 3, 4, 5]]
    hist = sorted(client(uri).get_metric_history(tr.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in hist] == [(s, float(s)) for s in range(6)]
    assert all(a <= m.timestamp <= b for m, (a, b) in zip(hist, stamps))  # the log_metrics call's time
    assert len(client(uri).get_metric_history(tr.run_id, "rollout/raw_reward")) == 6
    tr.log_metrics({"train/loss": 7.0}, step=6)
    tr.finish()
    assert batches == [[0, 1, 2, 3, 4, 5], [6]]


def test_metrics_reach_the_store_after_the_interval_without_flush(uri):
    import time

    tr = Tracker(tracking_uri=uri, experiment_name="interval", params={}, write_interval_s=0.2)
    tr.log_metrics({"train/loss": 1.5}, step=0)
    deadline = time.monotonic() + 30.0
    while not client(uri).get_metric_history(tr.run_id, "train/loss") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.value for m in client(uri).get_metric_history(tr.run_id, "train/loss")] == [1.5]
    tr.finish()
