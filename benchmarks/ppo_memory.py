"""PPO peak memory and episodes/s on CPU for a 135M-class Llama, full fine-tuning and LoRA, side by
side with TRL 1.12's PPOTrainer on the same shape and setting, run back to back.

    python benchmarks/ppo_memory.py [--episodes 16] [--threads 2] [--peer-python PATH]

The setting: SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocabulary 49152, tied embeddings), randomly initialized; prompts of 64 tokens, answers of exactly
64 (EOS blocked before), 8 episodes per batch, 1 PPO epoch, 1 minibatch. Layouts:
  full  the policy, a frozen reference copy, reward and value models of the same shape (TRL's);
  lora  a LoRA adapter (r 16 on the attention projections) whose disabled base is the reference,
        and a value head on the policy.
Each layout runs in its own process, so its peak RSS is its own; TRL runs in the peer venv
(`../shared/peers/setup.sh`, default `~/.cache/peer-trl112`) with `benchmarks/peers/trl112_ppo.py`.
Targets: LoRA ≤ 0.5× TRL's peak memory, full fine-tuning ≤ 0.9×, both ≥ 1.3× its episodes/s.
A CPU shared with other work makes every number noisy; compare only numbers of one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EOS, PAD = 0, 1
SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, max_position_embeddings=256,
             tie_word_embeddings=True)
PROMPT_TOKENS, ANSWER_TOKENS, BATCH = 64, 64, 8
PEER_SETTING = dict(hidden=576, layers=30, heads=9, kv_heads=3, inter=1536, vocab=49152, tied=True,
                    prompt_len=PROMPT_TOKENS, response_length=ANSWER_TOKENS, batch=BATCH,
                    mini_batches=1, ppo_epochs=1)
TARGETS = {"full": (0.9, 1.3), "lora": (0.5, 1.3)}  # (peak memory ≤, episodes/s ≥) × TRL's


def build_trainer(layout: str, seed: int):
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.config import LoraConfig
    from pipeline.models import apply_lora
    from stages.ppo.config import Config
    from stages.ppo.models import Models, TokenScorer, ValueHead, frozen
    from stages.ppo.update import PPOTrainer

    lora = layout == "lora"
    config = Config.model_validate({
        "seed": seed,
        "generation": {"max_new_tokens": ANSWER_TOKENS, "min_new_tokens": ANSWER_TOKENS,
                       "temperature": 0.7},
        "train": {"batch_size": BATCH, "max_steps": 1000, "lr": 1e-5},
        "ppo": {"epochs": 1, "minibatches": 1},
        "value": {"shared_backbone": lora}, "lora": {"enabled": lora, "r": 16, "alpha": 32}})

    def llama(**extra) -> LlamaConfig:
        return LlamaConfig(**SHAPE, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None, **extra)

    torch.manual_seed(seed)
    policy = LlamaForCausalLM(llama()).eval()
    reward = LlamaForSequenceClassification(llama(num_labels=1)).eval()
    if lora:
        models = Models(policy=apply_lora(policy, LoraConfig(enabled=True, r=16, alpha=32)),
                        reference=None, reward_model=frozen(TokenScorer(reward)),
                        value_model=None, value_head=ValueHead(SHAPE["hidden_size"]))
    else:
        models = Models(policy=policy, reference=frozen(copy.deepcopy(policy)),
                        reward_model=frozen(TokenScorer(reward)),
                        value_model=TokenScorer(copy.deepcopy(reward)).requires_grad_(True),
                        value_head=None)
    return PPOTrainer(config, Accelerator(cpu=True), models, eos_token_id=EOS, pad_token_id=PAD)


def measure(layout: str, episodes: int, seed: int) -> dict:
    """Run `layout` in this process: its episodes/s and peak RSS (MB)."""
    import torch

    trainer = build_trainer(layout, seed)
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, episodes // BATCH)
    prompts = torch.randint(2, SHAPE["vocab_size"], (steps * BATCH, PROMPT_TOKENS),
                            generator=generator).tolist()
    started = time.perf_counter()
    for step in range(steps):
        metrics, _ = trainer.step(step, prompts[step * BATCH:(step + 1) * BATCH], range(BATCH))
        assert metrics["response_length"] == ANSWER_TOKENS, metrics["response_length"]
    elapsed = time.perf_counter() - started
    return {"layout": layout, "episodes": steps * BATCH, "seconds": round(elapsed, 2),
            "episodes_per_s": round(steps * BATCH / elapsed, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def in_subprocess(command: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), THREADS=str(threads))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", default=str(Path(os.environ.get(
        "PEER_VENV", Path.home() / ".cache" / "peer-trl112")) / "bin" / "python"))
    parser.add_argument("--layout", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout:  # one layout, in a process of its own
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.layout, args.episodes, args.seed)))
        return 0

    results = {}
    if Path(args.peer_python).exists():
        setting = {**PEER_SETTING, "episodes": args.episodes, "seed": args.seed}
        results["trl"] = in_subprocess([args.peer_python, "benchmarks/peers/trl112_ppo.py",
                                        json.dumps(setting)], args.threads)
    else:
        results["trl"] = {"error": f"no peer venv at {args.peer_python}; "
                                   f"run ../shared/peers/setup.sh"}
    for layout in TARGETS:
        results[layout] = in_subprocess([sys.executable, __file__, "--layout", layout,
                                         "--episodes", str(args.episodes), "--threads",
                                         str(args.threads), "--seed", str(args.seed)],
                                        args.threads)
    trl = results["trl"]
    for layout, (memory_target, speed_target) in TARGETS.items():
        ours = results[layout]
        if "error" in ours or "error" in trl:
            continue
        memory = ours["peak_rss_mb"] / trl["peak_rss_mb"]
        speed = ours["episodes_per_s"] / trl["episodes_per_s"]
        ours.update(memory_vs_trl=round(memory, 2), speed_vs_trl=round(speed, 2),
                    meets_targets=memory <= memory_target and speed >= speed_target)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
