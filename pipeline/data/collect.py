"""Reward data from the policy's own answers: sample K answers per prompt, have a labeler rank them.

Step 2 of the recipe ("a prompt and several model outputs are sampled; a labeler ranks the outputs
from best to worst"). `collect` samples with the settings PPO samples with (so the reward model
learns to judge the answers PPO will show it), batched with the KV cache, and hands each prompt's
answers to a labeler (`pipeline.labelers`). `write_collected` writes:

    OUT             ranked rows {"prompt", "responses", "ranking"} (reward_data/README.md) that
                    `rlhf run reward data.train_files=[OUT]` reads; with the `people` labeler the
                    rows have no ranking yet and `rlhf label --prompts OUT` shows their answers
    OUT.provenance  JSON: the policy (reference, path, run, fingerprint), the sampling settings, the
                    labeler and its agreement with gold, what was counted, and OUT's fingerprint;
                    its suffix keeps it out of a directory of reward files

What cannot be ranked is counted, never silent: an empty answer or the same text twice is left out
of its prompt, and a prompt with fewer than two different answers (or, ranked, with every answer
tied) is left out of the file. Answers that never emitted EOS are kept and counted; a policy that
ends none of its answers is an error (it is not a chat model, or max_new_tokens is too short).

`cached_collection` is how the reward stage collects inside a pipeline: once per policy, prompts
and settings, into the registry home's data cache (`HOME/data/collected/KEY/`, a committed
directory like the world's), so that rerunning a finished pipeline samples nothing again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.data.fingerprint import fingerprint_files
from pipeline.errors import UserError
from pipeline.generation import SamplingConfig, sample_answers
from pipeline.registry import commit_directory, directory_problems

PROVENANCE_SUFFIX = ".provenance"
COLLECTED_NAME = "policy_answers.jsonl"


@dataclass
class CollectCounts:
    prompts: int = 0               # prompts sampled
    answers: int = 0               # answers sampled (prompts × K)
    unended: int = 0               # answers that reached max_new_tokens without EOS (kept)
    empty: int = 0                 # empty answers, left out
    repeated: int = 0              # answers equal to an earlier one of the same prompt, left out
    too_few_answers: int = 0       # prompts left out: fewer than two different answers
    all_tied: int = 0              # prompts left out: the labeler tied every answer
    rows: int = 0                  # rows written


@dataclass
class Collected:
    rows: list[dict] = field(default_factory=list)
    counts: CollectCounts = field(default_factory=CollectCounts)


def collect(model, tokenizer, prompts: list, k: int, sampling: SamplingConfig, labeler, *,
            seed: int = 0, max_prompt_tokens: int = 96) -> Collected:
    """K answers per prompt from `model`, ranked by `labeler` (None rankings stay unranked)."""
    check_request(prompts, k, labeler)
    repeated = [prompt for prompt in prompts for _ in range(k)]
    answers = sample_answers(model, tokenizer, repeated, sampling, seed=seed,
                             max_prompt_tokens=max_prompt_tokens, progress="collect: sample answers")
    result = Collected(counts=CollectCounts(prompts=len(prompts), answers=len(answers),
                                            unended=sum(not a.ended for a in answers)))
    if result.counts.unended == len(answers):
        raise UserError(f"the policy ended none of its {len(answers)} answers within "
                        f"max_new_tokens={sampling.max_new_tokens}: it never emits EOS (a pretrain "
                        f"checkpoint?); collect from a fine-tuned policy such as sft:latest, or "
                        f"raise the answer length")
    for index, prompt in enumerate(prompts):
        texts = distinct_texts([a.text for a in answers[index * k:(index + 1) * k]], result.counts)
        add_row(result, prompt, texts, labeler)
    return result


def check_request(prompts: list, k: int, labeler) -> None:
    """What can be refused before a model is loaded: K, an empty prompt list, and prompts the
    labeler must not see."""
    if k < 2:
        raise UserError(f"k={k} answers per prompt: a ranking needs at least 2; ask for 2 or more")
    if not prompts:
        raise UserError("no prompts to collect answers for; give a prompts file with at least "
                        "one {\"prompt\": ...} row")
    labeler.check_prompts(prompts)


def distinct_texts(texts: list[str], counts: CollectCounts) -> list[str]:
    """The non-empty answers, each text once (an answer cannot be ranked against itself)."""
    kept: list[str] = []
    for text in texts:
        if not text:
            counts.empty += 1
        elif text in kept:
            counts.repeated += 1
        else:
            kept.append(text)
    return kept


def add_row(result: Collected, prompt, texts: list[str], labeler) -> None:
    if len(texts) < 2:
        result.counts.too_few_answers += 1
        return
    ranking = labeler.rank(prompt, texts)
    if ranking is not None and len(ranking) == 1:  # one tie group: no pair to learn from
        result.counts.all_tied += 1
        return
    row = {"prompt": prompt, "responses": texts}
    if ranking is not None:
        row["ranking"] = ranking
    result.rows.append(row)
    result.counts.rows += 1


def describe(counts: CollectCounts, labeler_report: dict) -> str:
    """One paragraph: what was written and what was left out, and the labeler's agreement."""
    text = (f"collect: {counts.rows} rows from {counts.prompts} prompts × "
            f"{counts.answers // max(counts.prompts, 1)} answers; {counts.unended} answers never "
            f"ended (kept); left out: {counts.empty} empty and {counts.repeated} repeated answers, "
            f"{counts.too_few_answers} prompts with fewer than 2 different answers, "
            f"{counts.all_tied} prompts with every answer tied")
    agreement = labeler_report.get("agreement_with_gold")
    if agreement is not None:
        text += (f"\ncollect: labeler {labeler_report['name']} (temperature "
                 f"{labeler_report['temperature']:g}) agrees with the gold order on "
                 f"{agreement:.3f} of {labeler_report['pairs']} pairs")
    elif labeler_report["name"] == "people":
        text += "\ncollect: unranked; rank them with `rlhf label --prompts OUT --out RANKED`"
    return text


def write_collected(out: Path, collected: Collected, provenance: dict) -> Path:
    """Write OUT and OUT.provenance, each whole or not at all (temp file, fsync, rename)."""
    lines = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
                    for row in collected.rows)
    write_atomically(out, lines)
    sidecar = out.with_name(out.name + PROVENANCE_SUFFIX)
    record = {**provenance, "counts": asdict(collected.counts),
              "fingerprint": fingerprint_files(out)}
    write_atomically(sidecar, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return sidecar


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_provenance(out: str | Path) -> dict:
    """The sidecar of a collected file."""
    sidecar = Path(out).with_name(Path(out).name + PROVENANCE_SUFFIX)
    return json.loads(sidecar.read_text(encoding="utf-8"))


def cached_collection(registry, key: dict, make: Callable[[], tuple[Collected, dict]]) -> Path:
    """The collected file for `key` (what the answers depend on: the policy, the prompts, the
    sampling and labeling settings) in the registry home's data cache, made by `make()` →
    (collected, provenance) the first time only, as a committed directory. Rerunning a finished
    pipeline therefore samples nothing again."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = registry.data_dir() / "collected" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".collect.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes: one samples, the other waits and reads
        if directory_problems(target):
            collected, provenance = make()
            commit_directory(target, lambda tmp: write_collected(
                tmp / COLLECTED_NAME, collected, {**provenance, "key": key}))
    return target / COLLECTED_NAME
