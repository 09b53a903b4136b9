"""Model directories of every kind a user might hand a stage or command, good and bad, made from
one small causal LM in a second or two:

    dirs = build_model_dirs(Path("/tmp/models"), source=Path(pretrain_model_dir))
    dirs["reward"], dirs["truncated"], dirs["pickled_bin"], ...

Each is a plain Hugging Face directory (no manifest), as a user's own model would be. A pickle
that would leave `PICKLE_MARKER` beside the directories, if it ever ran, is inside `pickled_bin`
and `pickle_as_safetensors`.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

PICKLE_MARKER = "pickle-ran"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class LeaveMark:
    """Unpickling this runs `open(path, "w")`: the proof that a pickle was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def build_model_dirs(root: Path, source: Path) -> dict[str, Path]:
    """Every variant under `root`, from the causal LM directory `source`."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = {"causal": copy_model(source, root / "causal")}
    dirs.update(head_variants(root, dirs["causal"]))
    weights = dirs["causal"] / "model.safetensors"
    marker = str(root / PICKLE_MARKER)

    def variant(name: str) -> Path:
        dirs[name] = copy_model(dirs["causal"], root / name)
        return dirs[name]

    truncated = variant("truncated") / "model.safetensors"
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (variant("pickle_as_safetensors") / "model.safetensors").write_bytes(
        pickle.dumps(LeaveMark(marker)))
    (variant("pickled_bin") / "model.safetensors").unlink()
    (dirs["pickled_bin"] / "pytorch_model.bin").write_bytes(pickle.dumps(LeaveMark(marker)))
    (variant("no_weights") / "model.safetensors").unlink()
    edit_json(variant("quantized") / "config.json",
              quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    edit_json(variant("remote_code") / "config.json", model_type="shipped_llama",
              auto_map={"AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"})
    (variant("no_config") / "config.json").unlink()
    (variant("bad_config") / "config.json").write_text("{\"architectures\": [")
    edit_json(variant("masked_lm") / "config.json", architectures=["LlamaForMaskedLM"])
    no_tokenizer = variant("no_tokenizer")
    for name in TOKENIZER_FILES:
        (no_tokenizer / name).unlink(missing_ok=True)
    edit_json(variant("no_eos") / "tokenizer_config.json", eos_token=None)
    edit_json(variant("short_context") / "config.json", max_position_embeddings=64)
    # A plain "role: text" template: its turns end with a newline, never with the EOS token.
    (variant("template_without_eos") / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    return dirs


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("manifest.json"))
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def head_variants(root: Path, causal: Path) -> dict[str, Path]:
    """The same backbone under other heads: a one-label reward model, a three-label classifier,
    no head at all; and a LoRA adapter on the causal LM."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,
                              AutoModelForSequenceClassification)

    made = {}
    for name, labels in (("reward", 1), ("classifier", 3)):
        config = AutoConfig.from_pretrained(causal, num_labels=labels)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        made[name] = save_with_tokenizer(model, causal, root / name)
    torch.manual_seed(0)
    made["backbone"] = save_with_tokenizer(AutoModel.from_config(AutoConfig.from_pretrained(causal)),
                                           causal, root / "backbone")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(causal),
                          LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lora.peft_config["default"].base_model_name_or_path = str(causal)
    made["adapter"] = save_with_tokenizer(lora, causal, root / "adapter")
    return made


def save_with_tokenizer(model, causal: Path, target: Path) -> Path:
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (causal / name).exists():
            shutil.copy(causal / name, target / name)
    return target
