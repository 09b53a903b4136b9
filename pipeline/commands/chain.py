"""The pipeline: run pretrain → sft → reward → ppo in order, each reading its inputs from the
registry, and resume interrupted work.

    rlhf pipeline run configs/tiny/pipeline.yaml [sft.train.max_steps=50 ...] [--from|--only STAGE]
    rlhf pipeline run tiny        (a shipped preset, from any directory: see pipeline/presets.py)
    rlhf resume [RUN]

A pipeline YAML names, per stage, a config file and overrides, plus an optional `seed` (given to
every stage), `start` (a model reference to begin from instead of pretraining) and `rounds`
(collect → reward → ppo again from the last policy: steps `reward.2`, `ppo.2`, ...):

    seed: 0
    start: null
    stages:
      pretrain: {config: configs/tiny/pretrain.yaml}
      sft: {config: configs/tiny/sft.yaml, overrides: {train.max_steps: 200}}

On the command line `STAGE.KEY=VALUE` overrides a stage's config (`sft.train.lr=1e-4`) and any
other `KEY=VALUE` the pipeline's own keys (`start=pretrain:latest`, `stages.sft.config=my.yaml`).

Each stage gets the exact runs of this pipeline as its parents, so a stage whose config, parents
and data match a completed run is reused rather than trained again, and one that was interrupted
resumes from its last committed state: running the same command again continues where it stopped.
The pipeline itself is a registry run (stage "pipeline") whose summary lists its stage runs; its
stage runs point back to it through `pipeline_id`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from pipeline.console import info
from pipeline.config import (Section, StageConfig, apply_override, config_hash, read_yaml, to_dict,
                             validate)
from pipeline.errors import UserError
from pipeline.presets import pipeline_source
from pipeline.registry import PIPELINE_STAGE, Registry, Resolved, Run
from pipeline.console import is_main_process
from stages import STAGES


class StageEntry(Section):
    """One stage of a pipeline: its YAML and the overrides applied on top of it."""

    config: str | None = Field(None, description="the stage's YAML (default: its built-in "
                                                 "defaults)")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys (train.max_steps: 50) or nested mappings applied over `config`")


StagesSection = create_model(
    "StagesSection", __base__=Section,
    **{name: (StageEntry, Field(default_factory=StageEntry)) for name in STAGES})


class PipelineConfig(Section):
    seed: int | None = Field(None, description="when set, the seed of every stage")
    rounds: int = Field(1, ge=1, description="collect → reward → ppo this many times: round r "
                        "trains a reward model on the answers of the SFT policy and of every "
                        "earlier round's PPO policy, then PPO from the last policy (needs "
                        "stages.reward data.answers policy or both)")
    start: str | None = Field(None, description="begin from this model (run id, STAGE:latest, "
                                                "alias, directory or hub name) instead of "
                                                "pretraining")
    stages: StagesSection = Field(default_factory=StagesSection)


@dataclass
class Plan:
    """What one pipeline execution does: the resolved config of every stage in the chain, in
    order, and which of them to run (the others come from the registry)."""

    configs: dict[str, StageConfig]
    selected: list[str]  # steps: stage names, and `reward.2`, `ppo.2`, ... in later rounds
    start: str | None = None
    rounds: int = 1

    def steps(self) -> list[str]:
        """Every step of the chain in order: the stages, then each later round's reward and ppo."""
        return chain_steps(list(self.configs), self.rounds)

    def as_config(self) -> dict:
        return {"start": self.start, "selected": self.selected, "rounds": self.rounds,
                "stages": {name: to_dict(config) for name, config in self.configs.items()}}

    def digest(self) -> str:
        """Same stage configs (checkpoint cadence aside), start, rounds and selection → same
        pipeline."""
        data = {"start": self.start, "selected": self.selected,
                "stages": {name: config_hash(config) for name, config in self.configs.items()}}
        if self.rounds > 1:  # one round is how every pipeline ran before rounds existed
            data["rounds"] = self.rounds
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


ROUND_STAGES = ("reward", "ppo")  # what each round after the first runs again


def chain_steps(stages: list[str], rounds: int) -> list[str]:
    """[..., "reward", "ppo"] and 3 rounds → [..., "reward", "ppo", "reward.2", "ppo.2",
    "reward.3", "ppo.3"]."""
    return [*stages, *(f"{stage}.{round_}" for round_ in range(2, rounds + 1)
                       for stage in ROUND_STAGES)]


def stage_of(step: str) -> str:
    return step.partition(".")[0]


def round_of(step: str) -> int:
    return int(step.partition(".")[2] or 1)


# -- building a plan ------------------------------------------------------------------------------
def expand_dotted(mapping: dict) -> dict:
    """Nested form of a mapping whose keys may be dotted: {"train.lr": 1} → {"train": {"lr": 1}}.

    Keys are laid over each other in order, so a later key wins where two spell the same path.
    """
    nested: dict = {}
    for key, value in mapping.items():
        value = expand_dotted(value) if isinstance(value, dict) else value
        for part in reversed(str(key).split(".")):
            value = {part: value}
        nested = deep_merge(nested, value)
    return nested


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` laid over it: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line overrides → (pipeline-level items, {stage: its items without the prefix})."""
    pipeline_items: list[str] = []
    per_stage: dict[str, list[str]] = {}
    pipeline_keys = list(PipelineConfig.model_fields)
    for item in overrides:
        key, sep, _ = item.partition("=")
        head, dot, _ = key.partition(".")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value "
                            f"(e.g. sft.train.max_steps=50)")
        if head in STAGES and dot:
            per_stage.setdefault(head, []).append(item[len(head) + 1:])
        elif head in pipeline_keys:
            pipeline_items.append(item)
        else:
            close = difflib.get_close_matches(head, [*STAGES, *pipeline_keys], n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else \
                f"start with a stage ({', '.join(STAGES)}) or a pipeline key " \
                f"({', '.join(pipeline_keys)})"
            raise UserError(f"override '{item}': '{head}' is neither a stage nor a pipeline key; "
                            f"{hint}")
    return pipeline_items, per_stage


def load_pipeline_config(path: str | Path, overrides: list[str]) -> tuple[PipelineConfig, dict]:
    """The validated pipeline YAML with its pipeline-level overrides, and the per-stage ones."""
    raw = read_yaml(path)
    pipeline_items, per_stage = split_overrides(overrides)
    for item in pipeline_items:
        apply_override(raw, item)
    return validate(PipelineConfig, raw, str(path)), per_stage


def stage_config(name: str, entry: StageEntry, seed: int | None, extra: list[str],
                 source: str, base: Path | None = None) -> StageConfig:
    """One stage's config: its YAML, then the pipeline seed, its overrides, then the command
    line's. A preset's (`base` set) relative YAML path not found from the working directory is
    the shipped one."""
    where = f"{source} (stages.{name})"
    config_file = entry.config
    if config_file and base is not None and not Path(config_file).exists():
        config_file = str(base / config_file)
    try:
        raw = read_yaml(config_file) if config_file else {}
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    if seed is not None:
        raw["seed"] = seed
    layered = expand_dotted(entry.overrides)
    for item in extra:
        apply_override(layered, item)
    return validate(STAGES[name].load().Config, deep_merge(raw, layered), where)


def chain_stages(start: str | None) -> list[str]:
    """The stages a pipeline goes through: all of them, or all but pretraining given a start."""
    return [name for name in STAGES if not (start and name == "pretrain")]


def select_stages(chain: list[str], from_stage: str | None, only: str | None) -> list[str]:
    """The stages to run: all of `chain`, those from `from_stage` on, or `only` alone."""
    if from_stage and only:
        raise UserError("--from and --only cannot be combined; pick one")
    wanted = from_stage or only
    if wanted is None:
        return list(chain)
    option = "--from" if from_stage else "--only"
    if wanted not in chain:
        if wanted in STAGES:
            raise UserError(f"{option} {wanted}: the pipeline has a start model, so it begins at "
                            f"{chain[0]}; remove start or choose one of {', '.join(chain)}")
        close = difflib.get_close_matches(wanted, chain, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(chain)}"
        raise UserError(f"{option} {wanted}: no such stage; {hint}")
    index = chain.index(wanted)
    return chain[index:] if from_stage else [wanted]


def reached(chain: list[str], selected: list[str]) -> list[str]:
    """The stages an execution goes through: up to the last selected one (later ones are idle)."""
    return chain[: chain.index(selected[-1]) + 1]


def plan_from_yaml(path: str | Path, overrides: list[str], from_stage: str | None = None,
                   only: str | None = None) -> Plan:
    """Validate the pipeline YAML (a file, or a preset's by name) and every stage config it names
    (nothing is registered yet)."""
    path, base = pipeline_source(str(path))
    pipeline_config, per_stage = load_pipeline_config(path, overrides)
    rounds = pipeline_config.rounds
    chain = chain_steps(chain_stages(pipeline_config.start), rounds)
    selected = select_stages(chain, from_stage, only)
    configs = {name: stage_config(name, getattr(pipeline_config.stages, name),
                                  pipeline_config.seed, per_stage.get(name, []), str(path), base)
               for name in dict.fromkeys(map(stage_of, reached(chain, selected)))}
    if rounds > 1 and "reward" in configs and configs["reward"].data.answers == "template":
        raise UserError(f"{path}: rounds: {rounds} retrains the reward model on each round's "
                        f"policy answers, but stages.reward has data.answers: template; set it "
                        f"to policy or both (on the command line: reward.data.answers=both)")
    unused = sorted(set(per_stage) - set(configs))
    if unused:
        say(f"note: the overrides for {', '.join(unused)} are not used: this execution stops at "
            f"{selected[-1]}")
    return Plan(configs, selected, pipeline_config.start, rounds)


def plan_from_run(run: Run) -> Plan:
    """The plan a pipeline run was started with, from its stored resolved config."""
    stored = run.config
    configs = {name: validate(STAGES[name].load().Config, config, f"run {run.id} (stages.{name})")
               for name, config in stored["stages"].items()}
    return Plan(configs, list(stored["selected"]), stored.get("start"), stored.get("rounds", 1))


# -- executing a plan -----------------------------------------------------------------------------
def say(message: str) -> None:
    if is_main_process():
        info(message)


def execute(plan: Plan, registry: Registry, *, restart: bool = False) -> Run | None:
    """Run the plan's stages in order; returns the pipeline run (None on non-main processes).

    The stages before the selected ones come from the registry, and are looked up before the
    pipeline is registered: a missing one leaves no trace.
    """
    start = registry.resolve(plan.start) if plan.start else None
    if start is not None:  # `pretrain:latest` today and tomorrow may differ: record which it was
        plan = replace(plan, start=start.reference)
    outputs: dict[str, Resolved] = {"pretrain": start} if start else {}
    record: dict[str, dict] = {}

    def done(name: str, run: Run, how: str, started: float) -> None:
        outputs[name] = Resolved(run.model_path, run)
        record[name] = {"run": run.id, "how": how, "seconds": round(time.time() - started, 2)}

    names = reached(plan.steps(), plan.selected)
    for name in names[: names.index(plan.selected[0])]:
        done(name, from_registry(stage_of(name), plan.configs[stage_of(name)], registry,
                                 parents_of(name, outputs)), "registry", time.time())
    pipeline = open_pipeline_run(registry, plan, start, restart) if is_main_process() else None
    try:
        for name in plan.selected:
            started = time.time()
            run, how = run_stage(name, plan.configs[stage_of(name)], registry,
                                 parents_of(name, outputs), restart,
                                 pipeline.id if pipeline else None)
            done(name, run, how, started)
            if pipeline:
                registry.update_summary(pipeline.id, {"stages": record})
    except BaseException as err:
        if pipeline:
            registry.set_status(pipeline.id, "interrupted" if isinstance(err, KeyboardInterrupt)
                                else "failed")
        raise
    if pipeline is None:
        return None
    final = outputs[plan.selected[-1]]
    registry.set_status(pipeline.id, "completed", summary={
        "stages": record, "final_run": final.run.id})
    return registry.get(pipeline.id)


def parents_of(step: str, outputs: dict[str, Resolved]) -> dict[str, Resolved]:
    """A step's parents: the upstream outputs of this pipeline, by role. In round r > 1 the
    reward model also samples every earlier round's PPO policy (`answers_from_K`), and PPO starts
    from the last round's policy."""
    stage, round_ = stage_of(step), round_of(step)
    parents = {role: outputs[upstream] for role, upstream in STAGES[stage].inputs.items()}
    if round_ > 1 and stage == "reward":
        parents.update({f"answers_from_{k}": outputs[ppo_step(k)] for k in range(1, round_)})
    elif round_ > 1 and stage == "ppo":
        parents.update(policy=outputs[ppo_step(round_ - 1)], reward=outputs[f"reward.{round_}"])
    return parents


def ppo_step(round_: int) -> str:
    return "ppo" if round_ == 1 else f"ppo.{round_}"


def open_pipeline_run(registry: Registry, plan: Plan, start: Resolved | None,
                      restart: bool) -> Run:
    """The pipeline's registry run: the unfinished or finished one with this plan, or a new one."""
    parents = {"start": start} if start else {}
    digest = plan.digest()
    previous = None if restart else registry.find_matching(PIPELINE_STAGE, digest, "", parents)
    if previous is not None:
        registry.claim(previous.id)
        verb = "rerunning finished" if previous.status == "completed" else "continuing"
        say(f"pipeline: {verb} {previous.id} (stages: {', '.join(plan.selected)})")
        return registry.get(previous.id)
    run = registry.create_run(PIPELINE_STAGE, plan.as_config(), digest, parents=parents)
    say(f"pipeline: new run {run.id} (stages: {', '.join(plan.selected)})")
    return run


def run_stage(step: str, config: StageConfig, registry: Registry, parents: dict[str, Resolved],
              restart: bool, pipeline_id: str | None) -> tuple[Run, str]:
    """Run one step's stage with the given parents; says whether it was new, resumed or reused."""
    stage = stage_of(step)
    before = {run.id: run.status for run in registry.runs(stage)}
    say(f"== {step} ==")
    run = STAGES[stage].load().run(config, registry, restart=restart, pipeline_id=pipeline_id,
                                   parents=parents)
    if run.id not in before:
        return run, "new"
    return run, "reused" if before[run.id] == "completed" else "resumed"


def from_registry(name: str, config: StageConfig, registry: Registry,
                  parents: dict[str, Resolved]) -> Run:
    """A stage that is not run: the newest completed run with this config and these parents,
    else `STAGE:latest`."""
    run = registry.find_matching(name, config_hash(config), None, parents, ("completed",))
    if run is not None:
        say(f"{name}: using {run.id} from the registry (same config and parents)")
        return run
    latest = registry.lookup(f"{name}:latest")
    if latest is None:
        raise UserError(f"{name} is not run in this pipeline and the registry at "
                        f"{registry.home} has no completed {name} run; run the pipeline without "
                        f"--from/--only first")
    say(f"{name}: no run matches this pipeline's {name} config and parents; using "
        f"{name}:latest ({latest.id})")
    return latest


# -- commands -------------------------------------------------------------------------------------
def cmd_pipeline_run(args) -> int:
    plan = plan_from_yaml(args.config, args.overrides, args.from_stage, args.only)
    # Starting past the first stage reads earlier ones from an existing registry: create none.
    registry = Registry(args.home, create=plan.selected[0] == next(iter(plan.configs)))
    pipeline = execute(plan, registry, restart=args.restart)
    if pipeline is not None:
        print_outcome(pipeline, registry)
    return 0


def print_outcome(pipeline: Run, registry: Registry) -> None:
    """A line per stage on stderr, and the pipeline's result as one JSON line on stdout."""
    stages = pipeline.summary["stages"]
    for name, entry in stages.items():
        say(f"{name:<9} {entry['how']:<8} {entry['run']}  ({entry['seconds']:.0f} s)")
    print(json.dumps({"run": pipeline.id, "status": pipeline.status, "stages": stages,
                      "final_run": pipeline.summary["final_run"],
                      "model_path": registry.get(pipeline.summary["final_run"]).model_path}))


def cmd_resume(args) -> int:
    registry = Registry(args.home, create=False)
    target = registry.lookup(args.run) if args.run else most_recent_unfinished(registry)
    if args.run and target is None:
        raise UserError(f"no run '{args.run}' in the registry at {registry.home}; "
                        f"see `rlhf registry ls`")
    if target is None:
        print(f"nothing to resume: no interrupted or failed run in {registry.home}")
        return 0
    if target.status == "completed":
        print(f"{target.id} is already completed; nothing to resume")
        return 0
    if target.status == "running":
        raise UserError(f"{target.id} is still running (process {target.pid} on {target.host}); "
                        f"wait for it or stop it first")
    say(f"resuming {target.id} ({target.stage}, {target.status})")
    if target.stage == PIPELINE_STAGE:
        pipeline = execute(plan_from_run(target), registry)
        if pipeline is not None:
            print_outcome(pipeline, registry)
        return 0
    run = resume_stage_run(registry, target)
    if is_main_process():
        print(json.dumps({"run": run.id, "status": run.status, "model_path": run.model_path}))
    return 0


def most_recent_unfinished(registry: Registry) -> Run | None:
    """The most recently active interrupted or failed run; a stage run that belongs to an
    unfinished pipeline stands for that pipeline (resuming it also runs the later stages)."""
    unfinished = [run for run in registry.runs() if run.status in ("interrupted", "failed")]
    if not unfinished:
        return None
    newest = max(unfinished, key=lambda run: run.updated_at)
    if newest.pipeline_id:
        pipeline = registry.lookup(newest.pipeline_id)
        if pipeline is not None and pipeline.status in ("interrupted", "failed"):
            return pipeline
    return newest


def resume_stage_run(registry: Registry, run: Run) -> Run:
    """Run a stage again with the stored config and the same parents: it continues `run`."""
    module = STAGES[run.stage].load()
    config = validate(module.Config, run.config, f"run {run.id}")
    parents = {role: registry.resolve(ref) for role, ref in run.parents.items()}
    result = module.run(config, registry, parents=parents, pipeline_id=run.pipeline_id)
    if result.id != run.id:
        say(f"{run.id} could not be continued (its data changed since); started {result.id}")
    return result
