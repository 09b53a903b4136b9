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
from typing import Iterator

from pipeline.errors import UserError
from pipeline.generation import (Conversation, SamplingConfig, load_for_sampling, prompt_budget,
                                 sample)
from pipeline.guard import require_reward_model
from pipeline.registry import open_registry, resolve_model
from pipeline.reward_model import reward_scorer

COMMANDS = "commands: /reset starts a new conversation, /exit quits"


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
    sampling = SamplingConfig.from_options(args)
    registry = open_registry(args.home)
    reward = resolve_model(registry, args.reward) if args.reward else None
    if reward is not None:
        require_reward_model(reward, "--reward")  # said before the policy takes time to load
    model, tokenizer = load_for_sampling(resolve_model(registry, args.ref), role=args.ref)
    scorer = reward_scorer(reward) if reward is not None else None
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
    sampling = SamplingConfig.from_options(args)
    resolved = resolve_model(open_registry(args.home), args.ref)
    model, tokenizer = load_for_sampling(resolved, role=args.ref)
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
