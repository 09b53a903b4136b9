"""`rlhf data collect`: the policy's own answers, K per prompt, ranked by a labeler.

    rlhf data collect sft:latest --config configs/tiny/ppo.yaml --out policy.jsonl \\
        [--k 4] [--prompts world|FILE] [--n 1000] [--labeler gold|people] [--labeler-temperature 0]
        [generation.temperature=1.0 ...]
    rlhf run reward data.train_files=[policy.jsonl]

Answers are sampled as the PPO stage of `--config` samples them (its `generation` section and
`data.max_prompt_tokens`; without --config, the PPO stage's defaults; key=value overrides it). `--prompts world` takes the
prompts of the embedded world's reward_train.jsonl (the world of the config's `data.world`). The
`gold` labeler ranks them by the world's gold scorer; `people` leaves them for `rlhf label`.
Nothing is registered: the command writes OUT and OUT.provenance (`pipeline.data.collect`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.label.store import checked_out_path
from pipeline.config import load_config
from pipeline.data.collect import check_request, collect, describe, write_collected
from pipeline.data.fingerprint import fingerprint_files
from pipeline.data.prompts import read_chat_prompts
from pipeline.generation import SamplingConfig, load_for_sampling
from pipeline.guard import input_file, require_causal_lm
from pipeline.labelers import make_labeler
from pipeline.registry import Registry, Resolved, open_registry, resolve_model
from pipeline.world.cache import world_file
from stages.ppo.config import Config as PPOConfig

WORLD = "world"


def cmd_collect(args) -> int:
    out = checked_out_path(args.out, "--out")
    labeler = make_labeler(args.labeler, args.labeler_temperature, args.seed)
    ppo = load_config(PPOConfig, args.config, args.overrides)
    registry = Registry(args.home) if args.prompts == WORLD else open_registry(args.home)
    prompts_file = (world_file(registry, ppo.data.world, "reward_train.jsonl")
                    if args.prompts == WORLD else input_file(args.prompts, "--prompts"))
    prompts = read_chat_prompts(prompts_file)[:args.n]
    policy = resolve_model(registry, args.policy)
    require_causal_lm(policy, "POLICY")
    check_request(prompts, args.k, labeler)  # before the model loads and minutes of sampling
    model, tokenizer = load_for_sampling(policy, role="POLICY")
    sampling = ppo_sampling(ppo)
    collected = collect(model, tokenizer, prompts, args.k, sampling, labeler, seed=args.seed,
                        max_prompt_tokens=ppo.data.max_prompt_tokens)
    provenance = {"policy": policy_record(args.policy, policy),
                  "prompts": str(prompts_file), "k": args.k, "seed": args.seed,
                  "sampling": {**vars(sampling), "max_prompt_tokens": ppo.data.max_prompt_tokens},
                  "labeler": labeler.report()}
    sidecar = write_collected(out, collected, provenance)
    print(describe(collected.counts, provenance["labeler"]))
    print(f"collect: wrote {out} and {sidecar}")
    return 0


def ppo_sampling(ppo: PPOConfig) -> SamplingConfig:
    """The sampling settings of the PPO stage's `generation` section."""
    generation = ppo.generation
    return SamplingConfig(max_new_tokens=generation.max_new_tokens,
                          min_new_tokens=generation.min_new_tokens,
                          temperature=generation.temperature, top_k=generation.top_k,
                          top_p=generation.top_p)


def policy_record(ref: str, policy: Resolved) -> dict:
    """The policy as given and as found: its directory, registry run and content fingerprint."""
    local = Path(policy.path).is_dir()
    return {"ref": ref, "path": policy.path, "run": policy.run.id if policy.run else None,
            "fingerprint": fingerprint_files(policy.path) if local else None}
