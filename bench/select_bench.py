"""Benchmark of select_data.py (steps 1c-1f) at scale: a pool of --rows prompts with --dims-dim float16 sketches.

Writes a train sketch (default 1,000,000 x 8192 float16, about 16.4 GB), its .json, a slim rollouts file and
--val-sets validation sketches into a temporary folder under --folder, runs `select_data.py --method cropi` on them
as a subprocess, reports wall time and the peak resident memory of that process, and deletes every file it made.
If --folder has less free space than the sketch needs (plus 2 GB), --rows is lowered to fit, and the report says so.

The sketch rows are a block of 8192 random Gaussian rows, rolled along the columns by a different shift in every
block (so rows differ across the file without drawing 8 billion random numbers). Timing does not depend on values.
Usage: python bench/select_bench.py [--rows 1000000 --dims 8192 --folder /tmp]
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery import arg, parse_args  # noqa: E402

BLOCK_ROWS = 8192


@dataclasses.dataclass
class Args:
    rows: int = arg(1_000_000, "prompts in the pool (rows of the train sketch)")
    dims: int = arg(8192, "projected dimensions")
    val_sets: int = arg(2, "validation sets")
    val_rows: int = arg(500, "rows per validation sketch")
    ratio: float = arg(0.1, "select_data.py --ratio")
    chunk_rows: int = arg(4096, "select_data.py --chunk-rows")
    folder: str = arg("/tmp", "where the temporary files go (all deleted at the end)")
    seed: int = arg(0, "seed of the random sketch values")


def write_sketch(path: Path, rows: int, dims: int, rng: np.random.Generator, model: str) -> None:
    """SKETCH.npy (float16, written block by block, never whole in memory) and SKETCH.json beside it."""
    block = rng.standard_normal((min(BLOCK_ROWS, rows), dims), dtype=np.float32).astype(np.float16)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                 "shape": (rows, dims)})
        for number, start in enumerate(tqdm(range(0, rows, len(block)), desc=f"writing {path.name}", unit="block")):
            part = np.roll(block, number, axis=1)[:rows - start]
            f.write(part.tobytes())
    meta = {"model": model, "num_params": 123_456_789, "projector": "bench", "seed": 0, "sparse_ratio": 1.0,
            "proj_dim": dims, "dtype": "float16", "rows": rows, "ids": [f"{path.stem}{i}" for i in range(rows)],
            "zero_rows": [], "nonfinite_rows": [], "rollouts": "bench"}
    path.with_suffix(".json").write_text(json.dumps(meta))


def write_rollouts(path: Path, rows: int, rng: np.random.Generator, prefix: str) -> None:
    """A rollouts file in collect_rollouts.py's schema, with 8 one-token responses per prompt."""
    rewards = rng.random((rows, 8)) < 0.3
    with open(path, "w") as f:
        for i in tqdm(range(rows), desc="writing rollouts", unit="row", mininterval=5):
            f.write(json.dumps({"id": f"{prefix}{i}", "prompt": f"{i}+1", "answer": str(i + 1), "prompt_ids": [1, 2],
                                "response_ids": [[3]] * 8, "responses": ["x"] * 8, "behavior_logprobs": [[-1.0]] * 8,
                                "rewards": rewards[i].astype(float).tolist(), "temperature": 0.5,
                                "source": ["gsm8k", "math"][i % 2]}) + "\n")


def main(args: Args) -> None:
    needed = args.rows * args.dims * 2
    free = shutil.disk_usage(args.folder).free
    rows = args.rows
    if free < needed + 2**31:
        rows = int((free - 2**31) // (args.dims * 2))
        print(f"only {free / 1e9:.1f} GB free in {args.folder}: {args.rows} rows need {needed / 1e9:.1f} GB; "
              f"benchmarking {rows} rows instead")
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="select_bench.", dir=args.folder))
    try:
        began = time.perf_counter()
        write_sketch(work / "train.npy", rows, args.dims, rng, "bench-model")
        write_rollouts(work / "train_rollouts.jsonl", rows, rng, "train")
        for v in range(args.val_sets):
            write_sketch(work / f"val{v}.npy", args.val_rows, args.dims, rng, "bench-model")
        prepared = time.perf_counter() - began
        command = [sys.executable, str(ROOT / "select_data.py"), "--train-rollouts", str(work / "train_rollouts.jsonl"),
                   "--train-sketch", str(work / "train.npy"), "--ratio", str(args.ratio), "--chunk-rows",
                   str(args.chunk_rows), "--out", str(work / "out")]
        for v in range(args.val_sets):
            command += ["--val-sketch", str(work / f"val{v}.npy")]
        load_before = os.getloadavg()[0]
        began = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - began
        if result.returncode != 0:
            raise SystemExit(f"select_data.py failed:\n{result.stderr[-3000:]}")
        peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # kB on Linux
        selection = json.loads((work / "out" / "selection.json").read_text())
        report = {"rows": rows, "dims": args.dims, "dtype": "float16", "sketch_gb": round(rows * args.dims * 2 / 1e9, 2),
                  "val_sets": args.val_sets, "val_rows": args.val_rows, "chunk_rows": args.chunk_rows,
                  "num_selected": selection["num_selected"], "select_seconds": round(seconds, 1),
                  "seconds_inside_select_data": selection["seconds"],
                  "peak_rss_gb": round(peak_rss_gb, 2), "prepare_seconds": round(prepared, 1),
                  "load_average_at_start": round(load_before, 2), "cpu_count": os.cpu_count()}
        print(result.stdout)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args(Args))
