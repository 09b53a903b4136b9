"""Tests for pipeline.config: YAML + overrides, one-line errors, the hash, and every shipped YAML.

The merge and error tests use a small config declared here, so they run without importing torch;
the shipped-YAML and stage-contract tests import the real stage modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from pipeline.config import (
    Section,
    StageConfig,
    apply_override,
    config_hash,
    config_keys,
    explain,
    load_config,
    read_yaml,
    to_yaml,
    type_name,
)
from pipeline.errors import UserError
from stages import STAGES

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"

# YAML files read by another parser than a stage's Config. Keep this list short: a YAML whose stem
# is neither a stage nor listed here fails `test_every_shipped_yaml_validates`.
OTHER_PARSERS = {"pipeline"}


class SamplingSection(Section):
    temperature: float = 1.0
    top_k: int = 0


class GenerationSection(Section):
    max_new_tokens: int = 32
    stop: list[str] = Field(default_factory=list)
    sampling: SamplingSection = Field(default_factory=SamplingSection)


class DemoConfig(StageConfig):
    generation: GenerationSection = Field(default_factory=GenerationSection)


def write(tmp_path: Path, text: str, name: str = "demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=(), config_cls=DemoConfig) -> str:
    with pytest.raises(UserError) as caught:
        load_config(config_cls, path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- merge ---------------------------------------------------------------------------------------


def test_yaml_and_overrides_merge_nested_and_typed(tmp_path):
    path = write(tmp_path, "seed: 3\ntrain:\n  lr: 0.1\n  batch_size: 4\n"
                           "generation:\n  sampling:\n    top_k: 5\n")
    config = load_config(DemoConfig, path, [
        "train.lr=3e-4", "train.max_steps=7", "generation.stop=[END, '###']",
        "generation.sampling.temperature=0.5", "runtime.cpu=true"])
    assert config.train.lr == 0.0003 and isinstance(config.train.lr, float)
    assert config.train.max_steps == 7 and isinstance(config.train.max_steps, int)
    assert config.generation.stop == ["END", "###"]
    assert config.generation.sampling.temperature == 0.5
    assert config.runtime.cpu is True
    # Untouched YAML values and siblings of overridden keys survive the merge.
    assert config.seed == 3
    assert config.train.batch_size == 4
    assert config.generation.sampling.top_k == 5
    # Keys set nowhere keep their defaults.
    assert config.train.warmup_steps == 0
    assert config.checkpoint.every_steps == 50


def test_later_override_wins_and_no_path_means_defaults():
    config = load_config(DemoConfig, None, ["train.max_steps=2", "train.max_steps=9"])
    assert config.train.max_steps == 9
    assert load_config(DemoConfig, None) == DemoConfig()


def test_override_value_is_parsed_as_yaml():
    raw: dict = {"train": {"lr": 0.1}}
    apply_override(raw, "train.max_steps=7")
    apply_override(raw, "runtime.report_to=[tensorboard, wandb]")
    apply_override(raw, "generation.sampling.top_k=3")
    apply_override(raw, "seed=")
    assert raw == {"train": {"lr": 0.1, "max_steps": 7},
                   "runtime": {"report_to": ["tensorboard", "wandb"]},
                   "generation": {"sampling": {"top_k": 3}},
                   "seed": ""}


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(DemoConfig, write(tmp_path, "# nothing set\n")) == DemoConfig()


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(DemoConfig, None, ["train.lr=0.25", "generation.stop=[x]"])
    again = load_config(DemoConfig, write(tmp_path, to_yaml(config)))
    assert again == config


# --- errors: one line, naming the key and what to do ----------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("train.max_step=7", "unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
    ("sede=1", "unknown key 'sede'; did you mean 'seed'?"),
    ("generation.sampling.temprature=0.7",
     "unknown key 'generation.sampling.temprature'; "
     "did you mean 'generation.sampling.temperature'?"),
])
def test_unknown_override_key_names_it_and_the_closest_key(override, expected):
    assert error_of(None, [override]) == f"override '{override}': {expected}"


def test_unknown_yaml_key_deep_in_a_section_names_the_file(tmp_path):
    path = write(tmp_path, "generation:\n  sampling:\n    top_kk: 3\n")
    assert error_of(path) == (f"{path}: unknown key 'generation.sampling.top_kk'; "
                              f"did you mean 'generation.sampling.top_k'?")


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    assert error_of(None, ["checkpoint.zzzz=1"]) == (
        "override 'checkpoint.zzzz=1': unknown key 'checkpoint.zzzz'; "
        "valid keys here: every_steps, keep_last")


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=abc", "train.max_steps expects an integer, got 'abc'"),
    ("train.max_steps=2.5", "train.max_steps expects an integer, got 2.5"),
    ("train.lr=fast", "train.lr expects a number, got 'fast'"),
    ("runtime.cpu=maybe", "runtime.cpu expects true or false, got 'maybe'"),
    ("generation.stop=END", "generation.stop expects a list, got 'END'"),
    ("train=5", "train expects a mapping of keys, got 5"),
    ("runtime.precision=fp8",
     "runtime.precision must be 'auto', 'fp32', 'bf16' or 'fp16', got 'fp8'"),
])
def test_wrong_type_names_field_expected_type_and_value(override, expected):
    assert error_of(None, [override]) == f"override '{override}': {expected}"


def test_out_of_range_value_names_the_field_and_the_value():
    message = error_of(None, ["train.max_steps=0"])
    assert message == "override 'train.max_steps=0': train.max_steps must be at least 1, got 0"


def test_wrong_type_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: many\n")
    assert error_of(path) == f"{path}: train.batch_size expects an integer, got 'many'"


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 0\ntrain:\n  lr: 0.1\n   max_steps: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: YAML syntax error:")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    message = error_of(missing)
    assert str(missing) in message and "does not exist" in message


def test_directory_instead_of_config_file(tmp_path):
    assert "is a directory" in error_of(tmp_path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    assert error_of(path) == f"{path}: the top level must be a mapping of keys, got list"


def test_non_utf8_config(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"seed: 0\n# caf\xe9\n")
    assert error_of(path).startswith(f"{path}: not UTF-8 text")


@pytest.mark.parametrize("override", ["train.lr", "=5", "train..lr=1", ".lr=1", "train.=1"])
def test_override_without_key_or_equals_sign(override):
    assert error_of(None, [override]) == (
        f"override '{override}' is not of the form key=value (e.g. train.lr=3e-4)")


def test_read_yaml_returns_the_mapping(tmp_path):
    assert read_yaml(write(tmp_path, "a:\n  b: [1, 2]\n")) == {"a": {"b": [1, 2]}}


# --- config hash ---------------------------------------------------------------------------------


def test_config_hash_ignores_checkpoint_and_trackers_but_not_train():
    base = load_config(DemoConfig, None)
    same = load_config(DemoConfig, None, ["checkpoint.every_steps=7", "checkpoint.keep_last=5",
                                          "runtime.report_to=[tensorboard]",
                                          "runtime.tracker_project=other"])
    other_lr = load_config(DemoConfig, None, ["train.lr=0.5"])
    other_section = load_config(DemoConfig, None, ["generation.sampling.top_k=2"])
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other_lr)
    assert config_hash(base) != config_hash(other_section)
    assert len(config_hash(base)) == 16 and int(config_hash(base), 16) >= 0
    assert config_hash(base) == config_hash(DemoConfig())  # stable across instances


# --- shipped configs and the stage contract -------------------------------------------------------


def shipped_stage_yamls() -> list[Path]:
    """Every configs/*/*.yaml except accelerate files and files read by another parser."""
    return sorted(path for path in CONFIGS.glob("*/*.yaml")
                  if path.parent.name != "accelerate" and path.stem not in OTHER_PARSERS)


def test_shipped_yamls_are_found():
    assert CONFIGS / "tiny" / "pretrain.yaml" in shipped_stage_yamls()


@pytest.mark.parametrize("path", shipped_stage_yamls(),
                         ids=lambda path: str(path.relative_to(CONFIGS)))
def test_every_shipped_yaml_validates(path):
    assert path.stem in STAGES, (
        f"{path.relative_to(REPO_ROOT)}: '{path.stem}' is not a stage in stages/__init__.py; "
        f"rename the file or add its stem to OTHER_PARSERS with the test that validates it")
    config_cls = STAGES[path.stem].load().Config
    assert isinstance(load_config(config_cls, path), config_cls)


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_has_module_config_run_and_tiny_yaml(name):
    module = STAGES[name].load()
    assert issubclass(module.Config, StageConfig), \
        f"{module.__name__}.Config must extend StageConfig"
    assert callable(getattr(module, "run", None)), f"{module.__name__} has no run()"
    assert (CONFIGS / "tiny" / f"{name}.yaml").is_file(), f"configs/tiny/{name}.yaml is missing"
    earlier = list(STAGES)[:list(STAGES).index(name)]
    for role, upstream in STAGES[name].inputs.items():
        assert upstream in earlier, f"stage {name}'s input {role} comes from {upstream}, which is " \
            f"not a stage before it"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_config_key_has_a_description(name):
    """`rlhf config show STAGE --explain` is the reference of every key: none may go unexplained."""
    undescribed = [key for key, field in config_keys(STAGES[name].load().Config)
                   if not (field.description or "").strip()]
    assert not undescribed, f"keys of {name} without a description: {undescribed}"


# --- explain ---------------------------------------------------------------------------------------


def test_type_names_read_as_a_user_writes_values():
    assert type_name(int) == "int"
    assert type_name(float | None) == "float or null"
    assert type_name(Literal["auto", "fp32"]) == "auto|fp32"
    assert type_name(list[Literal["a", "b"]]) == "list of a|b"
    assert type_name(dict[str, str]) == "mapping of str to str"


class ExplainedSection(Section):
    steps: int = Field(10, description="how many steps")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    source: str | None = Field(None, description="where from")


class ExplainedConfig(Section):
    train: ExplainedSection = Field(default_factory=ExplainedSection)
    mode: Literal["fast", "slow"] = Field("fast", description="speed")


def test_explain_gives_every_key_its_type_value_default_and_description():
    config = load_config(ExplainedConfig, None, ["train.steps=3", "train.stop=[END]"])
    assert explain(config).splitlines() == [
        "train.steps: int = 3  (default: 10)", "    how many steps",
        "train.stop: list of str = [END]  (default: [])", "    stop strings",
        "train.source: str or null = null", "    where from",
        "mode: fast|slow = fast", "    speed",
    ]
