"""The PPO stage's config: one section per concern, and the rules that tie fields together.

Defaults follow the published PPO details (InstructGPT, the N+ implementation details); see
`configs/tiny/ppo.yaml` for the tiny world's settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import LoraConfig, ModelDtypeSection, Section, StageConfig
from pipeline.world.cache import WorldSection
from pipeline.world.evaluation import GoldEvalSection


class ModelSection(ModelDtypeSection):
    policy: str = Field("sft:latest", description="the policy to train (and the reference): a "
                        "registry reference, a local HF directory or a hub name")
    reward: str = Field("reward:latest", description="the reward model (frozen; it also initializes "
                        "the value model)")


class DataSection(Section):
    prompts_file: str | None = Field(None, description="JSONL of prompts (text or chat messages); "
                                     "empty = the embedded world's ppo_prompts.jsonl")
    prompt_field: str = Field("prompt", description="the column that holds the prompt")
    world: WorldSection = Field(default_factory=WorldSection)
    max_prompt_tokens: int = Field(96, ge=1, description="prompt tokens, chat framing included")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="a longer prompt: keep its last max_prompt_tokens tokens, or drop "
                                "it; both are counted and reported")


class GenerationSection(Section):
    max_new_tokens: int = Field(64, ge=1, description="answer length limit")
    min_new_tokens: int = Field(0, ge=0, description="EOS is blocked before this many tokens")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (N+ 0.7, InstructGPT 1)")
    top_k: int = Field(0, ge=0, description="0 = no top-k filtering")
    top_p: float = Field(1.0, gt=0, le=1, description="1 = no nucleus filtering")


class RewardSection(Section):
    missing_eos_penalty: float | None = Field(
        -1.0, description="the score of an answer that never emits EOS (null = the reward "
                          "model's score at its last token)")


class KLSection(Section):
    coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty (initial, if adaptive)")
    estimator: Literal["k1", "k3"] = Field("k1", description="k1 = log π − log π_ref; k3 = "
                                           "(r − 1) − log r, never negative")
    adaptive: bool = Field(False, description="move β toward kl.target (Ziegler et al.)")
    target: float = Field(6.0, gt=0, description="target KL per answer (adaptive)")
    horizon: int = Field(10000, ge=1, description="episodes over which β moves ≤ 20% (adaptive)")


class PPOSection(Section):
    epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip range")
    value_clip_eps: float = Field(0.2, gt=0, description="value clip range around rollout values")
    value_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    whiten_rewards: bool = Field(False, description="scale rewards to unit variance before GAE")
    side_by_side: bool = Field(True, description="on a CPU, one intra-op thread per model pass and "
                               "independent passes (reference, value, reward; policy and value "
                               "updates) at the same time, instead of every pass on all threads: "
                               "faster for small models and on shared CPUs")


class ValueSection(Section):
    shared_backbone: bool = Field(False, description="a value head on the policy instead of a "
                                  "separate value model initialized from the reward model")
    lr: float | None = Field(None, gt=0, description="value learning rate; empty = train.lr")


class PtxSection(Section):
    coef: float = Field(0.0, ge=0, description="γ of PPO-ptx (InstructGPT 27.8); 0 = off")
    files: list[str] = Field(default_factory=list, description="pretraining text; empty = the "
                             "embedded world's pretrain.jsonl")
    text_field: str = Field("text", description="the JSONL/Parquet column holding the text")
    batch_size: int = Field(4, ge=1, description="pretraining blocks per micro-batch")
    seq_len: int = Field(128, ge=8, description="tokens per pretraining block")


class EmaSection(Section):
    decay: float = Field(0.0, ge=0, lt=1, description="EMA of the policy weights, published "
                         "instead of the last iterate (InstructGPT 0.992); 0 = off")


class EvalSection(GoldEvalSection):
    """The gold eval, run at the start and end (and every train.eval_every steps)."""

    sampled_answers: int = Field(0, ge=0, description="also score this many answers per prompt "
                                 "sampled as in training (generation.temperature, top_k, top_p), "
                                 "logged as gold_sampled/...: PPO optimizes the sampled answers, "
                                 "and a greedy answer can hide how they changed; 0 = off")


class SamplesSection(Section):
    every_steps: int = Field(10, ge=0, description="steps between sample dumps; 0 = never")
    count: int = Field(4, ge=1, description="answers written each time")


class Config(StageConfig):
    """`train.batch_size` = episodes per step per process; `train.grad_accum` = micro-batches per
    minibatch; lr schedule and grad clipping as elsewhere."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    kl: KLSection = Field(default_factory=KLSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    value: ValueSection = Field(default_factory=ValueSection)
    ptx: PtxSection = Field(default_factory=PtxSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _check_together(self) -> "Config":
        """Rules a single field's type cannot state; checked wherever the config is read, so
        `rlhf config show` refuses what `rlhf run` would."""
        train, ppo, generation = self.train, self.ppo, self.generation
        if train.batch_size < 2:
            raise ValueError("train.batch_size must be at least 2: advantages are whitened over "
                             "the batch, which needs two answers' tokens")
        per_minibatch = ppo.minibatches * train.grad_accum
        if train.batch_size % per_minibatch:
            raise ValueError(f"train.batch_size={train.batch_size} does not split into "
                             f"ppo.minibatches={ppo.minibatches} × train.grad_accum="
                             f"{train.grad_accum} equal parts; make it a multiple of "
                             f"{per_minibatch}")
        if generation.min_new_tokens > generation.max_new_tokens:
            raise ValueError(f"generation.min_new_tokens={generation.min_new_tokens} exceeds "
                             f"generation.max_new_tokens={generation.max_new_tokens}")
        return self
