"""Experiment trackers (`runtime.report_to`): TensorBoard, Weights & Biases and MLflow receive
every metric a run logs to the registry, under the run's id, with its config as hyperparameters.

Everything is written inside the registry home, under `HOME/trackers/`:
- tensorboard: `tensorboard/RUN_ID/` (`tensorboard --logdir HOME/trackers/tensorboard`);
- wandb: `wandb/`, offline unless WANDB_MODE says otherwise (`wandb sync` uploads a run later);
- mlflow: the SQLite store `mlflow.db`, or the server or store that MLFLOW_TRACKING_URI names.
wandb and mlflow file the runs under `runtime.tracker_project`.

accelerate's tracker classes do the writing. They are started here rather than through
`Accelerator(log_with=...)`, which hands one name to every tracker as TensorBoard's run directory,
wandb's project and MLflow's experiment alike; here the run id names the run in each, and the
runs of a project stay together.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from pipeline.console import verbosity

def missing_tracker(names) -> str | None:
    """The first of the named trackers whose package is not installed, if any (each tracker's
    module has its name; `pip install rlhf-pipeline[NAME]` installs it)."""
    return next((name for name in names if importlib.util.find_spec(name) is None), None)


def hyperparameters(values: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Config values by dotted key (`config.leaf_values`) as every tracker takes them
    (TensorBoard's hparams take only scalars and text): null as "null", lists and mappings as
    JSON text."""
    return {key: value if isinstance(value, (bool, int, float, str)) else
            json.dumps(value, ensure_ascii=False) for key, value in values.items()}


class Trackers:
    """The trackers of one run, started on the main process; `log` and `finish` pass through."""

    def __init__(self, names, *, run_id: str, project: str, config: dict[str, Any],
                 directory: Path):
        """`config`: the run's config values by dotted key (`config.leaf_values`)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.trackers = [_start(name, run_id, project, directory) for name in names]
        values = {"run": run_id, **hyperparameters(config)}
        for tracker in self.trackers:
            tracker.store_init_configuration(values)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _start(name: str, run_id: str, project: str, directory: Path):
    """Start one tracker. A resumed run continues its own tracker run: the same TensorBoard
    directory, wandb run id and MLflow run."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
    if name == "tensorboard":
        tracker = TensorBoardTracker(run_id, directory / "tensorboard")
    elif name == "wandb":
        import wandb
        # No network, no account: offline unless the user chose a mode.
        tracker = WandBTracker(project, name=run_id, id=run_id, dir=str(directory),
                               mode=os.environ.get("WANDB_MODE", "offline"),
                               settings=wandb.Settings(silent=verbosity() == "quiet"))
    else:
        import mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{directory / 'mlflow.db'}")
        tracker = MLflowTracker(project, logging_dir=str(directory / "mlflow-artifacts"),
                                run_id=_mlflow_run(project, run_id), run_name=run_id)
    tracker.start()
    return tracker


def _mlflow_run(experiment: str, run_name: str) -> str | None:
    """The MLflow run id of an earlier start of this run (before an interruption), if any."""
    import mlflow
    found = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                               filter_string=f"attributes.run_name = '{run_name}'")
    return found[0].info.run_id if found else None
