"""Fault injection for stage runs: SIGKILL a real `rlhf run STAGE` at a chosen moment, rerun the
same command, and list every way the result differs from a run that was never interrupted.

The tests in this folder and `benchmarks/soak.py` share it:

    chain = Chain(Path("/tmp/chain"))             # uninterrupted tiny runs, upstream first
    reference = chain.reference("sft")            # runs pretrain, then sft, once each
    outcome = kill_trial(reference, Path("/tmp/trial"), random.Random(7), max_kills=2)
    assert not outcome.problems, outcome.problems

Every process gets the same environment (one thread, no progress bar), so CPU runs are
deterministic and their weights can be compared bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.registry import Registry, directory_problems
from stages import STAGES

_E2E_HELPERS = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
_spec = importlib.util.spec_from_file_location("e2e_helpers", _E2E_HELPERS)
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
ROOT = e2e.ROOT

RUN_TIMEOUT_S = 900
# Fast enough to see a checkpoint's temporary directory (tens of milliseconds for tiny models).
POLL_S = 0.002


def cli_env() -> dict[str, str]:
    # One thread: two cores shared with other processes make multi-threaded BLAS slow, and the
    # uninterrupted and the interrupted runs must use the same thread count to match bit for bit.
    return dict(e2e.cli_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def rlhf(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(e2e.rlhf_command(home, *args), cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


# -- the tiny stage runs --------------------------------------------------------------------------
# The first rows of each file of the embedded world: enough for a few training steps, and small
# enough that loading, encoding and evaluating take a fraction of a second.
TINY_DATA_ROWS = {"pretrain.jsonl": 400, "sft_train.jsonl": 64, "sft_eval.jsonl": 8,
                  "reward_train.jsonl": 32, "reward_eval.jsonl": 8, "ppo_prompts.jsonl": 32,
                  "eval_prompts.jsonl": 2}


def write_tiny_data(directory: Path) -> Path:
    from pipeline.world.farm import write_world

    world = directory / "world"
    write_world(world, seed=0, size="tiny")
    for name, rows in TINY_DATA_ROWS.items():
        lines = (world / name).read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
        (directory / name).write_text("".join(lines), encoding="utf-8")
    shutil.rmtree(world)
    return directory


def stage_args(stage: str, upstream: dict[str, str], data: Path) -> list[str]:
    """`rlhf run` arguments for a few-second run of `stage` on the files of `write_tiny_data`,
    reading `upstream` model directories.

    Two resume states are committed (steps 2 and 4 of 6) before the model is published, so a kill
    can land before, during or after each commit; one is kept, so committing step 4 deletes step
    2 (a crash must never leave neither).
    """
    common = ["train.max_steps=6", "train.batch_size=2", "checkpoint.every_steps=2",
              "checkpoint.keep_last=1", "train.warmup_steps=1", "train.eval_batches=1"]
    if stage == "pretrain":
        return ["run", "pretrain", "--config", "configs/tiny/pretrain.yaml", *common,
                f"data.sources=[{data / 'pretrain.jsonl'}]", "tokenizer.vocab_size=400",
                "data.seq_len=64"]
    if stage == "sft":
        return ["run", "sft", *common, f"model.source={upstream['pretrain']}",
                f"data.train_files=[{data / 'sft_train.jsonl'}]",
                f"data.eval_files=[{data / 'sft_eval.jsonl'}]", "data.max_length=96",
                f"eval.prompts_file={data / 'eval_prompts.jsonl'}", "eval.n_prompts=2",
                "eval.max_new_tokens=4"]
    if stage == "reward":
        return ["run", "reward", *common, f"model.source={upstream['sft']}",
                f"data.train_files=[{data / 'reward_train.jsonl'}]",
                f"data.eval_files=[{data / 'reward_eval.jsonl'}]", "data.max_length=96",
                "normalize.prompts=2", "normalize.max_new_tokens=4"]
    if stage == "ppo":
        return ["run", "ppo", *common, f"model.policy={upstream['sft']}",
                f"model.reward={upstream['reward']}",
                f"data.prompts_file={data / 'ppo_prompts.jsonl'}",
                "generation.max_new_tokens=4", f"eval.prompts_file={data / 'eval_prompts.jsonl'}",
                "eval.n_prompts=2", "eval.max_new_tokens=4", "samples.every_steps=2"]
    raise ValueError(f"no tiny arguments for stage {stage!r}")


def pipeline_overrides(data: Path) -> list[str]:
    """The settings of `stage_args` as `rlhf pipeline run` takes them (`sft.train.max_steps=6`);
    the pipeline itself gives each stage its upstream models."""
    overrides = []
    for stage in STAGES:
        settings = [arg for arg in stage_args(stage, defaultdict(str), data)
                    if "=" in arg and not arg.startswith("model.")]
        overrides += [f"{stage}.{setting}" for setting in settings]
    return overrides


def is_timing(metric: str) -> bool:
    """Metrics that measure the machine, not the training (`step_time`, `tokens_per_s`, PPO's
    `time_generate`, `episodes_per_s`): they differ between any two runs."""
    return metric.endswith(("_time", "_per_s")) or metric.startswith("time_")


# The answers a PPO run sampled along the way, in its run directory.
SAMPLES = "samples.jsonl"


@dataclass
class Reference:
    """An uninterrupted run of one stage: what every interrupted rerun must reproduce."""

    stage: str
    args: list[str]
    home: Path
    run_id: str
    model_path: str
    seconds: float          # wall time of the whole command
    series: dict[str, list[tuple[int, float]]]


class Chain:
    """Uninterrupted tiny runs of each stage, built once each, upstream first, each in its own
    home `root/STAGE` (so a test can copy one stage's home without the others)."""

    def __init__(self, root: Path):
        self.root = root
        self.data = write_tiny_data(root / "data")
        self._references: dict[str, Reference] = {}

    def reference(self, stage: str) -> Reference:
        if stage not in self._references:
            upstream = {name: self.reference(name).model_path for name in STAGES[stage].inputs.values()}
            args = stage_args(stage, upstream, self.data)
            home = self.root / stage
            started = time.monotonic()
            done = rlhf(home, *args)
            if done.returncode != 0:
                raise RuntimeError(f"reference run of {stage} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            self._references[stage] = Reference(
                stage, args, home, result["run"], result["model_path"],
                time.monotonic() - started, signature_series(home, result["run"]))
        return self._references[stage]


def signature_series(home: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric series of a run but timings: per-step losses, the shared loop's `batch_crc`
    (a CRC of the example indices each step saw), PPO's rollout statistics, evaluations."""
    registry = Registry(home, create=False)
    try:
        metrics = registry.metrics(run_id)
    finally:
        registry.close()
    return {name: series for name, series in metrics.items() if not is_timing(name)}


# -- kill points ----------------------------------------------------------------------------------
@dataclass
class KillPoint:
    """When to SIGKILL: `after` seconds into the run, after a state commit, or inside a commit.

    kind "time":   `after` seconds after the process started
    kind "state":  once this process committed state step-`step` (its manifest exists)
    kind "write":  while this process writes its `nth` checkpoint (0-based: states in order, then
                   the published model) into a temporary directory
    kind "seal":   after its `nth` checkpoint was renamed into place, before its manifest exists
    """

    kind: str
    after: float = 0.0
    step: int = 0
    nth: int = 0

    def __str__(self) -> str:
        return {"time": f"at {self.after:.1f}s", "state": f"after state step-{self.step}",
                "write": f"while writing checkpoint #{self.nth}",
                "seal": f"before checkpoint #{self.nth} had its manifest"}[self.kind]


def draw_kill_point(rng: random.Random, reference: Reference) -> KillPoint:
    """A seeded random moment: any time in the run, or just after / inside a checkpoint commit."""
    kind = rng.choice(("time", "state", "write", "write", "seal"))
    return KillPoint(kind, after=rng.uniform(0.2, 1.0) * reference.seconds,
                     step=rng.choice((2, 4)), nth=rng.randrange(3))


class _CommitWatch:
    """Sees checkpoint commits under a home as they happen; counts the new ones."""

    def __init__(self, home: Path, point: KillPoint):
        self.home, self.point = home, point
        # What an earlier kill left (a committed state, a temporary or unsealed directory) is
        # not a new commit of this run.
        self.seen = self._marks() if point.kind != "time" else set()
        self.new = 0

    def reached(self, elapsed: float) -> bool:
        if self.point.kind == "time":
            return elapsed >= self.point.after
        fresh = self._marks() - self.seen
        self.seen |= fresh
        self.new += len(fresh)
        return bool(fresh) and self.new > self.point.nth

    def _marks(self) -> set[tuple[str, int]]:
        """(path, inode) of what the kill point waits for: the manifest of state step-N, the
        temporary directories of commits being written, or directories renamed into place whose
        manifest is not written yet. The inode tells a rewritten directory from its predecessor."""
        kind = self.point.kind
        if kind == "state":
            patterns = [f"runs/*/state/step-{self.point.step}/manifest.json"]
        elif kind == "write":
            patterns = ["runs/*/state/.tmp-step-*", "runs/*/.tmp-model-*"]
        else:
            patterns = ["runs/*/state/step-*", "runs/*/model"]
        marks = set()
        for path in (path for pattern in patterns for path in self.home.glob(pattern)):
            try:
                if kind != "seal" or not (path / "manifest.json").exists():
                    marks.add((str(path), path.stat().st_ino))
            except FileNotFoundError:  # gone between the glob and the look
                continue
        return marks


def run_and_kill(home: Path, args: list[str], point: KillPoint) -> bool:
    """Run `rlhf args` and SIGKILL it at `point`; False when it finished before the point came."""
    with tempfile.TemporaryFile() as stderr:
        watch = _CommitWatch(home, point)
        process = subprocess.Popen(e2e.rlhf_command(home, *args), cwd=ROOT, env=cli_env(),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        started = time.monotonic()
        try:
            while process.poll() is None:
                if watch.reached(time.monotonic() - started):
                    process.kill()
                    process.wait()
                    return True
                if time.monotonic() - started > RUN_TIMEOUT_S:
                    raise TimeoutError(f"rlhf {' '.join(args)} ran past {RUN_TIMEOUT_S}s")
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if process.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"the run failed before the kill point:\n"
                               f"{stderr.read().decode(errors='replace')[-3000:]}")
        return False


# -- one trial ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a trial did (its kills) and everything that went wrong (empty: the run survived)."""

    kills: list[KillPoint] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def kill_trial(reference: Reference, home: Path, rng: random.Random, max_kills: int = 1,
               points: list[KillPoint] | None = None) -> Outcome:
    """Kill the stage's run up to `max_kills` times (at `points`, or drawn), rerun it to the end
    in `home`, and compare it with `reference`."""
    outcome = Outcome()
    for attempt in range(max_kills):
        point = points[attempt] if points else draw_kill_point(rng, reference)
        try:
            if not run_and_kill(home, reference.args, point):
                break
        except RuntimeError as err:  # the run failed on its own, before the kill point
            outcome.problems.append(str(err))
            return outcome
        outcome.kills.append(point)
    final = rlhf(home, *reference.args)
    if final.returncode != 0:
        outcome.problems.append(f"the rerun failed ({final.returncode}): {final.stderr[-2000:]}")
        return outcome
    result = json.loads(final.stdout.strip().splitlines()[-1])
    outcome.problems += registry_problems(home)
    outcome.problems += result_problems(reference, home, result)
    return outcome


def registry_problems(home: Path) -> list[str]:
    """`rlhf registry verify` fails, a registered model is missing or partial, or debris is left."""
    problems = []
    verify = rlhf(home, "registry", "verify")
    if verify.returncode != 0:
        problems.append(f"registry verify exit {verify.returncode}: {verify.stdout.strip()}")
    registry = Registry(home, create=False)
    try:
        for run in registry.runs():
            if run.status != "completed":
                problems.append(f"{run.id} is left {run.status}")
            elif run.stage in STAGES and (not run.model_path
                                          or directory_problems(Path(run.model_path))):
                problems.append(f"{run.id} is completed but its model is not intact: "
                                f"{directory_problems(Path(run.model_path or home / 'missing'))}")
    finally:
        registry.close()
    debris = sorted(str(p.relative_to(home)) for p in home.glob("runs/**/.tmp-*"))
    if debris:
        problems.append(f"temporary directories left behind: {debris}")
    return problems


def result_problems(reference: Reference, home: Path, result: dict) -> list[str]:
    """The rerun's weights and per-step signatures differ from the uninterrupted run's."""
    problems = []
    if result["status"] != "completed":
        problems.append(f"the rerun ended {result['status']}")
        return problems
    try:
        e2e.assert_same_weights(e2e.model_weights(reference.model_path),
                                e2e.model_weights(result["model_path"]))
    except AssertionError as err:
        problems.append(f"weights differ from the uninterrupted run: {err}")
    series = signature_series(home, result["run"])
    for name in sorted(series.keys() | reference.series.keys()):
        if series.get(name) != reference.series.get(name):
            problems.append(f"{name} series differs: {series.get(name)} != "
                            f"{reference.series.get(name)}")
    # PPO writes the answers it sampled along the way: the same, in the same order.
    expected = reference.home / "runs" / reference.run_id / SAMPLES
    found = home / "runs" / result["run"] / SAMPLES
    if expected.exists() and (not found.exists() or found.read_bytes() != expected.read_bytes()):
        problems.append(f"{found} differs from the uninterrupted run's {expected}")
    return problems


def file_digests(home: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `home`."""
    return {str(path.relative_to(home)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(home.rglob("*")) if path.is_file()}
