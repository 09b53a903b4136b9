"""`rlhf`: the command-line entry point. Parses, dispatches, and maps errors to exit codes.

Heavy libraries (torch, transformers) are imported inside the command handlers, never at module
top, so `rlhf --help` and `rlhf registry ls` answer at once. A `UserError` anywhere becomes one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline import __version__, console
from pipeline.errors import EXIT_USER_ERROR, UserError, run_command
from pipeline.guard import (max_new_tokens_option, number_option, seed_option, temperature_option,
                            top_k_option)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`run sft --config X a=1`), which argparse
    # cannot assign to a positional once the options interrupted it.
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-")
                                                    for item in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    console.setup(getattr(args, "verbosity", None))
    return run_command(lambda: args.handler(args))


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line, exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before or after the command (`rlhf registry ls --home DIR`).
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, default=argparse.SUPPRESS)
    parser = Parser(prog="rlhf", description="The InstructGPT recipe: "
                    "pretrain → sft → reward → ppo, with one checkpoint registry.")
    _add_global_options(parser, default=None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND",
                                     parser_class=_with_parents(common))
    _add_run(commands)
    _add_config(commands)
    _add_registry(commands)
    _add_data(commands)
    _add_score(commands)
    _add_pipeline(commands)
    _add_checkpoint_tools(commands)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--home", default=default,
                        help="registry home (default: $RLHF_HOME or ./runs)")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const="quiet",
                          default=default, help="no progress and no messages about what is "
                          "done; warnings, errors and results only")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const",
                          const="verbose", default=default, help="a progress line per step when "
                          "stderr is not a terminal, and the libraries' INFO messages")


def _with_parents(common: argparse.ArgumentParser):
    """Sub-parsers of every depth get the global options and the one-line error style."""
    class SubParser(Parser):
        def __init__(self, *args, **kwargs):
            kwargs["parents"] = [*kwargs.get("parents", []), common]
            super().__init__(*args, **kwargs)

        def add_subparsers(self, **kwargs):
            kwargs.setdefault("parser_class", SubParser)
            return super().add_subparsers(**kwargs)
    return SubParser


def _lazy(module: str, function: str):
    """A handler imported only when its command runs (keeps `--help` free of torch)."""
    def handler(args):
        import importlib
        return getattr(importlib.import_module(module), function)(args)
    return handler


def _registry(args, create: bool = True):
    from pipeline.registry import Registry
    return Registry(args.home, create=create)


def _stage_names() -> list[str]:
    from stages import STAGES
    return list(STAGES)


def _stage_list() -> str:
    """The stages with their one-line summaries, for help texts."""
    from stages import STAGES
    return "; ".join(f"{stage.name}: {stage.summary}" for stage in STAGES.values())


def _load_stage_config(stage_name: str, config_path: str | None, overrides: list[str]):
    from pipeline.config import load_config
    from stages import STAGES
    if stage_name not in STAGES:
        raise UserError(f"unknown stage '{stage_name}'; choose one of {', '.join(STAGES)}")
    module = STAGES[stage_name].load()
    return module, load_config(module.Config, config_path, overrides)


REF_HELP = "run id, STAGE:latest or alias"
MODEL_REF_HELP = "model reference (run id, STAGE:latest, alias, pipeline, directory or hub name)"
JSON_HELP = "print JSON instead of text"


# -- rlhf run -----------------------------------------------------------------------------------
def _add_run(commands) -> None:
    run = commands.add_parser("run", help="run one stage", description="Run one stage. Re-running "
                              "the same command resumes an interrupted run or reuses a finished one.")
    run.add_argument("stage", help=f"the stage ({_stage_list()})")
    run.add_argument("--config", help="stage YAML (default: the stage's built-in defaults)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    run.add_argument("--restart", action="store_true", help="start a new run instead of resuming")
    run.set_defaults(handler=_cmd_run)


def _cmd_run(args) -> int:
    from pipeline.console import is_main_process

    module, config = _load_stage_config(args.stage, args.config, args.overrides)
    registry = _registry(args)
    run = module.run(config, registry, restart=args.restart)
    if is_main_process():  # under torchrun every process gets here; one answers
        print(json.dumps({"run": run.id, "status": run.status, "model_path": run.model_path}))
    return 0


# -- rlhf config --------------------------------------------------------------------------------
def _add_config(commands) -> None:
    config = commands.add_parser("config", help="show resolved configs")
    sub = config.add_subparsers(title="config commands", metavar="ACTION")
    show = sub.add_parser("show", help="print the resolved config of a stage",
                          description="Print a stage's config with every default filled in, "
                          "checked as `rlhf run` checks it.")
    show.add_argument("stage", help=f"one of: {', '.join(_stage_names())}")
    show.add_argument("--config", help="stage YAML (default: the stage's built-in defaults)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    show.add_argument("--explain", action="store_true", help="every key with its type, value, "
                      "default and what it does")
    show.set_defaults(handler=_cmd_config_show)


def _cmd_config_show(args) -> int:
    from pipeline.config import explain, to_yaml
    _, config = _load_stage_config(args.stage, args.config, args.overrides)
    print(explain(config) if args.explain else to_yaml(config), end="")
    return 0


# -- rlhf registry ------------------------------------------------------------------------------
def _add_registry(commands) -> None:
    registry = commands.add_parser("registry", help="inspect and manage the checkpoint registry")
    sub = registry.add_subparsers(title="registry commands", metavar="ACTION")
    ls = sub.add_parser("ls", help="list runs")
    ls.add_argument("--stage", help="only runs of this stage")
    ls.add_argument("--json", action="store_true", help=JSON_HELP)
    ls.set_defaults(handler=_cmd_registry_ls)
    show = sub.add_parser("show", help="one run in full")
    show.add_argument("ref", help=REF_HELP)
    show.add_argument("--json", action="store_true", help=JSON_HELP)
    show.set_defaults(handler=_cmd_registry_show)
    lineage = sub.add_parser("lineage", help="a run and its ancestors")
    lineage.add_argument("ref", help=REF_HELP)
    lineage.add_argument("--json", action="store_true", help=JSON_HELP)
    lineage.set_defaults(handler=_cmd_registry_lineage)
    verify = sub.add_parser("verify", help="check every file against its manifest")
    verify.add_argument("ref", nargs="?", help="only this run (default: every run)")
    verify.set_defaults(handler=_cmd_registry_verify)
    rm = sub.add_parser("rm", help="remove a run and its files")
    rm.add_argument("ref", help=REF_HELP)
    rm.add_argument("--force", action="store_true", help="even if other runs depend on it")
    rm.set_defaults(handler=_cmd_registry_rm)
    alias = sub.add_parser("alias", help="give a run a name usable as a reference")
    alias.add_argument("name", help="the new name (usable wherever a reference is)")
    alias.add_argument("ref", help=REF_HELP)
    alias.set_defaults(handler=_cmd_registry_alias)


def _run_of(registry, ref: str):
    """A registry run named by any reference form (run id, STAGE:latest, alias)."""
    run = registry.lookup(ref)
    if run is None:
        raise UserError(f"no run '{ref}' in the registry at {registry.home}; see `rlhf registry ls`")
    return run


def _cmd_registry_ls(args) -> int:
    from pipeline.registry import default_home, open_registry
    registry = open_registry(args.home)  # listing an empty home creates nothing there
    runs = registry.runs(args.stage) if registry else []
    home = args.home or default_home()
    if args.json:
        print(json.dumps([run.as_json() for run in runs], ensure_ascii=False, indent=1))
        return 0
    if not runs:
        print(f"no runs in {home}")
    for run in runs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created_at))
        parents = ",".join(f"{role}={ref}" for role, ref in run.parents.items()) or "-"
        print(f"{run.id:<34} {run.stage:<9} {run.status:<11} {when}  parents: {parents}")
    return 0


def _cmd_registry_show(args) -> int:
    registry = _registry(args, create=False)
    run = _run_of(registry, args.ref)
    data = run.as_json()
    data["metrics"] = {name: series[-1][1] for name, series in registry.metrics(run.id).items()}
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=1))
    else:
        for key in ("id", "stage", "status", "config_hash", "data_fingerprint", "model_path",
                    "parents", "summary", "versions"):
            print(f"{key:>16}: {data[key]}")
    return 0


def _cmd_registry_lineage(args) -> int:
    registry = _registry(args, create=False)
    tree = registry.lineage(_run_of(registry, args.ref).id)
    if args.json:
        print(json.dumps(tree, indent=1))
    else:
        _print_tree(tree, "")
    return 0


def _print_tree(node: dict, indent: str, role: str = "") -> None:
    label = f"{role} ← " if role else ""
    if "path" in node:
        print(f"{indent}{label}{node['path']}")
        return
    print(f"{indent}{label}{node['id']} ({node['stage']}, {node['status']})")
    for parent_role, parent in node["parents"].items():
        _print_tree(parent, indent + "  ", parent_role)


def _cmd_registry_verify(args) -> int:
    registry = _registry(args, create=False)
    run_id = _run_of(registry, args.ref).id if args.ref else None
    problems = registry.verify(run_id)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("all checkpoints intact")
    return 0


def _cmd_registry_rm(args) -> int:
    registry = _registry(args, create=False)
    run = _run_of(registry, args.ref)
    registry.remove(run.id, force=args.force)
    print(f"removed {run.id}")
    return 0


def _cmd_registry_alias(args) -> int:
    _registry(args, create=False).set_alias(args.name, args.ref)
    print(f"{args.name} → {args.ref}")
    return 0


# -- rlhf data ----------------------------------------------------------------------------------
def _add_data(commands) -> None:
    data = commands.add_parser("data", help="the embedded world: generate data, gold-score a model")
    sub = data.add_subparsers(title="data commands", metavar="ACTION")
    world = sub.add_parser("world", help="write the world's data files (deterministic)")
    world.add_argument("--out", required=True, help="directory to write the files into")
    world.add_argument("--seed", type=seed_option, default=0, help="the world's seed")
    world.add_argument("--size", choices=["tiny", "small"], default="tiny",
                       help="tiny (the tiny recipe's world) or small (a larger one)")
    world.add_argument("--k", type=int, default=4, help="answers per ranked prompt (2-9)")
    world.set_defaults(handler=_cmd_data_world)
    validate = sub.add_parser("validate", help="check a data file row by row; say which stages "
                              "can read it")
    validate.add_argument("file", help="a data file (JSON Lines, JSON array, Parquet, text) or a "
                          "directory of them")
    validate.add_argument("--stage", choices=["pretrain", "sft", "reward", "ppo"],
                          help="check it for this stage only, and show that reader's first problem")
    validate.set_defaults(handler=_cmd_data_validate)
    gold = sub.add_parser("gold-score", help="sample a model on held-out prompts; gold-score it")
    gold.add_argument("ref", help="model reference (run id, STAGE:latest, alias, directory)")
    gold.add_argument("--prompts", help="JSONL of {\"prompt\": ...} (default: the world's eval prompts)")
    gold.add_argument("--n", type=number_option(int, low=1),
                      help="number of prompts (default: the run's eval.n_prompts, else 100)")
    gold.add_argument("--temperature", type=temperature_option,
                      help="0 = greedy (default: the run's eval.temperature, else 0)")
    gold.add_argument("--max-new-tokens", type=number_option(int, low=1),
                      help="answer length limit (default: the run's eval.max_new_tokens, else 64)")
    gold.add_argument("--json", action="store_true", help=JSON_HELP)
    gold.set_defaults(handler=_lazy("pipeline.commands.gold_score", "cmd_gold_score"))
    collect = sub.add_parser(
        "collect", help="sample K answers per prompt from a policy; rank them (reward data)",
        description="Sample K answers per prompt as PPO samples them (the PPO config's generation "
        "settings) and write them as ranked rows for `rlhf run reward`, ranked by the world's gold "
        "labeler, or unranked for `rlhf label` (labeler people). Writes OUT and OUT.provenance; "
        "registers nothing.")
    collect.add_argument("policy", help="the policy (run id, STAGE:latest, alias, directory)")
    collect.add_argument("--out", required=True, help="ranked JSONL written (replaced)")
    collect.add_argument("--prompts", default="world", help="JSONL of {\"prompt\": ...}, or "
                         "'world': the embedded world's reward_train.jsonl prompts (default)")
    collect.add_argument("--n", type=number_option(int, low=1), help="use the first N prompts "
                         "(default: all)")
    collect.add_argument("--k", type=int, default=4, help="answers sampled per prompt (2 or more)")
    collect.add_argument("--config", help="PPO YAML whose generation settings sample the answers "
                         "(default: the PPO stage's defaults)")
    collect.add_argument("overrides", nargs="*", metavar="key=value",
                         help="PPO config overrides, e.g. generation.temperature=1.0")
    collect.add_argument("--labeler", default="gold", help="gold (the world's simulated labeler) "
                         "or people (left unranked for `rlhf label`)")
    collect.add_argument("--labeler-temperature", type=number_option(float, low=0), default=0.0,
                         help="gold labeler's Plackett-Luce temperature: 0 = the gold order; "
                         "higher disagrees more (about 0.4: InstructGPT's 73%% agreement, on the "
                         "tiny SFT policy's answers); the agreement is reported")
    collect.add_argument("--seed", type=seed_option, default=0,
                         help="seed of the sampling and of the labeler's noise")
    collect.set_defaults(handler=_lazy("pipeline.commands.collect", "cmd_collect"))


def _add_score(commands) -> None:
    score = commands.add_parser("score", help="score answers with a reward model",
                                description="Score answers with a reward model: a table for "
                                "--prompt/--response, or accuracy and disagreements for --data.")
    score.add_argument("ref", help="reward model reference (registry or path)")
    score.add_argument("--prompt", help="the prompt the --response answers answer")
    score.add_argument("--response", action="append", default=[], help="repeat for each answer")
    score.add_argument("--data", help="ranked JSONL file (any accepted reward format)")
    score.add_argument("--worst", type=number_option(int, low=0), default=5,
                       help="prompts shown where the model disagrees most with the labels")
    score.add_argument("--plot", help="write a PNG of the score distribution per rank")
    score.add_argument("--json", action="store_true", help=JSON_HELP)
    score.set_defaults(handler=_lazy("pipeline.commands.score", "cmd_score"))


def _add_pipeline(commands) -> None:
    pipe = commands.add_parser("pipeline", help="run the stages in order")
    sub = pipe.add_subparsers(title="pipeline commands", metavar="ACTION")
    run = sub.add_parser("run", help="run pretrain → sft → reward → ppo (reusing finished stages)")
    run.add_argument("config", help="pipeline YAML (e.g. configs/tiny/pipeline.yaml) or the "
                                    "name of a shipped preset (tiny, small)")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="STAGE.KEY=VALUE overrides a stage's config, KEY=VALUE the pipeline's")
    run.add_argument("--from", dest="from_stage", help="start at this stage")
    run.add_argument("--only", help="run only this stage")
    run.add_argument("--restart", action="store_true", help="train every selected stage anew")
    run.set_defaults(handler=_lazy("pipeline.commands.chain", "cmd_pipeline_run"))
    resume = commands.add_parser("resume", help="continue the most recent interrupted run or "
                                 "pipeline (or the one named)")
    resume.add_argument("run", nargs="?", help="run or pipeline id (default: the most recent "
                        "interrupted one)")
    resume.set_defaults(handler=_lazy("pipeline.commands.chain", "cmd_resume"))
    report = commands.add_parser("report", help="a report card (Markdown, PNG plots, HTML)")
    report.add_argument("ref", help="a pipeline or run reference")
    report.add_argument("--out", help="output directory (default: HOME/reports/RUN)")
    report.set_defaults(handler=_lazy("pipeline.commands.report", "cmd_report"))


def _add_checkpoint_tools(commands) -> None:
    chat = commands.add_parser("chat", help="talk to a checkpoint in the terminal")
    chat.add_argument("ref", help=MODEL_REF_HELP)
    chat.add_argument("--reward", help="show this reward model's score of each answer")
    chat.add_argument("--temperature", type=temperature_option, default=0.7, help="0 = greedy")
    chat.add_argument("--top-k", type=top_k_option, default=0, help="0 = off")
    chat.add_argument("--max-new-tokens", type=max_new_tokens_option, default=96,
                      help="answer length limit")
    chat.set_defaults(handler=_lazy("pipeline.commands.chat", "cmd_chat"))
    generate = commands.add_parser("generate", help="sample answers for scripts")
    generate.add_argument("ref", help=MODEL_REF_HELP)
    generate.add_argument("--prompt", required=True, help="the prompt to answer")
    generate.add_argument("--n", type=number_option(int, low=1, high=100_000), default=1,
                          help="answers to sample")
    generate.add_argument("--temperature", type=temperature_option, default=0.7, help="0 = greedy")
    generate.add_argument("--top-k", type=top_k_option, default=0, help="0 = off")
    generate.add_argument("--max-new-tokens", type=max_new_tokens_option, default=96,
                          help="answer length limit")
    generate.add_argument("--seed", type=seed_option, default=0, help="sampling seed")
    generate.add_argument("--json", action="store_true", help=JSON_HELP)
    generate.set_defaults(handler=_lazy("pipeline.commands.chat", "cmd_generate"))
    label = commands.add_parser(
        "label", help="rank sampled answers in a local web page (reward data), and chat",
        description="Serve a page on this machine: for each prompt, rank K answers sampled from "
        "the policy; each ranking is appended to --out at once, in the reward stage's ranked "
        "format. Reopening continues after the prompts already done. A chat tab turns thumbs "
        "and regenerations into pairwise rows in --feedback-out.")
    label.add_argument("--policy", required=True, help="the model that answers (run id, "
                       "STAGE:latest, alias, pipeline, directory)")
    label.add_argument("--reward", help="show this reward model's scores after each ranking")
    label.add_argument("--prompts", required=True, help="JSONL of {\"prompt\": text or chat "
                       "messages}")
    label.add_argument("--out", required=True, help="ranked JSONL written (appended to)")
    label.add_argument("--feedback-out", help="chat pairs JSONL (default: OUT's name with "
                       ".chat.jsonl)")
    label.add_argument("--k", type=number_option(int, low=2, high=9), default=4,
                       help="answers per prompt (2-9: keys 1..9 place them)")
    label.add_argument("--temperature", type=temperature_option, default=1.0,
                       help="sampling temperature of the answers")
    label.add_argument("--top-k", type=top_k_option, default=0, help="0 = off")
    label.add_argument("--max-new-tokens", type=max_new_tokens_option, default=96,
                       help="answer length limit")
    label.add_argument("--seed", type=seed_option, default=0, help="sampling seed")
    label.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this "
                       "machine only); any other serves a team: the page needs the secret token "
                       "of the link printed at start, and every row names its labeler")
    label.add_argument("--rankings-per-prompt", type=number_option(int, low=1, high=100),
                       default=1, help="labelers who rank each prompt (2 or more measures the "
                       "agreement between labelers)")
    label.add_argument("--port", type=number_option(int, low=0, high=65535), default=8080,
                       help="0 picks a free port")
    label.set_defaults(handler=_lazy("pipeline.commands.label.server", "cmd_label"))
    export = commands.add_parser("export", help="write a checkpoint as a plain HF directory")
    export.add_argument("ref", help=MODEL_REF_HELP)
    export.add_argument("out", help="directory to write")
    export.add_argument("--merge", action="store_true", help="fold a LoRA adapter into the weights")
    export.set_defaults(handler=_lazy("pipeline.commands.export", "cmd_export"))


def _cmd_data_world(args) -> int:
    from pathlib import Path

    from pipeline.guard import output_directory_problem
    from pipeline.world.farm import write_world
    problem = output_directory_problem(Path(args.out))
    if problem:
        raise UserError(f"--out {args.out}: cannot write there ({problem}); choose a directory")
    files = write_world(Path(args.out), seed=args.seed, size=args.size, k=args.k)
    for name, path in sorted(files.items()):
        print(f"{name}: {path}")
    return 0


def _cmd_data_validate(args) -> int:
    from pipeline.data.validate import describe, validate
    print(describe(args.file, validate(args.file, args.stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
