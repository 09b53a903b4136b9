"""One guard at the door: the checks of what a user hands the tool — a file, a number, a model
directory — made before anything is loaded or written.

Every command and stage calls these instead of checking on its own, so one mistake gets one
message (a `UserError`: one line, exit code 2) wherever it is made:

- files: `input_file`, `input_path`, `path_problem`, `output_directory_problem` — missing, a
  directory where a file is expected, a named pipe, a device, a symbolic-link loop, unreadable,
  not writable, larger than it can be (an empty or blank data file is the readers' to refuse);
- numbers: the argparse types made by `number_option` — finite and in range (the numbers of config
  files are checked by their pydantic fields, which refuse NaN, infinity and out-of-range values);
- models: `require_causal_lm` and `require_reward_model` (verified registry checkpoints, the right
  kind of model: causal LM, reward model or LoRA adapter, with a head that fits), and the checks
  they make of a directory: `model_kind`, `weights_problem`, `check_quantization`,
  `check_remote_code`; `check_eos` for a policy that samples answers; `check_chat_model`, the
  checks of a model and its tokenizer that a stage makes before it trains them (EOS, chat
  template, context window).

This module imports no torch or transformers (the few checks that need them import them when they
run), so the command line can use it at parse time.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import stat
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError, first_line

MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit, and every stage seeds numpy
MAX_CONFIG_BYTES = 1_000_000  # a config or pipeline YAML; real ones are a few kilobytes


# -- files ----------------------------------------------------------------------------------------
def path_problem(path: Path, want: str = "file") -> str | None:
    """What makes `path` unusable as `want` ("file", "directory" or "any"), or None.

    A FIFO would block the reader forever and a device never ends, so only regular files (and,
    for "directory" or "any", directories) pass. Symbolic links are followed.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a symbolic link to a missing target" if path.is_symlink() else NOT_FOUND[want]
    except OSError as err:
        return _stat_problem(err)
    except ValueError:  # a NUL byte, which no file name can hold
        return "is not a valid path (it holds a NUL byte)"
    if stat.S_ISDIR(mode):
        if want == "file":
            return "is a directory, expected a file"
        if not _may(path, os.R_OK | os.X_OK):
            return "cannot be read (permission denied)"
        return None
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if want == "directory":
        return "is a file, expected a directory"
    if not _may(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


def _may(path: Path, mode: int) -> bool:
    """Whether this process may access `path` in `mode`, as the user it acts as (its effective
    ids, where the system can tell)."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


NOT_FOUND = {"file": "file not found", "directory": "directory not found",
             "any": "file or directory not found"}
NOT_FOUND_IN_FILE = "not found (a part of the path is a file)"


def _stat_problem(err: OSError) -> str:
    return {errno.ELOOP: "is a symbolic link loop",
            errno.ENAMETOOLONG: "is a name too long for the file system",
            errno.ENOTDIR: NOT_FOUND_IN_FILE,
            errno.EACCES: "cannot be reached (permission denied)"}.get(
        err.errno, f"cannot be read ({err.strerror or err})")


def input_file(path: str | Path, what: str = "", *, max_bytes: int | None = None) -> Path:
    """`path` as a regular, readable file, or a UserError naming it and what is wrong.

    `what` names the setting it came from (`--prompts`, `data.sources`), when there is one.
    """
    path = Path(path).expanduser()
    problem = path_problem(path, "file")
    if problem is None and max_bytes is not None and path.stat().st_size > max_bytes:
        problem = f"is {path.stat().st_size:,} bytes, more than the {max_bytes:,} such a file " \
                  f"can be"
    if problem:
        raise UserError(f"{_named(what)}{path}: {problem}; {_advice(problem)}")
    return path


def input_path(path: str | Path, what: str = "") -> Path:
    """`path` as a readable regular file or directory (data sources may be either)."""
    path = Path(path).expanduser()
    problem = path_problem(path, "any")
    if problem:
        raise UserError(f"{_named(what)}{path}: {problem}; {_advice(problem)}")
    return path


def output_directory_problem(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (or in the nearest existing folder above it,
    where a missing one would be created), or None. Nothing is created."""
    directory = Path(directory).expanduser()
    probe = directory
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    problem = path_problem(probe, "directory")
    if problem:
        return f"{probe} {problem}"
    if not _may(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def _named(what: str) -> str:
    return f"{what}: " if what else ""


def _advice(problem: str) -> str:
    if problem.endswith("not found") or problem.startswith("is a symbolic link"):
        return "check the path"
    if problem.startswith("is a directory"):
        return "name a file inside it"
    if problem.startswith("is a file"):
        return "name a directory"
    if "permission denied" in problem:
        return "make it readable or copy it somewhere readable"
    return "give a regular file"


# -- numbers --------------------------------------------------------------------------------------
def number_problem(value: float, *, low: float | None = None, high: float | None = None,
                   above: float | None = None) -> str | None:
    """Why `value` is out of range, or None. `low`/`high` are inclusive bounds, `above` an
    exclusive lower one; NaN and infinity are never in range."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if above is not None and not value > above:
        return f"must be more than {above}"
    if low is not None and value < low:
        return f"must be at least {low}"
    if high is not None and value > high:
        return f"must be at most {high}"
    return None


def number_option(kind: type = float, **bounds) -> Callable[[str], float | int]:
    """An argparse `type=` that reads a number of `kind` within `bounds` (see `number_problem`);
    a bad value is argparse's one-line usage error, before anything is loaded."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        problem = number_problem(value, **bounds)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value
    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


# The sampling options of chat, generate, label and gold-score.
temperature_option = number_option(float, low=0)
top_k_option = number_option(int, low=0)
max_new_tokens_option = number_option(int, low=1, high=1_000_000)
seed_option = number_option(int, low=0, high=MAX_SEED)


# -- models ---------------------------------------------------------------------------------------
CAUSAL_LM, REWARD_MODEL, ADAPTER = "causal LM", "reward model", "LoRA adapter"
CLASSIFIER, NO_HEAD, UNKNOWN = "classifier", "model without a head", "unknown"
ADAPTER_CONFIG = "adapter_config.json"  # what marks a directory as a peft (LoRA) adapter
REWARD_MARKER = "reward_model.json"     # what the reward stage adds to a published reward model


def read_model_config(directory: Path) -> dict:
    """A model directory's config.json as a dict; a UserError when there is none or it is not
    a JSON object."""
    config_file = directory / "config.json"
    problem = path_problem(config_file, "file")
    if problem:
        raise UserError(f"{directory} is not a model directory: config.json {problem}; point at "
                        f"a Hugging Face model directory (config.json, weights, tokenizer)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err}); restore the file") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: expected a JSON object; restore the file")
    return config


def model_kind(directory: str | Path) -> str:
    """What a local model directory holds: CAUSAL_LM, REWARD_MODEL (a one-label sequence
    classifier), ADAPTER, CLASSIFIER (several labels), NO_HEAD (a bare backbone) or UNKNOWN (a
    config that names no architecture; transformers then goes by its model type)."""
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        return ADAPTER
    if (directory / REWARD_MARKER).is_file():
        return REWARD_MODEL
    config = read_model_config(directory)
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        return UNKNOWN
    names = [str(name) for name in architectures]
    if any(name.endswith("ForSequenceClassification") for name in names):
        labels = config.get("id2label") or {}
        return REWARD_MODEL if config.get("num_labels", len(labels) or 2) == 1 else CLASSIFIER
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in names):
        return CAUSAL_LM
    return NO_HEAD


def weights_problem(directory: Path) -> str | None:
    """Why a model directory's weights cannot be loaded safely, or None.

    Safetensors files are checked without loading them: the header must be JSON and the file as
    long as the header says (a truncated copy, or a pickle renamed to .safetensors, fails here).
    Without safetensors, pickled `pytorch_model*.bin` weights are opened with torch's
    weights_only=True (memory-mapped, so nothing large is read), which refuses anything but
    tensors; transformers loads them the same way.
    """
    shards = sorted(directory.glob("*.safetensors"))
    for shard in shards:
        problem = safetensors_problem(shard)
        if problem:
            return f"{shard} {problem}"
    pickles = sorted(directory.glob("pytorch_model*.bin"))
    if not shards and not pickles:
        return f"{directory} holds no weights (no *.safetensors or pytorch_model.bin)"
    for path in [] if shards else pickles:
        problem = pickle_problem(path)
        if problem:
            return f"{path} {problem}"
    return None


def pickle_problem(path: Path) -> str | None:
    """Why torch refuses to open pickled weights with weights_only=True, or None."""
    import warnings
    from pickle import UnpicklingError

    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol: not the user's
            warnings.simplefilter("ignore")
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # the old (not zip) format cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError:
        return ("holds more than tensors, and pickles can run code, so it is refused; convert the "
                "weights to safetensors")
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        return f"cannot be read as weights ({first_line(err)}); copy or download it again"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None (reads only its header)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_length < 0 or header_length > size - 8:
            return _not_safetensors(head)
        try:
            header = json.loads(handle.read(header_length))
            ends = [entry["data_offsets"][1] for name, entry in header.items()
                    if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return _not_safetensors(head)
    expected = 8 + header_length + max(ends, default=0)
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes); copy or download it again"
    return None


def _not_safetensors(head: bytes) -> str:
    if head.startswith((b"PK", b"\x80")):  # torch.save's zip archive, or a bare pickle
        return ("is a pickle (torch.save), not safetensors; pickles can run code when loaded, so "
                "it is refused: convert the weights to safetensors")
    return "is not a safetensors file (no valid header); copy or download it again"


def check_quantization(directory: Path, config: dict) -> None:
    """Quantized weights (bitsandbytes, GPTQ, AWQ) need kernels this tool does not train with."""
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) \
            else quantization
        raise UserError(f"{directory} holds a quantized model (quantization_config: {method}); "
                        f"this tool trains and samples full-precision weights: point at the "
                        f"unquantized model")


def check_remote_code(directory: Path, config: dict, trust_remote_code: bool) -> None:
    """A model whose architecture exists only as code shipped in its directory (`auto_map`, and a
    model type transformers does not know) loads only when the config allows that code to run.
    With a known model type transformers uses its own class and the shipped code never runs."""
    from transformers import CONFIG_MAPPING

    if config.get("auto_map") and not trust_remote_code and \
            config.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{directory} ships its own model code (auto_map in config.json), which "
                        f"runs only with runtime.trust_remote_code=true; set it if you trust "
                        f"that code, or use a model that transformers supports as it is")


_EXPECTED = {CAUSAL_LM: "a causal LM (a policy or base model)", REWARD_MODEL: "a reward model"}
_ADVICE = {CAUSAL_LM: "pass a model that writes answers, e.g. sft:latest or pretrain:latest",
           REWARD_MODEL: "train one with `rlhf run reward`, or pass a reward checkpoint such as "
                         "reward:latest"}
_WHAT = {REWARD_MODEL: "a reward model, which scores answers and cannot write them",
         CAUSAL_LM: "a causal LM, which writes answers and has no score head",
         ADAPTER: "a LoRA adapter", CLASSIFIER: "a sequence classifier with several labels "
         "(a reward model has one)", NO_HEAD: "a model without a causal language-model head (see "
         "the architectures in its config.json)"}


def require_model(resolved, kind: str, role: str, trust_remote_code: bool = False,
                  adapter: bool = True) -> str:
    """The verified local path of `resolved` (a `pipeline.registry.Resolved`) when it holds a
    model of `kind` (CAUSAL_LM, or with `adapter` a LoRA adapter on one; or REWARD_MODEL) that can
    be loaded safely; else a UserError naming `role` (the config key or option that gave it). A
    hub name must be in the local hub cache or known to the hub; its files are checked by
    transformers as it downloads them."""
    path = resolved.verified_path()
    directory = Path(path)
    if not directory.is_dir():
        problem = hub_model_problem(path, resolved.revision)
        if problem:
            named = "" if role == resolved.reference else f"{role}: "
            raise UserError(f"{named}'{resolved.reference}' is not a run id, alias, STAGE:latest "
                            f"or directory, nor a hub model ({problem}); see `rlhf registry ls`")
        return path
    # "model.policy: /runs/x/model is ..." — but not "/runs/x/model: /runs/x/model is ...".
    named = "" if Path(role).expanduser().resolve() == directory.resolve() else f"{role}: "
    found = model_kind(directory)
    allowed = {kind, UNKNOWN} | ({ADAPTER} if adapter and kind == CAUSAL_LM else set())
    if found not in allowed:
        raise UserError(f"{named}{path} is not {_EXPECTED[kind]}: it is "
                        f"{_WHAT.get(found, found)}; {_ADVICE[kind]}")
    if found == ADAPTER:
        return path  # its base model is checked when the adapter loads it
    config = read_model_config(directory)
    check_quantization(directory, config)
    check_remote_code(directory, config, trust_remote_code)
    problem = weights_problem(directory)
    if problem:
        raise UserError(f"{named}{problem}")
    return path


@functools.lru_cache(maxsize=None)  # a stage checks its model several times: ask the hub once
def hub_model_problem(name: str, revision: str | None) -> str | None:
    """Why the hub model `name` at `revision` (None: the default branch) cannot be had, or None
    when the local hub cache holds it or the hub knows it."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    for marker in ("config.json", ADAPTER_CONFIG):
        if isinstance(huggingface_hub.try_to_load_from_cache(name, marker, revision=revision), str):
            return None
    if constants.HF_HUB_OFFLINE:
        return "not in the local hub cache, and HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.model_info(name, revision=revision)
    except errors.RevisionNotFoundError:
        return f"the hub has no revision '{revision}' of {name}"
    except errors.RepositoryNotFoundError:
        return "the hub has no model of that name, or it is private: log in with `hf auth login`"
    except Exception as err:  # no network: the HTTP library's errors differ between versions
        return f"the hub cannot be reached: {first_line(err)}"
    return None


def require_causal_lm(resolved, role: str, trust_remote_code: bool = False,
                      adapter: bool = True) -> str:
    return require_model(resolved, CAUSAL_LM, role, trust_remote_code, adapter)


def require_reward_model(resolved, role: str, trust_remote_code: bool = False) -> str:
    return require_model(resolved, REWARD_MODEL, role, trust_remote_code)


def check_eos(tokenizer, model, where: str) -> None:
    """Sampled answers end at EOS: the tokenizer needs one, and the model must know its id."""
    eos = tokenizer.eos_token_id
    if eos is None or eos >= model.get_input_embeddings().num_embeddings:
        raise UserError(f"the tokenizer at {where} has no EOS token the model knows, so sampled "
                        f"answers could never end; use a policy whose tokenizer defines "
                        f"eos_token (e.g. the output of `rlhf run sft`)")


# Where config.json gives a model's context window, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(path: str, tokenizer) -> int:
    """The longest sequence the model at `path` takes: the smaller of its config's position limit
    (a LoRA adapter's is its base model's) and the tokenizer's `model_max_length`."""
    limits = [tokenizer.model_max_length]
    directory = Path(path)
    if (directory / ADAPTER_CONFIG).is_file():
        try:
            directory = Path(json.loads((directory / ADAPTER_CONFIG).read_text())
                             ["base_model_name_or_path"])
        except (ValueError, KeyError, TypeError):
            return min(limits)  # loading the adapter names what is wrong with its config
    if (directory / "config.json").is_file():
        config = read_model_config(directory)
        config = {**config.get("text_config", {}), **config}  # multimodal configs nest it
        limits += [config[key] for key in _CONTEXT_KEYS if isinstance(config.get(key), int)][:1]
    return min(limits)


def check_chat_model(path: str, tokenizer, role: str, max_length: int | None = None) -> None:
    """What a stage checks of a model and its tokenizer before it trains them: the tokenizer ends
    answers with an EOS token, its chat template marks the answers to train on (see
    `pipeline.tokenizer.answer_marking_problem`), and `max_length` (`data.max_length`) fits the
    model's context window. Each refusal is one UserError naming `role` and the model."""
    from pipeline.tokenizer import answer_marking_problem

    if tokenizer.eos_token is None:
        raise UserError(f"{role}: the tokenizer at {path} has no EOS token, so answers could "
                        f"never end; set eos_token in its tokenizer_config.json to the token "
                        f"that ends a turn")
    cannot = f"{role}: the chat template of {path} cannot mark answers to train on"
    try:
        problem = answer_marking_problem(tokenizer)
    except UserError as err:  # the template failed on the conversation, and says why
        raise UserError(f"{cannot}: {err}") from None
    if problem:
        raise UserError(f"{cannot}: {problem}; give the template an EOS-terminated assistant "
                        f"turn (or {{% generation %}} tags around it), or remove chat_template "
                        f"from the tokenizer to use this project's")
    context = model_context(path, tokenizer)
    if max_length is not None and max_length > context:
        raise UserError(f"data.max_length={max_length} is longer than the model's context of "
                        f"{context} tokens ({path}); set data.max_length to at most {context}")
