"""End to end: `runtime.report_to` sends every metric the registry stores, the run's id and its
config to TensorBoard, Weights & Biases (offline) and MLflow (the home's SQLite store); each is
read back from what the tracker wrote: TensorBoard's EventAccumulator, MLflow's client, and the
records of wandb's offline run file."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, rlhf_command, run_json
from pipeline.registry import Registry
from pipeline.trackers import Trackers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, str, dict]:
    """A short pretrain run reported to all three trackers: its home, run id and the metric
    series the registry holds ({name: [(step, value), ...]})."""
    home = tmp_path_factory.mktemp("trackers")
    env = {key: value for key, value in cli_env().items()
           if key not in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    args = ("run", "pretrain", "--config", "configs/tiny/pretrain.yaml", "train.max_steps=3",
            "train.batch_size=4", "data.seq_len=64", "tokenizer.vocab_size=400",
            "runtime.report_to=[tensorboard, wandb, mlflow]", "runtime.tracker_project=farm")
    result = subprocess.run(rlhf_command(home, *args), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    run_id = run_json(result)["run"]
    series = Registry(home, create=False).metrics(run_id)
    assert {"loss", "eval_loss"} <= series.keys()
    return home, run_id, series


def test_tensorboard_has_every_metric_of_the_registry(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    home, run_id, series = tracked_run
    events = EventAccumulator(str(home / "trackers" / "tensorboard" / run_id))
    events.Reload()
    for name, points in series.items():
        logged = events.Scalars(name)  # stored as float32
        assert [event.step for event in logged] == [step for step, _ in points], name
        assert [event.value for event in logged] == pytest.approx([v for _, v in points],
                                                                  rel=1e-6)


def test_mlflow_has_the_run_its_config_and_every_metric(tracked_run):
    from mlflow.tracking import MlflowClient
    home, run_id, series = tracked_run
    client = MlflowClient(f"sqlite:///{home / 'trackers' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("farm")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == run_id
    assert run.data.params["train.max_steps"] == "3"
    assert run.data.params["stage"] == "pretrain"
    for name, points in series.items():
        logged = client.get_metric_history(run.info.run_id, name)
        assert [metric.step for metric in logged] == [step for step, _ in points], name
        assert [metric.value for metric in logged] == pytest.approx([v for _, v in points])


def test_wandb_offline_run_has_the_config_and_every_metric(tracked_run):
    home, run_id, series = tracked_run
    [run_file] = (home / "trackers" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if not name.startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                    history.setdefault(name, []).append(
                        (record.history.step.num, json.loads(item.value_json)))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert history.keys() == series.keys()
    for name, points in series.items():
        assert [step for step, _ in history[name]] == [step for step, _ in points], name
        assert [v for _, v in history[name]] == pytest.approx([v for _, v in points]), name
    assert (config["run"], config["stage"], config["train.max_steps"]) == (run_id, "pretrain", 3)


def test_a_resumed_run_continues_its_mlflow_and_tensorboard_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for steps in ([1, 2], [3]):  # the first start is interrupted after step 2
        trackers = Trackers(["tensorboard", "mlflow"], run_id="sft-1", project="farm",
                            config={"train.lr": 0.5}, directory=tmp_path)
        for step in steps:
            trackers.log(step, {"loss": 1.0 / step})
        trackers.finish()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("farm").experiment_id])
    assert (run.info.run_name, run.data.params) == ("sft-1", {"run": "sft-1", "train.lr": "0.5"})
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(metric.step, metric.value) for metric in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "sft-1"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    assert [event.value for event in events.Scalars("loss")] == pytest.approx([1, 0.5, 1 / 3])


def wandb_records(path: Path):
    """The records of a wandb run file: a ':W&B' header (7 bytes), then LevelDB's log format
    (32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type: 1 whole record,
    2/3/4 its first/middle/last part), each record a wandb_internal Record message."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32 * 1024, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
