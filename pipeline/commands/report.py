"""`rlhf report REF`: a report card for a pipeline or a run, as Markdown with PNG plots and HTML.

    rlhf report pipeline:latest [--out DIR]        (default DIR: HOME/reports/RUN_ID)

It covers every stage run behind REF (a pipeline's stages, or a run and its ancestors): loss
curves; the reward model's held-out accuracy and mean score by rank; PPO's reward-model score, KL,
entropy and answer length; the gold score of each stage's published policy (greedy answers to the
held-out prompts of the stages' own gold evals, scored by `pipeline.world.gold`); sample answers from
every checkpoint to the same prompts; timings and throughput; lineage. DIR gets `report.md`,
`report.html`, the PNGs, and `report.json` with the numbers.

Metric series come from the registry (`Registry.metrics`), summaries from each run's `summary`.
"""

from __future__ import annotations

import html
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.prompts import read_prompts
from pipeline.errors import UserError
from pipeline.generation import load_for_sampling
from pipeline.guard import REWARD_MODEL, model_kind
from pipeline.registry import PIPELINE_STAGE, Registry, Run, default_home, open_registry
from pipeline.world.evaluation import GoldEvalSection, gold_eval, run_gold_settings
from stages import STAGES

SAMPLE_PROMPTS = 3        # prompts whose answers are shown side by side

# PPO panels: a title and the metric series the PPO stage logs for it.
PPO_PANELS = {
    "reward-model score, and reward = score − KL penalty": ("rm_score_mean", "reward"),
    "KL to the reference (per answer)": ("kl",),
    "entropy (per token)": ("entropy",),
    "answer length (tokens)": ("response_length",),
}
REWARD_ACCURACY = ("pairwise_accuracy", "eval_pairwise_accuracy")
THROUGHPUT = (("tokens_per_s", "tokens/s"), ("episodes_per_s", "episodes/s"))


@dataclass
class Card:
    """The report as a list of blocks, rendered to Markdown and to HTML alike.

    A block is (kind, payload): ("h1"|"h2"|"p"|"pre", text), ("table", (headers, rows)),
    ("img", (file name, caption)).
    """

    blocks: list[tuple[str, object]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    def add(self, kind: str, payload) -> None:
        self.blocks.append((kind, payload))
        if kind == "img":
            self.images.append(payload[0])

    def markdown(self) -> str:
        parts = []
        for kind, payload in self.blocks:
            if kind in ("h1", "h2"):
                parts.append(f"{'#' * int(kind[1])} {payload}")
            elif kind == "p":
                parts.append(str(payload))
            elif kind == "pre":
                parts.append(f"```\n{payload}\n```")
            elif kind == "img":
                parts.append(f"![{payload[1]}]({payload[0]})")
            elif kind == "table":
                headers, rows = payload
                lines = [_md_row(headers), _md_row(["---"] * len(headers))]
                parts.append("\n".join(lines + [_md_row(row) for row in rows]))
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        parts = []
        for kind, payload in self.blocks:
            if kind in ("h1", "h2", "p"):
                parts.append(f"<{kind}>{html.escape(str(payload))}</{kind}>")
            elif kind == "pre":
                parts.append(f"<pre>{html.escape(str(payload))}</pre>")
            elif kind == "img":
                parts.append(f'<figure><img src="{html.escape(payload[0])}" alt="'
                             f'{html.escape(payload[1])}"><figcaption>{html.escape(payload[1])}'
                             f"</figcaption></figure>")
            elif kind == "table":
                headers, rows = payload
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                               + "</tr>" for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;"
                 "text-align:left;vertical-align:top}img{max-width:100%}pre{background:#f4f4f4;"
                 "padding:.8em}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{style}</style></head><body>\n" + "\n".join(parts)
                + "\n</body></html>\n")


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def number_text(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# -- plots ----------------------------------------------------------------------------------------
def plot_panels(panels: list[tuple[str, dict[str, list[tuple[int, float]]]]], path: Path) -> None:
    """One line chart per panel, each with its named series of (step, value) points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.4 * rows), squeeze=False)
    for axis, (title, series) in zip(axes.flat, panels):
        for name, points in series.items():
            steps, values = zip(*points)
            style = "o-" if len(points) < 12 else "-"
            axis.plot(steps, values, style, label=name, linewidth=1.2, markersize=4)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)
    plt.close(figure)


def plot_bars(title: str, labels: list[str], values: list[float], ylabel: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.4))
    bars = axis.bar(labels, values, color="#4c72b0")
    axis.bar_label(bars, fmt="%.3f", fontsize="small")
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.axhline(0, color="black", linewidth=0.6)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)
    plt.close(figure)


# -- what goes in ---------------------------------------------------------------------------------
def named_series(metrics: dict, names: tuple[str, ...]) -> dict[str, list]:
    return {name: metrics[name] for name in names if metrics.get(name)}


def loss_series(metrics: dict) -> dict[str, list]:
    """Every logged loss: `loss`, `eval_loss`, PPO's `policy_loss` and `value_loss`, ..."""
    return {name: points for name, points in metrics.items() if name.endswith("loss") and points}


@dataclass
class GoldSettings:
    """What the report's gold eval samples: the gold eval of the last stage that ran one (sft,
    ppo), so its numbers compare with the stages' own."""

    section: GoldEvalSection
    prompts_file: str


def gold_settings(registry: Registry, runs: dict[str, Run]) -> GoldSettings | None:
    """The gold-eval settings of the last stage that ran a gold eval; None when none did."""
    for run in reversed(list(runs.values())):
        found = run_gold_settings(run.config)
        if found:
            section, world = found
            return GoldSettings(section, section.prompts_path(registry, world))
    return None


def gold_by_stage(registry: Registry, runs: dict[str, Run],
                  settings: GoldSettings) -> tuple[dict, list[str]]:
    """Each stage policy's gold summary (greedy answers), and the prompts."""
    prompts = read_prompts(settings.prompts_file, settings.section.n_prompts)
    sampling = settings.section.sampling()
    results = {}
    for name, run in runs.items():
        if not run.model_path or model_kind(run.model_path) == REWARD_MODEL:
            continue
        model, tokenizer = load_for_sampling(registry.resolve(run.id))
        results[name] = gold_eval(model, tokenizer, prompts, sampling)
    return results, prompts


def timing_rows(registry: Registry, runs: dict[str, Run], how: dict[str, str]) -> list[list]:
    """Per stage: steps, seconds spent in steps (the supervised loop logs `step_time`, PPO its
    `time_*` phases), median throughput, and wall time from the run's start to its end."""
    rows = []
    for name, run in runs.items():
        metrics = registry.metrics(run.id)
        timed = ["step_time"] if "step_time" in metrics else \
            [series for series in metrics if series.startswith("time_")]
        step_seconds = sum(value for series in timed for _, value in metrics[series])
        rate = next((f"{statistics.median(v for _, v in metrics[key]):,.1f} {unit}"
                     for key, unit in THROUGHPUT if metrics.get(key)), "–")
        rows.append([name, run.id, how.get(name, ""), run.status,
                     run.config.get("train", {}).get("max_steps", "–"), f"{step_seconds:.1f}",
                     rate, f"{run.updated_at - run.created_at:.1f}"])
    return rows


def lineage_lines(tree: dict, indent: str = "", role: str = "") -> list[str]:
    """`Registry.lineage`'s tree as indented lines, each parent under its child."""
    label = f"{role} ← " if role else ""
    if "path" in tree:
        return [f"{indent}{label}{tree['path']}"]
    lines = [f"{indent}{label}{tree['id']} ({tree['stage']}, {tree['status']})"]
    for parent_role, parent in tree["parents"].items():
        lines += lineage_lines(parent, indent + "  ", parent_role)
    return lines


# -- the report -----------------------------------------------------------------------------------
@dataclass
class Report:
    """Where a report was written, and its numbers (what `report.json` holds)."""

    markdown: Path
    html: Path
    data: dict


def write_report(registry: Registry, run: Run, out: Path) -> Report:
    """Render the report card of `run` into `out`; returns the paths and the numbers."""
    runs = registry.stage_runs(run, list(STAGES))
    if not runs:
        raise UserError(f"{run.id} has no stage runs to report on yet; run the pipeline first")
    out.mkdir(parents=True, exist_ok=True)
    how = {name: entry["how"] for name, entry in run.summary.get("stages", {}).items()} \
        if run.stage == PIPELINE_STAGE else {}
    metrics = {name: registry.metrics(stage_run.id) for name, stage_run in runs.items()}
    card = Card()
    data: dict = {"run": run.id, "stages": {name: r.id for name, r in runs.items()}}

    card.add("h1", f"Report card: {run.id}")
    card.add("p", f"{run.stage} run, status {run.status}; written "
                  f"{time.strftime('%Y-%m-%d %H:%M', time.localtime())}.")
    _losses(card, runs, metrics, out)
    if "reward" in runs:
        data["reward"] = _reward(card, runs["reward"], metrics["reward"], out)
    if "ppo" in runs:
        _ppo(card, metrics["ppo"], out)
    rounds = round_rows(registry, run)
    if rounds:
        data["rounds"] = _rounds(card, rounds)
    settings = gold_settings(registry, runs)
    if settings is not None:
        data["gold"] = _gold(card, registry, runs, settings, out)
    card.add("h2", "Timings and throughput")
    card.add("table", (["stage", "run", "this time", "status", "steps", "step seconds",
                        "throughput", "wall seconds"], timing_rows(registry, runs, how)))
    last = list(runs.values())[-1]
    card.add("h2", "Lineage")
    card.add("pre", "\n".join(lineage_lines(registry.lineage(last.id))))
    data["images"] = card.images

    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(card.markdown(), encoding="utf-8")
    page.write_text(card.html(f"Report card: {run.id}"), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(data, indent=1, ensure_ascii=False),
                                     encoding="utf-8")
    return Report(markdown, page, data)


def _losses(card: Card, runs: dict[str, Run], metrics: dict, out: Path) -> None:
    panels = [(name, series) for name in runs if (series := loss_series(metrics[name]))]
    card.add("h2", "Loss curves")
    if not panels:
        card.add("p", "No loss was logged.")
        return
    plot_panels(panels, out / "losses.png")
    card.add("img", ("losses.png", "training and eval loss of every stage"))


def _reward(card: Card, run: Run, metrics: dict, out: Path) -> dict:
    card.add("h2", "Reward model")
    summary = run.summary
    by_rank = {str(rank): value for rank, value in summary.get("mean_score_by_rank", {}).items()}
    by_gap = ", ".join(f"{gap}: {number_text(value)}"
                       for gap, value in summary.get("accuracy_by_gap", {}).items())
    accuracy_text = number_text(summary.get("pairwise_accuracy"))
    card.add("p", f"Held-out pairwise accuracy {accuracy_text} over "
                  f"{summary.get('n_pairs', '?')} ranked pairs of {summary.get('n_prompts', '?')} "
                  f"prompts (by rank gap: {by_gap or '–'}); Kendall's tau "
                  f"{number_text(summary.get('kendall_tau'))}.")
    accuracy = named_series(metrics, REWARD_ACCURACY)
    if accuracy:
        plot_panels([("pairwise accuracy (train batches and held out)", accuracy)],
                    out / "reward_accuracy.png")
        card.add("img", ("reward_accuracy.png", "reward-model pairwise accuracy"))
    if by_rank:
        plot_bars("Mean normalized score by labeled rank (0 = best)",
                  [f"rank {r}" for r in by_rank], list(by_rank.values()), "score",
                  out / "reward_by_rank.png")
        card.add("img", ("reward_by_rank.png", "reward-model score by rank"))
    return {"pairwise_accuracy": summary.get("pairwise_accuracy"), "mean_score_by_rank": by_rank}


def _ppo(card: Card, metrics: dict, out: Path) -> None:
    card.add("h2", "PPO")
    panels = [(title, series) for title, names in PPO_PANELS.items()
              if (series := named_series(metrics, names))]
    if not panels:
        card.add("p", "No PPO curves were logged.")
        return
    plot_panels(panels, out / "ppo.png")
    card.add("img", ("ppo.png", "PPO: reward-model score, KL, entropy and answer length"))


ROUND_COLUMNS = {  # column → (step of the round, its summary key)
    "reward accuracy": ("reward", "pairwise_accuracy"),
    "gold (greedy)": ("ppo", "gold_end/mean_gold_score"),
    "gold (sampled)": ("ppo", "gold_sampled_end/mean_gold_score"),
    "count accuracy": ("ppo", "gold_end/count_accuracy"),
    "RM score": ("ppo", "rm_score_mean_end"),
    "KL": ("ppo", "kl_end"),
}


def round_rows(registry: Registry, run: Run) -> dict[int, dict]:
    """{round: {column: value}} from the reward and PPO runs of a pipeline with several rounds
    (steps `reward`, `ppo`, `reward.2`, `ppo.2`, ...); {} for anything else."""
    steps = run.summary.get("stages", {}) if run.stage == PIPELINE_STAGE else {}
    if "ppo.2" not in steps:
        return {}
    rows: dict[int, dict] = {}
    for step, entry in steps.items():
        stage, _, number = step.partition(".")
        if stage in ("reward", "ppo"):
            summary = registry.get(entry["run"]).summary
            row = rows.setdefault(int(number or 1), {})
            row.update({column: summary.get(key) for column, (source, key)
                        in ROUND_COLUMNS.items() if source == stage})
            if stage == "ppo" and int(number or 1) == 1:
                rows[0] = {"gold (greedy)": summary.get("gold_start/mean_gold_score"),
                           "gold (sampled)": summary.get("gold_sampled_start/mean_gold_score"),
                           "count accuracy": summary.get("gold_start/count_accuracy")}
    return dict(sorted(rows.items()))


def _rounds(card: Card, rounds: dict[int, dict]) -> dict:
    card.add("h2", "Rounds")
    card.add("p", "Each round collects the latest policy's answers, trains a reward model on every "
                  "round's answers so far and runs PPO from the latest policy. Round 0 is the SFT "
                  "policy PPO started from; gold on the held-out prompts, RM score and KL at the "
                  "end of each round's PPO.")
    card.add("table", (["round", *ROUND_COLUMNS],
                       [[number, *(number_text(row.get(column)) for column in ROUND_COLUMNS)]
                        for number, row in rounds.items()]))
    return {str(number): row for number, row in rounds.items()}


def _gold(card: Card, registry: Registry, runs: dict[str, Run], settings: GoldSettings,
          out: Path) -> dict:
    card.add("h2", "Gold score after each stage")
    gold, prompts = gold_by_stage(registry, runs, settings)
    if not gold:
        card.add("p", "None of these runs published a policy (a model that writes answers).")
        return {}
    card.add("p", f"Answers of each stage's published policy "
                  f"({settings.section.describe(settings.prompts_file)}), as in the stages' own "
                  f"gold evals, scored by the gold "
                  f"scorer: 0.6·correct + 0.2·polite + 0.2·complete. No stage trains on it. The "
                  f"reward model writes no answers, so it has no row.")
    card.add("table", (["stage", "gold score", "count accuracy", "format adherence", "mean words"],
                       [[name, number_text(g["mean_gold_score"]), number_text(g["count_accuracy"]),
                         number_text(g["format_adherence"]), number_text(g["mean_length"], 1)]
                        for name, g in gold.items()]))
    plot_bars("Mean gold score of each stage's policy", list(gold),
              [g["mean_gold_score"] for g in gold.values()], "gold score", out / "gold.png")
    card.add("img", ("gold.png", "gold score after each stage"))
    card.add("h2", "Sample answers")
    shown = min([SAMPLE_PROMPTS] + [len(g["samples"]) for g in gold.values()])
    for index, prompt in enumerate(prompts[:shown]):
        card.add("p", f"Q: {prompt}")
        card.add("table", (["stage", "answer", "gold"],
                           [[name, g["samples"][index]["response"] or "(empty)",
                             number_text(g["samples"][index]["gold_score"], 2)]
                            for name, g in gold.items()]))
    return {name: {k: v for k, v in g.items() if k != "samples"} for name, g in gold.items()}


def cmd_report(args) -> int:
    registry = open_registry(args.home)
    if registry is None:
        raise UserError(f"no registry at {args.home or default_home()}; run a pipeline first, or "
                        f"pass --home DIR or set RLHF_HOME")
    run = registry.lookup(args.ref)
    if run is None:
        raise UserError(f"no run '{args.ref}' in the registry at {registry.home}; "
                        f"see `rlhf registry ls`")
    out = Path(args.out) if args.out else registry.home / "reports" / run.id
    report = write_report(registry, run, out)
    print(f"report: {report.markdown}")
    print(f"html:   {report.html}")
    return 0
