"""`rlhf chat` and `rlhf generate`: talk to any checkpoint in the terminal, or sample answers for
scripts.

    rlhf chat ppo:latest [--reward reward:latest] [--temperature 0.7] [--top-k 50]
    rlhf generate sft:latest --prompt "How many legs do three chickens have?" [--n 4] [--json]

The chat keeps the conversation's history and formats it with the checkpoint's chat template;
the answer is printed token by token as it is generated. `/reset` starts a new conversation,
`/exit` (or the end of the input) quits. Piped input works the same way, one message per line,
and each message is echoed so that the output reads as a transcript. Any model reference works:
a run id, `STAGE:latest`, `RUN@step`, an alias, a pipeline (its final model) or a directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipeline.chain import open_registry, resolve_model
from pipeline.errors import UserError
from pipeline.generation import SamplingConfig, generate_kwargs, sample
from pipeline.registry import Resolved
from pipeline.tokenizer import encode_prompt

COMMANDS = "commands: /reset starts a new conversation, /exit quits"


def is_reward_model(path: str | Path) -> bool:
    """A published reward model is a sequence classifier, which has no answers to give."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (ValueError, AttributeError):  # not a config we can read: loading will say what is wrong
        return False
    return bool(architectures) and all(name.endswith("ForSequenceClassification")
                                       for name in architectures)


def load_for_sampling(resolved: Resolved):
    """A causal LM and its tokenizer, ready to generate (eval mode, GPU when there is one)."""
    from transformers.utils.logging import disable_progress_bar

    from pipeline.models import load_causal_lm
    from pipeline.tokenizer import load_tokenizer

    disable_progress_bar()  # a bar per weight load would interleave with the conversation
    if is_reward_model(resolved.path):
        raise UserError(f"{resolved.path} is a reward model, which scores answers rather than "
                        f"writing them; pass a policy (e.g. sft:latest or ppo:latest), and the "
                        f"reward model as --reward")
    model = load_causal_lm(resolved, trainable_adapter=False)
    tokenizer = load_tokenizer(resolved.path)
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


def sampling_of(args) -> SamplingConfig:
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.top_k < 0 or args.max_new_tokens < 1:
        raise UserError("--top-k must be 0 (off) or more and --max-new-tokens at least 1")
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, batch_size=32)


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


def reward_scorer(registry, ref: str) -> Callable[[list[dict], str], float]:
    """`score(prompt_messages, answer)` with the reward model `ref`."""
    from pipeline.scoring import load_reward_model, score_texts

    reward_model, tokenizer = load_reward_model(resolve_model(registry, ref))
    return lambda prompt, answer: score_texts(reward_model, tokenizer, [prompt], [answer])[0]


def user_lines(interactive: bool) -> Iterator[str]:
    """Messages typed at a prompt, or read one per line from a pipe (echoed as a transcript)."""
    if not interactive:
        for line in sys.stdin:
            text = line.rstrip("\n")
            print(f"you> {text}", flush=True)
            yield text
        return
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: goodbye
            print()
            return


def cmd_chat(args) -> int:
    sampling = sampling_of(args)
    registry = open_registry(args.home)
    model, tokenizer = load_for_sampling(resolve_model(registry, args.ref))
    scorer = reward_scorer(registry, args.reward) if args.reward else None
    conversation = Conversation(model, tokenizer, sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.ref}; {COMMANDS}")
    for text in user_lines(interactive):
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            conversation.reset()
            print("(new conversation)", flush=True)
            continue
        if command.startswith("/"):
            print(COMMANDS, flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            answer = conversation.reply(text, stream=True)
        except UserError as err:  # e.g. a message containing a chat control token: say, go on
            print(f"\nerror: {err}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the history stays as it was
            print("\n(stopped)", flush=True)
            continue
        if scorer is not None:
            print(f"  (reward {scorer(conversation.messages[:-1], answer):+.3f})", flush=True)
    return 0


def cmd_generate(args) -> int:
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    sampling = sampling_of(args)
    resolved = resolve_model(open_registry(args.home), args.ref)
    model, tokenizer = load_for_sampling(resolved)
    answers = sample(model, tokenizer, [args.prompt] * args.n, sampling, seed=args.seed,
                     max_prompt_tokens=prompt_budget(model, sampling.max_new_tokens))
    if args.json:
        print(json.dumps({"ref": args.ref, "model_path": resolved.path, "prompt": args.prompt,
                          "answers": answers}, ensure_ascii=False))
    elif args.n == 1:
        print(answers[0])
    else:
        for number, answer in enumerate(answers, start=1):
            print(f"[{number}] {answer}")
    return 0
