"""Steps 1c-1f of CROPI: score the training pool against the validation targets, fuse the rankings, keep the top.

  1c  validation target of set v:  g_v = mean of (up to --max-val, seeded sample) projected validation gradients,
      zero-gradient and non-finite rows left out
  1d  POPI score:                  score(x, v) = cos(g(x), g_v) = <g(x), g_v> / (|g(x)| |g_v|)
  1e  Reciprocal Rank Fusion:      per v keep the top N_sel rows by score (rank 1 = best);
                                   fused(x) = sum over the lists v that contain x of 1 / (k + rank_v(x)),  k = 0
  1f  D(m) = the top N_sel rows by fused score,  N_sel = floor(ratio * pool size)

Baselines through --method: full, random, learnability (top p(1-p)), pass_rate (random among 0 < p < 1) and
influence_once (re-issue the stage-0 cropi selection of --reuse-selection DIR).

Reads  --train-rollouts (collect_rollouts.py) for ids, data rows and offline pass rates p = mean of the K rewards;
       for cropi, --train-sketch TRAIN.npy and every --val-sketch V.npy (sketch_grads.py), each with its .json
       beside it; for influence_once, DIR/selection.json, DIR/subset.jsonl and DIR/scores.npy.
Writes OUT/subset.jsonl  the selected data rows {"id","prompt","answer"} (+ "skill"/"source"), best first
       OUT/scores.npy    float32 [pool size, columns]; the column names are selection.json's "score_columns"
                         (pass rate, then for cropi the cosine per validation set and the fused score; NaN on
                         rows that could not be scored)
       OUT/selection.json, written last: it is the completion marker. Re-running with the same arguments when it
       exists does nothing.

Arithmetic: sketch rows are read through memory maps, chunk by chunk on every core, and widened to float32 (float16
files) a cache-sized block at a time; dot products and norms are float32; the validation means are accumulated in
float64 and used in float32.
Ties are broken by row index (the earlier row in the rollouts file wins), everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import machinery as M
from common import DataError, pass_rate_histogram, sample_rows
from machinery import arg

METHODS = ("cropi", "full", "random", "learnability", "pass_rate", "influence_once")


@dataclasses.dataclass
class Args:
    train_rollouts: str = arg("", "training-pool rollouts file (collect_rollouts.py): ids, data rows, pass rates")
    out: str = arg("", "output folder: subset.jsonl, scores.npy, selection.json")
    method: str = arg("cropi", "cropi | full | random | learnability | pass_rate | influence_once")
    ratio: float = arg(0.1, "fraction of the pool to select: N_sel = floor(ratio * pool size)")
    seed: int = arg(0, "seed of the validation-row sample (cropi) and of the random / pass_rate baselines")
    train_sketch: str = arg("", "cropi: projected gradients of the pool, TRAIN.npy with TRAIN.json beside it")
    val_sketch: list[str] = arg([], "cropi: projected gradients of one validation set (repeat the flag per set)")
    max_val: int = arg(100, "cropi: validation rows averaged per set (seeded sample); 0 = all")
    rrf_k: float = arg(0.0, "cropi: k in 1/(k + rank) of Reciprocal Rank Fusion (the release: 0; common RRF: 60)")
    reuse_selection: str = arg("", "influence_once: output folder of an earlier cropi run (stage 0) to re-issue")
    chunk_rows: int = arg(4096, "cropi: train-sketch rows per chunk, one chunk mapped per thread at a time")


# ----------------------------------------------------------------------------------------------
# Small pure functions: the math of steps 1c-1f and of the baselines
# ----------------------------------------------------------------------------------------------

def num_to_select(ratio: float, pool_size: int) -> int:
    """N_sel = floor(ratio * pool size); the 1e-9 keeps 0.29 * 100 at 29 despite binary floating point."""
    if not 0 < ratio <= 1:
        raise DataError(f"--ratio must be in (0, 1], got {ratio}")
    n_select = math.floor(ratio * pool_size + 1e-9)
    if n_select == 0:
        raise DataError(f"--ratio {ratio} of a pool of {pool_size} prompts selects 0 rows; raise --ratio")
    return n_select


def rank_descending(scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Indices of the eligible rows, highest score first; equal scores: lower row index first."""
    rows = np.flatnonzero(eligible)
    return rows[np.argsort(-scores[rows], kind="stable")]  # a stable sort keeps equal scores in row order


def reciprocal_rank_fusion(scores: np.ndarray, eligible: np.ndarray, n_select: int, k: float = 0.0):
    """fused(x) = sum over columns v whose top-n_select list holds x of 1 / (k + rank_v(x)), rank from 1.

    scores: [rows, V]. Returns (fused [rows] float64, 0 for rows in no list; ranks [V, rows] int64, the full
    1-based rank of every eligible row under each v, 0 for ineligible rows).
    """
    fused = np.zeros(scores.shape[0], dtype=np.float64)
    ranks = np.zeros((scores.shape[1], scores.shape[0]), dtype=np.int64)
    for v in range(scores.shape[1]):
        order = rank_descending(scores[:, v], eligible)
        ranks[v, order] = np.arange(1, len(order) + 1)
        top = order[:n_select]
        fused[top] += 1.0 / (k + np.arange(1, len(top) + 1))
    return fused, ranks


def cosine_to_targets(chunk, unit_targets: np.ndarray, block_rows: int = 64):
    """cos(x, g_v) = <x, g_v / |g_v|> / |x| for every row x of chunk [n, d] (float16 or float32, numpy or torch)
    and every unit-length column g_v / |g_v| of unit_targets [d, V].

    Returns (cosines [n, V] float32, row norms |x| [n] float32); rows of norm 0 or non-finite get NaN cosines.
    In float32, block_rows rows at a time: each block is widened into a buffer that stays in the CPU cache while
    its dot products and norms read it (a whole chunk would go to main memory and back twice).
    """
    chunk, targets = torch.as_tensor(chunk), torch.as_tensor(unit_targets, dtype=torch.float32).T.contiguous()
    dots, norms = torch.empty(targets.shape[0], len(chunk)), torch.empty(len(chunk))
    buffer = torch.empty(min(block_rows, len(chunk)), chunk.shape[1])
    for i in range(0, len(chunk), block_rows):
        block = buffer[:len(chunk[i:i + block_rows])].copy_(chunk[i:i + block_rows])  # float16 -> float32
        torch.mm(targets, block.T, out=dots[:, i:i + len(block)])  # <x, g_v / |g_v|>  [V, block]
        torch.linalg.vector_norm(block, dim=1, out=norms[i:i + len(block)])  # |x|
    usable = (torch.isfinite(norms) & (norms > 0))[:, None]
    return torch.where(usable, dots.T / norms[:, None], torch.nan).numpy(), norms.numpy()


def learnability_order(pass_rates: np.ndarray) -> np.ndarray:
    """All rows by p(1-p), highest first (the release's "difficulty" score); ties by row index."""
    return rank_descending(pass_rates * (1 - pass_rates), np.ones(len(pass_rates), dtype=bool))


def pass_rate_order(pass_rates: np.ndarray, n_select: int, seed: int) -> np.ndarray:
    """n_select rows drawn at random among those with 0 < p < 1.

    When fewer than n_select have 0 < p < 1, take the n_select rows closest to p = 0.5 instead (all the mixed
    ones first, since they are strictly closer); equal distances are ordered by the same seeded random draw.
    """
    rng = np.random.default_rng(seed)
    mixed = np.flatnonzero((pass_rates > 0) & (pass_rates < 1))
    if len(mixed) >= n_select:
        return rng.permutation(mixed)[:n_select]
    random_key = rng.permutation(len(pass_rates))
    return np.lexsort((random_key, np.abs(pass_rates - 0.5)))[:n_select]


# ----------------------------------------------------------------------------------------------
# Method cropi: steps 1c-1f
# ----------------------------------------------------------------------------------------------

def validation_target(path: str, train_meta: dict, train_path: str, max_val: int, seed: int):
    """Step 1c: g_v = (1/|S|) sum_{i in S} g_i over a seeded sample S of the usable validation rows (float64).
    A file of sketch_grads.py --mean-of-rows is g_v itself, one row (the projection is linear: the sketch of the mean
    gradient is the mean of the sketches), used as it is with the sample S it records (max_val, seed unused)."""
    sketch, meta = M.open_sketch(path, "--val-sketch")
    M.check_sketches_match(train_meta, train_path, meta, path)
    zero, nonfinite = M.excluded_rows(meta, sketch.shape[0], str(Path(path).with_suffix(".json")))
    squared_norms = np.concatenate([np.einsum("ij,ij->i", c, c)
                                    for _, c in M.iter_sketch_chunks(sketch, 4096, Path(path).name)])
    zero |= squared_norms == 0
    nonfinite |= ~np.isfinite(squared_norms)
    mean_of = meta.get("mean_of")
    used = np.asarray(mean_of["rows"]) if mean_of else sample_rows(np.flatnonzero(~zero & ~nonfinite), max_val, seed)
    if len(used) == 0:
        raise DataError(f"--val-sketch {path}: no usable rows: all {sketch.shape[0]} have a zero gradient (every response "
                        "of the prompt got the same reward, so every advantage is 0) or a non-finite one, so this set "
                        "gives no direction; try more responses per prompt (VAL_K), easier prompts or a stronger model")
    target = np.asarray(sketch[[0]] if mean_of else sketch[used], dtype=np.float64).mean(axis=0)
    if not np.isfinite(target).all() or not target.any():
        raise DataError(f"--val-sketch {path}: the mean of the sampled rows is zero or not finite")
    info = {"path": str(path), "name": Path(path).stem, "rows": int(sketch.shape[0]), "model": meta["model"],
            "zero_gradient_rows": int(zero.sum()), "nonfinite_rows": int((nonfinite & ~zero).sum()),
            "rows_averaged": len(used), "averaged_row_indices": used.tolist(), "mean_of": mean_of}
    return target, info


def select_cropi(args: Args, pool: list[dict], pass_rates: np.ndarray, n_select: int):
    """Steps 1c-1f. Returns (selected rows best first, scores [rows, 1 + V + 1], score columns, report)."""
    train_sketch, train_meta = M.open_sketch(args.train_sketch, "--train-sketch")
    pool_ids = [row["id"] for row in pool]
    M.check_sketch_ids(train_meta, pool_ids, args.train_sketch, args.train_rollouts)

    # 1c. one validation target per set, as unit vectors g_v / |g_v| (the columns of a [d, V] matrix)
    targets, val_infos = [], []
    for path in args.val_sketch:
        target, info = validation_target(path, train_meta, args.train_sketch, args.max_val, args.seed)
        targets.append(target / np.linalg.norm(target))
        val_infos.append(info)
    unit_targets = np.stack(targets, axis=1).astype(np.float32)
    names = [info["name"] for info in val_infos]
    if len(set(names)) < len(names):  # two sets with the same file name: name them by path
        names = [info["path"] for info in val_infos]
        for info, name in zip(val_infos, names):
            info["name"] = name

    # 1d. score(x, v) = cos(g(x), g_v), chunk by chunk
    zero, nonfinite = M.excluded_rows(train_meta, len(pool), str(Path(args.train_sketch).with_suffix(".json")))
    scoring_began = time.perf_counter()
    scored = M.map_sketch_chunks(lambda rows: cosine_to_targets(rows, unit_targets), train_sketch, args.chunk_rows,
                                 "scoring pool")
    cosines, norms = (np.concatenate(parts) for parts in zip(*scored))
    scoring_seconds = round(time.perf_counter() - scoring_began, 2)
    zero |= norms == 0
    nonfinite |= ~np.isfinite(norms)
    nonfinite |= ~np.isfinite(cosines).all(axis=1) & ~zero
    eligible = ~zero & ~nonfinite
    cosines[~eligible] = np.nan

    # 1e. fused(x) = sum_v [x in top N_sel of v] / (k + rank_v(x));   1f. top N_sel by fused score
    fused, ranks = reciprocal_rank_fusion(cosines, eligible, n_select, args.rrf_k)
    selected = rank_descending(fused, fused > 0)[:n_select]
    fused_column = np.where(eligible, fused, np.nan)

    scores = np.column_stack([pass_rates, cosines, fused_column]).astype(np.float32)
    columns = ["pass_rate"] + [f"cosine:{name}" for name in names] + ["fused"]
    details = [{"id": pool_ids[i], "row": int(i), "pass_rate": float(pass_rates[i]), "fused": float(fused[i]),
                "per_validation_set": {name: {"cosine": float(cosines[i, v]), "rank": int(ranks[v, i])}
                                       for v, name in enumerate(names)}} for i in selected]
    report = {"eligible": int(eligible.sum()), "excluded_zero_gradient": int(zero.sum()),
              "excluded_nonfinite": int((nonfinite & ~zero).sum()), "validation_sets": val_infos,
              "rrf_k": args.rrf_k, "max_val": args.max_val, "train_sketch": str(args.train_sketch),
              "scoring_seconds": scoring_seconds,
              "sketch": {f: train_meta[f] for f in ("model",) + M.MATCHING_FIELDS}, "selected_details": details}
    return selected, scores, columns, report


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------

def select_baseline(args: Args, pass_rates: np.ndarray, n_select: int):
    pool_size = len(pass_rates)
    if args.method == "full":
        return np.arange(pool_size), pass_rates[:, None], ["pass_rate"]
    if args.method == "random":
        return np.random.default_rng(args.seed).permutation(pool_size)[:n_select], pass_rates[:, None], ["pass_rate"]
    if args.method == "learnability":
        scores = np.column_stack([pass_rates, pass_rates * (1 - pass_rates)])
        return learnability_order(pass_rates)[:n_select], scores, ["pass_rate", "learnability"]
    return pass_rate_order(pass_rates, n_select, args.seed), pass_rates[:, None], ["pass_rate"]


def reuse_selection(args: Args, pool: list[dict], n_select: int):
    """influence_once: the stage-0 cropi selection, checked to come from the same pool and the same ratio."""
    earlier, subset_ids, scores = M.read_earlier_selection(args.reuse_selection, [row["id"] for row in pool],
                                                           n_select, args.ratio)
    row_of = {row["id"]: i for i, row in enumerate(pool)}
    selected = np.array([row_of[i] for i in subset_ids], dtype=np.int64)
    report = {key: earlier[key] for key in ("eligible", "excluded_zero_gradient", "excluded_nonfinite",
                                            "validation_sets", "rrf_k", "max_val", "train_sketch", "sketch",
                                            "selected_details")}
    return selected, scores, earlier["score_columns"], report | {"reused_from": str(args.reuse_selection)}


# ----------------------------------------------------------------------------------------------

def select_data(args: Args) -> dict:
    """Read the pool, select N_sel of its prompts by the chosen method, write subset.jsonl, scores.npy and
    selection.json (last: the completion marker)."""
    began = time.perf_counter()
    with M.reading_ahead(args.train_sketch if args.method == "cropi" else ""):  # from disk while the pool is read
        pool, pass_rates = M.read_selection_pool(args.train_rollouts)  # p = offline pass rate of the K responses
    read = time.perf_counter()
    n_select = len(pool) if args.method == "full" else num_to_select(args.ratio, len(pool))
    if args.method == "cropi":  # steps 1c-1f
        selected, scores, columns, report = select_cropi(args, pool, pass_rates, n_select)
    elif args.method == "influence_once":
        selected, scores, columns, report = reuse_selection(args, pool, n_select)
    else:
        selected, scores, columns = select_baseline(args, pass_rates, n_select)
        report = {"selected_details": [{"id": pool[i]["id"], "row": int(i), "pass_rate": float(pass_rates[i])}
                                       for i in selected]}
    chosen = time.perf_counter()
    selection = {"method": args.method, "ratio": args.ratio, "seed": args.seed, "pool_size": len(pool),
                 "n_select": n_select, "num_selected": len(selected),
                 "train_rollouts": str(Path(args.train_rollouts).resolve()),
                 "train_ids_sha256": M.ids_fingerprint([row["id"] for row in pool]), "score_columns": columns,
                 **report,
                 "pass_rate_histogram": {"pool": pass_rate_histogram(pass_rates),
                                         "selected": pass_rate_histogram(pass_rates[selected])},
                 "composition": M.composition(pool, selected), "args": dataclasses.asdict(args)}
    if len(selected) < n_select:
        selection["note"] = (f"only {len(selected)} rows are eligible (non-zero, finite gradient), fewer than "
                             f"N_sel = {n_select}: all of them are selected")
    M.write_jsonl(Path(args.out) / "subset.jsonl", (pool[i] for i in selected))
    M.save_npy(Path(args.out) / "scores.npy", np.asarray(scores, dtype=np.float32))
    done = time.perf_counter()
    selection["seconds"] = {name: round(seconds, 2) for name, seconds in (
        ("read_pool", read - began), ("select", chosen - read), ("write", done - chosen), ("total", done - began))}
    M.write_json_rows(Path(args.out) / "selection.json", selection, "selected_details")  # last: completion marker
    return selection


def main(args: Args) -> None:
    M.check_select_args(args, METHODS)
    marker = Path(args.out) / "selection.json"
    if marker.is_file() and json.loads(marker.read_text()).get("args") == dataclasses.asdict(args):
        print(f"{marker} exists with the same arguments: nothing to do")
        return
    M.print_selection_summary(select_data(args))


if __name__ == "__main__":
    M.run_main(main, Args)
