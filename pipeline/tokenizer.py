"""The project's tokenizer, its chat template, and chat encoding with assistant-only labels.

Every stage tokenizes through this module, so pretraining, SFT, the reward model and PPO all
see text framed the same way:

    <|system|>\\n{content}<|end|>\\n
    <|user|>\\n{content}<|end|>\\n
    <|assistant|>\\n{content}<|end|>\\n

`<|end|>` is the EOS token: it ends pretraining documents and every chat turn, so generation
stops at the end of an assistant turn. In SFT only the assistant's content and its `<|end|>` are
trained on (labels are -100 elsewhere); the `\\n` after `<|end|>` is framing that the model
never generates, so it is not trained on either.

Tokenizers come from two places:
- `train_tokenizer` trains a byte-level BPE on a corpus (any script, Chinese included) and
  attaches `CHAT_TEMPLATE`.
- `load_tokenizer` loads a saved or third-party tokenizer and fills in what it lacks (a pad
  token, a chat template). Filling in can add tokens; a model whose input embedding has fewer
  rows than `len(tokenizer)` must then be resized with
  `model.resize_token_embeddings(len(tokenizer))`. That comparison is the one way callers tell,
  and it also catches a trained tokenizer whose vocabulary came out smaller than asked.

Imports of `transformers` stay inside functions: importing this module is cheap.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Literal

from pipeline.errors import UserError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

END_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
ROLE_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN)
# The order fixes their ids in a trained tokenizer: <|end|> = 0, <|pad|> = 1, then the roles.
SPECIAL_TOKENS = (END_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

# One CJK ideograph, CJK punctuation mark or full-width form. Chinese has no spaces, so without
# this a whole clause is one pre-token and BPE learns clause tokens ("猫住在屋子里" as one id): a
# small model then cannot relate "狗的叫声是" to "狗", and ignores Chinese questions it has not
# seen verbatim. One character per pre-token keeps Chinese as compositional as English words.
CJK_CHARACTER = "[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"

# Label value that the cross-entropy loss ignores (PyTorch's and transformers' default).
IGNORE_INDEX = -100

# Turns end with `eos_token` rather than a literal `<|end|>`: for the project's own tokenizer the
# two are the same, and a third-party tokenizer given this template then ends turns with its own
# EOS, at which `generate` already stops. The `{% generation %}` block lets transformers return
# the assistant token mask; it spans the content and its EOS but not the newline after it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role \\'' + message['role']"
    " + '\\' (the template knows system, user, assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Byte-level BPE starts from the 256 byte symbols, so smaller vocabularies cannot exist.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = list[dict[str, str]]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`, with the special tokens and chat template.

    Byte-level means any UTF-8 text (Chinese included) encodes without unknown tokens. Each CJK
    character is its own pre-token (see `CJK_CHARACTER`), so a merge never spans two of them.
    Training is deterministic: the same texts give the same vocabulary and merges. On a small
    corpus the vocabulary can come out smaller than `vocab_size` (no pair left to merge); size the
    model's embedding from `len(tokenizer)`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"tokenizer vocab_size {vocab_size} is too small: a byte-level tokenizer needs "
            f"at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
            "raise vocab_size"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    # Untrimmed offsets keep every byte of the text inside some token's character span, which
    # the assistant mask relies on.
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS),
        # Byte-level decoding is already exact; "clean up" would drop spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def load_tokenizer(path_or_name: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer with `AutoTokenizer` (a hub name at `revision`) and make it usable by
    every stage.

    A tokenizer without a chat template gets `CHAT_TEMPLATE` (see `ensure_chat_template`); one
    without a pad token gets one (see `ensure_pad_token`). Both may add tokens: compare
    `len(tokenizer)` with the model's embedding rows and resize when it is larger.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=trust_remote_code,
                                                  revision=revision)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load a tokenizer from '{path_or_name}': {first_line(err)}; "
            "point to a directory with tokenizer files or a hub name"
        ) from err
    # The template first: it may give the tokenizer an EOS, which the pad token can then reuse.
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Attach `CHAT_TEMPLATE` if the tokenizer has no chat template; True if tokens were added.

    The template needs the role tokens, and an EOS to end turns: missing ones are added as
    special tokens (`<|end|>` becomes the EOS when there is none). A tokenizer's own template is
    kept as it is.
    """
    if tokenizer.chat_template:
        return False
    missing: dict = {}
    if tokenizer.eos_token is None:
        missing["eos_token"] = END_TOKEN
    vocab = tokenizer.get_vocab()
    new_roles = [token for token in ROLE_TOKENS if token not in vocab]
    if new_roles:
        missing["extra_special_tokens"] = new_roles
    tokenizer.chat_template = CHAT_TEMPLATE
    if not missing:
        return False
    return tokenizer.add_special_tokens(missing, replace_extra_special_tokens=False) > 0


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token if it has none; True if a token was added.

    The pad token becomes the EOS when there is one (no new token, no resize). Only a tokenizer
    with neither gets a new `<|pad|>`. With pad == EOS, code must find padding from the
    attention mask or sequence lengths, never by comparing ids with `pad_token_id`, or it would
    also hide the real EOS at the end of each answer.
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return False
    return tokenizer.add_special_tokens({"pad_token": PAD_TOKEN}) > 0


# The conversation a chat template is tried on before training: two answers, each of which must
# come out marked for training, end with the EOS token, and leave the questions unmarked.
_PROBE = [{"role": "user", "content": "How many legs do two cows have?"},
          {"role": "assistant", "content": "Two cows have 8 legs."},
          {"role": "user", "content": "And one spider?"},
          {"role": "assistant", "content": "One spider has 8 legs."}]


def answer_marking_problem(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the tokenizer's chat template cannot mark the answers to train on, or None.

    Tried on one short conversation, as training would encode it: the template must render a
    generation prompt (or a prompt could not end where the answer begins), mark each answer and
    no question, and end each answer with the EOS token (or a trained model never learns to stop).
    The tokenizer must have an EOS token.
    """
    first_turn = _PROBE[:1]
    if _render(tokenizer, first_turn, add_generation_prompt=True) == _render(tokenizer, first_turn):
        return ("the template ignores add_generation_prompt, so a prompt cannot end where an "
                "answer begins")
    input_ids, assistant_mask = _encode_with_assistant_mask(tokenizer, _PROBE)
    marked = [token for token, in_answer in zip(input_ids, assistant_mask) if in_answer]
    marked_text = tokenizer.decode(marked)
    for message in _PROBE:
        is_answer = message["role"] == "assistant"
        if (message["content"] in marked_text) != is_answer:
            return (f"it marks {'no' if is_answer else 'the'} {message['role']} text "
                    f"{message['content']!r} as an answer")
    answers = sum(message["role"] == "assistant" for message in _PROBE)
    if marked.count(tokenizer.eos_token_id) != answers:
        return (f"its assistant turns do not end with the EOS token {tokenizer.eos_token!r}, so "
                f"a trained model would not learn to stop")
    return None


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    max_length: int,
    truncation: Literal["truncate", "drop"] = "truncate",
) -> dict | None:
    """Encode a conversation for SFT: `{"input_ids", "labels", "truncated"}`, or None.

    `labels` equal `input_ids` on the assistant tokens (each turn's content and its EOS) and
    are `IGNORE_INDEX` elsewhere. A conversation longer than `max_length` tokens is cut to its
    first `max_length` tokens with `truncation="truncate"`, and gives None with "drop". It also
    gives None when the cut leaves no assistant token, since there is nothing to learn from it;
    callers count the Nones.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    if not any(message.get("role") == "assistant" for message in messages):
        raise UserError(
            "conversation has no assistant message, so there is nothing to train on; "
            "every SFT example needs at least one message with role 'assistant'"
        )
    input_ids, assistant_mask = _encode_with_assistant_mask(tokenizer, messages)
    truncated = len(input_ids) > max_length
    if truncated:
        if truncation == "drop":
            return None
        input_ids, assistant_mask = input_ids[:max_length], assistant_mask[:max_length]
        if not any(assistant_mask):
            return None
    labels = [
        token_id if in_answer else IGNORE_INDEX
        for token_id, in_answer in zip(input_ids, assistant_mask)
    ]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, max_length: int
) -> list[int]:
    """Token ids of a chat prompt followed by the generation prompt (`<|assistant|>\\n`).

    A string is one user message. Over-long prompts keep their LAST `max_length` tokens: the
    generation prompt and the latest request must survive for sampling to make sense, while the
    opening (system message, earliest turns) is what a model can best do without.
    """
    messages = _as_messages(prompt)
    _check_control_tokens(tokenizer, messages)
    input_ids = _render(tokenizer, messages, add_generation_prompt=True, tokenize=True)
    return _keep_last(input_ids, max_length)


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Messages, response: str, max_length: int
) -> list[int]:
    """Token ids of a prompt and the assistant's response, ending at the response's EOS.

    This is what the reward model scores, at the last token. Anything a template puts after the
    EOS (the newline of `CHAT_TEMPLATE`) is cut off. Over-long sequences keep their LAST
    `max_length` tokens, as in `encode_prompt`, so the scored EOS always remains.
    """
    messages = [*_as_messages(prompt), {"role": "assistant", "content": response}]
    input_ids, assistant_mask = _encode_with_assistant_mask(tokenizer, messages)
    end = max(i for i, in_answer in enumerate(assistant_mask) if in_answer) + 1
    return _keep_last(input_ids[:end], max_length)


def _encode_with_assistant_mask(
    tokenizer: PreTrainedTokenizerBase, messages: Messages
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask marking the assistant tokens."""
    _check_control_tokens(tokenizer, messages)
    if _GENERATION_TAG.search(tokenizer.get_chat_template()):
        encoded = _render(tokenizer, messages, tokenize=True, return_assistant_tokens_mask=True)
        return list(encoded["input_ids"]), list(encoded["assistant_masks"])
    return _mask_from_prefixes(tokenizer, messages)


def _mask_from_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: Messages
) -> tuple[list[int], list[int]]:
    """Assistant mask for a template without `{% generation %}` tags, found from prefixes.

    Assistant turn i spans, in the rendered text, from the end of `messages[:i]` rendered with
    the generation prompt to the end of `messages[:i+1]`, cut after the last EOS in that span
    (so a template's trailing newline or separator is not trained on). Character spans are
    mapped to tokens through the offsets of the full text's encoding, so a token that a BPE
    merge carries across a boundary is still found; a token overlapping a span is marked.
    This needs a template whose rendering of earlier turns does not change when later turns
    are added, which is checked.
    """
    full_text = _render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            raise UserError(
                "conversation starts with an assistant message, which this tokenizer's chat "
                "template cannot mark for training; put a user message first"
            )
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if not (full_text.startswith(before) and full_text.startswith(through)):
            raise UserError(
                "the tokenizer's chat template renders earlier turns differently once later "
                "turns follow, so its assistant tokens cannot be located; add {% generation %} "
                "tags around the assistant content in the template, or use the project's template"
            )
        end_of_turn = through.rfind(tokenizer.eos_token, len(before)) if tokenizer.eos_token else -1
        end = end_of_turn + len(tokenizer.eos_token) if end_of_turn >= 0 else len(through)
        spans.append((len(before), end))
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(token_end > start and token_start < end for start, end in spans))
        for token_start, token_end in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), mask


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, **kwargs):
    """`apply_chat_template` (text unless `tokenize=True`), with template errors as UserError."""
    from jinja2.exceptions import TemplateError

    kwargs.setdefault("tokenize", False)
    if kwargs["tokenize"] and not kwargs.get("return_assistant_tokens_mask"):
        kwargs["return_dict"] = False
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as err:
        raise UserError(
            f"the chat template rejected a conversation: {first_line(err)}; "
            "fix the messages' roles or content"
        ) from err


def _check_control_tokens(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> None:
    """Reject message text that contains a special token such as `<|end|>`.

    Tokenizing the rendered chat would turn it into the real token: an answer would end
    early or a fake turn would begin, silently.
    """
    for position, message in enumerate(messages, start=1):
        content = message.get("content")
        if not isinstance(content, str):
            continue
        for token in tokenizer.all_special_tokens:
            if token in content:
                raise UserError(
                    f"message {position} ({message.get('role')}) contains the special token "
                    f"'{token}', which would be read as chat structure; remove it from the data"
                )


def _as_messages(prompt: str | Messages) -> Messages:
    """A prompt as a message list: a string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _keep_last(input_ids: list[int], max_length: int) -> list[int]:
    """The last `max_length` ids (left truncation)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    return list(input_ids[-max_length:])
