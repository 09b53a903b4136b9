"""`rlhf export REF OUT [--merge]`: write a checkpoint as a plain Hugging Face directory.

    rlhf export sft:latest exported/ --merge

The checkpoint is verified against its manifest first. Without --merge its files are copied as
they are (a LoRA checkpoint stays an adapter that names its base, by absolute path, since the
copy is not beside the registry's base any more). With --merge a LoRA adapter is
folded into its base model's weights, so OUT loads with `AutoModelForCausalLM.from_pretrained(OUT)`
and no peft; a full model has nothing to merge and is copied. OUT is written like every registry
directory (temporary sibling, rename, manifest last), so it is either complete or absent.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.guard import ADAPTER_CONFIG
from pipeline.models import load_causal_lm, merge_adapter
from pipeline.registry import MANIFEST, Registry, Resolved, adapter_base, commit_directory
from pipeline.tokenizer import load_tokenizer


def cmd_export(args) -> int:
    resolved = Registry(args.home).resolve(args.ref)
    if not resolved.is_local:
        raise UserError(f"'{args.ref}' is not a run id, alias, STAGE:latest or model directory; "
                        "export a registry run or a model directory")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory")
    source = Path(resolved.verified_path())
    is_adapter = (source / ADAPTER_CONFIG).is_file()
    if args.merge and not is_adapter:
        print(f"{args.ref} is a full model, not a LoRA adapter: nothing to merge, copying it",
              file=sys.stderr)
    if args.merge and is_adapter:
        commit_directory(out, lambda tmp: write_merged(resolved, tmp))
    else:
        commit_directory(out, lambda tmp: copy_checkpoint(source, tmp))
    note = describe_adapter(source, args.merge) if is_adapter else ""
    print(f"exported {args.ref} → {out}{note}")
    return 0


def copy_checkpoint(source: Path, directory: Path) -> None:
    """The checkpoint's files as they are, but an adapter names its base where it is now."""
    shutil.copytree(source, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
    config_file = directory / ADAPTER_CONFIG
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = adapter_base(source)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def describe_adapter(source: Path, merged: bool) -> str:
    if merged:
        return " (LoRA adapter merged into its base)"
    return f" (a LoRA adapter on {adapter_base(source)}; --merge writes a full model)"


def write_merged(resolved: Resolved, directory: Path) -> None:
    """The adapter folded into its base: a full model plus the checkpoint's tokenizer."""
    model = merge_adapter(load_causal_lm(resolved, trainable_adapter=False, role="export"))
    model.save_pretrained(directory)
    load_tokenizer(resolved.path).save_pretrained(directory)
