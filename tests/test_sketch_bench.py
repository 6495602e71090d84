"""The pieces of bench/sketch_bench.py its figures rest on: precision@10%, the fidelity study's
bookkeeping (against sketch_grads.py's own sketches), and the peak-memory measurement."""

import itertools
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import sketch_bench as sb  # noqa: E402
from conftest import make_synthetic_rollouts  # noqa: E402

import sketch_grads as sg  # noqa: E402

CPU = torch.device("cpu")


def test_precision_at_by_hand():
    # 20 rows: the top 10% is 2 rows. Exact top 2: rows 0 and 3. Sketch top 2: rows 0 and 7.
    exact = np.zeros(20)
    exact[[0, 3]] = [0.9, 0.8]
    sketch = np.zeros(20)
    sketch[[0, 7, 3]] = [0.5, 0.4, 0.3]
    assert sb.precision_at(exact, sketch) == 0.5
    assert sb.precision_at(exact, exact) == 1.0
    # 10 rows: top 1; the reversed ranking misses it
    assert sb.precision_at(exact[:10], -exact[:10]) == 0.0


def test_cosine_columns_by_hand():
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    columns = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # e_x and 3 e_y
    expected = [[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, -1.0]]
    np.testing.assert_allclose(sb.cosine_columns(rows, columns), expected, atol=1e-12)


@pytest.fixture(scope="module")
def study_inputs(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "r.jsonl"
    rows = make_synthetic_rollouts(tiny_model, path, n_prompts=9)
    return sb.exact_sketcher(str(tiny_model)), rows


def test_kept_coordinates_are_those_the_stage_does_not_give_sign_0(study_inputs):
    sketcher, _ = study_inputs
    d = sb.num_params(sketcher)
    kept = sb.kept_coordinates(d, 0.5, 3, 64)
    args = sg.Args(projector="none", sparse_ratio=0.5, seed=3)  # P = I: a row of 1 where S keeps
    ones = torch.ones(1, d)
    indicator = sb.countsketch_project(
        sg.CountSketch(sketcher.parameters, args, CPU), sketcher.parameters, ones
    )
    assert torch.equal(kept, torch.nonzero(indicator[0]).squeeze(1))
    assert 0.45 * d < len(kept) < 0.55 * d
    assert torch.equal(sb.kept_coordinates(d, 1.0, 3, 64), torch.arange(d))


def test_fidelity_study_projects_every_set_like_sketch_grads(tiny_model, study_inputs):
    sketcher, rows = study_inputs
    configs = [
        ("countsketch", 0.5, "float32"),
        ("gaussian", 0.5, "float32"),
        ("gaussian", 0.5, "float16"),
        ("none", 0.5, "float32"),
    ]
    study = sb.FidelityStudy(sketcher, configs, proj_dim=64, seed=3)
    val_grads, train_grads = (
        sb.exact_gradients(sketcher, rows[:3]),
        sb.exact_gradients(sketcher, rows[3:]),
    )
    targets = val_grads.double().mean(0, keepdim=True).T
    study.add("val", val_grads)
    # two chunks, as run_fidelity adds them
    study.add("train", train_grads[:4], (train_grads[:4].double(), targets))
    study.add("train", train_grads[4:], (train_grads[4:].double(), targets))
    study.finish_dense()  # the dense inputs of both sets projected in one pass, then split back

    # countsketch: the stage's CountSketch of each prompt's .grad (its --batched-backward off
    # path), and what sketch_grads.py writes by default (its batched backward, hooks)
    stage_args = sg.Args(model=str(tiny_model), proj_dim=64, seed=3, sparse_ratio=0.5)
    stage = sg.Sketcher(stage_args, CPU, 0, 1)
    assert stage.hooks is not None
    sketch = sg.CountSketch(sketcher.parameters, stage_args, CPU)
    kept = sb.kept_coordinates(sb.num_params(sketcher), 0.5, 3, 64)
    for name, set_rows, grads in (("val", rows[:3], val_grads), ("train", rows[3:], train_grads)):
        got = study.sketch_matrix(("countsketch", 0.5, "float32"), name)
        sketch.start(len(grads))
        for b, p in itertools.product(range(len(grads)), sketcher.parameters):
            offset = sketch.offset[id(p)]
            sketch.add([b], p, grads[b, offset : offset + p.numel()].view(p.shape))
        expected = sketch.rows().double().numpy()
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
        written = stage.sketch_groups([[row] for row in set_rows]).double().numpy()
        np.testing.assert_allclose(got, written, rtol=1e-4, atol=1e-5 * np.abs(written).max())
        expected = sb.dense_project(grads[:, kept], "gaussian", 64, 3).double().numpy()
        # float32 sums in another order (one GEMM over both sets' rows): equal up to rounding
        np.testing.assert_allclose(
            study.sketch_matrix(("gaussian", 0.5, "float32"), name),
            expected,
            atol=1e-5 * np.abs(expected).max(),
        )
        half = study.sketch_matrix(("gaussian", 0.5, "float16"), name)
        full = study.sketch_matrix(("gaussian", 0.5, "float32"), name)
        assert not np.array_equal(half, full)  # rounded ...
        np.testing.assert_allclose(
            half, full, rtol=2e-2, atol=1e-3 * np.abs(full).max()
        )  # ... but close
    cosines = np.concatenate(study.sketches[("none", 0.5, "float32")]["train"])
    np.testing.assert_allclose(
        cosines, sb.cosine_columns(train_grads[:, kept].double(), targets[kept]), rtol=1e-10
    )


def test_dense_projection_is_blockwise_and_scaled(monkeypatch):
    """grads @ P with P's rows generated block by block (one generator each): +-1/sqrt(N) or
    N(0, 1/N) entries; another block size gives another matrix of the same law."""
    grads = torch.randn(3, 50)
    one_block = sb.dense_block("rademacher", 1, 0, 50, 8)
    assert torch.allclose(one_block.abs(), torch.tensor(8**-0.5))
    np.testing.assert_allclose(
        sb.dense_project(grads, "rademacher", 8, 1), grads @ one_block, atol=1e-5
    )
    monkeypatch.setattr(sb, "DENSE_BLOCK_FLOATS", 8 * 7)  # 7 rows a block
    blocks = torch.cat(
        [sb.dense_block("rademacher", 1, b, min(7, 50 - 7 * b), 8) for b in range(8)]
    )
    assert torch.equal(blocks[:7], one_block[:7]) and not torch.equal(blocks, one_block)
    np.testing.assert_allclose(
        sb.dense_project(grads, "rademacher", 8, 1), grads @ blocks, atol=1e-5
    )
    gaussian = sb.dense_block("gaussian", 1, 0, 4000, 8)
    assert gaussian.std().item() == pytest.approx(8**-0.5, rel=0.03)
    assert abs(gaussian.mean().item()) < 0.01


def test_run_fidelity_exact_ranking_scores_one(study_inputs):
    sketcher, rows = study_inputs
    args = sb.Args(proj_dim=64, chunk_prompts=2)
    configs = [("none", 1.0, "float32"), ("countsketch", 1.0, "float32")]
    result = sb.run_fidelity(sketcher, rows[3:], {"val": rows[:3]}, configs, args)
    by_projector = {r["projector"]: r["precision_at_10"] for r in result["results"]}
    assert by_projector["none"] == 1.0  # the exact gradients rank exactly as themselves
    assert result["train_prompts_nonzero"] == sum(
        not sg.is_zero_gradient(r["rewards"]) for r in rows[3:]
    )


def test_peak_memory_is_the_child_process_own(tiny_model, tmp_path):
    make_synthetic_rollouts(tiny_model, tmp_path / "r.jsonl", n_prompts=4)
    ballast = torch.ones(1 << 29)  # 2 GiB resident in this (parent) process
    measured = sb.peak_memory(
        str(tiny_model), tmp_path / "r.jsonl", tmp_path / "s.npy", ["--proj-dim", "64"]
    )
    assert ballast.sum() > 0
    assert (tmp_path / "s.npy").exists()
    # imports + a tiny model; ru_maxrss would report the parent's 2 GiB
    assert measured["peak_rss_mb"] < 1500


def test_gradient_concentration_matches_a_full_sort(study_inputs):
    sketcher, rows = study_inputs
    mixed = [r for r in rows if not sg.is_zero_gradient(r["rewards"])][:2]
    result = sb.gradient_concentration(sketcher, mixed, fractions=(1e-3, 1e-2))
    squares = [sb.exact_gradients(sketcher, [r])[0].double() ** 2 for r in mixed]
    for fraction, key in ((1e-3, "0.1%"), (1e-2, "1%")):
        n = int(fraction * squares[0].numel())
        by_sort = np.mean(
            [float(q.sort(descending=True).values[:n].sum() / q.sum()) for q in squares]
        )
        assert result["top_share"][key] == pytest.approx(by_sort, rel=1e-9)
    assert result["top_share"]["0.1%"] < result["top_share"]["1%"] <= 1
    assert [name for name, _ in result["largest_tensor"]][0] in dict(
        sketcher.model.named_parameters()
    )


def test_exact_gradients_are_the_stage_projector_none(tiny_model, study_inputs, tmp_path):
    """The bench's exact gradients equal what sketch_grads.py --projector none writes."""
    sketcher, rows = study_inputs
    path = tmp_path / "r.jsonl"
    make_synthetic_rollouts(tiny_model, path, n_prompts=9)
    out = tmp_path / "exact.npy"
    sg.main(sg.Args(model=str(tiny_model), rollouts=str(path), out=str(out), projector="none"))
    expected = np.load(out)
    got = sb.exact_gradients(sketcher, rows).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    kept = sb.kept_coordinates(sb.num_params(sketcher), 0.5, 0, 64)
    np.testing.assert_array_equal(
        sb.exact_gradients(sketcher, rows[:2], kept).numpy(), got[:2, kept]
    )


def test_time_batched_times_full_batches_in_turn_and_keeps_each_batch(tiny_model, study_inputs):
    """Fewer full batches than --timed-batches: they are timed again in turn (the partial one
    never); each batch's CPU seconds are kept, in order, beside the per-prompt means."""
    _, rows = study_inputs  # 9 prompts: batches of 4, 4 and 1
    args = sb.Args(proj_dim=64, batch_prompts=4, timed_batches=3)
    timed = sb.time_batched(str(tiny_model), rows, args, names=("default", "bare_batched"))
    assert (timed["prompts"], timed["distinct_prompts"]) == (12, 8)  # batches 1, 2, 1
    for name in ("default", "bare_batched"):
        per_batch = timed["cpu_seconds_per_batch"][name]
        assert len(per_batch) == 3 and all(seconds > 0 for seconds in per_batch)
        assert timed["cpu_seconds_per_prompt"][name] == pytest.approx(sum(per_batch) / 12)


def test_lengthen_responses_pads_with_seeded_tokens_of_uniform_logprob():
    config = types.SimpleNamespace(vocab_size=50, max_position_embeddings=12)
    rows = [
        dict(
            id="a",
            prompt_ids=[1, 2],
            response_ids=[[3], [4, 5, 6]],
            behavior_logprobs=[[-1.0], [-1, -2, -3]],
        )
    ]
    longer = sb.lengthen_responses(rows, 4, config, seed=0)
    assert [len(r) for r in longer[0]["response_ids"]] == [4, 4]
    assert longer[0]["response_ids"][0][:1] == [3] and longer[0]["response_ids"][1][:3] == [4, 5, 6]
    assert longer[0]["behavior_logprobs"][0] == [-1.0] + [-math.log(50)] * 3
    assert longer[0]["behavior_logprobs"][1] == [-1, -2, -3, -math.log(50)]
    assert all(0 <= t < 50 for r in longer[0]["response_ids"] for t in r)
    assert sb.lengthen_responses(rows, 4, config, seed=0) == longer  # seeded
    assert rows[0]["response_ids"] == [[3], [4, 5, 6]]  # the input left as it was
    with pytest.raises(sb.DataError, match="--floor-response-tokens 11"):
        sb.lengthen_responses(rows, 11, config, seed=0)  # 2 + 11 > 12 positions
