"""Who ranks collected answers: people (`rlhf label`), or the world's simulated labeler.

Step 2 of the recipe: a prompt and several answers sampled from the policy; a labeler ranks them
best to worst. Every labeler has the same three methods, so `pipeline.data.collect` does not care
which one it has:

    check_prompts(prompts)   refuse prompts this labeler must not see (before anything is sampled)
    rank(prompt, answers)    a ranking in the ranked file format ([2, [0, 3], 1], best first, a
                             list is a tie), or None: the row is left for `rlhf label`
    report()                 what the labeler did, for the collected file's sidecar

`gold` ranks by the world's gold scorer (`pipeline.world.gold`). Answers of equal gold score form a
tie. Real labelers disagree (InstructGPT: about 73% agreement between two of them), so its order
is a Plackett–Luce sample at `temperature` over the tie groups: at temperature 0 it is the gold
order, and higher temperatures put a worse answer first more often. It reports how often it
orders two answers as the noiseless gold order does. It labels train prompts only: a leg question
about a held-out (animal, count) pair is refused, so the held-out evals stay unseen by every model.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError
from pipeline.world.farm import HELD_OUT_COUNTS
from pipeline.world.gold import gold_score, parse_question

Ranking = list  # answer indices best first; a nested list is a tie group


class PeopleLabeler:
    """Leaves every row unranked: `rlhf label --prompts FILE` shows the collected answers."""

    name = "people"

    def check_prompts(self, prompts: list) -> None:
        del prompts  # people may label any prompt

    def rank(self, prompt, answers: list[str]) -> Ranking | None:
        del prompt, answers
        return None

    def report(self) -> dict:
        return {"name": self.name}


class GoldLabeler:
    """The world's simulated labeler: gold order with ties, Plackett–Luce noise at `temperature`."""

    name = "gold"

    def __init__(self, temperature: float = 0.0, seed: int = 0):
        if not temperature >= 0:
            raise UserError(f"labeler temperature {temperature} must be 0 (the gold order) or more")
        self.temperature = temperature
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.agreeing_pairs = 0
        self.ordered_pairs = 0

    def check_prompts(self, prompts: list) -> None:
        for index, prompt in enumerate(prompts):
            pairs = held_out_pairs(question_text(prompt))
            if pairs:
                asked = ", ".join(f"{count} {animal}" for animal, count in pairs)
                raise UserError(f"prompt {index + 1} asks about held-out legs ({asked}): the gold "
                                f"labeler labels train prompts only, so that the held-out evals "
                                f"stay unseen; remove such prompts (the world's train prompts have none)")

    def rank(self, prompt, answers: list[str]) -> Ranking:
        text = question_text(prompt)
        scores = [gold_score(text, answer) for answer in answers]
        groups = tie_groups(scores)
        values = [scores[group[0]] for group in groups]
        order = plackett_luce_order(values, self.temperature, self.rng)
        ranking = [groups[g] for g in order]
        agreeing, ordered = agreement_counts(ranking, scores)
        self.agreeing_pairs += agreeing
        self.ordered_pairs += ordered
        return [group[0] if len(group) == 1 else group for group in ranking]

    def report(self) -> dict:
        agreement = self.agreeing_pairs / self.ordered_pairs if self.ordered_pairs else None
        return {"name": self.name, "temperature": self.temperature, "seed": self.seed,
                "agreement_with_gold": agreement, "pairs": self.ordered_pairs}


LABELERS = ("gold", "people")


def make_labeler(name: str, temperature: float = 0.0, seed: int = 0):
    """The labeler called `name`; an unknown name is a UserError that lists the known ones."""
    if name == "gold":
        return GoldLabeler(temperature, seed)
    if name == "people":
        return PeopleLabeler()
    raise UserError(f"unknown labeler '{name}'; choose one of: {', '.join(LABELERS)}")


# -- pure parts ---------------------------------------------------------------------------------
def question_text(prompt) -> str:
    """The text the gold scorer reads: the prompt, or a chat prompt's last user message."""
    if isinstance(prompt, list):
        return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return prompt


def held_out_pairs(question: str) -> list[tuple[str, int]]:
    """The held-out (animal, count) pairs a leg question asks about ([] for any other prompt)."""
    parsed = parse_question(question)
    if parsed is None:
        return []
    return [(animal, count) for animal, count in parsed.group if HELD_OUT_COUNTS[animal] == count]


def tie_groups(scores: list[float]) -> list[list[int]]:
    """Answer indices grouped by equal score, best group first: [0.2, 0.8, 0.2] → [[1], [0, 2]]."""
    return [[i for i, score in enumerate(scores) if score == value]
            for value in sorted(set(scores), reverse=True)]


def plackett_luce_order(values: list[float], temperature: float,
                        rng: np.random.Generator) -> list[int]:
    """Indices of `values` in a Plackett–Luce order: first place drawn with probability ∝
    exp(value / temperature), the next among the rest, and so on. Sorting value / temperature plus
    Gumbel noise draws exactly that order (the Gumbel-max trick, applied to every place). At
    temperature 0 it is the descending order of the values, ties in index order."""
    if temperature == 0:
        return sorted(range(len(values)), key=lambda i: -values[i])
    keys = np.asarray(values, dtype=np.float64) / temperature + rng.gumbel(size=len(values))
    return [int(i) for i in np.argsort(-keys, kind="stable")]


def agreement_counts(ranking: list[list[int]], scores: list[float]) -> tuple[int, int]:
    """(pairs ordered as the scores order them, pairs the scores order) for a ranking given as tie
    groups best first; pairs of equal score say nothing and are left out."""
    place = {answer: position for position, group in enumerate(ranking) for answer in group}
    agreeing = ordered = 0
    for a in range(len(scores)):
        for b in range(a + 1, len(scores)):
            if scores[a] == scores[b]:
                continue
            ordered += 1
            better, worse = (a, b) if scores[a] > scores[b] else (b, a)
            agreeing += place[better] < place[worse]
    return agreeing, ordered
