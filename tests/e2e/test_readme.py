"""The README cannot rot: every `rlhf` command in its ```bash blocks is run, in order, against a
copy of the tiny pipeline's registry (`shared_pipeline`), from a scratch directory that sees the
repository's configs/, reward_data/ and tests/.

Commands that train get the fast test overrides appended (fewer steps, smaller evals), so the
README's pipeline and stage commands match the shared pipeline's runs and are reused; the ones that
change a config or the data train for a few steps. Commands are run in-process through
`pipeline.commands.cli.main` (the console script's entry point), with stdin holding a chat message.
Lines that launch several processes (`accelerate launch`, `torchrun`) need GPUs and are not run.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_pipeline import fast_overrides, shared_pipeline

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
CHAT_INPUT = "How many legs do three chickens have?\n/exit\n"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands() -> list[str]:
    """The `rlhf` command lines of the README's bash blocks (continuation lines joined)."""
    commands = []
    for block in bash_blocks(README.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("rlhf "):
                commands.append(line.strip())
    return commands


def test_readme_opens_with_title_pitch_and_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first = bash_blocks(text)[0]
    title, pitch = text.split("```bash\n")[0].strip().split("\n", 1)
    assert title == "# rlhf-pipeline" and pitch.strip() and "#" not in pitch
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make demo", "make test"]
    assert all("#" in line for line in first.splitlines())  # each says what it does


def test_readme_shows_every_command_that_matters():
    shown = {" ".join(shlex.split(command)[1:3]) for command in readme_commands()}
    for command in ("pipeline run", "run pretrain", "run sft", "run reward", "run ppo",
                    "resume", "registry ls", "registry lineage", "chat ppo:latest",
                    "report pipeline:latest"):
        assert command in shown, command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch directory with the repository's data and configs, and a copy of the registry."""
    outcome = shared_pipeline(tmp_path_factory)
    directory = tmp_path_factory.mktemp("readme")
    for name in ("configs", "reward_data", "tests"):
        (directory / name).symlink_to(ROOT / name)
    shutil.copytree(outcome.home, directory / "home")
    return directory


def with_fast_overrides(argv: list[str]) -> list[str]:
    if argv[:2] == ["pipeline", "run"]:
        return argv + fast_overrides()
    if argv[0] == "run":
        return argv + fast_overrides(argv[1])
    return argv


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, workspace, monkeypatch, capsys):
    from pipeline.commands.cli import main

    monkeypatch.chdir(workspace)
    monkeypatch.setenv("RLHF_HOME", str(workspace / "home"))
    monkeypatch.setenv("RLHF_NO_PROGRESS", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_INPUT))
    argv = with_fast_overrides(shlex.split(command, comments=True)[1:])
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refusing the command line
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 0, f"`{command}` exited with {code}:\n{err[-3000:]}"
    assert out.strip(), f"`{command}` printed nothing"
