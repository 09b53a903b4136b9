"""Typed stage configs: YAML files plus dotted `key=value` overrides, validated strictly.

Every stage config is a pydantic model whose sections forbid unknown keys, so a typo fails at load
time with the closest valid key suggested. `load_config(StageConfig, "configs/tiny/sft.yaml",
["train.lr=3e-4"])` returns the validated object; every failure is a one-line `UserError`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from pipeline.data.formats import HubSplit
from pipeline.errors import UserError
from pipeline.guard import MAX_CONFIG_BYTES, MAX_SEED, input_file

# Whole numbers in a config are counts, sizes and seeds: past 2**53 they are typing mistakes, and
# past 2**63 SQLite (the step of a metric) and torch cannot hold them.
MAX_WHOLE_NUMBER = 2**53
NUMBERS = (int, float, int | None, float | None)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are type-checked, numbers
    are finite (NaN and infinity are refused) and whole numbers at most MAX_WHOLE_NUMBER."""

    # Numbers given for text fields (`model.source=2024`) are read as text, not rejected.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info):
        # pydantic reads true as 1 for a number field; in a config that is a slip, not a count.
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in NUMBERS:
            raise PydanticCustomError("bool_for_number", "a number")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _whole_numbers_in_range(cls, value):
        if isinstance(value, int) and not isinstance(value, bool) and \
                abs(value) > MAX_WHOLE_NUMBER:
            raise PydanticCustomError("whole_number_too_large",
                                      f"at most {MAX_WHOLE_NUMBER:,} (2**53)")
        return value


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    eval_every: int = Field(0, ge=0, description="steps between evals; 0 = only at the end")
    eval_batches: int = Field(8, ge=1, description="batches per evaluation")
    log_every: int = Field(1, ge=1, description="steps between logged metrics")
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations "
                                         "in the backward pass: less memory, about a third "
                                         "more compute")


class CheckpointConfig(Section):
    every_steps: int = Field(50, ge=1, description="steps between resume states")
    keep_last: int = Field(2, ge=1, description="resume states kept per run")


class RuntimeConfig(Section):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 where the device supports it, fp32 on CPU")
    cpu: bool = Field(False, description="force the CPU even when a GPU is present")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="trackers that also receive every logged metric and "
        "the config, under HOME/trackers/ (wandb offline unless WANDB_MODE is set; mlflow in "
        "HOME/trackers/mlflow.db unless MLFLOW_TRACKING_URI is set)")
    tracker_project: str = Field("rlhf-pipeline", min_length=1, description="the wandb project "
                                 "and MLflow experiment the runs are filed under")
    compile: bool = Field(False, description="torch.compile the model (GPU)")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="fsdp: parameters, gradients and optimizer state split across the "
        "processes of a torchrun / accelerate launch (FSDP2); none: each process holds them whole")
    fsdp_layers: list[str] = Field(default_factory=list, description="classes sharded as one unit "
                                   "each; empty = the model's own _no_split_modules")
    trust_remote_code: bool = Field(False, description="allow code shipped in model directories")

    @model_validator(mode="after")
    def _trackers_installed(self) -> "RuntimeConfig":
        # Checked as the config is read, so a run fails before it trains or writes anything.
        from pipeline.trackers import missing_tracker
        missing = missing_tracker(self.report_to)
        if missing:
            raise ValueError(f"runtime.report_to names {missing}, whose package is not "
                             f"installed; pip install 'rlhf-pipeline[{missing}]', or remove it "
                             f"from runtime.report_to")
        return self

    @model_validator(mode="after")
    def _warn_on_remote_code(self) -> "RuntimeConfig":
        # Said as the config is read: the first tokenizer or model loaded may run that code.
        if self.trust_remote_code:
            remote_code_warning()
        return self


@functools.cache
def remote_code_warning() -> None:
    """Print the remote-code warning (once per process)."""
    print("warning: runtime.trust_remote_code is true: code shipped in the model directory "
          "will run", file=sys.stderr)


class ModelDtypeSection(Section):
    """Base of every stage's `model` section: the dtype of the weights the stage loads."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights the stage loads and trains: auto = float32 (frozen models "
        "in the compute dtype of runtime.precision); bf16 or fp16 (GPU only) halve them")


class LoraConfig(Section):
    enabled: bool = Field(False, description="train a LoRA adapter instead of every weight")
    r: int = Field(8, ge=1, description="rank of the adapter's low-rank matrices")
    alpha: int = Field(16, ge=1, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="names of the linear layers that get an adapter")


class HubDataSection(Section):
    """A data section's keys for hub data sets, read with `datasets.load_dataset(name, config,
    split=split)`; local files ignore them."""

    config: str | None = Field(None, description="hub data sets: the configuration (subset) to "
                               "load, e.g. harmless-base; none = the data set's default")
    split: str = Field("train", description="hub data sets of the training data: the split to "
                       "load, e.g. train or train[:10%]")

    def hub_split(self) -> HubSplit:
        return HubSplit(self.config, self.split)


class HeldOutHubDataSection(HubDataSection):
    """`HubDataSection` for a stage with held-out files, which come from their own split."""

    eval_split: str = Field("test", description="hub data sets in eval_files: the split to load")

    def eval_hub_split(self) -> HubSplit:
        return HubSplit(self.config, self.eval_split)


class StageConfig(Section):
    """Fields every stage has; each stage subclasses it with its own sections."""

    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of initialization, data order "
                      "and sampling")
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _sharding_supports(self) -> "StageConfig":
        """What sharded training does not cover yet is refused as the config is read."""
        if self.runtime.sharding != "fsdp":
            return self
        lora = getattr(self, "lora", None)
        if lora is not None and lora.enabled:
            raise ValueError("runtime.sharding=fsdp does not support LoRA yet; set "
                             "lora.enabled=false, or runtime.sharding=none")
        ema = getattr(self, "ema", None)
        if ema is not None and ema.decay > 0:
            raise ValueError("runtime.sharding=fsdp does not support the EMA of the policy yet; "
                             "set ema.decay=0, or runtime.sharding=none")
        return self


def load_config(config_cls: type[BaseModel], path: str | Path | None,
                overrides: list[str] = ()) -> BaseModel:
    """Read `path` (YAML), apply `a.b=value` overrides, and validate into `config_cls`."""
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    try:
        return config_cls.model_validate(raw)
    except ValidationError as err:
        error = err.errors()[0]
        source = _error_source(error, path, overrides)
        raise UserError(describe_error(config_cls, error, source)) from None


def _error_source(error: dict, path, overrides) -> str:
    """Name the override that caused an error, else the file."""
    dotted = ".".join(str(part) for part in error["loc"])
    for item in overrides:
        key = item.partition("=")[0]
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return f"override '{item}'"
    return str(path) if path is not None else "config"


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    value silently, so a run would use a setting other than the one the reader sees)."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}  # key → the node that gave it first
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class says what is wrong
                break
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line "
                    f"{earlier.start_mark.line + 1}); keep one of them", key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str):
    """YAML text as Python values, by `UniqueKeyLoader`. A scalar that PyYAML recognizes but
    cannot build (the date 2001-13-45) is a YAML error like any other."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except (ValueError, OverflowError, RecursionError) as err:
        raise yaml.constructor.ConstructorError(None, None, f"cannot read a value ({err})",
                                                None) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir() or not (path.exists() or path.is_symlink()):
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"config file {path} {what}; pass an existing YAML file, "
                        f"e.g. configs/tiny/pretrain.yaml")
    path = input_file(path, "config file", max_bytes=MAX_CONFIG_BYTES)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        kind = "YAML error" if isinstance(err, yaml.constructor.ConstructorError) else \
            "YAML syntax error"
        raise UserError(f"{where}: {kind}: {problem}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in the nested dict; the value is parsed as YAML (so 3 is an int)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
    try:
        value = parse_yaml(text) if text != "" else ""
    except yaml.constructor.ConstructorError as err:  # e.g. a key given twice: {a: 1, a: 2}
        raise UserError(f"override '{item}': {err.problem}") from None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def validate(config_cls: type[BaseModel], raw: dict, source: str) -> BaseModel:
    try:
        return config_cls.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe_error(config_cls, err.errors()[0], source)) from None


_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping of keys", "finite_number": "a finite number",
    "bool_for_number": "a number",
    "whole_number_too_large": f"a whole number of at most {MAX_WHOLE_NUMBER:,} (2**53)",
}


_BOUNDS = {"greater_than": "more than", "greater_than_equal": "at least",
           "less_than": "less than", "less_than_equal": "at most"}


def describe_error(config_cls: type[BaseModel], error: dict, source: str) -> str:
    """Turn one pydantic error into the project's one-line message."""
    loc = [str(part) for part in error["loc"]]
    dotted = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = valid_keys(config_cls, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(loc[:-1] + close)}'?" if close else \
            f"valid keys here: {', '.join(sorted(valid))}"
        return f"{source}: unknown key '{dotted}'; {hint}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "one of the allowed values")
        return f"{source}: {dotted} must be {expected}, got {error.get('input')!r}"
    if kind == "value_error":  # a rule of a config's own (a model validator): its message
        return f"{source}: {error['ctx']['error']}"
    if kind in _BOUNDS:
        bound = next(iter(error.get("ctx", {}).values()), "?")
        return f"{source}: {dotted} must be {_BOUNDS[kind]} {bound}, got {error.get('input')!r}"
    expected = _EXPECTED.get(kind)
    if expected:
        return f"{source}: {dotted} expects {expected}, got {error.get('input')!r}"
    return f"{source}: {dotted}: {error['msg']} (got {error.get('input')!r})"


def valid_keys(config_cls: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the section at `path` (list indices in the path are skipped)."""
    cls = config_cls
    for part in path:
        field = cls.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        cls = annotation
    return list(cls.model_fields)


# Keys that do not change what a run computes: where its states go and how often, and which
# trackers watch it. A run restarted with other values here is still the same run (reused, resumed).
NOT_IN_RESULT = ("checkpoint", "runtime.report_to", "runtime.tracker_project")


def config_hash(config: BaseModel, ignore: tuple[str, ...] = NOT_IN_RESULT) -> str:
    """A stable hash of what determines a run's result: the config without the dotted `ignore`
    keys."""
    data = config.model_dump(mode="json")
    for dotted in ignore:
        *parents, key = dotted.split(".")
        section = data
        for part in parents:
            section = section.get(part, {})
        section.pop(key, None)
    blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


# -- help for every key (`rlhf config show STAGE --explain`) --------------------------------------


def config_keys(config_cls: type[BaseModel], prefix: str = ""):
    """Every leaf key of a config, depth first, as (dotted key, its pydantic field)."""
    for name, field in config_cls.model_fields.items():
        if _is_section(field.annotation):
            yield from config_keys(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def leaf_values(config: BaseModel) -> dict[str, Any]:
    """A config's values by dotted key (`train.lr`), as JSON types, in `config_keys` order."""
    resolved = config.model_dump(mode="json")
    return {key: functools.reduce(lambda node, part: node[part], key.split("."), resolved)
            for key, _ in config_keys(type(config))}


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def type_name(annotation) -> str:
    """A field's type as a user reads it: `int`, `float or null`, `auto|fp32`, `list of str`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else type_name(arg) for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def explain(config: BaseModel) -> str:
    """Every key of a resolved config: its type, its value, its default when the value differs,
    and its description, two lines per key."""
    values = leaf_values(config)
    lines = []
    for key, field in config_keys(type(config)):
        value = values[key]
        default = field.get_default(call_default_factory=True)
        note = "" if value == default else f"  (default: {_as_yaml(default)})"
        lines.append(f"{key}: {type_name(field.annotation)} = {_as_yaml(value)}{note}")
        lines.append(f"    {field.description}")
    return "\n".join(lines) + "\n"


def _as_yaml(value) -> str:
    """A value as it is written in a config file or an override (`null`, `[a, b]`, `true`)."""
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True,
                          width=10**6).strip().removesuffix("\n...").strip()
