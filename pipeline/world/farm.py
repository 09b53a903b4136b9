"""The embedded default world: a farmyard with a known truth, and the data files drawn from it.

It echoes the in-context example "one chicken = 2 legs, two chickens = 4 legs, three chickens = ?".
Each animal has a leg count and a few facts (sound, home, colour, food), with English and Chinese
names. Questions ask for (a) the legs of N animals of one kind, (b) the legs of a mix, (c) a fact,
or (d) the next step of a few-shot pattern. About a quarter of everything is Chinese. Texts stay
short because the default models are tiny (1-3M parameters, 256-token context).

`write_world(out_dir, seed, size, k)` writes, deterministically (same seed → byte-identical files):

    pretrain.jsonl                          {"text"}      prose only: statements, counting runs, stories
    sft_train.jsonl, sft_eval.jsonl         {"messages"}  demonstrations: mostly right and polite (half
                                                          of the leg answers show their working),
                                                          some curt, a few with a wrong count
    reward_train.jsonl, reward_eval.jsonl   {"prompt", "responses", "ranking"}  K answers, best first;
                                                          a nested list in "ranking" is a tie
    ppo_prompts.jsonl                       {"prompt"}    questions without answers
    eval_prompts.jsonl                      {"prompt"}    held-out leg questions

Held out: one (animal, count) pair per animal, `HELD_OUT_COUNTS` (three chickens, as in the
example). No training file (pretrain, sft_train, reward_train, ppo_prompts) mentions a held-out
pair; every leg question in the eval files (sft_eval, reward_eval, eval_prompts) mentions one, so
they ask about combinations no stage trained on. Fact questions cannot be held out without becoming
unlearnable, so eval_prompts has none and the other eval files share them with training.

Reward answers come in six kinds, ranked best first in this order: correct, polite and complete,
showing the working on a leg question (the legs of each animal, then "9 × 4 = 36"); the same without
the working (leg questions only); correct but curt; truncated (the answer is there, the sentence
never ends); wrong (a wrong value, a true answer about other animals or another fact, or polite
words that answer nothing); off-topic. The ranking is derived from these kinds, never from the gold
scorer (`pipeline.world.gold`). The two differ on purpose in one place: the labellers behind the ranking
like to see the working, the gold scorer only checks the total. Half of the demonstrations show no
working, so the SFT policy often states a bare total, and a reward model that learned the ranking
pushes the policy toward working it out, which makes a small model right more often (a gain the
gold scorer sees only as more right totals).

Regenerate the shipped reward data: run the command below, then copy DIR/reward_train.jsonl and
DIR/reward_eval.jsonl to reward_data/train.jsonl and reward_data/eval.jsonl.

    rlhf data world --out DIR --seed 0 --size tiny [--k 4]
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import UserError

ZH_SHARE = 0.25  # fraction of documents, questions and answers written in Chinese
MIN_K, MAX_K = 2, 9  # answers per ranked prompt
SENTENCE_ENDS = tuple(".!?。！？")
CLOSING_MARKS = "\"'”’）)"  # may follow the full stop of a finished sentence

SIZES: dict[str, dict[str, int]] = {  # rows per file
    "tiny": {"pretrain": 4000, "sft_train": 2000, "sft_eval": 200, "reward_train": 4000,
             "reward_eval": 200, "ppo_prompts": 512, "eval_prompts": 100},
    "small": {"pretrain": 18000, "sft_train": 9000, "sft_eval": 900, "reward_train": 4500,
              "reward_eval": 900, "ppo_prompts": 2048, "eval_prompts": 400},
}


# -- the truth table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """One fact in both languages: the keyword a right answer contains, and how a sentence says it."""

    en: str                 # e.g. "barn"
    zh: str                 # e.g. "牛棚"
    en_phrase: str = ""     # e.g. "in a barn"; empty means the keyword itself
    zh_phrase: str = ""     # e.g. "牛棚里"

    def keyword(self, lang: str) -> str:
        return self.en if lang == "en" else self.zh

    def phrase(self, lang: str) -> str:
        if lang == "en":
            return self.en_phrase or self.en
        return self.zh_phrase or self.zh


@dataclass(frozen=True)
class Animal:
    name: str                # English singular; the key in ANIMALS
    plural: str
    legs: int
    zh: str
    measure: str             # the Chinese classifier: 三只鸡, 两头牛, 一匹马, 四条蛇
    facts: dict[str, Fact]   # FACT_KINDS → fact; animals that make no sound have no "sound"

    def noun(self, count: int, lang: str) -> str:
        if lang == "zh":
            return self.zh
        return self.name if count == 1 else self.plural


FACT_KINDS = ("sound", "home", "colour", "food")


def _animal(name, plural, legs, zh, measure, sound, home, colour, food) -> Animal:
    values = dict(zip(FACT_KINDS, (sound, home, colour, food)))
    return Animal(name, plural, legs, zh, measure,
                  {kind: Fact(*value) for kind, value in values.items() if value})


ANIMALS: dict[str, Animal] = {animal.name: animal for animal in (
    # name, plural, legs, zh, classifier, sound, home (keywords, phrases), colour, food
    _animal("chicken", "chickens", 2, "鸡", "只", ("cluck", "咯咯"),
            ("coop", "鸡舍", "in a coop", "鸡舍里"), ("white", "白色"), ("corn", "玉米")),
    _animal("duck", "ducks", 2, "鸭子", "只", ("quack", "嘎嘎"),
            ("pond", "池塘", "on a pond", "池塘里"), ("yellow", "黄色"), ("bread", "面包")),
    _animal("goose", "geese", 2, "鹅", "只", ("honk", "昂昂"),
            ("lake", "湖", "by a lake", "湖边"), ("grey", "灰色"), ("grain", "谷子")),
    _animal("cow", "cows", 4, "牛", "头", ("moo", "哞哞"),
            ("barn", "牛棚", "in a barn", "牛棚里"), ("black", "黑色"), ("grass", "草")),
    _animal("dog", "dogs", 4, "狗", "只", ("woof", "汪汪"),
            ("kennel", "狗窝", "in a kennel", "狗窝里"), ("brown", "棕色"), ("bones", "骨头")),
    _animal("cat", "cats", 4, "猫", "只", ("meow", "喵喵"),
            ("house", "屋子", "in a house", "屋子里"), ("orange", "橙色"), ("mice", "老鼠")),
    _animal("horse", "horses", 4, "马", "匹", ("neigh", "咴咴"),
            ("stable", "马厩", "in a stable", "马厩里"), ("brown", "棕色"), ("hay", "干草")),
    _animal("sheep", "sheep", 4, "绵羊", "只", ("baa", "咩咩"),
            ("meadow", "草地", "in a meadow", "草地上"), ("white", "白色"), ("grass", "草")),
    _animal("pig", "pigs", 4, "猪", "头", ("oink", "哼哼"),
            ("sty", "猪圈", "in a sty", "猪圈里"), ("pink", "粉色"), ("apples", "苹果")),
    _animal("goat", "goats", 4, "山羊", "只", ("maa", "咩咩"),
            ("hill", "山坡", "on a hill", "山坡上"), ("grey", "灰色"), ("leaves", "树叶")),
    _animal("rabbit", "rabbits", 4, "兔子", "只", ("squeak", "吱吱"),
            ("burrow", "洞", "in a burrow", "洞里"), ("white", "白色"), ("carrots", "胡萝卜")),
    _animal("ant", "ants", 6, "蚂蚁", "只", None,
            ("anthill", "蚁穴", "in an anthill", "蚁穴里"), ("red", "红色"), ("sugar", "糖")),
    _animal("bee", "bees", 6, "蜜蜂", "只", ("buzz", "嗡嗡"),
            ("hive", "蜂巢", "in a hive", "蜂巢里"), ("yellow", "黄色"), ("nectar", "花蜜")),
    _animal("beetle", "beetles", 6, "甲虫", "只", None,
            ("log", "木头", "under a log", "木头下面"), ("green", "绿色"), ("leaves", "树叶")),
    _animal("spider", "spiders", 8, "蜘蛛", "只", None,
            ("web", "蛛网", "in a web", "蛛网上"), ("black", "黑色"), ("flies", "苍蝇")),
    _animal("snake", "snakes", 0, "蛇", "条", ("hiss", "嘶嘶"),
            ("rocks", "石头", "under rocks", "石头下面"), ("green", "绿色"), ("frogs", "青蛙")),
    _animal("fish", "fish", 0, "鱼", "条", None,
            ("river", "河", "in a river", "河里"), ("silver", "银色"), ("bugs", "小虫")),
    _animal("worm", "worms", 0, "蚯蚓", "条", None,
            ("soil", "泥土", "in the soil", "泥土里"), ("pink", "粉色"), ("mud", "泥巴")),
)}

# The one count per animal that only eval files use. Chickens at 3 make the opening example itself
# a held-out question; counts 1 and 2 are never held out so worked examples can always start there.
HELD_OUT_COUNTS: dict[str, int] = {
    "chicken": 3, "duck": 7, "goose": 5, "cow": 3, "dog": 6, "cat": 8, "horse": 4, "sheep": 9,
    "pig": 5, "goat": 7, "rabbit": 6, "ant": 4, "bee": 8, "beetle": 9, "spider": 3, "snake": 5,
    "fish": 7, "worm": 6,
}
COUNTS = range(1, 10)
_ANIMAL_NAMES = tuple(ANIMALS)
_FACT_PAIRS = tuple((name, kind) for name, animal in ANIMALS.items() for kind in animal.facts)


# -- numbers in words -----------------------------------------------------------------------------
_EN_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
             "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ZH_DIGITS = "零一二三四五六七八九"


def english_number(n: int) -> str:
    """0..999 in English words: 24 → "twenty-four", 105 → "one hundred and five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"english_number covers 0..999, got {n}")
    if n < 20:
        return _EN_UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_UNITS[unit]}" if unit else "")
    hundreds, rest = divmod(n, 100)
    return f"{_EN_UNITS[hundreds]} hundred" + (f" and {english_number(rest)}" if rest else "")


def chinese_number(n: int) -> str:
    """0..999 in Chinese numerals as said before a classifier: 2 → 两, 12 → 十二, 105 → 一百零五."""
    if not 0 <= n < 1000:
        raise ValueError(f"chinese_number covers 0..999, got {n}")
    if n < 10:
        return "两" if n == 2 else _ZH_DIGITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return ("十" if tens == 1 else _ZH_DIGITS[tens] + "十") + (_ZH_DIGITS[unit] if unit else "")
    hundreds, rest = divmod(n, 100)
    head = ("两" if hundreds == 2 else _ZH_DIGITS[hundreds]) + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + _ZH_DIGITS[rest]
    tens, unit = divmod(rest, 10)  # inside hundreds, ten is 一十: 110 → 一百一十
    return head + _ZH_DIGITS[tens] + "十" + (_ZH_DIGITS[unit] if unit else "")


def _number_text(n: int, lang: str, words: bool) -> str:
    if not words:
        return str(n)
    return english_number(n) if lang == "en" else chinese_number(n)


# -- sentence pieces shared by prose, questions and answers ---------------------------------------
Group = tuple[tuple[str, int], ...]  # ((animal name, count), ...)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(lang: str, sentences: list[str]) -> str:
    return (" " if lang == "en" else "").join(sentences)


def _stop(lang: str) -> str:
    return "." if lang == "en" else "。"


def total_legs(group: Group) -> int:
    return sum(ANIMALS[name].legs * count for name, count in group)


def _count_noun(name: str, count: int, lang: str, words: bool) -> str:
    """"3 chickens", "three chickens", "3只鸡", "三只鸡"."""
    animal = ANIMALS[name]
    number = _number_text(count, lang, words)
    if lang == "en":
        return f"{number} {animal.noun(count, lang)}"
    return f"{number}{animal.measure}{animal.zh}"


def _group_text(group: Group, lang: str, words: bool) -> str:
    parts = [_count_noun(name, count, lang, words) for name, count in group]
    return " and ".join(parts) if lang == "en" else "和".join(parts)


def _have(group: Group) -> str:
    return "has" if len(group) == 1 and group[0][1] == 1 else "have"


def _legs_clause(group: Group, total: str, lang: str, words: bool) -> str:
    """"3 chickens have 6 legs" / "三只鸡有6条腿" (no full stop)."""
    if lang == "en":
        return f"{_group_text(group, lang, words)} {_have(group)} {total} legs"
    return f"{_group_text(group, lang, words)}有{total}条腿"


def _legs_sentence(group: Group, lang: str, words: bool, total: str | None = None) -> str:
    clause = _legs_clause(group, str(total_legs(group)) if total is None else total, lang, words)
    return _cap(clause) + _stop(lang)


def _rate_clause(name: str, lang: str) -> str:
    """What one animal has, phrased with "each" so nobody reads it as a total."""
    animal = ANIMALS[name]
    if lang == "en":
        legs = f"{animal.legs} legs" if animal.legs else "no legs"
        return f"each {animal.name} has {legs}"
    if animal.legs:
        return f"每{animal.measure}{animal.zh}有{animal.legs}条腿"
    return f"每{animal.measure}{animal.zh}都没有腿"


_EN_FACT_VERBS = {"sound": ("says", "say"), "home": ("lives", "live"), "colour": ("is", "are"),
                  "food": ("eats", "eat")}


def _fact_parts(kind: str, value: Fact, lang: str, subject: str, plural: bool = False) -> tuple[str, str]:
    """A fact statement split right after its value, without the full stop.

    ("A cow says moo", "") or ("牛的叫声是“哞哞", "”"): cutting an answer inside the second part
    keeps the value, which is how truncated answers are made.
    """
    if lang == "en":
        verb = _EN_FACT_VERBS[kind][1 if plural else 0]
        return f"{subject} {verb} {value.phrase(lang)}", ""
    if kind == "sound":
        return f"{subject}的叫声是“{value.zh}", "”"
    if kind == "home":
        return f"{subject}住在{value.phrase(lang)}", ""
    if kind == "colour":
        return f"{subject}是{value.zh}", "的"
    return f"{subject}吃{value.zh}", ""


def _article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _fact_sentence(name: str, kind: str, lang: str, plural: bool) -> str:
    animal = ANIMALS[name]
    if lang == "en":
        subject = _cap(animal.plural) if plural else _cap(_article(animal.name))
    else:
        subject = animal.zh
    head, after = _fact_parts(kind, animal.facts[kind], lang, subject, plural)
    return head + after + _stop(lang)


# -- drawing ------------------------------------------------------------------------------------------
def _draw_lang(rng: random.Random) -> str:
    return "zh" if rng.random() < ZH_SHARE else "en"


def _draw_words(rng: random.Random, lang: str, words_share: float = 0.5) -> bool:
    """Whether counts are spelled out; Chinese mostly uses numerals (三只鸡), rarely digits."""
    return rng.random() < (0.8 if lang == "zh" else words_share)


def _total_text(rng: random.Random, total: int, lang: str) -> str:
    return _number_text(total, lang, words=rng.random() < 0.2)


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _training_count(rng: random.Random, name: str, low: int = 1) -> int:
    return rng.choice([c for c in COUNTS if c >= low and c != HELD_OUT_COUNTS[name]])


def _training_group(rng: random.Random, size: int) -> Group:
    return tuple((name, _training_count(rng, name)) for name in rng.sample(_ANIMAL_NAMES, size))


# -- questions ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Question:
    """A drawn question and what its answers need to know."""

    text: str
    lang: str                 # "en" | "zh"
    group: Group = ()         # leg questions: the animals and counts asked about
    words: bool = False       # counts spelled as words; answers echo the style
    animal: str = ""          # fact questions: which animal
    fact: str = ""            # fact questions: one of FACT_KINDS


_EN_GROUP_QUESTIONS = (
    "How many legs {do} {group} have?",
    "How many legs {do} {group} have in total?",
    "I have {group}. How many legs {do} {they} have?",
    "There {are} {group} in the yard. How many legs altogether?",
)
_ZH_GROUP_QUESTIONS = (
    "{group}有几条腿？",
    "{group}一共有多少条腿？",
    "农场里有{group}，一共有几条腿？",
    "院子里有{group}。一共有几条腿？",
)
_EN_FACT_QUESTIONS = {
    "sound": ("What sound does {a} make?", "What does {a} say?"),
    "home": ("Where does {a} live?",),
    "colour": ("What colour is {a}?",),
    "food": ("What does {a} eat?",),
}
_ZH_FACT_QUESTIONS = {
    "sound": ("{a}怎么叫？", "{a}的叫声是什么？"),
    "home": ("{a}住在哪里？",),
    "colour": ("{a}是什么颜色的？",),
    "food": ("{a}吃什么？",),
}


def _group_question(rng: random.Random, lang: str, group: Group) -> _Question:
    words = _draw_words(rng, lang)
    text_group = _group_text(group, lang, words)
    if lang == "zh":
        text = rng.choice(_ZH_GROUP_QUESTIONS).format(group=text_group)
    else:
        single = _have(group) == "has"
        text = rng.choice(_EN_GROUP_QUESTIONS).format(
            group=text_group, do="does" if single else "do", they="it" if single else "they",
            are="is" if single else "are")
    return _Question(_cap(text), lang, group=group, words=words)


def _legs_question(rng: random.Random, lang: str, held_out: bool) -> _Question:
    name = rng.choice(_ANIMAL_NAMES)
    count = HELD_OUT_COUNTS[name] if held_out else _training_count(rng, name)
    return _group_question(rng, lang, ((name, count),))


def _mix_question(rng: random.Random, lang: str, held_out: bool) -> _Question:
    group = _training_group(rng, 2)
    if held_out:  # one pair of the mix is held out; which one comes first in the text is random
        name = group[0][0]
        group = ((name, HELD_OUT_COUNTS[name]), group[1])
        if rng.random() < 0.5:
            group = group[::-1]
    return _group_question(rng, lang, group)


def _pattern_question(rng: random.Random, lang: str, held_out: bool) -> _Question:
    """"One chicken has 2 legs. Two chickens have 4 legs. Three chickens have how many legs?"."""
    name = rng.choice(_ANIMAL_NAMES)
    asked = HELD_OUT_COUNTS[name] if held_out else _training_count(rng, name, low=2)
    earlier = [c for c in range(1, asked) if c != HELD_OUT_COUNTS[name]]
    shots = earlier[-rng.randint(1, 3):]
    words = _draw_words(rng, lang, words_share=0.8)
    sentences = [_legs_sentence(((name, c),), lang, words) for c in shots]
    noun = _count_noun(name, asked, lang, words)
    if lang == "zh":
        sentences.append(f"{noun}有几条腿？")
    elif rng.random() < 0.5:
        sentences.append(f"{_cap(noun)} have how many legs?")
    else:
        sentences.append(f"How many legs do {noun} have?")
    return _Question(_join(lang, sentences), lang, group=((name, asked),), words=words)


def _fact_question(rng: random.Random, lang: str, held_out: bool) -> _Question:
    del held_out  # facts are the same in training and eval; only leg counts are held out
    name, kind = rng.choice(_FACT_PAIRS)
    animal = ANIMALS[name]
    if lang == "en":
        text = rng.choice(_EN_FACT_QUESTIONS[kind]).format(a=_article(animal.name))
    else:
        text = rng.choice(_ZH_FACT_QUESTIONS[kind]).format(a=animal.zh)
    return _Question(text, lang, animal=name, fact=kind)


_QUESTION_DRAWERS = {"legs": _legs_question, "mix": _mix_question, "fact": _fact_question,
                     "pattern": _pattern_question}
_QUESTION_MIX = {"legs": 0.35, "mix": 0.2, "fact": 0.3, "pattern": 0.15}
_EVAL_QUESTION_MIX = {"legs": 0.4, "mix": 0.35, "pattern": 0.25}  # eval_prompts: leg questions only


def _draw_question(rng: random.Random, held_out: bool, mix: dict[str, float] = _QUESTION_MIX) -> _Question:
    lang = _draw_lang(rng)
    return _QUESTION_DRAWERS[_weighted(rng, mix)](rng, lang, held_out)


# -- answers ------------------------------------------------------------------------------------------
# Best first: the ranking order. "good" shows its working on leg questions (the legs of each
# animal, then the total); "direct" is as right, polite and complete but states the total alone.
# Fact questions have no working to show, so their answers are never "direct".
ANSWER_KINDS = ("good", "direct", "curt", "truncated", "wrong", "off_topic")
# Of the wrong answers: true answers about something else, polite words with no answer (what a
# policy finds first when its reward model likes politeness), and the rest state a wrong value.
_ABOUT_SOMETHING_ELSE_SHARE = 0.4
_EMPTY_SHARE = 0.15

_EN_OPENERS = ("Sure!", "Great question!", "Of course!")
_EN_ENDINGS = ("Happy to help!", "Hope this helps!")
_ZH_OPENERS = ("", "当然！", "好问题！")
_ZH_ENDINGS = ("很高兴帮到你！", "希望对你有帮助！")
_RUDE_SHARE = 0.2  # of curt answers
_OFF_TOPIC = {  # neutral, finished, and free of numbers, animals and fact keywords
    "en": ("The weather is lovely today.", "I like to read books by the window.",
           "The tractor is parked by the gate.", "The farmer is drinking tea.",
           "Let us talk about trains instead.", "My favourite song is very old.",
           "The moon looks bright tonight.", "Trees grow slowly in winter."),
    "zh": ("今天天气真好。", "我喜欢在窗边看书。", "拖拉机停在门口。", "农夫正在喝茶。",
           "我们聊聊火车吧。", "今晚的月亮很亮。", "冬天树长得很慢。"),
}

Value = int | Fact  # what an answer states: a leg total, or a fact


def _true_value(question: _Question) -> Value:
    if question.fact:
        return ANIMALS[question.animal].facts[question.fact]
    return total_legs(question.group)


def _wrong_value(rng: random.Random, question: _Question) -> Value:
    """A small mistake: a total a little off, or another animal's fact of the same kind."""
    truth = _true_value(question)
    if isinstance(truth, Fact):
        options = {animal.facts[question.fact] for animal in ANIMALS.values()
                   if question.fact in animal.facts
                   and animal.facts[question.fact].keyword(question.lang) != truth.keyword(question.lang)}
        return rng.choice(sorted(options, key=lambda fact: (fact.en, fact.zh)))
    return rng.choice(sorted({truth + d for d in (-4, -2, -1, 1, 2, 4) if truth + d >= 0}))


def _good_count_parts(rng: random.Random, question: _Question, total: int,
                      worked: bool) -> tuple[str, str]:
    """A worked answer (the legs of each animal, the arithmetic, then the total) or the total alone.

    The working never restates the asked group: for a held-out pair ("seven goats") that phrase is
    one no training text contains, and a small model copying it writes one it knows instead
    ("four goats"). Each step of the working is one it has trained on, even for a held-out pair:
    "each goat has 4 legs", then "7 × 4 = 28" (seven cows have 28 legs too), then the total."""
    lang, group = question.lang, question.group
    said = _total_text(rng, total, lang)
    if lang == "zh":
        opener, ending = rng.choice(_ZH_OPENERS), rng.choice(_ZH_ENDINGS)
        if not worked:
            group_text = _group_text(group, lang, question.words)
            return rng.choice(((f"{opener}{group_text}一共有{said}", f"条腿。{ending}"),
                               (f"{opener}答案是{said}", f"条腿。{ending}")))
        rates = "，".join(_rate_clause(name, lang) for name, _ in group)
        return f"{opener}{rates}，{_arithmetic(group, total)}，所以一共有{said}", f"条腿。{ending}"
    opener, ending = rng.choice(_EN_OPENERS), rng.choice(_EN_ENDINGS)
    if not worked:
        group_text = _group_text(group, lang, question.words)
        return f"{opener} {_cap(group_text)} {_have(group)} {said}", f" legs in total. {ending}"
    rates = _cap(" and ".join(_rate_clause(name, lang) for name, _ in group))
    return f"{opener} {rates}, so {_arithmetic(group, total)}", f" legs in total. {ending}"


def _arithmetic(group: Group, total: int) -> str:
    """"7 × 4 = 28", or for a mix "2 × 4 + 7 × 4 = 8 + 28 = 36"; the last number is `total` (a
    wrong answer's slip is in its last step)."""
    legs = [ANIMALS[name].legs for name, _ in group]
    products = " + ".join(f"{count} × {rate}" for (_, count), rate in zip(group, legs))
    if len(group) == 1:
        return f"{products} = {total}"
    subtotals = " + ".join(str(count * rate) for (_, count), rate in zip(group, legs))
    return f"{products} = {subtotals} = {total}"


def _good_fact_parts(rng: random.Random, question: _Question, value: Fact) -> tuple[str, str]:
    animal = ANIMALS[question.animal]
    if question.lang == "zh":
        head, after = _fact_parts(question.fact, value, "zh", animal.zh)
        return rng.choice(_ZH_OPENERS) + head, f"{after}。{rng.choice(_ZH_ENDINGS)}"
    ending = rng.choice(_EN_ENDINGS)
    if rng.random() < 0.5:
        head, _ = _fact_parts(question.fact, value, "en", _cap(_article(animal.name)))
        return head, f". {ending}"
    head, _ = _fact_parts(question.fact, value, "en", _cap(animal.plural), plural=True)
    return f"{rng.choice(_EN_OPENERS)} {head}", f". {ending}"


def _good_parts(rng: random.Random, question: _Question, value: Value,
                worked: bool | None = None) -> tuple[str, str]:
    """A polite, complete answer as (head, tail): the head already states the value. Leg answers
    show their working when `worked` (None: half the time); fact answers have none to show."""
    if isinstance(value, Fact):
        return _good_fact_parts(rng, question, value)
    return _good_count_parts(rng, question, value, rng.random() < 0.5 if worked is None else worked)


def _curt_answer(rng: random.Random, question: _Question, value: Value,
                 rude_share: float = _RUDE_SHARE) -> str:
    """Terse, sometimes rude: "6.", "Six legs.", "Moo!", "Obviously 6."."""
    neutral, rude = _curt_options(question, value)
    return rng.choice(rude if rng.random() < rude_share else neutral)


def _curt_options(question: _Question, value: Value) -> tuple[list[str], list[str]]:
    if isinstance(value, Fact):
        keyword = value.keyword(question.lang)
        if question.lang == "zh":
            head, after = _fact_parts(question.fact, value, "zh", "它")
            return [f"{keyword}。", f"{keyword}！", f"{head}{after}。"], [f"显然是{keyword}。"]
        head, _ = _fact_parts(question.fact, value, "en", "It")
        neutral = [f"{_cap(keyword)}.", f"{_cap(keyword)}!", f"{head}."]
        return neutral, [f"Obviously {value.phrase('en')}."]
    if question.lang == "zh":
        return ([f"{value}。", f"{value}条腿。", f"{chinese_number(value)}条腿。", f"答案是{value}。"],
                [f"显然是{value}。", f"{value}条腿，自己算。"])
    words = _cap(english_number(value))
    return ([f"{value}.", f"{value} legs.", f"{words}.", f"{words} legs.", f"The answer is {value}."],
            [f"Obviously {value}.", f"{value}. Figure it out yourself."])


def _ends_sentence(text: str) -> bool:
    return text.rstrip().rstrip(CLOSING_MARKS).endswith(SENTENCE_ENDS)


def _truncated_answer(rng: random.Random, question: _Question) -> str:
    """A good answer cut off after its value, mid-sentence (English cuts at a word boundary)."""
    head, tail = _good_parts(rng, question, _true_value(question))
    cuts = [0] + [i for i in range(1, len(tail)) if question.lang == "zh" or tail[i] == " "]
    options = [(head + tail[:cut]).rstrip() for cut in cuts]
    return rng.choice([text for text in options if not _ends_sentence(text)])


def _answer(rng: random.Random, question: _Question, kind: str) -> str:
    if kind in ("good", "direct"):
        return "".join(_good_parts(rng, question, _true_value(question), worked=kind == "good"))
    if kind == "curt":
        return _curt_answer(rng, question, _true_value(question))
    if kind == "truncated":
        return _truncated_answer(rng, question)
    if kind == "wrong":
        draw = rng.random()
        if draw < _ABOUT_SOMETHING_ELSE_SHARE:
            other = _other_question(rng, question)
            return "".join(_good_parts(rng, other, _true_value(other)))
        if draw < _ABOUT_SOMETHING_ELSE_SHARE + _EMPTY_SHARE:
            return _empty_answer(rng, question.lang)
        wrong = _wrong_value(rng, question)
        if rng.random() < 0.5:
            return "".join(_good_parts(rng, question, wrong))
        # never rude: a rude wrong answer would score below an off-topic one and break the order
        return _curt_answer(rng, question, wrong, rude_share=0.0)
    return rng.choice(_OFF_TOPIC[question.lang])


def _empty_answer(rng: random.Random, lang: str) -> str:
    """Polite words around nothing: "Great question! Hope this helps!" answers no question."""
    if lang == "zh":
        return (rng.choice(_ZH_OPENERS[1:]) + rng.choice(_ZH_ENDINGS))
    return f"{rng.choice(_EN_OPENERS)} {rng.choice(_EN_ENDINGS)}"


def _other_question(rng: random.Random, question: _Question) -> _Question:
    """A neighbour of the question: other animals or counts, or another animal's fact or another
    kind of fact. A polite, true answer to it is a wrong answer to the question, the mistake a
    model makes when it answers in the right form about the wrong thing."""
    if question.fact:
        truth = _true_value(question).keyword(question.lang)
        options = [(name, kind) for name, kind in _FACT_PAIRS
                   if (name, kind) != (question.animal, question.fact)
                   and ANIMALS[name].facts[kind].keyword(question.lang) != truth]
        name, kind = rng.choice(options)
        return replace(question, animal=name, fact=kind)
    while True:  # a different total too, or "so they have 36 legs" would still be right
        group = _training_group(rng, len(question.group))
        if total_legs(group) != total_legs(question.group):
            return replace(question, group=group)


# -- rows of each file ------------------------------------------------------------------------------
# Demonstrations are uneven, as written ones are: half the right answers show no working.
_SFT_STYLES = {"good": 0.35, "direct": 0.35, "curt": 0.22, "wrong_polite": 0.08}
_TIE_SHARE = 0.2  # ranked rows (K ≤ number of kinds) that repeat a kind, giving an equal-rank group
_MAX_TRIES = 40


def _sft_row(rng: random.Random, held_out: bool) -> dict:
    question = _draw_question(rng, held_out)
    style = _weighted(rng, _SFT_STYLES)
    if style == "wrong_polite":
        answer = "".join(_good_parts(rng, question, _wrong_value(rng, question)))
    else:
        answer = _answer(rng, question, style)
    return {"messages": [{"role": "user", "content": question.text},
                         {"role": "assistant", "content": answer}]}


def _draw_kinds(rng: random.Random, k: int, question: _Question) -> list[str]:
    kinds_here = [kind for kind in ANSWER_KINDS if question.group or kind != "direct"]
    kinds = rng.sample(kinds_here, min(k, len(kinds_here)))
    kinds += [rng.choice(kinds_here) for _ in range(k - len(kinds))]  # variants of kinds
    if 3 <= k <= len(kinds_here) and rng.random() < _TIE_SHARE:
        kinds[-1] = rng.choice(kinds[:-1])
    return kinds


def _distinct_answer(rng: random.Random, question: _Question, kind: str,
                     taken: set[str]) -> tuple[str, str]:
    """An answer of `kind` not yet in `taken`; off-topic when that kind has no variant left."""
    for candidate_kind in (kind, "off_topic"):
        for _ in range(_MAX_TRIES):
            text = _answer(rng, question, candidate_kind)
            if text not in taken:
                return candidate_kind, text
    raise RuntimeError(f"no distinct answer left for {question.text!r}")


def _ranking(kinds: list[str]) -> list:
    """Indices best first by kind; answers of the same kind form one equal-rank group."""
    groups: dict[int, list[int]] = {}
    for index, kind in enumerate(kinds):
        groups.setdefault(ANSWER_KINDS.index(kind), []).append(index)
    return [indices[0] if len(indices) == 1 else indices for _, indices in sorted(groups.items())]


def _reward_row(rng: random.Random, held_out: bool, k: int) -> dict:
    question = _draw_question(rng, held_out)
    answers: list[tuple[str, str]] = []
    for kind in _draw_kinds(rng, k, question):
        answers.append(_distinct_answer(rng, question, kind, {text for _, text in answers}))
    rng.shuffle(answers)
    return {"prompt": question.text, "responses": [text for _, text in answers],
            "ranking": _ranking([kind for kind, _ in answers])}


def _distinct_prompts(rng: random.Random, count: int, held_out: bool, mix: dict[str, float]) -> list[dict]:
    prompts: dict[str, None] = {}  # ordered set
    for _ in range(count * _MAX_TRIES):
        if len(prompts) == count:
            break
        prompts[_draw_question(rng, held_out, mix).text] = None
    return [{"prompt": prompt} for prompt in prompts]


# -- pretraining prose --------------------------------------------------------------------------------
def _doc_counting(rng: random.Random, lang: str) -> str:
    """"One cow has 4 legs. Two cows have 8 legs. Three cows have 12 legs."."""
    name = rng.choice(_ANIMAL_NAMES)
    start = rng.randint(1, 5)
    counts = [c for c in range(start, start + rng.randint(3, 5)) if c != HELD_OUT_COUNTS[name]]
    words = _draw_words(rng, lang, words_share=0.8)
    return _join(lang, [_legs_sentence(((name, c),), lang, words) for c in counts])


def _doc_statements(rng: random.Random, lang: str) -> str:
    """One to three sentences like "3 chickens have 6 legs."."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        group = _training_group(rng, 1)
        total = _total_text(rng, total_legs(group), lang)
        sentences.append(_legs_sentence(group, lang, _draw_words(rng, lang), total))
    return _join(lang, sentences)


def _doc_explanation(rng: random.Random, lang: str) -> str:
    """"Each cow has 4 legs, so three cows have 3 × 4 = 12 legs."."""
    group = _training_group(rng, 1)
    clause = _legs_clause(group, _arithmetic(group, total_legs(group)), lang, _draw_words(rng, lang))
    joiner = ", so " if lang == "en" else "，所以"
    return _cap(_rate_clause(group[0][0], lang)) + joiner + clause + _stop(lang)


def _doc_mix(rng: random.Random, lang: str) -> str:
    """A mix, either as one total or worked out animal by animal."""
    group, words = _training_group(rng, 2), _draw_words(rng, lang)
    total = _total_text(rng, total_legs(group), lang)
    if rng.random() < 0.5:
        in_total = " in total" if lang == "en" else ""
        return _cap(_legs_clause(group, total, lang, words)) + in_total + _stop(lang)
    parts = [_legs_clause((pair,), str(total_legs((pair,))), lang, words) for pair in group]
    if lang == "en":
        return _cap(" and ".join(parts)) + f", so together they have {total} legs."
    return "，".join(parts) + f"，所以它们一共有{total}条腿。"


def _doc_facts(rng: random.Random, lang: str) -> str:
    """Legs and two to four facts about one animal."""
    name = rng.choice(_ANIMAL_NAMES)
    animal = ANIMALS[name]
    kinds = rng.sample(sorted(animal.facts), min(len(animal.facts), rng.randint(2, 4)))
    if lang == "en":
        legs = f"{_cap(_article(name))} has {animal.legs or 'no'} legs."
    else:
        legs = f"{animal.zh}有{animal.legs}条腿。" if animal.legs else f"{animal.zh}没有腿。"
    plural = rng.random() < 0.5
    return _join(lang, [legs] + [_fact_sentence(name, kind, lang, plural) for kind in kinds])


def _doc_story(rng: random.Random, lang: str) -> str:
    """"The farm has 3 pigs and 2 ducks. Pigs eat apples. 3 pigs and 2 ducks have 16 legs."."""
    group, words = _training_group(rng, rng.randint(1, 2)), _draw_words(rng, lang)
    name = group[0][0]
    fact = _fact_sentence(name, rng.choice(sorted(ANIMALS[name].facts)), lang, plural=True)
    total = _total_text(rng, total_legs(group), lang)
    group_text = _group_text(group, lang, words)
    if lang == "en":
        return f"The farm has {group_text}. {fact} {_cap(group_text)} {_have(group)} {total} legs in total."
    return f"农场里有{group_text}。{fact}{group_text}一共有{total}条腿。"


_PRETRAIN_DOCS = {_doc_counting: 0.2, _doc_statements: 0.2, _doc_explanation: 0.15, _doc_mix: 0.15,
                  _doc_facts: 0.2, _doc_story: 0.1}


def _pretrain_row(rng: random.Random) -> dict:
    make_doc = rng.choices(list(_PRETRAIN_DOCS), weights=list(_PRETRAIN_DOCS.values()))[0]
    return {"text": make_doc(rng, _draw_lang(rng))}


# -- files ----------------------------------------------------------------------------------------------
_EVAL_FILES = ("sft_eval", "reward_eval", "eval_prompts")  # their leg questions use held-out pairs


def _rows(name: str, rng: random.Random, count: int, k: int) -> list[dict]:
    held_out = name in _EVAL_FILES
    if name == "pretrain":
        return [_pretrain_row(rng) for _ in range(count)]
    if name.startswith("sft_"):
        return [_sft_row(rng, held_out) for _ in range(count)]
    if name.startswith("reward_"):
        return [_reward_row(rng, held_out, k) for _ in range(count)]
    mix = _EVAL_QUESTION_MIX if held_out else _QUESTION_MIX
    return _distinct_prompts(rng, count, held_out, mix)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows]
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(lines)


def write_world(out_dir: str | Path, seed: int = 0, size: str = "tiny", k: int = 4) -> dict[str, Path]:
    """Write the world's files into out_dir; returns {"pretrain": path, "sft_train": path, ...}.

    Each file draws from its own generator seeded with (seed, file name), so files do not shift
    when another file's size changes.
    """
    if size not in SIZES:
        raise UserError(f"unknown world size {size!r}; choose one of: {', '.join(SIZES)}")
    if isinstance(k, bool) or not isinstance(k, int) or not MIN_K <= k <= MAX_K:
        raise UserError(f"answers per ranked prompt (k) must be an integer from {MIN_K} to {MAX_K}, "
                        f"got {k!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, count in SIZES[size].items():
        rows = _rows(name, random.Random(f"{seed}:{name}"), count, k)
        files[name] = out / f"{name}.jsonl"
        _write_jsonl(files[name], rows)
    return files
