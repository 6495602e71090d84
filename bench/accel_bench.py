"""The acceleration experiment on the embedded demo task (the project's headline figure).

Runs run_cropi.sh for every method and seed with the same GRPO budget, then reports the paper's step-level
speed-up: with A = full data's final targeted test accuracy,
    speed-up(method) = (first step at which full reaches A) / (first step at which the method reaches A).
Targeted accuracy = mean accuracy over the test sets of the skills the validation sets aim at (run_cropi.sh's demo
default: add and sub); untargeted = mean over the other skills (mul, max). Accuracy is greedy decoding on 100 test
prompts per skill, evaluated every --eval-every steps.

The design (task, skills targeted, budget, seeds, the metric) was fixed and committed before the results were seen.
Each seed has its own demo model and rollouts, shared by the methods of that seed (they depend on the seed only).

Writes bench/results/accel.md and accel.png; the last line printed is
    speedup=<cropi vs full, median over seeds> untargeted_delta=<cropi minus full, final, median over seeds>
Usage: python bench/accel_bench.py [--seeds 0,1,2] [--out runs/accel]
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery import arg, atomic_path, parse_args  # noqa: E402
from report import accuracy_curves, speedup, stage_seconds  # noqa: E402

TARGETED = ["test_add", "test_sub"]


@dataclasses.dataclass
class Args:
    seeds: str = arg("0,1,2", "comma-separated seeds")
    methods: str = arg("cropi,full,random,learnability,influence_once", "comma-separated methods (full is needed)")
    stages: int = arg(4, "stages per run")
    steps_per_stage: int = arg(40, "GRPO steps per stage (same total budget for every method)")
    eval_every: int = arg(10, "evaluation interval in steps")
    out: str = arg("runs/accel", "folder for the runs")
    results: str = arg("bench/results", "folder for accel.md and accel.png")


def run_one(args: Args, method: str, seed: int) -> Path:
    out_dir = Path(args.out) / f"seed{seed}" / method
    shared = Path(args.out) / f"seed{seed}"
    first = Path(args.out) / f"seed{seed}" / "cropi"
    if method != "cropi" and (first / "rollouts").exists() and not (out_dir / "rollouts").exists():
        shutil.copytree(first / "rollouts", out_dir / "rollouts")  # same seed, same offline rollouts
    env = {**os.environ, "METHOD": method, "SEED": str(seed), "OUT_DIR": str(out_dir), "DEMO_DIR": str(shared / "demo"),
           "STAGES": str(args.stages), "STEPS_PER_STAGE": str(args.steps_per_stage), "EVAL_EVERY": str(args.eval_every)}
    start = time.time()
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / f"{method}.log", "a") as log:
        subprocess.run(["bash", "run_cropi.sh"], cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  {method} seed {seed}: {time.time() - start:.0f}s", flush=True)
    return out_dir


def load_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    return accuracy_curves(metrics, TARGETED)


def write_results(args: Args, runs: dict, methods: list[str], seeds: list[int], wall: float) -> tuple[float, float]:
    """Write accel.md and accel.png for the seeds finished so far; return cropi's median speed-up and delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {key: load_curves(path) for key, path in runs.items()}
    rows, speedups, deltas = [], {m: [] for m in methods}, {m: [] for m in methods}
    for m in methods:
        for s in seeds:
            speedups[m].append(speedup(curves[("full", s)]["targeted"], curves[(m, s)]["targeted"]))
            deltas[m].append(curves[(m, s)]["untargeted"][-1][1] - curves[("full", s)]["untargeted"][-1][1])
        times = [stage_seconds(runs[(m, s)], k) for s in seeds for k in range(args.stages)]
        total = sum(sum(t.values()) for t in times)
        select_share = sum(t["sketch"] + t["select"] for t in times) / max(total, 1e-9)
        final_t = [curves[(m, s)]["targeted"][-1][1] for s in seeds]
        final_u = [curves[(m, s)]["untargeted"][-1][1] for s in seeds]
        rows.append(f"| {m} | {np.median(speedups[m]):.2f} ({', '.join(f'{x:.2f}' for x in speedups[m])}) | "
                    f"{np.mean(final_t):.3f} +- {np.std(final_t):.3f} | {np.mean(final_u):.3f} +- {np.std(final_u):.3f}"
                    f" | {total / len(seeds):.0f} | {select_share:.0%} |")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, group in zip(axes, ("targeted", "untargeted")):
        for m in methods:
            steps = [step for step, _ in curves[(m, seeds[0])][group]]
            mean = np.mean([[v for _, v in curves[(m, s)][group]] for s in seeds], axis=0)
            ax.plot(steps, mean, label=m, linewidth=2.5 if m in ("cropi", "full") else 1)
        ax.set(xlabel="GRPO step", ylabel=f"{group} test accuracy (mean over {len(seeds)} seeds)", title=group)
        ax.legend(fontsize=8)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with atomic_path(results / "accel.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    report = [
        "# Acceleration experiment (embedded demo)", "",
        f"Command: `python bench/accel_bench.py --seeds {args.seeds}`; seeds finished: {seeds}; "
        f"wall time so far {wall / 60:.1f} min on this machine.",
        f"Budget: {args.stages} stages x {args.steps_per_stage} GRPO steps, eval every {args.eval_every} steps; "
        f"targeted = {TARGETED}.", "",
        "| method | step speed-up vs full (median; per seed) | final targeted | final untargeted | "
        "wall s per run (sketch+select+train) | selection share |", "|---|---|---|---|---|---|", *rows, "",
        "Speed-up 0 = never reached full data's final targeted accuracy within the budget.", "",
        "![accel](accel.png)"]
    with atomic_path(results / "accel.md") as tmp:
        tmp.write_text("\n".join(report) + "\n")
    print("\n".join(report), flush=True)
    return float(np.median(speedups["cropi"])), float(np.median(deltas["cropi"]))


def main(args: Args) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if "full" not in methods or "cropi" not in methods:
        raise SystemExit("--methods must include cropi and full")
    methods = ["cropi"] + [m for m in methods if m != "cropi"]  # cropi first: it collects the shared rollouts
    wall_start = time.time()
    runs = {}
    for n, seed in enumerate(seeds):  # seed by seed, so that the results so far are written after each
        runs.update({(m, seed): run_one(args, m, seed) for m in methods})
        speed, delta = write_results(args, runs, methods, seeds[:n + 1], time.time() - wall_start)
    print(f"speedup={speed:.2f} untargeted_delta={delta:+.3f}")


if __name__ == "__main__":
    main(parse_args(Args))
