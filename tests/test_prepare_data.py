"""Tests of prepare_data.py: the seeded hold-out, row tagging, the MATH cases, and the script on
GSM8K (when the copy beside the checkout is there) and on a small hand-made MATH folder."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import run_script

from common import reward
from plumbing.cli import DataError
from plumbing.data import load_data_files, load_examples, read_jsonl
from prepare_data import Args, gold_answer, hold_out, main, normalized_text, split_math, tag_rows

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
GSM8K_FILES = ("gsm8k_train.jsonl", "gsm8k_val.jsonl", "gsm8k_test.jsonl")


# -------------------------------------------------------------------------------------- pure pieces


def test_hold_out_is_a_seeded_partition_in_the_original_order():
    val, rest = hold_out(50, 7, seed=0, name="gsm8k")
    assert len(val) == 7 and len(rest) == 43
    assert sorted(val + rest) == list(range(50)) and val == sorted(val) and rest == sorted(rest)
    assert hold_out(50, 7, seed=0, name="gsm8k") == (val, rest)  # same seed: same split
    assert hold_out(50, 7, seed=1, name="gsm8k")[0] != val  # another seed: another split
    assert hold_out(50, 7, seed=0, name="math")[0] != val  # every source its own stream


@pytest.mark.parametrize("val_size", [0, 50, 60])
def test_hold_out_needs_something_left_for_the_test_set(val_size):
    with pytest.raises(DataError, match=f"--val-size {val_size}: gsm8k has 50 prompts"):
        hold_out(50, val_size, seed=0, name="gsm8k")


def test_gold_answer_reads_what_load_examples_reads():
    assert gold_answer({"question": "q", "answer": "so\n#### 1,000"}, "gsm8k", "f:1") == "1,000"
    assert gold_answer({"question": "q", "answer": "no marker"}, "gsm8k", "f:1") is None
    assert gold_answer({"question": "q", "answer": "#### "}, "gsm8k", "f:1") is None
    assert (
        gold_answer({"problem": "p", "solution": "\\boxed{\\frac{1}{2}}"}, "math", "f:1")
        == "\\frac{1}{2}"
    )
    assert gold_answer({"problem": "p", "solution": "no box"}, "math", "f:1") is None
    with pytest.raises(
        DataError,
        match=r"dir/train.jsonl:3: a math row needs .*'problem', 'solution'.*"
        r"\['answer', 'question'\]",
    ):
        gold_answer({"question": "q", "answer": "#### 1"}, "math", "dir/train.jsonl:3")
    with pytest.raises(DataError, match="f:2: a gsm8k row needs"):
        gold_answer({"question": " ", "answer": "#### 1"}, "gsm8k", "f:2")


def test_tag_rows_adds_id_and_source_and_leaves_out_ungradable_rows():
    raw = [
        ("f:1", {"question": "a", "answer": "#### 1", "id": "theirs"}),
        ("f:2", {"question": "b", "answer": "none"}),
        ("f:4", {"question": "c", "answer": "#### 3", "extra": 5}),
    ]
    rows, ungradable = tag_rows(raw, "gsm8k", "gsm8k", "test")
    assert rows == [
        {"id": "gsm8k/test/0", "source": "gsm8k", "question": "a", "answer": "#### 1"},
        {"id": "gsm8k/test/2", "source": "gsm8k", "question": "c", "answer": "#### 3", "extra": 5},
    ]
    assert ungradable == ["f:2"]


def math_rows(dataset: str, split: str, problems: list[str]) -> list[dict]:
    return [
        {
            "id": f"{dataset}/{split}/{i}",
            "source": dataset,
            "problem": p,
            "solution": f"\\boxed{{{i}}}",
        }
        for i, p in enumerate(problems)
    ]


def test_split_math_holds_validation_out_of_math_test_minus_math500():
    train = math_rows("math", "train", ["t0", "t1"])
    test = math_rows("math", "test", [f"q{i}" for i in range(10)])
    math500 = math_rows("math500", "test", ["q1", " q3\n", "q5"])  # found by text, whitespace aside
    files = split_math(train, test, math500, val_size=4, seed=0)
    assert list(files) == ["math_train.jsonl", "math_val.jsonl", "math500.jsonl"]
    val = [row["problem"] for row in files["math_val.jsonl"][0]]
    assert len(val) == 4 and not {"q1", "q3", "q5"} & set(val)
    assert files["math500.jsonl"][0] == math500 and files["math_train.jsonl"][0] == train
    with pytest.raises(
        DataError, match="--val-size 7: math has 7 prompts"
    ):  # 10 - 3 left to sample from
        split_math(train, test, math500, val_size=7, seed=0)


def test_split_math_without_math_test_or_without_math500():
    train = math_rows("math", "train", ["t0"])
    math500 = math_rows("math500", "test", [f"m{i}" for i in range(6)])
    files = split_math(train, None, math500, val_size=2, seed=0)
    val, rest = files["math_val.jsonl"][0], files["math500.jsonl"][0]
    assert (
        len(val) == 2
        and len(rest) == 4
        and sorted(r["id"] for r in val + rest) == sorted(r["id"] for r in math500)
    )
    test = math_rows("math", "test", [f"q{i}" for i in range(6)])
    files = split_math(train, test, None, val_size=2, seed=0)
    assert list(files) == ["math_train.jsonl", "math_val.jsonl", "math_test.jsonl"]
    assert len(files["math_val.jsonl"][0]) == 2 and len(files["math_test.jsonl"][0]) == 4


def test_normalized_text():
    assert normalized_text("  What is\n$1+1$?\t") == "What is $1+1$?"


# --------------------------------------------------------------------------------------- the script


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_math_dir(folder: Path) -> Path:
    """MATH in its raw format: 4 train rows (one without a box), 12 test rows, 3 of them the
    'MATH-500' set."""

    def row(i, split):
        return {
            "problem": f"What is ${i}+{i}$? ({split})",
            "solution": f"It is $\\boxed{{{2 * i}}}$.",
            "level": "Level 1",
            "type": "Algebra",
        }

    write_rows(
        folder / "train.jsonl",
        [row(i, "train") for i in range(3)]
        + [{"problem": "unboxed", "solution": "no final answer"}],
    )
    test = [row(i, "test") for i in range(12)]
    test[5]["solution"] = "Halve it: $\\boxed{\\frac{1}{2}}$"
    write_rows(folder / "test.jsonl", test)
    math500 = [
        dict(
            test[i],
            problem=test[i]["problem"] + "\n",
            unique_id=f"test/algebra/{i}.json",
            answer="",
        )
        for i in (1, 5, 9)
    ]
    write_rows(folder / "math500.jsonl", math500)
    return folder


def test_the_math_path_on_a_small_local_folder(tmp_path, capsys):
    math_dir = make_math_dir(tmp_path / "math")
    out = tmp_path / "data"
    main(Args(math_dir=str(math_dir), out_dir=str(out), val_size=4, seed=0))
    printed = capsys.readouterr().out
    assert re.search(r"math500.jsonl +3 rows  MATH-500\n", printed) and "GSM8K skipped" in printed
    assert (
        "left out 1 math train rows without a gold answer, first at "
        + str(math_dir / "train.jsonl")
        + ":4"
        in printed
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "math500.jsonl",
        "math_train.jsonl",
        "math_val.jsonl",
    ]
    examples = load_data_files(
        [str(out / name) for name in ("math_train.jsonl", "math_val.jsonl", "math500.jsonl")]
    )
    assert len(examples) == 3 + 4 + 3
    val, math500 = read_jsonl(out / "math_val.jsonl"), read_jsonl(out / "math500.jsonl")
    assert [r["id"] for r in math500] == ["math500/test/0", "math500/test/1", "math500/test/2"]
    assert {r["source"] for r in val} == {"math"} and {r["source"] for r in math500} == {"math500"}
    assert not {normalized_text(r["problem"]) for r in val} & {
        normalized_text(r["problem"]) for r in math500
    }
    assert all(r["level"] == "Level 1" for r in val)  # raw fields kept
    for name in (
        "math_train.jsonl",
        "math_val.jsonl",
        "math500.jsonl",
    ):  # every gold answer pays its solution
        for row, example in zip(read_jsonl(out / name), load_examples(out / name)):
            assert reward(row["solution"], example["answer"]) == 1.0


def test_gsm8k_on_the_shared_copy(tmp_path):
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.skip("../shared/data/gsm8k not beside the checkout")
    out = tmp_path / "data"
    result = run_script("prepare_data.py", "--gsm8k-dir", str(GSM8K_DIR), "--out-dir", str(out))
    assert (
        re.search(r"gsm8k_val.jsonl +100 rows", result.stdout) and "MATH skipped" in result.stdout
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(GSM8K_FILES)
    original_test, original_train = (
        read_jsonl(GSM8K_DIR / "test.jsonl"),
        read_jsonl(GSM8K_DIR / "train.jsonl"),
    )
    written = {name: read_jsonl(out / name) for name in GSM8K_FILES}
    examples = {name: load_examples(out / name) for name in GSM8K_FILES}
    assert [len(examples[name]) for name in GSM8K_FILES] == [
        len(original_train),
        100,
        len(original_test) - 100,
    ]
    val_ids = {r["id"] for r in written["gsm8k_val.jsonl"]}
    test_ids = {r["id"] for r in written["gsm8k_test.jsonl"]}
    assert not val_ids & test_ids
    assert val_ids | test_ids == {f"gsm8k/test/{i}" for i in range(len(original_test))}
    rebuilt = sorted(
        written["gsm8k_val.jsonl"] + written["gsm8k_test.jsonl"],
        key=lambda r: int(r["id"].split("/")[-1]),
    )
    assert [{"question": r["question"], "answer": r["answer"]} for r in rebuilt] == original_test
    for name in GSM8K_FILES:  # every gold answer pays its solution
        assert all(
            reward(row["answer"], example["answer"]) == 1.0
            for row, example in zip(written[name], examples[name])
        )

    refused = run_script(
        "prepare_data.py", "--gsm8k-dir", str(GSM8K_DIR), "--out-dir", str(out), check=False
    )
    assert refused.returncode != 0 and "already exist; pass --overwrite" in refused.stderr
    main(
        Args(gsm8k_dir=str(GSM8K_DIR), out_dir=str(out), overwrite=True)
    )  # same seed: the same files
    assert {name: read_jsonl(out / name) for name in GSM8K_FILES} == written
    main(Args(gsm8k_dir=str(GSM8K_DIR), out_dir=str(tmp_path / "seed1"), seed=1))
    assert {r["id"] for r in read_jsonl(tmp_path / "seed1" / "gsm8k_val.jsonl")} != val_ids
    assert read_jsonl(tmp_path / "seed1" / "gsm8k_train.jsonl") == written["gsm8k_train.jsonl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (Args(), "nothing to read"),
        (Args(from_hub=True, gsm8k_dir="x"), "either --from-hub or local folders"),
        (Args(from_hub=True, math_hub_name="me/math"), "--math-hub-name me/math"),
        (Args(gsm8k_dir="x", val_size=0), "--val-size 0"),
        (Args(gsm8k_dir="no/such/dir"), "--gsm8k-dir no/such/dir: no train.jsonl"),
    ],
)
def test_bad_flags_are_named(args, message):
    with pytest.raises(DataError, match=message):
        main(args)


def test_math_dir_needs_a_test_split_or_math500(tmp_path):
    write_rows(tmp_path / "train.jsonl", [{"problem": "p", "solution": "\\boxed{1}"}])
    with pytest.raises(DataError, match="needs test.jsonl or math500.jsonl"):
        main(Args(math_dir=str(tmp_path), out_dir=str(tmp_path / "out")))


def test_a_bad_raw_row_is_named_by_file_and_line(tmp_path):
    write_rows(
        tmp_path / "train.jsonl",
        [{"question": "q", "answer": "#### 1"}, {"prompt": "p", "answer": "1"}],
    )
    write_rows(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(DataError, match=f"{tmp_path / 'train.jsonl'}:2: a gsm8k row needs"):
        main(Args(gsm8k_dir=str(tmp_path), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing written


def test_from_hub_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(DataError, match="needs the `datasets` library"):
        main(Args(from_hub=True, out_dir=str(tmp_path)))


def test_from_hub_reads_the_named_datasets(tmp_path, monkeypatch):
    """A stand-in `datasets` module: the hub path asks for the right names, configs and splits, all
    MATH subjects."""
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return [{"question": f"{split} q{i}", "answer": f"#### {i}"} for i in range(5)]
        if name == "HuggingFaceH4/MATH-500":
            return [
                {
                    "problem": "algebra test p1",
                    "solution": "\\boxed{1}",
                    "answer": "1",
                    "level": 1,
                    "unique_id": "test/algebra/1.json",
                }
            ]
        return [
            {
                "problem": f"{config} {split} p{i}",
                "solution": f"\\boxed{{{i}}}",
                "level": "Level 1",
                "type": config,
            }
            for i in range(3)
        ]

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    out = tmp_path / "data"
    main(Args(from_hub=True, out_dir=str(out), val_size=2))
    assert ("openai/gsm8k", "main", "test") in calls and (
        "HuggingFaceH4/MATH-500",
        None,
        "test",
    ) in calls
    assert {c for n, c, s in calls if n == "EleutherAI/hendrycks_math"} == {
        "algebra",
        "counting_and_probability",
        "geometry",
        "intermediate_algebra",
        "number_theory",
        "prealgebra",
        "precalculus",
    }
    sizes = {p.name: len(load_examples(p)) for p in out.iterdir()}
    assert sizes == {
        "gsm8k_train.jsonl": 5,
        "gsm8k_val.jsonl": 2,
        "gsm8k_test.jsonl": 3,
        "math_train.jsonl": 21,
        "math_val.jsonl": 2,
        "math500.jsonl": 1,
    }
    assert "algebra test p1" not in {r["problem"] for r in read_jsonl(out / "math_val.jsonl")}
