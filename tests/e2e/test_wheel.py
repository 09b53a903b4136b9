"""End to end: the wheel installs anywhere and carries the shipped presets.

The project is built as a wheel (`pip wheel --no-deps`), installed into a fresh virtual
environment (its dependencies, torch included, come from this environment's site-packages through
a .pth file, so nothing is downloaded), and `rlhf pipeline run tiny` trains the tiny preset for 2
steps per stage in a temporary directory that holds no checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

pytestmark = pytest.mark.e2e

TWO_STEPS = ["pretrain.train.max_steps=2", "pretrain.train.batch_size=4",
             "pretrain.train.eval_batches=1",
             "sft.train.max_steps=2", "sft.train.batch_size=4", "sft.train.eval_batches=1",
             "sft.eval.n_prompts=2", "sft.eval.max_new_tokens=8",
             "reward.train.max_steps=2", "reward.train.batch_size=2", "reward.train.eval_batches=1",
             "reward.normalize.prompts=2", "reward.normalize.max_new_tokens=8",
             "reward.data.eval_files=[reward_eval.jsonl]",  # 3 rankings, not the world's 200
             "ppo.train.max_steps=2", "ppo.train.batch_size=2", "ppo.train.eval_every=0",
             "ppo.ppo.minibatches=1", "ppo.generation.max_new_tokens=8", "ppo.eval.n_prompts=2",
             "ppo.eval.max_new_tokens=8"]


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=cli_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command} failed:\n{result.stderr[-3000:]}"
    return result


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the source tree (the build writes build/ and egg-info beside it)."""
    source = shutil.copytree(ROOT, out / "source", ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    # No build isolation: setuptools, the build backend, is installed here already (torch
    # requires it), so nothing is downloaded.
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", out / "dist", source], out)
    return next((out / "dist").glob("rlhf_pipeline-*.whl"))


def fresh_venv(directory: Path, wheel: Path) -> Path:
    """A new environment with the wheel installed and this environment's packages reachable."""
    run([sys.executable, "-m", "venv", directory], directory.parent)
    python = directory / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], directory.parent)
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
               directory.parent).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return directory / "bin"


def test_the_wheel_runs_the_tiny_preset_from_any_directory(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    bin_dir = fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "data" / "reward_ranked.jsonl",
                elsewhere / "reward_eval.jsonl")

    located = run([bin_dir / "python", "-c", "import pipeline.presets as p; print(p.shipped_root())"],
                  elsewhere).stdout.strip()
    assert Path(located).is_relative_to(tmp_path / "venv")  # the wheel's copy, not the checkout
    assert (Path(located) / "reward_data" / "train.jsonl").is_file()

    result = run([bin_dir / "rlhf", "--home", "home", "pipeline", "run", "tiny", *TWO_STEPS],
                 elsewhere)
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "completed"
    assert set(outcome["stages"]) == {"pretrain", "sft", "reward", "ppo"}
    assert Path(outcome["model_path"]).is_relative_to(elsewhere / "home")
    home = str((elsewhere / "home").resolve()).encode()  # every stage wrote a home that can move
    assert [path for path in (elsewhere / "home").rglob("*")
            if path.is_file() and home in path.read_bytes()] == []
