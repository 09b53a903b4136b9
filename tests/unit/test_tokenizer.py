"""Tests for pipeline.tokenizer: training, the chat template, assistant-only labels, loading."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.errors import UserError
from pipeline.data.packing import left_pad
from pipeline.tokenizer import (CHAT_TEMPLATE, END_TOKEN, IGNORE_INDEX, MIN_VOCAB_SIZE, PAD_TOKEN,
                                ROLE_TOKENS, answer_marking_problem, encode_chat, encode_prompt,
                                encode_prompt_response,
                                ensure_chat_template, ensure_pad_token, load_tokenizer,
                                train_tokenizer)

CORPUS = [
    "The cat sat on the mat.",
    "A dog ran across the park to fetch the ball.",
    "Water boils at one hundred degrees Celsius.",
    "The capital of France is Paris.",
    "Please add two and three, then tell me the sum.",
    "Two plus three is five.",
    "She reads a book every evening before bed.",
    "The train leaves the station at nine o'clock.",
    "What is the weather like today?",
    "It is sunny and warm, with a light breeze.",
    "Learning a new language takes patience and practice.",
    "The river flows quietly through the green valley.",
    "He wrote a short letter to his grandmother.",
    "Be helpful, honest and brief.",
    "Could you summarise this paragraph for me?",
    "Sure, here is a one-line summary.",
    "你好，世界！",
    "今天天气很好，我们去公园散步吧。",
    "猫坐在垫子上。",
    "法国的首都是巴黎。",
    "二加三等于五。",
    "请帮我把这段话翻译成英文。",
    "学习一门新语言需要耐心和练习。",
    "他每天早上喝一杯咖啡。",
    "这本书非常有意思，我推荐给你。",
    "有什么可以帮你的吗？",
    "河水静静地流过绿色的山谷。",
    "火车九点钟离开车站。",
    "请简单地回答这个问题。",
    "谢谢你的帮助！",
]

CONVERSATION = [
    {"role": "system", "content": "Be helpful, honest and brief."},
    {"role": "user", "content": "法国的首都是哪里？"},
    {"role": "assistant", "content": "法国的首都是巴黎。"},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Two plus three is five."},
]
ANSWERS = ["法国的首都是巴黎。", "Two plus three is five."]

# ChatML framing, as many hub models use it, without {% generation %} tags.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400, model_max_length=256)


def byte_level_tokenizer(special_tokens: list[str], **wrapper_kwargs) -> PreTrainedTokenizerFast:
    """A third-party-style byte-level BPE tokenizer, built here instead of downloaded."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **wrapper_kwargs)


def labelled_runs(tokenizer, encoded: dict) -> list[str]:
    """Decode each maximal run of labelled tokens; also checks labels copy input_ids there."""
    runs, current = [], []
    for token_id, label in zip(encoded["input_ids"], encoded["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token_id
            current.append(token_id)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --- training ---------------------------------------------------------------------------------


def test_special_tokens_have_fixed_ids_and_roles(tokenizer):
    assert tokenizer.eos_token == END_TOKEN and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 1
    assert tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS)) == [2, 3, 4]
    assert tokenizer.model_max_length == 256
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_training_is_deterministic(tokenizer):
    again = train_tokenizer(CORPUS, vocab_size=400, model_max_length=256)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_chinese_and_unseen_text_round_trip_exactly(tokenizer):
    text = "龍 and ☃ are not in the corpus; 你好 is. Spaces before . stay ."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_training_merges_frequent_chinese_bytes(tokenizer):
    # "。" (3 bytes in UTF-8) ends most Chinese sentences of the corpus, so it became one token;
    # "首" occurs once and stays as its 3 bytes.
    assert len(tokenizer.encode("。", add_special_tokens=False)) == 1
    assert len(tokenizer.encode("首", add_special_tokens=False)) == 3


def test_chinese_characters_are_never_merged_with_each_other():
    # Repeated often enough that, like " the", a whole Chinese clause would become one token.
    tokenizer = train_tokenizer(["猫住在屋子里。狗住在狗窝里。"] * 50, vocab_size=400)
    text = "猫住在狗窝里。"
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert spans == [(i, i + 1) for i in range(len(text))]  # one token per character


def test_too_small_vocab_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size 100 is too small"):
        train_tokenizer(CORPUS, vocab_size=100)
    assert MIN_VOCAB_SIZE == 261


# --- chat template and encoding ---------------------------------------------------------------


def test_chat_template_renders_the_documented_layout(tokenizer):
    text = tokenizer.apply_chat_template(
        CONVERSATION[:3], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|system|>\nBe helpful, honest and brief.<|end|>\n"
        "<|user|>\n法国的首都是哪里？<|end|>\n"
        "<|assistant|>\n法国的首都是巴黎。<|end|>\n"
        "<|assistant|>\n"
    )


def test_labels_cover_exactly_the_assistant_answers_and_their_end(tokenizer):
    encoded = encode_chat(tokenizer, CONVERSATION, max_length=256)
    assert encoded["truncated"] is False
    assert labelled_runs(tokenizer, encoded) == [answer + END_TOKEN for answer in ANSWERS]
    full_text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(encoded["input_ids"]) == full_text


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    ids = encode_prompt(tokenizer, "法国的首都是哪里？", max_length=256)
    assert tokenizer.decode(ids) == "<|user|>\n法国的首都是哪里？<|end|>\n<|assistant|>\n"
    assert ids[-2] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    one_message = [{"role": "user", "content": "法国的首都是哪里？"}]
    assert encode_prompt(tokenizer, one_message, max_length=256) == ids


def test_long_prompt_keeps_its_last_tokens(tokenizer):
    full = encode_prompt(tokenizer, CONVERSATION[:4], max_length=256)
    assert encode_prompt(tokenizer, CONVERSATION[:4], max_length=5) == full[-5:]
    assert tokenizer.decode(full[-5:]).endswith("<|end|>\n<|assistant|>\n")


def test_prompt_response_ends_at_the_assistant_end_token(tokenizer):
    question = "What is two plus three?"
    ids = encode_prompt_response(tokenizer, question, "Five.", max_length=256)
    assert tokenizer.decode(ids) == f"<|user|>\n{question}<|end|>\n<|assistant|>\nFive.<|end|>"
    assert ids[-1] == tokenizer.eos_token_id
    assert encode_prompt_response(tokenizer, question, "Five.", max_length=4) == ids[-4:]


def test_truncate_keeps_the_start_and_drop_returns_none(tokenizer):
    full = encode_chat(tokenizer, CONVERSATION, max_length=256)
    length = len(full["input_ids"])
    cut = encode_chat(tokenizer, CONVERSATION, max_length=length - 3)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][: length - 3]
    assert cut["labels"] == full["labels"][: length - 3]
    assert encode_chat(tokenizer, CONVERSATION, max_length=length - 3, truncation="drop") is None
    exact = encode_chat(tokenizer, CONVERSATION, max_length=length, truncation="drop")
    assert exact == full


def test_truncation_that_leaves_no_answer_returns_none(tokenizer):
    first_label = next(i for i, label in enumerate(
        encode_chat(tokenizer, CONVERSATION, max_length=256)["labels"]) if label != IGNORE_INDEX)
    assert encode_chat(tokenizer, CONVERSATION, max_length=first_label) is None
    kept = encode_chat(tokenizer, CONVERSATION, max_length=first_label + 1)
    assert sum(label != IGNORE_INDEX for label in kept["labels"]) == 1


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "Hi"}], "no assistant message"),
        (
            [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
            "unknown chat role 'tool'",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a<|end|>b"}],
            "special token '<|end|>'",
        ),
    ],
)
def test_bad_conversations_are_user_errors(tokenizer, messages, message):
    with pytest.raises(UserError, match=message.replace("|", r"\|")):
        encode_chat(tokenizer, messages, max_length=256)


def test_bad_truncation_mode_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="truncation"):
        encode_chat(tokenizer, CONVERSATION, max_length=256, truncation="left")


# --- loading ----------------------------------------------------------------------------------


def test_save_and_reload_keeps_template_and_encoding(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert reloaded.model_max_length == 256
    assert (reloaded.eos_token, reloaded.pad_token) == (END_TOKEN, PAD_TOKEN)
    assert encode_chat(reloaded, CONVERSATION, 256) == encode_chat(tokenizer, CONVERSATION, 256)
    assert load_tokenizer(str(tmp_path)).chat_template == CHAT_TEMPLATE


def test_tokenizer_without_pad_or_template_is_completed(tmp_path):
    gpt2_like = byte_level_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>")
    assert gpt2_like.pad_token is None and not gpt2_like.chat_template
    gpt2_like.save_pretrained(tmp_path)
    size_before = len(gpt2_like)

    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|endoftext|>"
    assert loaded.chat_template == CHAT_TEMPLATE
    # The three role tokens were added: the caller sees len(tokenizer) grow and resizes.
    assert len(loaded) == size_before + 3
    assert all(len(loaded.encode(role, add_special_tokens=False)) == 1 for role in ROLE_TOKENS)
    encoded = encode_chat(loaded, CONVERSATION, max_length=256)
    assert labelled_runs(loaded, encoded) == [answer + "<|endoftext|>" for answer in ANSWERS]


def test_ensure_chat_template_reports_added_tokens():
    bare = byte_level_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>")
    assert ensure_chat_template(bare) is True
    assert ensure_chat_template(bare) is False


def test_tokenizer_without_eos_gets_end_as_eos_and_pad():
    no_specials = byte_level_tokenizer([])
    assert ensure_chat_template(no_specials) is True and no_specials.eos_token == END_TOKEN
    assert ensure_pad_token(no_specials) is False and no_specials.pad_token == END_TOKEN


def test_pad_token_is_added_when_there_is_no_eos():
    no_specials = byte_level_tokenizer([])
    size_before = len(no_specials)
    assert ensure_pad_token(no_specials) is True
    assert no_specials.pad_token == PAD_TOKEN and len(no_specials) == size_before + 1


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))


# --- templates without generation tags --------------------------------------------------------


def test_own_template_without_generation_tags_masks_by_prefixes():
    chatml = byte_level_tokenizer(
        ["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    chatml.chat_template = CHATML_TEMPLATE
    encoded = encode_chat(chatml, CONVERSATION, max_length=256)
    # Each answer and its <|im_end|>, without the template's newline after it.
    assert labelled_runs(chatml, encoded) == [answer + "<|im_end|>" for answer in ANSWERS]
    ids = encode_prompt_response(chatml, "Hi", "Hello.", max_length=256)
    assert chatml.decode(ids) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"
    )


def test_prefix_method_agrees_with_generation_tags(tokenizer):
    untagged = train_tokenizer(CORPUS, vocab_size=400)
    untagged.chat_template = CHAT_TEMPLATE.replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", ""
    )
    assert untagged.chat_template != CHAT_TEMPLATE
    assert encode_chat(untagged, CONVERSATION, 256) == encode_chat(tokenizer, CONVERSATION, 256)


def test_template_that_rewrites_earlier_turns_is_a_user_error(tokenizer):
    unstable = train_tokenizer(CORPUS, vocab_size=400)
    # Numbers each turn from the end, so adding a turn changes every earlier one.
    unstable.chat_template = (
        "{% for m in messages %}"
        "{{ (messages|length - loop.index)|string + m['content'] }}"
        "{% endfor %}"
    )
    with pytest.raises(UserError, match="renders earlier turns differently"):
        encode_chat(unstable, CONVERSATION, max_length=256)


def chatml_tokenizer(template: str, eos_token: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    chatml = byte_level_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  eos_token=eos_token, pad_token=eos_token)
    chatml.chat_template = template
    return chatml


def test_templates_that_mark_answers_pass_the_probe(tokenizer):
    assert answer_marking_problem(tokenizer) is None  # {% generation %} tags
    assert answer_marking_problem(chatml_tokenizer(CHATML_TEMPLATE)) is None  # prefixes


@pytest.mark.parametrize("template, eos_token, problem", [
    (CHATML_TEMPLATE.replace("{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                             "{% endif %}", ""), "<|im_end|>", "ignores add_generation_prompt"),
    # Turns end with <|im_end|>, but the EOS is <|endoftext|>: a model would never stop.
    (CHATML_TEMPLATE, "<|endoftext|>", "do not end with the EOS token '<|endoftext|>'"),
    # {% generation %} tags around the wrong turns.
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'user' %}"
     "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
     "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", "<|im_end|>",
     "marks the user text 'How many legs do two cows have?' as an answer"),
])
def test_templates_that_cannot_mark_answers_are_named(template, eos_token, problem):
    assert problem in answer_marking_problem(chatml_tokenizer(template, eos_token))


# --- padding ----------------------------------------------------------------------------------


def test_left_pad_aligns_sequences_right():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8], []], pad_id=1)
    assert input_ids.tolist() == [[5, 6, 7], [1, 1, 8], [1, 1, 1]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.long
