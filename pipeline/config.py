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
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are type-checked."""

    # Numbers given for text fields (`model.source=2024`) are read as text, not rejected.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a share of lr")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    eval_every: int = Field(0, ge=0, description="steps between evals; 0 = only at the end")
    eval_batches: int = Field(8, ge=1, description="batches per evaluation")
    log_every: int = Field(1, ge=1)


class CheckpointConfig(Section):
    every_steps: int = Field(50, ge=1, description="steps between resume states")
    keep_last: int = Field(2, ge=1, description="resume states kept per run")


class RuntimeConfig(Section):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 where the device supports it, fp32 on CPU")
    cpu: bool = Field(False, description="force the CPU even when a GPU is present")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    compile: bool = Field(False, description="torch.compile the model (GPU)")
    trust_remote_code: bool = Field(False, description="allow code shipped in model directories")

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


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class StageConfig(Section):
    """Fields every stage has; each stage subclasses it with its own sections."""

    seed: int = 0
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


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


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"config file {path} {what}; pass an existing YAML file, "
                        f"e.g. configs/tiny/pretrain.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error: {problem}")
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
        value = yaml.safe_load(text) if text != "" else ""
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
    "dict_type": "a mapping", "model_type": "a mapping of keys",
}


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


def config_hash(config: BaseModel, ignore: tuple[str, ...] = ("checkpoint",)) -> str:
    """A stable hash of what determines a run's result (checkpoint cadence does not)."""
    data = {k: v for k, v in config.model_dump(mode="json").items() if k not in ignore}
    blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")
