"""Pretrain stage: train a causal LM on a text corpus, from scratch or from an existing model.

    rlhf run pretrain --config configs/tiny/pretrain.yaml [train.max_steps=200 ...]

Reads top to bottom: corpus → tokenizer (trained byte-level BPE, or an existing one) → model
(size preset, or an existing HF directory to continue) → pack into fixed-length blocks with EOS
between documents → train with the shared loop → eval loss and perplexity → publish.
Re-running the same command after an interruption resumes from the last committed state.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from pipeline import console
from pipeline.config import HubDataSection, ModelDtypeSection, Section, StageConfig
from pipeline.data.fingerprint import fingerprint_files
from pipeline.data.formats import read_text_corpus
from pipeline.data.packing import pack_blocks
from pipeline.errors import UserError
from pipeline.guard import require_causal_lm
from pipeline.loop import fit, micro_batch_indices
from pipeline.models import (PRESETS, build_from_preset, count_parameters, empty_model,
                             load_causal_lm)
from pipeline.registry import Registry, Resolved, Run
from pipeline.runtime import StageRun, stage_precision
from pipeline.sharding import check_layers
from pipeline.tokenizer import load_tokenizer, train_tokenizer
from pipeline.world.cache import WorldSection, world_file


class ModelSection(ModelDtypeSection):
    preset: Literal["tiny", "small", "base"] = Field("tiny", description="size when training from scratch")
    source: str | None = Field(None, description="continue pretraining this model (ref, dir or hub name)")


class TokenizerSection(Section):
    path: str | None = Field(None, description="an existing tokenizer directory or hub name")
    vocab_size: int = Field(2048, ge=300, description="vocabulary of a newly trained tokenizer")


class DataSection(HubDataSection):
    sources: list[str] = Field(default_factory=list,
                               description="text/JSONL/Parquet files, directories or a hub data set; "
                                           "empty = the embedded world's corpus")
    text_field: str = Field("text", description="the JSONL/Parquet column holding the text")
    world: WorldSection = Field(default_factory=WorldSection)
    seq_len: int = Field(128, ge=8, description="tokens per packed block")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of blocks held out")


class Config(StageConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)


def corpus_paths(config: Config, registry: Registry) -> list[str]:
    if config.data.sources:
        return list(config.data.sources)
    return [str(world_file(registry, config.data.world, "pretrain.jsonl"))]


def run(config: Config, registry: Registry, *, restart: bool = False,
        pipeline_id: str | None = None, parents: dict[str, Resolved] | None = None) -> Run:
    stage_precision(config)  # refuses a dtype this device cannot train in, before any write
    if parents is None:
        parents = {"model": registry.resolve(config.model.source)} if config.model.source else {}
    # Load the model to continue before anything is written (the world's files, the run): a bad
    # source leaves the home as it was.
    source = _load_source(config, parents["model"]) if "model" in parents else None
    check_layers(config.runtime, "model.source" if source else "model.preset",
                 lambda: source[1] if source else empty_model(preset=config.model.preset))
    paths = corpus_paths(config, registry)
    texts = read_text_corpus(paths, text_field=config.data.text_field, hub=config.data.hub_split())
    stage_run = StageRun.open("pretrain", config, registry, parents=parents,
                              data_fingerprint=fingerprint_files(paths), restart=restart,
                              pipeline_id=pipeline_id)
    if stage_run.reused:
        return stage_run.run
    with stage_run:
        return _train(stage_run, config, texts, source)


def _train(stage_run, config: Config, texts: list[str], source: tuple | None) -> Run:
    tokenizer, model = _tokenizer_and_model(stage_run, config, texts, source)
    blocks = pack_blocks(texts, tokenizer, config.data.seq_len)
    n_eval = max(1, int(len(blocks) * config.data.eval_fraction))
    if len(blocks) - n_eval < 1:
        raise UserError(f"the corpus gives only {len(blocks)} blocks of {config.data.seq_len} "
                        f"tokens; add text or lower data.seq_len")
    train_blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
    stage_run.say(f"pretrain: {count_parameters(model):,} parameters, {len(train_blocks)} train "
                  f"blocks of {config.data.seq_len} tokens, {n_eval} eval blocks")

    def batches_for_step(step: int):
        return [(idx, {"input_ids": train_blocks[torch.from_numpy(idx)]})
                for idx in micro_batch_indices(stage_run, len(train_blocks), step)]

    def eval_fn(model) -> dict:
        return eval_language_model(model, eval_blocks, config.train, stage_run.accelerator.device)

    final = fit(stage_run, model, tokenizer, batches_for_step=batches_for_step,
                loss_fn=causal_lm_loss, eval_fn=eval_fn,
                tokens_in=lambda batch: batch["input_ids"].numel(), desc="pretrain")
    stage_run.say(f"pretrain: eval loss {final['eval_loss']:.4f}, "
                  f"perplexity {final['eval_perplexity']:.2f}")
    stage_run.publish(model, tokenizer, summary=final)
    return stage_run.registry.get(stage_run.run.id)


def _load_source(config: Config, resolved: Resolved) -> tuple:
    """(tokenizer, model) of a checkpoint to continue pretraining."""
    trust = config.runtime.trust_remote_code
    path = require_causal_lm(resolved, "model.source", trust)
    return (load_tokenizer(path, trust_remote_code=trust, revision=resolved.revision),
            load_causal_lm(resolved, trust_remote_code=trust, role="model.source",
                           dtype=stage_precision(config).weights))


def _tokenizer_and_model(stage_run, config: Config, texts: list[str], source: tuple | None):
    """The resume state's tokenizer and model, else `source`, else new ones from the preset."""
    resume_dir = stage_run.state_model_dir()
    if resume_dir is not None:
        return _load_source(config, Resolved(str(resume_dir)))
    if source is not None:
        return source
    trust = config.runtime.trust_remote_code
    if config.tokenizer.path:
        tokenizer = load_tokenizer(config.tokenizer.path, trust_remote_code=trust)
    else:
        tokenizer = train_tokenizer(texts, vocab_size=config.tokenizer.vocab_size)
    tokenizer.model_max_length = PRESETS[config.model.preset]["max_position_embeddings"]
    return tokenizer, build_from_preset(config.model.preset, tokenizer, config.seed,
                                        stage_precision(config).weights)


def causal_lm_loss(model, batch: dict):
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {}


def eval_language_model(model, blocks: torch.Tensor, train, device) -> dict:
    """Mean next-token loss over up to `eval_batches` batches of held-out blocks, and perplexity."""
    losses = []
    starts = range(0, min(len(blocks), train.eval_batches * train.batch_size), train.batch_size)
    bar = console.progress(len(starts), "pretrain: eval loss", unit="batch")
    for start in starts:
        batch = blocks[start: start + train.batch_size].to(device)
        losses.append(model(input_ids=batch, labels=batch).loss.float().item())
        bar.update()
    bar.close()
    loss = float(np.mean(losses))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}

