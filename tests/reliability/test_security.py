"""Nothing a checkpoint or model directory holds can run code unless the config says so.

- weights travel only as safetensors; the optimizer, scheduler and RNG states (`.pt`) are read
  with `torch.load(weights_only=True)`, never with a pickle fallback (static check of the source);
- a state file replaced by a pickle that would run code is refused with a one-line error, and the
  code does not run (a marker file proves it);
- `trust_remote_code` comes only from `runtime.trust_remote_code` (default false); code shipped in
  a model directory never runs without it, and with it the warning comes before that code runs;
- registry names and aliases cannot leave the registry home.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from faults import ROOT, STAGES
from pipeline.config import RuntimeConfig, remote_code_warning
from pipeline.errors import UserError
from pipeline.registry import Registry, check_name, sha256_file

pytestmark = pytest.mark.reliability

SOURCE_FILES = sorted(path for folder in ("pipeline", "stages")
                      for path in (ROOT / folder).rglob("*.py"))
PICKLE_MODULES = {"pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
STATE_PICKLES = ("optimizer-", "scheduler-", "rng.pt")  # the only .pt files a state may hold


# -- static checks ------------------------------------------------------------------------------
def unsafe_loading(source: str) -> list[str]:
    """Every way `source` could unpickle: torch.load without weights_only=True, any
    weights_only / allow_pickle value but the safe one, pickle-family imports."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _dotted(node.func) == "torch.load":
            if not any(keyword.arg == "weights_only" and _is_constant(keyword.value, True)
                       for keyword in node.keywords):
                problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif isinstance(node, ast.keyword) and node.arg == "weights_only" \
                and not _is_constant(node.value, True):
            problems.append(f"line {node.value.lineno}: weights_only is not the constant True")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle" \
                and not _is_constant(node.value, False):
            problems.append(f"line {node.value.lineno}: allow_pickle is not False")
        elif isinstance(node, ast.ImportFrom) and node.module == "pickle" and \
                [alias.name for alias in node.names] == ["UnpicklingError"]:
            continue  # the class of torch's weights_only refusal, to catch it: nothing unpickles
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""] + (["torch.load"] if node.module == "torch" and any(
                    alias.name == "load" for alias in node.names) else [])
            for name in names:
                if name.split(".")[0] in PICKLE_MODULES or name == "torch.load":
                    problems.append(f"line {node.lineno}: imports {name}")
    return problems


def remote_code_sources(source: str) -> list[str]:
    """Every `trust_remote_code` that is not fed from the config: a value other than a variable
    named trust / trust_remote_code or `<config>.runtime.trust_remote_code`, a default other than
    False, a `trust` variable assigned from anything but the config."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" \
                and not _from_config(node.value):
            problems.append(f"line {node.value.lineno}: "
                            f"trust_remote_code={ast.unparse(node.value)}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) \
                + node.args.defaults + node.args.kw_defaults
            for argument, default in zip(arguments, defaults):
                if argument.arg == "trust_remote_code" and default is not None \
                        and not _is_constant(default, False):
                    problems.append(f"line {node.lineno}: {node.name}() defaults "
                                    f"trust_remote_code to {ast.unparse(default)}")
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "trust"
                                                  for t in node.targets):
            if not _is_config_flag(node.value):
                problems.append(f"line {node.lineno}: trust = {ast.unparse(node.value)}")
    return problems


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_constant(node: ast.AST, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _is_config_flag(node: ast.AST) -> bool:
    return _dotted(node).endswith(".runtime.trust_remote_code")


def _from_config(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in ("trust", "trust_remote_code")) \
        or _is_config_flag(node)


def test_the_static_checks_catch_what_they_look_for():
    bad_loads = ("torch.load(f)", "torch.load(f, weights_only=False)", "import pickle",
                 "torch.load(f, weights_only=flag)", "from torch import load", "import dill.x",
                 "np.load(f, allow_pickle=True)")
    assert all(unsafe_loading(code) for code in bad_loads)
    assert unsafe_loading("torch.load(f, map_location='cpu', weights_only=True)") == []
    assert unsafe_loading("from pickle import UnpicklingError") == []
    assert unsafe_loading("from pickle import UnpicklingError, loads")
    bad_trust = ("f(trust_remote_code=True)", "f(trust_remote_code=args.trust)",
                 "def f(trust_remote_code=True): pass", "trust = True")
    assert all(remote_code_sources(code) for code in bad_trust)
    assert remote_code_sources("trust = config.runtime.trust_remote_code\n"
                               "def f(trust_remote_code=False): g(trust_remote_code=trust)") == []


@pytest.mark.parametrize("path", SOURCE_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_source_loads_only_weights_and_trusts_remote_code_only_from_the_config(path):
    source = path.read_text(encoding="utf-8")
    assert unsafe_loading(source) == []
    assert remote_code_sources(source) == []


def test_remote_code_is_off_by_default():
    assert RuntimeConfig().trust_remote_code is False


# -- what the tools write -------------------------------------------------------------------------
@pytest.mark.parametrize("stage", list(STAGES))
def test_checkpoints_hold_weights_only_as_safetensors(stage, chain):
    home = chain.reference(stage).home
    published = [path for path in home.glob("runs/*/model/**/*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in published)
    assert not [path for path in published if path.suffix in WEIGHT_SUFFIXES]
    state_files = [path for path in home.glob("runs/*/state/step-*/**/*") if path.is_file()]
    pickles = [path for path in state_files if path.suffix in WEIGHT_SUFFIXES]
    assert pickles, "a resume state holds its optimizer, scheduler and RNG"
    for path in pickles:
        assert path.name.startswith(STATE_PICKLES) and path.parent.name.startswith("step-"), path
        torch.load(path, weights_only=True)  # plain tensors and containers only


# -- hostile files --------------------------------------------------------------------------------
class LeaveMark:
    """Unpickling it with the full unpickler would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).write_text("unpickled")


class RunCommand:
    """A pickle whose loading runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def replace_and_reseal(state_dir: Path, name: str, write) -> Path:
    """Replace a state file and rewrite the manifest to match: an attacker can do both, so the
    manifest check cannot be what stops the file."""
    path = state_dir / name
    write(path)
    manifest = json.loads((state_dir / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(path)
    (state_dir / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("name, hostile", [
    ("rng.pt", lambda marker, path: path.write_bytes(pickle.dumps(RunCommand(marker), protocol=2))),
    ("optimizer-main.pt", lambda marker, path: torch.save(LeaveMark(marker), path)),
], ids=["raw-pickle-runs-os.system", "torch.save-of-an-object"])
def test_a_state_file_that_is_a_pickle_is_refused_not_run(name, hostile, chain, interrupted_home,
                                                           in_process_cli, tmp_path):
    marker = tmp_path / "marker"
    (state_dir,) = interrupted_home.glob("runs/*/state/step-4")
    path = replace_and_reseal(state_dir, name, lambda path: hostile(marker, path))

    resumed = in_process_cli(["--home", str(interrupted_home), *chain.reference("pretrain").args])

    assert not marker.exists(), "the pickle ran"
    assert resumed.code == 2
    assert f"cannot load {path} safely" in resumed.errors[-1]
    assert not any("Traceback" in line for line in resumed.errors)


@pytest.fixture
def remote_code_model(chain, tmp_path) -> tuple[Path, Path]:
    """A copy of the pretrain model whose config and tokenizer name Python code shipped beside
    them (as hub repositories with custom architectures do); the code leaves a marker file."""
    model = tmp_path / "model"
    shutil.copytree(chain.reference("pretrain").model_path, model)
    (model / "manifest.json").unlink()  # a plain directory, not a registry checkpoint
    marker = tmp_path / "marker"
    (model / "shipped_code.py").write_text(
        "import sys\nfrom pathlib import Path\n"
        "print('shipped code ran', file=sys.stderr, flush=True)\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class ShippedConfig(LlamaConfig):\n    pass\n"
        "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n"
        "class ShippedTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    for name, auto_map in (("config.json", {"AutoConfig": "shipped_code.ShippedConfig",
                                            "AutoModelForCausalLM": "shipped_code.ShippedModel"}),
                           ("tokenizer_config.json",
                            {"AutoTokenizer": [None, "shipped_code.ShippedTokenizer"]})):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, "auto_map": auto_map}))
    return model, marker


def test_shipped_code_never_runs_without_trust_remote_code(remote_code_model, chain,
                                                           in_process_cli, tmp_path):
    model, marker = remote_code_model
    result = in_process_cli([
        "--home", str(tmp_path / "home"), "run", "sft", f"model.source={model}",
        f"data.train_files=[{chain.data / 'sft_train.jsonl'}]", "train.max_steps=1",
        "train.batch_size=2", "eval.n_prompts=0", "data.max_length=64", "train.eval_batches=1"])
    assert result.code == 0, result.errors
    assert not marker.exists()


def test_with_trust_remote_code_the_warning_comes_before_the_code(remote_code_model,
                                                                  in_process_cli, tmp_path):
    model, marker = remote_code_model
    no_data = tmp_path / "empty.jsonl"
    no_data.write_text("")
    remote_code_warning.cache_clear()  # it is said once per process
    # The run stops at the (empty) data, after the tokenizer, and its code, loaded.
    result = in_process_cli(["--home", str(tmp_path / "home"), "run", "sft",
                             f"model.source={model}", "runtime.trust_remote_code=true",
                             f"data.train_files=[{no_data}]"])
    assert marker.exists(), "the tokenizer's code should run when trusted"
    warning = [i for i, line in enumerate(result.errors) if "trust_remote_code is true" in line]
    ran = result.errors.index("shipped code ran")
    assert warning and warning[0] < ran, result.errors


# -- names ----------------------------------------------------------------------------------------
ESCAPES = ["..", "../x", "../../etc/passwd", "/etc", "a/b", "a\\b", "a\x00b", ".hidden", "",
           "~", "x" * 65, "abc\n", "a b", "runs/../.."]


@pytest.mark.parametrize("name", ESCAPES, ids=repr)
def test_names_that_could_leave_the_home_are_refused(name, tmp_path):
    with pytest.raises(UserError, match="invalid"):
        check_name(name, "alias")
    registry = Registry(tmp_path / "home")
    try:
        with pytest.raises(UserError):
            registry.run_dir(name)
        with pytest.raises(UserError):
            registry.set_alias(name, "pretrain:latest")
        assert registry.lookup(name) is None
    finally:
        registry.close()
