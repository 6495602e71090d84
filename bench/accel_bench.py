"""The acceleration experiment on the embedded demo task (the project's headline figure).

PRE-REGISTERED DESIGN (issue 14), committed before any result of this experiment was seen. Checked
beforehand on full data alone (its learnability, which the design requires): see the README's demo
section.
  Task: make_demo.py's eight-skill pool (its docstring: digit-string skills, each taught with a
      typical wrong rule at level 1, right at level 2, never at level 3), one demo for every seed:
      the build of `make_demo.py --seed 0 --test-per-skill 500` (its demo.json records the hashes;
      the model is the default build's). Validation sets aim at rot and swap (TARGETED_SKILLS, 2 of
      8 skills, a quarter of the pool): targeted accuracy = mean greedy accuracy over test_rot and
      test_swap, untargeted = mean over the six other test sets, 500 prompts per skill (binomial
      noise <= +-0.022 at p = 0.5).
  Budget: every method trains 4 stages x 40 GRPO steps (160) of B = 16 prompts x G = 8 responses,
      run_cropi.sh's demo settings otherwise (RATIO 0.1, K 8, VAL_K 8, lr 1e-4); evaluated at step 0
      and every 20 steps (9 points).
  Seeds: 0-4 (5). A seed sets the offline rollouts (shared by the methods of that seed), the random
      and baseline draws and the GRPO sampling and data order; the task and the warm-started model
      are the same for all seeds.
  Methods (run_cropi.sh METHOD values, same budget): cropi, full, random, learnability, pass_rate,
      influence_once, full_dynamic (full data, DAPO dynamic sampling, at most DYNAMIC_ROUNDS=10
      sampling rounds per step) and cropi_onpolicy (fresh rollouts of the current checkpoint before
      each stage's sketch).
  Metrics, per seed, each method against full data of the same seed, then mean and 95%
  percentile-bootstrap interval over the seeds (10,000 resamples, numpy seed 0), and the median:
    - step speed-up (report.speedup): with A = full's final targeted accuracy, (first evaluated step
      at which full reaches A) / (first evaluated step at which the method reaches A); 0 if the
      method never reaches A;
    - wall-clock speed-up: the same ratio in seconds, counting the offline rollouts (methods that
      read them), sketching (an on-policy run's fresh rollouts included) and selection time
      (report.seconds_at_step);
    - area under the targeted curve (report.area_under_curve: mean targeted accuracy over the
      run);
    - final targeted and final untargeted accuracy; untargeted delta = method minus full, final.
  Command: python bench/accel_bench.py   (defaults = the design; --seeds/--methods to run fewer)
  The headline: the last printed line,
    speedup=<cropi's step speed-up, median over seeds>
    untargeted_delta=<cropi minus full, final untargeted, median>
  followed by the mean and interval of both. If CROPI does not beat full data, that is the result.

Resumable per (method, seed): a finished run leaves OUT/seed<S>/<method>/bench.done (its wall
seconds) and is never rerun; an interrupted run resumes inside run_cropi.sh, which skips its
finished steps. Results are rewritten after every finished seed. Writes bench/results/accel.md and
accel.png.
Runs go --jobs (2) at a time, one torch thread each (results do not depend on it: every run is
seeded and single-threaded). Time, estimated from a full-data run of this budget on the 2-core
machine beside another job: 40 GRPO steps about 20 s, an evaluation of 8 x 500 prompts about 5 s,
the offline rollouts 40 s, a stage's sketch of the ~500 pool prompts with mixed rewards about 30 s;
per seed about 26 CPU-minutes (full 130 s, cropi 290 s, cropi_onpolicy 380 s, full_dynamic 200 s,
the four others about 145 s each), so 5 seeds take about 65-70 minutes with two jobs on an
otherwise idle machine.
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
