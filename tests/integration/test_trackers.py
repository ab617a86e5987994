"""`run.report_to`: every metrics row reaches each tracker, read back from the tracker's own local store (TensorBoard
event files, an MLflow file store, trackio's SQLite database, a W&B offline run's summary and config)."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from preftune.cli import main
from preftune.train.rundir import read_metrics

ALL = ["tensorboard", "mlflow", "trackio", "wandb"]
pytestmark = pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in ALL),
                                reason="the tracker extras are not installed (make setup installs them)")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, ):
    """One DPO run on tiny reporting to all four trackers at once (a subprocess: each tracker reads its
    environment at import)."""
    from conftest import PAIRS, write_jsonl

    root = tmp_path_factory.mktemp("trackers")
    data = write_jsonl(root / "pairs.jsonl", PAIRS)
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(root / "wandb"), WANDB_SILENT="true",
               MLFLOW_TRACKING_URI=f"file:{root / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
               TRACKIO_DIR=str(root / "trackio"),
               PYTHONUNBUFFERED="1")
    (root / "wandb").mkdir()
    done = subprocess.run([sys.executable, "-m", "preftune.cli", "dpo", "model=tiny", f"data.train={data}",
                           "data.eval_fraction=0.25", "train.max_steps=3", "train.batch_size=2", "train.progress=false",
                           "train.precision=fp32", f"run.report_to={','.join(ALL)}", f"run.dir={root / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    json.loads(done.stdout)  # the trackers' own chatter stays off stdout, which carries the result
    rows = read_metrics(root / "run" / "metrics.jsonl")
    return root, [(r["step"], r["loss"]) for r in rows if "loss" in r], [(r["step"], r["eval/loss"]) for r in rows
                                                                       if "eval/loss" in r]


def test_tensorboard_event_files_hold_every_row_and_the_plot(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, losses, evals = tracked
    events = EventAccumulator(str(root / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval/loss")] == evals
    assert "training" in events.Tags()["images"]


def test_mlflow_file_store_holds_the_metrics_the_config_and_the_plot(tracked):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps its file store for existing users only
    root, losses, _ = tracked
    client = MlflowClient(tracking_uri=f"file:{root / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, "loss")] == losses
    assert run.data.params["dpo.beta"] == "0.1" and run.info.run_name == "run"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["training.png"]


def test_trackio_database_holds_every_row(tracked):
    root, losses, _ = tracked
    (db,) = list((root / "trackio").glob("*.db"))
    with sqlite3.connect(db) as con:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        rows = con.execute("select step, metrics from metrics order by step").fetchall() if "metrics" in tables else []
    logged = [(step, json.loads(m)["loss"]) for step, m in rows if "loss" in json.loads(m)]
    assert [(s, pytest.approx(v)) for s, v in logged] == losses, tables


def _wandb_records(path):
    """The protobuf records of a W&B offline run file (``run-ID.wandb``): a 7-byte header, then LevelDB-log chunks
    (4-byte checksum, 2-byte length, 1-byte type: 1 whole, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7]) if left >= 7 else (0, 0)
        if length == 0 and kind == 0:  # a block's zero padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_run_holds_every_row_and_the_config(tracked):
    root, losses, evals = tracked
    (run_file,) = list((root / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    history, config = {}, {}
    for record in _wandb_records(run_file):
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[record.history.step.num] = items
        elif record.HasField("run"):
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert [(step, pytest.approx(values["loss"])) for step, values in sorted(history.items())] == losses
    assert [(step, pytest.approx(values["eval/loss"])) for step, values in sorted(history.items())
            if "eval/loss" in values] == evals
    assert config["dpo.beta"] == 0.1 and config["run.report_to"] == "tensorboard,mlflow,trackio,wandb"


def test_an_unknown_or_missing_tracker_is_a_config_error_before_anything_loads(capsys, monkeypatch):
    assert main(["dpo", "model=tiny", "run.report_to=tensorbord"]) == 2
    assert "unknown tracker 'tensorbord'" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["dpo", "model=tiny", "run.report_to=tensorboard,wandb"]) == 2
    assert "run.report_to=wandb needs the wandb package: pip install 'preftune[wandb]'" in capsys.readouterr().err
    assert main(["eval", "model=tiny", "run.report_to=tensorboard"]) == 2
    assert "preftune eval reports to no tracker" in capsys.readouterr().err
