"""SFT stage: fine-tune a causal LM on instruction → answer conversations, with loss on the answers.

    rlhf run sft --config configs/tiny/sft.yaml [model.source=pretrain:latest lora.enabled=true ...]

Reads top to bottom: the model to start from (`model.source`: a registry reference such as
`pretrain:latest`, a local Hugging Face directory, or a hub name) and its tokenizer → load and
encode the conversations, all before anything is registered, so bad data leaves no trace →
gold-score the starting model on the world's held-out prompts → train with the shared loop → eval
loss and gold score → publish (with LoRA: the adapter, whose config names the parent's directory).
Re-running the same command after an interruption resumes from the last committed state.

The loop is `pipeline.loop.fit` rather than TRL's SFTTrainer: every stage then shares one
resume state format with atomic commits and bit-identical resume, and truncation is counted.

Packing (`data.packing: true`) concatenates the encoded conversations into blocks of
`data.max_length` tokens, keeping each token's label. As in TRL's simple packing, attention crosses
example boundaries inside a block: a conversation can attend to the end of the previous one.
Without packing, batches are padding-free (`data.padding_free`, on by default): a step's
conversations are placed whole into rows of up to `data.max_length` tokens, each attending only to
itself, so the step learns what a padded batch of the same conversations would, without computing
the padding. A model whose attention takes no block mask, or whose loss changes on such rows, is
trained on padded batches, and the stage says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from pipeline import console
from pipeline.config import HeldOutHubDataSection, LoraConfig, ModelDtypeSection, StageConfig
from pipeline.data.fingerprint import data_fingerprint
from pipeline.data.formats import load_sft_rows
from pipeline.data.packing import pack_examples, pack_padding_free, pad_labeled
from pipeline.errors import UserError, first_line
from pipeline.loop import fit, micro_batch_indices, to_device
from pipeline.guard import ADAPTER_CONFIG, check_chat_model, require_causal_lm
from pipeline.models import (apply_lora, count_parameters, empty_model, inner_model,
                             load_causal_lm, merge_adapter)
from pipeline.packed import PACKABLE_ATTENTION, packed_forward
from pipeline.registry import Registry, Resolved, Run
from pipeline.runtime import StageRun, stage_precision
from pipeline.sharding import check_layers
from pipeline.tokenizer import IGNORE_INDEX, encode_chat, load_tokenizer
from pipeline.world.cache import WorldSection, train_and_eval_files
from pipeline.world.evaluation import GoldEvalSection, gold_eval, gold_metrics


class ModelSection(ModelDtypeSection):
    source: str = Field("pretrain:latest", description="the model to fine-tune: a registry "
                        "reference (run id, STAGE:latest, alias), an HF directory or a hub name")


class DataSection(HeldOutHubDataSection):
    train_files: list[str] = Field(default_factory=list, description="SFT files, directories or a "
                                   "hub data set; empty = the embedded world's sft_train.jsonl")
    eval_files: list[str] = Field(default_factory=list, description="held-out SFT data for the "
                                  "eval loss; empty = the world's sft_eval.jsonl when train_files "
                                  "is empty too, else no eval loss")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt",
                    "transcripts"] = Field(
        "auto", description="row format; auto detects it from the first row's columns")
    columns: dict[str, str] = Field(default_factory=dict, description="our column name → yours, "
                                    "e.g. {prompt: question, completion: answer}")
    world: WorldSection = Field(default_factory=WorldSection)
    max_length: int = Field(256, ge=8, description="tokens per conversation (and per packed block)")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate", description="longer conversations: keep their first max_length tokens, or drop "
                                "them; both are counted and reported")
    packing: bool = Field(False, description="concatenate conversations into max_length blocks")
    padding_free: bool = Field(True, description="without packing: place a step's conversations "
                               "whole into rows of up to max_length tokens, each attending only "
                               "to itself (the same loss as padded batches, without padding)")


class Config(StageConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    eval: GoldEvalSection = Field(default_factory=GoldEvalSection)


@dataclass
class EncodedSplit:
    """One split's encoded conversations and what happened to the rows that did not fit."""

    name: str  # "train" or "eval"
    examples: list[dict] = field(default_factory=list)  # {"input_ids": [int], "labels": [int]}
    rows: int = 0       # rows read
    truncated: int = 0  # kept, cut to max_length
    dropped: int = 0    # left out: too long (truncation=drop), or no answer within max_length

    def counts(self) -> dict[str, int]:
        """For the run summary: `train_examples`, `train_truncated`, `train_dropped`."""
        return {f"{self.name}_examples": len(self.examples),
                f"{self.name}_truncated": self.truncated, f"{self.name}_dropped": self.dropped}

    def describe(self, max_length: int) -> str:
        return (f"{self.name} {len(self.examples)} of {self.rows} conversations ({self.truncated} "
                f"truncated to {max_length} tokens, {self.dropped} dropped)")


def run(config: Config, registry: Registry, *, restart: bool = False,
        pipeline_id: str | None = None, parents: dict[str, Resolved] | None = None) -> Run:
    stage_precision(config)  # refuses a dtype this device cannot train in, before any write
    if parents is None:
        parents = {"model": registry.resolve(config.model.source)}
    trust = config.runtime.trust_remote_code
    source = require_causal_lm(parents["model"], "model.source", trust)
    tokenizer = load_tokenizer(source, trust_remote_code=trust, revision=parents["model"].revision)
    check_chat_model(source, tokenizer, "model.source", config.data.max_length)
    check_lora_start(parents["model"], tokenizer, config.lora, trust)
    check_layers(config.runtime, "model.source", lambda: empty_model(source, trust_remote_code=trust))
    train_files, eval_files = train_and_eval_files(registry, config.data, "sft")
    train_set = encode_split(tokenizer, train_files, config.data, "train")
    eval_set = encode_split(tokenizer, eval_files, config.data, "eval") if eval_files else None
    prompts_file = (config.eval.prompts_path(registry, config.data.world)
                    if config.eval.n_prompts else None)
    prompts = config.eval.prompts(registry, config.data.world)
    stage_run = StageRun.open("sft", config, registry, parents=parents,
                              data_fingerprint=data_fingerprint(train_files, eval_files, prompts_file),
                              restart=restart, pipeline_id=pipeline_id)
    if stage_run.reused:
        return stage_run.run
    with stage_run:
        return _train(stage_run, config, tokenizer, train_set, eval_set, prompts, parents["model"])


def _train(stage_run, config: Config, tokenizer, train_set: EncodedSplit,
           eval_set: EncodedSplit | None, prompts: list[str], parent: Resolved) -> Run:
    max_length = config.data.max_length
    counts = {**train_set.counts(), **(eval_set.counts() if eval_set else {})}
    stage_run.say(f"sft: {train_set.describe(max_length)}; " + (
        eval_set.describe(max_length) if eval_set else "no eval files, so no eval loss"))
    train_examples = train_set.examples
    if config.data.packing:
        train_examples = pack_examples(train_examples, max_length)
        counts["train_packed_blocks"] = len(train_examples)
        stage_run.say(f"sft: packed {len(train_set.examples)} conversations into "
                      f"{len(train_examples)} blocks of up to {max_length} tokens")

    model, gold_before = _model_and_gold_before(stage_run, config, tokenizer, prompts, parent)
    stage_run.say(f"sft: {count_parameters(model, trainable_only=True):,} trainable of "
                  f"{count_parameters(model):,} parameters{' (LoRA)' if config.lora.enabled else ''}")
    pad_id = tokenizer.pad_token_id
    device = stage_run.accelerator.device
    padding_free, how = choose_padding_free(model, config.data, train_examples, pad_id)
    if how:
        stage_run.say(f"sft: {how}")

    def collate(examples: list[dict]) -> dict:
        if padding_free:
            return pack_padding_free(examples, max_length, pad_id)
        return pad_labeled(examples, pad_id)

    def batches_for_step(step: int):
        return [(idx, collate([train_examples[i] for i in idx]))
                for idx in micro_batch_indices(stage_run, len(train_examples), step)]

    def eval_fn(model) -> dict:
        return eval_answer_loss(model, eval_set.examples, config.train, pad_id, device)

    final = fit(stage_run, model, tokenizer, batches_for_step=batches_for_step, loss_fn=sft_loss,
                eval_fn=eval_fn if eval_set else None,
                tokens_in=lambda batch: int(batch["attention_mask"].sum()),
                items_in=answer_tokens, desc="sft")
    if "eval_loss" in final:
        stage_run.say(f"sft: eval loss {final['eval_loss']:.4f} on the answers")
    summary = {**final, **counts, **gold_before}
    if prompts:
        gold = measure_gold(model, tokenizer, prompts, config)
        stage_run.log(config.train.max_steps, gold_metrics(gold))
        stage_run.say(describe_gold(gold, gold_before))
        summary.update(gold_metrics(gold), gold_samples=gold["samples"][:3])
    stage_run.publish(model, tokenizer, summary=summary)
    return stage_run.registry.get(stage_run.run.id)


def _model_and_gold_before(stage_run, config: Config, tokenizer, prompts: list[str],
                           parent: Resolved):
    """The model to train (fresh from the parent, or the resume state's) and the starting model's
    gold metrics as `gold_before/...`.

    The starting model is the parent fitted to the tokenizer (and with a fresh LoRA adapter, which
    starts as a no-op). Its gold metrics are logged at step 0, which a resume keeps, so a resumed
    run reads them back instead of loading the parent again.
    """

    trust = config.runtime.trust_remote_code
    dtype = stage_precision(config).weights
    gold_before = logged_gold_before(stage_run)
    start_model = None
    if stage_run.resume is None or (prompts and not gold_before):
        start_model = prepare_model(load_causal_lm(parent, trust_remote_code=trust,
                                                   trainable_adapter=False, dtype=dtype),
                                    tokenizer, config.lora, parent)
    if prompts and not gold_before:
        gold = measure_gold(start_model, tokenizer, prompts, config)
        gold_before = {f"gold_before/{name}": value for name, value in gold.items()
                       if isinstance(value, (int, float))}
        stage_run.log(0, gold_before)
    resume_dir = stage_run.state_model_dir()
    if resume_dir is not None:
        return (load_causal_lm(Resolved(str(resume_dir)), trust_remote_code=trust, dtype=dtype),
                gold_before)
    return start_model, gold_before


def logged_gold_before(stage_run) -> dict[str, float]:
    series = stage_run.registry.metrics(stage_run.run.id)
    return {name: values[-1][1] for name, values in series.items()
            if name.startswith("gold_before/")}


def check_lora_start(parent: Resolved, tokenizer, lora: LoraConfig,
                     trust_remote_code: bool) -> None:
    """Refuse a LoRA start whose adapter could not stand on the parent as its base.

    Checked before the run is registered: the parent must be a full model, and the tokenizer must
    need no new embedding rows, which an adapter cannot train.
    """

    if not lora.enabled:
        return
    if (Path(parent.path) / ADAPTER_CONFIG).is_file():
        raise UserError(f"model.source {parent.path} is a LoRA adapter; export it merged first "
                        f"(rlhf export REF OUT --merge) and set model.source to OUT")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(parent.path, trust_remote_code=trust_remote_code,
                                        revision=parent.revision)
    vocab_size = config.vocab_size
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer of {parent.path} needs {len(tokenizer) - vocab_size} new "
                        f"token(s) (chat roles or pad), which a LoRA adapter cannot train; set "
                        f"lora.enabled=false, or start from a model whose tokenizer has a chat "
                        f"template")


def prepare_model(model, tokenizer, lora: LoraConfig, parent: Resolved):
    """Fit the parent model to the tokenizer; wrap it with a fresh LoRA adapter when enabled."""
    model = merge_adapter(model)  # a LoRA parent is fine-tuned as the full model it stands for
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = apply_lora(model, lora)
    if lora.enabled:
        # The published adapter names its base: the parent's directory (the registry writes one
        # in its home relative to the adapter, so the home can move; `rlhf export` makes it
        # absolute again).
        model.peft_config["default"].base_model_name_or_path = parent_base_path(parent)
        model.peft_config["default"].revision = parent.revision  # a hub base's revision
    return model


def parent_base_path(parent: Resolved) -> str:
    path = Path(parent.path)
    return str(path.resolve()) if path.is_dir() else parent.path


# -- data ---------------------------------------------------------------------------------------
def encode_split(tokenizer, sources: list[str], data: DataSection, split: str) -> EncodedSplit:
    """Load every source with the configured format and encode it with assistant-only labels."""
    split_data = EncodedSplit(split)
    hub = data.eval_hub_split() if split == "eval" else data.hub_split()
    for source in sources:
        for row in load_sft_rows(source, data.format, data.columns, hub):
            split_data.rows += 1
            try:
                encoded = encode_chat(tokenizer, row["messages"], data.max_length, data.truncation)
            except UserError as err:
                raise UserError(f"{source}:{row['_line']}: {err}") from None
            if encoded is None:
                split_data.dropped += 1
                continue
            split_data.truncated += encoded["truncated"]
            split_data.examples.append({"input_ids": encoded["input_ids"],
                                        "labels": encoded["labels"]})
    if not split_data.examples:
        raise UserError(f"{', '.join(sources)}: all {split_data.rows} {split} conversations were "
                        f"dropped: longer than data.max_length={data.max_length} tokens "
                        f"(data.truncation={data.truncation}) or no answer within it; raise "
                        f"data.max_length or use data.truncation=truncate")
    return split_data


# -- loss and evaluation --------------------------------------------------------------------------
def sft_loss(model, batch: dict):
    """Mean next-token loss over the answer tokens (the model shifts the labels) of a
    `pad_labeled` or `pack_padding_free` batch."""
    if "block_ids" in batch:
        return packed_forward(model, batch).loss, {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    return out.loss, {}


@torch.no_grad()
def choose_padding_free(model, data: DataSection, examples: list[dict],
                        pad_id: int) -> tuple[bool, str]:
    """Whether to train on `pack_padding_free` rows, and a sentence saying so when the config asks
    for them ("" when it does not): only when the model's attention takes a block mask and its loss
    on the first examples, packed that way, equals their padded batch's to rounding."""
    if data.packing or not data.padding_free:
        return False, ""
    inner = inner_model(model)
    implementation = inner.config._attn_implementation
    if implementation not in PACKABLE_ATTENTION:
        return False, (f"the model's {implementation} attention takes no block mask: padded "
                       f"batches (data.padding_free needs sdpa or eager attention)")
    mismatch = _padding_free_mismatch(model, examples[:8], data.max_length, pad_id)
    if mismatch:
        inner.set_attn_implementation(implementation)
        return False, f"{mismatch}: padded batches"
    return True, (f"padding-free batches: each step's conversations whole in rows of up to "
                  f"{data.max_length} tokens, each attending only to itself")


def _padding_free_mismatch(model, sample: list[dict], max_length: int, pad_id: int) -> str | None:
    """Why the model's loss on `sample` packed padding-free differs from its padded batch's loss
    (beyond rounding), or None when it does not."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        padded = sft_loss(model, to_device(pad_labeled(sample, pad_id), device))[0]
        rows = sft_loss(model, to_device(pack_padding_free(sample, max_length, pad_id), device))[0]
    except (TypeError, ValueError, RuntimeError) as err:
        return f"the model fails on padding-free rows ({type(err).__name__}: {first_line(err)})"
    finally:
        model.train(was_training)
    # fp32 rounding, or a few steps of a half-precision type's
    tolerance = max(1e-5, 4 * torch.finfo(next(model.parameters()).dtype).eps)
    if not torch.isclose(rows.float(), padded.float(), rtol=tolerance, atol=0.0):
        return (f"the model's loss changes on padding-free rows ({rows.item():.6f} against "
                f"{padded.item():.6f} padded)")
    return None


def answer_tokens(batch: dict) -> int:
    """The answer tokens `sft_loss` averages over (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def eval_answer_loss(model, examples: list[dict], train, pad_id: int, device) -> dict:
    """Loss per answer token over up to `eval_batches` batches of held-out conversations."""
    total, tokens = 0.0, 0
    starts = range(0, min(len(examples), train.eval_batches * train.batch_size), train.batch_size)
    bar = console.progress(len(starts), "sft: eval loss", unit="batch")
    for start in starts:
        batch = to_device(pad_labeled(examples[start: start + train.batch_size], pad_id), device)
        n_answer = answer_tokens(batch)  # the model's loss is their mean: weigh by their count
        total += sft_loss(model, batch)[0].float().item() * n_answer
        tokens += n_answer
        bar.update()
    bar.close()
    return {"eval_loss": total / max(tokens, 1)}


def measure_gold(model, tokenizer, prompts: list[str], config: Config) -> dict:
    """Greedy answers to the held-out prompts, scored by the world's gold scorer."""
    return gold_eval(model, tokenizer, prompts, config.eval.sampling(), seed=config.seed)


def describe_gold(gold: dict, gold_before: dict) -> str:
    parts = []
    for key in ("mean_gold_score", "format_adherence", "count_accuracy"):
        if key not in gold:
            continue
        before = gold_before.get(f"gold_before/{key}")
        parts.append(f"{key} {before:.3f} → {gold[key]:.3f}" if before is not None
                     else f"{key} {gold[key]:.3f}")
    return "sft: gold eval (before → after): " + ", ".join(parts)
