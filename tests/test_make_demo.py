"""make_demo.py: the demo's splits are disjoint and seeded, and a build is byte-identical whatever
the thread count."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from conftest import run_script

from make_demo import DIGITS, RULES, SKILLS, WARMUP_LEVELS, Args, make_splits

SMALL_BUILD = (
    "--warmup-steps",
    "20",
    "--warmup-per-skill",
    "100",
    "--pool-per-skill",
    "30",
    "--val-per-skill",
    "16",
    "--test-per-skill",
    "8",
)


def test_splits_are_seeded_and_disjoint_per_skill():
    args = Args(pool_per_skill=30, val_per_skill=16, test_per_skill=8, warmup_per_skill=100)
    splits = make_splits(args)
    assert splits == make_splits(args)
    assert splits != make_splits(dataclasses.replace(args, seed=1))
    prompts = [
        row["prompt"] for rows in splits.values() for row in rows
    ]  # a problem belongs to one skill
    assert len(prompts) == len(set(prompts)) == len(SKILLS) * (30 + 16 + 8 + 100)


def build(folder: Path, threads: int) -> dict[str, bytes]:
    """Build the small demo with `threads` OpenMP/MKL threads in the environment; its files' bytes
    by name."""
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run_script("make_demo.py", "--out", str(folder), *SMALL_BUILD, env=threads_env)
    files = sorted(folder.glob("data/*.jsonl")) + [folder / "model" / "model.safetensors"]
    return {str(path.relative_to(folder)): path.read_bytes() for path in files}


def test_build_is_byte_identical_with_one_or_two_threads(tmp_path):
    one_thread = build(tmp_path / "one", threads=1)
    two_threads = build(tmp_path / "two", threads=2)
    assert one_thread.keys() == two_threads.keys()
    assert len(one_thread) == 1 + 2 * len(SKILLS) + 1
    for name in one_thread:
        assert one_thread[name] == two_threads[name], f"{name} differs between 1 and 2 threads"
    recorded = json.loads((tmp_path / "one" / "demo.json").read_text())["sha256"]
    assert recorded == {name: hashlib.sha256(data).hexdigest() for name, data in one_thread.items()}


def test_rules_right_and_wrong_worked_by_hand():
    worked = {  # skill: (number(s), right answer, the typical wrong answer)
        "rev": (("4735",), "5374", "4735"),
        "sort": (("4735",), "3457", "7543"),
        "rot": (("4735",), "7354", "5473"),
        "swap": (("4735",), "5734", "7435"),
        "shift": (("4795",), "5816", "3684"),
        "skip": (("47352",), "432", "75"),
        "max": (("23", "45"), "45", "23"),
        "min": (("23", "45"), "23", "45"),
    }
    assert set(worked) == set(SKILLS) == set(RULES)
    for skill, (numbers, right, wrong) in worked.items():
        assert RULES[skill][0](*numbers) == right, skill
        assert RULES[skill][1](*numbers) == wrong, skill


def parse(question: str) -> tuple[str, list[str]]:
    """ "max(23,45)" -> ("max", ["23", "45"])."""
    skill, numbers = question[:-1].split("(")
    return skill, numbers.split(",")


def test_warmup_labels_follow_the_wrong_rule_at_the_rate_on_misconception_levels_only():
    args = Args(
        pool_per_skill=30,
        val_per_skill=16,
        test_per_skill=8,
        warmup_per_skill=400,
        misconception_rate=0.6,
    )
    splits = make_splits(args)
    labels = {
        level: [] for level in WARMUP_LEVELS
    }  # (label is the wrong answer) where the two rules differ
    for row in splits["warmup"]:
        skill, numbers = parse(row["prompt"])
        right, wrong = (rule(*numbers) for rule in RULES[skill])
        assert row["answer"] in (right, wrong)
        if right != wrong:
            labels[DIGITS[skill].index(len(numbers[0])) + 1].append(row["answer"] == wrong)
    assert sum(labels[1]) / len(labels[1]) == pytest.approx(
        0.6, abs=0.04
    )  # 1,600 labels: std 0.012
    assert sum(labels[2]) == 0
    for (
        name,
        rows,
    ) in splits.items():  # pool, validation and test sets always carry the right answer
        if name != "warmup":
            assert all(
                row["answer"] == RULES[row["skill"]][0](*parse(row["prompt"])[1]) for row in rows
            )


def test_more_test_problems_change_nothing_else():
    small = make_splits(
        Args(pool_per_skill=30, val_per_skill=16, test_per_skill=8, warmup_per_skill=100)
    )
    large = make_splits(
        Args(pool_per_skill=30, val_per_skill=16, test_per_skill=40, warmup_per_skill=100)
    )
    for name in small:
        if name.startswith("test_"):
            assert len(large[name]) == 5 * len(small[name])
        else:
            assert large[name] == small[name], name  # the warm-up set too, hence the model


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--misconception-rate", "1.5"),
            "--misconception-rate 1.5: a share of the labels, from 0 to 1",
        ),
        (
            ("--test-per-skill", "100000"),
            "skill rev level 1 has fewer than 33801 different problems: lower",
        ),
    ],
)
def test_bad_flags_end_in_one_line_and_write_nothing(tmp_path, flags, message):
    result = run_script("make_demo.py", "--out", str(tmp_path / "demo"), *flags, check=False)
    assert result.returncode != 0 and f"make_demo.py: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "demo").exists()
