"""Tests for pipeline.commands.chain: the pipeline YAML and its overrides, stage selection, and the chaining
itself (parents, reuse, resume, --from/--only, start) with stand-in stages that train nothing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import pipeline.commands.chain as chain
from pipeline.commands.chain import (Plan, deep_merge, execute, expand_dotted,
                                     most_recent_unfinished, plan_from_run, plan_from_yaml,
                                     select_stages, split_overrides)
from pipeline.config import StageConfig, config_hash, to_dict
from pipeline.errors import UserError
from pipeline.registry import PIPELINE_STAGE, resolve_model
from stages import STAGES, Stage

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- pure logic -----------------------------------------------------------------------------------
def test_expand_dotted_nests_keys_and_later_keys_win():
    assert expand_dotted({"train.max_steps": 5, "train": {"lr": 0.1}, "seed": 1}) == \
        {"train": {"max_steps": 5, "lr": 0.1}, "seed": 1}
    assert expand_dotted({"a.b": 1, "a": {"b": 2, "c.d": 3}}) == {"a": {"b": 2, "c": {"d": 3}}}


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"train": {"lr": 1, "max_steps": 10}, "data": {"sources": ["a"]}, "seed": 0}
    merged = deep_merge(base, {"train": {"lr": 2}, "data": {"sources": ["b"]}})
    assert merged == {"train": {"lr": 2, "max_steps": 10}, "data": {"sources": ["b"]}, "seed": 0}
    assert base["train"]["lr"] == 1  # the inputs are not changed


def test_split_overrides_routes_stage_and_pipeline_keys():
    pipeline_items, per_stage = split_overrides(
        ["sft.train.max_steps=5", "start=pretrain:latest", "stages.ppo.config=x.yaml",
         "sft.seed=3", "reward.train.lr=1e-4"])
    assert pipeline_items == ["start=pretrain:latest", "stages.ppo.config=x.yaml"]
    assert per_stage == {"sft": ["train.max_steps=5", "seed=3"], "reward": ["train.lr=1e-4"]}


@pytest.mark.parametrize("item, expected", [
    ("sfft.train.max_steps=5", "did you mean 'sft'?"),
    ("strat=sft:latest", "did you mean 'start'?"),
    ("sft.train.max_steps", "is not of the form key=value"),
])
def test_split_overrides_rejects_unknown_heads(item, expected):
    with pytest.raises(UserError, match=expected):
        split_overrides([item])


def test_select_stages():
    chain_all = ["pretrain", "sft", "reward", "ppo"]
    assert select_stages(chain_all, None, None) == chain_all
    assert select_stages(chain_all, "reward", None) == ["reward", "ppo"]
    assert select_stages(chain_all, None, "sft") == ["sft"]
    with pytest.raises(UserError, match="did you mean 'reward'"):
        select_stages(chain_all, "rewrd", None)
    with pytest.raises(UserError, match="cannot be combined"):
        select_stages(chain_all, "sft", "ppo")
    with pytest.raises(UserError, match="has a start model"):
        select_stages(chain_all[1:], "pretrain", None)


# -- the pipeline YAML ----------------------------------------------------------------------------
def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_stage_config_layers_yaml_seed_overrides_and_command_line(tmp_path):
    stage_yaml = write(tmp_path, "pretrain.yaml", "seed: 1\ntrain: {max_steps: 300, lr: 0.003}\n")
    pipeline_yaml = write(tmp_path, "pipeline.yaml", f"""
seed: 7
stages:
  pretrain:
    config: {stage_yaml}
    overrides: {{train.max_steps: 20, checkpoint: {{every_steps: 5}}}}
""")
    plan = plan_from_yaml(pipeline_yaml, ["pretrain.train.max_steps=3"], only="pretrain")
    config = plan.configs["pretrain"]
    assert (config.seed, config.train.max_steps, config.train.lr, config.checkpoint.every_steps) \
        == (7, 3, 0.003, 5)
    assert list(plan.configs) == ["pretrain"] and plan.selected == ["pretrain"]


def test_overrides_of_stages_not_reached_are_noted(tmp_path, capsys):
    path = write(tmp_path, "pipeline.yaml", "seed: 0\n")
    plan = plan_from_yaml(path, ["ppo.train.lr=0.1", "sft.train.lr=0.2"], only="sft")
    assert list(plan.configs) == ["pretrain", "sft"] and plan.configs["sft"].train.lr == 0.2
    assert "overrides for ppo are not used" in capsys.readouterr().err


def test_start_skips_pretraining(tmp_path):
    pipeline_yaml = write(tmp_path, "pipeline.yaml", "start: some-model\n")
    plan = plan_from_yaml(pipeline_yaml, [], from_stage="reward")
    assert list(plan.configs) == ["sft", "reward", "ppo"]
    assert plan.selected == ["reward", "ppo"] and plan.start == "some-model"


@pytest.mark.parametrize("text, overrides, expected", [
    ("stages: {sfft: {}}", [], "unknown key 'stages.sfft'; did you mean 'stages.sft'?"),
    ("stages: {sft: {overrides: {train.max_step: 3}}}", [],
     "(stages.sft): unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
    ("stages: {sft: {config: missing.yaml}}", [],
     "(stages.sft): config file missing.yaml does not exist"),
    ("seed: 0", ["sft.train.lr=fast"], "(stages.sft): train.lr expects a number, got 'fast'"),
])
def test_pipeline_errors_name_the_key(tmp_path, text, overrides, expected):
    path = write(tmp_path, "pipeline.yaml", text)
    with pytest.raises(UserError) as caught:
        plan_from_yaml(path, overrides)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_shipped_pipelines_validate_and_name_existing_stage_configs(size, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = Path("configs") / size / "pipeline.yaml"
    plan = plan_from_yaml(path, [])
    assert list(plan.configs) == list(STAGES) and plan.selected == list(STAGES)
    for name in STAGES:
        entry = getattr(chain.load_pipeline_config(path, [])[0].stages, name)
        assert entry.config and Path(entry.config).is_file(), f"{path}: stages.{name}.config"


@pytest.mark.parametrize("recipe, lora", [("chat", False), ("chat-lora", True)])
def test_chat_recipes_start_from_a_model_with_small_steps(recipe, lora, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    plan = plan_from_yaml(Path("configs") / recipe / "pipeline.yaml", ["start=my-chat-model"])
    assert plan.start == "my-chat-model" and list(plan.configs) == ["sft", "reward", "ppo"]
    sft, reward, ppo = plan.configs.values()
    assert [config.lora.enabled for config in (sft, reward, ppo)] == [lora] * 3
    # A pretrained model takes small steps, LoRA's adapters larger ones; a system prompt fits.
    assert sft.train.lr == (2e-4 if lora else 1e-5) and sft.train.min_lr_ratio < 1
    assert ppo.train.lr < sft.train.lr
    assert sft.data.max_length == reward.data.max_length == 512


def test_a_stored_plan_rebuilds_into_the_same_pipeline(registry, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    plan = plan_from_yaml("configs/tiny/pipeline.yaml", ["sft.lora.enabled=true"], from_stage="sft")
    run = registry.create_run("pipeline", plan.as_config(), plan.digest(), parents={})
    rebuilt = plan_from_run(registry.get(run.id))
    assert rebuilt.digest() == plan.digest()  # what `rlhf resume` relies on to find the run
    assert rebuilt.configs == plan.configs and rebuilt.selected == ["sft", "reward", "ppo"]


def test_digest_ignores_checkpoint_cadence_but_not_training():
    configs = {"pretrain": StageConfig()}
    digest = Plan(configs, ["pretrain"]).digest()
    assert Plan({"pretrain": StageConfig(checkpoint={"every_steps": 3})}, ["pretrain"]).digest() \
        == digest
    assert Plan({"pretrain": StageConfig(seed=1)}, ["pretrain"]).digest() != digest
    assert Plan(configs, ["pretrain"], start="x").digest() != digest


# -- chaining, with stand-in stages ---------------------------------------------------------------
def write_fake_model(directory: Path) -> None:
    (directory / "config.json").write_text('{"model_type": "llama"}')


class FakeStages:
    """Stages that publish a fake model at once; `fail` makes one raise before publishing, and
    `calls` records each call's stage and parents."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.fail: str | None = None

    def module(self, name: str):
        def run(config, registry, *, restart=False, pipeline_id=None, parents=None):
            self.calls.append((name, {role: p.run.id if p.run else p.path
                                      for role, p in parents.items()}))
            digest = config_hash(config)
            previous = None if restart else registry.find_matching(name, digest, "", parents)
            if previous is not None and previous.status == "completed":
                return previous
            run = previous or registry.create_run(name, to_dict(config), digest, parents=parents,
                                                  pipeline_id=pipeline_id)
            if self.fail == name:
                registry.set_status(run.id, "failed")
                raise RuntimeError(f"{name} broke")
            registry.publish(run.id, write_fake_model)
            return registry.get(run.id)
        return SimpleNamespace(Config=StageConfig, run=run)


@pytest.fixture
def fake(monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(Stage, "load", lambda stage: stages.module(stage.name))
    return stages


def full_plan(**kwargs) -> Plan:
    names = [n for n in STAGES if not (kwargs.get("start") and n == "pretrain")]
    steps = chain.chain_steps(names, kwargs.get("rounds", 1))
    return Plan({name: StageConfig() for name in names}, kwargs.pop("selected", steps), **kwargs)


def test_each_stage_gets_this_pipelines_runs_as_parents(fake, registry):
    pipeline = execute(full_plan(), registry)
    runs = {name: entry["run"] for name, entry in pipeline.summary["stages"].items()}
    assert pipeline.status == "completed" and pipeline.summary["final_run"] == runs["ppo"]
    assert fake.calls == [("pretrain", {}), ("sft", {"model": runs["pretrain"]}),
                          ("reward", {"model": runs["sft"]}),
                          ("ppo", {"policy": runs["sft"], "reward": runs["reward"]})]
    lineage = registry.lineage(runs["ppo"])
    assert lineage["parents"]["reward"]["parents"]["model"]["id"] == runs["sft"]
    assert lineage["parents"]["policy"]["parents"]["model"]["id"] == runs["pretrain"]
    assert {run.stage for run in registry.runs(pipeline_id=pipeline.id)} == set(STAGES)
    assert resolve_model(registry, pipeline.id).run.id == runs["ppo"]


def test_a_finished_pipeline_run_again_reuses_everything(fake, registry):
    first = execute(full_plan(), registry)
    again = execute(full_plan(), registry)
    assert again.id == first.id
    assert {e["how"] for e in again.summary["stages"].values()} == {"reused"}
    assert [e["run"] for e in again.summary["stages"].values()] == \
        [e["run"] for e in first.summary["stages"].values()]
    restarted = execute(full_plan(), registry, restart=True)
    assert restarted.id != first.id
    assert {e["how"] for e in restarted.summary["stages"].values()} == {"new"}


def test_a_failed_pipeline_continues_in_the_failed_stage(fake, registry):
    fake.fail = "reward"
    with pytest.raises(RuntimeError, match="reward broke"):
        execute(full_plan(), registry)
    broken = registry.runs(PIPELINE_STAGE)[-1]
    assert broken.status == "failed" and set(broken.summary["stages"]) == {"pretrain", "sft"}
    assert most_recent_unfinished(registry).id == broken.id  # the pipeline, not its reward run
    fake.fail = None
    pipeline = execute(plan_from_run(broken), registry)
    assert pipeline.id == broken.id and pipeline.status == "completed"
    assert [e["how"] for e in pipeline.summary["stages"].values()] == \
        ["reused", "reused", "resumed", "new"]
    assert most_recent_unfinished(registry) is None


def test_from_and_only_take_earlier_stages_from_the_registry(fake, registry, capsys):
    first = execute(full_plan(), registry)
    runs = {name: entry["run"] for name, entry in first.summary["stages"].items()}
    fake.calls.clear()
    only = execute(full_plan(selected=["reward"]), registry)
    assert [name for name, _ in fake.calls] == ["reward"]
    assert only.summary["stages"]["sft"] == {**only.summary["stages"]["sft"], "how": "registry",
                                             "run": runs["sft"]}
    assert list(only.summary["stages"]) == ["pretrain", "sft", "reward"]
    # A different sft config matches no run: sft:latest stands in, and says so.
    plan = full_plan(selected=["ppo"])
    plan.configs["sft"] = StageConfig(seed=5)
    execute(plan, registry)
    assert "using sft:latest" in capsys.readouterr().err


def test_only_without_upstream_runs_is_a_user_error(fake, registry):
    with pytest.raises(UserError, match="has no completed pretrain run"):
        execute(full_plan(selected=["sft"]), registry)


def test_start_replaces_pretraining_and_is_recorded_as_a_run_id(fake, registry, make_run):
    base = make_run("pretrain")
    registry.set_alias("base", base.id)
    pipeline = execute(full_plan(start="base"), registry)
    assert fake.calls[0] == ("sft", {"model": base.id})
    assert pipeline.config["start"] == base.id and pipeline.parent_runs == {"start": base.id}


def test_rounds_sample_every_earlier_policy_and_ppo_from_the_last(fake, registry):
    pipeline = execute(full_plan(rounds=3), registry)
    runs = {name: entry["run"] for name, entry in pipeline.summary["stages"].items()}
    assert list(runs) == ["pretrain", "sft", "reward", "ppo", "reward.2", "ppo.2", "reward.3",
                          "ppo.3"]
    assert fake.calls[4:] == [
        ("reward", {"model": runs["sft"], "answers_from_1": runs["ppo"]}),
        ("ppo", {"policy": runs["ppo"], "reward": runs["reward.2"]}),
        ("reward", {"model": runs["sft"], "answers_from_1": runs["ppo"],
                    "answers_from_2": runs["ppo.2"]}),
        ("ppo", {"policy": runs["ppo.2"], "reward": runs["reward.3"]})]
    assert len(set(runs.values())) == 8  # each round its own registry runs
    assert pipeline.summary["final_run"] == runs["ppo.3"]


def test_from_a_later_round_takes_the_earlier_rounds_from_the_registry(fake, registry):
    first = execute(full_plan(rounds=2), registry)
    runs = {name: entry["run"] for name, entry in first.summary["stages"].items()}
    fake.calls.clear()
    again = execute(full_plan(rounds=2, selected=["ppo.2"]), registry)
    assert fake.calls == [("ppo", {"policy": runs["ppo"], "reward": runs["reward.2"]})]
    assert again.summary["stages"]["reward.2"]["how"] == "registry"
    assert again.summary["final_run"] == runs["ppo.2"]


def test_rounds_need_reward_data_from_the_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(UserError, match="rounds: 2 retrains the reward model on each round's "
                                        "policy answers"):
        plan_from_yaml("configs/tiny/pipeline.yaml", ["rounds=2"])
    plan = plan_from_yaml("configs/tiny/pipeline.yaml",
                          ["rounds=2", "reward.data.answers=both"], from_stage="reward.2")
    assert plan.selected == ["reward.2", "ppo.2"] and plan.rounds == 2
    assert Plan(plan.configs, plan.selected, rounds=1).digest() != plan.digest()
    assert plan_from_yaml("configs/tiny/pipeline.yaml", ["rounds=2"], only="sft").selected == \
        ["sft"]  # the reward stage is not reached: nothing to check


def test_resume_without_anything_unfinished_says_so(registry, make_run, capsys):
    make_run("pretrain")  # completed: nothing to resume
    chain.cmd_resume(SimpleNamespace(home=str(registry.home), run=None))
    assert "nothing to resume" in capsys.readouterr().out


def test_resume_command_continues_the_failed_pipeline(fake, registry, capsys):
    fake.fail = "sft"
    with pytest.raises(RuntimeError):
        execute(full_plan(), registry)
    fake.fail = None
    chain.cmd_resume(SimpleNamespace(home=str(registry.home), run=None))
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["status"] == "completed"
    assert [e["how"] for e in result["stages"].values()] == ["reused", "resumed", "new", "new"]


def test_resume_command_continues_a_stage_run_with_its_config_and_parents(fake, registry, capsys,
                                                                         make_run):
    base = make_run("pretrain")
    fake.fail = "sft"
    with pytest.raises(RuntimeError):
        chain.STAGES["sft"].load().run(StageConfig(seed=4), registry,
                                       parents={"model": registry.resolve(base.id)})
    failed = registry.runs("sft")[-1]
    fake.fail = None
    chain.cmd_resume(SimpleNamespace(home=str(registry.home), run=failed.id))
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["run"] == failed.id and result["status"] == "completed"
    assert fake.calls[-1] == ("sft", {"model": base.id})


# -- presets ---------------------------------------------------------------------------------------
def test_a_preset_name_runs_its_shipped_configs_from_any_directory(tmp_path, monkeypatch):
    from pipeline.presets import preset_names

    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert {"tiny", "small"} <= set(preset_names())
    plan = plan_from_yaml("tiny", ["sft.train.max_steps=3"])
    assert list(plan.configs) == list(STAGES)
    assert plan.configs["sft"].train.max_steps == 3
    assert plan.configs["reward"].train.max_steps == 1000  # configs/tiny/reward.yaml's value
    monkeypatch.chdir(REPO_ROOT)
    assert plan.digest() == plan_from_yaml("configs/tiny/pipeline.yaml",
                                           ["sft.train.max_steps=3"]).digest()


def test_an_unknown_preset_names_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"tinny: no such file, and not a preset \(presets: .*tiny"):
        plan_from_yaml("tinny", [])


def test_the_report_card_has_a_row_per_round(registry, make_run):
    from pipeline.commands.report import round_rows

    def run_with(stage: str, summary: dict) -> dict:
        run = make_run(stage, publish=False)
        registry.set_status(run.id, "completed", summary=summary)
        return {"run": run.id}

    ppo_1 = {"gold_start/mean_gold_score": 0.60, "gold_sampled_start/mean_gold_score": 0.55,
             "gold_start/count_accuracy": 0.3, "gold_end/mean_gold_score": 0.65,
             "gold_sampled_end/mean_gold_score": 0.62, "rm_score_mean_end": 1.2, "kl_end": 3.0}
    ppo_2 = {"gold_end/mean_gold_score": 0.70, "kl_end": 2.0}
    steps = {"reward": run_with("reward", {"pairwise_accuracy": 0.9}), "ppo": run_with("ppo", ppo_1),
             "reward.2": run_with("reward", {"pairwise_accuracy": 0.8}),
             "ppo.2": run_with("ppo", ppo_2)}
    pipeline = make_run(PIPELINE_STAGE, publish=False)
    registry.set_status(pipeline.id, "completed", summary={"stages": steps})
    rows = round_rows(registry, registry.get(pipeline.id))
    assert list(rows) == [0, 1, 2]
    assert rows[0] == {"gold (greedy)": 0.60, "gold (sampled)": 0.55, "count accuracy": 0.3}
    assert rows[1]["reward accuracy"] == 0.9 and rows[1]["gold (sampled)"] == 0.62
    assert rows[2] == {"reward accuracy": 0.8, "gold (greedy)": 0.70, "gold (sampled)": None,
                       "count accuracy": None, "RM score": None, "KL": 2.0}
    single = make_run(PIPELINE_STAGE, publish=False)
    registry.set_status(single.id, "completed", summary={"stages": {"ppo": steps["ppo"]}})
    assert round_rows(registry, registry.get(single.id)) == {}
