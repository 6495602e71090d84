"""sketch_grads.py: the POPI surrogate math, the projectors, and the script as a user runs it (tiny GPT-2)."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_synthetic_rollouts, run_script
import common
from common import DataError, group_advantages, response_logprobs
import select_data
import sketch_grads as sg


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
    parts = sum(sg.popi_surrogate(current[i:i + 1], behavior[i:i + 1], mask[i:i + 1], advantages[i:i + 1], 2)
                for i in range(2))
    assert parts.item() == pytest.approx(-1.375)
    # PPO clip 0.2: row 0 tokens min(2*1, 1.2*1)=1.2, min(0.5, 0.8)=0.5 -> 0.85; row 1: min(-4, -1.2) = -4
    # L = (1/2) * (0.85 - 4) = -1.575
    assert sg.popi_surrogate(current, behavior, mask, advantages, 2, clip_ratio=0.2).item() == pytest.approx(-1.575)


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


def test_token_budget_batches_in_input_order():
    tb = sg.M.token_budget_batches
    assert tb([3, 3, 3, 3], 6, longest_first=False) == [[0, 1], [2, 3]]
    assert tb([2, 5, 1], 10, longest_first=False) == [[0, 1], [2]]  # 2 rows x 5 = 10 fits; 3 x 5 = 15 does not
    assert tb([20, 1], 8, longest_first=False) == [[0], [1]]  # too long alone: its own batch
    assert tb([1, 1, 1], 100, longest_first=False) == [[0, 1, 2]]


def test_is_zero_gradient():
    assert sg.is_zero_gradient([1.0, 1.0, 1.0]) and sg.is_zero_gradient([0.0]) and not sg.is_zero_gradient([0, 1])


# ----------------------------------------------------------------------------------------------
# Projectors
# ----------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


def test_kept_coordinates_fixed_by_seed(monkeypatch):
    monkeypatch.setattr(sg, "KEEP_BLOCK", 1000)  # several blocks
    kept = sg.kept_coordinates(10_000, 0.1, seed=0, device=CPU)
    assert torch.equal(kept, sg.kept_coordinates(10_000, 0.1, seed=0, device=CPU))
    assert not torch.equal(kept, sg.kept_coordinates(10_000, 0.1, seed=1, device=CPU)[:len(kept)])
    assert 850 < len(kept) < 1150 and torch.all(kept[1:] > kept[:-1]) and kept[-1] < 10_000
    # the subset of the first d coordinates does not depend on how many coordinates follow (block-wise draws)
    longer = sg.kept_coordinates(12_000, 0.1, seed=0, device=CPU)
    assert torch.equal(longer[longer < 10_000], kept)
    assert torch.equal(sg.kept_coordinates(7, 1.0, 0, CPU), torch.arange(7))


def test_split_kept_by_parameter_by_hand():
    kept = torch.tensor([0, 2, 3, 4, 7])  # parameters of sizes 3, 2, 4 -> [0,3) [3,5) [5,9)
    local = sg.M.split_kept_by_parameter(kept, [3, 2, 4])
    assert local[0].tolist() == [0, 2] and local[1] is None and local[2].tolist() == [2]


def test_flatten_kept_gradient_order():
    a = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 6.0, 7.0])
    out = torch.full((4,), -1.0)
    sg.M.flatten_kept_gradient([a, b], [torch.tensor([1, 3]), torch.tensor([0, 2])], out)
    assert out.tolist() == [2.0, 4.0, 5.0, 7.0]
    out = torch.full((7,), -1.0)
    b.grad = None
    sg.M.flatten_kept_gradient([a, b], [None, None], out)
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]


def test_gradient_pieces_by_hand():
    # parameters of sizes 3, 2 (no .grad), 5 hold flat coordinates [0,3) [3,5) [5,10); blocks of 4: [0,4) [4,8) [8,12)
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 2, 5))
    a.grad, c.grad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0])
    pieces = [(block, start, piece.tolist()) for block, start, piece in sg.M.gradient_pieces([a, b, c], 4)]
    # a: block 0 from 0; b: none; c starts at flat 5 = block 1 position 1, crosses into block 2 at flat 8
    assert pieces == [(0, 0, [1.0, 2.0, 3.0]), (1, 1, [5.0, 6.0, 7.0]), (2, 0, [8.0, 9.0])]
    assert pieces[1][2] and next(sg.M.gradient_pieces([c], 4))[2].data_ptr() == c.grad.data_ptr()  # no copy


def explicit_countsketch_matrix(d, n, seed):
    """The d x N matrix CountSketch applies: row i holds s(i) = +1 (r odd) or -1 (r even) in column h(i) = r // 2."""
    matrix = torch.zeros(d, n)
    for block, start in enumerate(range(0, d, sg.HASH_BLOCK)):
        size = min(sg.HASH_BLOCK, d - start)
        draws = sg.countsketch_draws(seed, block, n, CPU)[:size].long()
        matrix[torch.arange(start, start + size), draws // 2] = (draws % 2 * 2 - 1).float()
    return matrix


def test_countsketch_draws_depend_on_seed_and_block_only(monkeypatch):
    monkeypatch.setattr(sg, "HASH_BLOCK", 1000)
    draws = sg.countsketch_draws(seed=5, block=2, proj_dim=4, device=CPU)
    assert draws.shape == (1000,) and draws.min() == 0 and draws.max() == 7  # r in [0, 2N) = [0, 8)
    assert torch.equal(draws, sg.countsketch_draws(5, 2, 4, CPU))
    assert not torch.equal(draws, sg.countsketch_draws(5, 3, 4, CPU))
    assert not torch.equal(draws, sg.countsketch_draws(6, 2, 4, CPU))


def test_countsketch_by_hand(monkeypatch):
    # N = 4, blocks of 4 coordinates; r of block 0 = [5, 2, 0, 7], of block 1 = [1, 6, 3, 3]
    # r = 5: bucket 2, sign + | r = 2: bucket 1, sign - | r = 0: bucket 0, sign - | r = 7: bucket 3, sign +
    # r = 1: bucket 0, sign + | r = 6: bucket 3, sign -
    # g = [1, 10, 100, 1000, 2, 20] -> sketch = [-100 + 2, -10, +1, +1000 - 20] = [-98, -10, 1, 980]
    fixed = {0: [5, 2, 0, 7], 1: [1, 6, 3, 3]}
    monkeypatch.setattr(sg, "HASH_BLOCK", 4)
    monkeypatch.setattr(sg, "countsketch_draws", lambda seed, block, n, device: torch.tensor(fixed[block],
                                                                                         dtype=torch.int32))
    g = torch.tensor([[1.0, 10.0, 100.0, 1000.0, 2.0, 20.0]])
    assert sg.countsketch_project(g, 4, seed=0).tolist() == [[-98.0, -10.0, 1.0, 980.0]]
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))  # flat [0,3) and [3,6)
    a.grad, b.grad = g[0, :3].clone(), g[0, 3:].clone()
    assert sg.countsketch_gradient([a, b], 4, seed=0).tolist() == [-98.0, -10.0, 1.0, 980.0]


def test_streamed_countsketch_equals_flattened(monkeypatch):
    """Hashing each .grad in place gives countsketch_project of the flattened gradient (blocks cut across
    parameters, a parameter without .grad counting as zeros)."""
    monkeypatch.setattr(sg, "HASH_BLOCK", 64)
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(10, 7), (3,), (50,), (4, 40), (1,)]]
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator)
    parameters[2].grad = None
    flat = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in parameters])
    streamed = sg.countsketch_gradient(parameters, 16, seed=9)
    torch.testing.assert_close(streamed, sg.countsketch_project(flat[None], 16, seed=9)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(streamed, sg.countsketch_gradient(parameters, 16, seed=10))


def test_countsketch_is_one_signed_entry_per_coordinate(monkeypatch):
    monkeypatch.setattr(sg, "HASH_BLOCK", 64)  # several hash blocks
    grads = torch.randn(3, 200, dtype=torch.float64)
    matrix = explicit_countsketch_matrix(200, 16, seed=5).double()
    assert torch.allclose(sg.countsketch_project(grads, 16, seed=5), grads @ matrix)
    assert (matrix != 0).sum(1).eq(1).all() and set(matrix.unique().tolist()) == {-1.0, 0.0, 1.0}
    # rows are independent of the chunk of rows they are projected with
    assert torch.equal(sg.countsketch_project(grads[1:2], 16, 5), sg.countsketch_project(grads, 16, 5)[1:2])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_projection_is_blockwise_matrix(kind, monkeypatch):
    monkeypatch.setattr(sg, "DENSE_BLOCK_FLOATS", 8 * 16)  # 8 rows of the matrix per generated block
    grads = torch.randn(4, 30, dtype=torch.float64)
    blocks = [sg.dense_block(kind, 3, b, min(8, 30 - 8 * b), 16, CPU, torch.float64) for b in range(4)]
    matrix = torch.cat(blocks)
    assert matrix.shape == (30, 16)
    assert torch.allclose(sg.dense_project(grads, kind, 16, seed=3), grads @ matrix)
    if kind == "rademacher":
        assert torch.allclose(matrix.abs(), torch.full_like(matrix, 0.25))  # +-1/sqrt(16)
    assert not torch.equal(sg.dense_project(grads, kind, 16, seed=4), sg.dense_project(grads, kind, 16, seed=3))


@pytest.mark.parametrize("projector", ["countsketch", "gaussian", "rademacher"])
def test_projection_preserves_inner_products(projector):
    # JL: for N = 2048 the cosine of two projected vectors is within a few / sqrt(N) ~ 0.02 of the true one
    generator = torch.Generator().manual_seed(0)
    d, n = 20_000, 2048
    base = torch.randn(6, d, generator=generator)
    grads = base + 0.7 * base[:1] + torch.randn(6, d, generator=generator) * torch.linspace(0.1, 3, d)
    sketch = sg.project(grads, projector, n, seed=11)
    true_cos = torch.nn.functional.normalize(grads, dim=1) @ torch.nn.functional.normalize(grads, dim=1).T
    sketch_cos = torch.nn.functional.normalize(sketch, dim=1) @ torch.nn.functional.normalize(sketch, dim=1).T
    assert (sketch_cos - true_cos).abs().max() < 5 / math.sqrt(n)
    norms_ratio = sketch.norm(dim=1) / grads.norm(dim=1)
    assert (norms_ratio - 1).abs().max() < 5 / math.sqrt(n)
    assert torch.equal(sketch, sg.project(grads, projector, n, seed=11))  # same seed, same sketch


# ----------------------------------------------------------------------------------------------
# The script: exact gradients against an independent autograd computation
# ----------------------------------------------------------------------------------------------

def independent_policy_gradients(model_dir, rows, rho_weighted):
    """Per prompt: grad of (1/K) sum_k A_k (1/|y_k|) sum_t [rho_{k,t}] log pi(y_{k,t}), rho held constant,
    one response at a time, flattened by named_parameters; zeros for all-equal rewards."""
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
                logprobs, mask = response_logprobs(model, [row["prompt_ids"]], [response], row["temperature"])
                weight = torch.ones_like(logprobs)
                if rho_weighted:
                    behavior = torch.tensor(row["behavior_logprobs"][i], dtype=torch.float64)[None]
                    weight = torch.exp(logprobs.detach() - behavior)
                objective = (weight * logprobs * mask).sum() / mask.sum() * advantages[i] / k
                grads = torch.autograd.grad(objective, params, allow_unused=True)
                total += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                    for g, p in zip(grads, params)])
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
    run_script("sketch_grads.py", "--model", str(tiny_model), "--rollouts", str(path), "--out", str(out),
               "--projector", "none", "--sparse-ratio", "1", "--chunk-prompts", "3", "--token-budget", "40",
               env={"OMP_NUM_THREADS": "1"})
    sketch, meta = np.load(out), json.loads(out.with_suffix(".json").read_text())
    expected = independent_policy_gradients(tiny_model, rows, rho_weighted=False)  # theta = beta: rho = 1
    assert sketch.shape == expected.shape == (8, meta["num_params"]) and sketch.dtype == np.float32
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(sketch, expected, atol=2e-5 * scale, rtol=1e-4)
    assert meta["zero_rows"] == [3, 7] and not sketch[[3, 7]].any() and np.abs(sketch[[0, 1, 2]]).sum(1).min() > 0
    assert meta["ids"] == [r["id"] for r in rows] and meta["nonfinite_rows"] == [] and meta["rows"] == 8
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
    sg.main(sg.Args(model=str(perturbed), rollouts=str(path), out=str(out), projector="none", sparse_ratio=1.0))
    sketch = np.load(out)
    expected = independent_policy_gradients(perturbed, rows, rho_weighted=True)
    on_policy = independent_policy_gradients(perturbed, rows, rho_weighted=False)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(sketch, expected, atol=2e-5 * scale, rtol=1e-4)
    assert np.abs(sketch - on_policy).max() > 100 * 2e-5 * scale  # rho really differs from 1 here


def test_gradient_checkpointing_and_kept_subset(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    full, kept = tmp_path / "full.npy", tmp_path / "kept.npy"
    sg.main(sg.Args(model=str(tiny_model), rollouts=str(path), out=str(full), projector="none", sparse_ratio=1.0,
                    gradient_checkpointing="on"))
    sg.main(sg.Args(model=str(tiny_model), rollouts=str(path), out=str(kept), projector="none", sparse_ratio=0.3,
                    seed=7))
    full_sketch = np.load(full)
    expected = independent_policy_gradients(tiny_model, rows, rho_weighted=False)
    np.testing.assert_allclose(full_sketch, expected, atol=2e-5 * np.abs(expected).max(), rtol=1e-4)
    meta = json.loads(kept.with_suffix(".json").read_text())
    positions = sg.kept_coordinates(meta["num_params"], 0.3, 7, CPU).numpy()
    assert meta["kept_coordinates"] == len(positions) == meta["proj_dim"]
    np.testing.assert_array_equal(np.load(kept), full_sketch[:, positions])


def test_projected_sketch_matches_projection_of_full_gradient(tiny_model, rollouts, tmp_path):
    """The default (every .grad hashed in place, F = 1) run as a user would: the same numbers as countsketch_project
    of the exact flattened gradient; and the release's F = 0.1 (the flattened path) as its kept subset projected."""
    path, rows = rollouts
    full = tmp_path / "full.npy"
    sg.main(sg.Args(model=str(tiny_model), rollouts=str(path), out=str(full), projector="none", sparse_ratio=1.0))
    exact = torch.from_numpy(np.load(full))
    for sparse_ratio in ("default", "0.1"):
        out = tmp_path / f"sketch_{sparse_ratio}.npy"
        flags = [] if sparse_ratio == "default" else ["--sparse-ratio", sparse_ratio]
        result = run_script("sketch_grads.py", "--model", str(tiny_model), "--rollouts", str(path), "--out", str(out),
                            "--proj-dim", "512", "--seed", "3", *flags, env={"OMP_NUM_THREADS": "1"})
        assert "wrote" in result.stdout
        sketch, meta = np.load(out), json.loads(out.with_suffix(".json").read_text())
        assert sketch.dtype == np.float32 and sketch.shape == (8, 512)
        ratio = 1.0 if sparse_ratio == "default" else 0.1
        assert {k: meta[k] for k in ("projector", "seed", "sparse_ratio", "proj_dim", "dtype")} == {
            "projector": "countsketch", "seed": 3, "sparse_ratio": ratio, "proj_dim": 512, "dtype": "float32"}
        positions = sg.kept_coordinates(meta["num_params"], ratio, 3, CPU)
        by_hand = sg.countsketch_project(exact[:, positions], 512, 3).numpy()
        assert meta["kept_coordinates"] == len(positions)
        np.testing.assert_allclose(sketch, by_hand, rtol=1e-4, atol=1e-5 * np.abs(by_hand).max())
    half = tmp_path / "half.npy"
    sg.main(sg.Args(model=str(tiny_model), rollouts=str(path), out=str(half), proj_dim=512, seed=3, dtype="float16"))
    assert np.load(half).dtype == np.float16
    np.testing.assert_allclose(np.load(half).astype(np.float32), np.load(tmp_path / "sketch_default.npy"),
                               rtol=2e-3, atol=2e-3 * np.abs(by_hand).max())


@pytest.mark.parametrize("projector, sparse_ratio", [("countsketch", 1.0), ("gaussian", 0.5), ("none", 0.3),
                                                    ("kronecker", 1.0)])
def test_validation_mean_is_the_mean_of_per_prompt_sketches(tiny_model, rollouts, tmp_path, projector, sparse_ratio):
    """--mean-of-rows: one backward pass over the sampled prompts (each weighted 1/m), one projection = the mean
    of their per-prompt sketches; select_data.validation_target takes it as g_v, as it would average the rows."""
    path, rows = rollouts
    settings = dict(model=str(tiny_model), rollouts=str(path), projector=projector, sparse_ratio=sparse_ratio,
                    proj_dim=64, seed=3, chunk_prompts=3)
    per_prompt, mean = tmp_path / "rows.npy", tmp_path / "mean.npy"
    sg.main(sg.Args(**settings, out=str(per_prompt)))
    meta = sg.main(sg.Args(**settings, out=str(mean), mean_of_rows=4, mean_seed=5))
    mixed = np.array([i for i, row in enumerate(rows) if not sg.is_zero_gradient(row["rewards"])])
    sample = common.sample_rows(mixed, 4, seed=5)  # 4 of the 6 rows with mixed rewards
    assert len(mixed) == 6 and meta["mean_of"]["rows"] == sample.tolist() and meta["mean_of"]["count"] == 4
    assert meta["rows"] == 1 and meta["ids"] == ["mean"] and meta["zero_rows"] == meta["nonfinite_rows"] == []
    assert meta["mean_of"]["ids"] == [rows[i]["id"] for i in sample]
    sketches = np.load(per_prompt)
    expected = sketches[sample].astype(np.float64).mean(axis=0)
    assert np.load(mean).shape == (1, sketches.shape[1])
    np.testing.assert_allclose(np.load(mean)[0], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert not np.allclose(expected, sketches[mixed].mean(axis=0))  # the sample matters: not all 6 rows

    train_meta = json.loads(per_prompt.with_suffix(".json").read_text())
    from_rows, _ = select_data.validation_target(str(per_prompt), train_meta, "t.npy", max_val=4, seed=5)
    from_mean, info = select_data.validation_target(str(mean), train_meta, "t.npy", max_val=100, seed=0)
    np.testing.assert_allclose(from_mean, from_rows, rtol=1e-4, atol=1e-5 * np.abs(from_rows).max())
    assert info["rows_averaged"] == 4 and info["averaged_row_indices"] == sample.tolist() and info["rows"] == 1
    assert info["mean_of"]["seed"] == 5


def test_mean_of_rows_sample_is_select_datas_sample():
    rows = [{"rewards": [0, 1] if i % 3 else [1, 1]} for i in range(40)]  # rows 0, 3, 6, ... have no gradient
    mixed = np.array([i for i in range(40) if i % 3])
    candidates = [i for i, row in enumerate(rows) if not sg.is_zero_gradient(row["rewards"])]  # as sketch_grads
    for max_rows, seed in ((5, 0), (5, 1), (26, 2), (100, 0)):
        np.testing.assert_array_equal(sg.M.mean_of_rows_sample(candidates, max_rows, seed),
                                      common.sample_rows(mixed, max_rows, seed))
    with pytest.raises(DataError, match="no prompt of r.jsonl has mixed rewards"):
        sg.M.mean_of_rows_sample([], 5, 0, "r.jsonl")


def test_gradient_checkpointing_setting(tiny_model, monkeypatch):
    dropout_off = lambda model: all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    load = lambda setting, device: sg.M.load_model_for_gradients(
        sg.Args(model=str(tiny_model), gradient_checkpointing=setting), device, 0, 1, streamed=True, buffered=False)
    model, share = load("auto", CPU)  # auto on a CPU: off, eval mode; one process: not sharded
    assert not model.is_gradient_checkpointing and not model.training and share is None
    for setting, device in (("on", CPU), ("auto", torch.device("cuda"))):
        load_on_cpu = lambda path, device, load=sg.M.load_model: load(path, CPU)  # stand-in for a CUDA load
        monkeypatch.setattr(sg.M, "load_model", load_on_cpu)
        monkeypatch.setattr(sg.M, "card_gib", lambda device: None)  # no memory plan without a card
        model, _ = load(setting, device)
        assert model.is_gradient_checkpointing and model.training and dropout_off(model)
        monkeypatch.undo()
    assert not load("off", CPU)[0].is_gradient_checkpointing


def test_memory_plan_names_the_flags_of_the_sketch_it_plans(tiny_model, monkeypatch):
    # a card too small for anything: the refusal names the flags that shrink this sketch's plan, before loading
    monkeypatch.setattr(sg.M, "card_gib", lambda device: 1e-6)
    monkeypatch.setattr(sg.M, "load_model", lambda *a: pytest.fail("loaded the model before the plan refused it"))
    with pytest.raises(DataError, match="lower --token-budget or use --fsdp on"):
        sg.Sketcher(sg.Args(model=str(tiny_model)), CPU)  # CountSketch at F = 1: nothing copied, FSDP can help
    with pytest.raises(DataError, match="lower --token-budget, --chunk-prompts or --sparse-ratio"):
        sg.Sketcher(sg.Args(model=str(tiny_model), sparse_ratio=0.5), CPU)  # the kept coordinates' buffer
    with pytest.raises(DataError, match="lower --token-budget$"):
        sg.Sketcher(sg.Args(model=str(tiny_model), projector="kronecker"), CPU)  # hooks: no buffer, no FSDP


def test_nonfinite_rows_flagged(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    bad = [dict(r) for r in rows]
    bad[1] = dict(bad[1], behavior_logprobs=[[-1e4] * len(lp) for lp in bad[1]["behavior_logprobs"]])  # rho = inf
    bad_path = tmp_path / "bad.jsonl"
    bad_path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    out = tmp_path / "bad.npy"
    meta = sg.main(sg.Args(model=str(tiny_model), rollouts=str(bad_path), out=str(out), proj_dim=64))
    assert meta["nonfinite_rows"] == [1] and meta["zero_rows"] == [3, 7]
    assert not np.isfinite(np.load(out)[1]).all() and np.isfinite(np.load(out)[[0, 2]]).all()


def test_resume_uses_finished_chunks_and_refuses_other_settings(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    out = tmp_path / "s.npy"
    args = sg.Args(model=str(tiny_model), rollouts=str(path), out=str(out), proj_dim=64, chunk_prompts=3)
    first = sg.main(args)
    reference = np.load(out)
    # a killed run left chunk 1 (rows 3..5) behind: the rerun must take it as it is, and compute the rest
    parts = tmp_path / "s.npy.parts"
    parts.mkdir()
    settings = {k: first[k] for k in first if k not in ("ids", "zero_rows", "nonfinite_rows")}
    (parts / "settings.json").write_text(json.dumps(settings))
    np.save(parts / "chunk_000001.npy", np.full((3, 64), 7.0, dtype=np.float32))
    sg.main(args)
    resumed = np.load(out)
    assert (resumed[3:6] == 7).all()
    np.testing.assert_array_equal(resumed[[0, 1, 2, 6, 7]], reference[[0, 1, 2, 6, 7]])
    assert not parts.exists()
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({**settings, "seed": 99}))
    with pytest.raises(DataError, match="seed"):
        sg.main(args)


def test_bad_flags_are_refused(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    result = run_script("sketch_grads.py", "--model", str(tiny_model), "--rollouts", str(path), "--out",
                        str(tmp_path / "x.npy"), "--projector", "fjlt", check=False)
    assert result.returncode != 0 and "--projector must be one of" in result.stderr
    for flags, message in ((["--gradient-checkpointing", "yes"], "--gradient-checkpointing must be one of auto"),
                           (["--mean-of-rows", "-1"], "--mean-of-rows >= 0"),
                           (["--projector", "kronecker", "--sparse-ratio", "0.5"], "kronecker sketches every")):
        with pytest.raises(DataError, match=message):
            sg.main(sg.M.parse_args(sg.Args, ["--model", str(tiny_model), "--rollouts", str(path), "--out",
                                              str(tmp_path / "x.npy"), *flags]))
    all_equal = tmp_path / "all_equal.jsonl"  # no prompt with mixed rewards: no validation mean to make
    all_equal.write_text(json.dumps(rows[3]) + "\n")
    assert sg.is_zero_gradient(rows[3]["rewards"])
    with pytest.raises(DataError, match="no prompt .* has mixed rewards"):
        sg.main(sg.Args(model=str(tiny_model), rollouts=str(all_equal), out=str(tmp_path / "m.npy"), mean_of_rows=5))


def test_torchrun_two_processes_write_the_same_file(tiny_model, rollouts, tmp_path):
    path, _ = rollouts
    common = ["--model", str(tiny_model), "--rollouts", str(path), "--proj-dim", "256", "--chunk-prompts", "2",
              "--projector", "gaussian", "--sparse-ratio", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *common, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29517", "sketch_grads.py", *common, "--out", str(double)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(double), np.load(single))
    one, two = (json.loads(p.with_suffix(".json").read_text()) for p in (single, double))
    assert one == two


def test_torchrun_validation_mean_sums_the_process_shares(tiny_model, rollouts, tmp_path):
    """--mean-of-rows under torchrun: each process backpropagates its share of the sample, the sketches are summed
    (all-reduce): the same row as one process, up to float rounding (the sums are added in another order). Here as
    run_cropi.sh runs it: the validation set (--val-rollouts) in the same run as the pool, whose rows are the same
    as one process's too."""
    path, _ = rollouts
    common = ["--model", str(tiny_model), "--rollouts", str(path), "--proj-dim", "256", "--mean-of-rows", "5",
              "--mean-seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *common, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    run_script("sketch_grads.py", *common[:4], "--proj-dim", "256", "--out", str(tmp_path / "pool_one.npy"),
               env={"OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29533", "sketch_grads.py", *common, "--out", str(tmp_path / "pool_two.npy"),
                             "--val-rollouts", str(path), "--val-out", str(double)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "pool_two.npy"), np.load(tmp_path / "pool_one.npy"))
    one = np.load(single)
    assert one.shape == (1, 256) and np.abs(one).max() > 0
    np.testing.assert_allclose(np.load(double), one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
    one_meta, two_meta = (json.loads(p.with_suffix(".json").read_text()) for p in (single, double))
    assert one_meta == two_meta and one_meta["mean_of"]["count"] == 5


@pytest.mark.parametrize("extra, port", [([], 29534), (["--mean-of-rows", "5", "--mean-seed", "1"], 29535)])
def test_torchrun_sharded_model_gives_the_sketch_of_one_process(tiny_model, rollouts, tmp_path, extra, port):
    """--fsdp on: the model sharded over 2 processes (FSDP2), each takes every prompt and half its responses and
    hashes its own rows of the averaged gradient at their global coordinates; the parts summed (all-reduce) are the
    sketch of one process, per prompt and as a validation mean, up to float rounding."""
    path, _ = rollouts
    common = ["--model", str(tiny_model), "--rollouts", str(path), "--proj-dim", "256", "--chunk-prompts", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single, double = tmp_path / "one.npy", tmp_path / "two.npy"
    run_script("sketch_grads.py", *common, "--out", str(single), env={"OMP_NUM_THREADS": "1"})
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", "sketch_grads.py", *common, "--fsdp", "on", "--out", str(double)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = np.load(single)
    assert np.abs(one).max() > 0
    np.testing.assert_allclose(np.load(double), one, rtol=1e-4, atol=1e-5 * np.abs(one).max())
    one_meta, two_meta = (json.loads(p.with_suffix(".json").read_text()) for p in (single, double))
    assert one_meta == two_meta


def test_sharding_needs_the_streamed_countsketch_and_a_response_per_process(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    flags = ["--model", str(tiny_model), "--rollouts", str(path), "--out", str(tmp_path / "x.npy"), "--fsdp", "on"]
    with pytest.raises(DataError, match="--fsdp on hashes each process's gradient shards"):
        sg.main(sg.M.parse_args(sg.Args, [*flags, "--sparse-ratio", "0.5"]))
    with pytest.raises(DataError, match=r"has 1 responses, fewer than the 2 processes"):
        sg.M.check_responses_per_process([{"response_ids": [[1]]}], 2, "r.jsonl", (0, 2))
    sg.M.check_responses_per_process([{"response_ids": [[1]]}], 2, "r.jsonl", None)  # replicated: whole prompts


def test_rho_is_one_at_stage_zero_up_to_bf16_batching_noise(tiny_model, rollouts, monkeypatch):
    """At stage 0 the checkpoint is beta: rho = exp(log pi - log beta) is 1 but for the numerics of two batchings of
    the same rows (collect: 16,384-token batches across prompts, longest first; sketch: one prompt's responses in
    file order). Under bf16 autocast (CPU here, as on CUDA) the head is float32 and batch-invariant, the body's bf16
    matmuls are not: |log rho| stays within 0.01 (in float32 exactly batch-free up to 1e-5)."""
    import collect_rollouts

    _, rows = rollouts
    model = sg.M.load_model(str(tiny_model), CPU).eval()
    flat_prompts = [row["prompt_ids"] for row in rows for _ in row["response_ids"]]
    flat_responses = [r for row in rows for r in row["response_ids"]]
    for dtype, bound in ((torch.bfloat16, 0.01), (None, 1e-5)):
        autocast = lambda device: torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)
        monkeypatch.setattr(sg.M, "autocast", autocast)
        beta = collect_rollouts.behavior_logprobs(model, flat_prompts, flat_responses, 0.7, 0, 16384)
        worst, flat = 0.0, 0
        with torch.no_grad():
            for row in rows:
                for batch in sg.M.token_budget_batches([len(row["prompt_ids"]) + len(r) for r in row["response_ids"]],
                                                       8192, longest_first=False):
                    with autocast(CPU):
                        current, _ = response_logprobs(model, [row["prompt_ids"]] * len(batch),
                                                       [row["response_ids"][i] for i in batch], 0.7, 0)
                    for j, i in enumerate(batch):
                        n = len(row["response_ids"][i])
                        worst = max(worst, (current[j, :n] - torch.tensor(beta[flat + i])).abs().max().item())
                flat += len(row["response_ids"])
        assert worst < bound, (dtype, worst)


# ----------------------------------------------------------------------------------------------
# The batched sketch (--projector kronecker): each weight matrix Kronecker-factored, many prompts per backward
# ----------------------------------------------------------------------------------------------

def per_prompt_gradients(model_dir, rows) -> list[dict]:
    """{parameter name: exact gradient} per prompt, one backward each (None for a zero-gradient prompt)."""
    sketcher = sg.Sketcher(sg.Args(model=str(model_dir), projector="none"), CPU)
    out = []
    for row in rows:
        if sg.is_zero_gradient(row["rewards"]):
            out.append(None)
            continue
        sketcher.model.zero_grad(set_to_none=True)
        sg.accumulate_prompt_gradient(sketcher.model, row, 8192, sketcher.pad_token_id)
        out.append({name: p.grad.clone() for name, p in sg.M.trainable_parameters(sketcher.model)})
    return out


@pytest.mark.parametrize("checkpointing", ["off", "on"])
def test_batched_sketch_with_identity_factors_is_each_prompts_exact_gradient(tiny_model, rollouts, checkpointing):
    """k above every dimension: P_out and P_in are identities, so what the hooks sum per prompt from one
    forward+backward of many prompts (micro-batches of 100 tokens mix prompts) is each prompt's exact gradient, for
    every parameter: the tied embedding + LM head, the position embedding, the Conv1D weights and biases, the
    layer norms; zero for the prompts whose rewards are all equal."""
    _, rows = rollouts
    sketcher = sg.Sketcher(sg.Args(model=str(tiny_model), projector="kronecker", kronecker_dim=10 ** 6, proj_dim=64,
                                   token_budget=100, gradient_checkpointing=checkpointing), CPU)
    sketch = sketcher.sketch_rows([[row] for row in rows])
    hooks, names = sketcher.hooks, [name for name, _ in sg.M.trainable_parameters(sg.M.load_model(str(tiny_model),
                                                                                                   CPU))]
    assert hooks.transposed and len(names) == len(hooks.parameters)  # GPT-2's Conv1D stores W^T
    widths = [hooks.width(p) for p in hooks.parameters]
    assert sum(widths) == sketcher.num_params  # identities: every coordinate as it is
    for b, exact in enumerate(per_prompt_gradients(tiny_model, rows)):
        if exact is None:
            assert not sketch[b].any() and not hooks.sums[id(hooks.parameters[0])][b].any()
            continue
        for name, p in zip(names, hooks.parameters):
            expected = exact[name].T if id(p) in hooks.transposed else exact[name]
            got = hooks.sums[id(p)][b].reshape(expected.shape)
            torch.testing.assert_close(got, expected, atol=1e-6 * exact[name].abs().max().item() + 1e-12, rtol=1e-4)
    assert not any(p.requires_grad for p in hooks.parameters)  # frozen: the backward skips every dW
    torch.testing.assert_close(sketch, sg.countsketch_project(hooks.rows(), 64, 0))


def test_kronecker_sketch_from_the_command_line(tiny_model, rollouts, tmp_path):
    path, rows = rollouts
    out = tmp_path / "kron.npy"
    run_script("sketch_grads.py", "--model", str(tiny_model), "--rollouts", str(path), "--out", str(out),
               "--projector", "kronecker", "--kronecker-dim", "16", "--proj-dim", "128", "--chunk-prompts", "3",
               env={"OMP_NUM_THREADS": "1"})
    sketch, meta = np.load(out), json.loads(out.with_suffix(".json").read_text())
    assert sketch.shape == (8, 128) and meta["projector"] == "kronecker" and meta["kronecker_dim"] == 16
    assert meta["zero_rows"] == [3, 7] and not sketch[[3, 7]].any() and np.abs(sketch[[0, 1, 2]]).sum(1).min() > 0
    other = {**meta, "kronecker_dim": 32}
    with pytest.raises(DataError, match="kronecker_dim"):
        sg.M.check_sketches_match(meta, "train.npy", other, "val.npy")


# ----------------------------------------------------------------------------------------------
# --batched-backward (the default): many prompts per forward+backward, each prompt's exact gradient hashed in place
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Llama-style layers: Linear with biases (q, k, v), RMSNorm, an untied LM head, an embedding with a padding_idx
    that is also a real token inside the prompts ('+'; Qwen2.5 pads with its end-of-text token): torch gives that
    row no gradient."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from make_demo import build_char_tokenizer
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         pad_token_id=tokenizer.convert_tokens_to_ids("+"), eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = folder / "rollouts.jsonl"
    return folder, path, make_synthetic_rollouts(folder, path, n_prompts=8, k=4, temperature=0.7)


@pytest.mark.parametrize("architecture, checkpointing", [("gpt2", "off"), ("gpt2", "on"), ("qwen2", "off")])
def test_batched_backward_equals_one_backward_per_prompt(tiny_model, rollouts, tiny_qwen2, architecture,
                                                         checkpointing, monkeypatch):
    """The same CountSketch rows (to float rounding) from one forward+backward of all 8 prompts (micro-batches of
    100 tokens mix them) as from a backward per prompt with its .grad hashed; hash blocks of 1,000 coordinates, so
    that weights span blocks. GPT-2: Conv1D (stored transposed), the tied embedding + head, the position embedding,
    LayerNorm; Qwen2: Linear with and without bias, RMSNorm, an untied head, an embedding with padding_idx."""
    monkeypatch.setattr(sg, "HASH_BLOCK", 1000)
    sg.countsketch_draws.cache_clear()
    model, rows = (tiny_model, rollouts[1]) if architecture == "gpt2" else (tiny_qwen2[0], tiny_qwen2[2])
    settings = dict(model=str(model), proj_dim=256, seed=5, token_budget=100, gradient_checkpointing=checkpointing)
    per_prompt = sg.Sketcher(sg.Args(**settings, batched_backward="off"), CPU)
    batched = sg.Sketcher(sg.Args(**settings, batched_backward="on"), CPU)
    assert per_prompt.hooks is None and isinstance(batched.hooks, sg.M.CountSketchHooks)
    expected, got = per_prompt.sketch_rows([[row] for row in rows]), batched.sketch_rows([[row] for row in rows])
    zero = [sg.is_zero_gradient(row["rewards"]) for row in rows]
    assert any(zero) and not got[zero].any() and got[[not z for z in zero]].abs().sum(1).min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not any(p.requires_grad for p in batched.parameters)  # frozen: the backward skips every summed dW
    sg.countsketch_draws.cache_clear()


def test_draws_of_a_range_spanning_blocks():
    block_draws = lambda block: torch.arange(10) + 100 * block  # noqa: E731  blocks of 10: 0..9, 100..109, 200..209
    whole = torch.cat([block_draws(block) for block in range(3)])
    for offset, count in ((0, 10), (7, 2), (7, 5), (4, 25), (10, 10)):
        assert torch.equal(sg.M.draws_of_range(block_draws, 10, offset, count), whole[offset:offset + count])
    assert sg.M.draws_of_range(block_draws, 10, 7, 5).tolist() == [7, 8, 9, 100, 101]


def test_validation_sets_in_the_same_run_as_the_pool(tiny_model, rollouts, tmp_path):
    """--val-rollouts/--val-out write what separate runs write (one model load); mismatched lists are refused."""
    path, _ = rollouts
    common_flags = ["--model", str(tiny_model), "--proj-dim", "64", "--mean-seed", "2"]
    run_script("sketch_grads.py", *common_flags, "--rollouts", str(path), "--out", str(tmp_path / "train.npy"),
               "--val-rollouts", str(path), "--val-out", str(tmp_path / "val.npy"), "--mean-of-rows", "3",
               env={"OMP_NUM_THREADS": "1"})
    run_script("sketch_grads.py", *common_flags, "--rollouts", str(path), "--out", str(tmp_path / "alone.npy"),
               "--mean-of-rows", "3", env={"OMP_NUM_THREADS": "1"})
    run_script("sketch_grads.py", *common_flags, "--rollouts", str(path), "--out", str(tmp_path / "rows.npy"),
               env={"OMP_NUM_THREADS": "1"})
    assert np.load(tmp_path / "val.npy").shape == (1, 64) and np.load(tmp_path / "train.npy").shape == (8, 64)
    np.testing.assert_array_equal(np.load(tmp_path / "val.npy"), np.load(tmp_path / "alone.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), np.load(tmp_path / "rows.npy"))
    meta = json.loads((tmp_path / "val.json").read_text())
    assert meta["mean_of"]["count"] == 3 and meta["rollouts"] == str(path.resolve())
    result = run_script("sketch_grads.py", *common_flags, "--rollouts", str(path), "--out", str(tmp_path / "x.npy"),
                        "--val-rollouts", str(path), check=False)
    assert result.returncode != 0 and "1 --val-rollouts but 0 --val-out" in result.stderr
    assert not (tmp_path / "x.npy").exists()
    broken = tmp_path / "broken.jsonl"  # a bad pool file is found before any validation sketch is written
    broken.write_text(path.read_text() + "{not json\n")
    result = run_script("sketch_grads.py", *common_flags, "--rollouts", str(broken), "--out", str(tmp_path / "y.npy"),
                        "--val-rollouts", str(path), "--val-out", str(tmp_path / "val_y.npy"), check=False)
    assert result.returncode != 0 and "broken.jsonl:9: not valid JSON" in result.stderr
    assert not (tmp_path / "val_y.npy").exists() and not (tmp_path / "y.npy").exists()


def test_when_the_backward_is_batched(tiny_model, rollouts, tmp_path):
    use = sg.M.use_batched_backward
    assert use("auto", None, False) and use("on", None, True) and use("on", None, False)
    assert not use("auto", None, True)  # checkpointing (CUDA's default): the hooks would hold every layer's input
    assert not use("auto", (0, 2), False) and not use("off", None, False)
    with pytest.raises(DataError, match="not with a sharded model"):
        use("on", (0, 2), False)
    path, _ = rollouts
    result = run_script("sketch_grads.py", "--model", str(tiny_model), "--rollouts", str(path), "--out",
                        str(tmp_path / "s.npy"), "--batched-backward", "on", "--sparse-ratio", "0.5", check=False)
    assert result.returncode != 0 and "--batched-backward on hashes each prompt's exact gradient" in result.stderr
    assert not (tmp_path / "s.npy").exists()
