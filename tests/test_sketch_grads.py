"""sketch_grads.py: the POPI surrogate, the CountSketch (with the sparse ratio as sign 0), the
batched backward, and the script as a user runs it (tiny GPT-2 and a tiny Qwen2)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, make_synthetic_rollouts, run_script

import select_data
import sketch_grads as sg
from common import group_advantages, response_logprobs, token_budget_batches
from plumbing.cli import DataError
from plumbing.models import load_model

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The surrogate, by hand
# ----------------------------------------------------------------------------------------------


def test_importance_ratio_by_hand():
    current = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    behavior = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rho = sg.importance_ratio(current, behavior, mask)
    assert torch.allclose(rho, torch.tensor([[2.0, 0.5, 0.0]]))  # 0.5/0.25, 0.2/0.4, padding -> 0


def test_popi_surrogate_by_hand():
    # K = 2 responses of lengths 2 and 1; rho = [[2, 0.5], [4, -]]; A = [1, -1]
    # L = (1/2) * [ (2 + 0.5)/2 * 1 + (4/1) * (-1) ] = (1/2) * (1.25 - 4) = -1.375
    current = torch.log(torch.tensor([[0.5, 0.2], [0.8, 1.0]]))
    behavior = torch.log(torch.tensor([[0.25, 0.4], [0.2, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    assert sg.popi_surrogate(current, behavior, mask, advantages, 2).item() == pytest.approx(-1.375)
    # micro-batches add up: each row alone, still divided by K = 2
    parts = sum(
        sg.popi_surrogate(
            current[i : i + 1], behavior[i : i + 1], mask[i : i + 1], advantages[i : i + 1], 2
        )
        for i in range(2)
    )
    assert parts.item() == pytest.approx(-1.375)


def test_surrogate_gradient_is_rho_weighted_policy_gradient():
    # d/dtheta of rho*A is rho * A * dlogpi/dtheta: check on a one-parameter "policy"
    theta = torch.tensor(0.3, requires_grad=True)
    current = torch.stack([theta * 2, theta * -1])[None]  # log pi of two tokens
    behavior = torch.tensor([[0.1, -0.5]])
    mask = torch.ones(1, 2)
    sg.popi_surrogate(current, behavior, mask, torch.tensor([1.5]), 1).backward()
    rho = torch.exp(torch.tensor([0.6 - 0.1, -0.3 + 0.5]))
    expected = (rho[0] * 2 + rho[1] * -1) / 2 * 1.5
    assert theta.grad.item() == pytest.approx(expected.item(), rel=1e-6)


def test_surrogate_terms_by_hand():
    # rewards [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 -> A = [1.5, -0.5, -0.5, -0.5] (eps aside);
    # w = A / K
    rows = [{"rewards": [1, 0, 0, 0]}, {"rewards": [1, 1]}]  # the second: all equal, no terms
    terms = sg.surrogate_terms([[rows[0]], [rows[1]]], weight=2.0)
    assert [(t.group, t.k) for t in terms] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [t.weight for t in terms] == pytest.approx(
        [2 * 1.5 / 4, -2 * 0.5 / 4, -2 * 0.5 / 4, -2 * 0.5 / 4], rel=1e-3
    )


def test_token_budget_batches_in_input_order():
    assert token_budget_batches([3, 3, 3, 3], 6, longest_first=False) == [[0, 1], [2, 3]]
    assert token_budget_batches([2, 5, 1], 10, longest_first=False) == [
        [0, 1],
        [2],
    ]  # 2 x 5 fits; 3 x 5 not
    assert token_budget_batches([20, 1], 8, longest_first=False) == [
        [0],
        [1],
    ]  # too long alone: its own batch
    assert token_budget_batches([1, 1, 1], 100, longest_first=False) == [[0, 1, 2]]


def test_is_zero_gradient():
    assert (
        sg.is_zero_gradient([1.0, 1.0, 1.0])
        and sg.is_zero_gradient([0.0])
        and not sg.is_zero_gradient([0, 1])
    )


def test_mean_sample_by_hand():
    rows = [
        {"rewards": [0, 1] if i % 3 else [1, 1]} for i in range(40)
    ]  # rows 0, 3, 6, ... have no gradient
    mixed = [i for i in range(40) if i % 3]
    assert (
        sg.mean_sample(rows, 100, seed=0, rollouts="r") == mixed
    )  # fewer than the cap: all of them
    sample = sg.mean_sample(rows, 5, seed=1, rollouts="r")
    assert len(sample) == 5 and set(sample) <= set(mixed) and sample == sorted(sample)
    assert (
        sample
        == sg.mean_sample(rows, 5, seed=1, rollouts="r")
        != sg.mean_sample(rows, 5, seed=2, rollouts="r")
    )
    with pytest.raises(DataError, match="no prompt of r.jsonl has mixed rewards"):
        sg.mean_sample([{"rewards": [1, 1]}], 5, 0, "r.jsonl")


# ----------------------------------------------------------------------------------------------
# The CountSketch: h(i), s(i) from (seed, i); a coordinate S drops gets sign 0
# ----------------------------------------------------------------------------------------------


def sketch_of(
    vectors: torch.Tensor,
    proj_dim: int,
    seed: int,
    sparse_ratio: float = 1.0,
    projector: str = "countsketch",
) -> torch.Tensor:
    """P S of each row of vectors [B, d], as the stage computes it: one flat parameter of d
    coordinates."""
    p = torch.nn.Parameter(torch.zeros(vectors.shape[1]))
    sketch = sg.CountSketch(
        [p],
        sg.Args(proj_dim=proj_dim, seed=seed, sparse_ratio=sparse_ratio, projector=projector),
        CPU,
    )
    sketch.start(len(vectors))
    for b, row in enumerate(vectors):
        sketch.add([b], p, row)
    return sketch.rows()


def explicit_countsketch_matrix(d, n, seed, sparse_ratio=1.0):
    """The d x N matrix P S: row i holds s(i) = +1 (r odd) or -1 (r even) in column h(i) = r // 2,
    or nothing (r = 2N: a coordinate S drops)."""
    matrix = torch.zeros(d, n)
    for block, start in enumerate(range(0, d, sg.HASH_BLOCK)):
        size = min(sg.HASH_BLOCK, d - start)
        draws = sg.block_draws(seed, block, n, sparse_ratio, False, CPU)[:size].long()
        kept = draws < 2 * n
        rows = torch.arange(start, start + size)[kept]
        matrix[rows, draws[kept] // 2] = (draws[kept] % 2 * 2 - 1).float()
    return matrix


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(sg, "HASH_BLOCK", 64)  # several hash blocks on small vectors
    sg.block_draws.cache_clear()
    yield
    sg.block_draws.cache_clear()


def test_block_draws_depend_on_seed_and_block_only(small_blocks):
    draws = sg.block_draws(5, 2, 4, 1.0, False, CPU)
    assert draws.shape == (64,) and draws.min() >= 0 and draws.max() <= 7  # r in [0, 2N) = [0, 8)
    assert torch.equal(draws, sg.block_draws(5, 2, 4, 1.0, False, CPU).clone())
    assert not torch.equal(draws, sg.block_draws(5, 3, 4, 1.0, False, CPU))
    assert not torch.equal(draws, sg.block_draws(6, 2, 4, 1.0, False, CPU))
    # F < 1: the same draws where a coordinate is kept, 2N (sign 0) where S drops it; about F of
    # them kept
    sparse = sg.block_draws(5, 2, 4, 0.5, False, CPU)
    kept = sparse < 8
    assert (
        torch.equal(sparse[kept], draws[kept])
        and (sparse[~kept] == 8).all()
        and 16 < kept.sum() < 48
    )
    assert torch.equal(
        sg.block_draws(0, 1, 4, 1.0, True, CPU), torch.arange(64, 128) * 2 + 1
    )  # P = I


def test_countsketch_by_hand(monkeypatch):
    # N = 4, blocks of 4 coordinates; r of block 0 = [5, 2, 0, 7], of block 1 = [1, 6, 8, 3]
    # (8 = 2N: dropped)
    # r = 5: bucket 2, sign + | r = 2: bucket 1, sign - | r = 0: bucket 0, sign -
    # | r = 7: bucket 3, sign +
    # r = 1: bucket 0, sign + | r = 6: bucket 3, sign - | r = 8: sign 0
    # g = [1, 10, 100, 1000, 2, 20, 300]
    #   -> sketch = [-100 + 2, -10, +1, +1000 - 20] = [-98, -10, 1, 980]
    fixed = {0: [5, 2, 0, 7], 1: [1, 6, 8, 3]}
    monkeypatch.setattr(sg, "HASH_BLOCK", 4)
    monkeypatch.setattr(sg, "block_draws", lambda seed, block, **hash: torch.tensor(fixed[block]))
    g = torch.tensor([[1.0, 10.0, 100.0, 1000.0, 2.0, 20.0, 300.0]])
    assert sketch_of(g, 4, seed=0).tolist() == [[-98.0, -10.0, 1.0, 980.0]]
    # the same vector as two parameters, [0, 3) and [3, 7), each added in place
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    sketch = sg.CountSketch([a, b], sg.Args(proj_dim=4), CPU)
    sketch.start(1)
    sketch.add([0], a, g[0, :3])
    sketch.add([0], b, g[0, 3:])
    assert sketch.rows().tolist() == [[-98.0, -10.0, 1.0, 980.0]]


@pytest.mark.parametrize("sparse_ratio", [1.0, 0.3])
def test_countsketch_is_the_explicit_matrix(small_blocks, sparse_ratio):
    grads = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    matrix = explicit_countsketch_matrix(200, 16, seed=5, sparse_ratio=sparse_ratio)
    torch.testing.assert_close(
        sketch_of(grads, 16, 5, sparse_ratio), grads @ matrix, rtol=1e-5, atol=1e-5
    )
    assert (matrix != 0).sum(1).le(1).all() and set(matrix.unique().tolist()) <= {-1.0, 0.0, 1.0}
    kept = (matrix != 0).sum(1)
    assert kept.all() if sparse_ratio == 1 else 30 < kept.sum() < 90  # S keeps about 60 of 200


def test_parameters_rows_and_pieces_add_up(small_blocks):
    """A gradient added parameter by parameter, whole or by rows (a sharded parameter's own rows, an
    embedding's looked-up rows), for a list of groups and for every group at once, gives the sketch
    of the flattened vector (blocks cut across parameters)."""
    generator = torch.Generator().manual_seed(0)
    parameters = [
        torch.nn.Parameter(torch.zeros(shape)) for shape in [(10, 7), (3,), (50,), (4, 40), (1,)]
    ]
    grads = [torch.randn(2, *p.shape, generator=generator) for p in parameters]
    expected = sketch_of(torch.cat([g.reshape(2, -1) for g in grads], dim=1), 16, seed=9)
    sketch = sg.CountSketch(parameters, sg.Args(proj_dim=16, seed=9), CPU)
    sketch.start(2)
    sketch.add([0], parameters[0], grads[0][0, :6], rows=torch.arange(6))  # rows 0..5, then 6..9
    sketch.add([0], parameters[0], grads[0][0, 6:], rows=torch.arange(6, 10))
    sketch.add([1], parameters[0], grads[0][1])
    sketch.add([1, 0], parameters[1], grads[1].flip(0))  # groups listed in any order
    for p, g in zip(parameters[2:], grads[2:]):
        sketch.add(None, p, g.reshape(2, -1))
    torch.testing.assert_close(sketch.rows(), expected, rtol=1e-5, atol=1e-5)
    other = sg.CountSketch(parameters, sg.Args(proj_dim=16, seed=10), CPU)
    other.start(2)
    for p, g in zip(parameters, grads):
        other.add(None, p, g.reshape(2, -1))
    assert not torch.allclose(other.rows(), expected)


def test_draws_of_a_parameter_spanning_blocks(small_blocks):
    parameters = [
        torch.nn.Parameter(torch.zeros(n)) for n in (50, 100, 30)
    ]  # flat [0,50) [50,150) [150,180)
    sketch = sg.CountSketch(parameters, sg.Args(proj_dim=8, seed=1), CPU)
    whole = torch.cat([sg.block_draws(1, b, 8, 1.0, False, CPU) for b in range(3)])
    for p, start in zip(parameters, (0, 50, 150)):
        assert torch.equal(sketch.draws(p), whole[start : start + p.numel()])


def test_countsketch_preserves_inner_products():
    # JL: for N = 2048 the cosine of two sketched vectors is within a few / sqrt(N) ~ 0.02 of the
    # true one
    generator = torch.Generator().manual_seed(0)
    d, n = 20_000, 2048
    base = torch.randn(6, d, generator=generator)
    grads = (
        base + 0.7 * base[:1] + torch.randn(6, d, generator=generator) * torch.linspace(0.1, 3, d)
    )
    sketch = sketch_of(grads, n, seed=11)
    true_cos = (
        torch.nn.functional.normalize(grads, dim=1) @ torch.nn.functional.normalize(grads, dim=1).T
    )
    sketch_cos = (
        torch.nn.functional.normalize(sketch, dim=1)
        @ torch.nn.functional.normalize(sketch, dim=1).T
    )
    assert (sketch_cos - true_cos).abs().max() < 5 / math.sqrt(n)
    assert ((sketch.norm(dim=1) / grads.norm(dim=1)) - 1).abs().max() < 5 / math.sqrt(n)
    assert torch.equal(sketch, sketch_of(grads, n, seed=11))  # same seed, same sketch


# ----------------------------------------------------------------------------------------------
# The script: exact gradients against an independent autograd computation
# ----------------------------------------------------------------------------------------------


def independent_policy_gradients(model_dir, rows, rho_weighted):
    """Per prompt: grad of (1/K) sum_k A_k (1/|y_k|) sum_t [rho_{k,t}] log pi(y_{k,t}), rho held
    constant, one response at a time, flattened by named_parameters; zeros for all-equal rewards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    out = []
    for row in rows:
        advantages = group_advantages(torch.tensor(row["rewards"]))
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        if advantages.any():
            k = len(row["response_ids"])
            for i, response in enumerate(row["response_ids"]):
                logprobs, mask, _ = response_logprobs(
                    model, [row["prompt_ids"]], [response], row["temperature"]
                )
                weight = torch.ones_like(logprobs)
                if rho_weighted:
                    behavior = torch.tensor(row["behavior_logprobs"][i], dtype=torch.float64)[None]
                    weight = torch.exp(logprobs.detach() - behavior)
                objective = (weight * logprobs * mask).sum() / mask.sum() * advantages[i] / k
                grads = torch.autograd.grad(objective, params, allow_unused=True)
                total += torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads, params)
                    ]
                )
        out.append(total.numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def rollouts(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sketch") / "rollouts.jsonl"
    rows = make_synthetic_rollouts(tiny_model, path, n_prompts=8, k=4, temperature=0.7)
    return path, rows


def test_full_gradient_equals_on_policy_policy_gradient(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    out = tmp_path / "full.npy"
    run_script(
        "sketch_grads.py",
        "--model",
        str(tiny_model),
        "--rollouts",
        str(path),
        "--out",
        str(out),
        "--projector",
        "none",
        "--sparse-ratio",
        "1",
        "--chunk-prompts",
        "3",
        "--token-budget",
        "40",
        env={"OMP_NUM_THREADS": "1"},
    )
    sketch, meta = np.load(out), json.loads(out.with_suffix(".json").read_text())
    expected = independent_policy_gradients(
        tiny_model, rows, rho_weighted=False
    )  # theta = beta: rho = 1
    assert sketch.shape == expected.shape == (8, meta["num_params"]) and sketch.dtype == np.float32
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(sketch, expected, atol=2e-5 * scale, rtol=1e-4)
    assert (
        meta["zero_rows"] == [3, 7]
        and not sketch[[3, 7]].any()
        and np.abs(sketch[[0, 1, 2]]).sum(1).min() > 0
    )
    assert (
        meta["ids"] == [r["id"] for r in rows]
        and meta["nonfinite_rows"] == []
        and meta["rows"] == 8
    )
    assert meta["proj_dim"] == meta["num_params"] and meta["projector"] == "none"
    assert not (tmp_path / "full.npy.parts").exists()


def test_perturbed_policy_gives_rho_weighted_gradient(tiny_model, rollouts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, rows = rollouts
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    perturbed = tmp_path / "perturbed"
    model.save_pretrained(perturbed)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(perturbed)
    out = tmp_path / "rho.npy"
    sg.main(
        sg.Args(
            model=str(perturbed),
            rollouts=str(path),
            out=str(out),
            projector="none",
            sparse_ratio=1.0,
        )
    )
    sketch = np.load(out)
    expected = independent_policy_gradients(perturbed, rows, rho_weighted=True)
    on_policy = independent_policy_gradients(perturbed, rows, rho_weighted=False)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(sketch, expected, atol=2e-5 * scale, rtol=1e-4)
    assert np.abs(sketch - on_policy).max() > 100 * 2e-5 * scale  # rho really differs from 1 here


def test_gradient_checkpointing_and_a_sparse_exact_gradient(tiny_model, rollouts, tmp_path):
    """--projector none with F < 1: the exact gradient with the coordinates S drops set to 0 (sign
    0)."""
    path, rows = rollouts
    full, kept = tmp_path / "full.npy", tmp_path / "kept.npy"
    sg.main(
        sg.Args(
            model=str(tiny_model),
            rollouts=str(path),
            out=str(full),
            projector="none",
            sparse_ratio=1.0,
            gradient_checkpointing="on",
        )
    )
    sg.main(
        sg.Args(
            model=str(tiny_model),
            rollouts=str(path),
            out=str(kept),
            projector="none",
            sparse_ratio=0.3,
            seed=7,
        )
    )
    full_sketch = np.load(full)
    expected = independent_policy_gradients(tiny_model, rows, rho_weighted=False)
    np.testing.assert_allclose(full_sketch, expected, atol=2e-5 * np.abs(expected).max(), rtol=1e-4)
    d = full_sketch.shape[1]
    draws = torch.cat(
        [sg.block_draws(7, b, d, 0.3, False, CPU) for b in range(-(-d // sg.HASH_BLOCK))]
    )[:d]
    dropped = (draws == 2 * d).numpy()
    assert 0.6 < dropped.mean() < 0.8
    np.testing.assert_allclose(
        np.load(kept),
        np.where(dropped, 0.0, full_sketch),
        rtol=1e-5,
        atol=1e-6 * np.abs(full_sketch).max(),
    )


def test_sketch_matches_the_countsketch_of_the_exact_gradient(tiny_model, rollouts, tmp_path):
    """The default (F = 1) and the release's F = 0.1, run as a user would: the CountSketch of the
    exact gradient."""
    path, rows = rollouts
    full = tmp_path / "full.npy"
    sg.main(
        sg.Args(
            model=str(tiny_model),
            rollouts=str(path),
            out=str(full),
            projector="none",
            sparse_ratio=1.0,
        )
    )
    exact = torch.from_numpy(np.load(full))
    for sparse_ratio in ("default", "0.1"):
        out = tmp_path / f"sketch_{sparse_ratio}.npy"
        flags = [] if sparse_ratio == "default" else ["--sparse-ratio", sparse_ratio]
        result = run_script(
            "sketch_grads.py",
            "--model",
            str(tiny_model),
            "--rollouts",
            str(path),
            "--out",
            str(out),
            "--proj-dim",
            "512",
            "--seed",
            "3",
            *flags,
            env={"OMP_NUM_THREADS": "1"},
        )
        assert "wrote" in result.stdout
        sketch, meta = np.load(out), json.loads(out.with_suffix(".json").read_text())
        assert sketch.dtype == np.float32 and sketch.shape == (8, 512)
        ratio = 1.0 if sparse_ratio == "default" else 0.1
        assert {k: meta[k] for k in ("projector", "seed", "sparse_ratio", "proj_dim", "dtype")} == {
            "projector": "countsketch",
            "seed": 3,
            "sparse_ratio": ratio,
            "proj_dim": 512,
            "dtype": "float32",
        }
        by_hand = sketch_of(exact, 512, 3, ratio).numpy()
        np.testing.assert_allclose(sketch, by_hand, rtol=1e-4, atol=1e-5 * np.abs(by_hand).max())
    half = tmp_path / "half.npy"
    sg.main(
        sg.Args(
            model=str(tiny_model),
            rollouts=str(path),
            out=str(half),
            proj_dim=512,
            seed=3,
            dtype="float16",
        )
    )
    assert np.load(half).dtype == np.float16
    default = np.load(tmp_path / "sketch_default.npy")
    np.testing.assert_allclose(
        np.load(half).astype(np.float32), default, rtol=2e-3, atol=2e-3 * np.abs(default).max()
    )


@pytest.mark.parametrize(
    "projector, sparse_ratio", [("countsketch", 1.0), ("countsketch", 0.5), ("none", 0.3)]
)
def test_validation_mean_is_the_mean_of_per_prompt_sketches(
    tiny_model, rollouts, tmp_path, projector, sparse_ratio
):
    """--mean-of-rows: one backward pass over the sampled prompts (each weighted 1/m), one sketch =
    the mean of their per-prompt sketches; select_data.validation_target takes that row as g_v."""
    path, rows = rollouts
    settings = dict(
        model=str(tiny_model),
        rollouts=str(path),
        projector=projector,
        sparse_ratio=sparse_ratio,
        proj_dim=64,
        seed=3,
        chunk_prompts=3,
    )
    per_prompt, mean = tmp_path / "rows.npy", tmp_path / "mean.npy"
    sg.main(sg.Args(**settings, out=str(per_prompt)))
    meta = sg.main(sg.Args(**settings, out=str(mean), mean_of_rows=4, mean_seed=5))
    mixed = [i for i, row in enumerate(rows) if not sg.is_zero_gradient(row["rewards"])]
    sample = sg.mean_sample(
        rows, 4, seed=5, rollouts=str(path)
    )  # 4 of the 6 rows with mixed rewards
    assert len(mixed) == 6 and meta["mean_of"]["rows"] == sample and meta["mean_of"]["count"] == 4
    assert (
        meta["rows"] == 1
        and meta["ids"] == ["mean"]
        and meta["zero_rows"] == meta["nonfinite_rows"] == []
    )
    assert meta["mean_of"]["ids"] == [rows[i]["id"] for i in sample]
    sketches = np.load(per_prompt)
    expected = sketches[sample].astype(np.float64).mean(axis=0)
    assert np.load(mean).shape == (1, sketches.shape[1])
    np.testing.assert_allclose(
        np.load(mean)[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
    )
    assert not np.allclose(
        expected, sketches[mixed].mean(axis=0)
    )  # the sample matters: not all 6 rows

    train_meta = json.loads(per_prompt.with_suffix(".json").read_text())
    target, info = select_data.validation_target(str(mean), train_meta, "t.npy")
    np.testing.assert_allclose(target, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert info["rows"] == 1 and info["mean_of"]["seed"] == 5 and info["mean_of"]["rows"] == sample


def test_gradient_checkpointing_setting(tiny_model, monkeypatch):
    def dropout_off(model):
        return all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))

    import plumbing.memory_plan
    import plumbing.models

    # auto on a CPU: off, eval mode
    model = sg.Sketcher(sg.Args(model=str(tiny_model)), CPU, 0, 1).model
    assert not model.is_gradient_checkpointing and not model.training
    # a stand-in for a CUDA load, and no memory plan without a card
    monkeypatch.setattr(plumbing.models, "load_model", lambda path, device: load_model(path, CPU))
    monkeypatch.setattr(plumbing.memory_plan, "plan_memory", lambda *a, **k: False)
    for setting, device in (("on", CPU), ("auto", torch.device("cuda"))):
        sketcher = sg.Sketcher(
            sg.Args(model=str(tiny_model), gradient_checkpointing=setting), device, 0, 1
        )
        assert (
            sketcher.model.is_gradient_checkpointing
            and sketcher.model.training
            and dropout_off(sketcher.model)
        )
        # auto: no batched backward with checkpointing (CUDA's default)
        assert sketcher.hooks is None
    assert not sg.Sketcher(
        sg.Args(model=str(tiny_model), gradient_checkpointing="off"), CPU, 0, 1
    ).model.is_gradient_checkpointing


def test_memory_plan_refuses_before_loading_and_names_the_flags(tiny_model, monkeypatch):
    import plumbing.memory_plan
    import plumbing.models

    # a card too small for anything
    monkeypatch.setattr(plumbing.memory_plan, "memory_gib", lambda device: 1e-6)
    loaded = lambda *a: pytest.fail("loaded the model before the plan refused it")  # noqa: E731
    monkeypatch.setattr(plumbing.models, "load_policy", loaded)
    with pytest.raises(DataError, match="lower --token-budget, or use --fsdp on"):
        sg.Sketcher(sg.Args(model=str(tiny_model)), CPU, 0, 1)


def test_a_plan_past_the_machines_memory_ends_in_one_line_on_a_cpu(tiny_model, rollouts, tmp_path):
    """A token budget of 10^9: terabytes of activations, more than any machine has available."""
    path, _ = rollouts
    out = tmp_path / "s.npy"
    argv = ["--model", str(tiny_model), "--rollouts", str(path), "--out", str(out)]
    result = run_script("sketch_grads.py", *argv, "--token-budget", "1000000000", check=False)
    assert result.returncode == 1 and "memory plan (sketch, GiB per process)" in result.stdout
    (error,) = result.stderr.strip().splitlines()  # one line
    assert "GiB available for it; lower --token-budget, or use --fsdp on" in error
    assert not out.exists() and not out.with_name("s.npy.parts").exists()


def test_nonfinite_rows_flagged(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    bad = [dict(r) for r in rows]
    bad[1] = dict(
        bad[1], behavior_logprobs=[[-1e4] * len(lp) for lp in bad[1]["behavior_logprobs"]]
    )  # rho = inf
    bad_path = tmp_path / "bad.jsonl"
    bad_path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "bad.npy"
    meta = sg.main(
        sg.Args(model=str(tiny_model), rollouts=str(bad_path), out=str(out), proj_dim=64)
    )
    assert meta["nonfinite_rows"] == [1] and meta["zero_rows"] == [3, 7]
    assert not np.isfinite(np.load(out)[1]).all() and np.isfinite(np.load(out)[[0, 2]]).all()


def test_resume_uses_finished_chunks_and_refuses_other_settings(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    out = tmp_path / "s.npy"
    args = sg.Args(
        model=str(tiny_model), rollouts=str(path), out=str(out), proj_dim=64, chunk_prompts=3
    )
    first = sg.main(args)
    reference = np.load(out)
    # a killed run left chunk 1 (rows 3..5) behind: the rerun must take it as it is, and compute the
    # rest
    parts = tmp_path / "s.npy.parts"
    parts.mkdir()
    written_after = ("ids", "zero_rows", "nonfinite_rows", "cpu_capability", "torch_threads")
    settings = {k: first[k] for k in first if k not in written_after}
    (parts / "settings.json").write_text(json.dumps(settings))
    np.save(parts / "chunk_000001.npy", np.full((3, 64), 7.0, dtype=np.float32))
    sg.main(args)
    resumed = np.load(out)
    assert (resumed[3:6] == 7).all()
    np.testing.assert_array_equal(resumed[[0, 1, 2, 6, 7]], reference[[0, 1, 2, 6, 7]])
    assert not parts.exists()
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({**settings, "seed": 99}))
    np.save(parts / "chunk_000001.npy", np.full((3, 64), 7.0, dtype=np.float32))  # a piece made
    with pytest.raises(DataError, match="seed"):
        sg.main(args)


def test_bad_flags_are_refused(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    base = [
        "sketch_grads.py",
        "--model",
        str(tiny_model),
        "--rollouts",
        str(path),
        "--out",
        str(tmp_path / "x.npy"),
    ]
    for flags, message in (
        (["--projector", "kronecker"], "argument --projector: invalid choice: 'kronecker'"),
        (["--gradient-checkpointing", "yes"], "argument --gradient-checkpointing: invalid choice"),
        (["--mean-of-rows", "-1"], "--mean-of-rows must be >= 0, got -1"),
        (["--sparse-ratio", "0"], "--sparse-ratio must be in (0, 1], got 0.0"),
    ):
        result = run_script(*base, *flags, check=False)
        assert result.returncode != 0 and message in result.stderr, (flags, result.stderr[-500:])
        assert len(result.stderr.strip().splitlines()[-1]) > 0 and "Traceback" not in result.stderr
    all_equal = (
        tmp_path / "all_equal.jsonl"
    )  # no prompt with mixed rewards: no validation mean to make
    all_equal.write_text(json.dumps(rows[3]) + "\n")
    assert sg.is_zero_gradient(rows[3]["rewards"])
    with pytest.raises(DataError, match="no prompt .* has mixed rewards"):
        sg.main(
            sg.Args(
                model=str(tiny_model),
                rollouts=str(all_equal),
                out=str(tmp_path / "m.npy"),
                mean_of_rows=5,
            )
        )


def torchrun(*flags: str, port: int, script: str = "sketch_grads.py", env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            script,
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_two_processes_write_the_same_file(tiny_model, rollouts, tmp_path):
    path, _ = rollouts
    flags = [
        "--model",
        str(tiny_model),
        "--rollouts",
        str(path),
        "--proj-dim",
        "256",
        "--chunk-prompts",
        "2",
        "--sparse-ratio",
        "0.5",
    ]
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *flags, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    torchrun(*flags, "--out", str(double), port=29517)
    np.testing.assert_array_equal(np.load(double), np.load(single))
    one, two = (json.loads(p.with_suffix(".json").read_text()) for p in (single, double))
    assert one == two


def test_torchrun_validation_mean_sums_the_process_shares(tiny_model, rollouts, tmp_path):
    """--mean-of-rows under torchrun: each process backpropagates its share of the sample, the
    sketches are summed (all-reduce): the same row as one process, up to float rounding. Here as
    run_cropi.sh runs it: the validation set (--val-rollouts) in the same run as the pool, whose
    rows are the same as one process's too."""
    path, _ = rollouts
    flags = [
        "--model",
        str(tiny_model),
        "--rollouts",
        str(path),
        "--proj-dim",
        "256",
        "--mean-of-rows",
        "5",
        "--mean-seed",
        "1",
    ]
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *flags, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    run_script(
        "sketch_grads.py",
        *flags[:4],
        "--proj-dim",
        "256",
        "--out",
        str(tmp_path / "pool_one.npy"),
        env={"OMP_NUM_THREADS": "1"},
    )
    torchrun(
        *flags,
        "--out",
        str(tmp_path / "pool_two.npy"),
        "--val-rollouts",
        str(path),
        "--val-out",
        str(double),
        port=29533,
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "pool_two.npy"), np.load(tmp_path / "pool_one.npy")
    )
    one = np.load(single)
    assert one.shape == (1, 256) and np.abs(one).max() > 0
    np.testing.assert_allclose(np.load(double), one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
    one_meta, two_meta = (json.loads(p.with_suffix(".json").read_text()) for p in (single, double))
    assert one_meta == two_meta and one_meta["mean_of"]["count"] == 5


@pytest.mark.parametrize(
    "extra, port",
    [
        ([], 29534),
        (["--mean-of-rows", "5", "--mean-seed", "1"], 29535),
        (["--sparse-ratio", "0.5"], 29536),
    ],
)
def test_torchrun_sharded_model_gives_the_sketch_of_one_process(
    tiny_model, rollouts, tmp_path, extra, port
):
    """--fsdp on: the model sharded over 2 processes (FSDP2), each takes every prompt and half its
    responses and hashes its own rows of the averaged gradient at their global coordinates; the
    parts summed (all-reduce) are the sketch of one process, per prompt and as a validation mean, at
    F = 1 and F < 1, up to float rounding."""
    path, _ = rollouts
    flags = [
        "--model",
        str(tiny_model),
        "--rollouts",
        str(path),
        "--proj-dim",
        "256",
        "--chunk-prompts",
        "2",
        *extra,
    ]
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *flags, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    torchrun(*flags, "--fsdp", "on", "--out", str(double), port=port)
    one = np.load(single)
    assert np.abs(one).max() > 0
    np.testing.assert_allclose(np.load(double), one, rtol=1e-4, atol=1e-5 * np.abs(one).max())
    one_meta, two_meta = (json.loads(p.with_suffix(".json").read_text()) for p in (single, double))
    assert one_meta == two_meta


THREADS_AT_EXIT = """
import os, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")  # the stage, as `python STAGE.py FLAGS` runs it
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.environ["THREADS_FILE"] + os.environ["RANK"], "w") as f:  # a file per process
    f.write(" ".join(names))
"""


def test_torchrun_sharded_stage_ends_its_gloo_threads_before_python_exits(
    tiny_model, rollouts, tmp_path
):
    """A sharded (FSDP2) stage on 2 processes: once the stage has returned, its process group's
    gloo threads are gone, so none is torn down while the interpreter clears its modules at exit
    (where torch's gloo groups can abort a process: 'terminate called without an active
    exception'). Before, the device meshes that DTensor's caches keep held the group to the end."""
    path, _ = rollouts
    script = tmp_path / "threads_at_exit.py"
    script.write_text(THREADS_AT_EXIT)
    flags = ["--model", str(tiny_model), "--rollouts", str(path), "--proj-dim", "64"]
    flags += ["--fsdp", "on", "--out", str(tmp_path / "sketch.npy")]
    env = {"PYTHONPATH": str(ROOT), "THREADS_FILE": str(tmp_path / "t")}
    torchrun("sketch_grads.py", *flags, port=29538, script=str(script), env=env)
    threads = [(tmp_path / f"t{rank}").read_text() for rank in range(2)]
    assert (tmp_path / "sketch.npy").exists() and all("python" in names for names in threads)
    assert not any("gloo" in names for names in threads), threads


def test_torchrun_sharded_with_fewer_responses_on_one_process(tiny_model, tmp_path):
    """K = 3 responses on 2 sharded processes and a micro-batch per response: one process holds 2,
    the other 1 and a term of weight 0, so both run the 2 passes that gather the weights (a
    collective; before, the second process stopped: "2 passes needed but this process holds 1").
    The sketch of one process."""
    path = tmp_path / "k3.jsonl"
    make_synthetic_rollouts(tiny_model, path, n_prompts=4, k=3, temperature=0.7)
    flags = ["--model", str(tiny_model), "--rollouts", str(path), "--proj-dim", "64"]
    flags += ["--token-budget", "1"]
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *flags, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    torchrun(*flags, "--fsdp", "on", "--out", str(double), port=29537)
    one = np.load(single)
    assert np.abs(one).max() > 0
    np.testing.assert_allclose(np.load(double), one, rtol=1e-4, atol=1e-5 * np.abs(one).max())


def test_sharding_needs_a_response_per_process(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    one_response = tmp_path / "one_response.jsonl"
    row = dict(
        rows[0],
        **{
            key: rows[0][key][:1]
            for key in ("response_ids", "responses", "behavior_logprobs", "rewards")
        },
    )
    one_response.write_text(json.dumps(row) + "\n")
    sketcher = type("Sharded", (), {"args": sg.Args(), "rank": 0, "world": 2, "share": (0, 2)})()
    with pytest.raises(DataError, match="a prompt has fewer responses than the 2 processes"):
        sg.sketch_file(sketcher, [row], str(one_response), str(tmp_path / "x.npy"), 0)


def test_rho_is_one_at_stage_zero_up_to_bf16_batching_noise(tiny_model, rollouts, monkeypatch):
    """At stage 0 the checkpoint is beta: rho = exp(log pi - log beta) is 1 but for the numerics of
    two batchings of the same rows (collect: 16,384-token batches across prompts, longest first;
    sketch: one prompt's responses in file order). Under bf16 autocast (CPU here, as on CUDA) the
    head is float32 and batch-invariant, the body's bf16 matmuls are not: |log rho| stays within
    0.01 (in float32 exactly batch-free up to 1e-5)."""
    import common

    _, rows = rollouts
    model = load_model(str(tiny_model), CPU).eval()
    flat_prompts = [row["prompt_ids"] for row in rows for _ in row["response_ids"]]
    flat_responses = [r for row in rows for r in row["response_ids"]]
    lengths = [len(p) + len(r) for p, r in zip(flat_prompts, flat_responses)]
    for dtype, bound in ((torch.bfloat16, 0.01), (None, 1e-5)):

        def autocast(device, dtype=dtype):
            return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)

        monkeypatch.setattr(common, "autocast", autocast)
        beta = common.batched_logprobs(
            model, flat_prompts, flat_responses, 0.7, 0, token_budget_batches(lengths, 16384)
        )
        worst, flat = 0.0, 0
        with torch.no_grad():
            for row in rows:
                for batch in token_budget_batches(
                    [len(row["prompt_ids"]) + len(r) for r in row["response_ids"]],
                    8192,
                    longest_first=False,
                ):
                    with autocast(CPU):
                        current, _, _ = response_logprobs(
                            model,
                            [row["prompt_ids"]] * len(batch),
                            [row["response_ids"][i] for i in batch],
                            0.7,
                            0,
                        )
                    for j, i in enumerate(batch):
                        n = len(row["response_ids"][i])
                        worst = max(worst, (current[j, :n] - beta[flat + i]).abs().max().item())
                flat += len(row["response_ids"])
        assert worst < bound, (dtype, worst)


# ----------------------------------------------------------------------------------------------
# The batched backward (the default on a CPU): many prompts per forward+backward, each prompt's
# exact gradient
# ----------------------------------------------------------------------------------------------


class Recorder:
    """A sink for GroupGradientHooks that keeps each group's gradient of every parameter,
    densely."""

    def __init__(self, parameters, groups):
        self.grads = {id(p): torch.zeros(groups, *p.shape) for p in parameters}

    def add(self, groups, p, values, rows=None):
        groups = range(len(self.grads[id(p)])) if groups is None else groups
        if rows is None:
            self.grads[id(p)].index_add_(0, torch.tensor(groups), values.reshape(-1, *p.shape))
            return
        (group,) = groups
        target = self.grads[id(p)][group].view(p.shape[0], -1)
        target.index_add_(0, rows, values.reshape(len(rows), -1))


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Llama-style layers: Linear with biases (q, k, v), RMSNorm, an untied LM head, an embedding
    with a padding_idx that is also a real token inside the prompts ('+'; Qwen2.5 pads with its
    end-of-text token): torch gives that row no gradient."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from make_demo import build_char_tokenizer

    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.convert_tokens_to_ids("+"),
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = folder / "rollouts.jsonl"
    return folder, path, make_synthetic_rollouts(folder, path, n_prompts=8, k=4, temperature=0.7)


@pytest.mark.parametrize(
    "architecture, checkpointing", [("gpt2", "off"), ("gpt2", "on"), ("qwen2", "off")]
)
def test_hooks_give_each_prompts_exact_gradient(
    tiny_model, rollouts, tiny_qwen2, architecture, checkpointing
):
    """What the hooks hand over per prompt from one forward+backward of many prompts (micro-batches
    of 100 tokens mix prompts) is each prompt's exact gradient, for every parameter. GPT-2: Conv1D
    (stored transposed), the tied embedding + LM head, the position embedding, LayerNorm; Qwen2:
    Linear with and without bias, RMSNorm, an untied head, an embedding with padding_idx, products
    handed over a few groups at a time; zero for the prompts whose rewards are all equal."""
    from plumbing.grad_hooks import GroupGradientHooks, group_runs

    model_dir, rows = (
        (tiny_model, rollouts[1]) if architecture == "gpt2" else (tiny_qwen2[0], tiny_qwen2[2])
    )
    args = sg.Args(
        model=str(model_dir),
        token_budget=100,
        gradient_checkpointing=checkpointing,
        batched_backward="off",
    )
    exact_sketcher = sg.Sketcher(args, CPU, 0, 1)
    names = [name for name, p in exact_sketcher.model.named_parameters()]
    exact = []
    for row in rows:  # one backward per prompt, its .grad as it is
        exact_sketcher.model.zero_grad(set_to_none=True)
        terms = sg.surrogate_terms([[row]], 1.0)
        for batch in sg.micro_batches(terms, 8192):
            sg.surrogate(exact_sketcher.model, batch, exact_sketcher.pad_token_id).backward()
        exact.append(
            {
                n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in exact_sketcher.model.named_parameters()
            }
        )
    model = exact_sketcher.model
    model.zero_grad(set_to_none=True)
    recorder = Recorder(list(model.parameters()), len(rows))
    hooks = GroupGradientHooks(model, recorder)
    if architecture == "qwen2":  # a weight's products handed over two groups at a time at most
        hooks.products = hooks.products[: 2 * max(p.numel() for p in model.parameters()) + 1]
    hooks.start(len(rows))
    terms = sg.surrogate_terms([[row] for row in rows], 1.0)
    batches = sg.micro_batches(terms, 100)
    assert any(len({t.group for t in batch}) > 1 for batch in batches)  # micro-batches mix prompts
    sizes = [[r.stop - r.start for _, r in group_runs([t.group for t in b])] for b in batches]
    assert any(len(group_runs(s)) < len(s) for s in sizes)  # a product of 2+ groups
    shared = []  # the tokens that a group's rows have in common, per group and micro-batch
    for batch in batches:
        row_ids = [(t.row["prompt_ids"], t.row["response_ids"][t.k]) for t in batch]
        with hooks.recording([t.group for t in batch], row_ids):
            shared += hooks.shared
            loss = sg.surrogate(model, batch, exact_sketcher.pad_token_id)
        loss.backward()
    hooks.finish()
    assert any(shared)  # the shared prompt's product formed once for the group
    assert not any(
        p.requires_grad for p in model.parameters()
    )  # frozen: the backward skips every summed dW
    for b, row in enumerate(rows):
        for name, p in zip(names, model.parameters()):
            got, expected = recorder.grads[id(p)][b], exact[b][name]
            if sg.is_zero_gradient(row["rewards"]):
                assert not got.any(), name
            torch.testing.assert_close(
                got,
                expected,
                atol=1e-6 * expected.abs().max().item() + 1e-12,
                rtol=1e-4,
                msg=f"{name}, prompt {b}",
            )
    hooks.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_group_runs_by_hand():
    """Rows of groups 3, 3, 5, 5, 2, 2, 7: runs (3: rows 0-1), (5: 2-3), (2: 4-5), (7: 6). Their
    sizes 2, 2, 2, 1 in runs: the first three groups form one batched product. Groups 4, 5, 6, 2,
    3, 9 minus their positions: 4, 4, 4, -1, -1, 4: consecutive stretches at 0-2, 3-4, 5."""
    from plumbing.grad_hooks import group_runs

    runs = group_runs([3, 3, 5, 5, 2, 2, 7])
    assert runs == [(3, slice(0, 2)), (5, slice(2, 4)), (2, slice(4, 6)), (7, slice(6, 7))]
    assert group_runs([2, 2, 2, 1]) == [(2, slice(0, 3)), (1, slice(3, 4))]
    stretches = group_runs([g - i for i, g in enumerate([4, 5, 6, 2, 3, 9])])
    assert stretches == [(4, slice(0, 3)), (-1, slice(3, 5)), (4, slice(5, 6))]
    assert group_runs([]) == []


def test_shared_prefix_by_hand():
    """The tokens a group's rows have in common: 1 2 3 4 / 1 2 5 / 1 2 3 -> 2; the same row twice
    -> its length; different first tokens -> 0; one row alone -> 0 (nothing to share)."""
    from plumbing.grad_hooks import shared_prefix

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[7, 8], [7, 8]]) == 2
    assert shared_prefix([[1, 2], [2, 2]]) == 0
    assert shared_prefix([[1, 2, 3]]) == 0


def test_norm_shares_by_hand():
    """A norm's parameters, token by token (g = the output's gradient). LayerNorm of x = (1, 3):
    mean 2, std 1, x_hat = (-1, 1) (eps 0): gamma gets g * x_hat, beta g. RMSNorm of x = (3, 4):
    rms = sqrt((9 + 16) / 2) = 3.5355, x / rms = (0.8485, 1.1314): gamma gets g * x / rms."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from plumbing.grad_hooks import layer_norm_shares, rms_norm_shares

    layer_norm = torch.nn.LayerNorm(2, eps=0.0)
    shares = layer_norm_shares(layer_norm, torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 5.0]]))
    assert shares[layer_norm.weight].tolist() == [[-2.0, 5.0]]
    assert shares[layer_norm.bias].tolist() == [[2.0, 5.0]]
    rms_norm = LlamaRMSNorm(2, eps=0.0)
    shares = rms_norm_shares(rms_norm, torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 2.0]]))
    assert shares[rms_norm.weight][0].tolist() == pytest.approx([0.8485, 2.2627], abs=1e-4)


def test_a_norm_without_a_rule_falls_back_to_a_backward_per_prompt(capsys):
    """LayerNorm and Llama's RMSNorm have a rule; Gemma's RMSNorm, (1 + gamma) * x / rms(x), is
    told apart on random rows and has none: the hooks are not attached (a backward per prompt),
    or, with --batched-backward on, the run is refused naming the module."""
    from transformers import GemmaConfig, GemmaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from plumbing.cli import DataError
    from plumbing.grad_hooks import GroupGradientHooks, norm_rule

    assert norm_rule(torch.nn.LayerNorm(4)).__name__ == "layer_norm_shares"
    assert norm_rule(LlamaRMSNorm(4)).__name__ == "rms_norm_shares"
    config = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config |= dict(num_attention_heads=1, num_key_value_heads=1, head_dim=32)
    gemma = GemmaForCausalLM(GemmaConfig(**config))
    assert norm_rule(gemma.model.norm) is None
    assert GroupGradientHooks.attach(gemma, sink=None, required=False) is None
    assert "has no rule for model.layers.0.input_layernorm" in capsys.readouterr().out
    assert all(p.requires_grad for p in gemma.parameters())  # nothing left frozen
    assert not any(m._forward_hooks for m in gemma.modules())  # nor attached
    with pytest.raises(DataError, match="no rule for model.layers.0.input_layernorm"):
        GroupGradientHooks.attach(gemma, sink=None, required=True)


@pytest.mark.parametrize(
    "architecture, sparse_ratio", [("gpt2", 1.0), ("gpt2", 0.5), ("qwen2", 1.0)]
)
def test_batched_backward_equals_one_backward_per_prompt(
    tiny_model, rollouts, tiny_qwen2, architecture, sparse_ratio, small_blocks
):
    """The same CountSketch rows (to float rounding) from one forward+backward of all 8 prompts as
    from a backward per prompt with its .grad hashed; hash blocks of 64 coordinates, so that weights
    span blocks."""
    model, rows = (
        (tiny_model, rollouts[1]) if architecture == "gpt2" else (tiny_qwen2[0], tiny_qwen2[2])
    )
    settings = dict(
        model=str(model), proj_dim=256, seed=5, token_budget=100, sparse_ratio=sparse_ratio
    )
    per_prompt = sg.Sketcher(sg.Args(**settings, batched_backward="off"), CPU, 0, 1)
    batched = sg.Sketcher(sg.Args(**settings, batched_backward="on"), CPU, 0, 1)
    assert per_prompt.hooks is None and batched.hooks is not None
    expected, got = (
        per_prompt.sketch_groups([[row] for row in rows]),
        batched.sketch_groups([[row] for row in rows]),
    )
    zero = [sg.is_zero_gradient(row["rewards"]) for row in rows]
    assert any(zero) and not got[zero].any() and got[[not z for z in zero]].abs().sum(1).min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_validation_sets_in_the_same_run_as_the_pool(tiny_model, rollouts, tmp_path):
    """--val-rollouts/--val-out write what separate runs write (one model load); mismatched lists
    are refused."""
    path, _ = rollouts
    common_flags = ["--model", str(tiny_model), "--proj-dim", "64", "--mean-seed", "2"]
    run_script(
        "sketch_grads.py",
        *common_flags,
        "--rollouts",
        str(path),
        "--out",
        str(tmp_path / "train.npy"),
        "--val-rollouts",
        str(path),
        "--val-out",
        str(tmp_path / "val.npy"),
        "--mean-of-rows",
        "3",
        env={"OMP_NUM_THREADS": "1"},
    )
    run_script(
        "sketch_grads.py",
        *common_flags,
        "--rollouts",
        str(path),
        "--out",
        str(tmp_path / "alone.npy"),
        "--mean-of-rows",
        "3",
        env={"OMP_NUM_THREADS": "1"},
    )
    run_script(
        "sketch_grads.py",
        *common_flags,
        "--rollouts",
        str(path),
        "--out",
        str(tmp_path / "rows.npy"),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert np.load(tmp_path / "val.npy").shape == (1, 64) and np.load(
        tmp_path / "train.npy"
    ).shape == (8, 64)
    np.testing.assert_array_equal(np.load(tmp_path / "val.npy"), np.load(tmp_path / "alone.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), np.load(tmp_path / "rows.npy"))
    meta = json.loads((tmp_path / "val.json").read_text())
    assert meta["mean_of"]["count"] == 3 and meta["rollouts"] == str(path.resolve())
    result = run_script(
        "sketch_grads.py",
        *common_flags,
        "--rollouts",
        str(path),
        "--out",
        str(tmp_path / "x.npy"),
        "--val-rollouts",
        str(path),
        check=False,
    )
    assert result.returncode != 0 and "give one --val-out per --val-rollouts" in result.stderr
    assert not (tmp_path / "x.npy").exists()
    broken = (
        tmp_path / "broken.jsonl"
    )  # a bad pool file is found before any validation sketch is written
    broken.write_text(path.read_text() + "{not json\n")
    result = run_script(
        "sketch_grads.py",
        *common_flags,
        "--rollouts",
        str(broken),
        "--out",
        str(tmp_path / "y.npy"),
        "--val-rollouts",
        str(path),
        "--val-out",
        str(tmp_path / "val_y.npy"),
        check=False,
    )
    assert result.returncode != 0 and "broken.jsonl:9: not valid JSON" in result.stderr
    assert not (tmp_path / "val_y.npy").exists() and not (tmp_path / "y.npy").exists()


def test_batched_backward_on_is_refused_with_a_sharded_model(
    tiny_model, rollouts, tmp_path, monkeypatch
):
    import plumbing.distributed
    import plumbing.memory_plan

    # as if the plan sharded the model
    monkeypatch.setattr(plumbing.memory_plan, "plan_memory", lambda *a, **k: True)
    monkeypatch.setattr(plumbing.distributed, "shard_model", lambda model: None)
    with pytest.raises(DataError, match="--batched-backward on: not with a sharded model"):
        sg.Sketcher(sg.Args(model=str(tiny_model), batched_backward="on"), CPU, 0, 2)
