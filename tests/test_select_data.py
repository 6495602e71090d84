"""select_data.py: the math of steps 1c-1f on numbers worked by hand, and the script run as a user
runs it."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_synthetic_rollouts, run_script

from plumbing import sketch_files
from plumbing.cli import DataError
from plumbing.data import pass_rate_histogram
from select_data import (
    cosine_to_targets,
    learnability_order,
    num_to_select,
    pass_rate_order,
    rank_descending,
    read_pool,
    reciprocal_rank_fusion,
    validation_target,
)

SQRT_HALF = math.sqrt(0.5)

# ----------------------------------------------------------------------------------------------
# A pool worked by hand (3-dim sketches). Validation set A averages to (1,0,0), set B to (0,1,0).
#   row  sketch      cos A   cos B
#   p0   (1,0,0)     1       0
#   p1   (0,0,0)     zero-gradient (its K rewards are equal)
#   p2   (1,1,0)     .7071   .7071
#   p3   (0,2,0)     0       1
#   p4   (3,0,4)     .6      0
#   p5   (0,1,1)     0       .7071
#   p6   (nan,0,0)   non-finite
#   p7   (-1,0,0)    -1      0
# N_sel = floor(0.5 * 8) = 4. Ranks (ties by row index):
#   A: p0 1, p2 2, p4 3, p3 4 | p5 5, p7 6
#   B: p3 1, p2 2, p5 3 (ties p2), p0 4 (ties p4, p7) | p4 5, p7 6
# k = 0:  p0 = 1 + 1/4 = 1.25, p3 = 1/4 + 1 = 1.25, p2 = 1/2 + 1/2 = 1, p4 = 1/3, p5 = 1/3
#         -> p0, p3 (tie: row index), p2, p4 (tie with p5: row index)
# k = 60: p2 = 2/62 = .03226 > p0 = p3 = 1/61 + 1/64 = .03202 > p4 = p5 = 1/63  -> p2, p0, p3, p4
# ----------------------------------------------------------------------------------------------
TRAIN_SKETCH = np.array(
    [[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 2, 0], [3, 0, 4], [0, 1, 1], [np.nan, 0, 0], [-1, 0, 0]],
    dtype=np.float32,
)
TRAIN_REWARDS = [
    [1, 0, 0, 0],
    [1, 1, 1, 1],
    [1, 1, 0, 0],
    [1, 1, 1, 0],
    [0, 0, 0, 1],
    [1, 0, 1, 0],
    [0, 1, 0, 0],
    [1, 1, 0, 1],
]
VAL_A = np.array(
    [[1, 1, 0], [1, -1, 0], [0, 0, 0], [np.nan, 5, 5]], dtype=np.float32
)  # rows 2, 3 left out
VAL_B = np.array([[-1, 1, 0], [1, 1, 0]], dtype=np.float32)
META = {
    "model": "tiny",
    "num_params": 1000,
    "projector": "countsketch",
    "seed": 0,
    "sparse_ratio": 1.0,
    "proj_dim": 3,
}


def write_rollouts(path: Path, rewards: list[list[int]], skills=("add", "sub")) -> Path:
    rows = [
        {
            "id": f"p{i}",
            "prompt": f"{i}+1",
            "answer": str(i + 1),
            "prompt_ids": [5, 6],
            "response_ids": [[7]] * len(r),
            "responses": ["x"] * len(r),
            "behavior_logprobs": [[-1.0]] * len(r),
            "rewards": [float(x) for x in r],
            "temperature": 0.5,
            "skill": skills[i % len(skills)],
        }
        for i, r in enumerate(rewards)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_sketch(
    path: Path, sketch: np.ndarray, ids: list[str], zero_rows=(), nonfinite_rows=(), **changes
) -> Path:
    np.save(path, sketch)
    meta = {
        **META,
        "dtype": str(sketch.dtype),
        "rows": len(ids),
        "ids": ids,
        "zero_rows": list(zero_rows),
        "nonfinite_rows": list(nonfinite_rows),
        "rollouts": "somewhere.jsonl",
        **changes,
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def hand_pool(tmp_path):
    """The hand-worked pool above; returns a function giving the select_data.py command line for
    it."""
    rollouts = write_rollouts(tmp_path / "train_rollouts.jsonl", TRAIN_REWARDS)
    train = write_sketch(
        tmp_path / "train.npy",
        TRAIN_SKETCH,
        [f"p{i}" for i in range(8)],
        zero_rows=[1],
        nonfinite_rows=[6],
    )
    val_a = write_sketch(
        tmp_path / "val_a.npy", VAL_A, ["a0", "a1", "a2", "a3"], zero_rows=[2], nonfinite_rows=[3]
    )
    val_b = write_sketch(tmp_path / "val_b.npy", VAL_B.astype(np.float16), ["b0", "b1"])

    def command(out: str, *extra: str) -> list[str]:
        return [
            "select_data.py",
            "--train-rollouts",
            str(rollouts),
            "--train-sketch",
            str(train),
            "--val-sketch",
            str(val_a),
            "--val-sketch",
            str(val_b),
            "--ratio",
            "0.5",
            "--out",
            str(tmp_path / out),
            *extra,
        ]

    command.folder = tmp_path
    return command


def subset_ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (folder / "subset.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Unit tests of the math
# ----------------------------------------------------------------------------------------------


def test_importing_select_data_does_not_import_torch():
    """select_data.py needs numpy only: a CPU machine selects without torch's import time or
    memory."""
    check = "import sys, select_data; assert 'torch' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_num_to_select_floors_and_refuses_zero():
    assert num_to_select(0.1, 100) == 10
    assert num_to_select(0.1, 109) == 10
    assert (
        num_to_select(0.29, 100) == 29
    )  # 0.29 * 100 = 28.999999999999996 in binary floating point
    assert num_to_select(1.0, 7) == 7
    with pytest.raises(ValueError, match="selects 0 rows"):
        num_to_select(0.1, 9)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="--ratio"):
            num_to_select(bad, 100)


def test_rank_descending_breaks_ties_by_row_index_and_skips_ineligible():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.7])
    eligible = np.array([True, True, True, False, True])
    assert rank_descending(scores, eligible).tolist() == [1, 4, 0, 2]


def test_cosine_to_targets_by_hand():
    chunk = np.array([[3, 4], [0, 0], [np.nan, 1], [-2, 0]], dtype=np.float32)
    unit_targets = np.array(
        [[1, 0], [SQRT_HALF, SQRT_HALF]], dtype=np.float32
    )  # (1,0) and (1,1)/sqrt2
    cosines, norms = cosine_to_targets(chunk, unit_targets)
    np.testing.assert_allclose(cosines[0], [0.6, 7 / 5 * SQRT_HALF], rtol=1e-6)
    np.testing.assert_allclose(cosines[3], [-1, -SQRT_HALF], rtol=1e-6)
    assert np.isnan(cosines[1]).all() and np.isnan(cosines[2]).all()
    assert norms[0] == 5 and norms[1] == 0 and np.isnan(norms[2])


def test_cosine_to_targets_blocks_match_float64():
    """float16 rows, several cache-sized blocks and a short last one: the cosines of one float64
    computation."""
    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((150, 40)).astype(np.float16)
    targets = rng.standard_normal((40, 3))
    targets /= np.linalg.norm(targets, axis=0)
    cosines, norms = cosine_to_targets(chunk, targets.T.astype(np.float32), block_rows=64)
    x = chunk.astype(np.float64)
    np.testing.assert_allclose(norms, np.linalg.norm(x, axis=1), rtol=1e-6)
    np.testing.assert_allclose(cosines, x @ targets / np.linalg.norm(x, axis=1)[:, None], atol=1e-6)


def test_reciprocal_rank_fusion_by_hand():
    # column 0 ranks rows 0, 1, 2, 3; column 1 ranks rows 3, 2, 1, 0; top lists of 2
    scores = np.array([[4, 1], [3, 2], [2, 3], [1, 4]], dtype=np.float32)
    eligible = np.ones(4, dtype=bool)
    fused = reciprocal_rank_fusion(scores, eligible, n_select=2, k=0)
    np.testing.assert_allclose(fused, [1, 1 / 2, 1 / 2, 1])
    assert [rank_descending(scores[:, v], eligible).tolist() for v in (0, 1)] == [
        [0, 1, 2, 3],
        [3, 2, 1, 0],
    ]
    fused = reciprocal_rank_fusion(scores, eligible, n_select=3, k=60)
    np.testing.assert_allclose(fused, [1 / 61, 1 / 62 + 1 / 63, 1 / 63 + 1 / 62, 1 / 61])
    eligible[0] = False  # row 0 leaves: column 0 now ranks 1, 2, 3
    fused = reciprocal_rank_fusion(scores, eligible, n_select=2, k=0)
    np.testing.assert_allclose(fused, [0, 1, 1 / 2 + 1 / 2, 1])  # row 2 is 2nd in both lists
    assert rank_descending(scores[:, 0], eligible).tolist() == [1, 2, 3]


def test_learnability_order_by_hand():
    # p(1-p) = 0, .25, .1875, .1875, 0  -> row 1, rows 2 and 3 (tie, by index), rows 0 and 4
    assert learnability_order(np.array([0, 0.5, 0.25, 0.75, 1])).tolist() == [1, 2, 3, 0, 4]


def test_pass_rate_order_random_among_mixed_then_closest_to_half():
    p = np.array([0, 0.5, 1, 0.25, 0.75, 0, 1])
    picks = [sorted(pass_rate_order(p, 2, seed).tolist()) for seed in range(20)]
    assert all(set(pick) <= {1, 3, 4} for pick in picks)
    assert len({tuple(pick) for pick in picks}) > 1  # random, not a fixed rule
    assert pass_rate_order(p, 2, 7).tolist() == pass_rate_order(p, 2, 7).tolist()
    fallback = pass_rate_order(p, 5, seed=0).tolist()  # only 3 mixed rows: closest to 0.5 first
    assert fallback[0] == 1 and set(fallback[1:3]) == {3, 4} and set(fallback[3:]) <= {0, 2, 5, 6}


def test_pass_rate_histogram_bins():
    histogram = pass_rate_histogram(np.array([0, 0, 0.125, 0.25, 0.5, 0.625, 0.875, 1]))
    assert histogram == {"0": 2, "(0,.25]": 2, "(.25,.5]": 1, "(.5,.75]": 1, "(.75,1)": 1, "1": 1}


@pytest.mark.parametrize("field", ["projector", "seed", "sparse_ratio", "proj_dim", "num_params"])
def test_sketch_metadata_mismatch_names_the_field(field):
    other = {**META, field: "something else"}
    with pytest.raises(DataError, match=f"'{field}'.*train.npy.*val.npy"):
        sketch_files.check_sketches_match(META, "train.npy", other, "val.npy")
    sketch_files.check_sketches_match(
        META, "train.npy", {**META, "model": "other checkpoint"}, "val.npy"
    )


def test_iter_chunks_keeps_row_order_and_the_file_dtype(tmp_path):
    sketch = np.arange(40, dtype=np.float16).reshape(20, 2)
    np.save(tmp_path / "s.npy", sketch)
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")
    chunks = list(sketch_files.iter_chunks(mapped, 3))
    assert [start for start, _ in chunks] == list(range(0, 20, 3))
    assert [len(c) for _, c in chunks] == [3] * 6 + [2] and {c.dtype for _, c in chunks} == {
        np.dtype(np.float16)
    }
    assert np.concatenate([c for _, c in chunks]).tolist() == sketch.tolist()


def test_write_sketch_then_open_sketch(tmp_path, capsys):
    """write_sketch adds the non-finite rows to the metadata; open_sketch maps the file back with
    it."""
    sketch = np.array([[1, 2], [np.nan, 0], [0, 0], [np.inf, 1]], dtype=np.float16)
    meta = {**META, "proj_dim": 2, "rows": 4, "ids": ["a", "b", "c", "d"], "zero_rows": [2]}
    assert sketch_files.write_sketch(tmp_path / "s.npy", sketch, meta)["nonfinite_rows"] == [1, 3]
    assert "wrote" in capsys.readouterr().out
    mapped, read_back = sketch_files.open_sketch(str(tmp_path / "s.npy"), "--flag")
    assert read_back == meta and isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, sketch)
    assert [m.tolist() for m in sketch_files.excluded_rows(read_back)] == [
        [False, False, True, False],
        [False, True, False, True],
    ]
    (tmp_path / "s.json").write_text(json.dumps({**meta, "zero_rows": [4]}))
    with pytest.raises(DataError, match="s.json: zero_rows holds an index outside 0..3"):
        sketch_files.open_sketch(str(tmp_path / "s.npy"), "--flag")
    (tmp_path / "s.json").unlink()
    with pytest.raises(DataError, match="--flag .*s.npy: .*s.json does not exist"):
        sketch_files.open_sketch(str(tmp_path / "s.npy"), "--flag")


def test_read_pool_keeps_data_fields_and_refuses_bad_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"id": "a", "prompt": "1+1", "answer": "2", "rewards": [1, 0], "skill": "add", "x": 1}\n\n'
        '{"id": "b", "prompt": "2+2", "answer": "4", "rewards": [1, 1, 1, 0]}\n'
    )
    rows, pass_rates = read_pool(str(path))
    assert rows == [
        {"id": "a", "prompt": "1+1", "answer": "2", "skill": "add"},
        {"id": "b", "prompt": "2+2", "answer": "4"},
    ]
    assert pass_rates.tolist() == [0.5, 0.75]
    for text, error in (
        ('{"id": "a", "prompt": "p", "answer": "1", "rewards": []}\n', "r.jsonl:1: a rollout row"),
        ('{"id": "a", "prompt": "p", "answer": "1", "rewards": [1]}\n' * 2, "duplicate id 'a'"),
        ('{"id": "a", "prompt": \n', "r.jsonl:1: not valid JSON"),
        ("\n", "no rollouts"),
    ):
        path.write_text(text)
        with pytest.raises(DataError, match=error):
            read_pool(str(path))


def test_validation_target_is_the_plain_mean_of_the_usable_rows(tmp_path):
    """g_v = the mean of the non-zero, finite rows: listed zero rows, rows found zero and rows with
    a NaN or an infinity are left out; a one-row --mean-of-rows file is g_v as it is."""
    rows = np.array(
        [
            [2, 0, 4],
            [0, 0, 0],
            [4, 2, 0],
            [np.nan, 1, 1],
            [0, 4, 2],
            [0, 0, 0],
            [np.inf, 0, 0],
            [1, 1, 1],
        ],
        dtype=np.float32,
    )
    # usable: rows 0, 2, 4 (row 1 is listed zero, row 5 found zero, rows 3 and 6 not finite, row 7
    # listed zero)
    # g_v = ((2,0,4) + (4,2,0) + (0,4,2)) / 3 = (6,6,6) / 3 = (2,2,2)
    for dtype in (np.float32, np.float16):
        write_sketch(
            tmp_path / "v.npy", rows.astype(dtype), [f"v{i}" for i in range(8)], zero_rows=[1, 7]
        )
        target, report = validation_target(str(tmp_path / "v.npy"), META, "train.npy", chunk_rows=3)
        assert target.dtype == np.float64 and target.tolist() == [2.0, 2.0, 2.0]
        assert report == {"name": "v", "rows": 8, "rows_averaged": 3, "mean_of": None}

    mean_of = {"rows": [0, 4, 9], "ids": ["a", "e", "j"], "count": 3, "seed": 5}
    write_sketch(
        tmp_path / "m.npy", np.array([[0.5, -1, 3]], np.float32), ["mean"], mean_of=mean_of
    )
    target, report = validation_target(str(tmp_path / "m.npy"), META, "train.npy")
    assert (
        target.tolist() == [0.5, -1.0, 3.0]
        and report["rows_averaged"] == 1
        and report["mean_of"] == mean_of
    )

    write_sketch(tmp_path / "z.npy", rows[[1, 3, 5]], ["z0", "z1", "z2"])
    with pytest.raises(DataError, match="--val-sketch .*z.npy: no usable rows"):
        validation_target(str(tmp_path / "z.npy"), META, "train.npy")


# ----------------------------------------------------------------------------------------------
# The script, run as a user runs it
# ----------------------------------------------------------------------------------------------


def test_cropi_selects_the_hand_worked_rows(hand_pool):
    run_script(*hand_pool("out", "--seed", "3"))
    out = hand_pool.folder / "out"
    assert subset_ids(out) == ["p0", "p3", "p2", "p4"]
    first = json.loads((out / "subset.jsonl").read_text().splitlines()[0])
    assert first == {"id": "p0", "prompt": "0+1", "answer": "1", "skill": "add"}

    selection = json.loads((out / "selection.json").read_text())
    assert (selection["pool_size"], selection["n_select"], selection["num_selected"]) == (8, 4, 4)
    assert (
        selection["eligible"],
        selection["excluded_zero_gradient"],
        selection["excluded_nonfinite"],
    ) == (6, 1, 1)
    assert [v["rows_averaged"] for v in selection["validation_sets"]] == [2, 2]
    # set A averages its rows 0 and 1 (row 2 is zero, row 3 not finite):
    # ((1,1,0) + (1,-1,0)) / 2 = (1,0,0)
    assert [(v["name"], v["rows"], v["mean_of"]) for v in selection["validation_sets"]] == [
        ("val_a", 4, None),
        ("val_b", 2, None),
    ]
    scores = np.load(out / "scores.npy")
    np.testing.assert_allclose(
        scores[[0, 3, 2, 4], 3], [1.25, 1.25, 1.0, 1 / 3], rtol=1e-6
    )  # fused, selected rows
    eligible = ~np.isnan(scores[:, 3])  # p2 is 2nd under both sets
    assert [rank_descending(scores[:, v], eligible).tolist().index(2) + 1 for v in (1, 2)] == [2, 2]
    np.testing.assert_allclose(scores[2, 1:3], [SQRT_HALF, SQRT_HALF], rtol=1e-6)

    assert selection["score_columns"] == ["pass_rate", "cosine:val_a", "cosine:val_b", "fused"]
    np.testing.assert_allclose(scores[:, 0], [0.25, 1, 0.5, 0.75, 0.25, 0.5, 0.25, 0.75])
    expected_cosines = [
        [1, 0],
        [np.nan, np.nan],
        [SQRT_HALF, SQRT_HALF],
        [0, 1],
        [0.6, 0],
        [0, SQRT_HALF],
        [np.nan, np.nan],
        [-1, 0],
    ]
    np.testing.assert_allclose(scores[:, 1:3], expected_cosines, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        scores[:, 3], [1.25, np.nan, 1, 1.25, 1 / 3, 1 / 3, np.nan, 0], rtol=1e-6
    )


def test_cropi_rrf_k_60_reorders(hand_pool):
    run_script(*hand_pool("out60", "--rrf-k", "60"))
    assert subset_ids(hand_pool.folder / "out60") == ["p2", "p0", "p3", "p4"]
    fused = np.load(hand_pool.folder / "out60" / "scores.npy")[[2, 0, 3, 4], 3]
    np.testing.assert_allclose(fused, [2 / 62, 1 / 61 + 1 / 64, 1 / 61 + 1 / 64, 1 / 63], rtol=1e-6)


def test_ratio_one_selects_every_eligible_row_and_tiny_ratio_is_refused(hand_pool):
    result = run_script(*hand_pool("all", "--ratio", "1.0"))
    selection = json.loads((hand_pool.folder / "all" / "selection.json").read_text())
    assert sorted(subset_ids(hand_pool.folder / "all")) == ["p0", "p2", "p3", "p4", "p5", "p7"]
    assert (
        selection["num_selected"] == 6
        and selection["n_select"] == 8
        and "only 6 rows" in selection["note"]
    )
    assert "selected 6 of 8" in result.stdout and "by skill: add 3/4, sub 3/4" in result.stdout

    result = run_script(*hand_pool("none", "--ratio", "0.1"), check=False)
    assert result.returncode != 0 and "selects 0 rows" in result.stderr
    assert not (hand_pool.folder / "none").exists()


def test_refuses_mismatched_sketches(hand_pool):
    folder = hand_pool.folder
    write_sketch(folder / "val_other.npy", VAL_B, ["b0", "b1"], sparse_ratio=0.15)
    result = run_script(
        *hand_pool("bad1", "--val-sketch", str(folder / "val_other.npy")), check=False
    )
    assert result.returncode != 0
    assert "'sparse_ratio'" in result.stderr and "1.0" in result.stderr and "0.15" in result.stderr
    assert "train.npy" in result.stderr and "val_other.npy" in result.stderr

    # ids of the train sketch in another order than the rollouts file
    write_sketch(
        folder / "train.npy",
        TRAIN_SKETCH,
        [f"p{i}" for i in (1, 0, 2, 3, 4, 5, 6, 7)],
        zero_rows=[1],
    )
    result = run_script(*hand_pool("bad2"), check=False)
    assert (
        result.returncode != 0
        and "does not match --train-rollouts" in result.stderr
        and "row 0" in result.stderr
    )

    # .npy with another row count than its .json
    write_sketch(folder / "train.npy", TRAIN_SKETCH[:7], [f"p{i}" for i in range(8)])
    result = run_script(*hand_pool("bad3"), check=False)
    assert result.returncode != 0 and "has 7 rows" in result.stderr and "rows=8" in result.stderr
    assert not any((folder / name).exists() for name in ("bad1", "bad2", "bad3"))


def test_the_target_is_the_mean_of_every_usable_validation_row(tmp_path):
    """4 validation rows, one zero, one not finite: the target is ((3,0,0) + (0,3,0)) / 2 =
    (1.5,1.5,0), whatever the seed; train rows along e_0 or e_1 score 1/sqrt2, along e_2 0."""
    rollouts = write_rollouts(tmp_path / "r.jsonl", [[1, 0]] * 4)
    train = write_sketch(
        tmp_path / "train.npy", np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], ["p0", "p1", "p2", "p3"]
    )
    val = write_sketch(
        tmp_path / "val.npy",
        np.array([[3, 0, 0], [0, 0, 0], [0, 3, 0], [np.nan, 0, 1]], np.float32),
        ["v0", "v1", "v2", "v3"],
    )
    base = [
        "select_data.py",
        "--train-rollouts",
        str(rollouts),
        "--train-sketch",
        str(train),
        "--val-sketch",
        str(val),
        "--ratio",
        "0.5",
    ]
    for seed in ("0", "1"):
        run_script(*base, "--seed", seed, "--out", str(tmp_path / seed))
        selection = json.loads((tmp_path / seed / "selection.json").read_text())
        assert selection["validation_sets"][0]["rows_averaged"] == 2
        expected = [SQRT_HALF, SQRT_HALF, 0.0, SQRT_HALF]
        np.testing.assert_allclose(
            np.load(tmp_path / seed / "scores.npy")[:, 1], expected, atol=1e-6
        )
        assert subset_ids(tmp_path / seed) == ["p0", "p1"]  # ties by row index


def test_influence_once_reissues_the_stage0_selection(hand_pool):
    folder = hand_pool.folder
    run_script(*hand_pool("stage0", "--rrf-k", "60"))
    rollouts = str(folder / "train_rollouts.jsonl")
    reuse = [
        "select_data.py",
        "--train-rollouts",
        rollouts,
        "--method",
        "influence_once",
        "--ratio",
        "0.5",
    ]
    run_script(*reuse, "--reuse-selection", str(folder / "stage0"), "--out", str(folder / "stage3"))
    assert (folder / "stage3" / "subset.jsonl").read_text() == (
        folder / "stage0" / "subset.jsonl"
    ).read_text()
    selection = json.loads((folder / "stage3" / "selection.json").read_text())
    assert selection["method"] == "influence_once" and selection["reused_from"] == str(
        folder / "stage0"
    )
    np.testing.assert_array_equal(
        np.load(folder / "stage3" / "scores.npy"), np.load(folder / "stage0" / "scores.npy")
    )

    result = run_script(
        *reuse[:-2],
        "--ratio",
        "0.25",
        "--reuse-selection",
        str(folder / "stage0"),
        "--out",
        str(folder / "x1"),
        check=False,
    )
    assert result.returncode != 0 and "N_sel=4" in result.stderr and "N_sel=2" in result.stderr
    run_script(
        "select_data.py",
        "--train-rollouts",
        rollouts,
        "--method",
        "random",
        "--ratio",
        "0.5",
        "--out",
        str(folder / "random"),
    )
    result = run_script(
        *reuse,
        "--reuse-selection",
        str(folder / "random"),
        "--out",
        str(folder / "x2"),
        check=False,
    )
    assert result.returncode != 0 and "method 'random', not 'cropi'" in result.stderr
    other = write_rollouts(folder / "other.jsonl", TRAIN_REWARDS[:7])
    result = run_script(
        "select_data.py",
        "--train-rollouts",
        str(other),
        *reuse[3:],
        "--reuse-selection",
        str(folder / "stage0"),
        "--out",
        str(folder / "x3"),
        check=False,
    )
    assert result.returncode != 0 and "ids differ" in result.stderr
    subset = (folder / "stage0" / "subset.jsonl").read_text().splitlines()
    (folder / "stage0" / "subset.jsonl").write_text(
        "\n".join(subset[1:] + subset[:1]) + "\n"
    )  # reordered
    result = run_script(
        *reuse,
        "--reuse-selection",
        str(folder / "stage0"),
        "--out",
        str(folder / "x4"),
        check=False,
    )
    assert (
        result.returncode != 0
        and "subset.jsonl is not the subset that selection.json records" in result.stderr
    )


def test_cropi_needs_sketches(hand_pool):
    rollouts = str(hand_pool.folder / "train_rollouts.jsonl")
    result = run_script(
        "select_data.py",
        "--train-rollouts",
        rollouts,
        "--out",
        str(hand_pool.folder / "o"),
        check=False,
    )
    assert (
        result.returncode != 0
        and "needs --train-sketch and at least one --val-sketch" in result.stderr
    )


def test_baselines_on_synthetic_rollouts(tiny_model, tmp_path):
    """The baselines on a rollouts file in collect_rollouts.py's real schema (conftest's synthetic
    rollouts)."""
    rows = make_synthetic_rollouts(tiny_model, tmp_path / "r.jsonl", n_prompts=20, k=4)
    p = np.array([np.mean(row["rewards"]) for row in rows])
    base = ["select_data.py", "--train-rollouts", str(tmp_path / "r.jsonl"), "--ratio", "0.25"]

    run_script(*base, "--method", "full", "--out", str(tmp_path / "full"))
    assert subset_ids(tmp_path / "full") == [row["id"] for row in rows]

    run_script(*base, "--method", "learnability", "--out", str(tmp_path / "learn"))
    learnability = p * (1 - p)
    chosen = [int(i[1:]) for i in subset_ids(tmp_path / "learn")]
    assert len(chosen) == 5 and min(learnability[chosen]) >= max(np.delete(learnability, chosen))
    assert learnability[chosen].tolist() == sorted(learnability[chosen], reverse=True)
    columns = json.loads((tmp_path / "learn" / "selection.json").read_text())["score_columns"]
    assert columns == ["pass_rate", "learnability"]
    np.testing.assert_allclose(
        np.load(tmp_path / "learn" / "scores.npy"), np.column_stack([p, learnability]), rtol=1e-6
    )

    result = run_script(*base, "--method", "pass_rate", "--out", str(tmp_path / "pass"))
    assert all(0 < p[int(i[1:])] < 1 for i in subset_ids(tmp_path / "pass"))
    assert "by skill:" in result.stdout and "offline pass rate" in result.stdout

    for seed, out in (("1", "r1"), ("1", "r1b"), ("2", "r2")):
        run_script(*base, "--method", "random", "--seed", seed, "--out", str(tmp_path / out))
    assert (
        subset_ids(tmp_path / "r1") == subset_ids(tmp_path / "r1b") != subset_ids(tmp_path / "r2")
    )
    assert len(subset_ids(tmp_path / "r1")) == 5
    subset_row = json.loads((tmp_path / "r1" / "subset.jsonl").read_text().splitlines()[0])
    assert set(subset_row) == {"id", "prompt", "answer", "skill"}


def test_rerun_with_same_arguments_is_a_no_op(hand_pool):
    run_script(*hand_pool("again"))
    marker = hand_pool.folder / "again" / "selection.json"
    before = marker.stat().st_mtime_ns
    result = run_script(*hand_pool("again"))
    assert "nothing to do" in result.stdout and marker.stat().st_mtime_ns == before
    run_script(*hand_pool("again", "--rrf-k", "60"))  # other arguments: selected again
    assert subset_ids(hand_pool.folder / "again") == ["p2", "p0", "p3", "p4"]


def test_float16_chunks_match_one_float64_pass(tmp_path):
    """Many small chunks of a float16 sketch give the cosines of one float64 computation (to float32
    precision)."""
    rng = np.random.default_rng(0)
    sketch = rng.standard_normal((50, 16)).astype(np.float16)
    val = rng.standard_normal((10, 16)).astype(np.float16)
    ids = [f"p{i}" for i in range(50)]
    rollouts = write_rollouts(tmp_path / "r.jsonl", [[1, 0, 1]] * 50)
    write_sketch(tmp_path / "t.npy", sketch, ids, proj_dim=16)
    write_sketch(tmp_path / "v.npy", val, [f"v{i}" for i in range(10)], proj_dim=16)
    run_script(
        "select_data.py",
        "--train-rollouts",
        str(rollouts),
        "--train-sketch",
        str(tmp_path / "t.npy"),
        "--val-sketch",
        str(tmp_path / "v.npy"),
        "--ratio",
        "0.2",
        "--chunk-rows",
        "7",
        "--out",
        str(tmp_path / "o"),
    )
    target = val.astype(np.float64).mean(axis=0)
    x = sketch.astype(np.float64)
    expected = x @ target / np.linalg.norm(x, axis=1) / np.linalg.norm(target)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "scores.npy")[:, 1], expected, atol=1e-6)
    assert subset_ids(tmp_path / "o") == [
        f"p{i}" for i in np.argsort(-expected, kind="stable")[:10]
    ]
