"""Tests for pipeline.trackers: the values the trackers are given and the check that their packages
are installed (tests/e2e/test_trackers.py reads back what they log)."""

from __future__ import annotations

import sys

from pipeline.trackers import hyperparameters, missing_tracker


def test_hyperparameters_are_values_every_tracker_takes():
    values = {"train.lr": 0.001, "seed": 3, "lora.enabled": False, "model.source": None,
              "data.sources": ["a.jsonl", "b.jsonl"], "data.columns": {"prompt": "question"},
              "model.policy": "sft:latest"}
    assert hyperparameters(values) == {
        "train.lr": 0.001, "seed": 3, "lora.enabled": False, "model.source": "null",
        "data.sources": '["a.jsonl", "b.jsonl"]', "data.columns": '{"prompt": "question"}',
        "model.policy": "sft:latest"}


def test_a_tracker_whose_package_cannot_be_imported_is_named(monkeypatch):
    assert missing_tracker(["tensorboard", "wandb", "mlflow"]) is None
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    assert missing_tracker(["tensorboard", "mlflow"]) == "mlflow"
