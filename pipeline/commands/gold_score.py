"""`rlhf data gold-score`: sample a model on held-out prompts and gold-score its answers.

    rlhf data gold-score sft:latest [--prompts FILE] [--n N] [--temperature T]
                                    [--max-new-tokens M] [--json]

A registry run that ran a gold eval (sft, ppo) is scored with its own eval settings, so the command
gives the numbers the stage and `rlhf report` gave for it; any other model gets the gold eval's
defaults on the embedded world's eval_prompts.jsonl (seed 0, tiny), generated once into the registry
home's data cache. Options override single settings; the settings used are printed with the result.
"""

from __future__ import annotations

import json

from pipeline.guard import check_eos, require_causal_lm
from pipeline.models import load_causal_lm
from pipeline.registry import Registry, Resolved
from pipeline.tokenizer import load_tokenizer
from pipeline.world.cache import WorldSection
from pipeline.world.evaluation import GoldEvalSection, gold_eval, run_gold_settings

SAMPLES_SHOWN = 3


def cmd_gold_score(args) -> int:
    registry = Registry(args.home)
    resolved = registry.resolve(args.ref)
    require_causal_lm(resolved, args.ref)  # before the world's prompts are written to the home
    settings, world = eval_settings(resolved, args)
    prompts_file = settings.prompts_path(registry, world)
    prompts = settings.prompts(registry, world)
    model = load_causal_lm(resolved, trainable_adapter=False, role=args.ref)
    tokenizer = load_tokenizer(resolved.path, revision=resolved.revision)
    check_eos(tokenizer, model, resolved.path)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # A tokenizer that needed chat tokens added: the model has never seen them, but sampling
        # must not index past its embedding.
        model.resize_token_embeddings(len(tokenizer))
    summary = gold_eval(model, tokenizer, prompts, settings.sampling())
    summary["samples"] = summary["samples"][:SAMPLES_SHOWN]
    if args.json:
        print(json.dumps({"ref": args.ref, "prompts": len(prompts), "prompts_file": prompts_file,
                          "max_new_tokens": settings.max_new_tokens,
                          "temperature": settings.temperature, **summary},
                         ensure_ascii=False, indent=1))
    else:
        print(format_summary(args.ref, settings.describe(prompts_file), summary))
    return 0


def eval_settings(resolved: Resolved, args) -> tuple[GoldEvalSection, WorldSection]:
    """The run's own gold-eval settings when it ran one, else the defaults (100 prompts of the
    tiny world, seed 0); each option given on the command line replaces its setting."""
    found = run_gold_settings(resolved.run.config) if resolved.run else None
    settings, world = found or (GoldEvalSection(n_prompts=100), WorldSection())
    chosen = {"prompts_file": args.prompts, "n_prompts": args.n, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens}
    return settings.model_copy(update={k: v for k, v in chosen.items() if v is not None}), world


def format_summary(ref: str, settings: str, summary: dict) -> str:
    """The gold summary as a short human-readable report."""
    def number(value) -> str:
        return "n/a (no leg questions)" if value is None else f"{value:.3f}"

    lines = [f"{ref} on {settings}:",
             f"  mean gold score   {number(summary['mean_gold_score'])}",
             f"  count accuracy    {number(summary['count_accuracy'])}",
             f"  format adherence  {number(summary['format_adherence'])}",
             f"  mean length       {summary['mean_length']:.1f} words",
             "samples:"]
    for sample in summary["samples"]:
        lines += [f"  Q: {sample['prompt']}", f"  A: {sample['response']}",
                  f"     gold {sample['gold_score']:.2f}"]
    return "\n".join(lines)
