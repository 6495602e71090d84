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
METHODS = "cropi,full,random,learnability,pass_rate,influence_once,full_dynamic,cropi_onpolicy"


@dataclasses.dataclass
class Args:
    seeds: str = arg("0,1,2,3,4", "comma-separated seeds")
    methods: str = arg(METHODS, "comma-separated run_cropi.sh methods (cropi and full are needed)")
    stages: int = arg(4, "stages per run")
    steps_per_stage: int = arg(40, "GRPO steps per stage (the same total budget for every method)")
    eval_every: int = arg(20, "evaluation interval in steps")
    demo_seed: int = arg(0, "make_demo.py --seed of the one demo all seeds share")
    demo_args: str = arg(
        "--test-per-skill 500", "more make_demo.py flags (run_cropi.sh's DEMO_ARGS)"
    )
    resamples: int = arg(10000, "bootstrap resamples of the seeds")
    jobs: int = arg(2, "runs at once, one torch thread each (results do not depend on it)")
    out: str = arg("runs/accel", "folder for the runs")
    results: str = arg("bench/results", "folder for accel.md and accel.png")


# ----------------------------------------------------------------------------------------------
# Statistics over seeds
# ----------------------------------------------------------------------------------------------


def bootstrap_interval(
    values: list[float], resamples: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values with replacement
    `resamples` times, take each resample's mean, return the (1-c)/2 and (1+c)/2 quantiles of
    those means (numpy's default linear rule)."""
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    return float(np.quantile(means, (1 - confidence) / 2)), float(
        np.quantile(means, (1 + confidence) / 2)
    )


def summarize(values: list[float], resamples: int) -> str:
    """'mean [low, high]' with the 95% bootstrap interval."""
    low, high = bootstrap_interval(values, resamples)
    return f"{np.mean(values):.3f} [{low:.3f}, {high:.3f}]"


# ----------------------------------------------------------------------------------------------
# One (method, seed) run, resumable
# ----------------------------------------------------------------------------------------------


def run_dir(args: Args, method: str, seed: int) -> Path:
    return Path(args.out) / f"seed{seed}" / method


def run_one(args: Args, method: str, seed: int, runner=subprocess.run) -> Path:
    """run_cropi.sh for one method and seed, unless its bench.done marker says it finished; returns
    its folder.

    The offline rollouts depend on the seed only: a finished sibling's are copied in (with their
    .done markers, which run_cropi.sh then skips) so that every method of a seed starts from the
    same ones.
    """
    out_dir, marker = run_dir(args, method, seed), run_dir(args, method, seed) / "bench.done"
    if marker.exists():
        return out_dir
    siblings = [run_dir(args, m, seed) for m in args.methods.split(",") if m != method]
    source = next((s / "rollouts" for s in siblings if (s / "bench.done").exists()), None)
    if source is not None and not (out_dir / "rollouts").exists():
        shutil.copytree(source, out_dir / "rollouts")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "METHOD": method,
        "COMPARE": "",
        "SEED": str(seed),
        "OUT_DIR": str(out_dir),
        "DEMO_DIR": str(Path(args.out) / "demo"),
        "DEMO_SEED": str(args.demo_seed),
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
    print(f"  {method} seed {seed}: {time.time() - start:.0f}s", flush=True)
    return out_dir


def run_order(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The order the runs start in: every seed's cropi first (the other methods of a seed copy
    its offline rollouts), then the other methods seed by seed."""
    return [("cropi", s) for s in seeds] + [(m, s) for s in seeds for m in methods if m != "cropi"]


def run_all(args: Args, methods: list[str], seeds: list[int], runner=subprocess.run):
    """Yields (method, seed, folder) of every run as it finishes, --jobs at a time after the
    first. A method that reads the offline rollouts waits for its seed's cropi run, whose
    rollouts it copies (run_one); the cropi runs start first, so a waiting run never holds up the
    one it waits for."""
    rollouts_ready = {seed: threading.Event() for seed in seeds}

    def one(method: str, seed: int) -> tuple[str, int, Path]:
        if method != "cropi" and method in OFFLINE_ROLLOUT_METHODS:
            rollouts_ready[seed].wait()
        try:
            return method, seed, run_one(args, method, seed, runner)
        finally:
            if (
                method == "cropi"
            ):  # finished or failed: the others go on (and collect their own if it failed)
                rollouts_ready[seed].set()

    first, *rest = run_order(methods, seeds)
    yield one(
        *first
    )  # alone: it builds the demo that every run shares, and two runs must not build it at once
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, m, s) for m, s in rest]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


# ----------------------------------------------------------------------------------------------
# Metrics of one run against full data of the same seed
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
        "wall_speedup": max(theirs, 1e-9) / mine if mine else 0.0,
        "auc_targeted": area_under_curve(curves["targeted"]),
        "final_targeted": curves["targeted"][-1][1],
        "final_untargeted": curves["untargeted"][-1][1],
        "untargeted_delta": curves["untargeted"][-1][1] - full["untargeted"][-1][1],
        "seconds": total,
        "selection_share": (total - sum(t["train"] for t in times)) / max(total, 1e-9),
    }


# ----------------------------------------------------------------------------------------------
# accel.md and accel.png
# ----------------------------------------------------------------------------------------------


def plot(args: Args, curves: dict, methods: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, group in zip(axes, ("targeted", "untargeted")):
        for color, m in enumerate(methods):
            steps = [step for step, _ in curves[(m, seeds[0])][group]]
            values = np.array([[v for _, v in curves[(m, s)][group]] for s in seeds])
            ax.plot(
                steps,
                values.mean(axis=0),
                color=f"C{color}",
                label=m,
                linewidth=2.5 if m in ("cropi", "full") else 1,
            )
            if len(seeds) > 1:  # the spread over seeds (min to max), not an interval
                ax.fill_between(
                    steps, values.min(axis=0), values.max(axis=0), color=f"C{color}", alpha=0.08
                )
        ax.set(
            xlabel="GRPO step",
            ylabel=f"{group} test accuracy (mean over {len(seeds)} seeds)",
            title=group,
        )
        ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_results(
    args: Args, runs: dict, methods: list[str], seeds: list[int], wall: float
) -> dict[str, list]:
    """accel.md and accel.png for the seeds finished so far; returns cropi's per-seed metrics."""
    per_run = {
        (m, s): run_metrics(args, runs[(m, s)], m, runs[("full", s)])
        for m in methods
        for s in seeds
    }
    columns = [
        "step_speedup",
        "wall_speedup",
        "auc_targeted",
        "final_targeted",
        "final_untargeted",
        "untargeted_delta",
    ]
    rows = []
    for m in methods:
        values = {c: [per_run[(m, s)][c] for s in seeds] for c in columns}
        cells = [f"{np.median(values['step_speedup']):.2f}"] + [
            summarize(values[c], args.resamples) for c in columns
        ]
        seconds = [per_run[(m, s)]["seconds"] for s in seeds]
        share = np.mean([per_run[(m, s)]["selection_share"] for s in seeds])
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean(seconds):.0f} | {share:.0%} |")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    plot(
        args,
        {key: load_curves(folder) for key, folder in runs.items()},
        methods,
        seeds,
        results / "accel.png",
    )
    report = [
        "# Acceleration experiment (embedded demo, pre-registered in bench/accel_bench.py's "
        "docstring)",
        "",
        f"Command: `python bench/accel_bench.py`; seeds finished: {seeds} of {args.seeds}; "
        f"wall time of this invocation {wall / 60:.1f} min.",
        f"Budget: {args.stages} stages x {args.steps_per_stage} GRPO steps, eval every "
        f"{args.eval_every} steps; demo seed {args.demo_seed} ({args.demo_args}); targeted = "
        f"{TARGETED}.",
        "",
        "Each cell: mean over seeds [95% bootstrap interval]; speed-ups against full data of the "
        "same seed.",
        "",
        "| method | step speed-up, median | step speed-up | wall-clock speed-up | area under "
        "targeted curve | final targeted | final untargeted | untargeted minus full | wall s per "
        "run | selection share |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Speed-up 0 = never reached full data's final targeted accuracy within the budget. Wall s "
        "per run counts the offline rollouts for the methods that read them (cropi, "
        "cropi_onpolicy, influence_once, learnability, pass_rate); selection share = (rollouts + "
        "sketch + select) / that total.",
        "",
        "![accel](accel.png)",
    ]
    with atomic_path(results / "accel.md") as tmp:
        tmp.write_text("\n".join(report) + "\n")
    print("\n".join(report), flush=True)
    return {
        c: [per_run[("cropi", s)][c] for s in seeds] for c in ("step_speedup", "untargeted_delta")
    }


def main(args: Args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if "full" not in methods or "cropi" not in methods:
        raise SystemExit(f"--methods {args.methods}: must include cropi and full")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: at least 1")
    start, runs, done = time.time(), {}, []
    for method, seed, folder in run_all(
        args, methods, seeds
    ):  # as they finish; a finished seed's results written
        runs[(method, seed)] = folder
        if all((m, seed) in runs for m in methods):
            done.append(seed)
            cropi = write_results(args, runs, methods, sorted(done), time.time() - start)
    low, high = bootstrap_interval(cropi["step_speedup"], args.resamples)
    delta_low, delta_high = bootstrap_interval(cropi["untargeted_delta"], args.resamples)
    print(
        f"speedup={np.median(cropi['step_speedup']):.2f} "
        f"untargeted_delta={np.median(cropi['untargeted_delta']):+.3f} "
        f"speedup_mean={np.mean(cropi['step_speedup']):.2f} speedup_ci=[{low:.2f},{high:.2f}] "
        f"untargeted_delta_mean={np.mean(cropi['untargeted_delta']):+.3f} "
        f"untargeted_delta_ci=[{delta_low:+.3f},{delta_high:+.3f}]"
    )


if __name__ == "__main__":
    main(parse_args(Args))
