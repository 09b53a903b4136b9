"""Sampling answers from a causal LM: in batches, or turn by turn in a conversation.

Used by the gold evals (`pipeline.world.evaluation`), reward normalization, `rlhf generate`,
`rlhf chat`, the labeling page and the report. Prompts are chat-formatted with the tokenizer's
template, left-padded and sampled with the KV cache; decoding stops at EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline import console
from pipeline.data.packing import left_pad
from pipeline.errors import UserError
from pipeline.guard import check_eos
from pipeline.models import load_causal_lm
from pipeline.registry import Resolved
from pipeline.tokenizer import encode_prompt, load_tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0    # EOS is blocked before this many tokens
    temperature: float = 0.7   # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32

    @classmethod
    def from_options(cls, options) -> "SamplingConfig":
        """The settings of a command's --temperature, --top-k and --max-new-tokens (the guard's
        option types checked their ranges as the command line was parsed)."""
        return cls(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                   top_k=options.top_k, batch_size=32)


@dataclass
class Answer:
    text: str     # decoded without special tokens, stripped
    ended: bool   # the model emitted EOS within max_new_tokens
    token_ids: list[int] = field(default_factory=list, repr=False)  # the prompt as encoded, then
    # the answer through its EOS (or to the length limit): what a reward model scores in PPO


def sample(model, tokenizer, prompts: list, sampling: SamplingConfig | None = None,
           seed: int | None = 0, max_prompt_tokens: int = 192, progress: str = "") -> list[str]:
    """One answer per prompt (a string or a chat-message list), decoded without special tokens.
    `progress` labels a progress bar over the prompts (none when empty)."""
    return [answer.text for answer in
            sample_answers(model, tokenizer, prompts, sampling, seed, max_prompt_tokens, progress)]


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list, sampling: SamplingConfig | None = None,
                   seed: int | None = 0, max_prompt_tokens: int = 192,
                   progress: str = "") -> list[Answer]:
    """One answer per prompt, with whether it ended (EOS) before the length limit; `progress`
    as in `sample`."""
    sampling = sampling or SamplingConfig()
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    answers = []
    was_training = model.training
    model.eval()
    bar = console.progress(len(prompts), progress, unit="answer", enabled=bool(progress))
    for start in range(0, len(prompts), sampling.batch_size):
        chunk = prompts[start: start + sampling.batch_size]
        encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in chunk]
        input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device),
                                attention_mask=attention_mask.to(device),
                                **generate_kwargs(tokenizer, sampling))
        new_tokens = output[:, input_ids.shape[1]:].cpu()
        answers += [answer_of(tokenizer, prompt_ids, row)
                    for prompt_ids, row in zip(encoded, new_tokens)]
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return answers


def answer_of(tokenizer, prompt_ids: list[int], new_tokens: torch.Tensor) -> Answer:
    """An answer from the tokens generated after its prompt (padding after the EOS dropped)."""
    eos = (new_tokens == tokenizer.eos_token_id).nonzero()
    answer_ids = new_tokens[:int(eos[0]) + 1] if len(eos) else new_tokens
    return Answer(tokenizer.decode(answer_ids, skip_special_tokens=True).strip(), bool(len(eos)),
                  prompt_ids + answer_ids.tolist())


def generate_kwargs(tokenizer, sampling: SamplingConfig) -> dict:
    greedy = sampling.temperature <= 0
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  use_cache=True)
    if sampling.min_new_tokens:
        kwargs["min_new_tokens"] = sampling.min_new_tokens
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or None,
                      top_p=sampling.top_p)
    return kwargs


def load_for_sampling(resolved: Resolved, role: str = "the policy"):
    """A causal LM and its tokenizer, ready to generate (eval mode, GPU when there is one); the
    guard refuses any other kind of model, naming `role`."""
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a bar per weight load would interleave with the conversation
    model = load_causal_lm(resolved, trainable_adapter=False, role=role)
    tokenizer = load_tokenizer(resolved.path, revision=resolved.revision)
    check_eos(tokenizer, model, resolved.path)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The tokenizer needed chat tokens the model never saw; sampling must not index past them.
        model.resize_token_embeddings(len(tokenizer))
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def prompt_budget(model, max_new_tokens: int) -> int:
    """Prompt tokens that fit in the model's context next to the answer."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    if max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the "
                        f"model's context of {context} tokens; lower it")
    return context - max_new_tokens


class Conversation:
    """A multi-turn chat with one model: the history, and the next answer to it."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.max_prompt_tokens = prompt_budget(model, sampling.max_new_tokens)
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        self.messages = []

    @torch.no_grad()
    def reply(self, text: str, stream: bool = False) -> str:
        """The model's answer to `text` after the history so far (printed as it comes when
        `stream`); both join the history. A long history keeps its latest turns."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt_ids = encode_prompt(self.tokenizer, messages, self.max_prompt_tokens)
        input_ids = torch.tensor([prompt_ids], device=self.model.device)
        streamer = answer_streamer(self.tokenizer) if stream else None
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     streamer=streamer,
                                     **generate_kwargs(self.tokenizer, self.sampling))
        answer = self.tokenizer.decode(output[0, len(prompt_ids):],
                                       skip_special_tokens=True).strip()
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer


def answer_streamer(tokenizer):
    """A TextStreamer that prints the answer as it comes, without the space its first token
    carries (the answer kept in the history is stripped the same way)."""
    from transformers import TextStreamer

    class AnswerStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    return AnswerStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
