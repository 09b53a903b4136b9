"""The runtime every stage uses: accelerate wiring, seeding, resume states, metrics, publishing.

`StageRun.open(...)` decides whether a stage run is new, resumed (an interrupted run with the same
config, parents and data) or already done (reused). It owns the `Accelerator`: device, precision
(bf16 where the device supports it, fp32 on CPU), main-process-only registry writes, metrics to the
registry and optional trackers, committed resume states and the published model. It runs unchanged
on CPU, one GPU, and under `torchrun` / `accelerate launch`.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as transformers_logging

import pipeline
from pipeline.config import RuntimeConfig, StageConfig, config_hash, leaf_values, to_dict
from pipeline.console import info, progress
from pipeline.errors import UserError
from pipeline import sharding
from pipeline.precision import Precision, peak_memory_mib
from pipeline.registry import (Registry, Resolved, Run, commit_directory, directory_problems,
                               list_states)
from pipeline.trackers import Trackers

# Saving or loading a checkpoint is not a long task worth its own bar; stage progress bars are ours.
disable_progress_bars()
transformers_logging.disable_progress_bar()


def runs_on_cpu(cfg: RuntimeConfig) -> bool:
    return cfg.cpu or not torch.cuda.is_available()


def mixed_precision(cfg: RuntimeConfig) -> str:
    """The accelerator's autocast: "bf16" for `auto` on a bf16-capable GPU, else as configured."""
    precision = cfg.precision
    if precision == "auto":
        use_bf16 = not runs_on_cpu(cfg) and torch.cuda.is_bf16_supported()
        precision = "bf16" if use_bf16 else "fp32"
    return "no" if precision == "fp32" else precision


def stage_precision(config: StageConfig) -> Precision:
    """The dtypes of a stage's trained and frozen models (`pipeline.precision`)."""
    return Precision.resolve(config.model.dtype, mixed_precision(config.runtime),
                             runs_on_cpu(config.runtime))


def make_accelerator(cfg: RuntimeConfig) -> Accelerator:
    """One place builds the Accelerator (device, precision policy)."""
    return Accelerator(
        # cpu=True also makes accelerate see a torchrun launch on a CPU machine (gloo, MULTI_CPU)
        cpu=runs_on_cpu(cfg),
        mixed_precision=mixed_precision(cfg),
        dynamo_backend="inductor" if cfg.compile else "no",
    )


def versions() -> dict[str, str]:
    import transformers
    return {"rlhf-pipeline": pipeline.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "git": _git_revision()}


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Where a sharded resume state keeps every process's shard of the optimizer state.
SHARDS_DIR = "optimizer-shards"


@dataclass
class ResumePoint:
    """A committed state to continue from."""

    step: int
    path: Path
    extra: dict
    processes: int | None  # how many processes wrote it (None: a state from before it was noted)


class StageRun:
    """One stage run in the registry plus the accelerator that trains it."""

    def __init__(self, registry: Registry, run: Run, accelerator: Accelerator,
                 config: StageConfig, resume: ResumePoint | None, reused: bool):
        self.registry = registry
        self.run = run
        self.accelerator = accelerator
        self.config = config
        self.resume = resume
        self.reused = reused
        self.trackers: Trackers | None = None  # runtime.report_to's, on the main process

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, stage: str, config: StageConfig, registry: Registry, *,
             parents: dict[str, Resolved], data_fingerprint: str, restart: bool = False,
             pipeline_id: str | None = None) -> "StageRun":
        accelerator = make_accelerator(config.runtime)
        set_seed(config.seed)
        digest = config_hash(config)
        decision = [None, None, False]
        if accelerator.is_main_process:
            decision = _decide(stage, config, digest, registry, parents, data_fingerprint,
                               restart, pipeline_id, accelerator.num_processes)
        broadcast_object_list(decision) if accelerator.num_processes > 1 else None
        run_id, resume, reused = decision
        stage_run = cls(registry, registry.get(run_id), accelerator, config, resume, reused)
        if config.runtime.report_to and not reused and stage_run.is_main:
            stage_run.trackers = Trackers(
                config.runtime.report_to, run_id=run_id, project=config.runtime.tracker_project,
                config={"stage": stage, **leaf_values(config)},
                directory=registry.home / "trackers")
        return stage_run

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return self.registry.run_dir(self.run.id)

    @property
    def sharded(self) -> bool:
        """Whether models are sharded over the processes (`runtime.sharding`, `pipeline.sharding`)."""
        return sharding.active(self.config.runtime.sharding)

    def shard(self, model):
        """`model` sharded in place when the run is sharded (before its optimizer is built)."""
        if not self.sharded:
            return model
        return sharding.shard(model, self.config.runtime.fsdp_layers, self.accelerator.device)

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume else 0

    def say(self, message: str) -> None:
        if self.is_main:
            info(message)

    # -- metrics ------------------------------------------------------------------------------
    def log(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items()}
        if self.is_main:
            self.registry.log_metrics(self.run.id, step, values)
            if self.trackers:
                self.trackers.log(step, values)

    def progress(self, total: int, desc: str):
        """The training steps' progress, starting where a resumed run starts."""
        return progress(total, desc, initial=self.start_step, enabled=self.is_main)

    # -- resume states ------------------------------------------------------------------------
    def save_state(self, step: int, *, models: dict[str, Any], optimizers: dict[str, Any],
                   schedulers: dict[str, Any], extra: dict, tokenizer=None,
                   optimizer_modules: dict[str, Any] | None = None) -> None:
        """Commit `state/step-N/`: models as HF dirs, optimizer/scheduler/RNG, `extra` (JSON).

        Sharded, every process writes its shard of the optimizers' state (`optimizer-shards/`;
        `optimizer_modules` names the module each optimizer trains) into a staging directory that
        the main process moves into the state as it commits it, so the state appears whole or not
        at all. Old states are pruned to `checkpoint.keep_last` only after the new one is
        committed.
        """
        rng_states = _gather_rng(self.accelerator)
        weights = {name: self.full_state_dict(model) for name, model in models.items()}
        shards = self.run_dir / "state" / f".tmp-shards-step-{step}"
        if self.sharded:
            sharding.save_optimizer_shards(optimizers, optimizer_modules, shards)
        if self.is_main:
            def write(tmp: Path) -> None:
                for name, model in models.items():
                    self.accelerator.unwrap_model(model).save_pretrained(
                        tmp / name, state_dict=weights[name])
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp / name)
                if self.sharded:
                    os.rename(shards, tmp / SHARDS_DIR)
                else:
                    for name, optimizer in optimizers.items():
                        torch.save(optimizer.state_dict(), tmp / f"optimizer-{name}.pt")
                for name, scheduler in schedulers.items():
                    torch.save(scheduler.state_dict(), tmp / f"scheduler-{name}.pt")
                torch.save(rng_states, tmp / "rng.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(
                    {"step": step, "processes": self.accelerator.num_processes, "extra": extra},
                    indent=1, ensure_ascii=False))

            commit_directory(self.run_dir / "state" / f"step-{step}", write,
                             home=self.registry.home)
            self._prune_states()
        self.accelerator.wait_for_everyone()

    def full_state_dict(self, model) -> dict:
        """The whole model's weights on the main process; a collective call when sharded."""
        self.accelerator.wait_for_everyone()
        if sharding.is_sharded(model):
            return sharding.full_state_dict(model)
        return self.accelerator.get_state_dict(model)

    def _prune_states(self) -> None:
        keep = self.config.checkpoint.keep_last
        for _, path in list_states(self.run_dir)[keep:]:
            # Renamed first: a kill halfway through the delete leaves `.tmp-` debris (cleared
            # when the run resumes), never a partial step-N that `registry verify` would report.
            trash = path.with_name(f".tmp-pruned-{path.name}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def load_state(self, optimizers: dict[str, Any], schedulers: dict[str, Any],
                   optimizer_modules: dict[str, Any] | None = None) -> dict:
        """Restore optimizers, schedulers and RNG from the resume point; returns its `extra`."""
        path = self.resume.path
        if self.sharded:
            sharding.load_optimizer_shards(optimizers, optimizer_modules, path / SHARDS_DIR)
        for name, optimizer in optimizers.items() if not self.sharded else ():
            optimizer.load_state_dict(_load_tensors(path / f"optimizer-{name}.pt"))
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(_load_tensors(path / f"scheduler-{name}.pt"))
        rng_states = _load_tensors(path / "rng.pt")
        _set_rng(rng_states[self.accelerator.process_index])
        return self.resume.extra

    def state_model_dir(self, name: str = "model") -> Path | None:
        """Where to load model `name` from when resuming (None for a fresh run)."""
        return self.resume.path / name if self.resume else None

    # -- finishing ----------------------------------------------------------------------------
    def publish(self, model, tokenizer, summary: dict, extra_writer=None) -> Path | None:
        """Save the final model as a plain HF directory and mark the run completed. The summary
        gains this process's peak memory (`peak_memory_mib`: GPU allocated, or resident set)."""
        summary = {**summary, "peak_memory_mib": round(peak_memory_mib(self.accelerator.device), 1)}
        self.say(f"peak memory: {summary['peak_memory_mib']:,.1f} MiB "
                 f"({'GPU' if self.accelerator.device.type == 'cuda' else 'resident set'})")
        weights = self.full_state_dict(model)
        final = None
        if self.is_main:
            def write(tmp: Path) -> None:
                self.accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
                if extra_writer is not None:
                    extra_writer(tmp)
            final = self.registry.publish(self.run.id, write, summary)
            self.say(f"published {self.run.id} → {final}")
            self._finish_trackers()
        self.accelerator.wait_for_everyone()
        return final

    # -- failing ------------------------------------------------------------------------------
    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A stage's training runs inside `with stage_run:`; if it raises, the run is marked
        interrupted (Ctrl-C) or failed, so `rlhf resume` finds it. The error propagates."""
        if kind is not None and self.is_main:
            self.registry.set_status(self.run.id, "interrupted" if issubclass(
                kind, KeyboardInterrupt) else "failed")
            self._finish_trackers()

    def _finish_trackers(self) -> None:
        if self.trackers:
            self.trackers.finish()


def _decide(stage, config, digest, registry, parents, data_fingerprint, restart, pipeline_id,
            processes):
    """New run, resume or reuse. Runs on the main process only; returns [run_id, resume, reused]."""
    previous = None if restart else registry.find_matching(stage, digest, data_fingerprint, parents)
    if previous is not None and previous.status == "completed":
        info(f"{stage}: reusing completed run {previous.id} (same config, parents and data; "
             f"--restart trains again)")
        return [previous.id, None, True]
    if previous is not None:
        resume = newest_intact_state(registry, previous)
        check_processes(stage, previous.id, resume, processes)
        clear_debris(registry.run_dir(previous.id))
        registry.claim(previous.id)
        registry.truncate_metrics(previous.id, resume.step if resume else -1)
        where = f"step {resume.step}" if resume else "the start (no committed state)"
        info(f"{stage}: resuming {previous.id} from {where}")
        return [previous.id, resume, False]
    run = registry.create_run(stage, to_dict(config), digest, parents=parents,
                              data_fingerprint=data_fingerprint, versions=versions(),
                              pipeline_id=pipeline_id)
    info(f"{stage}: new run {run.id}")
    return [run.id, None, False]


def check_processes(stage: str, run_id: str, resume: ResumePoint | None, processes: int) -> None:
    """A state resumes only with as many processes as wrote it: the global batch, each process's
    RNG and (sharded) each optimizer shard belong to that number."""
    if resume is None or resume.processes in (None, processes):
        return
    raise UserError(f"{stage} run {run_id} stopped at state step-{resume.step}, written by "
                    f"{resume.processes} process(es); this launch has {processes}: launch it with "
                    f"{resume.processes} (torchrun --nproc_per_node {resume.processes} ...), or "
                    f"pass --restart to train again from the start")


def clear_debris(run_dir: Path) -> None:
    """Remove what a killed process left half-written or half-deleted: `state/.tmp-*`."""
    for debris in (run_dir / "state").glob(".tmp-*"):
        shutil.rmtree(debris, ignore_errors=True)


def newest_intact_state(registry: Registry, run: Run) -> ResumePoint | None:
    """The newest committed state that verifies; broken ones are reported and skipped."""
    for step, path in list_states(registry.run_dir(run.id)):
        problems = directory_problems(path)
        if problems:
            print(f"state step-{step} of {run.id} is not intact ({problems[0]}); "
                  f"falling back to an older state", file=sys.stderr)
            continue
        state = json.loads((path / "trainer_state.json").read_text())
        return ResumePoint(step, path, state["extra"], state.get("processes"))
    return None


def _load_tensors(path: Path):
    """torch.load restricted to tensors and plain containers; never a pickle fallback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickling refusal or a damaged file: both are the user's to fix
        raise UserError(f"cannot load {path} safely ({type(err).__name__}); the state is damaged "
                        f"or not written by this tool; rerun with --restart") from None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng(accelerator: Accelerator) -> list[dict]:
    """Every process's RNG state, indexed by process (main writes them all)."""
    state = _rng_state()
    return gather_object([state]) if accelerator.num_processes > 1 else [state]
