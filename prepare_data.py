"""The recipe's data: GSM8K and MATH as the .jsonl files that README's "GPU node recipe" names.

Reads GSM8K and MATH in their raw formats, either from local copies (--gsm8k-dir DIR with
train.jsonl and test.jsonl; --math-dir DIR with train.jsonl and test.jsonl and/or math500.jsonl) or,
on a machine with hub access, with the `datasets` library (--from-hub: openai/gsm8k,
EleutherAI/hendrycks_math or DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500). Writes to
--out-dir (default data/), every row the raw row plus an "id" and a "source":
  gsm8k_train.jsonl  GSM8K train
                     {"id", "source", "question", "answer": "... #### N"}
  gsm8k_val.jsonl    --val-size prompts of GSM8K test   (seeded sample)
  gsm8k_test.jsonl   the rest of GSM8K test
  math_train.jsonl   MATH train
                     {"id", "source", "problem", "solution": "... \\boxed{X}", ...}
  math_val.jsonl     --val-size prompts of MATH test minus MATH-500's problems (seeded sample)
  math500.jsonl      MATH-500
As in the authors' release the validation prompts are held out of the TEST sets. Without a MATH test
split (only math500.jsonl in --math-dir) the MATH validation prompts are held out of MATH-500 and
math500.jsonl holds the rest; without MATH-500 (only test.jsonl) they are held out of MATH test and
the rest goes to math_test.jsonl.
Ids are "<dataset>/<split>/<row index>" (e.g. gsm8k/test/17), unique across all the files. A row
without a gold answer (no "####" in a GSM8K answer, no \\boxed{} in a MATH solution) cannot be
graded: it is left out and counted.

Usage: python prepare_data.py --gsm8k-dir DIR [--math-dir DIR] [--out-dir data] [--val-size 100]
                              [--seed 0]
       python prepare_data.py --from-hub        (needs `pip install datasets` and hub access)
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from plumbing import data
from plumbing.cli import DataError, arg, run_main
from plumbing.files import write_jsonl


@dataclasses.dataclass
class Args:
    gsm8k_dir: str = arg(
        "", "folder with GSM8K's train.jsonl and test.jsonl (rows {question, answer})"
    )
    math_dir: str = arg(
        "",
        "folder with MATH's train.jsonl and test.jsonl and/or math500.jsonl (rows {problem, "
        "solution}); left out: MATH is skipped",
    )
    from_hub: bool = arg(
        False, "load GSM8K, MATH and MATH-500 with the `datasets` library instead (hub access)"
    )
    math_hub_name: str = arg(
        "EleutherAI/hendrycks_math",
        "--from-hub: MATH from EleutherAI/hendrycks_math (all "
        "subjects) or DigitalLearningGmbH/MATH-lighteval",
    )
    out_dir: str = arg("data", "folder the .jsonl files are written to")
    val_size: int = arg(100, "validation prompts held out of each source's test set")
    seed: int = arg(0, "seed of the validation sample (each source draws its own seeded sample)")
    overwrite: bool = arg(False, "replace output files that already exist (refused otherwise)")


HUB_GSM8K = "openai/gsm8k"
HUB_MATH500 = "HuggingFaceH4/MATH-500"
HUB_MATH_NAMES = ("EleutherAI/hendrycks_math", "DigitalLearningGmbH/MATH-lighteval")
HENDRYCKS_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

# Raw rows travel with where they came from ("DIR/train.jsonl:12" or "openai/gsm8k[test][11]") for
# error messages.
Raw = tuple[str, dict]


# ----------------------------------------------------------------------------------------------
# Small pure pieces (unit-tested)
# ----------------------------------------------------------------------------------------------


def gold_answer(row: dict, kind: str, where: str) -> str | None:
    """The gold answer plumbing.data.load_examples will read from a raw row, None when it has none.

    kind "gsm8k": the text after the last "####" of `answer`; kind "math": the last \\boxed{} of
    `solution`. A row without the fields of its kind is bad input (DataError naming where it came
    from).
    """
    fields = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}[kind]
    if not all(isinstance(row.get(f), str) for f in fields) or not row[fields[0]].strip():
        raise DataError(
            f"{where}: a {kind} row needs the text fields {list(fields)}; it has {sorted(row)}"
        )
    if kind == "gsm8k":
        answer = row["answer"].rsplit("####", 1)[1].strip() if "####" in row["answer"] else ""
        return answer or None
    return data.last_boxed_content(row["solution"]) or None


def tag_rows(raw: list[Raw], kind: str, dataset: str, split: str) -> tuple[list[dict], list[str]]:
    """The gradable rows with "id" = dataset/split/index and "source" = dataset first; and where the
    others were."""
    rows, ungradable = [], []
    for index, (where, row) in enumerate(raw):
        if gold_answer(row, kind, where) is None:
            ungradable.append(where)
            continue
        rows.append(
            {"id": f"{dataset}/{split}/{index}", "source": dataset}
            | {key: value for key, value in row.items() if key not in ("id", "source")}
        )
    return rows, ungradable


def hold_out(n: int, val_size: int, seed: int, name: str) -> tuple[list[int], list[int]]:
    """Seeded split of range(n) into (validation indices, the other indices), both in the original
    order.

    Every source draws from its own stream random.Random("<name>:<seed>"): the same split on every
    rerun.
    """
    if not 0 < val_size < n:
        raise DataError(
            f"--val-size {val_size}: {name} has {n} prompts to hold validation prompts out of; "
            f"pick 1 to {n - 1}"
        )
    chosen = set(random.Random(f"{name}:{seed}").sample(range(n), val_size))
    return sorted(chosen), [i for i in range(n) if i not in chosen]


def normalized_text(text: str) -> str:
    """A problem's text with runs of whitespace made one space: how MATH-500's problems are found in
    MATH test."""
    return " ".join(text.split())


def split_gsm8k(
    train: list[dict], test: list[dict], val_size: int, seed: int
) -> dict[str, tuple[list[dict], str]]:
    """{output file name: (rows, what they are)} for GSM8K: train as is, validation held out of
    test."""
    val, rest = hold_out(len(test), val_size, seed, "gsm8k")
    return {
        "gsm8k_train.jsonl": (train, "GSM8K train"),
        "gsm8k_val.jsonl": ([test[i] for i in val], f"GSM8K test, seeded sample (seed {seed})"),
        "gsm8k_test.jsonl": ([test[i] for i in rest], "GSM8K test minus gsm8k_val"),
    }


def split_math(
    train: list[dict], test: list[dict] | None, math500: list[dict] | None, val_size: int, seed: int
) -> dict[str, tuple[list[dict], str]]:
    """{output file name: (rows, what they are)} for MATH; the validation prompts never overlap the
    test set.

    test and MATH-500: the test set is MATH-500, the validation prompts a seeded sample of MATH test
    minus the problems of MATH-500 (found by their text). Only MATH-500: validation held out of it,
    the rest is math500.jsonl. Only MATH test: validation held out of it, the rest is
    math_test.jsonl.
    """
    files = {"math_train.jsonl": (train, "MATH train")}
    if test is not None and math500 is not None:
        in_math500 = {normalized_text(row["problem"]) for row in math500}
        pool = [row for row in test if normalized_text(row["problem"]) not in in_math500]
        val, _ = hold_out(len(pool), val_size, seed, "math")
        files["math_val.jsonl"] = (
            [pool[i] for i in val],
            f"MATH test minus MATH-500, seeded sample (seed {seed})",
        )
        files["math500.jsonl"] = (math500, "MATH-500")
    elif math500 is not None:
        val, rest = hold_out(len(math500), val_size, seed, "math")
        files["math_val.jsonl"] = (
            [math500[i] for i in val],
            f"MATH-500, seeded sample (seed {seed})",
        )
        files["math500.jsonl"] = ([math500[i] for i in rest], "MATH-500 minus math_val")
    else:
        val, rest = hold_out(len(test), val_size, seed, "math")
        files["math_val.jsonl"] = (
            [test[i] for i in val],
            f"MATH test, seeded sample (seed {seed})",
        )
        files["math_test.jsonl"] = (
            [test[i] for i in rest],
            "MATH test minus math_val (no MATH-500 given)",
        )
    return files


def train_test_overlap(files: dict[str, tuple[list[dict], str]], kind: str) -> int:
    """How many validation and test prompts also appear (same text) in the training file: 0 when
    nothing leaked."""
    field = {"gsm8k": "question", "math": "problem"}[kind]
    train = {
        normalized_text(row[field])
        for name, (rows, _) in files.items()
        if name.endswith("_train.jsonl")
        for row in rows
    }
    return sum(
        normalized_text(row[field]) in train
        for name, (rows, _) in files.items()
        if not name.endswith("_train.jsonl")
        for row in rows
    )


# ----------------------------------------------------------------------------------------------
# Reading the raw data: local copies, or the hub through `datasets`
# ----------------------------------------------------------------------------------------------


def read_local(folder: str, name: str, flag: str, required: bool = True) -> list[Raw] | None:
    """The rows of FOLDER/NAME with their file:line; None when an optional file is absent."""
    path = Path(folder) / name
    if not path.is_file():
        if required:
            raise DataError(f"{flag} {folder}: no {name} in it")
        return None
    return [(f"{path}:{line}", row) for line, row in data.iter_jsonl(path)]


def read_hub(name: str, config: str | None, split: str) -> list[Raw]:
    """One split of a hub dataset with the `datasets` library, as raw rows."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            "--from-hub needs the `datasets` library (pip install datasets) and hub access; "
            "or give local copies with --gsm8k-dir and --math-dir"
        ) from None
    rows = load_dataset(name, config, split=split)
    return [(f"{name}[{split}][{i}]", dict(row)) for i, row in enumerate(rows)]


def read_hub_math(name: str, split: str) -> list[Raw]:
    """MATH's train or test split: all seven subjects of hendrycks_math in a fixed order, or
    MATH-lighteval's."""
    if name == "EleutherAI/hendrycks_math":
        return [raw for subject in HENDRYCKS_SUBJECTS for raw in read_hub(name, subject, split)]
    return read_hub(name, "default", split)


def read_sources(args: Args) -> tuple[dict | None, dict | None]:
    """({split: raw rows} of GSM8K, of MATH) from the hub or the local folders; None for a source
    not given."""
    if args.from_hub:
        gsm8k = {split: read_hub(HUB_GSM8K, "main", split) for split in ("train", "test")}
        math = {split: read_hub_math(args.math_hub_name, split) for split in ("train", "test")}
        return gsm8k, math | {"math500": read_hub(HUB_MATH500, None, "test")}
    gsm8k = math = None
    if args.gsm8k_dir:
        gsm8k = {
            split: read_local(args.gsm8k_dir, f"{split}.jsonl", "--gsm8k-dir")
            for split in ("train", "test")
        }
    if args.math_dir:
        math = {
            "train": read_local(args.math_dir, "train.jsonl", "--math-dir"),
            "test": read_local(args.math_dir, "test.jsonl", "--math-dir", required=False),
            "math500": read_local(args.math_dir, "math500.jsonl", "--math-dir", required=False),
        }
        if math["test"] is None and math["math500"] is None:
            raise DataError(
                f"--math-dir {args.math_dir}: needs test.jsonl or math500.jsonl (or both) besides "
                f"train.jsonl, to hold the validation prompts out of"
            )
    return gsm8k, math


# ----------------------------------------------------------------------------------------------
# The script: read, tag, split, check nothing is overwritten, write, verify with
# plumbing.data.load_examples, summarise
# ----------------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    if args.from_hub and (args.gsm8k_dir or args.math_dir):
        raise DataError(
            "give either --from-hub or local folders (--gsm8k-dir, --math-dir), not both"
        )
    if not (args.from_hub or args.gsm8k_dir or args.math_dir):
        raise DataError(
            "nothing to read: give --gsm8k-dir DIR (and --math-dir DIR) with local copies, or "
            "--from-hub on a machine with hub access"
        )
    if args.from_hub and args.math_hub_name not in HUB_MATH_NAMES:
        raise DataError(
            f"--math-hub-name {args.math_hub_name}: expected one of {list(HUB_MATH_NAMES)}"
        )
    if args.val_size < 1:
        raise DataError(f"--val-size {args.val_size}: must be >= 1")


def build_files(args: Args) -> tuple[dict[str, tuple[list[dict], str]], list[str]]:
    """{file name: (rows, what they are)} of every output, and the notes for the summary."""
    gsm8k, math = read_sources(args)
    files, notes = {}, []

    def tag(raw: list[Raw] | None, kind: str, dataset: str, split: str) -> list[dict] | None:
        if raw is None:
            return None
        rows, ungradable = tag_rows(raw, kind, dataset, split)
        if ungradable:
            notes.append(
                f"left out {len(ungradable)} {dataset} {split} rows without a gold answer, "
                f"first at {ungradable[0]}"
            )
        return rows

    if gsm8k is not None:
        part = split_gsm8k(
            tag(gsm8k["train"], "gsm8k", "gsm8k", "train"),
            tag(gsm8k["test"], "gsm8k", "gsm8k", "test"),
            args.val_size,
            args.seed,
        )
        files |= part
        if overlap := train_test_overlap(part, "gsm8k"):
            notes.append(
                f"{overlap} GSM8K validation/test questions also appear in gsm8k_train.jsonl"
            )
    else:
        notes.append("GSM8K skipped: no --gsm8k-dir given")
    if math is not None:
        part = split_math(
            tag(math["train"], "math", "math", "train"),
            tag(math["test"], "math", "math", "test"),
            tag(math["math500"], "math", "math500", "test"),
            args.val_size,
            args.seed,
        )
        files |= part
        if overlap := train_test_overlap(part, "math"):
            notes.append(f"{overlap} MATH validation/test problems also appear in math_train.jsonl")
        if "math_test.jsonl" in part:
            notes.append(
                "no math500.jsonl in --math-dir: the MATH test set went to math_test.jsonl "
                "(in the recipe use TEST_DATA=...,data/math_test.jsonl and TARGETED=...,math_test)"
            )
    else:
        notes.append("MATH skipped: no --math-dir given")
    return files, notes


def check_not_overwriting(out_dir: Path, names: list[str], overwrite: bool) -> None:
    existing = [name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DataError(
            f"--out-dir {out_dir}: {', '.join(existing)} already exist; "
            "pass --overwrite to replace them"
        )


def print_summary(
    out_dir: Path, files: dict[str, tuple[list[dict], str]], notes: list[str], args: Args
) -> None:
    print(
        f"wrote {len(files)} files to {out_dir}/ (--val-size {args.val_size}, --seed {args.seed}):"
    )
    width = max(len(name) for name in files)
    for name, (rows, what) in files.items():
        print(f"  {name:<{width}}  {len(rows):>6} rows  {what}")
    for note in notes:
        print(note)


def main(args: Args) -> None:
    check_args(args)
    out_dir = Path(args.out_dir)
    files, notes = build_files(args)
    check_not_overwriting(out_dir, list(files), args.overwrite)
    for name, (rows, _) in files.items():
        write_jsonl(out_dir / name, rows)
    data.load_data_files(
        [str(out_dir / name) for name in files]
    )  # what run_cropi.sh checks: all parse, ids unique
    print_summary(out_dir, files, notes, args)


if __name__ == "__main__":
    run_main(main, Args)
