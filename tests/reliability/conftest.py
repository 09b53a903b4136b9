"""Fixtures for the reliability tests.

    chain           uninterrupted tiny runs of each stage (built on first use, once per session)
    pretrain_home   a fresh copy of the home that holds the completed pretrain reference run
    interrupted_home  a fresh copy of a home whose pretrain run was SIGKILLed right after it
                    committed state step-4, keeping two states (2 and 4 are on disk)
    in_process_cli  `in_process_cli(argv)` → CliResult(code, stderr lines, stdout) of `rlhf`,
                    run in this process

The stage runs happen in subprocesses (`faults.rlhf`); commands that fail before any training
run in this process, which is seconds faster per command.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

from faults import Chain, KillPoint, run_and_kill


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: fault injection, corruption, bad input, "
                                       "security and concurrency tests")


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Chain:
    return Chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def pretrain_home(chain, tmp_path) -> Path:
    return shutil.copytree(chain.reference("pretrain").home, tmp_path / "home")


@pytest.fixture(scope="session")
def interrupted_pretrain(chain, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("interrupted") / "home"
    # Checkpoint settings are not part of a run's identity: the reference's command resumes it.
    args = [*chain.reference("pretrain").args, "checkpoint.keep_last=2"]
    assert run_and_kill(home, args, KillPoint("state", step=4))
    return home


@pytest.fixture
def interrupted_home(interrupted_pretrain, tmp_path) -> Path:
    return shutil.copytree(interrupted_pretrain, tmp_path / "home")


class CliResult(NamedTuple):
    code: int
    errors: list[str]  # the non-blank lines written to stderr
    output: str        # stdout


@pytest.fixture
def in_process_cli(capfd, monkeypatch):
    """Run `pipeline.commands.cli.main(argv)` here; a crash (not a clean exit code) fails the test."""
    from pipeline.commands.cli import main
    from pipeline.registry import Registry

    # Registry connections are closed after each command, as a process exit would close them
    # (an open one keeps SQLite's -wal and -shm files beside the database).
    connections = []
    connect = Registry._connect
    monkeypatch.setattr(Registry, "_connect",
                        lambda self: connections.append(connect(self)) or connections[-1])

    def run(argv: list[str]) -> CliResult:
        capfd.readouterr()
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        finally:
            for connection in connections:
                connection.close()
        captured = capfd.readouterr()
        return CliResult(code, [line for line in captured.err.splitlines() if line.strip()],
                         captured.out)

    return run
