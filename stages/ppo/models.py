"""The PPO stage's models: policy, reference, reward model, value model (or value head), and the
EMA of the policy, built from the starting policy and the reward model or from a resume state.

The reward and value models are scalar-head sequence classifiers (`AutoModelForSequenceClassification`
with one label) read at every position (`TokenScorer`), so the score is taken at the EOS the
rollout found, never where the classifier's own pad-token search would look (pad can equal EOS).
Every forward pass gives position ids from the attention mask, which is how `generate` numbers
left-padded prompts; a mismatch there is what shows up as negative KL.

Shapes: B episodes, P prompt width (left-padded), T response width, L = P + T, V vocabulary,
H hidden size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.data.packing import left_pad, right_pad
from pipeline.models import (apply_lora, enable_gradient_checkpointing, inner_model,
                             load_causal_lm, without_dropout)
from pipeline.packed import PACKABLE_ATTENTION, packed_forward, sequences_layout, token_index
from pipeline.errors import first_line
from pipeline.registry import Resolved
from stages.ppo.config import Config


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: (B, L) 0/1 mask -> (B, L), the first real token at 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logits(causal_lm, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    response_width: int, with_hidden: bool = False, packed: bool = False):
    """Logits that predicted each response token, and optionally the last hidden state there.

    sequences, attention_mask: (B, L) with the response in the last T = response_width columns.
    Returns ((B, T, V) logits, (B, T, H) hidden states or None): position P − 1 + t predicts token t.
    Only those positions go through the output layer. With `packed`, only the real tokens go
    through the model (`pipeline.packed`); positions that are padding give token 0's outputs,
    which the response mask leaves out.
    """
    if packed:
        return _packed_response_logits(causal_lm, sequences, attention_mask, response_width,
                                       with_hidden)
    out = causal_lm(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=positions(attention_mask), logits_to_keep=response_width + 1,
                    output_hidden_states=with_hidden, use_cache=False)
    hidden = out.hidden_states[-1][:, -(response_width + 1):-1] if with_hidden else None
    return out.logits[:, :-1], hidden


def _packed_response_logits(causal_lm, sequences, attention_mask, response_width: int,
                            with_hidden: bool):
    layout = sequences_layout(attention_mask)
    episodes, length = sequences.shape
    columns = torch.arange(length - response_width - 1, length - 1, device=sequences.device)
    rows = torch.arange(episodes, device=sequences.device).unsqueeze(1)
    keep = token_index(layout, rows, columns.unsqueeze(0)).flatten()  # (B·T,) among the real tokens
    out = packed_forward(causal_lm, {"input_ids": sequences,
                                     "position_ids": positions(attention_mask)}, layout,
                         logits_to_keep=keep, output_hidden_states=with_hidden)
    hidden = (out.hidden_states[-1][0, keep].unflatten(0, (episodes, response_width))
              if with_hidden else None)
    return out.logits[0].unflatten(0, (episodes, response_width)), hidden


class SafetensorsModule(nn.Module):
    """A module that a resume state stores as one safetensors file of its state dict.

    `StageRun.save_state` saves every model with `save_pretrained(directory, state_dict=...)`;
    these modules load back with `load_pretrained(directory)`, exactly, whatever classes they wrap.
    """

    WEIGHTS_FILE = "weights.safetensors"

    def save_pretrained(self, directory: Path, state_dict: dict | None = None) -> None:
        tensors = self.state_dict() if state_dict is None else state_dict
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Copies: safetensors refuses tensors that share memory (tied embeddings).
        save_file({name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()},
                  str(Path(directory) / self.WEIGHTS_FILE))

    def load_pretrained(self, directory: Path) -> None:
        self.load_state_dict(load_file(str(Path(directory) / self.WEIGHTS_FILE)))


class TokenScorer(SafetensorsModule):
    """A scalar-head sequence classifier read at every position: (B, L) ids -> (B, L) float32.

    Serves the frozen reward model (read at the EOS) and the trainable value model (read at every
    state before a response token). The head keeps the bias the reward stage's normalization adds.
    """

    def __init__(self, classifier, packed: bool = False):
        super().__init__()
        self.classifier = classifier
        self.packed = packed  # only the real tokens through the model (`pipeline.packed`)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self.classifier, self.classifier.base_model_prefix)
        if not self.packed:
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=positions(attention_mask),
                              use_cache=False).last_hidden_state
            return self._scores(hidden)
        layout = sequences_layout(attention_mask)
        hidden = packed_forward(backbone, {"input_ids": input_ids,
                                           "position_ids": positions(attention_mask)},
                                layout).last_hidden_state
        return layout.in_rows(self._scores(hidden))  # padding: token 0's score, masked by callers

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        # A new tensor, not a view of the head's output: FSDP2 hooks its module's outputs for the
        # backward pass, which an in-place change of a view would bypass.
        return self.classifier.score(hidden).squeeze(-1).to(torch.float32, copy=True)


class ValueHead(SafetensorsModule):
    """The value model of `value.shared_backbone`: a linear map of the policy's last hidden state.

    (B, T, H) -> (B, T). Zero-initialized, so every value starts at 0.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1).to(torch.float32, copy=True)  # not a view (above)


@dataclass
class Models:
    """Everything a rollout and an update touch (unwrapped from any distributed wrapper).

    Exactly one of `value_model` (a separate critic) and `value_head` (on the policy) is set;
    `reference` is None with LoRA, where the policy with its adapter disabled is the reference.
    """

    policy: nn.Module
    reference: nn.Module | None
    reward_model: TokenScorer
    value_model: TokenScorer | None
    value_head: ValueHead | None
    packed: bool = False  # the policy's and reference's passes on real tokens only (`use_packing`)

    @property
    def critic(self) -> SafetensorsModule:
        """Whichever of the value model and the value head is trained."""
        return self.value_head if self.value_head is not None else self.value_model

    def named(self) -> dict[str, nn.Module]:
        """The distinct models held in memory, by role (with LoRA the reference is the policy)."""
        named = {"policy": self.policy, "reference": self.reference,
                 "reward model": self.reward_model, "value model": self.value_model,
                 "value head": self.value_head}
        return {name: model for name, model in named.items() if model is not None}

    def reference_logits(self, sequences, attention_mask, response_width) -> torch.Tensor:
        if self.reference is not None:
            return response_logits(self.reference, sequences, attention_mask, response_width,
                                   packed=self.packed)[0]
        with self.policy.disable_adapter():
            return response_logits(self.policy, sequences, attention_mask, response_width,
                                   packed=self.packed)[0]


def critic_values(value_model, sequences, attention_mask, response_width: int) -> torch.Tensor:
    """A separate value model's (B, T) values: its outputs at positions P − 1 … L − 2."""
    return value_model(sequences, attention_mask)[:, -(response_width + 1):-1]


def frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False).eval()


class PolicyEMA(SafetensorsModule):
    """Exponential moving average of the policy's trainable weights (float32), updated after every
    policy optimizer step: w_ema ← decay · w_ema + (1 − decay) · w."""

    def __init__(self, policy: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        for name, param in trainable(policy):
            # Buffer names cannot hold dots; '/' keeps the parameter's name readable in the file.
            self.register_buffer(name.replace(".", "/"), param.detach().float().clone())

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        for average, (_, param) in zip(self.buffers(), trainable(policy)):
            average.lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, policy: nn.Module) -> None:
        for average, (_, param) in zip(self.buffers(), trainable(policy)):
            param.copy_(average)


@torch.no_grad()
def use_packing(models: Models, prompt: list[int], pad_token_id: int) -> str:
    """Turn on packed passes (only the real tokens through each model, `pipeline.packed`) when
    every model's attention can take them and, on a test batch made of `prompt` (left- and
    right-padded), they give what the padded passes give; a sentence saying how the passes run.
    Otherwise each model keeps its own attention implementation."""
    scorers = [scorer for scorer in (models.reward_model, models.value_model) if scorer is not None]
    modules = [models.policy, *([models.reference] if models.reference is not None else []),
               *(scorer.classifier for scorer in scorers)]
    implementations = [inner_model(module).config._attn_implementation for module in modules]
    unpackable = [name for name in implementations if name not in PACKABLE_ATTENTION]
    if unpackable:
        return f"padded passes (the models' {unpackable[0]} attention takes no block mask)"
    try:
        gap = _packing_gap(models, scorers, *_test_batch(prompt, pad_token_id, models))
    except (TypeError, ValueError, RuntimeError) as err:
        gap = f"{type(err).__name__}: {first_line(err)}"
    if gap is None:
        models.packed = True
        for scorer in scorers:
            scorer.packed = True
        return "each episode's real tokens only through the models (no padding computed)"
    for module, implementation in zip(modules, implementations):
        inner_model(module).set_attn_implementation(implementation)
    return f"padded passes (the models' outputs change when packed: {gap})"


def _test_batch(prompt: list[int], pad_token_id: int, models: Models):
    """Two episodes of `prompt`'s tokens: the prompt and its second half, answered by its first
    four and first two tokens; so one is left-padded and the other right-padded."""
    device = next(models.policy.parameters()).device
    prompt_ids, prompt_mask = left_pad([prompt, prompt[len(prompt) // 2:]], pad_token_id)
    response_ids, response_mask = right_pad([prompt[:4], prompt[:2]], pad_token_id)
    return (torch.cat([prompt_ids, response_ids], dim=1).to(device),
            torch.cat([prompt_mask, response_mask], dim=1).to(device), response_mask.to(device))


def _packing_gap(models: Models, scorers: list[TokenScorer], sequences, attention_mask,
                 response_mask) -> str | None:
    """How far the packed passes' outputs are from the padded ones' on real tokens, or None when
    within rounding of the weights' dtype."""
    width = response_mask.shape[1]
    kept = response_mask.bool()
    pairs = []
    try:
        for packed in (False, True):
            models.packed = packed
            for scorer in scorers:
                scorer.packed = packed
            logits, hidden = response_logits(models.policy, sequences, attention_mask, width,
                                             with_hidden=True, packed=packed)
            reference = models.reference_logits(sequences, attention_mask, width)
            pairs.append([logits[kept], hidden[kept], reference[kept],
                          *(scorer(sequences, attention_mask)[attention_mask.bool()]
                            for scorer in scorers)])
    finally:
        models.packed = False
        for scorer in scorers:
            scorer.packed = False
    dtype = next(models.policy.parameters()).dtype
    tolerance = max(1e-4, 8 * torch.finfo(dtype).eps)
    for name, padded, packed in zip(("policy logits", "policy hidden states", "reference logits",
                                     "reward scores", "values"), *pairs):
        gap = (packed.float() - padded.float()).abs().max().item()
        if gap > tolerance * (1 + padded.float().abs().max().item()):
            return f"{name} by {gap:.2g}"
    return None


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def build_models(config: Config, start_policy: nn.Module, reward_model: nn.Module, tokenizer,
                 resume_dir: Path | None, frozen_dtype: torch.dtype) -> Models:
    """Policy, reference, reward and value models, from the starting policy and the reward model
    or from a resume state. The frozen reference and reward model are held in `frozen_dtype`
    (the compute dtype: bf16 under bf16 autocast), the trained ones as loaded."""
    weights_dtype = start_policy.dtype  # what trains; the reference may be cast below
    if len(tokenizer) > start_policy.get_input_embeddings().num_embeddings:
        start_policy.resize_token_embeddings(len(tokenizer))  # a role token the model lacks
    if config.lora.enabled:
        # The adapter is the only trainable part; disabling it gives back the reference.
        if resume_dir is None:
            policy = apply_lora(start_policy, config.lora)
        else:
            from peft import PeftModel  # imported only when LoRA is on: it is slow to import
            policy = PeftModel.from_pretrained(start_policy, resume_dir / "model", is_trainable=True)
        reference = None
    else:
        reference = frozen(start_policy if resume_dir else copy.deepcopy(start_policy))
        reference.to(frozen_dtype)
        policy = (load_causal_lm(Resolved(str(resume_dir / "model")),
                                 trust_remote_code=config.runtime.trust_remote_code,
                                 dtype=weights_dtype)
                  if resume_dir else start_policy).requires_grad_(True)  # a merged adapter froze it
    value_model = value_head = None
    if config.value.shared_backbone:
        value_head = ValueHead(policy.config.hidden_size).to(weights_dtype)
    else:  # a trainable copy, made before the reward model is frozen
        value_model = TokenScorer(copy.deepcopy(reward_model).requires_grad_(True))
    policy.eval()
    if config.train.gradient_checkpointing:
        value_classifier = [value_model.classifier] if value_model is not None else []
        for trained in [policy, *value_classifier]:
            enable_gradient_checkpointing(trained)
            without_dropout(trained)
    models = Models(policy=policy, reference=reference,
                    reward_model=frozen(TokenScorer(reward_model.to(frozen_dtype))),
                    value_model=value_model, value_head=value_head)
    if resume_dir is not None:
        models.critic.load_pretrained(resume_dir / "value")
    return models
