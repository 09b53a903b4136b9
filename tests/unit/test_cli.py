"""Tests for the `rlhf` command line, run the way a user runs it: in a subprocess.

Bad input must give exit code 2 and one line on stderr starting with "error:" (no traceback),
and must leave the registry home exactly as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pipeline.commands.cli import build_parser
from pipeline.registry import Registry

TINY_PRETRAIN = "configs/tiny/pretrain.yaml"


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every command and sub-command of the parser, e.g. (), ('registry',), ('registry', 'ls')."""
    yield prefix
    for action in parser._actions:  # argparse has no public way to list sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, prefix + (name,))


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with its content hash (directories: 'dir')."""
    if not root.exists():
        return {}
    return {str(path.relative_to(root)):
            "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


def assert_one_line_error(returncode: int, stdout: str, stderr: str) -> None:
    assert returncode == 2, (returncode, stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr


# --- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(command_paths(build_parser())),
                         ids=lambda command: " ".join(command) or "rlhf")
def test_help_of_every_command(run_cli, home, command):
    returncode, stdout, stderr = run_cli([*command, "--help"], home)
    assert (returncode, stderr) == (0, "")
    assert stdout.startswith(f"usage: {' '.join(('rlhf',) + command)}")


def test_every_argument_and_command_has_help_text():
    """`--help` explains every option, positional argument and sub-command of every command."""
    silent = []
    for command in command_paths(build_parser()):
        parser = build_parser()
        for name in command:
            parser = next(action.choices[name] for action in parser._actions
                          if isinstance(action, argparse._SubParsersAction))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                silent += [(*command, sub.dest) for sub in action._choices_actions
                           if not sub.help]
            elif not action.help:
                silent.append((*command, action.dest))
    assert not silent, f"arguments without help text: {silent}"


def test_version(run_cli, home):
    import pipeline
    returncode, stdout, stderr = run_cli(["--version"], home)
    assert (returncode, stdout, stderr) == (0, f"rlhf {pipeline.__version__}\n", "")


def test_parser_imports_no_torch():
    code = ("import sys; from pipeline.commands.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


# --- config show ---------------------------------------------------------------------------------


def test_config_show_prints_the_resolved_yaml(run_cli, home):
    returncode, stdout, stderr = run_cli(
        ["config", "show", "pretrain", "--config", TINY_PRETRAIN, "train.lr=0.5"], home)
    assert (returncode, stderr) == (0, "")
    shown = yaml.safe_load(stdout)
    assert shown["train"]["lr"] == 0.5
    assert shown["train"]["max_steps"] == 300  # from the file
    assert shown["train"]["log_every"] == 1    # a default the file does not set
    assert not home.exists()  # showing a config touches no registry


def test_config_show_explain_lists_every_key(run_cli, home):
    from pipeline.config import config_keys
    from stages.ppo import Config
    returncode, stdout, stderr = run_cli(
        ["config", "show", "ppo", "--config", "configs/tiny/ppo.yaml", "--explain"], home)
    assert (returncode, stderr) == (0, "")
    keys = [line.split(":")[0] for line in stdout.splitlines() if not line.startswith(" ")]
    assert keys == [key for key, _ in config_keys(Config)]
    assert "kl.coef: float = 0.05\n    β of the per-token KL penalty" in stdout
    assert "train.max_steps: int = 40  (default: 100)\n    optimizer steps to run" in stdout


# --- bad input: exit 2, one line, registry untouched ----------------------------------------------

BAD_INPUTS = {  # name → (arguments, words the message must contain); {tmp} is a scratch directory
    "missing config file": (["config", "show", "pretrain", "--config", "configs/tiny/nope.yaml"],
                            ["configs/tiny/nope.yaml", "does not exist"]),
    "yaml syntax error": (["config", "show", "pretrain", "--config", "{tmp}/broken.yaml"],
                          ["broken.yaml:3: YAML syntax error"]),
    "unknown key": (["run", "pretrain", "--config", TINY_PRETRAIN, "train.max_step=1"],
                    ["unknown key 'train.max_step'", "did you mean 'train.max_steps'?"]),
    "wrong type": (["run", "pretrain", "--config", TINY_PRETRAIN, "train.max_steps=many"],
                   ["train.max_steps expects an integer, got 'many'"]),
    "missing reference": (["registry", "show", "nope"], ["no run 'nope'"]),
    "missing run to remove": (["registry", "rm", "nope"], ["no run 'nope'"]),
    "home under a file": (["--home", "{tmp}/file/sub", "run", "pretrain", "--config",
                           TINY_PRETRAIN, "train.max_steps=1"], ["file/sub is not writable"]),
    "unknown stage in run": (["run", "nostage"], ["nostage"]),
    "unknown stage in config show": (["config", "show", "nostage"], ["nostage"]),
    # A rule between fields is part of the config: `config show` refuses what `run` would.
    "ppo rule in config show": (["config", "show", "ppo", "train.batch_size=6", "ppo.minibatches=4"],
                                ["train.batch_size=6 does not split into ppo.minibatches=4"]),
    "ppo rule in run": (["run", "ppo", "generation.max_new_tokens=4",
                         "generation.min_new_tokens=5"],
                        ["generation.min_new_tokens=5 exceeds generation.max_new_tokens=4"]),
}


@pytest.fixture(scope="module")
def bad_input_outcomes(run_cli, add_run, tmp_path_factory):
    """Run every BAD_INPUTS command against one registry home holding a published run.

    The commands run side by side (most import torch, which takes seconds); the home is hashed
    before and after. Returns ({case: (returncode, stdout, stderr)}, before, after).
    """
    root = tmp_path_factory.mktemp("bad-input")
    home, scratch = root / "home", root / "scratch"
    scratch.mkdir()
    (scratch / "broken.yaml").write_text("train:\n  lr: 0.1\n   max_steps: 3\n")
    (scratch / "file").write_text("a regular file")
    registry = Registry(home)
    add_run(registry, "pretrain")
    registry.close()  # so that only the commands under test touch the database
    before = tree_digest(home)
    commands = {case: [arg.format(tmp=scratch) for arg in args]
                for case, (args, _) in BAD_INPUTS.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(run_cli, args, home) for case, args in commands.items()}
        outcomes = {case: future.result() for case, future in futures.items()}
    assert (scratch / "file").read_text() == "a regular file"
    return outcomes, before, tree_digest(home)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error(bad_input_outcomes, case):
    returncode, stdout, stderr = bad_input_outcomes[0][case]
    assert_one_line_error(returncode, stdout, stderr)
    for words in BAD_INPUTS[case][1]:
        assert words in stderr


def test_bad_input_leaves_the_registry_home_unchanged(bad_input_outcomes):
    _, before, after = bad_input_outcomes
    assert before and after == before


@pytest.mark.parametrize("command", [["registry", "show", "pretrain:latest"],
                                     ["report", "pipeline:latest"]])
def test_command_without_a_registry_names_the_rlhf_home_it_looked_in(run_cli, home, command):
    returncode, stdout, stderr = run_cli(command, home)  # the home comes from RLHF_HOME
    assert_one_line_error(returncode, stdout, stderr)
    assert f"no registry at {home}" in stderr
    assert not home.exists()


# --- registry commands ---------------------------------------------------------------------------


def test_registry_ls_on_an_empty_home(run_cli, home):
    assert run_cli(["registry", "ls"], home) == (0, f"no runs in {home}\n", "")
    assert run_cli(["registry", "ls", "--json"], home) == (0, "[]\n", "")
    assert not home.exists()


def test_registry_ls_lists_runs(run_cli, home, make_run):
    pretrain = make_run("pretrain")
    sft = make_run("sft", {"model": pretrain.id})
    returncode, stdout, stderr = run_cli(["registry", "ls", "--json"], home)
    assert (returncode, stderr) == (0, "")
    listed = {run["id"]: run for run in json.loads(stdout)}
    assert list(listed) == [pretrain.id, sft.id]
    assert listed[sft.id]["stage"] == "sft" and listed[sft.id]["status"] == "completed"
    assert listed[sft.id]["parents"] == {"model": pretrain.id}

    returncode, stdout, _ = run_cli(["registry", "ls", "--stage", "sft"], home)
    assert returncode == 0
    assert [line.split()[0] for line in stdout.splitlines()] == [sft.id]


def test_registry_show_lineage_alias_and_rm(run_cli, home, make_run):
    pretrain = make_run("pretrain")
    sft = make_run("sft", {"model": pretrain.id})
    assert run_cli(["registry", "alias", "base", pretrain.id], home)[0] == 0
    returncode, stdout, _ = run_cli(["registry", "show", "base", "--json"], home)
    assert returncode == 0 and json.loads(stdout)["id"] == pretrain.id

    returncode, stdout, _ = run_cli(["registry", "lineage", "sft:latest", "--json"], home)
    assert returncode == 0
    assert json.loads(stdout)["parents"]["model"]["id"] == pretrain.id

    returncode, stdout, stderr = run_cli(["registry", "rm", "base"], home)
    assert_one_line_error(returncode, stdout, stderr)
    assert f"is a parent of {sft.id}" in stderr
    removed = run_cli(["registry", "rm", "base", "--force"], home)
    assert removed[:2] == (0, f"removed {pretrain.id}\n")


def test_registry_verify_finds_a_flipped_byte(run_cli, home, make_run, flip_byte):
    run = make_run("pretrain")
    assert run_cli(["registry", "verify"], home) == (0, "all checkpoints intact\n", "")
    weights = Path(run.model_path) / "model.safetensors"
    flip_byte(weights, offset=5)
    returncode, stdout, stderr = run_cli(["registry", "verify"], home)
    assert returncode == 1
    assert stdout.startswith(f"{run.id}: {weights} does not match its sha256")
    assert stderr == "1 problem(s) found\n"
