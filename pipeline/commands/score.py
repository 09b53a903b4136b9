"""`rlhf score`: a reward model's scores of given answers, or its agreement with a ranked file.

    rlhf score reward:latest --prompt "Three chickens have how many legs?" \\
        --response "Six legs." --response "Seven."
    rlhf score reward:latest --data reward_data/eval.jsonl [--worst 5] [--plot scores.png] [--json]
"""

from __future__ import annotations

import json
import math
import sys

import torch

from pipeline.data.formats import load_ranked_rows
from pipeline.errors import UserError
from pipeline.ranking import ranking_metrics
from pipeline.registry import Registry
from pipeline.reward_model import (choose_shared_prompt, context_length, encode_ranked_row,
                                   load_reward_model, score_groups, score_texts)


def cmd_score(args) -> int:
    from transformers.utils import logging as transformers_logging


    _check_score_args(args)
    transformers_logging.disable_progress_bar()  # loading a small model needs no bar of its own
    resolved = Registry(args.home).resolve(args.ref)
    model, tokenizer = load_reward_model(resolved, role=args.ref)
    if args.data:
        report = score_ranked_file(model, tokenizer, args.data, args.worst)
        scores_by_rank = report.pop("scores_by_rank")
        if args.plot:
            plot_scores_by_rank(scores_by_rank, args.plot)
        print(json.dumps(report, ensure_ascii=False, indent=1) if args.json
              else format_ranked_report(args.data, report, args.plot))
        return 0
    scores = score_texts(model, tokenizer, [args.prompt] * len(args.response), args.response)
    table = sorted(zip(scores, args.response), key=lambda pair: -pair[0])
    if args.json:
        print(json.dumps([{"score": score, "response": response} for score, response in table],
                         ensure_ascii=False, indent=1))
    else:
        print(format_table(table))
    return 0


def _check_score_args(args) -> None:
    if args.data and (args.prompt is not None or args.response):
        raise UserError("give either --data FILE or --prompt with --response, not both")
    if not args.data:
        if args.prompt is None or not args.response:
            raise UserError("nothing to score: pass --prompt P with one or more --response A, "
                            "or --data FILE")
        if not args.prompt.strip():
            raise UserError("--prompt is empty; give the question the answers respond to")
        for index, response in enumerate(args.response, start=1):
            if not response.strip():
                raise UserError(f"--response number {index} is empty; give the answer text")
    if args.plot and not args.data:
        raise UserError("--plot needs --data FILE (it draws the scores of ranked answers)")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot}: the plot is a PNG; name the file *.png")
    if args.worst < 0:
        raise UserError(f"--worst must be 0 or more, got {args.worst}")


def format_table(table: list[tuple[float, str]]) -> str:
    lines = [f"{'rank':>4}  {'score':>9}  response"]
    for place, (score, response) in enumerate(table, start=1):
        lines.append(f"{place:>4}  {score:>9.4f}  {_one_line(response)}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 100) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def score_ranked_file(model, tokenizer, path: str, n_worst: int) -> dict:
    """Score every answer of a ranked file and compare with its labels.

    Returns `accuracy`, `score_by_rank`, `accuracy_by_gap`, `kendall_tau`, counts, `worst` (the
    `n_worst` prompts the model disagrees with most) and `scores_by_rank` (every score, for the
    plot).
    """

    rows = load_ranked_rows(path)
    max_length = context_length(model, tokenizer)
    groups, truncated = [], 0
    for row in rows:
        row_seqs, cut = encode_ranked_row(tokenizer, row, max_length, f"{path}:{row['_line']}")
        groups.append(row_seqs)
        truncated += cut
    shared, how = choose_shared_prompt(model, groups)
    if not shared:
        print(f"score: {how}", file=sys.stderr)
    score_lists = score_groups(model, groups, shared_prompt=shared, progress="score")
    rank_lists = [row["ranks"] for row in rows]
    metrics = ranking_metrics(score_lists, rank_lists)
    scores_by_rank: dict[int, list[float]] = {}
    for scores, ranks in zip(score_lists, rank_lists):
        for score, rank in zip(scores, ranks):
            scores_by_rank.setdefault(rank, []).append(score)
    return {
        "accuracy": finite_or_none(metrics["pairwise_accuracy"]),
        "score_by_rank": metrics["mean_score_by_rank"],
        "accuracy_by_gap": metrics["accuracy_by_gap"],
        "kendall_tau": finite_or_none(metrics["kendall_tau"]),
        "n_prompts": metrics["n_prompts"],
        "n_pairs": metrics["n_pairs"],
        "truncated": truncated,
        "worst": worst_prompts(rows, score_lists, path, n_worst),
        "scores_by_rank": scores_by_rank,
    }


def finite_or_none(value: float) -> float | None:
    """NaN (nothing defined the metric) becomes None, which JSON can carry."""
    return None if math.isnan(value) else value


def disagreement(scores: list[float], ranks: list[int]) -> float:
    """How strongly scores contradict a labeled ranking: the sum, over pairs the labels order,
    of how far the worse-ranked answer scores above the better one (0 when all agree)."""
    return sum(max(0.0, scores[j] - scores[i])
               for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j])


def worst_prompts(rows: list[dict], score_lists: list[list[float]], path: str,
                  n_worst: int) -> list[dict]:
    """The prompts with the largest `disagreement` (only those that disagree at all)."""
    scored = [(disagreement(scores, row["ranks"]), row, scores)
              for row, scores in zip(rows, score_lists)]
    scored = sorted((item for item in scored if item[0] > 0), key=lambda item: -item[0])
    return [{"where": f"{path}:{row['_line']}", "prompt": row["prompt"], "disagreement": amount,
             "answers": [{"response": response, "label_rank": rank, "score": score}
                         for response, rank, score in zip(row["responses"], row["ranks"], scores)]}
            for amount, row, scores in scored[:n_worst]]


def format_ranked_report(path: str, report: dict, plot: str | None) -> str:
    def join(mapping: dict, fmt: str) -> str:
        return "  ".join(f"{key}: {value:{fmt}}" for key, value in mapping.items())

    lines = [f"{path}: {report['n_prompts']} prompts, {report['n_pairs']} ranked pairs"
             + (f", {report['truncated']} answers cut to the model's context"
                if report["truncated"] else ""),
             f"pairwise accuracy: {_number(report['accuracy'])}",
             f"Kendall's tau (mean per prompt): {_number(report['kendall_tau'])}",
             f"accuracy by rank gap: {join(report['accuracy_by_gap'], '.3f')}",
             f"mean score by rank (0 = best): {join(report['score_by_rank'], '+.3f')}"]
    if report["worst"]:
        lines.append(f"prompts where the model disagrees most with the labels "
                     f"({len(report['worst'])}):")
    for item in report["worst"]:
        prompt = item["prompt"] if isinstance(item["prompt"], str) else item["prompt"][-1]["content"]
        lines.append(f"  {item['where']}  disagreement {item['disagreement']:.3f}  "
                     f"{_one_line(prompt, 80)}")
        for answer in sorted(item["answers"], key=lambda a: a["label_rank"]):
            lines.append(f"    label rank {answer['label_rank']}  score {answer['score']:+.3f}  "
                         f"{_one_line(answer['response'], 80)}")
    if plot:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "undefined (no strictly ranked pair)" if value is None else f"{value:.4f}"


def plot_scores_by_rank(scores_by_rank: dict[int, list[float]], out: str) -> None:
    """A PNG with one score histogram per labeled rank position."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    every = [score for scores in scores_by_rank.values() for score in scores]
    bins = torch.linspace(min(every), max(every) + 1e-6, 31).tolist()
    for rank in sorted(scores_by_rank):
        axes.hist(scores_by_rank[rank], bins=bins, histtype="step", linewidth=1.5,
                  label=f"rank {rank} (n={len(scores_by_rank[rank])})")
    axes.set_xlabel("reward model score")
    axes.set_ylabel("answers")
    axes.set_title("Score distribution per labeled rank (0 = best)")
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(out, format="png", dpi=100)
    except OSError as err:
        raise UserError(f"cannot write the plot to {out}: {err.strerror}; pass a writable path") from None
    finally:
        plt.close(figure)
