"""Data files: rows of GSM8K, MATH, verl (the authors' release) or generic {prompt, answer} ->
{id, prompt, answer}, and the rollouts schema of collect_rollouts.py. Every error names the file
and line."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterator

from plumbing.cli import DataError


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield number, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox{...}), nested braces handled; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:  # "\boxed 5": the argument runs to the next space or "$"
        rest = text[start + len("\\boxed") :].strip()
        return re.split(r"[\s$]", rest, maxsplit=1)[0] or None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None  # unbalanced braces


def row_to_example(obj: dict, where: str, default_id: str) -> dict:
    """GSM8K (question, answer with "#### N"), MATH (problem, solution with \\boxed{}), verl
    (prompt = [{"role": "user", "content"}], reward_model = {"ground_truth"}, data_source) or
    (prompt, answer) -> {id, prompt, answer} (+ skill, source)."""
    if "question" in obj and "answer" in obj:
        solution = str(obj["answer"])
        if "####" not in solution:
            raise DataError(f"{where}: GSM8K-style row has no '#### <answer>' in its answer")
        prompt, answer = obj["question"], solution.rsplit("####", 1)[1].strip().replace(",", "")
    elif "problem" in obj and "solution" in obj:
        answer = last_boxed_content(str(obj["solution"]))
        if answer is None:
            raise DataError(f"{where}: MATH-style row has no \\boxed{{...}} in its solution")
        prompt = obj["problem"]
    elif "prompt" in obj and "reward_model" in obj:
        messages, answer = obj["prompt"], (obj["reward_model"] or {}).get("ground_truth")
        roles = [m.get("role") for m in messages] if isinstance(messages, list) else None
        if roles != ["user"]:  # the system prompt is --system-prompt's
            raise DataError(f"{where}: a verl prompt must be one user message; it has {roles}")
        prompt, obj = messages[0].get("content"), {"source": obj.get("data_source")} | obj
    elif "prompt" in obj and "answer" in obj:
        prompt, answer = obj["prompt"], obj["answer"]
    else:
        raise DataError(
            f"{where}: a row needs (question, answer), (problem, solution), (prompt, answer) or "
            f"verl's (prompt, reward_model); it has {sorted(obj)}"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: empty or non-text prompt")
    if answer is None or not str(answer).strip():
        raise DataError(f"{where}: missing or empty answer")
    example = {"id": str(default_id if obj.get("id") is None else obj["id"]), "prompt": prompt}
    example["answer"] = str(answer).strip()
    return example | {key: obj[key] for key in ("source", "skill") if obj.get(key) is not None}


def load_examples(path: str | os.PathLike) -> list[dict]:
    """A .jsonl (or .parquet) data file as rows {id, prompt, answer}; ids are the row's "id", else
    "<file stem>:<line>" (a parquet file's row, from 1)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(
                f"{path}: reading .parquet needs pyarrow: .venv/bin/pip install pyarrow"
            ) from None
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            records = enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1)
        except pyarrow.ArrowException as error:
            raise DataError(f"{path}: not a readable parquet file ({error})") from None
    else:
        records = iter_jsonl(path)
    examples, seen = [], set()
    for number, obj in records:
        example = row_to_example(obj, f"{path}:{number}", f"{path.stem}:{number}")
        if example["id"] in seen:
            raise DataError(f"{path}:{number}: duplicate id {example['id']!r}")
        seen.add(example["id"])
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def load_data_files(paths: list[str]) -> list[dict]:
    """The rows of several data files, in order; ids must be unique across them."""
    examples, first_seen = [], {}
    for path in paths:
        for example in load_examples(path):
            if example["id"] in first_seen:
                raise DataError(
                    f"{path}: id {example['id']!r} already used in {first_seen[example['id']]}; "
                    "ids must be unique across the data files"
                )
            first_seen[example["id"]] = path
            examples.append(example)
    return examples


ROLLOUT_FIELDS = ("id", "prompt", "answer", "prompt_ids", "response_ids", "responses")
ROLLOUT_FIELDS += ("behavior_logprobs", "rewards", "temperature")


def check_rollout(row: dict, where: str, vocab_size: int | None = None) -> dict:
    """collect_rollouts.py's row: id, prompt, answer, prompt_ids, response_ids (K lists of token
    ids, each in [0, vocab_size)), responses (K str), behavior_logprobs (K lists, a float per
    token), rewards (K in {0, 1}), temperature (> 0)."""
    missing = [field for field in ROLLOUT_FIELDS if field not in row]
    if missing:
        raise DataError(f"{where}: rollout row lacks {missing}")
    k = len(row["response_ids"])
    if k == 0 or not row["prompt_ids"]:
        raise DataError(f"{where}: empty prompt_ids or response_ids")
    if not len(row["responses"]) == len(row["behavior_logprobs"]) == len(row["rewards"]) == k:
        raise DataError(f"{where}: responses, behavior_logprobs, rewards need K={k} entries each")
    for ids, logprobs in zip(row["response_ids"], row["behavior_logprobs"]):
        if len(ids) != len(logprobs) or not ids:
            raise DataError(
                f"{where}: a response of {len(ids)} tokens has {len(logprobs)} log-probs"
            )
    for ids in [row["prompt_ids"], *row["response_ids"]] if vocab_size else []:
        low, high = min(ids, key=float), max(ids, key=float)
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high < vocab_size):
            raise DataError(
                f"{where}: token ids {low}..{high} outside the vocabulary [0, {vocab_size})"
            )
    if any(reward not in (0, 1) for reward in row["rewards"]):
        raise DataError(f"{where}: rewards must be 0 or 1, got {row['rewards']}")
    if not (isinstance(row["temperature"], (int, float)) and row["temperature"] > 0):
        raise DataError(f"{where}: temperature must be a number > 0, got {row['temperature']!r}")
    return row


def read_rollouts(path: str | os.PathLike, vocab_size: int | None = None) -> list[dict]:
    """Every row of a rollouts file, schema-checked (token ids too, given the vocabulary size)."""
    rows = [check_rollout(row, f"{path}:{number}", vocab_size) for number, row in iter_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: no rollouts")
    return rows


PASS_RATE_BINS = ("0", "(0,.25]", "(.25,.5]", "(.5,.75]", "(.75,1)", "1")


def pass_rate_histogram(pass_rates) -> dict[str, int]:
    """Prompts by offline pass rate p: p = 0, the four quarters of (0, 1), p = 1."""
    counts = dict.fromkeys(PASS_RATE_BINS, 0)
    for p in pass_rates:
        quarter = math.ceil(p * 4)  # (0, .25] -> 1, ..., (.75, 1) -> 4
        counts[PASS_RATE_BINS[0 if p == 0 else 5 if p == 1 else quarter]] += 1
    return counts
