"""End to end: the tiny pipeline with few steps, killed (SIGKILL) during the reward stage and run
again with the same command: pretrain and sft are reused, reward resumes from its committed state,
ppo runs, and a third run does nothing. Then the report card of that pipeline, and the demo.

The pipeline built here is shared with test_chat.py and test_readme.py (`shared_pipeline`): it is
the slow part, so it is built once per test session.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, committed_state, kill_when, rlhf

pytestmark = pytest.mark.e2e

PIPELINE_YAML = "configs/tiny/pipeline.yaml"
KILL_AT_REWARD_STEP = 2

# Per stage: few steps, small batches, short answers, small gold evals and a 3-prompt reward eval
# set, so the whole pipeline takes about a minute; reward commits a state every 2 of its 6 steps
# (the kill point).
FAST = {
    "pretrain": ["train.max_steps=8", "train.batch_size=8", "train.eval_batches=1",
                 "checkpoint.every_steps=4"],
    "sft": ["train.max_steps=6", "train.batch_size=8", "train.eval_batches=1",
            "checkpoint.every_steps=3", "eval.n_prompts=8", "eval.max_new_tokens=16"],
    "reward": ["train.max_steps=6", "train.batch_size=4", "train.eval_batches=1",
               f"checkpoint.every_steps={KILL_AT_REWARD_STEP}", "normalize.prompts=8",
               "normalize.max_new_tokens=16",
               "data.eval_files=[tests/fixtures/data/reward_ranked.jsonl]"],
    "ppo": ["train.max_steps=2", "train.batch_size=4", "train.eval_every=0", "ppo.minibatches=1",
            "generation.max_new_tokens=16", "eval.n_prompts=8", "eval.max_new_tokens=16",
            "checkpoint.every_steps=1"],
}


def fast_overrides(stage: str | None = None) -> list[str]:
    """The FAST overrides as a pipeline takes them (`sft.train.max_steps=6`), or as `rlhf run
    STAGE` takes them when `stage` is given."""
    if stage is not None:
        return list(FAST.get(stage, []))
    return [f"{name}.{item}" for name, items in FAST.items() for item in items]


@dataclass
class PipelineOutcome:
    """What the shared pipeline's three runs printed, and the registry it left."""

    home: Path
    killed_then_rerun: dict       # the JSON line of the run after the kill
    rerun_stderr: str
    third_run: dict
    run_ids_before_third: list[str]
    run_ids_after_third: list[str]


_SHARED: dict[str, PipelineOutcome] = {}


def shared_pipeline(tmp_path_factory) -> PipelineOutcome:
    """Build (once per session) the tiny pipeline: run, SIGKILL in reward, rerun, rerun again."""
    if "outcome" not in _SHARED:
        home = tmp_path_factory.mktemp("pipeline") / "home"
        args = ("pipeline", "run", PIPELINE_YAML, *fast_overrides())
        # A generous deadline: on a busy machine pretrain and sft alone can take minutes.
        kill_when(home, args, committed_state(home, "reward", KILL_AT_REWARD_STEP), timeout=1800)
        rerun = rlhf(home, *args)
        before = run_ids(home)
        third = rlhf(home, *args)
        _SHARED["outcome"] = PipelineOutcome(
            home, last_json(rerun), rerun.stderr, last_json(third), before, run_ids(home))
    return _SHARED["outcome"]


def last_json(result) -> dict:
    return json.loads(result.stdout.splitlines()[-1])


def run_ids(home: Path) -> list[str]:
    return [run["id"] for run in json.loads(rlhf(home, "registry", "ls", "--json").stdout)]


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> PipelineOutcome:
    return shared_pipeline(tmp_path_factory)


def test_rerun_after_a_kill_reuses_resumes_and_runs_the_rest(outcome):
    stages = outcome.killed_then_rerun["stages"]
    assert {name: entry["how"] for name, entry in stages.items()} == \
        {"pretrain": "reused", "sft": "reused", "reward": "resumed", "ppo": "new"}
    resumed = re.search(rf"reward: resuming {stages['reward']['run']} from step (\d+)",
                        outcome.rerun_stderr)
    assert resumed and KILL_AT_REWARD_STEP <= int(resumed.group(1)) < 6  # a state, not the start
    assert "pipeline: continuing" in outcome.rerun_stderr  # the killed pipeline's own record
    assert outcome.killed_then_rerun["status"] == "completed"


def test_lineage_links_each_stage_to_this_pipelines_parents(outcome):
    stages = {name: entry["run"] for name, entry in outcome.killed_then_rerun["stages"].items()}
    tree = json.loads(rlhf(outcome.home, "registry", "lineage", stages["ppo"], "--json").stdout)
    assert tree["parents"]["policy"]["id"] == stages["sft"]
    assert tree["parents"]["reward"]["id"] == stages["reward"]
    assert tree["parents"]["reward"]["parents"]["model"]["id"] == stages["sft"]
    assert tree["parents"]["policy"]["parents"]["model"]["id"] == stages["pretrain"]
    pipeline = json.loads(rlhf(outcome.home, "registry", "show", outcome.killed_then_rerun["run"],
                               "--json").stdout)
    assert pipeline["stage"] == "pipeline" and pipeline["status"] == "completed"
    assert pipeline["summary"]["final_run"] == stages["ppo"]


def test_a_second_rerun_does_nothing(outcome):
    assert {entry["how"] for entry in outcome.third_run["stages"].values()} == {"reused"}
    assert outcome.third_run["run"] == outcome.killed_then_rerun["run"]
    assert outcome.run_ids_after_third == outcome.run_ids_before_third


def test_report_renders_every_plot_as_a_png(outcome, tmp_path):
    out = tmp_path / "report"
    rlhf(outcome.home, "report", outcome.third_run["run"], "--out", str(out))
    markdown = (out / "report.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(images) == ["gold.png", "losses.png", "ppo.png", "reward_accuracy.png",
                              "reward_by_rank.png"]
    page = (out / "report.html").read_text(encoding="utf-8")
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
        assert f'src="{image}"' in page
    import matplotlib.image
    assert matplotlib.image.imread(out / "ppo.png").shape[0] > 100  # decodes: not just a header
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(data["gold"]) == ["pretrain", "sft", "ppo"]  # the reward model writes no answers
    assert all(0 <= gold["mean_gold_score"] <= 1 for gold in data["gold"].values())
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert f"| {stage} | {outcome.third_run['stages'][stage]['run']} | reused |" in markdown


def test_demo_prints_the_report_gold_scores_and_a_conversation(outcome, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(outcome.home, home)  # the demo reruns the finished pipeline: all reused
    result = subprocess.run([sys.executable, "-m", "pipeline.commands.demo", *fast_overrides()], cwd=ROOT,
                            env={**cli_env(), "RLHF_HOME": str(home)}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    report = re.search(r"^report: (\S+)$", out, flags=re.M)
    assert report and Path(report.group(1)).is_file()
    for stage in ("pretrain", "sft", "ppo"):
        assert re.search(rf"^  {stage} +\d\.\d{{3}} ", out, flags=re.M), stage
    assert out.count("  you> ") == 2 and out.count("  assistant> ") == 2
    assert "pipeline: rerunning finished" in result.stderr
