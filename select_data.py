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

Arithmetic: sketch rows are read through a memory map in float32 chunks (float16 files are widened), dot products
and squared norms are float32; the validation means are accumulated in float64 and used in float32.
Ties are broken by row index (the earlier row in the rollouts file wins), everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import DataError, arg, iter_rollouts, run_main, read_jsonl, save_npy, write_json, write_jsonl

METHODS = ("cropi", "full", "random", "learnability", "pass_rate", "influence_once")
# Sketch metadata that must agree between the train sketch and every validation sketch.
MATCHING_FIELDS = ("projector", "seed", "sparse_ratio", "proj_dim", "num_params")
SKETCH_FIELDS = ("model", "rows", "ids", "zero_rows", "nonfinite_rows") + MATCHING_FIELDS


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
    chunk_rows: int = arg(4096, "cropi: train-sketch rows scored per chunk (memory ~ chunk_rows * dims * 4 bytes)")


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
    return rows[np.lexsort((rows, -scores[rows].astype(np.float64)))]


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


def cosine_to_targets(chunk: np.ndarray, unit_targets: np.ndarray):
    """cos(x, g_v) for every row x of chunk [n, d] and every unit-length column g_v / |g_v| of unit_targets [d, V].

    Returns (cosines [n, V] float32, squared row norms [n] float32); rows of norm 0 or non-finite get NaN.
    """
    squared_norms = np.einsum("ij,ij->i", chunk, chunk)
    usable = np.isfinite(squared_norms) & (squared_norms > 0)
    cosines = np.full((chunk.shape[0], unit_targets.shape[1]), np.nan, dtype=np.float32)
    cosines[usable] = (chunk[usable] @ unit_targets) / np.sqrt(squared_norms[usable])[:, None]
    return cosines, squared_norms


def sample_rows(candidates: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Up to max_rows of the candidate row indices, a seeded uniform sample without replacement, sorted."""
    if max_rows <= 0 or len(candidates) <= max_rows:
        return np.sort(candidates)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=max_rows, replace=False))


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


PASS_RATE_BINS = ("0", "(0,.25]", "(.25,.5]", "(.5,.75]", "(.75,1)", "1")


def pass_rate_histogram(pass_rates: np.ndarray) -> dict[str, int]:
    """Counts of p = 0, the four quarters of (0, 1), and p = 1."""
    p = np.asarray(pass_rates, dtype=np.float64)
    masks = (p == 0, (p > 0) & (p <= .25), (p > .25) & (p <= .5), (p > .5) & (p <= .75), (p > .75) & (p < 1), p == 1)
    return {name: int(mask.sum()) for name, mask in zip(PASS_RATE_BINS, masks)}


def ids_fingerprint(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Inputs: the training pool and the sketches
# ----------------------------------------------------------------------------------------------

def read_pool(path: str) -> tuple[list[dict], np.ndarray]:
    """Data rows {"id","prompt","answer"} (+ "skill"/"source") and pass rates of a rollouts file.

    Streams the file and keeps only what selection needs (the full rows, with K token lists and log-probs each,
    do not fit in memory at the scale of a million prompts).
    """
    rows, pass_rates, seen = [], [], set()
    for obj in iter_rollouts(path):
        if obj["id"] in seen:
            raise DataError(f"{path}: duplicate id {obj['id']!r}")
        seen.add(obj["id"])
        row = {"id": obj["id"], "prompt": obj["prompt"], "answer": obj["answer"]}
        row.update({extra: obj[extra] for extra in ("skill", "source") if extra in obj})
        rows.append(row)
        pass_rates.append(sum(obj["rewards"]) / len(obj["rewards"]))
    return rows, np.array(pass_rates, dtype=np.float64)


def open_sketch(npy_path: str, flag: str) -> tuple[np.memmap, dict]:
    """Memory-map SKETCH.npy and read SKETCH.json beside it; refuse files that disagree with themselves."""
    npy_path = Path(npy_path)
    json_path = npy_path.with_suffix(".json")
    for path in (npy_path, json_path):
        if not path.is_file():
            raise DataError(f"{flag} {npy_path}: {path} does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg})") from None
    missing = [f for f in SKETCH_FIELDS if f not in meta]
    if missing:
        raise DataError(f"{json_path}: sketch metadata lacks {missing}")
    sketch = np.load(npy_path, mmap_mode="r")
    if sketch.ndim != 2 or sketch.dtype not in (np.float16, np.float32) or not sketch.flags.c_contiguous:
        raise DataError(f"{npy_path}: expected a C-ordered 2-D float16 or float32 array, got {sketch.ndim}-D "
                        f"{sketch.dtype}")
    if sketch.shape[0] != meta["rows"] or len(meta["ids"]) != meta["rows"]:
        raise DataError(f"{npy_path} has {sketch.shape[0]} rows but {json_path} says rows={meta['rows']} "
                        f"with {len(meta['ids'])} ids")
    if sketch.shape[1] != meta["proj_dim"]:
        raise DataError(f"{npy_path} has {sketch.shape[1]} columns but {json_path} says proj_dim={meta['proj_dim']}")
    return sketch, meta


def check_sketches_match(train_meta: dict, train_path: str, val_meta: dict, val_path: str) -> None:
    """Scores are only meaningful when both sketches come from the same projection of the same parameters."""
    for field in MATCHING_FIELDS:
        if train_meta[field] != val_meta[field]:
            raise DataError(f"sketch metadata differ in {field!r}: {train_meta[field]!r} in {train_path} "
                            f"but {val_meta[field]!r} in {val_path}; make both with the same sketch_grads.py settings")


def excluded_rows(meta: dict, n_rows: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (zero-gradient, non-finite) of the rows the metadata lists."""
    masks = []
    for field in ("zero_rows", "nonfinite_rows"):
        indices = np.asarray(meta[field], dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
            raise DataError(f"{where}: {field} holds an index outside 0..{n_rows - 1}")
        mask = np.zeros(n_rows, dtype=bool)
        mask[indices] = True
        masks.append(mask)
    return masks[0], masks[1]


def iter_chunks(sketch: np.memmap, chunk_rows: int, desc: str):
    """(first row, float32 chunk) over the sketch. Each chunk is its own short-lived map of the file, so pages
    already scored leave the process (a single map would keep all of them resident, up to the file's size)."""
    for start in tqdm(range(0, sketch.shape[0], chunk_rows), desc=desc, unit="chunk"):
        stop = min(start + chunk_rows, sketch.shape[0])
        # mode "c" (copy-on-write) gives a writable view of the read-only file, which torch.from_numpy accepts
        part = np.memmap(sketch.filename, dtype=sketch.dtype, mode="c", shape=(stop - start, sketch.shape[1]),
                         offset=sketch.offset + start * sketch.shape[1] * sketch.itemsize)
        yield start, torch.from_numpy(part).float().numpy()  # torch widens float16 ~3x faster than numpy here
        del part


# ----------------------------------------------------------------------------------------------
# Method cropi: steps 1c-1f
# ----------------------------------------------------------------------------------------------

def validation_target(path: str, train_meta: dict, train_path: str, max_val: int, seed: int):
    """Step 1c: g_v = (1/|S|) sum_{i in S} g_i over a seeded sample S of the usable validation rows (float64)."""
    sketch, meta = open_sketch(path, "--val-sketch")
    check_sketches_match(train_meta, train_path, meta, path)
    if meta["model"] != train_meta["model"]:
        print(f"warning: {path} was sketched at model {meta['model']!r}, the train sketch at "
              f"{train_meta['model']!r}", file=sys.stderr)
    zero, nonfinite = excluded_rows(meta, sketch.shape[0], str(Path(path).with_suffix(".json")))
    squared_norms = np.concatenate([np.einsum("ij,ij->i", c, c) for _, c in iter_chunks(sketch, 4096, Path(path).name)])
    zero |= squared_norms == 0
    nonfinite |= ~np.isfinite(squared_norms)
    used = sample_rows(np.flatnonzero(~zero & ~nonfinite), max_val, seed)
    if len(used) == 0:
        raise DataError(f"--val-sketch {path}: no usable rows (all {sketch.shape[0]} are zero-gradient or non-finite)")
    target = np.asarray(sketch[used], dtype=np.float64).mean(axis=0)
    if not np.isfinite(target).all() or not target.any():
        raise DataError(f"--val-sketch {path}: the mean of the sampled rows is zero or not finite")
    info = {"path": str(path), "name": Path(path).stem, "rows": int(sketch.shape[0]), "model": meta["model"],
            "zero_gradient_rows": int(zero.sum()), "nonfinite_rows": int((nonfinite & ~zero).sum()),
            "rows_averaged": len(used), "averaged_row_indices": used.tolist()}
    return target, info


def select_cropi(args: Args, pool: list[dict], pass_rates: np.ndarray, n_select: int):
    """Steps 1c-1f. Returns (selected rows best first, scores [rows, 1 + V + 1], score columns, report)."""
    train_sketch, train_meta = open_sketch(args.train_sketch, "--train-sketch")
    pool_ids = [row["id"] for row in pool]
    if [str(i) for i in train_meta["ids"]] != [str(i) for i in pool_ids]:
        mismatch = next((i for i, (a, b) in enumerate(zip(train_meta["ids"], pool_ids)) if str(a) != str(b)),
                        min(len(train_meta["ids"]), len(pool_ids)))
        raise DataError(f"--train-sketch {args.train_sketch} does not match --train-rollouts {args.train_rollouts}: "
                        f"{len(train_meta['ids'])} vs {len(pool_ids)} ids, first difference at row {mismatch}")

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
    zero, nonfinite = excluded_rows(train_meta, len(pool), str(Path(args.train_sketch).with_suffix(".json")))
    cosines = np.empty((len(pool), len(names)), dtype=np.float32)
    for start, chunk in iter_chunks(train_sketch, args.chunk_rows, "scoring pool"):
        chunk_cosines, squared_norms = cosine_to_targets(chunk, unit_targets)
        cosines[start:start + len(chunk)] = chunk_cosines
        zero[start:start + len(chunk)] |= squared_norms == 0
        nonfinite[start:start + len(chunk)] |= ~np.isfinite(squared_norms)
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
              "sketch": {f: train_meta[f] for f in ("model",) + MATCHING_FIELDS}, "selected_details": details}
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
    folder = Path(args.reuse_selection)
    selection_path = folder / "selection.json"
    if not selection_path.is_file():
        raise DataError(f"--reuse-selection {folder}: no selection.json (was that select_data.py run completed?)")
    earlier = json.loads(selection_path.read_text())
    if earlier.get("method") != "cropi":
        raise DataError(f"--reuse-selection {folder}: made with method {earlier.get('method')!r}, not 'cropi'")
    if earlier.get("train_ids_sha256") != ids_fingerprint([row["id"] for row in pool]):
        raise DataError(f"--reuse-selection {folder}: made from {earlier.get('train_rollouts')}, whose ids differ "
                        f"from --train-rollouts {args.train_rollouts}")
    if earlier.get("n_select") != n_select:
        raise DataError(f"--reuse-selection {folder}: selected N_sel={earlier.get('n_select')} "
                        f"(ratio {earlier.get('ratio')}), but --ratio {args.ratio} gives N_sel={n_select}")
    subset_ids = [row["id"] for row in read_jsonl(folder / "subset.jsonl")]
    if subset_ids != [d["id"] for d in earlier["selected_details"]]:
        raise DataError(f"--reuse-selection {folder}: subset.jsonl and selection.json list different prompts")
    row_of = {row["id"]: i for i, row in enumerate(pool)}
    selected = np.array([row_of[i] for i in subset_ids], dtype=np.int64)
    scores = np.load(folder / "scores.npy")
    report = {key: earlier[key] for key in ("eligible", "excluded_zero_gradient", "excluded_nonfinite",
                                            "validation_sets", "rrf_k", "max_val", "train_sketch", "sketch",
                                            "selected_details")}
    report["reused_from"] = str(folder)
    return selected, scores, earlier["score_columns"], report


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

def composition(pool: list[dict], selected: np.ndarray) -> dict:
    """For each of "source"/"skill" carried by the rows: {value: [selected count, pool count]}."""
    result = {}
    for field in ("source", "skill"):
        if any(field in row for row in pool):
            in_pool = Counter(str(row.get(field)) for row in pool)
            chosen = Counter(str(pool[i].get(field)) for i in selected)
            result[field] = {value: [chosen[value], count] for value, count in sorted(in_pool.items())}
    return result


def print_summary(selection: dict) -> None:
    excluded = ""
    if "eligible" in selection:
        excluded = (f"; {selection['eligible']} eligible, excluded {selection['excluded_zero_gradient']} "
                    f"zero-gradient and {selection['excluded_nonfinite']} non-finite")
    print(f"{selection['method']}: selected {selection['num_selected']} of {selection['pool_size']} prompts "
          f"(N_sel = {selection['n_select']}{excluded}) in {selection['seconds']['total']:.1f} s")
    if selection.get("note"):
        print(f"note: {selection['note']}")
    histogram = selection["pass_rate_histogram"]
    print(f"{'offline pass rate':>18} {'pool':>8} {'selected':>9}")
    for name in PASS_RATE_BINS:
        print(f"{name:>18} {histogram['pool'][name]:>8} {histogram['selected'][name]:>9}")
    for field, counts in selection["composition"].items():
        print(f"by {field}: " + ", ".join(f"{value} {chosen}/{total}" for value, (chosen, total) in counts.items()))


# ----------------------------------------------------------------------------------------------

def main(args: Args) -> None:
    if args.method not in METHODS:
        raise DataError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if not args.train_rollouts or not args.out:
        raise DataError("--train-rollouts and --out are required")
    if args.chunk_rows < 1:
        raise DataError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    if args.method == "cropi" and (not args.train_sketch or not args.val_sketch):
        raise DataError("--method cropi needs --train-sketch and at least one --val-sketch")
    if args.rrf_k < 0:
        raise DataError(f"--rrf-k must be >= 0, got {args.rrf_k}")
    if args.method == "influence_once" and not args.reuse_selection:
        raise DataError("--method influence_once needs --reuse-selection DIR (an earlier cropi output folder)")
    out = Path(args.out)
    if (out / "selection.json").is_file():
        done = json.loads((out / "selection.json").read_text())
        if done.get("args") == dataclasses.asdict(args):
            print(f"{out / 'selection.json'} exists with the same arguments: nothing to do")
            return

    began = time.perf_counter()
    pool, pass_rates = read_pool(args.train_rollouts)
    seconds = {"read_rollouts": round(time.perf_counter() - began, 2)}
    n_select = len(pool) if args.method == "full" else num_to_select(args.ratio, len(pool))
    report = {}
    if args.method == "cropi":
        selected, scores, columns, report = select_cropi(args, pool, pass_rates, n_select)
        seconds["score_and_select"] = round(time.perf_counter() - began - seconds["read_rollouts"], 2)
    elif args.method == "influence_once":
        selected, scores, columns, report = reuse_selection(args, pool, n_select)
    else:
        selected, scores, columns = select_baseline(args, pass_rates, n_select)

    selection = {"method": args.method, "ratio": args.ratio, "seed": args.seed, "pool_size": len(pool),
                 "n_select": n_select, "num_selected": len(selected),
                 "train_rollouts": str(Path(args.train_rollouts).resolve()),
                 "train_ids_sha256": ids_fingerprint([row["id"] for row in pool]), "score_columns": columns,
                 **report,
                 "pass_rate_histogram": {"pool": pass_rate_histogram(pass_rates),
                                         "selected": pass_rate_histogram(pass_rates[selected])},
                 "composition": composition(pool, selected), "args": dataclasses.asdict(args), "seconds": seconds}
    if len(selected) < n_select:
        selection["note"] = (f"only {len(selected)} rows are eligible (non-zero, finite gradient), fewer than "
                             f"N_sel = {n_select}: all of them are selected")
    if "selected_details" not in selection:
        selection["selected_details"] = [{"id": pool[i]["id"], "row": int(i), "pass_rate": float(pass_rates[i])}
                                         for i in selected]
    write_jsonl(out / "subset.jsonl", (pool[i] for i in selected))
    save_npy(out / "scores.npy", np.asarray(scores, dtype=np.float32))
    seconds["total"] = round(time.perf_counter() - began, 2)
    write_json(out / "selection.json", selection)  # last: the completion marker
    print_summary(selection)


if __name__ == "__main__":
    run_main(main, Args)
