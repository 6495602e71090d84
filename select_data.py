"""Steps 1c-1f of CROPI: score the pool against validation targets, fuse the rankings, keep the top.

  1c  target of validation set v:  g_v = (1/|U_v|) sum_{i in U_v} g_i, the plain mean (float64) of
      the usable rows U_v (non-zero, finite) of its sketch; a sketch_grads.py --mean-of-rows sketch
      is one row, the mean of a seeded sample of prompts (the projection is linear): g_v itself
  1d  POPI score:  score(x, v) = cos(g(x), g_v) = <g(x), g_v> / (|g(x)| |g_v|)
  1e  Reciprocal Rank Fusion: per v keep the top N_sel rows by score (rank 1 = best);
      fused(x) = sum over the lists v that contain x of 1 / (k + rank_v(x)),  k = --rrf-k (0)
  1f  D(m) = the top N_sel rows by fused score,  N_sel = floor(ratio * pool size)
Baselines (--method): full, random, learnability (top p(1-p)), pass_rate (0 < p < 1), influence_once
Writes OUT/subset.jsonl (selected rows, best first), OUT/scores.npy (float32 [pool, columns]: pass
rate p, then for cropi the cosine per set and the fused score; NaN: not scored), and last
OUT/selection.json, the completion marker. Ties go to the lower row index (earlier in the rollouts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from plumbing import files
from plumbing import sketch_files as sf
from plumbing.cli import DataError, arg, run_main
from plumbing.data import iter_jsonl, pass_rate_histogram, read_jsonl

Method = Literal["cropi", "full", "random", "learnability", "pass_rate", "influence_once"]
POOL_FIELDS = ("id", "prompt", "answer", "skill", "source")  # what subset.jsonl keeps of a row
CROPI_REPORT = ("eligible", "excluded_zero_gradient", "excluded_nonfinite", "validation_sets")


@dataclasses.dataclass
class Args:
    train_rollouts: str = arg("", "the pool's rollouts (collect_rollouts.py)", required=True)
    out: str = arg("", "output folder: subset.jsonl, scores.npy, selection.json", required=True)
    method: Method = arg("cropi", "the selection rule: CROPI (steps 1c-1f) or a baseline")
    ratio: float = arg(0.1, "fraction of the pool to select: N_sel = floor(ratio * pool size)")
    seed: int = arg(0, "seed of the random and pass_rate baselines")
    train_sketch: str = arg("", "cropi: the pool's projected gradients, X.npy (X.json beside)")
    val_sketch: list[str] = arg([], "cropi: a validation set's projected gradients; once per set")
    rrf_k: float = arg(0.0, "cropi: k of 1/(k + rank) in Reciprocal Rank Fusion", at_least=0)
    reuse_selection: str = arg("", "influence_once: the --out of an earlier cropi run (stage 0)")
    chunk_rows: int = arg(4096, "cropi: train-sketch rows read at a time", at_least=1)


def num_to_select(ratio: float, pool_size: int) -> int:
    """N_sel = floor(ratio * pool size); the 1e-9 keeps 0.29 * 100 at 29 in floating point."""
    if not 0 < ratio <= 1:
        raise DataError(f"--ratio must be in (0, 1], got {ratio}")
    n_select = math.floor(ratio * pool_size + 1e-9)
    if n_select == 0:
        raise DataError(f"--ratio {ratio} of a pool of {pool_size} selects 0 rows; raise --ratio")
    return n_select


def rank_descending(scores: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Indices of the eligible rows, highest score first; equal scores: lower row index first."""
    rows = np.flatnonzero(eligible)
    return rows[np.argsort(-scores[rows], kind="stable")]  # stable: equal scores keep row order


def reciprocal_rank_fusion(scores, eligible, n_select: int, k: float = 0.0) -> np.ndarray:
    """scores [rows, V] -> fused [rows] float64 (0 for rows in no top list)."""
    fused = np.zeros(scores.shape[0])
    for v in range(scores.shape[1]):
        top = rank_descending(scores[:, v], eligible)[:n_select]
        fused[top] += 1.0 / (k + np.arange(1, len(top) + 1))  # 1 / (k + rank_v(x)), ranks from 1
    return fused


def cosine_to_targets(chunk: np.ndarray, unit_targets: np.ndarray, block_rows: int = 64):
    """(cos(x, g_v) [n, V], |x| [n]) in float32 for the rows x of chunk [n, d] and the unit rows
    g_v / |g_v| of unit_targets [V, d]; NaN where |x| is 0 or not finite. block_rows rows at a time
    are widened into a float32 buffer that stays in the CPU cache while dots and norms read it."""
    dots = np.empty((len(chunk), len(unit_targets)), np.float32)
    norms = np.empty(len(chunk), np.float32)
    buffer = np.empty((min(block_rows, len(chunk)), chunk.shape[1]), np.float32)
    for i in range(0, len(chunk), block_rows):
        rows = chunk[i : i + block_rows]
        block = sf.widen(rows, out=buffer[: len(rows)])  # float16 -> float32
        np.einsum("ij,vj->iv", block, unit_targets, out=dots[i : i + len(rows)])  # <x, g_v/|g_v|>
        norms[i : i + len(rows)] = np.sqrt(np.einsum("ij,ij->i", block, block))  # |x|
    usable = (np.isfinite(norms) & (norms > 0))[:, None]
    return np.divide(dots, norms[:, None], out=np.full_like(dots, np.nan), where=usable), norms


def learnability_order(pass_rates: np.ndarray) -> np.ndarray:
    """All rows by p(1-p), highest first (the release's "difficulty" score); ties by row index."""
    return rank_descending(pass_rates * (1 - pass_rates), np.ones(len(pass_rates), dtype=bool))


def pass_rate_order(pass_rates: np.ndarray, n_select: int, seed: int) -> np.ndarray:
    """n_select rows at random among those with 0 < p < 1; too few: the closest to p = 0.5."""
    rng = np.random.default_rng(seed)
    mixed = np.flatnonzero((pass_rates > 0) & (pass_rates < 1))
    if len(mixed) >= n_select:
        return rng.permutation(mixed)[:n_select]
    return np.lexsort((rng.permutation(len(pass_rates)), np.abs(pass_rates - 0.5)))[:n_select]


def validation_target(path: str, train_meta: dict, train_path: str, chunk_rows: int = 4096):
    """Step 1c: (g_v float64 [d], report) from one validation sketch file."""
    sketch, meta = sf.open_sketch(path, "--val-sketch")
    sf.check_sketches_match(train_meta, train_path, meta, path)
    unusable, total = np.logical_or(*sf.excluded_rows(meta)), 0.0
    for start, chunk in sf.iter_chunks(sketch, chunk_rows):
        rows, part = chunk.astype(np.float64), slice(start, start + len(chunk))
        squared_norms = np.einsum("ij,ij->i", rows, rows)
        unusable[part] |= ~(np.isfinite(squared_norms) & (squared_norms > 0))
        total = total + rows[~unusable[part]].sum(axis=0)
    used = int((~unusable).sum())
    target = total / max(used, 1)  # g_v = (1/|U_v|) sum_{i in U_v} g_i
    if not np.any(target):  # every row zero (equal rewards for all responses) or not finite
        raise DataError(f"--val-sketch {path}: no usable rows (or their mean is 0); raise VAL_K")
    report = {"name": Path(path).stem, "rows": len(sketch), "rows_averaged": used}
    return target, report | {"mean_of": meta.get("mean_of")}  # a --mean-of-rows file's sample


def select_cropi(args: Args, pool: list[dict], n_select: int):
    """Steps 1c-1f: (selected rows best first, scores [rows, V + 1], their column names, report)."""
    train, train_meta = sf.open_sketch(args.train_sketch, "--train-sketch")
    sf.check_sketch_ids(train_meta, [r["id"] for r in pool], args.train_sketch, args.train_rollouts)
    # 1c. a target per set, as unit vectors g_v / |g_v|: the rows of targets [V, d]
    found = [validation_target(path, train_meta, args.train_sketch) for path in args.val_sketch]
    targets = np.stack([g / np.linalg.norm(g) for g, _ in found]).astype(np.float32)
    val_sets = [report for _, report in found]
    if len({v["name"] for v in val_sets}) < len(val_sets):  # two files of one name: use paths
        val_sets = [v | {"name": path} for v, path in zip(val_sets, args.val_sketch)]
    # 1d. score(x, v) = cos(g(x), g_v), chunk by chunk
    parts = [cosine_to_targets(c, targets) for _, c in sf.iter_chunks(train, args.chunk_rows)]
    cosines, norms = (np.concatenate(part) for part in zip(*parts))
    zero, nonfinite = sf.excluded_rows(train_meta)
    zero |= norms == 0
    nonfinite |= ~np.isfinite(cosines).all(axis=1) & ~zero
    eligible = ~zero & ~nonfinite
    cosines[~eligible] = np.nan
    # 1e. fused(x) = sum_v [x in the top N_sel of v] / (k + rank_v(x));  1f. the top N_sel by fused
    fused = reciprocal_rank_fusion(cosines, eligible, n_select, args.rrf_k)
    selected = rank_descending(fused, fused > 0)[:n_select]
    scores = np.column_stack([cosines, np.where(eligible, fused, np.nan)])
    columns = [f"cosine:{v['name']}" for v in val_sets] + ["fused"]
    counts = [int(eligible.sum()), int(zero.sum()), int((nonfinite & ~zero).sum()), val_sets]
    return selected, scores, columns, dict(zip(CROPI_REPORT, counts))


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def reuse_selection(args: Args, pool: list[dict], n_select: int):
    """influence_once: the stage-0 cropi selection of the same pool and N_sel, read back."""
    folder = Path(args.reuse_selection)
    earlier, where = files.read_json(folder / "selection.json"), f"--reuse-selection {folder}"
    if earlier.get("method") != "cropi":
        raise DataError(f"{where}: made with method {earlier.get('method')!r}, not 'cropi'")
    if earlier.get("train_ids_sha256") != ids_sha256([row["id"] for row in pool]):
        raise DataError(f"{where}: its pool's ids differ from those of --train-rollouts")
    if earlier.get("n_select") != n_select:
        raise DataError(f"{where}: N_sel={earlier.get('n_select')}, --ratio: N_sel={n_select}")
    subset_ids = [row["id"] for row in read_jsonl(folder / "subset.jsonl")]
    if ids_sha256(subset_ids) != earlier.get("subset_ids_sha256"):
        raise DataError(f"{where}: subset.jsonl is not the subset that selection.json records")
    row_of = {row["id"]: i for i, row in enumerate(pool)}
    selected = np.array([row_of[i] for i in subset_ids], dtype=np.int64)
    report = {key: earlier[key] for key in CROPI_REPORT} | {"reused_from": str(folder)}
    scores = files.load_npy(folder / "scores.npy")[:, 1:]  # the pass rate (column 0) is added again
    return selected, scores, earlier["score_columns"][1:], report


def read_pool(path: str) -> tuple[list[dict], np.ndarray]:
    """The rows of a rollouts file (their POOL_FIELDS) and the pass rates p = mean reward."""
    rows, pass_rates = [], []
    for line, obj in iter_jsonl(path):
        if not ("id" in obj and "prompt" in obj and "answer" in obj and obj.get("rewards")):
            raise DataError(f"{path}:{line}: a rollout row needs id, prompt, answer and rewards")
        rows.append({field: obj[field] for field in POOL_FIELDS if field in obj})
        pass_rates.append(sum(obj["rewards"]) / len(obj["rewards"]))
    repeated = [i for i, count in Counter(row["id"] for row in rows).items() if count > 1]
    if not rows or repeated:
        raise DataError(f"{path}: duplicate id {repeated[0]!r}" if rows else f"{path}: no rollouts")
    return rows, np.array(pass_rates)


def composition(pool: list[dict], pass_rates: np.ndarray, selected: np.ndarray) -> dict:
    """{value: [selected, in the pool]} by offline pass rate, "source" and "skill" (if present)."""
    in_pool, chosen = pass_rate_histogram(pass_rates), pass_rate_histogram(pass_rates[selected])
    result = {"offline pass rate": {b: [chosen[b], n] for b, n in in_pool.items()}}
    for field in (f for f in ("source", "skill") if any(f in row for row in pool)):
        in_pool = sorted(Counter(str(row.get(field)) for row in pool).items())
        chosen = Counter(str(pool[i].get(field)) for i in selected)
        result[field] = {value: [chosen[value], n] for value, n in in_pool}
    return result


def select_data(args: Args) -> dict:
    """Select N_sel prompts by args.method; write subset.jsonl, scores.npy, then selection.json."""
    began = time.perf_counter()
    pool, pass_rates = read_pool(args.train_rollouts)
    n_select = len(pool) if args.method == "full" else num_to_select(args.ratio, len(pool))
    selected, scores, columns, report = np.arange(len(pool)), np.empty((len(pool), 0)), [], {}
    if args.method == "cropi":  # steps 1c-1f
        selected, scores, columns, report = select_cropi(args, pool, n_select)
    elif args.method == "influence_once":
        selected, scores, columns, report = reuse_selection(args, pool, n_select)
    elif args.method == "learnability":
        selected, columns = learnability_order(pass_rates)[:n_select], ["learnability"]
        scores = pass_rates * (1 - pass_rates)
    elif args.method == "pass_rate":
        selected = pass_rate_order(pass_rates, n_select, args.seed)
    elif args.method == "random":
        selected = np.random.default_rng(args.seed).permutation(len(pool))[:n_select]
    files.write_jsonl(Path(args.out) / "subset.jsonl", (pool[i] for i in selected))
    scores = np.column_stack([pass_rates, scores]).astype(np.float32)
    files.save_npy(Path(args.out) / "scores.npy", scores)
    selection = {"method": args.method, "pool_size": len(pool), "n_select": n_select}
    selection |= {"num_selected": len(selected), "score_columns": ["pass_rate"] + columns, **report}
    if len(selected) < n_select:
        selection["note"] = f"only {len(selected)} rows are eligible (non-zero, finite gradient)"
    selection["composition"] = composition(pool, pass_rates, selected)
    selection["train_ids_sha256"] = ids_sha256([row["id"] for row in pool])
    selection["subset_ids_sha256"] = ids_sha256([pool[i]["id"] for i in selected])
    selection["seconds"] = round(time.perf_counter() - began, 2)
    selection["settings"] = settings(args)
    files.write_json(Path(args.out) / "selection.json", selection)  # last: the completion marker
    return selection


def settings(args: Args) -> dict:
    """The flags and the content of every file the selection reads."""
    sketches = [args.train_sketch, *args.val_sketch]
    sketches += [str(Path(s).with_suffix(".json")) for s in sketches if s]
    reused = args.reuse_selection and str(Path(args.reuse_selection) / "selection.json")
    return dataclasses.asdict(args) | files.fingerprint([args.train_rollouts, *sketches, reused])


def main(args: Args) -> None:
    if args.method == "cropi" and not (args.train_sketch and args.val_sketch):
        raise DataError("--method cropi needs --train-sketch and at least one --val-sketch")
    if args.method == "influence_once" and not args.reuse_selection:
        raise DataError("--method influence_once needs --reuse-selection (a cropi run's --out)")
    files.check_writable(Path(args.out) / "selection.json")
    if files.already_done(Path(args.out) / "selection.json", settings(args)):
        print(f"{args.out}/selection.json exists with the same settings: nothing to do")
        return
    s = select_data(args)
    note = f" ({s['note']})" if "note" in s else ""
    print(f"{s['method']}: selected {s['num_selected']} of {s['pool_size']} prompts{note}")
    for field, counts in s["composition"].items():
        print(f"by {field}: " + ", ".join(f"{v} {n}/{total}" for v, (n, total) in counts.items()))


if __name__ == "__main__":
    run_main(main, Args)
