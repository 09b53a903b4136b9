"""PPO throughput on CPU: episodes per second and peak memory of the ppo stage's rollout + update.

    python benchmarks/ppo_throughput.py [--episodes 128] [--threads 2] [--seed 0]

The fixed setting: a Llama policy with hidden size 256, 4 layers, 4 heads, intermediate size 512 and
a vocabulary of 1024; separate reward and value models of the same shape (the value model starts as
a copy of the reward model, as in the stage); a frozen reference copy of the policy; prompts of 16
tokens; answers of exactly 32 tokens (EOS is blocked before that); 16 episodes per batch, 2
minibatches, 2 PPO epochs; 128 episodes; 2 CPU threads. Models are randomly initialized: the
throughput does not depend on what they know when every answer has the same length.

It drives `stages.ppo.update.PPOTrainer`, the class the stage itself runs, so what is measured is
the stage's own rollout (sampling with the KV cache, reward, reference and value passes, GAE) and
update (clipped policy and value losses, optimizer steps). Every step counts, the first included.

Reference point: TRL 1.12's PPOTrainer ran this setting at about 9 episodes/s with about 600 MB
peak RSS on the same kind of machine; the last line prints the ratio. The CPU may be shared with
other work, so run it more than once before reading much into one number.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRL_EPISODES_PER_S = 9.0
TRL_PEAK_RSS_MB = 600.0
EOS, PAD = 0, 1
SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
             vocab_size=1024, max_position_embeddings=128)
PROMPT_TOKENS, ANSWER_TOKENS, BATCH = 16, 32, 16


def build_trainer(seed: int):
    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from stages.ppo.config import Config
    from stages.ppo.models import Models, TokenScorer, frozen
    from stages.ppo.update import PPOTrainer

    config = Config.model_validate({
        "seed": seed,
        "generation": {"max_new_tokens": ANSWER_TOKENS, "min_new_tokens": ANSWER_TOKENS,
                       "temperature": 0.7},
        "train": {"batch_size": BATCH, "max_steps": 1000, "lr": 1e-5},
        "ppo": {"epochs": 2, "minibatches": 2}})

    def llama(**extra) -> LlamaConfig:
        return LlamaConfig(**SHAPE, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None,
                           tie_word_embeddings=False, **extra)

    torch.manual_seed(seed)
    policy = LlamaForCausalLM(llama()).eval()
    reward_classifier = LlamaForSequenceClassification(llama(num_labels=1)).eval()
    models = Models(policy=policy, reference=frozen(copy.deepcopy(policy)),
                    reward_model=frozen(TokenScorer(reward_classifier)),
                    value_model=TokenScorer(copy.deepcopy(reward_classifier)).requires_grad_(True),
                    value_head=None)
    return PPOTrainer(config, Accelerator(cpu=True), models, eos_token_id=EOS, pad_token_id=PAD)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    trainer = build_trainer(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    steps = max(1, args.episodes // BATCH)
    prompts = torch.randint(2, SHAPE["vocab_size"], (steps * BATCH, PROMPT_TOKENS),
                            generator=generator).tolist()
    totals = {"time_generate": 0.0, "time_score": 0.0, "time_update": 0.0}
    started = time.perf_counter()
    for step in range(steps):
        metrics, _ = trainer.step(step, prompts[step * BATCH:(step + 1) * BATCH], range(BATCH))
        assert metrics["response_length"] == ANSWER_TOKENS, metrics["response_length"]
        for name in totals:
            totals[name] += metrics[name]
    elapsed = time.perf_counter() - started
    episodes = steps * BATCH
    rate = episodes / elapsed
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    split = ", ".join(f"{name[5:]} {value / elapsed:.0%}" for name, value in totals.items())
    print(f"episodes: {episodes} in {elapsed:.2f} s on {args.threads} threads ({split})")
    print(f"episodes/s: {rate:.2f}")
    print(f"peak RSS: {peak_mb:.0f} MB")
    print(f"vs TRL 1.12 PPOTrainer ({TRL_EPISODES_PER_S:g} episodes/s, {TRL_PEAK_RSS_MB:g} MB): "
          f"{rate / TRL_EPISODES_PER_S:.2f}x speed, {peak_mb / TRL_PEAK_RSS_MB:.2f}x memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
