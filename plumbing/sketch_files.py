"""sketch_grads.py's SKETCH.npy + SKETCH.json: written once, read by select_data.py chunk by chunk.

SKETCH.npy   float16 or float32 [rows, proj_dim], C order: one projected gradient per prompt, or
             (--mean-of-rows) one row, the projected mean gradient of a seeded sample of prompts
SKETCH.json  model, rows, ids, zero_rows, nonfinite_rows, the MATCHING_FIELDS, and "mean_of" (the
             sample a one-row mean stands for) when there is one
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from plumbing.cli import DataError
from plumbing.files import load_npy, read_json, save_npy, write_json

# Two sketches are comparable only when they agree on these: one projection of the same parameters.
MATCHING_FIELDS = ("projector", "seed", "sparse_ratio", "proj_dim", "num_params")
SKETCH_FIELDS = ("model", "rows", "ids", "zero_rows", "nonfinite_rows") + MATCHING_FIELDS
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def write_sketch(path: str | os.PathLike, sketch: np.ndarray, meta: dict) -> dict:
    """OUT.npy, then OUT.json, atomically; meta gains "nonfinite_rows" (rows with NaN or inf)."""
    meta["nonfinite_rows"] = np.flatnonzero(~np.isfinite(sketch).all(axis=1)).tolist()
    save_npy(path, sketch)
    write_json(Path(path).with_suffix(".json"), meta)
    counts = f"{len(meta['zero_rows'])} zero-gradient and {len(meta['nonfinite_rows'])} non-finite"
    print(f"wrote {path} [{meta['rows']} x {meta['proj_dim']}] ({counts} rows) and its .json")
    return meta


def open_sketch(npy_path: str, flag: str) -> tuple[np.memmap, dict]:
    """SKETCH.npy memory-mapped (nothing read yet) and SKETCH.json; files that disagree: refused."""
    npy_path, json_path = Path(npy_path), Path(npy_path).with_suffix(".json")
    for path in (npy_path, json_path):
        if not path.is_file():
            raise DataError(f"{flag} {npy_path}: {path} does not exist")
    meta = read_json(json_path)
    missing = [field for field in SKETCH_FIELDS if field not in meta]
    if missing:
        raise DataError(f"{json_path}: sketch metadata lacks {missing}")
    sketch = load_npy(npy_path, mmap_mode="r")
    if sketch.ndim != 2 or sketch.dtype not in (np.float16, np.float32):
        raise DataError(
            f"{npy_path}: expected 2-D float16 or float32 array, got {sketch.ndim}-D {sketch.dtype}"
        )
    if not sketch.flags.c_contiguous:
        raise DataError(f"{npy_path}: expected C order (row after row), got Fortran order")
    if sketch.shape != (meta["rows"], meta["proj_dim"]) or len(meta["ids"]) != meta["rows"]:
        raise DataError(
            f"{npy_path} has {sketch.shape[0]} rows of {sketch.shape[1]} but {json_path} says "
            f"rows={meta['rows']} of proj_dim={meta['proj_dim']} with {len(meta['ids'])} ids"
        )
    for field in ("zero_rows", "nonfinite_rows"):
        if any(not 0 <= i < meta["rows"] for i in meta[field]):
            raise DataError(f"{json_path}: {field} holds an index outside 0..{meta['rows'] - 1}")
    return sketch, meta


def check_sketches_match(train_meta: dict, train_path: str, val_meta: dict, val_path: str) -> None:
    """A cosine between two sketches means something only if they share MATCHING_FIELDS."""
    for field in MATCHING_FIELDS:
        if train_meta[field] != val_meta[field]:
            raise DataError(
                f"sketch metadata differ in {field!r}: {train_meta[field]!r} in {train_path} but "
                f"{val_meta[field]!r} in {val_path}; make both with the same sketch_grads.py flags"
            )
    if val_meta["model"] != train_meta["model"]:
        models = f"{val_meta['model']!r}, the train sketch at {train_meta['model']!r}"
        print(f"warning: {val_path} was sketched at model {models}", file=sys.stderr)


def check_sketch_ids(meta: dict, ids: list[str], sketch_path: str, rollouts_path: str) -> None:
    """A train sketch scores the prompts of its rollouts file, row for row."""
    sketch_ids, ids = [str(i) for i in meta["ids"]], [str(i) for i in ids]
    if sketch_ids != ids:
        row = next(i for i, (a, b) in enumerate(zip(sketch_ids + [None], ids + [None])) if a != b)
        raise DataError(
            f"--train-sketch {sketch_path} does not match --train-rollouts {rollouts_path}: "
            f"{len(sketch_ids)} vs {len(ids)} ids, first difference at row {row}"
        )


def excluded_rows(meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (zero-gradient, non-finite) of the rows that SKETCH.json lists."""
    rows = np.arange(meta["rows"])
    return np.isin(rows, meta["zero_rows"]), np.isin(rows, meta["nonfinite_rows"])


def widen(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """rows (float16 or float32) copied into out (float32)."""
    if rows.dtype == np.float16:  # by table look-up: exact, and 2.5x numpy's own cast
        return np.take(F16_TO_F32, rows.view(np.uint16), out=out, mode="clip")
    out[:] = rows
    return out


def iter_chunks(sketch: np.memmap, chunk_rows: int) -> Iterator[tuple[int, np.memmap]]:
    """(first row, chunk_rows rows in the file's dtype), each chunk through its own short-lived map:
    its pages leave the process with it (one map of the whole file would keep every page read).
    While a chunk is used, the disk reads the next: WILLNEED advice per 128 KB (one advice reads at
    most the disk's read-ahead window, 128 KB on many disks)."""
    row_bytes, step = sketch.shape[1] * sketch.itemsize, 128 << 10
    with open(sketch.filename, "rb") as f:
        for start in range(0, sketch.shape[0], chunk_rows):
            shape = (min(chunk_rows, sketch.shape[0] - start), sketch.shape[1])
            offset, size = sketch.offset + start * row_bytes, chunk_rows * row_bytes
            for ahead in range(offset + size, offset + 2 * size, step):
                os.posix_fadvise(f.fileno(), ahead, step, os.POSIX_FADV_WILLNEED)
            yield start, np.memmap(sketch.filename, sketch.dtype, "r", offset=offset, shape=shape)
