"""`rlhf data gold-score`: sample a model on held-out prompts and gold-score its answers.

    rlhf data gold-score sft:latest [--prompts FILE] [--n 100] [--temperature 0] [--json]

Without --prompts it uses the embedded world's eval_prompts.jsonl (seed 0, tiny), generated once
into the registry home's data cache. The same prompt reader serves the stages' gold evals.
"""

from __future__ import annotations

import json

from pipeline.data.prompts import read_prompts
from pipeline.generation import SamplingConfig
from pipeline.guard import check_eos, require_causal_lm
from pipeline.models import load_causal_lm
from pipeline.registry import Registry
from pipeline.tokenizer import load_tokenizer
from pipeline.world.cache import WorldSection, world_file
from pipeline.world.evaluation import gold_eval

SAMPLES_SHOWN = 3


def cmd_gold_score(args) -> int:
    registry = Registry(args.home)
    resolved = registry.resolve(args.ref)
    require_causal_lm(resolved, args.ref)  # before the world's prompts are written to the home
    prompts_file = args.prompts or world_file(registry, WorldSection(), "eval_prompts.jsonl")
    prompts = read_prompts(prompts_file, args.n)
    model = load_causal_lm(resolved, trainable_adapter=False, role=args.ref)
    tokenizer = load_tokenizer(resolved.path)
    check_eos(tokenizer, model, resolved.path)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # A tokenizer that needed chat tokens added: the model has never seen them, but sampling
        # must not index past its embedding.
        model.resize_token_embeddings(len(tokenizer))
    summary = gold_eval(model, tokenizer, prompts, SamplingConfig(temperature=args.temperature))
    summary["samples"] = summary["samples"][:SAMPLES_SHOWN]
    if args.json:
        print(json.dumps({"ref": args.ref, "prompts": len(prompts), **summary}, ensure_ascii=False,
                         indent=1))
    else:
        print(format_summary(args.ref, str(prompts_file), summary))
    return 0


def format_summary(ref: str, prompts_file: str, summary: dict) -> str:
    """The gold summary as a short human-readable report."""
    def number(value) -> str:
        return "n/a (no leg questions)" if value is None else f"{value:.3f}"

    lines = [f"{ref} on {prompts_file}:",
             f"  mean gold score   {number(summary['mean_gold_score'])}",
             f"  count accuracy    {number(summary['count_accuracy'])}",
             f"  format adherence  {number(summary['format_adherence'])}",
             f"  mean length       {summary['mean_length']:.1f} words",
             "samples:"]
    for sample in summary["samples"]:
        lines += [f"  Q: {sample['prompt']}", f"  A: {sample['response']}",
                  f"     gold {sample['gold_score']:.2f}"]
    return "\n".join(lines)
