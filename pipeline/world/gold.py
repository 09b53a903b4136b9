"""Gold scorer for the embedded world: how right, polite and complete an answer really is.

For evaluation only: no stage trains on it. Reward labels come from the world's answer kinds
(`pipeline.world.farm`), the reward model learns from those, and this scorer checks from the world's
truth what each stage actually achieved, which also exposes a policy that games its reward model.
Standard library only (plus the world's truth table), so it runs anywhere in milliseconds.

    gold_score = 0.6 · correct + 0.2 · polite + 0.2 · complete        (a float in [0, 1])

correct (1 or 0). The prompt is parsed for what it asks.
  - Leg questions: the asked group is every (animal, count) in the prompt outside worked examples
    ("One chicken has 2 legs." is an example; "Three chickens have how many legs?" is asked).
    The answer is the FIRST number the response states as a total, in digits, English words
    ("twenty-four", "no legs") or Chinese numerals (十二, 两, 二十四, 一百零五, 没有腿). Numbers that
    are not stated as the total are skipped: counts of animals ("3 chickens"), per-animal rates
    ("each chicken has 2 legs", "2 legs each", "每只鸡有2条腿"), and totals of a different group
    ("3 cows have 12 legs" when chickens were asked), and the terms of arithmetic ("3 × 2 = 6":
    only the result that ends it is stated). So "8. No wait, 6." is wrong, and so is
    "6 chickens have 3 legs": the 6 there is a count, not the answer.
  - Fact questions (sound, home, colour, food): the first value of that kind the response names,
    in either language, must be one this animal has ("Not woof: moo." is wrong).
polite (1, 0.5 or 0): any rude marker → 0; else a polite marker → 1; else 0.5 (neutral).
complete: 0 unless `format_ok` (non-empty, ends a sentence with . ! ? 。！？, no chat markers);
  then 1, minus 0.5 when too long (more than MAX_WORDS words or MAX_SENTENCES sentences: rambling)
  and minus 0.5 when it repeats itself (a sentence twice, or a three-word run three times).
  Words: Latin words and numbers count one each; Chinese characters count half each (a Chinese
  word averages about two characters).

A prompt the world did not write (nothing to parse) is scored on style alone: (polite + complete) / 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.world.farm import ANIMALS, CLOSING_MARKS, FACT_KINDS, SENTENCE_ENDS, total_legs

CORRECT_WEIGHT, POLITE_WEIGHT, COMPLETE_WEIGHT = 0.6, 0.2, 0.2
MAX_WORDS = 30
MAX_SENTENCES = 4
SAMPLES_IN_SUMMARY = 5


# -- numbers --------------------------------------------------------------------------------------
_EN_VALUES = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_EN_VALUES.update({word: 10 * tens for tens, word in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)})
_ZH_DIGIT_VALUES = {ch: value for value, ch in enumerate("零一二三四五六七八九")} | {"两": 2}


def _alternation(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_EN_UNIT = _alternation(w for w, v in _EN_VALUES.items() if 1 <= v <= 9)
_EN_SMALL = _alternation(w for w, v in _EN_VALUES.items() if v < 20)
_EN_TENS = _alternation(w for w, v in _EN_VALUES.items() if v >= 20)
_EN_BELOW_HUNDRED = rf"(?:(?:{_EN_TENS})(?:[-\s](?:{_EN_UNIT}))?|(?:{_EN_SMALL}))"
_EN_NUMBER = rf"(?:(?:{_EN_UNIT})\s+hundred(?:\s+(?:and\s+)?{_EN_BELOW_HUNDRED})?|{_EN_BELOW_HUNDRED})"
# A run of Chinese numerals counts only before a classifier, 腿 or punctuation, so the 一 of
# 一共 ("altogether") or 一起 ("together") is not read as 1.
_ZH_NUMBER_FOLLOW = r"(?=[只头匹条个腿\s。！？，、,.!?：:；;）)”\"]|$)"
_NUMBER = re.compile(
    r"(?P<digits>\d+)"
    rf"|(?P<en>\b{_EN_NUMBER}\b)"
    rf"|(?P<zh>[零一二两三四五六七八九十百]+){_ZH_NUMBER_FOLLOW}"
    r"|(?P<none>\bno(?=\s+legs?\b)|没有(?=腿)|没(?=腿))",
    re.IGNORECASE)


def parse_english_number(text: str) -> int:
    """"twenty-four" → 24, "one hundred and five" → 105 (words as `_EN_NUMBER` matches them)."""
    total = current = 0
    for word in re.split(r"[-\s]+", text.lower()):
        if word == "hundred":
            current *= 100
        elif word != "and":
            current += _EN_VALUES[word]
    return total + current


def parse_chinese_number(text: str) -> int:
    """"十二" → 12, "二十四" → 24, "两" → 2, "一百零五" → 105, "两百" → 200."""
    total, digit = 0, None
    for ch in text:
        if ch in "十百":
            total += (1 if digit is None else digit) * (10 if ch == "十" else 100)
            digit = None
        else:
            digit = _ZH_DIGIT_VALUES[ch]
    return total + (digit or 0)


@dataclass(frozen=True)
class _Number:
    start: int
    end: int
    value: int


def _numbers(text: str) -> list[_Number]:
    found = []
    for match in _NUMBER.finditer(text):
        if match["digits"]:
            value = int(match["digits"])
        elif match["en"]:
            value = parse_english_number(match["en"])
        elif match["zh"]:
            value = parse_chinese_number(match["zh"])
        else:
            value = 0
        found.append(_Number(match.start(), match.end(), value))
    return found


# -- animals mentioned with a count ---------------------------------------------------------------
_EN_ANIMALS = {form: animal.name for animal in ANIMALS.values() for form in (animal.name, animal.plural)}
_ZH_ANIMALS = {animal.zh: animal.name for animal in ANIMALS.values()}
_EN_NAME = re.compile(rf"\b(?:{_alternation(_EN_ANIMALS)})\b", re.IGNORECASE)
_ZH_NAME = re.compile(_alternation(_ZH_ANIMALS))
_AFTER_EN_NUMBER = re.compile(rf"\s+({_alternation(_EN_ANIMALS)})\b", re.IGNORECASE)
_AFTER_ZH_NUMBER = re.compile(rf"\s*[只头匹条个]?\s*({_alternation(_ZH_ANIMALS)})")
_ARTICLE_ANIMAL = re.compile(rf"\b(?:a|an)\s+({_alternation(_EN_ANIMALS)})\b", re.IGNORECASE)


@dataclass(frozen=True)
class _Mention:
    animal: str
    count: int
    start: int   # where the count starts ("3", "three", "a", "三")


def _mentions(text: str, numbers: list[_Number]) -> list[_Mention]:
    """Counted animals: "3 chickens", "three chickens", "a chicken", "三只鸡", "3只鸡"."""
    found = []
    for number in numbers:
        match = _AFTER_EN_NUMBER.match(text, number.end) or _AFTER_ZH_NUMBER.match(text, number.end)
        if match:
            name = match[1]
            animal = _EN_ANIMALS.get(name.lower()) or _ZH_ANIMALS[name]
            found.append(_Mention(animal, number.value, number.start))
    found += [_Mention(_EN_ANIMALS[m[1].lower()], 1, m.start()) for m in _ARTICLE_ANIMAL.finditer(text)]
    return sorted(found, key=lambda mention: mention.start)


def find_mentions(text: str) -> list[tuple[str, int]]:
    """(animal, count) for every animal the text names with a count, in order of appearance."""
    return [(m.animal, m.count) for m in _mentions(text, _numbers(text))]


# -- sentences and words --------------------------------------------------------------------------
_SENTENCE = re.compile(r"[^.!?。！？\n]+[.!?。！？]*")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[\u4e00-\u9fff]")


def _sentences(text: str) -> list[str]:
    return [s for s in (m.group().strip() for m in _SENTENCE.finditer(text)) if _TOKEN.search(s)]


def _tokens(text: str) -> list[str]:
    return [token.lower() for token in _TOKEN.findall(text)]


def word_count(text: str) -> int:
    """Latin words and numbers count one each; Chinese characters half each, rounded up."""
    tokens = _TOKEN.findall(text)
    chinese = sum(1 for token in tokens if "\u4e00" <= token <= "\u9fff")
    return len(tokens) - chinese + math.ceil(chinese / 2)


# -- what the prompt asks -------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """What a prompt asks: a leg total (group) or a fact (animal, fact)."""

    group: tuple[tuple[str, int], ...] = ()   # sorted (animal, count) pairs whose legs are asked for
    animal: str = ""
    fact: str = ""                            # one of world.FACT_KINDS

    @property
    def total(self) -> int:
        return total_legs(self.group)


_LEGS_WORD = re.compile(r"\blegs?\b|腿", re.IGNORECASE)
_LEGS_AFTER = re.compile(r"\s*(?:legs?\b|条?腿)", re.IGNORECASE)
_FACT_CUES = {
    "sound": re.compile(r"\b(?:sound|say|says|noise)\b|叫|声", re.IGNORECASE),
    "home": re.compile(r"\b(?:live|lives|home)\b|住|家", re.IGNORECASE),
    "colour": re.compile(r"\bcolou?r\b|颜色", re.IGNORECASE),
    "food": re.compile(r"\b(?:eat|eats|food)\b|吃", re.IGNORECASE),
}


def _states_legs(sentence: str) -> bool:
    """A worked example: a number that is not a count, followed by "legs" / "条腿"."""
    numbers = _numbers(sentence)
    counts = {m.start for m in _mentions(sentence, numbers)}
    return any(n.start not in counts and _LEGS_AFTER.match(sentence, n.end) for n in numbers)


def _first_animal(text: str) -> str:
    matches = [m for m in (_EN_NAME.search(text), _ZH_NAME.search(text)) if m]
    if not matches:
        return ""
    first = min(matches, key=lambda m: m.start())[0]
    return _EN_ANIMALS.get(first.lower()) or _ZH_ANIMALS[first]


def parse_question(prompt: str) -> Question | None:
    """What the world's prompt asks, or None when it is not a question this world can judge."""
    if _LEGS_WORD.search(prompt):
        asked = [(m.animal, m.count) for sentence in _sentences(prompt) if not _states_legs(sentence)
                 for m in _mentions(sentence, _numbers(sentence))]
        return Question(group=tuple(sorted(asked))) if asked else None
    animal = _first_animal(prompt)
    kind = next((kind for kind, cue in _FACT_CUES.items() if cue.search(prompt)), "")
    if animal and kind in ANIMALS[animal].facts:
        return Question(animal=animal, fact=kind)
    return None


# -- what the response answers --------------------------------------------------------------------
_RATE_BEFORE = re.compile(r"\b(?:each|every|per)\b|[每各]", re.IGNORECASE)
_RATE_AFTER = re.compile(r"\s*legs?\s+(?:each|apiece)\b", re.IGNORECASE)


_OPERATOR_AFTER = re.compile(r"\s*[×*+=]")
_OPERATOR_BEFORE = re.compile(r"[×*+]\s*$")


def _is_operand(sentence: str, number: _Number) -> bool:
    """A number inside arithmetic ("7 × 4 = 28", "24 + 0 = 24") other than the result that ends
    it: working, not a stated total."""
    return bool(_OPERATOR_AFTER.match(sentence, number.end)
                or _OPERATOR_BEFORE.search(sentence, 0, number.start))


def stated_total(response: str, asked: tuple[tuple[str, int], ...]) -> int | None:
    """The first number the response states as the total of the asked group (see module doc)."""
    for sentence in _sentences(response):
        numbers = _numbers(sentence)
        mentions = _mentions(sentence, numbers)
        counts = {m.start for m in mentions}
        segment_start = 0  # the text since the previous stated number is what this one is about
        for number in numbers:
            if number.start in counts or _is_operand(sentence, number):
                continue
            segment = sentence[segment_start:number.start]
            group = tuple(sorted((m.animal, m.count) for m in mentions
                                 if segment_start <= m.start < number.start))
            segment_start = number.end
            if _RATE_BEFORE.search(segment) or _RATE_AFTER.match(sentence, number.end):
                continue
            if group and group != asked:
                continue
            return number.value
    return None


def _fact_patterns() -> dict[str, list[tuple[re.Pattern, frozenset[str]]]]:
    """Per fact kind: a pattern for each value word (both languages) → the animals it is true of."""
    owners: dict[str, dict[str, set[str]]] = {kind: {} for kind in FACT_KINDS}
    for animal in ANIMALS.values():
        for kind, fact in animal.facts.items():
            for keyword in (fact.en, fact.zh) + (("gray",) if fact.en == "grey" else ()):
                owners[kind].setdefault(keyword, set()).add(animal.name)

    def pattern(keyword: str) -> re.Pattern:
        return re.compile(rf"\b{keyword}\b" if keyword.isascii() else keyword, re.IGNORECASE)

    return {kind: [(pattern(keyword), frozenset(names)) for keyword, names in values.items()]
            for kind, values in owners.items()}


_FACT_VALUES = _fact_patterns()


def _first_fact_owners(response: str, kind: str) -> frozenset[str]:
    """The animals of which the first-named value is true; the longest value wins a tie (干草 vs 草)."""
    hits = [(match.start(), -len(match[0]), owners) for pattern, owners in _FACT_VALUES[kind]
            for match in [pattern.search(response)] if match]
    return min(hits, key=lambda hit: hit[:2])[2] if hits else frozenset()


def _is_correct(question: Question, response: str) -> bool:
    if question.group:
        return stated_total(response, question.group) == question.total
    return question.animal in _first_fact_owners(response, question.fact)


# -- style ------------------------------------------------------------------------------------------
_POLITE = re.compile(
    r"\b(?:please|thanks|thank you|happy to help|glad to help|hope (?:this|that|it) helps|"
    r"of course|great question|good question|certainly|you're welcome|my pleasure)\b|^\s*sure\b|"
    r"请|谢谢|很高兴|希望|当然|好问题|乐意|不客气", re.IGNORECASE)
_RUDE = re.compile(
    r"\b(?:stupid|dumb|idiot|obviously|whatever|duh|figure it out|shut up|waste of (?:my )?time)\b|"
    r"笨|自己算|烦|废话|这都不会|显然|闭嘴", re.IGNORECASE)
_CHAT_MARKER = re.compile(
    r"<\||\|>|</?s>|\[/?INST\]|<(?:bos|eos|pad|unk)>|(?:^|\n)\s*(?:Human|Assistant|User|System)\s*:",
    re.IGNORECASE)


def _politeness(response: str) -> float:
    if _RUDE.search(response):
        return 0.0
    return 1.0 if _POLITE.search(response) else 0.5


def format_ok(response: str) -> bool:
    """Non-empty, ends a sentence (not with "..."), and leaks no chat markers such as "<|"."""
    text = response.strip().rstrip(CLOSING_MARKS)
    if not text or _CHAT_MARKER.search(response) or text.endswith(("..", "…")):
        return False
    return text.endswith(SENTENCE_ENDS)


def _repeats(response: str) -> bool:
    sentences = [tuple(_tokens(s)) for s in _sentences(response)]
    if len(set(sentences)) < len(sentences):
        return True
    tokens = _tokens(response)
    trigrams: dict[tuple[str, ...], int] = {}
    for i in range(len(tokens) - 2):
        trigram = tuple(tokens[i:i + 3])
        trigrams[trigram] = trigrams.get(trigram, 0) + 1
    return any(times >= 3 for times in trigrams.values())


def _completeness(response: str) -> float:
    if not format_ok(response):
        return 0.0
    too_long = word_count(response) > MAX_WORDS or len(_sentences(response)) > MAX_SENTENCES
    return 1.0 - 0.5 * too_long - 0.5 * _repeats(response)


# -- the scores ---------------------------------------------------------------------------------------
def gold_score(prompt: str, response: str) -> float:
    """0.6·correct + 0.2·polite + 0.2·complete in [0, 1]; style only for prompts it cannot parse."""
    polite, complete = _politeness(response), _completeness(response)
    question = parse_question(prompt)
    if question is None:
        return round((polite + complete) / 2, 6)
    correct = float(_is_correct(question, response))
    return round(CORRECT_WEIGHT * correct + POLITE_WEIGHT * polite + COMPLETE_WEIGHT * complete, 6)


def count_correct(prompt: str, response: str) -> bool | None:
    """Whether the response states the right leg total; None unless the prompt asks for legs."""
    question = parse_question(prompt)
    if question is None or not question.group:
        return None
    return stated_total(response, question.group) == question.total


def summarize(prompts: list[str], responses: list[str]) -> dict:
    """Gold metrics over paired prompts and responses.

    count_accuracy is over the leg questions only, and None when there are none.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("summarize needs at least one prompt")
    rows = [{"prompt": prompt, "response": response, "gold_score": gold_score(prompt, response),
             "count_correct": count_correct(prompt, response), "format_ok": format_ok(response)}
            for prompt, response in zip(prompts, responses)]
    judged = [row["count_correct"] for row in rows if row["count_correct"] is not None]
    return {
        "mean_gold_score": sum(row["gold_score"] for row in rows) / len(rows),
        "count_accuracy": sum(judged) / len(judged) if judged else None,
        "format_adherence": sum(row["format_ok"] for row in rows) / len(rows),
        "mean_length": sum(word_count(response) for response in responses) / len(rows),
        "samples": rows[:SAMPLES_IN_SUMMARY],
    }
