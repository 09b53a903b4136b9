"""A catalogue of bad inputs, chosen systematically: every command and option, every config field
type, every kind of path, every kind of model directory, every data format with each of its fields
wrong, every registry reference form, and homes that are files, read-only, full or moved.

Every row is one `rlhf` command and a fragment its message must contain. Each must fail the same
way: exit code 2, exactly one (non-blank) line on stderr, no traceback, and every file of the
registry home byte-for-byte unchanged — the home already holds completed pretrain and reward
runs, so a stray registration, status change or metric would show; a home that did not exist
must still not exist, and no pickle may have run. Rows run in this process (most fail in
validation, before a model loads), sharing one set of model directories (`model_dirs`); a crash
instead of a clean exit fails the row. Two faults are real where they can be: "unprivileged" runs
the command as the user nobody (an unreadable file, a read-only home), "disk_full" makes every
registry write fail as a full disk does; "no_wandb" hides an installed tracker package.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults import file_digests
from model_dirs import PICKLE_MARKER, build_model_dirs
from pipeline.registry import Registry
from stages import STAGES

pytestmark = pytest.mark.reliability

BAD_FILES: dict[str, bytes] = {
    # configs
    "syntax.yaml": b"train: [1, 2\n",
    "list.yaml": b"- train\n- lr\n",
    "latin1.yaml": b"seed: 0  # caf\xe9\n",
    "duplicate.yaml": b"train:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n",
    "nan.yaml": b"train:\n  lr: .nan\n",
    # text corpora (pretrain)
    "array.jsonl": b'{"text": "a"}\n["text", "b"]\n',
    "bom_line2.jsonl": '{"text": "a"}\n\ufeff{"text": "b"}\n'.encode(),
    "empty.jsonl": b"",
    "latin1.jsonl": b'{"text": "caf\xe9"}\n',
    "huge_line.jsonl": b'{"text": "' + b"a" * 10_000_000 + b'"}\n',
    "nan.jsonl": b'{"text": NaN}\n',
    "no_text.jsonl": b'{"content": "x"}\n',
    "number.jsonl": b'{"text": 3}\n',
    "truncated.jsonl": b'{"text": "a"\n',
    "crlf.jsonl": b'{"text": "a"}\r\n{"text": "b"}\r\n{"text": "c"\r\n',
    "table.csv": b"text\nhello\n",
    "blank.txt": b"\n\n   \n",
    "no_data/readme.md": b"notes",
    "corpus_ok.jsonl": b'{"text": "Three chickens have 6 legs."}\n' * 50,
    "deep.jsonl": b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    # JSON arrays (the whole file one array, as LLaMA-Factory's Alpaca files)
    "array_of_numbers.json": b'[\n {"text": "a"},\n 3\n]\n',
    "array_missing_comma.json": b'[\n {"text": "a"}\n {"text": "b"}\n]\n',
    "array_then_text.json": b'[{"text": "a"}]\n{"text": "b"}\n',
    # SFT conversations, each format with a field wrong
    "sft_no_answer.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n',
    "sft_role.jsonl": b'{"messages": [{"role": "robot", "content": "hi"}, '
                      b'{"role": "assistant", "content": "x"}]}\n',
    "sft_not_list.jsonl": b'{"messages": "hi"}\n',
    "sft_turn_not_object.jsonl": b'{"messages": ["hi", "there"]}\n',
    "sft_content_number.jsonl": b'{"messages": [{"role": "user", "content": 2}, '
                                b'{"role": "assistant", "content": "x"}]}\n',
    "sft_empty_answer.jsonl": b'{"prompt": "hi", "completion": "  "}\n',
    "sft_prompt_null.jsonl": b'{"prompt": null, "completion": "x"}\n',
    "sft_alpaca_instruction_number.jsonl": b'{"instruction": 5, "output": "x"}\n',
    "sft_alpaca_input_list.jsonl": b'{"instruction": "a", "input": ["b"], "output": "x"}\n',
    "sft_alpaca_no_output.jsonl": b'{"instruction": "a", "response": "x"}\n',
    "sft_sharegpt_role.jsonl": b'{"conversations": [{"from": "human", "value": "hi"}, '
                               b'{"from": "bot", "value": "x"}]}\n',
    "sft_sharegpt_no_value.jsonl": b'{"conversations": [{"from": "human", "text": "hi"}]}\n',
    "sft_control_token.jsonl": b'{"prompt": "hi <|end|> there", "completion": "x"}\n',
    "sft_ok.jsonl": b'{"messages": [{"role": "user", "content": "hi"}, '
                    b'{"role": "assistant", "content": "hello"}]}\n',
    # ranked answers (reward), each format with a field wrong
    "ranked_out_of_range.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}\n',
    "ranked_repeat.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}\n',
    "ranked_one.jsonl": b'{"prompt": "p", "responses": ["a"], "ranking": [0]}\n',
    "ranked_same_text.jsonl": b'{"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}\n',
    "ranked_not_list.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": "0,1"}\n',
    "ranked_entry_text.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": ["0", 1]}\n',
    "ranked_missing_index.jsonl": b'{"prompt": "p", "responses": ["a", "b", "c"], '
                                  b'"ranking": [0, 1]}\n',
    "ranked_empty_group.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": [[], 0, 1]}\n',
    "ranked_responses_text.jsonl": b'{"prompt": "p", "responses": "a b", "ranking": [0, 1]}\n',
    "ranked_empty_response.jsonl": b'{"prompt": "p", "responses": ["a", " "], "ranking": [0, 1]}\n',
    "ranked_prompt_number.jsonl": b'{"prompt": 7, "responses": ["a", "b"], "ranking": [0, 1]}\n',
    "scored_nan.jsonl": b'{"prompt": "p", "responses": [{"text": "a", "score": NaN}, '
                        b'{"text": "b", "score": 1}]}\n',
    "scored_text_score.jsonl": b'{"prompt": "p", "responses": [{"text": "a", "score": "high"}, '
                               b'{"text": "b", "score": 1}]}\n',
    "scored_mixed.jsonl": b'{"prompt": "p", "responses": [{"text": "a", "score": 2}, '
                          b'{"text": "b", "rank": 1}]}\n',
    "scored_huge.jsonl": b'{"prompt": "p", "responses": [{"text": "a", "score": 1e999}, '
                         b'{"text": "b", "score": 1}]}\n',
    "pairwise_half.jsonl": b'{"prompt": "p", "chosen": "a"}\n',
    "pairwise_number.jsonl": b'{"prompt": "p", "chosen": 1, "rejected": "b"}\n',
    "pairwise_same.jsonl": b'{"prompt": "p", "chosen": "a", "rejected": "a"}\n',
    "transcripts_no_mark.jsonl": b'{"chosen": "Human: hi Assistant: a", '
                                 b'"rejected": "Human: hi Assistant: b"}\n',
    "transcripts_differ.jsonl": b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", '
                                b'"rejected": "\\n\\nHuman: yo\\n\\nAssistant: b"}\n',
    "transcripts_human_last.jsonl": b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a\\n\\nHuman: ?", '
                                    b'"rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}\n',
    "transcript_text_first.jsonl": b'{"chosen": "Hi there\\n\\nHuman: hi\\n\\nAssistant: a"}\n',
    "ultrafeedback_unscored.jsonl": b'{"instruction": "i", "completions": [{"response": "a", '
                                    b'"overall_score": 1}, {"response": "b", "annotations": {}}]}\n',
    # prompt files (ppo, gold evals, label)
    "prompts_empty_prompt.jsonl": b'{"prompt": "  "}\n',
    "prompts_no_prompt.jsonl": b'{"question": "Legs?"}\n',
    "prompts_ok.jsonl": b'{"prompt": "How many legs do two cows have?"}\n',
    "prompts_held_out.jsonl": b'{"prompt": "How many legs do 2 cows have?"}\n'
                              b'{"prompt": "How many legs do 3 chickens have?"}\n',
    # registry homes
    "garbage_home/registry.db": b"this is not a database\n" * 64,
    "empty_home/.keep": b"",
    "db_is_directory/registry.db/.keep": b"",
    "a_file": b"not a directory",
}

# Paths that are not regular files, made by `special_paths`: (kind, target).
SPECIAL_PATHS = {
    "fifo.jsonl": ("fifo", None),
    "device.jsonl": ("symlink", "/dev/zero"),
    "loop.jsonl": ("symlink", "loop.jsonl"),
    "dangling.jsonl": ("symlink", "gone.jsonl"),
    "sparse.jsonl": ("sparse", 10 * 2**30),   # 10 GiB of holes: as large as a file gets
    "sparse.txt": ("sparse", 10 * 2**30),
    "sparse.yaml": ("sparse", 2**30),
}


def special_paths(bad: Path) -> None:
    for name, (kind, target) in SPECIAL_PATHS.items():
        path = bad / name
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "symlink":
            path.symlink_to(target)
        else:
            with path.open("wb") as handle:
                handle.truncate(target)


@dataclass
class Row:
    """One bad command. Placeholders: {bad} the folder of BAD_FILES and SPECIAL_PATHS, {models}
    the model directories of `model_dirs`, {run} the pretrain run id, {reward_run} a reward run,
    {unfinished} an interrupted run, {pipeline} a pipeline that never finished, {open} a folder an
    unprivileged user can read."""

    name: str
    argv: list[str]
    fragment: str
    home: str = "{home}"      # the registry home the command is given; "{empty}": none yet
    stage: str = "pretrain"   # the stage whose module must exist for the row to run
    fault: str | None = None  # "unprivileged" (run as nobody), "disk_full" (simulated ENOSPC)
    #                           or "no_wandb" (the wandb package cannot be imported)


def run_args(*extra: str) -> list[str]:
    return ["run", "pretrain", *extra]


def sft_args(*extra: str) -> list[str]:
    return ["run", "sft", "model.source={run}", *extra]


def reward_args(*extra: str) -> list[str]:
    return ["run", "reward", "model.source={run}", *extra]


def ppo_args(*extra: str) -> list[str]:
    return ["run", "ppo", "model.policy={run}", "model.reward={reward_run}", *extra]


def corpus(name: str) -> str:
    return f"data.sources=[{{bad}}/{name}]"


def sft_data(name: str) -> list[str]:
    return sft_args(f"data.train_files=[{{bad}}/{name}]")


def reward_data(name: str) -> list[str]:
    return reward_args(f"data.train_files=[{{bad}}/{name}]")


def model(name: str) -> str:
    return f"{{models}}/{name}"


GENERATE = ["generate", "{run}", "--prompt", "Legs?"]
LABEL = ["label", "--policy", "{run}", "--prompts", "{bad}/prompts_ok.jsonl", "--out",
         "{bad}/labels.jsonl"]
SCORE = ["score", "{reward_run}"]
COLLECT = ["data", "collect", "{run}", "--prompts", "{bad}/prompts_ok.jsonl", "--out",
           "{bad}/collected.jsonl"]
PIPELINE = ["pipeline", "run", "configs/tiny/pipeline.yaml"]

# Each category: what the issue asks the catalogue to cover systematically.
CATALOGUE: dict[str, list[Row]] = {
    # -- every command and option ------------------------------------------------------------
    "commands and options": [
        Row("unknown-stage", ["run", "nosuchstage"], "'nosuchstage'"),
        Row("unknown-option", run_args("--bogus"), "unrecognized arguments: --bogus"),
        Row("config-show-unknown-stage", ["config", "show", "nostage"], "unknown stage 'nostage'"),
        Row("world-k-out-of-range", ["data", "world", "--out", "{bad}/world", "--k", "12"],
            "got 12"),
        Row("world-unknown-size", ["data", "world", "--out", "{bad}/world", "--size", "huge"],
            "invalid choice: 'huge'"),
        Row("world-negative-seed", ["data", "world", "--out", "{bad}/world", "--seed", "-1"],
            "argument --seed: must be at least 0"),
        Row("world-out-is-a-file", ["data", "world", "--out", "{bad}/a_file"],
            "a_file is a file, expected a directory"),
        Row("validate-missing-file", ["data", "validate", "{bad}/gone.jsonl"],
            "gone.jsonl: file or directory not found"),
        Row("validate-bad-ranking", ["data", "validate", "{bad}/ranked_repeat.jsonl"],
            "ranked_repeat.jsonl:1: ranking repeats index 0"),
        Row("gold-score-zero-prompts", ["data", "gold-score", "{run}", "--n", "0"],
            "argument --n: must be at least 1, got 0"),
        Row("gold-score-nan-temperature", ["data", "gold-score", "{run}", "--temperature", "nan"],
            "argument --temperature: must be a finite number"),
        Row("gold-score-prompts-directory", ["data", "gold-score", "{run}", "--prompts", "{bad}"],
            "is a directory, expected a file"),
        Row("gold-score-reward-model", ["data", "gold-score", "{reward_run}"],
            "is not a causal LM"),
        Row("score-negative-worst", [*SCORE, "--data", "{bad}/ranked_repeat.jsonl", "--worst",
                                     "-1"], "argument --worst: must be at least 0"),
        Row("score-plot-not-png", [*SCORE, "--data", "{bad}/sft_ok.jsonl", "--plot", "x.jpg"],
            "name the file *.png"),
        Row("score-nothing-to-score", SCORE, "nothing to score"),
        Row("score-empty-prompt", [*SCORE, "--prompt", " ", "--response", "a"], "--prompt is empty"),
        Row("score-data-and-prompt", [*SCORE, "--data", "{bad}/sft_ok.jsonl", "--prompt", "p"],
            "give either --data FILE or --prompt"),
        Row("score-data-fifo", [*SCORE, "--data", "{bad}/fifo.jsonl"], "is a named pipe (FIFO)"),
        Row("generate-nan-temperature", [*GENERATE, "--temperature", "nan"],
            "argument --temperature: must be a finite number, got nan"),
        Row("generate-infinite-temperature", [*GENERATE, "--temperature", "inf"],
            "argument --temperature: must be a finite number"),
        Row("generate-zero-answers", [*GENERATE, "--n", "0"], "argument --n: must be at least 1"),
        Row("generate-a-billion-answers", [*GENERATE, "--n", "1000000000"],
            "argument --n: must be at most 100000"),
        Row("generate-zero-tokens", [*GENERATE, "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be at least 1"),
        Row("generate-tokens-past-context", [*GENERATE, "--max-new-tokens", "100000"],
            "leaves no room for the prompt"),
        Row("generate-negative-top-k", [*GENERATE, "--top-k", "-1"],
            "argument --top-k: must be at least 0"),
        Row("generate-seed-too-large", [*GENERATE, "--seed", str(2**40)],
            "argument --seed: must be at most 4294967295"),
        Row("generate-seed-not-a-number", [*GENERATE, "--seed", "x"],
            "argument --seed: expected an integer, got 'x'"),
        Row("chat-negative-temperature", ["chat", "{run}", "--temperature", "-1"],
            "argument --temperature: must be at least 0"),
        Row("label-k-too-large", [*LABEL, "--k", "10"], "argument --k: must be at most 9"),
        Row("label-port-out-of-range", [*LABEL, "--port", "70000"],
            "argument --port: must be at most 65535"),
        Row("label-greedy", [*LABEL, "--temperature", "0"], "nothing to rank"),
        Row("label-out-directory", ["label", "--policy", "{run}", "--prompts",
                                    "{bad}/prompts_ok.jsonl", "--out", "{bad}"],
            "is a directory; name a .jsonl file"),
        Row("label-reward-is-a-policy", [*LABEL, "--reward", "{run}"],
            "--reward: ", ),
        Row("export-out-exists", ["export", "{run}", "{bad}/a_file"], "already exists"),
        Row("export-unknown-ref", ["export", "nosuch", "{bad}/out"], "'nosuch' is not a run id"),
        Row("resume-unknown-run", ["resume", "nosuch"], "no run 'nosuch'"),
        Row("report-unknown-run", ["report", "nosuch"], "no run 'nosuch'"),
        Row("pipeline-missing-yaml", ["pipeline", "run", "{bad}/gone.yaml"], "does not exist"),
        Row("pipeline-unknown-preset", ["pipeline", "run", "tinny"],
            "tinny: no such file, and not a preset (presets: "),
        Row("pipeline-from-unknown-stage", [*PIPELINE, "--from", "sftt"],
            "--from sftt: no such stage; did you mean 'sft'?"),
        Row("pipeline-from-and-only", [*PIPELINE, "--from", "sft", "--only", "ppo"],
            "cannot be combined"),
        Row("pipeline-override-no-stage", [*PIPELINE, "trian.lr=1"],
            "'trian' is neither a stage nor a pipeline key"),
        Row("pipeline-stage-override-bad", [*PIPELINE, "sft.train.lr=-1"],
            "(stages.sft): train.lr must be more than 0"),
        Row("pipeline-rounds-on-template-data", [*PIPELINE, "rounds=2"],
            "rounds: 2 retrains the reward model on each round's policy answers"),
        Row("pipeline-zero-rounds", [*PIPELINE, "rounds=0"], "rounds must be at least 1"),
        Row("pipeline-from-a-round-not-run", [*PIPELINE, "rounds=2", "reward.data.answers=both",
                                              "--from", "ppo.3"], "--from ppo.3: no such stage"),
        Row("reward-unknown-labeler", [*PIPELINE, "reward.policy_answers.labeler=robot"],
            "policy_answers.labeler must be 'gold', got 'robot'"),
        Row("show-unknown-run", ["registry", "show", "nosuch"], "no run 'nosuch'"),
        Row("lineage-unknown-run", ["registry", "lineage", "nosuch"], "no run 'nosuch'"),
        Row("verify-unknown-run", ["registry", "verify", "nosuch"], "no run 'nosuch'"),
        Row("rm-parent-without-force", ["registry", "rm", "{run}"], "is a parent of"),
    ],
    # -- every config field type: bounds, NaN, inf, wrong type, lists, nesting ----------------
    "config fields": [
        Row("config-missing", run_args("--config", "{bad}/missing.yaml"), "does not exist"),
        Row("config-is-directory", run_args("--config", "{bad}"), "is a directory"),
        Row("config-yaml-syntax", run_args("--config", "{bad}/syntax.yaml"),
            "syntax.yaml:2: YAML syntax"),
        Row("config-top-level-list", run_args("--config", "{bad}/list.yaml"), "must be a mapping"),
        Row("config-not-utf8", run_args("--config", "{bad}/latin1.yaml"), "not UTF-8"),
        Row("config-duplicate-key", run_args("--config", "{bad}/duplicate.yaml"),
            "duplicate.yaml:4: YAML error: duplicate key 'lr' (first at line 2)"),
        Row("config-nan-in-yaml", run_args("--config", "{bad}/nan.yaml"),
            "train.lr expects a finite number"),
        Row("config-fifo", run_args("--config", "{bad}/fifo.jsonl"), "is a named pipe (FIFO)"),
        Row("config-huge", run_args("--config", "{bad}/sparse.yaml"),
            "more than the 1,000,000 such a file can be"),
        Row("unknown-key-typo", run_args("train.max_stepz=3"), "did you mean 'train.max_steps'"),
        Row("unknown-section", run_args("wandb.project=x"), "unknown key 'wandb'"),
        Row("wrong-type-deep", run_args("data.world.seed=abc"), "data.world.seed expects an integer"),
        Row("negative-lr", run_args("train.lr=-1"), "train.lr must be more than 0"),
        Row("nan-lr", run_args("train.lr=nan"), "train.lr expects a finite number"),
        Row("infinite-lr", run_args("train.lr=.inf"), "train.lr expects a finite number"),
        Row("fraction-above-one", run_args("data.eval_fraction=1.5"),
            "data.eval_fraction must be less than 1"),
        Row("float-for-int", run_args("train.max_steps=2.5"), "train.max_steps expects an integer"),
        Row("int-too-large", run_args(f"train.max_steps={10**30}"),
            "train.max_steps expects a whole number of at most"),
        Row("bool-for-int", run_args("train.max_steps=true"), "train.max_steps expects a number"),
        Row("list-for-float", run_args("train.lr=[1]"), "train.lr expects a number, got [1]"),
        Row("mapping-for-float", run_args("train.lr={a: 1}"), "train.lr expects a number"),
        Row("negative-seed", run_args("seed=-1"), "seed must be at least 0"),
        Row("seed-too-large", run_args(f"seed={2**40}"), "seed must be at most 4294967295"),
        Row("keep-last-zero", run_args("checkpoint.keep_last=0"), "checkpoint.keep_last"),
        Row("preset-unknown", run_args("model.preset=huge"), "model.preset must be"),
        Row("tracker-unknown", run_args("runtime.report_to=[comet]"), "runtime.report_to.0 must be"),
        Row("tracker-not-installed", run_args("runtime.report_to=[tensorboard, wandb]"),
            "runtime.report_to names wandb, whose package is not installed; pip install "
            "'rlhf-pipeline[wandb]'", fault="no_wandb"),
        Row("bool-not-bool", run_args("runtime.trust_remote_code=maybe"),
            "runtime.trust_remote_code expects true or false"),
        Row("section-is-scalar", run_args("train=3"), "train expects a mapping"),
        Row("list-is-string", run_args("data.sources={bad}/nan.jsonl"),
            "data.sources expects a list"),
        Row("list-of-lists", run_args("data.sources=[[a]]"), "data.sources.0 expects a string"),
        Row("override-without-value", run_args("train.lr"), "not of the form key=value"),
        Row("override-empty-key-part", run_args("train..lr=1"), "not of the form key=value"),
        Row("override-duplicate-key", run_args("train={lr: 1, lr: 2}"), "duplicate key 'lr'"),
        Row("ppo-minibatches-do-not-split", ["run", "ppo", "train.batch_size=6",
                                             "ppo.minibatches=4"],
            "does not split into ppo.minibatches=4", stage="ppo"),
        Row("sft-format-unknown", sft_args("data.format=csv"), "data.format must be", stage="sft"),
        Row("sft-columns-unknown",
            sft_args("data.columns={foo: bar}", "data.train_files=[{bad}/sft_ok.jsonl]"),
            "unknown name 'foo'", stage="sft"),
        Row("sft-longer-than-context", sft_args("data.max_length=100000"),
            "longer than the model's context", stage="sft"),
    ],
    # -- every kind of path: missing, directory, FIFO, device, loop, unreadable, huge, empty ----
    "paths": [
        Row("missing-corpus", run_args(corpus("missing.txt")),
            "missing.txt: file or directory not found"),
        Row("directory-without-data", run_args(corpus("no_data")), "holds no .jsonl"),
        Row("directory-where-file-expected",
            sft_args("data.train_files=[{bad}/sft_ok.jsonl]", "eval.prompts_file={bad}/no_data"),
            "is a directory, expected a file", stage="sft"),
        Row("fifo-corpus", run_args(corpus("fifo.jsonl")), "is a named pipe (FIFO)"),
        Row("device-corpus", run_args(corpus("device.jsonl")), "is a device, not a regular file"),
        Row("symlink-loop-corpus", run_args(corpus("loop.jsonl")), "is a symbolic link loop"),
        Row("dangling-symlink-corpus", run_args(corpus("dangling.jsonl")),
            "is a symbolic link to a missing target"),
        Row("path-through-a-file", run_args(corpus("a_file/x.jsonl")),
            "a part of the path is a file"),
        Row("name-too-long", run_args(corpus("x" * 5000 + ".jsonl")), "name too long"),
        Row("unreadable-corpus", run_args("data.sources=[{open}/unreadable.jsonl]"),
            "cannot be read (permission denied)", home="{open}/home", fault="unprivileged"),
        Row("huge-sparse-jsonl", run_args(corpus("sparse.jsonl")),
            "sparse.jsonl:1: line is longer than 1,000,000 bytes"),
        Row("huge-sparse-text", run_args(corpus("sparse.txt")),
            "sparse.txt:1: line is longer than 100,000,000 bytes"),
        Row("empty-file", run_args(corpus("empty.jsonl")), "empty.jsonl: the file has no rows"),
        Row("fifo-prompts", ppo_args("data.prompts_file={bad}/fifo.jsonl"),
            "is a named pipe (FIFO)", stage="ppo"),
        Row("label-out-fifo", ["label", "--policy", "{run}", "--prompts", "{bad}/prompts_ok.jsonl",
                               "--out", "{bad}/fifo.jsonl"], "--out {bad}/fifo.jsonl is a named pipe"),
        Row("label-prompts-symlink-loop", ["label", "--policy", "{run}", "--prompts",
                                           "{bad}/loop.jsonl", "--out", "{bad}/labels.jsonl"],
            "is a symbolic link loop"),
    ],
    # -- every kind of model directory ------------------------------------------------------
    "model directories": [
        Row("ppo-policy-is-the-reward-model", ["run", "ppo", "model.policy=reward:latest",
                                               "model.reward=reward:latest"],
            "model.policy: ", stage="ppo"),
        Row("ppo-reward-is-a-causal-lm", ["run", "ppo", "model.policy={run}", "model.reward={run}"],
            "is not a reward model", stage="ppo"),
        Row("ppo-reward-is-a-classifier", ppo_args(f"model.reward={model('classifier')}"),
            "is a sequence classifier with several labels", stage="ppo"),
        Row("ppo-reward-is-an-adapter", ppo_args(f"model.reward={model('adapter')}"),
            "it is a LoRA adapter", stage="ppo"),
        Row("ppo-policy-without-eos", ppo_args(f"model.policy={model('no_eos')}"),
            "model.policy: the tokenizer at {models}/no_eos has no EOS token", stage="ppo"),
        Row("sft-without-eos", sft_args(f"model.source={model('no_eos')}"),
            "model.source: the tokenizer at {models}/no_eos has no EOS token", stage="sft"),
        Row("reward-without-eos", reward_args(f"model.source={model('no_eos')}"),
            "has no EOS token", stage="reward"),
        Row("sft-template-without-eos", sft_args(f"model.source={model('template_without_eos')}"),
            "cannot mark answers to train on: its assistant turns do not end with the EOS token",
            stage="sft"),
        Row("reward-template-without-eos",
            reward_args(f"model.source={model('template_without_eos')}"),
            "cannot mark answers to train on", stage="reward"),
        Row("ppo-policy-template-without-eos",
            ppo_args(f"model.policy={model('template_without_eos')}"),
            "model.policy: the chat template of", stage="ppo"),
        Row("sft-longer-than-model-context", sft_args(f"model.source={model('short_context')}"),
            "data.max_length=256 is longer than the model's context of 64 tokens", stage="sft"),
        Row("reward-longer-than-model-context",
            reward_args(f"model.source={model('short_context')}", "data.max_length=128"),
            "data.max_length=128 is longer than the model's context of 64 tokens", stage="reward"),
        Row("sft-from-reward-model", sft_args(f"model.source={model('reward')}"),
            "model.source: ", stage="sft"),
        Row("sft-from-backbone", sft_args(f"model.source={model('backbone')}"),
            "without a causal language-model head", stage="sft"),
        Row("sft-from-masked-lm", sft_args(f"model.source={model('masked_lm')}"),
            "without a causal language-model head", stage="sft"),
        Row("sft-truncated-weights", sft_args(f"model.source={model('truncated')}"),
            "model.safetensors is truncated", stage="sft"),
        Row("sft-pickle-as-safetensors", sft_args(f"model.source={model('pickle_as_safetensors')}"),
            "is a pickle (torch.save), not safetensors", stage="sft"),
        Row("sft-pickled-bin", sft_args(f"model.source={model('pickled_bin')}"),
            "pytorch_model.bin holds more than tensors", stage="sft"),
        Row("sft-no-weights", sft_args(f"model.source={model('no_weights')}"),
            "holds no weights", stage="sft"),
        Row("sft-quantized", sft_args(f"model.source={model('quantized')}"),
            "holds a quantized model", stage="sft"),
        Row("sft-remote-code", sft_args(f"model.source={model('remote_code')}"),
            "ships its own model code", stage="sft"),
        Row("reward-quantized", reward_args(f"model.source={model('quantized')}"),
            "holds a quantized model", stage="reward"),
        Row("reward-remote-code", reward_args(f"model.source={model('remote_code')}"),
            "ships its own model code", stage="reward"),
        Row("ppo-policy-quantized", ppo_args(f"model.policy={model('quantized')}"),
            "holds a quantized model", stage="ppo"),
        Row("ppo-policy-remote-code", ppo_args(f"model.policy={model('remote_code')}"),
            "ships its own model code", stage="ppo"),
        Row("sft-no-config", sft_args(f"model.source={model('no_config')}"),
            "is not a model directory: config.json file not found", stage="sft"),
        Row("sft-bad-config", sft_args(f"model.source={model('bad_config')}"),
            "config.json: not valid JSON", stage="sft"),
        Row("sft-no-tokenizer", sft_args(f"model.source={model('no_tokenizer')}"),
            "cannot load a tokenizer", stage="sft"),
        Row("sft-lora-on-adapter", sft_args(f"model.source={model('adapter')}",
                                            "lora.enabled=true"), "is a LoRA adapter", stage="sft"),
        Row("reward-from-reward-model", reward_args(f"model.source={model('reward')}"),
            "is not a causal LM", stage="reward"),
        Row("pretrain-continues-reward-model", run_args(f"model.source={model('reward')}"),
            "is not a causal LM"),
        Row("source-is-not-a-model", run_args("model.source={bad}/no_data"),
            "is not a model directory"),
        Row("pretrain-fp16-on-cpu", run_args("model.dtype=fp16", "runtime.cpu=true"),
            "model.dtype=fp16 needs a GPU"),
        Row("sft-fp16-on-cpu", sft_args("model.dtype=fp16", "runtime.cpu=true"),
            "model.dtype=fp16 needs a GPU", stage="sft"),
        Row("ppo-fp16-on-cpu", ppo_args("model.dtype=fp16", "runtime.cpu=true"),
            "model.dtype=fp16 needs a GPU", stage="ppo"),
        Row("model-dtype-unknown", run_args("model.dtype=int8"),
            "model.dtype must be 'auto', 'fp32', 'bf16' or 'fp16'"),
        Row("sharding-unknown", run_args("runtime.sharding=zero3"),
            "runtime.sharding must be 'none' or 'fsdp'"),
        Row("sharding-with-lora", sft_args("runtime.sharding=fsdp", "lora.enabled=true"),
            "runtime.sharding=fsdp does not support LoRA yet", stage="sft"),
        Row("sharding-with-ema", ppo_args("runtime.sharding=fsdp", "ema.decay=0.9"),
            "runtime.sharding=fsdp does not support the EMA of the policy yet", stage="ppo"),
        # A layer class the model lacks is refused as the stage checks its model, before the run
        # is registered (no process group needed: the check reads the model's classes).
        Row("fsdp-layer-not-in-preset", run_args("runtime.sharding=fsdp",
                                                 "runtime.fsdp_layers=[GPT2Block]"),
            "model.preset: runtime.fsdp_layers names GPT2Block, which LlamaForCausalLM does not "
            "contain"),
        Row("fsdp-layer-not-in-sft-source", sft_args("runtime.sharding=fsdp",
                                                     "runtime.fsdp_layers=[GPT2Block]"),
            "model.source: runtime.fsdp_layers names GPT2Block", stage="sft"),
        Row("fsdp-layer-not-in-reward-source", reward_args("runtime.sharding=fsdp",
                                                           "runtime.fsdp_layers=[BertLayer]"),
            "model.source: runtime.fsdp_layers names BertLayer", stage="reward"),
        Row("fsdp-layer-not-in-policy", ppo_args("runtime.sharding=fsdp",
                                                 "runtime.fsdp_layers=[GPT2Block]"),
            "model.policy: runtime.fsdp_layers names GPT2Block", stage="ppo"),
        Row("generate-from-reward-model", ["generate", "{reward_run}", "--prompt", "Legs?"],
            "is not a causal LM"),
        Row("generate-truncated", ["generate", model("truncated"), "--prompt", "Legs?"],
            "is truncated"),
        Row("chat-reward-is-a-policy", ["chat", "{run}", "--reward", "{run}"],
            "--reward: "),
        Row("score-with-a-causal-lm", ["score", "{run}", "--prompt", "p", "--response", "a"],
            "is not a reward model"),
        Row("label-policy-is-a-reward-model", ["label", "--policy", "{reward_run}", "--prompts",
                                               "{bad}/prompts_ok.jsonl", "--out",
                                               "{bad}/labels.jsonl"], "--policy: "),
        Row("collect-from-a-reward-model", ["data", "collect", "{reward_run}", "--prompts",
                                            "{bad}/prompts_ok.jsonl", "--out",
                                            "{bad}/collected.jsonl"], "POLICY: "),
        Row("collect-policy-never-ends", [*COLLECT, "generation.max_new_tokens=2",
                                          "generation.min_new_tokens=2"],
            "the policy ended none of its 4 answers"),
        Row("collect-one-answer", [*COLLECT, "--k", "1"], "a ranking needs at least 2"),
        Row("collect-no-prompts", ["data", "collect", "{run}", "--prompts", "{bad}/empty.jsonl",
                                   "--out", "{bad}/collected.jsonl"], "the file has no rows"),
        Row("collect-unknown-labeler", [*COLLECT, "--labeler", "robot"],
            "unknown labeler 'robot'; choose one of: gold, people"),
        Row("collect-held-out-prompt", ["data", "collect", "{run}", "--prompts",
                                        "{bad}/prompts_held_out.jsonl", "--out",
                                        "{bad}/collected.jsonl"],
            "prompt 2 asks about held-out legs (3 chicken)"),
    ],
    # -- every data format with each of its fields wrong ------------------------------------
    "data formats": [
        Row("jsonl-line-is-array", run_args(corpus("array.jsonl")),
            "array.jsonl:2: expected a JSON object"),
        Row("bom-inside-file", run_args(corpus("bom_line2.jsonl")),
            "bom_line2.jsonl:2: not valid JSON"),
        Row("invalid-utf8", run_args(corpus("latin1.jsonl")), "latin1.jsonl:1: not valid UTF-8"),
        Row("10mb-line", run_args(corpus("huge_line.jsonl")),
            "huge_line.jsonl:1: line is longer than"),
        Row("nan-literal", run_args(corpus("nan.jsonl")), "nan.jsonl:1: NaN is not allowed"),
        Row("missing-column", run_args(corpus("no_text.jsonl")),
            "no_text.jsonl:1: missing column 'text'"),
        Row("text-is-number", run_args(corpus("number.jsonl")), "number.jsonl:1: text must be text"),
        Row("truncated-json", run_args(corpus("truncated.jsonl")),
            "truncated.jsonl:1: not valid JSON"),
        Row("crlf-error-names-line", run_args(corpus("crlf.jsonl")),
            "crlf.jsonl:3: not valid JSON"),
        Row("nested-too-deeply", run_args(corpus("deep.jsonl")), "deep.jsonl:1: JSON is nested"),
        Row("unsupported-suffix", run_args(corpus("table.csv")), "unsupported file type '.csv'"),
        Row("blank-text-corpus", run_args(corpus("blank.txt")), "the corpus holds no text"),
        Row("json-array-element-not-object", run_args(corpus("array_of_numbers.json")),
            "array_of_numbers.json:3: expected a JSON object {...} in the array"),
        Row("json-array-missing-comma", run_args(corpus("array_missing_comma.json")),
            "array_missing_comma.json:3: not valid JSON (expected ',' or ']'"),
        Row("json-array-then-text", run_args(corpus("array_then_text.json")),
            "text after the JSON array's closing ']'"),
        Row("sft-no-assistant-turn", sft_data("sft_no_answer.jsonl"),
            "sft_no_answer.jsonl:1: the conversation has no assistant turn", stage="sft"),
        Row("sft-unknown-role", sft_data("sft_role.jsonl"),
            "sft_role.jsonl:1: unknown role 'robot'", stage="sft"),
        Row("sft-messages-not-list", sft_data("sft_not_list.jsonl"),
            "sft_not_list.jsonl:1: messages must be a non-empty list", stage="sft"),
        Row("sft-turn-not-object", sft_data("sft_turn_not_object.jsonl"),
            "sft_turn_not_object.jsonl:1: messages[0] must be an object", stage="sft"),
        Row("sft-content-number", sft_data("sft_content_number.jsonl"),
            "sft_content_number.jsonl:1: messages[0].content must be text", stage="sft"),
        Row("sft-empty-answer", sft_data("sft_empty_answer.jsonl"),
            "sft_empty_answer.jsonl:1: assistant turn 1", stage="sft"),
        Row("sft-prompt-null", sft_data("sft_prompt_null.jsonl"),
            "sft_prompt_null.jsonl:1: prompt must be text, found null", stage="sft"),
        Row("alpaca-instruction-number", sft_data("sft_alpaca_instruction_number.jsonl"),
            "sft_alpaca_instruction_number.jsonl:1: instruction must be text", stage="sft"),
        Row("alpaca-input-list", sft_data("sft_alpaca_input_list.jsonl"),
            "sft_alpaca_input_list.jsonl:1: input must be text", stage="sft"),
        Row("alpaca-without-output", sft_args("data.format=alpaca",
                                              "data.train_files=[{bad}/sft_alpaca_no_output.jsonl]"),
            "missing column 'output'", stage="sft"),
        Row("sharegpt-unknown-role", sft_data("sft_sharegpt_role.jsonl"),
            "sft_sharegpt_role.jsonl:1: unknown role 'bot'", stage="sft"),
        Row("sharegpt-turn-without-value", sft_data("sft_sharegpt_no_value.jsonl"),
            "conversations[0] must be an object with 'from' and 'value'", stage="sft"),
        Row("sft-control-token-in-text", sft_data("sft_control_token.jsonl"),
            "sft_control_token.jsonl:1: message 1 (user) contains the special token", stage="sft"),
        Row("ranking-index-out-of-range", reward_data("ranked_out_of_range.jsonl"),
            "ranked_out_of_range.jsonl:1: ranking index 2 is out of range", stage="reward"),
        Row("ranking-repeats-index", reward_data("ranked_repeat.jsonl"),
            "ranked_repeat.jsonl:1: ranking repeats index 0", stage="reward"),
        Row("ranking-one-response", reward_data("ranked_one.jsonl"),
            "ranked_one.jsonl:1: 1 response(s)", stage="reward"),
        Row("same-answer-two-ranks", reward_data("ranked_same_text.jsonl"),
            "ranked_same_text.jsonl:1: responses[0] and responses[1] are the same text",
            stage="reward"),
        Row("ranking-not-a-list", reward_data("ranked_not_list.jsonl"),
            "ranked_not_list.jsonl:1: ranking must be a list", stage="reward"),
        Row("ranking-entry-text", reward_data("ranked_entry_text.jsonl"),
            "ranking entry '0' is not a response index", stage="reward"),
        Row("ranking-missing-index", reward_data("ranked_missing_index.jsonl"),
            "ranking is missing response index(es) 2", stage="reward"),
        Row("ranking-empty-group", reward_data("ranked_empty_group.jsonl"),
            "ranking[0] is an empty group", stage="reward"),
        Row("responses-not-a-list", reward_data("ranked_responses_text.jsonl"),
            "responses must be a list, found string", stage="reward"),
        Row("response-empty", reward_data("ranked_empty_response.jsonl"),
            "responses[1] is empty", stage="reward"),
        Row("ranked-prompt-number", reward_data("ranked_prompt_number.jsonl"),
            "ranked_prompt_number.jsonl:1: prompt must be text, found number", stage="reward"),
        Row("nan-score", reward_data("scored_nan.jsonl"), "scored_nan.jsonl:1: NaN is not allowed",
            stage="reward"),
        Row("score-is-text", reward_data("scored_text_score.jsonl"),
            "responses[0] has a non-numeric score 'high'", stage="reward"),
        Row("scores-and-ranks-mixed", reward_data("scored_mixed.jsonl"),
            "responses mix 'rank' and 'score'", stage="reward"),
        Row("score-overflows-to-infinity", reward_data("scored_huge.jsonl"),
            "responses[0] has an infinite score", stage="reward"),
        Row("pairwise-without-rejected", reward_data("pairwise_half.jsonl"),
            "pairwise_half.jsonl:1: cannot tell the data format", stage="reward"),
        Row("pairwise-chosen-number", reward_data("pairwise_number.jsonl"),
            "responses[0] must be text, found number", stage="reward"),
        Row("pairwise-same-answer", reward_data("pairwise_same.jsonl"),
            "responses[0] and responses[1] are the same text", stage="reward"),
        Row("transcript-without-assistant", reward_data("transcripts_no_mark.jsonl"),
            "chosen has no '\\n\\nAssistant:' turn", stage="reward"),
        Row("transcripts-differ-before-answer", reward_data("transcripts_differ.jsonl"),
            "chosen and rejected differ before their last", stage="reward"),
        Row("transcript-ends-with-human", reward_data("transcripts_human_last.jsonl"),
            "chosen ends with a '\\n\\nHuman:' turn", stage="reward"),
        Row("sft-transcript-text-before-first-turn",
            [*sft_data("transcript_text_first.jsonl"), "data.format=transcripts"],
            "chosen does not start with a '\\n\\nHuman:' turn", stage="sft"),
        Row("ultrafeedback-completion-unscored", reward_data("ultrafeedback_unscored.jsonl"),
            "completions[1] has no 'overall_score'", stage="reward"),
        Row("prompt-file-empty-prompt", ppo_args("data.prompts_file={bad}/prompts_empty_prompt.jsonl"),
            "prompts_empty_prompt.jsonl:1: expected a non-empty text", stage="ppo"),
        Row("gold-prompts-without-prompt", ["data", "gold-score", "{run}", "--prompts",
                                            "{bad}/prompts_no_prompt.jsonl"],
            "prompts_no_prompt.jsonl:1: expected a non-empty text field 'prompt'"),
    ],
    # -- every registry reference form ------------------------------------------------------
    "references": [
        Row("ref-does-not-exist", sft_args("model.source=nosuchrun"), "'nosuchrun' is not a run id",
            stage="sft"),
        Row("ref-stage-never-ran", ["run", "sft", "model.source=sft:latest"],
            "no completed sft run", stage="sft"),
        Row("ref-unknown-stage-latest", ["run", "sft", "model.source=nostage:latest"],
            "no completed nostage run", stage="sft"),
        Row("ref-empty-latest", ["run", "sft", "model.source=:latest"], "':latest' names no stage",
            stage="sft"),
        Row("ref-step-not-committed", sft_args("model.source={run}@99"),
            "has no committed state at step 99", stage="sft"),
        Row("ref-step-without-run", ["run", "sft", "model.source=@5"],
            "reference '@5' is not a run id", stage="sft"),
        Row("ref-step-not-a-number", ["run", "sft", "model.source={run}@latest"],
            "after a run, @ takes a step number", stage="sft"),
        Row("ref-hub-name-not-cached", ["run", "sft", "model.source=nosuch-model@v2"],
            "model.source: 'nosuch-model@v2' is not a run id, alias, STAGE:latest or directory, "
            "nor a hub model (not in the local hub cache, and HF_HUB_OFFLINE is set)", stage="sft"),
        Row("ref-step-of-a-path", ["run", "sft", "model.source={bad}/no_data@3"],
            "@step works only on registry runs", stage="sft"),
        Row("ref-is-a-file", ["run", "sft", "model.source={bad}/nan.jsonl"], "is a file",
            stage="sft"),
        Row("ref-nul-byte", ["run", "sft", "model.source=a\x00b"], "empty or invalid reference",
            stage="sft"),
        Row("ref-name-too-long", ["run", "sft", "model.source=" + "r" * 5000],
            "is not a run id", stage="sft"),
        Row("ref-unfinished-run", ["run", "sft", "model.source={unfinished}"],
            "has no published model (status interrupted)", stage="sft"),
        Row("ref-unfinished-pipeline", ["generate", "{pipeline}", "--prompt", "Legs?"],
            "has not finished"),
        Row("ref-path-traversal", ["registry", "show", "../../etc/passwd"],
            "no run '../../etc/passwd'"),
        Row("rm-path-escape", ["registry", "rm", "../../etc"], "no run '../../etc'"),
        Row("alias-parent-dir", ["registry", "alias", "../evil", "{run}"],
            "invalid alias '../evil'"),
        Row("alias-absolute-path", ["registry", "alias", "/tmp/evil", "{run}"],
            "invalid alias '/tmp/evil'"),
        Row("alias-nul-byte", ["registry", "alias", "a\x00b", "{run}"], "invalid alias"),
        Row("alias-too-long", ["registry", "alias", "a" * 65, "{run}"], "invalid alias"),
        Row("alias-to-missing-run", ["registry", "alias", "best", "nosuchrun"],
            "no run 'nosuchrun' to alias"),
    ],
    # -- a home that is a file, read-only, full, moved, or not a registry ---------------------
    "homes": [
        Row("home-not-writable", ["run", "pretrain"], "is not writable",
            home="{bad}/nan.jsonl/home"),
        Row("home-is-a-file", ["run", "pretrain"], "is a file, expected a directory",
            home="{bad}/a_file"),
        Row("home-without-registry", ["registry", "show", "x"], "no registry at",
            home="{bad}/empty_home"),
        Row("registry-db-garbage", ["registry", "ls"], "cannot be used as a registry",
            home="{bad}/garbage_home"),
        Row("registry-db-is-a-directory", ["registry", "ls"], "cannot be used as a registry",
            home="{bad}/db_is_directory"),
        Row("read-only-home", ["registry", "alias", "best", "{run}"], "cannot write the registry",
            home="{open}/home", fault="unprivileged"),
        Row("read-only-new-home", ["run", "pretrain"], "is not writable",
            home="{open}/home/new", fault="unprivileged"),
        Row("home-unreachable", ["registry", "ls"], "cannot be reached (permission denied)",
            fault="unprivileged"),
        Row("full-disk-new-run", run_args(corpus("corpus_ok.jsonl")), "database or disk is full",
            fault="disk_full"),
        Row("full-disk-alias", ["registry", "alias", "best", "{run}"],
            "database or disk is full", fault="disk_full"),
        Row("home-models-deleted", ["run", "sft", "model.source={run}"], "failed verification",
            home="{no_models}", stage="sft"),
        # An empty home stays empty, whatever fails.
        Row("empty-home-bad-reference", ["run", "sft", "model.source=nosuch"],
            "'nosuch' is not a run id", home="{empty}", stage="sft"),
        Row("empty-home-bad-data", run_args(corpus("fifo.jsonl")), "is a named pipe",
            home="{empty}"),
        Row("empty-home-score", ["score", "nosuch", "--prompt", "p", "--response", "a"],
            "'nosuch' is not a run id", home="{empty}"),
        Row("empty-home-export", ["export", "nosuch", "{bad}/out"], "'nosuch' is not a run id",
            home="{empty}"),
        Row("empty-home-gold-score", ["data", "gold-score", "nosuch"], "'nosuch' is not a run id",
            home="{empty}"),
    ],
}
ROWS = [row for rows in CATALOGUE.values() for row in rows]


@pytest.fixture(scope="module")
def catalogue(chain, tmp_path_factory) -> dict[str, str]:
    """The placeholders of the rows: a home with a completed pretrain run (the chain's), a reward
    run, an interrupted run and an unfinished pipeline; the bad files; the model directories; a
    copy of the home whose published models were deleted."""
    root = tmp_path_factory.mktemp("catalogue")
    reference = chain.reference("pretrain")
    home = shutil.copytree(reference.home, root / "home")
    models = build_model_dirs(root / "models", Path(reference.model_path))
    registry = Registry(home)
    try:
        reward = add_published_run(registry, "reward", models["reward"],
                                   {"model": registry.resolve(reference.run_id)})
        unfinished = registry.create_run("sft", {}, "unfinished", parents={})
        registry.set_status(unfinished.id, "interrupted")
        pipeline = registry.create_run("pipeline", {}, "unfinished", parents={})
        registry.set_status(pipeline.id, "failed")
    finally:
        registry.close()
    no_models = shutil.copytree(home, root / "no-models")
    for model_dir in no_models.glob("runs/*/model"):
        shutil.rmtree(model_dir)
    bad = root / "bad"
    for name, content in BAD_FILES.items():
        (bad / name).parent.mkdir(parents=True, exist_ok=True)
        (bad / name).write_bytes(content)
    special_paths(bad)
    return {"{home}": str(home), "{bad}": str(bad), "{run}": reference.run_id,
            "{reward_run}": reward.id, "{unfinished}": unfinished.id, "{pipeline}": pipeline.id,
            "{models}": str(root / "models"), "{no_models}": str(no_models),
            "{empty}": str(root / "empty")}


def add_published_run(registry: Registry, stage: str, model_dir: Path, parents: dict):
    run = registry.create_run(stage, {"stage": stage}, f"{stage}-hash", parents=parents)
    registry.publish(run.id, lambda tmp: shutil.copytree(model_dir, tmp, dirs_exist_ok=True))
    return registry.get(run.id)


@pytest.fixture(scope="module")
def open_folder(catalogue):
    """A folder an unprivileged user can read but not write: a copy of the catalogue's home and
    an unreadable data file (made under /tmp, since pytest's own folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="rlhf-catalogue-"))
    folder.chmod(0o755)
    home = shutil.copytree(catalogue["{home}"], folder / "home")
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    unreadable = folder / "unreadable.jsonl"
    unreadable.write_text('{"text": "a"}\n')
    unreadable.chmod(0)
    yield str(folder)
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def unprivileged():
    """Run as the unprivileged user `nobody` (when root: root reads and writes anything)."""
    if os.geteuid() != 0:
        yield
        return
    # The interpreter's own files may be private to root (a pyenv under /root): what a command
    # imports on first use is imported now.
    for stage in STAGES.values():
        stage.load()
    os.setegid(NOBODY_GID)
    os.seteuid(NOBODY_UID)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@contextmanager
def disk_full(monkeypatch):
    """A full disk as the registry meets it: every SQLite write fails as SQLite reports ENOSPC
    ("database or disk is full"), and every file flush with OSError(ENOSPC)."""
    import pipeline.registry as registry_module

    connect = Registry._connect

    def full_connection(self):
        return FullDisk(connect(self))

    def full_flush(root):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Registry, "_connect", full_connection)
        patch.setattr(registry_module, "_fsync_tree", full_flush)
        yield


class FullDisk:
    """A SQLite connection on a full disk: reads work, the first write of a transaction fails."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE")

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith(self.WRITES):
            raise sqlite3.OperationalError("database or disk is full")
        return self.connection.execute(sql, *args)

    def executemany(self, sql: str, *args):
        return self.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.connection, name)


NOBODY_UID, NOBODY_GID = 65534, 65534


def fill(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def test_catalogue_is_large_and_names_are_unique():
    assert len({row.name for row in ROWS}) == len(ROWS)
    assert len(ROWS) >= 120


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_fails_cleanly_and_changes_nothing(row: Row, catalogue, open_folder,
                                                     in_process_cli, monkeypatch):
    values = {**catalogue, "{open}": open_folder,
              "{empty}": f"{catalogue['{empty}']}-{row.name}"}
    home = Path(fill(row.home, values))
    homes = {home, Path(catalogue["{home}"]), Path(open_folder) / "home"}
    before = homes_digest(homes)
    pickle_marker = Path(catalogue["{models}"]) / PICKLE_MARKER

    argv = ["--home", str(home), *(fill(arg, values) for arg in row.argv)]
    with fault(row.fault, monkeypatch):
        code, lines, _ = in_process_cli(argv)

    assert code == 2, lines
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {lines}"
    assert fill(row.fragment, values) in lines[0]
    assert "Traceback" not in lines[0]
    after = homes_digest(homes)
    assert not changed_files(before, after), "the registry home changed"
    if row.home == "{empty}":
        assert not home.exists(), "the empty home was created"
    assert not pickle_marker.exists(), "a pickle ran"


@contextmanager
def fault(kind: str | None, monkeypatch):
    if kind == "unprivileged":
        with unprivileged():
            yield
    elif kind == "disk_full":
        with disk_full(monkeypatch):
            yield
    elif kind == "no_wandb":
        monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
        yield
    else:
        yield


def homes_digest(homes: set[Path]) -> dict[str, str]:
    return {str(home / name): digest for home in homes if home.is_dir()
            for name, digest in file_digests(home).items()}


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys()
                  if before.get(name) != after.get(name))
