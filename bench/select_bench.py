"""Benchmark of select_data.py (steps 1c-1f) at scale: a pool of --rows prompts with --dims float16
sketches.

Writes a train sketch (default 1,000,000 x 8192 float16, about 16.4 GB), its .json, a slim rollouts
file and --val-sets validation sketches, then runs `select_data.py --method cropi` on them as a
subprocess --repeats times and reports, per run, the wall time, the CPU time and the peak resident
memory of that process.

Honest conditions, printed with every run:
  * threads: the timed process gets OMP/MKL/OpenBLAS_NUM_THREADS = --threads (torch and numpy read
    them);
  * page cache: before the first run the sketch is evicted from the page cache (posix_fadvise
    DONTNEED: a cold run, as far as the disk's own cache allows); later runs find what the earlier
    one left (warm, as far as RAM allows); the share of the file cached before each run is measured
    with util-linux `fincore` when present;
  * other load: the 1-minute load average before and after each run (other processes on the
    machine).
--compare DIR times another checkout's select_data.py (e.g. `git worktree add /tmp/before HEAD`) on
the same files, interleaved with this one (cold this, cold other, warm this, warm other, ...).

The sketch rows are a block of 8192 random Gaussian rows, rolled along the columns by a different
shift in every block (so rows differ across the file without drawing 8 billion random numbers).
Timing does not depend on values. Files go to a temporary folder under --folder, deleted at the end,
or to --keep DIR, kept and reused by the next run with the same
--rows/--dims/--val-sets/--val-rows/--seed. If the disk has less free space than the sketch needs
(plus 2 GB), --rows is lowered to fit, and the report says so.
Usage: python bench/select_bench.py [--rows 1000000 --dims 8192 --keep /tmp/select_bench
                                     --compare /tmp/before]
Writes --out (.json) and the same figures as a .md beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
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

from plumbing.cli import arg, parse_args  # noqa: E402

BLOCK_ROWS = 8192


@dataclasses.dataclass
class Args:
    rows: int = arg(1_000_000, "prompts in the pool (rows of the train sketch)")
    dims: int = arg(8192, "projected dimensions")
    val_sets: int = arg(2, "validation sets")
    val_rows: int = arg(
        100,
        "rows per validation sketch (100: all of them in a checkout that still averages "
        "a --max-val 100 sample, so that --compare selects from the same targets)",
    )
    ratio: float = arg(0.1, "select_data.py --ratio")
    chunk_rows: int = arg(4096, "select_data.py --chunk-rows")
    folder: str = arg("/tmp", "where the temporary files go (all deleted at the end)")
    keep: str = arg(
        "",
        "keep the generated files in this folder and reuse them on the next run (same sizes, seed)",
    )
    seed: int = arg(0, "seed of the random sketch values")
    threads: int = arg(2, "OMP/MKL/OPENBLAS_NUM_THREADS of the timed select_data.py process")
    repeats: int = arg(
        2, "timed runs of each select_data.py: the first cold (sketch evicted), the others warm"
    )
    compare: str = arg(
        "", "another checkout's folder: its select_data.py is timed on the same files, interleaved"
    )
    out: str = arg(
        str(ROOT / "bench" / "results" / "select_bench.json"),
        "results .json (a .md is written beside)",
    )


def write_sketch(path: Path, rows: int, dims: int, rng: np.random.Generator, model: str) -> None:
    """SKETCH.npy (float16, written block by block, never whole in memory) and SKETCH.json beside
    it."""
    block = rng.standard_normal((min(BLOCK_ROWS, rows), dims), dtype=np.float32).astype(np.float16)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (rows, dims)}
        )
        for number, start in enumerate(
            tqdm(range(0, rows, len(block)), desc=f"writing {path.name}", unit="block")
        ):
            part = np.roll(block, number, axis=1)[: rows - start]
            f.write(part.tobytes())
    meta = {
        "model": model,
        "num_params": 123_456_789,
        "projector": "bench",
        "seed": 0,
        "sparse_ratio": 1.0,
        "proj_dim": dims,
        "dtype": "float16",
        "rows": rows,
        "ids": [f"{path.stem}{i}" for i in range(rows)],
        "zero_rows": [],
        "nonfinite_rows": [],
        "rollouts": "bench",
    }
    path.with_suffix(".json").write_text(json.dumps(meta))


def write_rollouts(path: Path, rows: int, rng: np.random.Generator, prefix: str) -> None:
    """A rollouts file in collect_rollouts.py's schema, with 8 one-token responses per prompt."""
    rewards = rng.random((rows, 8)) < 0.3
    with open(path, "w") as f:
        for i in tqdm(range(rows), desc="writing rollouts", unit="row", mininterval=5):
            f.write(
                json.dumps(
                    {
                        "id": f"{prefix}{i}",
                        "prompt": f"{i}+1",
                        "answer": str(i + 1),
                        "prompt_ids": [1, 2],
                        "response_ids": [[3]] * 8,
                        "responses": ["x"] * 8,
                        "behavior_logprobs": [[-1.0]] * 8,
                        "rewards": rewards[i].astype(float).tolist(),
                        "temperature": 0.5,
                        "source": ["gsm8k", "math"][i % 2],
                    }
                )
                + "\n"
            )


def prepare(work: Path, args: Args, rows: int) -> float:
    """The bench files in work (kept files made with the same settings are reused); seconds spent
    writing."""
    settings = {
        "rows": rows,
        "dims": args.dims,
        "val_sets": args.val_sets,
        "val_rows": args.val_rows,
        "seed": args.seed,
    }
    stamp = work / "bench_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return 0.0
    began = time.perf_counter()
    stamp.unlink(missing_ok=True)
    rng = np.random.default_rng(args.seed)
    write_sketch(work / "train.npy", rows, args.dims, rng, "bench-model")
    write_rollouts(work / "train_rollouts.jsonl", rows, rng, "train")
    for v in range(args.val_sets):
        write_sketch(work / f"val{v}.npy", args.val_rows, args.dims, rng, "bench-model")
    # written pages must be on disk for the cold run's eviction to take them out of the page cache
    os.sync()
    stamp.write_text(json.dumps(settings))
    return time.perf_counter() - began


def evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_share(path: Path) -> float | None:
    """Share of the file's bytes in the page cache (util-linux fincore), None when it cannot be
    measured."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return round(int(out.split()[0]) / path.stat().st_size, 3)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def time_select(checkout: Path, work: Path, args: Args, out: Path) -> dict:
    """One run of checkout's select_data.py: wall and CPU seconds, peak RSS, from the child's own
    rusage."""
    command = [
        sys.executable,
        str(checkout / "select_data.py"),
        "--train-rollouts",
        str(work / "train_rollouts.jsonl"),
        "--train-sketch",
        str(work / "train.npy"),
        "--ratio",
        str(args.ratio),
        "--chunk-rows",
        str(args.chunk_rows),
        "--out",
        str(out),
    ]
    for v in range(args.val_sets):
        command += ["--val-sketch", str(work / f"val{v}.npy")]
    threads = str(args.threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
    }
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(
            command, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(
            child.pid, 0
        )  # the child's own rusage: its CPU time and peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    output = out.with_suffix(".log").read_text()
    out.with_suffix(".log").unlink()
    if child.returncode != 0:
        raise SystemExit(f"{checkout}/select_data.py failed:\n{output[-3000:]}")
    selection = json.loads((out / "selection.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),  # ru_maxrss is in kB on Linux
        "seconds_inside_select_data": selection["seconds"],
        "num_selected": selection["num_selected"],
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def compare_outputs(this: Path, other: Path) -> dict:
    """How far two select_data.py outputs on the same files agree: the subset (as a set, in
    order), scores.npy (columns: pass rate, cosine per validation set, fused score)."""
    ids = [
        [json.loads(line)["id"] for line in (folder / "subset.jsonl").open()]
        for folder in (this, other)
    ]
    scores = [np.load(folder / "scores.npy") for folder in (this, other)]
    return {
        "same_subset_set": set(ids[0]) == set(ids[1]),
        "subset_size": len(ids[0]),
        "same_position_in_subset": sum(a == b for a, b in zip(*ids)),
        "same_nan_scores": bool((np.isnan(scores[0]) == np.isnan(scores[1])).all()),
        "scores_max_abs_difference_per_column": np.nanmax(
            np.abs(scores[0] - scores[1]), axis=0
        ).tolist(),
    }


def markdown_report(report: dict, command: str) -> str:
    lines = [
        "# select_data.py benchmark (steps 1c-1f at scale)",
        "",
        f"Command: `{command}`",
        "",
        f"{report['rows']:,} prompts x {report['dims']} dims float16 ({report['sketch_gb']} GB "
        f"memory-mapped), {report['val_sets']} validation sets of {report['val_rows']} rows, "
        f"--ratio {report['ratio']}, --chunk-rows {report['chunk_rows']}; "
        f"OMP/MKL/OPENBLAS_NUM_THREADS = {report['threads']} on a {report['cpu_count']}-core CPU "
        f"with {report['ram_gb']} GB RAM.",
        "",
        "| select_data.py | run | page cache before | wall s | CPU s | peak RSS GB | load avg "
        "before/after |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        cached = (
            "?"
            if run["cached_share_before"] is None
            else f"{100 * run['cached_share_before']:.0f}%"
        )
        lines.append(
            f"| {run['checkout']} | {run['run']} | {cached} | {run['seconds']} | "
            f"{run['cpu_seconds']} | {run['peak_rss_gb']} | {run['load_average_before']} / "
            f"{run['load_average_after']} |"
        )
    lines += ["", "Seconds inside select_data.py (its selection.json):", ""]
    lines += [
        f"- {run['checkout']}, {run['run']}: {json.dumps(run['seconds_inside_select_data'])}"
        for run in report["runs"]
    ]
    if "agreement" in report:
        lines += [
            "",
            f"Outputs of the two checkouts (cold runs): {json.dumps(report['agreement'])}",
        ]
    return "\n".join(lines) + "\n"


def main(args: Args) -> None:
    folder = Path(args.keep or args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    needed = args.rows * args.dims * 2
    kept = folder / "train.npy"
    free = shutil.disk_usage(folder).free + (
        kept.stat().st_size if args.keep and kept.is_file() else 0
    )
    rows = args.rows
    if free < needed + 2**31:
        rows = int((free - 2**31) // (args.dims * 2))
        print(
            f"only {free / 1e9:.1f} GB free in {folder}: {args.rows} rows need {needed / 1e9:.1f} "
            f"GB; benchmarking {rows} rows instead"
        )
    work = folder if args.keep else Path(tempfile.mkdtemp(prefix="select_bench.", dir=folder))
    checkouts = [(str(ROOT), ROOT)] + ([(args.compare, Path(args.compare))] if args.compare else [])
    outs = [
        work / f"out_{number}" for number in range(args.repeats * len(checkouts))
    ]  # in the order of the runs
    try:
        prepared = prepare(work, args, rows)
        runs = []
        for repeat in range(args.repeats):
            for label, checkout in checkouts:
                if repeat == 0:
                    evict_from_page_cache(work / "train.npy")
                cached = cached_share(work / "train.npy")
                out = outs[len(runs)]
                shutil.rmtree(out, ignore_errors=True)
                run = {
                    "checkout": label,
                    "run": "cold" if repeat == 0 else "warm",
                    "cached_share_before": cached,
                    **time_select(checkout, work, args, out),
                }
                print(json.dumps(run))
                runs.append(run)
        report = {
            "rows": rows,
            "dims": args.dims,
            "dtype": "float16",
            "sketch_gb": round(rows * args.dims * 2 / 1e9, 2),
            "val_sets": args.val_sets,
            "val_rows": args.val_rows,
            "ratio": args.ratio,
            "chunk_rows": args.chunk_rows,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "prepare_seconds": round(prepared, 1),
            "runs": runs,
        }
        if args.compare and args.repeats:
            report["agreement"] = compare_outputs(outs[0], outs[1])
    finally:
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    command = "python bench/select_bench.py " + " ".join(sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, **report}, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown_report(report, command))
    print(markdown_report(report, command))


if __name__ == "__main__":
    main(parse_args(Args))
