"""Tests for pipeline.console: progress bars show on the main process only, and can be off."""

import pytest

from pipeline.console import progress_bar


def finish(desc: str) -> None:
    bar = progress_bar(3, desc, "answer")
    bar.update(3)
    bar.close()


def test_a_bar_shows_its_label_rate_and_unit(monkeypatch, capsys):
    monkeypatch.delenv("RLHF_NO_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    finish("reward: score held-out answers")
    shown = capsys.readouterr().err
    assert "reward: score held-out answers: 100%" in shown
    assert "3/3" in shown and "answer/s" in shown


@pytest.mark.parametrize("env, desc", [({"RLHF_NO_PROGRESS": "1"}, "gold eval"),
                                       ({"RANK": "1"}, "gold eval"),  # not the main process
                                       ({}, "")])                      # no label: no bar
def test_a_bar_is_silent_when_switched_off(env, desc, monkeypatch, capsys):
    monkeypatch.delenv("RLHF_NO_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    finish(desc)
    assert capsys.readouterr().err == ""
