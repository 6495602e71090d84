"""The pieces of bench/sketch_bench.py its figures rest on: precision@10%, the fidelity study's bookkeeping, and the
peak-memory measurement."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import sketch_bench as sb  # noqa: E402
import sketch_grads as sg  # noqa: E402
from conftest import make_synthetic_rollouts  # noqa: E402

CPU = torch.device("cpu")


def test_precision_at_by_hand():
    # 20 rows, so the top 10% is 2 rows. Exact top 2: rows 0 and 3. Sketch top 2: rows 0 and 7. Overlap 1 of 2.
    exact = np.zeros(20)
    exact[[0, 3]] = [0.9, 0.8]
    sketch = np.zeros(20)
    sketch[[0, 7, 3]] = [0.5, 0.4, 0.3]
    assert sb.precision_at(exact, sketch) == 0.5
    assert sb.precision_at(exact, exact) == 1.0
    assert sb.precision_at(exact[:10], -exact[:10]) == 0.0  # 10 rows: top 1; the reversed ranking misses it


def test_cosine_columns_by_hand():
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    columns = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # e_x and 3 e_y
    expected = [[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, -1.0]]
    np.testing.assert_allclose(sb.cosine_columns(rows, columns), expected, atol=1e-12)


@pytest.fixture(scope="module")
def study_inputs(tiny_model, tmp_path_factory):
    rows = make_synthetic_rollouts(tiny_model, tmp_path_factory.mktemp("bench") / "r.jsonl", n_prompts=9)
    args = dataclasses.replace(sg.Args(), model=str(tiny_model), projector="none", sparse_ratio=1.0, chunk_prompts=1)
    return sg.Sketcher(args, torch.device("cpu")), rows


def test_fidelity_study_projects_every_set_like_sketch_grads(study_inputs):
    sketcher, rows = study_inputs
    configs = [("countsketch", 0.5, "float32"), ("gaussian", 0.5, "float32"), ("gaussian", 0.5, "float16"),
               ("none", 0.5, "float32")]
    study = sb.FidelityStudy(sketcher, configs, proj_dim=64, seed=3)
    val_grads, train_grads = study.gradients(rows[:3]), study.gradients(rows[3:])
    targets = val_grads.double().mean(0, keepdim=True).T
    study.add("val", val_grads)
    study.add("train", train_grads[:4], (train_grads[:4].double(), targets))  # two chunks, as run_fidelity adds them
    study.add("train", train_grads[4:], (train_grads[4:].double(), targets))
    study.finish_dense()  # the dense inputs of both sets projected in one pass, then split back

    kept = sg.kept_coordinates(sketcher.num_params, 0.5, 3, torch.device("cpu"))
    for name, grads in (("val", val_grads), ("train", train_grads)):
        for projector in ("countsketch", "gaussian"):
            expected = sg.project(grads[:, kept], projector, 64, 3).double().numpy()
            # float32 sums in another order (one GEMM over both sets' rows): equal up to rounding
            np.testing.assert_allclose(study.sketch_matrix((projector, 0.5, "float32"), name), expected,
                                       atol=1e-5 * np.abs(expected).max())
        half = study.sketch_matrix(("gaussian", 0.5, "float16"), name)
        full = study.sketch_matrix(("gaussian", 0.5, "float32"), name)
        assert not np.array_equal(half, full)  # rounded ...
        np.testing.assert_allclose(half, full, rtol=2e-2, atol=1e-3 * np.abs(full).max())  # ... but close
    cosines = np.concatenate(study.sketches[("none", 0.5, "float32")]["train"])
    np.testing.assert_allclose(cosines, sb.cosine_columns(train_grads[:, kept].double(), targets[kept]), rtol=1e-10)


def test_run_fidelity_exact_ranking_scores_one(study_inputs):
    sketcher, rows = study_inputs
    args = sb.Args(proj_dim=64, chunk_prompts=2)
    configs = [("none", 1.0, "float32"), ("countsketch", 1.0, "float32")]
    result = sb.run_fidelity(sketcher, rows[3:], {"val": rows[:3]}, configs, args)
    by_projector = {r["projector"]: r["precision_at_10"] for r in result["results"]}
    assert by_projector["none"] == 1.0  # the exact gradients rank exactly as themselves
    assert result["train_prompts_nonzero"] == sum(not sg.is_zero_gradient(r["rewards"]) for r in rows[3:])


def test_peak_memory_is_the_child_process_own(tiny_model, tmp_path):
    make_synthetic_rollouts(tiny_model, tmp_path / "r.jsonl", n_prompts=4)
    ballast = torch.ones(1 << 29)  # 2 GiB resident in this (parent) process
    measured = sb.peak_memory(str(tiny_model), tmp_path / "r.jsonl", tmp_path / "s.npy", ["--proj-dim", "64"])
    assert ballast.sum() > 0
    assert (tmp_path / "s.npy").exists()
    assert measured["peak_rss_mb"] < 1500  # imports + a tiny model; ru_maxrss would report the parent's 2 GiB


def test_gradient_concentration_matches_a_full_sort(study_inputs):
    sketcher, rows = study_inputs
    mixed = [r for r in rows if not sg.is_zero_gradient(r["rewards"])][:2]
    result = sb.gradient_concentration(sketcher, mixed, fractions=(1e-3, 1e-2))
    squares = [sb.FidelityStudy(sketcher, [], 1, 0).gradients([r])[0].double() ** 2 for r in mixed]
    for fraction, key in ((1e-3, "0.1%"), (1e-2, "1%")):
        n = int(fraction * squares[0].numel())
        by_sort = np.mean([float(q.sort(descending=True).values[:n].sum() / q.sum()) for q in squares])
        assert result["top_share"][key] == pytest.approx(by_sort, rel=1e-9)
    assert result["top_share"]["0.1%"] < result["top_share"]["1%"] <= 1
    assert [name for name, _ in result["largest_tensor"]][0] in dict(sketcher.model.named_parameters())


def test_kronecker_project_of_exact_gradients_is_the_batched_sketch(tiny_model, study_inputs):
    """The fidelity study's "kronecker k=K" (the linear map applied to exact per-prompt gradients) equals what
    sketch_grads.py's batched hooks compute from one forward+backward per token budget, on random factors."""
    sketcher, rows = study_inputs
    config = ("kronecker k=8", 1.0, "float32")
    study = sb.FidelityStudy(sketcher, [config], proj_dim=64, seed=3)
    study.add("train", study.gradients(rows))
    assert all(p.requires_grad for p in sketcher.parameters)  # the study's hooks were removed at once
    batched = sg.Sketcher(dataclasses.replace(sg.Args(), model=str(sketcher.args.model), projector="kronecker",
                                              kronecker_dim=8, proj_dim=64, seed=3, token_budget=100), CPU)
    expected = sb.batched_sketches(batched, rows, 4)
    got = study.sketch_matrix(config, "train")
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
