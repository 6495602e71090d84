"""The acceleration experiment on the embedded demo task (the project's headline figure), with the
demo model as a random factor.

PRE-REGISTERED DESIGN (issue 27), committed before any result of this experiment was seen. It
follows the design of issue 14 (commit 2e012d3: one demo model, GRPO seeds 0-4, eight methods),
whose table bench/README.md keeps as conditional on that one model. Why a new design: two builds
of the demo that differed only in float rounding (torch's AVX2 or AVX-512 kernels) measured
cropi's step speed-up at 2.23 [1.83, 2.60] and 3.40 [2.73, 4.00] under issue 14's design; an
interval over the GRPO seeds of one model cannot show that source of variance.
  Demo models: five builds, `make_demo.py --seed d --test-per-skill 500` for d = 0, 1, 2, 3, 4
      (--test-per-skill only adds test problems: model d is the default build of seed d). A demo
      seed draws the problems, the warm-up labels and batches and the initial weights. Every run
      pins the instruction set (run_cropi.sh PIN_ISA=1: torch's AVX2 kernels, MKL's AVX2 code
      path), so that any x86 machine builds the same five models; the results list each model's
      sha256 from its demo.json.
  Task, per demo: make_demo.py's eight-skill pool; validation sets aimed at rot and swap
      (TARGETED_SKILLS); targeted accuracy = mean greedy accuracy over test_rot and test_swap,
      untargeted = mean over the six other test sets, 500 prompts per skill.
  GRPO seeds: 0-4 within every demo: 5 x 5 = 25 (demo, seed) cells. A seed sets the offline
      rollouts (shared by the methods of that demo and seed), the baselines' draws and GRPO's
      sampling and data order.
  Methods: cropi and full (full data). --methods adds others (run_cropi.sh METHOD values), which
      are reported the same way but are not part of the headline.
  Budget, as issue 14: every method trains 4 stages x 40 GRPO steps (160) of B = 16 prompts x
      G = 8 responses, run_cropi.sh's demo settings otherwise (RATIO 0.1, K 8, VAL_K 8, lr 1e-4);
      evaluated at step 0 and every 20 steps (9 points).
  Metrics of every run, against full data of the same demo and seed, as issue 14:
    - step speed-up (report.speedup): with A = full's final targeted accuracy, (first evaluated
      step at which full reaches A) / (first evaluated step at which the method reaches A); 0 if
      the method never reaches A;
    - wall-clock speed-up: the same ratio in seconds, counting the offline rollouts (methods that
      read them), sketching and selection time (report.seconds_at_step);
    - area under the targeted curve, final targeted and final untargeted accuracy, untargeted
      delta = method minus full, final.
  Statistics, per method and metric (D = 5 demos, S = 5 seeds each):
    - estimate: the mean over the D x S runs (= the mean of the D demo means); the median beside;
    - interval over demo models (the headline's): 95% hierarchical percentile bootstrap, 10,000
      resamples, numpy seed 0. A resample draws D demos with replacement and, within every drawn
      demo, S of its seeds with replacement; its statistic is the mean of the D x S drawn runs; the
      interval is the 2.5% and 97.5% quantiles of the 10,000 statistics. It covers which demo
      model one gets and the seeds within it. Drawing at both levels counts the seed noise twice
      and makes the interval a little wider than drawing demos alone; with five demos we prefer
      that, and the interval stays coarse;
    - interval over seeds within a demo: per demo, the 95% percentile bootstrap of the mean over
      its S seeds (issue 14's interval: 10,000 resamples, numpy seed 0), conditional on that model;
    - the spread: the standard deviation of the D demo means, and the pooled standard deviation
      of the seeds within a demo (root of the mean of the D within-demo variances, ddof 1).
  Command: python bench/accel_bench.py   (defaults = the design; --demos, --seeds, --methods to
      run fewer)
  The headline: the last printed line,
    speedup=<cropi's step speed-up, mean over all runs> speedup_ci=[<interval over demo models>]
    wall_speedup=<mean> wall_speedup_ci=[...] untargeted_delta=<cropi minus full, mean>
    untargeted_delta_ci=[...] speedup_median=<median over all runs>
  If CROPI does not beat full data, that is the result.

Resumable per (demo, method, seed): a finished run leaves OUT/demo<D>/seed<S>/<method>/bench.done
(its wall seconds) and is never rerun; an interrupted run resumes inside run_cropi.sh, which skips
its finished steps. Results are rewritten after every finished (demo, seed) cell. Writes
bench/results/accel_demos.md and accel_demos.png.
Runs go --jobs (2) at a time, one torch thread each (results do not depend on it: every run is
seeded and single-threaded). The first run of each demo builds it (about 150 s) and the demo's
other runs wait for it; those runs come first. Time, from issue 14's run on the 2-core machine
(wall s per run: full 144, cropi 249, plus about 10 s of start-ups): about 7 CPU-minutes per
(demo, seed) cell, 25 cells and 5 builds, so about 100 minutes with two jobs on an otherwise idle
2-core machine.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from make_demo import TARGETED_SKILLS  # noqa: E402
from plumbing.cli import arg, parse_args  # noqa: E402
from plumbing.files import atomic_path  # noqa: E402
from report import (  # noqa: E402
    OFFLINE_ROLLOUT_METHODS,
    accuracy_curves,
    area_under_curve,
    first_step_reaching,
    rollout_seconds,
    seconds_at_step,
    speedup,
    stage_seconds,
)

TARGETED = [f"test_{skill}" for skill in TARGETED_SKILLS]
COLUMNS = (
    "step_speedup",
    "wall_speedup",
    "auc_targeted",
    "final_targeted",
    "final_untargeted",
    "untargeted_delta",
)
PER_DEMO_COLUMNS = ("step_speedup", "wall_speedup", "final_targeted", "untargeted_delta")


@dataclasses.dataclass
class Args:
    demos: str = arg("0,1,2,3,4", "comma-separated make_demo.py --seed of the demo models")
    seeds: str = arg("0,1,2,3,4", "comma-separated GRPO seeds, run within every demo")
    methods: str = arg("cropi,full", "comma-separated run_cropi.sh methods (cropi and full needed)")
    stages: int = arg(4, "stages per run")
    steps_per_stage: int = arg(40, "GRPO steps per stage (the same total budget for every method)")
    eval_every: int = arg(20, "evaluation interval in steps")
    demo_args: str = arg(
        "--test-per-skill 500", "more make_demo.py flags (run_cropi.sh's DEMO_ARGS)"
    )
    resamples: int = arg(10000, "bootstrap resamples")
    jobs: int = arg(2, "runs at once, one torch thread each (results do not depend on it)")
    out: str = arg("runs/accel_demos", "folder for the runs")
    results: str = arg("bench/results", "folder for accel_demos.md and accel_demos.png")


# ----------------------------------------------------------------------------------------------
# Statistics: over the seeds of one demo, and over demo models
# ----------------------------------------------------------------------------------------------


def percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_interval(
    values: list[float], resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values with replacement
    `resamples` times, take each resample's mean, return the (1-c)/2 and (1+c)/2 quantiles of
    those means (numpy's default linear rule)."""
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return percentiles(values[draws].mean(axis=1), confidence)


def hierarchical_interval(
    groups: list[list[float]], resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over demo models and the seeds within them (one
    group of values per demo): a resample draws len(groups) demos with replacement and, within
    every drawn demo, as many of its seeds with replacement; its statistic is the mean of the
    drawn values."""
    rng = np.random.default_rng(seed)
    drawn_demos = rng.integers(0, len(groups), size=(resamples, len(groups)))
    sums, counts = np.zeros(resamples), np.zeros(resamples)
    for position in range(len(groups)):  # the demo drawn in this place, with fresh seed draws
        for demo, values in enumerate(groups):
            values = np.asarray(values, dtype=float)
            seeds = rng.integers(0, len(values), size=(resamples, len(values)))
            here = drawn_demos[:, position] == demo
            sums += np.where(here, values[seeds].sum(axis=1), 0.0)
            counts += np.where(here, len(values), 0)
    return percentiles(sums / counts, confidence)


def summarize(values: list[float], interval: tuple[float, float]) -> str:
    return f"{np.mean(values):.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def spreads(groups: list[list[float]]) -> tuple[float, float]:
    """(standard deviation of the demo means, pooled standard deviation of the seeds within a
    demo: root of the mean within-demo variance), ddof 1; NaN where too few values."""
    between = np.std([np.mean(g) for g in groups], ddof=1) if len(groups) > 1 else np.nan
    within = [np.var(g, ddof=1) for g in groups if len(g) > 1]
    return float(between), float(np.sqrt(np.mean(within))) if within else np.nan


# ----------------------------------------------------------------------------------------------
# One (demo, method, seed) run, resumable
# ----------------------------------------------------------------------------------------------


def demo_dir(args: Args, demo: int) -> Path:
    return Path(args.out) / f"demo{demo}" / "demo"


def run_dir(args: Args, demo: int, method: str, seed: int) -> Path:
    return Path(args.out) / f"demo{demo}" / f"seed{seed}" / method


def run_one(args: Args, demo: int, method: str, seed: int, runner=subprocess.run) -> Path:
    """run_cropi.sh for one demo, method and seed, unless its bench.done marker says it finished;
    returns its folder.

    The offline rollouts depend on the demo and seed only: a finished sibling's are copied in
    (with their .done markers, which run_cropi.sh then skips) so that every method of a demo and
    seed starts from the same ones.
    """
    out_dir = run_dir(args, demo, method, seed)
    marker = out_dir / "bench.done"
    if marker.exists():
        return out_dir
    siblings = [run_dir(args, demo, m, seed) for m in args.methods.split(",") if m != method]
    source = next((s / "rollouts" for s in siblings if (s / "bench.done").exists()), None)
    if source is not None and not (out_dir / "rollouts").exists():
        shutil.copytree(source, out_dir / "rollouts")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PIN_ISA": "1",  # the same five demo models on every x86 machine
        "METHOD": method,
        "COMPARE": "",
        "SEED": str(seed),
        "OUT_DIR": str(out_dir),
        "DEMO_DIR": str(demo_dir(args, demo)),
        "DEMO_SEED": str(demo),
        "DEMO_ARGS": args.demo_args,
        "STAGES": str(args.stages),
        "STEPS_PER_STAGE": str(args.steps_per_stage),
        "EVAL_EVERY": str(args.eval_every),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out_dir.parent / f"{method}.log", "a") as log:
        runner(
            ["bash", "run_cropi.sh"],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    marker.write_text(f"{time.time() - start:.1f}\n")
    print(f"  demo {demo} {method} seed {seed}: {time.time() - start:.0f}s", flush=True)
    return out_dir


def run_order(methods: list[str], demos: list[int], seeds: list[int]) -> list[tuple]:
    """The order the runs start in, as (method, demo, seed): first the run that builds each demo
    (its cropi run of the first seed), then every other cropi run (the other methods of a demo
    and seed copy its offline rollouts), then the other methods."""
    builders = [("cropi", d, seeds[0]) for d in demos]
    cropi = [("cropi", d, s) for d in demos for s in seeds[1:]]
    return (
        builders
        + cropi
        + [(m, d, s) for d in demos for s in seeds for m in methods if m != "cropi"]
    )


def run_all(
    args: Args, methods: list[str], demos: list[int], seeds: list[int], runner=subprocess.run
):
    """Yields (method, demo, seed, folder) of every run as it finishes, --jobs at a time. A run
    waits for the run that builds its demo (two runs must not build one demo at once), and a
    method that reads the offline rollouts for its demo and seed's cropi run, whose rollouts it
    copies (run_one). Runs start in run_order, so a run never waits for one that has not started."""
    order = run_order(methods, demos, seeds)
    built = {d: threading.Event() for d in demos}
    rollouts_ready = {(d, s): threading.Event() for d in demos for s in seeds}

    def one(method: str, demo: int, seed: int) -> tuple[str, int, int, Path]:
        builder = (method, demo, seed) == ("cropi", demo, seeds[0])
        if not builder:
            built[demo].wait()
            if not (demo_dir(args, demo) / "demo.done").exists():
                raise RuntimeError(f"demo {demo} was not built: see its first run's log")
        if method != "cropi" and method in OFFLINE_ROLLOUT_METHODS:
            rollouts_ready[(demo, seed)].wait()
        try:
            return method, demo, seed, run_one(args, demo, method, seed, runner)
        finally:  # finished or failed, the others go on (collecting their own rollouts if need be)
            if method == "cropi":
                rollouts_ready[(demo, seed)].set()
            if builder:
                built[demo].set()

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, *run) for run in order]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


# ----------------------------------------------------------------------------------------------
# Metrics of one run against full data of the same demo and seed
# ----------------------------------------------------------------------------------------------


def load_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if line.strip()]
    return accuracy_curves(metrics, TARGETED)


def seconds_to_reach(
    folder: Path, method: str, curve: list, goal: float, stages: int, steps_per_stage: int
):
    """Wall-clock seconds at the first evaluated step reaching `goal` (None if never): offline
    rollouts (for the methods that read them), every stage's sketch and selection, and training
    so far."""
    step = first_step_reaching(curve, goal)
    if step is None:
        return None
    offline = sum(rollout_seconds(folder).values()) if method in OFFLINE_ROLLOUT_METHODS else 0.0
    return seconds_at_step(
        step, steps_per_stage, [stage_seconds(folder, m) for m in range(stages)], offline
    )


def run_metrics(args: Args, folder: Path, method: str, full_folder: Path) -> dict[str, float]:
    curves, full = load_curves(folder), load_curves(full_folder)
    goal = full["targeted"][-1][1]
    mine = seconds_to_reach(
        folder, method, curves["targeted"], goal, args.stages, args.steps_per_stage
    )
    theirs = seconds_to_reach(
        full_folder, "full", full["targeted"], goal, args.stages, args.steps_per_stage
    )
    times = [stage_seconds(folder, m) for m in range(args.stages)]
    offline = sum(rollout_seconds(folder).values()) if method in OFFLINE_ROLLOUT_METHODS else 0.0
    total = offline + sum(sum(t.values()) for t in times)
    return {
        "step_speedup": speedup(full["targeted"], curves["targeted"]),
        "wall_speedup": max(theirs, 1e-9) / max(mine, 1e-9) if mine is not None else 0.0,
        "auc_targeted": area_under_curve(curves["targeted"]),
        "final_targeted": curves["targeted"][-1][1],
        "final_untargeted": curves["untargeted"][-1][1],
        "untargeted_delta": curves["untargeted"][-1][1] - full["untargeted"][-1][1],
        "seconds": total,
        "selection_share": (total - sum(t["train"] for t in times)) / max(total, 1e-9),
    }


# ----------------------------------------------------------------------------------------------
# accel_demos.md and accel_demos.png
# ----------------------------------------------------------------------------------------------


def plot(curves: dict, methods: list[str], cells: dict[int, list[int]], path: Path) -> None:
    """Targeted and untargeted accuracy: per method the mean over all runs (thick) and each demo's
    mean over its seeds (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, group in zip(axes, ("targeted", "untargeted")):
        for color, m in enumerate(methods):
            per_demo = {
                d: np.array([[v for _, v in curves[(m, d, s)][group]] for s in seeds])
                for d, seeds in cells.items()
            }
            first_demo, first_seeds = next(iter(cells.items()))
            steps = [step for step, _ in curves[(m, first_demo, first_seeds[0])][group]]
            everything = np.concatenate(list(per_demo.values()))
            ax.plot(steps, everything.mean(axis=0), color=f"C{color}", label=m, linewidth=2.5)
            for values in per_demo.values():
                ax.plot(steps, values.mean(axis=0), color=f"C{color}", linewidth=0.8, alpha=0.5)
        title = f"{group} (thick: mean of all runs; thin: each demo's mean over its seeds)"
        ax.set(xlabel="GRPO step", ylabel=f"{group} test accuracy", title=title)
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def recorded_kernels(args: Args, runs: dict) -> list[str]:
    """The CPU kernels every demo build and GRPO stage recorded (plumbing.models.cpu_kernels)."""
    files = [demo_dir(args, d) / "demo.json" for d in {d for _, d, _ in runs}]
    files += [
        p for folder in runs.values() for p in folder.glob("stage_*/checkpoint/grpo_train.json")
    ]
    return sorted({json.loads(p.read_text()).get("cpu_capability", "not recorded") for p in files})


def model_sha256(args: Args, demo: int) -> str:
    meta = json.loads((demo_dir(args, demo) / "demo.json").read_text())
    return meta["sha256"]["model/model.safetensors"]


def write_results(
    args: Args, runs: dict, methods: list[str], cells: dict[int, list[int]], wall: float
) -> dict[str, list[list[float]]]:
    """accel_demos.md and .png for the finished (demo, seed) cells; returns cropi's metrics, each
    as a list of per-seed values per demo."""
    per_run = {
        (m, d, s): run_metrics(args, runs[(m, d, s)], m, runs[("full", d, s)])
        for m in methods
        for d, seeds in cells.items()
        for s in seeds
    }
    grouped = {  # (method, metric): a list of per-seed values per demo
        (m, c): [[per_run[(m, d, s)][c] for s in seeds] for d, seeds in cells.items()]
        for m in methods
        for c in (*COLUMNS, "seconds", "selection_share")
    }

    def runs_of(m: str, c: str) -> list[float]:  # every run's value, demo after demo
        return sum(grouped[(m, c)], [])

    overall = [
        f"| {m} | {np.median(runs_of(m, 'step_speedup')):.2f} | "
        + " | ".join(
            summarize(runs_of(m, c), hierarchical_interval(grouped[(m, c)], args.resamples))
            for c in COLUMNS
        )
        + f" | {np.mean(runs_of(m, 'seconds')):.0f} | "
        f"{np.mean(runs_of(m, 'selection_share')):.0%} |"
        for m in methods
    ]
    spread = [
        f"| {m} | "
        + " | ".join(f"{x:.3f}" for c in COLUMNS[:2] for x in spreads(grouped[(m, c)]))
        + " |"
        for m in methods
        if m != "full"
    ]
    per_demo = [
        f"| {d} | {m} | "
        + " | ".join(
            summarize(v, bootstrap_interval(v, args.resamples))
            for v in (grouped[(m, c)][i] for c in PER_DEMO_COLUMNS)
        )
        + " |"
        for m in methods
        for i, d in enumerate(cells)
    ]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    curves = {key: load_curves(folder) for key, folder in runs.items()}
    plot(curves, methods, cells, results / "accel_demos.png")
    report = [
        "# Acceleration experiment over demo models (pre-registered in bench/accel_bench.py's "
        "docstring, issue 27)",
        "",
        f"Command: `python bench/accel_bench.py`; (demo, seed) cells finished: "
        f"{sum(map(len, cells.values()))}: {cells} (demo: seeds); wall time of this invocation "
        f"{wall / 60:.1f} min.",
        f"Budget: {args.stages} stages x {args.steps_per_stage} GRPO steps, eval every "
        f"{args.eval_every} steps; demo d = make_demo.py --seed d {args.demo_args}; targeted = "
        f"{TARGETED}.",
        "Demo models, sha256 of model.safetensors: "
        + ", ".join(f"{d}: {model_sha256(args, d)[:16]}..." for d in cells)
        + f". CPU kernels recorded by the builds and GRPO stages: {recorded_kernels(args, runs)}.",
        "",
        "Over demo models: mean over all runs [95% hierarchical bootstrap interval: demos drawn "
        "with replacement, then seeds within each drawn demo]; speed-ups against full data of "
        "the same demo and seed.",
        "",
        "| method | step speed-up, median | step speed-up | wall-clock speed-up | area under "
        "targeted curve | final targeted | final untargeted | untargeted minus full | wall s per "
        "run | selection share |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *overall,
        "",
        "Spread: standard deviation of the demo means (between demos) and pooled over the seeds "
        "within a demo (within).",
        "",
        "| method | step speed-up, between | step speed-up, within | wall-clock speed-up, "
        "between | wall-clock speed-up, within |",
        "|---|---|---|---|---|",
        *spread,
        "",
        "Per demo model, conditional on it: mean over its seeds [95% bootstrap interval over "
        "those seeds].",
        "",
        "| demo | method | step speed-up | wall-clock speed-up | final targeted | untargeted "
        "minus full |",
        "|---|---|---|---|---|---|",
        *per_demo,
        "",
        "Speed-up 0 = never reached full data's final targeted accuracy within the budget. Wall s "
        "per run counts the offline rollouts for the methods that read them; selection share = "
        "(rollouts + sketch + select) / that total.",
        "",
        "![accel_demos](accel_demos.png)",
    ]
    with atomic_path(results / "accel_demos.md") as tmp:
        tmp.write_text("\n".join(report) + "\n")
    print("\n".join(report), flush=True)
    return {c: grouped[("cropi", c)] for c in COLUMNS}


def headline(cropi: dict[str, list[list[float]]], resamples: int) -> str:
    """The last line printed: cropi's means over all runs with their intervals over demo models."""
    parts = []
    for name, column in (
        ("speedup", "step_speedup"),
        ("wall_speedup", "wall_speedup"),
        ("untargeted_delta", "untargeted_delta"),
    ):
        low, high = hierarchical_interval(cropi[column], resamples)
        parts.append(
            f"{name}={np.mean(sum(cropi[column], [])):.3f} {name}_ci=[{low:.3f},{high:.3f}]"
        )
    return " ".join(parts) + f" speedup_median={np.median(sum(cropi['step_speedup'], [])):.2f}"


def main(args: Args, runner=subprocess.run) -> None:
    demos = [int(d) for d in args.demos.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if "full" not in methods or "cropi" not in methods:
        raise SystemExit(f"--methods {args.methods}: must include cropi and full")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: at least 1")
    start, runs, cells = time.time(), {}, {}
    for method, demo, seed, folder in run_all(args, methods, demos, seeds, runner):
        runs[(method, demo, seed)] = folder
        if all((m, demo, seed) in runs for m in methods):  # a finished cell: results rewritten
            cells.setdefault(demo, []).append(seed)
            cells = {d: sorted(cells[d]) for d in sorted(cells)}
            cropi = write_results(args, runs, methods, cells, time.time() - start)
    print(headline(cropi, args.resamples))


if __name__ == "__main__":
    main(parse_args(Args))
