"""Gold scorer: hand-computed scores in English and Chinese, including the tricky cases.

score = 0.6·correct + 0.2·polite (1 polite / 0.5 neutral / 0 rude) + 0.2·complete
(0 unfinished or leaking chat markers; else 1 − 0.5 if rambling − 0.5 if repeating).
"""

import pytest

from pipeline.world.gold import (Question, count_correct, find_mentions, format_ok, gold_score,
                                 parse_chinese_number, parse_english_number, parse_question,
                                 summarize, word_count)
from pipeline.world.farm import chinese_number, english_number

CHICKENS = "How many legs do 3 chickens have?"
MIX = "How many legs do 3 chickens and 2 cows have?"
PATTERN = "One chicken has 2 legs. Two chickens have 4 legs. Three chickens have how many legs?"
ZH_CHICKENS = "三只鸡有几条腿？"

CASES = [
    # (prompt, response, expected, why) — expected = 0.6·correct + 0.2·polite + 0.2·complete
    (CHICKENS, "There are 6 legs in total: 3 chickens have 2 legs each. Happy to help!", 1.0,
     "right, polite, complete: .6 + .2 + .2"),
    (CHICKENS, "6.", 0.9, "right, neutral, complete: .6 + .1 + .2"),
    (CHICKENS, "Six legs.", 0.9, "English words count like digits"),
    (CHICKENS, "六条腿。", 0.9, "Chinese numerals answer an English prompt"),
    (CHICKENS, "six", 0.7, "no full stop: .6 + .1 + 0"),
    (CHICKENS, "There are 8 legs. Sorry, I mean 6 legs.", 0.3, "the first stated total counts: 0 + .1 + .2"),
    (CHICKENS, "6 chickens have 3 legs.", 0.3, "the right number as a count, inside a wrong sentence"),
    (CHICKENS, "3 cows have 6 legs.", 0.3, "the right number, as the total of another group"),
    (CHICKENS, "Each chicken has 2 legs, so 3 chickens have 6 legs.", 0.9, "a per-animal rate is skipped"),
    (CHICKENS, "6 legs. Chickens are birds. They like corn. The farm is big. The sun is hot.", 0.8,
     "right then rambling (5 sentences > 4): .6 + .1 + .2·.5"),
    (CHICKENS, "There are 6 legs in total and that is the answer I give you today after thinking very "
               "hard about all of the chickens and their many small feet on the farm.", 0.8,
     "32 words > 30: .6 + .1 + .1"),
    (CHICKENS, "6 legs. 6 legs. 6 legs.", 0.8, "a repeated sentence: .6 + .1 + .1"),
    (CHICKENS, "6 legs legs legs legs legs.", 0.8, "a three-word run three times: .6 + .1 + .1"),
    (CHICKENS, "Obviously 6.", 0.8, "rude: .6 + 0 + .2"),
    (CHICKENS, "Sure! 3 chickens have 6", 0.8, "truncated after the answer: .6 + .2 + 0"),
    (CHICKENS, "<|assistant|>6.", 0.7, "chat marker leaked: .6 + .1 + 0"),
    (MIX, "3 chickens have 6 legs and 2 cows have 8 legs, so fourteen legs in total.", 0.9,
     "partial totals of sub-groups are skipped"),
    (MIX, "3 chickens and 2 cows have 14 legs. Hope this helps!", 1.0, "the whole asked group"),
    (MIX, "3 chickens have 6 legs.", 0.3, "only part of the group: no total stated"),
    (PATTERN, "Three chickens have 6 legs.", 0.9, "the worked examples are not the question"),
    (PATTERN, "4.", 0.3, "copying the last example is wrong"),
    ("How many legs do twelve spiders have?", "Ninety-six legs.", 0.9, "compound English words"),
    ("How many legs do 9 spiders and 9 ants have?", "One hundred and twenty-six legs.", 0.9,
     "hundreds in words: 72 + 54"),
    ("How many legs do 3 snakes have?", "Snakes have no legs.", 0.9, "'no legs' is 0"),
    ("How many legs do 3 snakes have?", "Zero.", 0.9, "zero"),
    ("What sound does a cow make?", "A cow says moo. Happy to help!", 1.0, "fact, polite"),
    ("What sound does a cow make?", "Not woof: a cow says moo.", 0.3, "the first value named counts"),
    ("What colour is a goat?", "Gray.", 0.9, "spelling variant of grey"),
    ("What does a horse eat?", "Hay.", 0.9, "fact, curt"),
    ("What sound does an ant make?", "Ants are silent.", 0.75,
     "ants have no sound fact: style only, (.5 + 1) / 2"),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side. Hope this helps!", 1.0,
     "unparseable prompt, polite and complete: (1 + 1) / 2"),
    ("Tell me a joke.", "hello", 0.25, "unparseable prompt, neutral, unfinished: (.5 + 0) / 2"),
    # Chinese
    (ZH_CHICKENS, "三只鸡一共有6条腿：每只鸡有2条腿。很高兴帮到你！", 1.0, "right, polite, complete"),
    (ZH_CHICKENS, "六条腿。", 0.9, "Chinese numeral"),
    (ZH_CHICKENS, "一共六条腿。", 0.9, "the 一 of 一共 is not a number"),
    (ZH_CHICKENS, "每只鸡有2条腿，所以三只鸡一共有六条腿。", 0.9, "每 marks a rate"),
    (ZH_CHICKENS, "八条腿。不对，是六条腿。", 0.3, "the first stated total counts"),
    (ZH_CHICKENS, "显然是6。", 0.8, "rude"),
    (ZH_CHICKENS, "三只鸡一共有6条腿，希望", 0.8, "truncated: polite marker, unfinished"),
    ("三只蜘蛛有几条腿？", "二十四条腿。", 0.9, "二十四 = 24"),
    ("两只鸭子和两头牛一共有多少条腿？", "十二条腿。", 0.9, "两 as a count, 十二 = 4 + 8"),
    ("一只鸡有2条腿。两只鸡有4条腿。三只鸡有几条腿？", "三只鸡有6条腿。希望对你有帮助！", 1.0, "pattern"),
    ("三条蛇有几条腿？", "蛇没有腿。", 0.9, "没有腿 is 0"),
    ("牛怎么叫？", "哞哞。", 0.9, "fact, curt"),
    ("牛怎么叫？", "牛的叫声是“汪汪”。希望对你有帮助！", 0.4, "wrong fact, polite: 0 + .2 + .2"),
    ("马吃什么？", "马吃干草。", 0.9, "干草 (hay) is not 草 (grass)"),
    ("牛吃什么？", "牛吃干草。", 0.3, "horse food for a cow"),
]


@pytest.mark.parametrize(("prompt", "response", "expected", "why"), CASES, ids=[c[3] for c in CASES])
def test_gold_score_hand_computed(prompt, response, expected, why):
    assert gold_score(prompt, response) == pytest.approx(expected, abs=1e-9), why


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    (CHICKENS, "Six.", True),
    (CHICKENS, "There are 8 legs. Sorry, I mean 6 legs.", False),
    (CHICKENS, "I like cows.", False),
    (ZH_CHICKENS, "六条腿。", True),
    # The terms of arithmetic are working; the result that ends it is the stated total.
    (CHICKENS, "Each chicken has 2 legs, so 3 × 2 = 6 legs in total.", True),
    (CHICKENS, "Each chicken has 2 legs, so 3 × 2 = 8 legs in total.", False),
    (ZH_CHICKENS, "每只鸡有2条腿，3 × 2 = 6，所以一共有六条腿。", True),
    ("How many legs do 2 cows and 3 ducks have?", "2 × 4 + 3 × 2 = 8 + 6 = 14 legs.", True),
    ("How many legs do 2 cows and 3 ducks have?", "2 × 4 + 3 × 2 = 8 + 6 = 12 legs.", False),
    ("What sound does a cow make?", "Moo.", None),
    ("Tell me a joke.", "6.", None),
])
def test_count_correct(prompt, response, expected):
    assert count_correct(prompt, response) is expected


@pytest.mark.parametrize(("response", "expected"), [
    ("6.", True), ("它说“哞哞”。", True), ('It says "moo."', True), ("Moo!", True),
    ("", False), ("   ", False), ("6", False), ("There are 6...", False), ("六条腿…", False),
    ("<|im_end|>6.", False), ("Assistant: 6.", False), ("6.\nUser: thanks.", False), ("</s>6.", False),
])
def test_format_ok(response, expected):
    assert format_ok(response) is expected


def test_parse_question_finds_what_was_asked():
    assert parse_question(PATTERN) == Question(group=(("chicken", 3),))
    assert parse_question(MIX) == Question(group=(("chicken", 3), ("cow", 2)))
    assert parse_question("I have a dog. How many legs does it have?").total == 4
    assert parse_question("农场里有三只鸡和两头牛，一共有几条腿？").total == 14
    assert parse_question("What sound does a cow make?") == Question(animal="cow", fact="sound")
    assert parse_question("绵羊住在哪里？") == Question(animal="sheep", fact="home")
    assert parse_question("Tell me a joke.") is None
    assert parse_question("How many legs?") is None


def test_find_mentions():
    assert find_mentions("3 chickens and a cow have 10 legs") == [("chicken", 3), ("cow", 1)]
    assert find_mentions("Three geese and twelve sheep.") == [("goose", 3), ("sheep", 12)]
    assert find_mentions("三只鸡和两头牛一共有14条腿") == [("chicken", 3), ("cow", 2)]
    assert find_mentions("Each chicken has 2 legs. 鸡有2条腿。") == []


def test_number_words_round_trip():
    for n in range(1000):
        assert parse_english_number(english_number(n)) == n
        assert parse_chinese_number(chinese_number(n)) == n
    assert parse_english_number("twenty four") == 24
    assert parse_chinese_number("二十") == 20


def test_word_count_counts_chinese_characters_as_half_words():
    assert word_count("There are 6 legs.") == 4
    assert word_count("六条腿。") == 2        # 3 characters → 1.5, rounded up
    assert word_count("三只鸡有6条腿") == 4   # 6 characters → 3, plus the digit


def test_summarize():
    prompts = [CHICKENS, "What sound does a cow make?", "Tell me a joke."]
    responses = ["6.", "Woof woof.", "hello"]
    summary = summarize(prompts, responses)
    # golds: 0.9 (right, neutral), 0.3 (dog's sound), 0.25 (style only: neutral, unfinished)
    assert summary["mean_gold_score"] == pytest.approx((0.9 + 0.3 + 0.25) / 3)
    assert summary["count_accuracy"] == 1.0          # one leg question, answered right
    assert summary["format_adherence"] == pytest.approx(2 / 3)
    assert summary["mean_length"] == pytest.approx((1 + 2 + 1) / 3)
    assert [s["gold_score"] for s in summary["samples"]] == [0.9, 0.3, 0.25]
    assert summary["samples"][1] == {"prompt": prompts[1], "response": "Woof woof.", "gold_score": 0.3,
                                     "count_correct": None, "format_ok": True}
    assert len(summarize([CHICKENS] * 7, ["6."] * 7)["samples"]) == 5
    assert summarize(["Tell me a joke."], ["Ha."])["count_accuracy"] is None


def test_summarize_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        summarize([CHICKENS, CHICKENS], ["6."])
    with pytest.raises(ValueError, match="at least one"):
        summarize([], [])


def test_gold_module_imports_no_torch():
    import subprocess
    import sys
    code = "import sys, pipeline.world.gold; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
