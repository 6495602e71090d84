"""The report of one CROPI run (the last step of run_cropi.sh): report.md and PNG plots in OUT_DIR.

Reads OUT_DIR/stage_<m>/{metrics.jsonl, subset.jsonl, *.done},
OUT_DIR/rollouts/{train.jsonl, *.done}, and writes OUT_DIR/metrics.jsonl (all stages' metrics in one
file), OUT_DIR/report.md, accuracy.png, training.png, selection.png, time.png.
  targeted accuracy   = mean accuracy over the test sets named in --targeted (those the validation
                        sets aim at)
  untargeted accuracy = mean over the other test sets
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from plumbing.cli import arg, parse_args
from plumbing.data import PASS_RATE_BINS, iter_jsonl, pass_rate_histogram, read_jsonl
from plumbing.files import atomic_path, write_jsonl


@dataclasses.dataclass
class Args:
    out_dir: str = arg("runs/demo", "the run folder written by run_cropi.sh")
    stages: int = arg(1, "number of stages in the run")
    targeted: str = arg(
        "", "comma-separated test-set names (file stems) that the validation sets aim at"
    )
    method: str = arg("cropi", "selection method of the run (for the title)")
    compare: str = arg(
        "",
        "comma-separated run folders of other methods on the same budget (run_cropi.sh's COMPARE: "
        "OUT_DIR/compare_<method>), overlaid on this run's curves",
    )


def load_metrics(out_dir: Path, stages: int) -> list[dict]:
    rows = []
    for m in range(stages):
        path = out_dir / f"stage_{m}" / "metrics.jsonl"
        if path.exists():
            rows += [dict(row, stage=m) for _, row in iter_jsonl(path)]
    return rows


def eval_accuracies(row: dict) -> dict[str, float]:
    """{test set: accuracy} of a metrics line's eval/<test set>/accuracy keys ({} if none)."""
    prefix, suffix = "eval/", "/accuracy"
    return {
        key[len(prefix) : -len(suffix)]: value
        for key, value in row.items()
        if key.startswith(prefix) and key.endswith(suffix)
    }


def accuracy_curves(metrics: list[dict], targeted: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{"targeted": [(step, mean acc)], "untargeted": [...], "<test set>": [...]} from the
    eval/<test set>/accuracy keys of the metrics lines."""
    curves: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    seen_steps = set()
    for row in metrics:
        accuracies = eval_accuracies(row)
        if not accuracies or row["step"] in seen_steps:  # stage m's final eval == m+1's first
            continue
        seen_steps.add(row["step"])
        for name, value in accuracies.items():
            curves[name].append((row["step"], value))
        for group, names in (
            ("targeted", [n for n in accuracies if n in targeted]),
            ("untargeted", [n for n in accuracies if n not in targeted]),
        ):
            if names:
                curves[group].append((row["step"], float(np.mean([accuracies[n] for n in names]))))
    return dict(curves)


def first_step_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose accuracy is >= target (None if never)."""
    return next((step for step, value in points if value >= target - 1e-12), None)


def speedup(full_curve: list[tuple[int, float]], method_curve: list[tuple[int, float]]) -> float:
    """steps for full to first reach its final accuracy / steps for the method to first reach it (0
    if never).

    A method that is already there at step 0 would divide by zero: the steps count from 1 eval
    interval then.
    """
    target = full_curve[-1][1]
    full_steps, method_steps = (
        first_step_reaching(full_curve, target),
        first_step_reaching(method_curve, target),
    )
    if method_steps is None:
        return 0.0
    return max(full_steps, 1) / max(method_steps, 1)


def area_under_curve(points: list[tuple[int, float]]) -> float:
    """Mean accuracy over the run: the trapezoid area under the curve divided by its length in
    steps."""
    steps, values = zip(*points)
    return (
        float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))
        if len(points) > 1
        else float(values[0])
    )


def seconds_at_step(
    step: int, steps_per_stage: int, stage_times: list[dict[str, float]], offline: float
) -> float:
    """Wall-clock seconds a run has spent when it reaches `step`: the offline rollouts, every
    earlier stage, this stage's selection, and its training time in proportion to the steps done."""
    seconds = offline
    for m, t in enumerate(stage_times):
        done = min(max(step - m * steps_per_stage, 0), steps_per_stage)
        if done == 0 and step <= m * steps_per_stage:
            break
        seconds += t["sketch"] + t["select"] + t["train"] * done / steps_per_stage
    return seconds


def marker_seconds(marker: Path) -> float:
    """Line 1 of a run_cropi.sh .done marker: the step's wall-clock seconds (line 2 is its settings
    key)."""
    return float(marker.read_text().split("\n")[0].strip() or 0)


def stage_seconds(out_dir: Path, stage: int) -> dict[str, float]:
    """Wall-clock seconds of the finished steps of one stage, read from the .done markers of
    run_cropi.sh; an on-policy run's fresh rollouts (stage_<m>/rollouts/) count as sketching: they
    are the cost of its estimate."""
    seconds = {"sketch": 0.0, "select": 0.0, "train": 0.0}
    stage_dir = out_dir / f"stage_{stage}"
    for marker in [*stage_dir.glob("*.done"), *stage_dir.glob("rollouts/*.done")]:
        kind = (
            "sketch"
            if marker.stem.startswith("sketch") or marker.parent.name == "rollouts"
            else marker.stem
        )
        if kind in seconds:
            seconds[kind] += marker_seconds(marker)
    return seconds


def sketched_prompts(out_dir: Path, stage: int) -> int:
    """Pool prompts whose gradient the stage sketched (rows minus zero rows of train_sketch.json; 0
    without one)."""
    meta = out_dir / f"stage_{stage}" / "train_sketch.json"
    if not meta.exists():
        return 0
    meta = json.loads(meta.read_text())
    return meta["rows"] - len(meta["zero_rows"])


def rollout_seconds(out_dir: Path) -> dict[str, float]:
    """Seconds of the offline rollout collection (step 0, once): {"train": s, "validation": s}."""
    seconds = {"train": 0.0, "validation": 0.0}
    for marker in (out_dir / "rollouts").glob("*.done"):
        seconds["train" if marker.stem == "train" else "validation"] += marker_seconds(marker)
    return seconds


def padded_limits(
    values: list[float], lowest: float = 0.0, highest: float = 1.0, min_span: float = 0.1
):
    """y-axis limits around the values, at least min_span wide, within [lowest, highest]: a flat
    line stays flat instead of being zoomed into noise."""
    lo, hi = min(values), max(values)
    pad = max(min_span - (hi - lo), 0) / 2 + 0.02
    lo, hi = max(lowest, lo - pad), min(highest, hi + pad)
    return (lo, max(hi, lo + min_span)) if hi - lo < min_span else (lo, hi)


def save_stacked_bars(path: Path, series: dict[str, list[float]], ylabel: str, title: str) -> None:
    """One bar per stage, stacked by series (e.g. skills or time components), saved as a PNG."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    stages = len(next(iter(series.values())))
    bottom = np.zeros(stages)
    for label, values in series.items():
        ax.bar(range(stages), values, bottom=bottom, label=label)
        bottom += np.asarray(values, dtype=float)
    ax.set(xlabel="stage", ylabel=ylabel, title=title)
    ax.set_xticks(range(stages))
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(args.out_dir)
    targeted = [t for t in args.targeted.split(",") if t]
    metrics = load_metrics(out_dir, args.stages)
    write_jsonl(out_dir / "metrics.jsonl", metrics)
    curves = accuracy_curves(metrics, targeted)
    pool = {row["id"]: row for row in read_jsonl(out_dir / "rollouts" / "train.jsonl")}
    pool_pass = {i: float(np.mean(row["rewards"])) for i, row in pool.items()}
    skill_of = {
        i: str(row.get("skill", row.get("source", "(no skill)"))) for i, row in pool.items()
    }
    skills = sorted(set(skill_of.values()))

    lines = [f"# CROPI run report: {out_dir} (method {args.method}, {args.stages} stages)", ""]

    # Accuracy per step
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        steps, values = zip(*points)
        style = (
            {"linewidth": 2.5}
            if name in ("targeted", "untargeted")
            else {"linewidth": 0.8, "alpha": 0.6}
        )
        ax.plot(steps, values, label=name, **style)
    ax.set(
        xlabel="GRPO step",
        ylabel="test accuracy (greedy)",
        title=f"{args.method}: accuracy per step",
        ylim=padded_limits([v for points in curves.values() for _, v in points] or [0.0]),
    )
    ax.legend(fontsize=7)
    with atomic_path(out_dir / "accuracy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    lines += [
        "## Accuracy",
        "",
        "![accuracy](accuracy.png)",
        "",
        "| step | " + " | ".join(curves) + " |",
        "|---" * (len(curves) + 1) + "|",
    ]
    all_steps = sorted({s for points in curves.values() for s, _ in points})
    for step in all_steps:
        cells = [f"{dict(points).get(step, float('nan')):.3f}" for points in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")

    # Training: per-step reward of the sampled responses and share of groups whose rewards are all
    # equal
    train_rows = [row for row in metrics if "reward" in row]
    if train_rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [row["step"] for row in train_rows]
        ax.plot(
            steps, [row["reward"] for row in train_rows], label="mean reward of the GRPO samples"
        )
        ax.plot(
            steps,
            [row["frac_reward_zero_std"] for row in train_rows],
            label="share of groups with all-equal rewards",
        )
        ax.set(xlabel="GRPO step", ylim=(-0.02, 1.02), title="training signal")
        ax.legend(fontsize=7)
        with atomic_path(out_dir / "training.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        lines += [
            "",
            "## Training signal",
            "",
            "![training](training.png)",
            "",
            "| stage | mean reward | all-equal group share (no gradient) | KL to the reference |",
            "|---|---|---|---|",
        ]
        for m in sorted({row["stage"] for row in train_rows}):
            rows = [row for row in train_rows if row["stage"] == m]
            lines.append(
                f"| {m} | {np.mean([r['reward'] for r in rows]):.3f} | "
                f"{np.mean([r['frac_reward_zero_std'] for r in rows]):.2f} | "
                f"{np.mean([r['kl'] for r in rows]):.4f} |"
            )

    # Selection per stage: composition and pass rates of the selected prompts vs the pool
    lines += [
        "",
        "## Selection per stage",
        "",
        "![selection](selection.png)",
        "",
        f"pass-rate bins: {', '.join(PASS_RATE_BINS)} "
        "(offline pass rate of the K behaviour responses)",
        "",
        "| stage | selected | " + " | ".join(skills) + " | pass-rate histogram (selected) |",
        "|---" * (len(skills) + 3) + "|",
        f"| pool | {len(pool)} | "
        + " | ".join(str(sum(s == k for s in skill_of.values())) for k in skills)
        + f" | {list(pass_rate_histogram(np.array(list(pool_pass.values()))).values())} |",
    ]
    composition = []
    for m in range(args.stages):
        subset_path = out_dir / f"stage_{m}" / "subset.jsonl"
        ids = [row["id"] for row in read_jsonl(subset_path)] if subset_path.exists() else []
        counts = collections.Counter(skill_of.get(i, "?") for i in ids)
        composition.append(counts)
        selected_pass = np.array([pool_pass[i] for i in ids if i in pool_pass])
        lines.append(
            f"| {m} | {len(ids)} | "
            + " | ".join(str(counts[k]) for k in skills)
            + f" | {list(pass_rate_histogram(selected_pass).values())} |"
        )
    save_stacked_bars(
        out_dir / "selection.png",
        {skill: [c[skill] for c in composition] for skill in skills},
        ylabel="selected prompts",
        title="composition of the selection",
    )

    # Time split
    collect = rollout_seconds(out_dir)
    lines += [
        "",
        "## Wall-clock time (seconds)",
        "",
        "![time](time.png)",
        "",
        f"Offline rollouts (step 0, once): {collect['train']:.0f} s for the training pool, "
        f"{collect['validation']:.0f} s for the validation sets.",
        "",
        "| stage | sketch | select | train | selection share | "
        "prompts sketched | sketch ms per prompt |",
        "|---|---|---|---|---|---|---|",
    ]
    times = [stage_seconds(out_dir, m) for m in range(args.stages)]
    for m, t in enumerate(times):
        total, prompts = sum(t.values()), sketched_prompts(out_dir, m)
        share = (t["sketch"] + t["select"]) / total if total else float("nan")
        per_prompt = f"{1000 * t['sketch'] / prompts:.0f}" if prompts else "-"
        lines.append(
            f"| {m} | {t['sketch']:.0f} | {t['select']:.0f} | {t['train']:.0f} | {share:.0%} | "
            f"{prompts or '-'} | {per_prompt} |"
        )
    selection = sum(collect.values()) + sum(t["sketch"] + t["select"] for t in times)
    whole = sum(collect.values()) + sum(sum(t.values()) for t in times)
    lines += [
        f"| all, with the rollouts | {sum(t['sketch'] for t in times):.0f} | "
        f"{sum(t['select'] for t in times):.0f} | {sum(t['train'] for t in times):.0f} | "
        f"{selection / whole if whole else float('nan'):.0%} | | |",
        "",
        "Selection share = (sketch + select) / stage time; the last row also counts the offline "
        "rollouts as selection cost. Prompts sketched: the pool's prompts with mixed rewards (the "
        "rest have a zero gradient); ms per prompt: the sketch step's whole time (start-up and "
        "validation sets included) over them. The authors' release: 44% (2776 s of 6360 s per "
        "stage, Qwen2.5-1.5B, 8 GPUs).",
    ]
    save_stacked_bars(
        out_dir / "time.png",
        {kind: [t[kind] for t in times] for kind in ("sketch", "select", "train")},
        ylabel="seconds",
        title="time per stage",
    )

    if args.compare:
        lines += compare_methods(args, out_dir, curves, targeted, times, sum(collect.values()), plt)

    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/report.md")


# Methods that read the offline rollouts of step 0 (scores or pass rates): their wall-clock time
# includes them.
OFFLINE_ROLLOUT_METHODS = ("cropi", "cropi_onpolicy", "influence_once", "learnability", "pass_rate")


def compare_methods(
    args: Args,
    out_dir: Path,
    curves: dict,
    targeted: list[str],
    times: list[dict],
    offline: float,
    plt,
) -> list[str]:
    """This run against the --compare runs: targeted curves overlaid, final accuracies, area under
    the targeted curve, the step-level and wall-clock speed-ups against full data (first step
    reaching full's final targeted accuracy), counting the offline rollouts, sketching and selection
    as this method's time."""
    runs = {
        args.method: (curves, times, offline if args.method in OFFLINE_ROLLOUT_METHODS else 0.0)
    }
    for folder in [Path(p) for p in args.compare.split(",") if p]:
        method = folder.name.removeprefix("compare_")
        other = accuracy_curves(load_metrics(folder, args.stages), targeted)
        runs[method] = (
            other,
            [stage_seconds(folder, m) for m in range(args.stages)],
            offline if method in OFFLINE_ROLLOUT_METHODS else 0.0,
        )
    steps_per_stage = max(s for s, _ in curves["targeted"]) // args.stages
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (method, (run_curves, _, _)) in enumerate(runs.items()):  # one colour per method
        for group, style in (("targeted", "-"), ("untargeted", ":")):
            if group in run_curves:
                steps, values = zip(*run_curves[group])
                ax.plot(steps, values, style, color=f"C{color}", label=f"{method}, {group}")
    every = [
        v for run_curves, _, _ in runs.values() for points in run_curves.values() for _, v in points
    ]
    ax.set(
        xlabel="GRPO step",
        ylabel="test accuracy (greedy)",
        ylim=padded_limits(every),
        title="methods on the same budget",
    )
    ax.legend(fontsize=7)
    with atomic_path(out_dir / "comparison.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    lines = [
        "",
        "## Methods on the same budget",
        "",
        "![comparison](comparison.png)",
        "",
        "| method | final targeted | final untargeted | mean targeted over the run | "
        "step speed-up vs full | wall-clock speed-up vs full | wall-clock (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    full = runs.get("full")
    for method, (run_curves, run_times, run_offline) in runs.items():
        target_curve = run_curves["targeted"]
        cells = [
            f"{target_curve[-1][1]:.3f}",
            f"{run_curves['untargeted'][-1][1]:.3f}" if "untargeted" in run_curves else "-",
            f"{area_under_curve(target_curve):.3f}",
        ]
        if full:
            goal = full[0]["targeted"][-1][1]
            reached, full_reached = (
                first_step_reaching(target_curve, goal),
                first_step_reaching(full[0]["targeted"], goal),
            )
            seconds = (
                seconds_at_step(reached, steps_per_stage, run_times, run_offline)
                if reached is not None
                else None
            )
            full_seconds = seconds_at_step(full_reached, steps_per_stage, full[1], full[2])
            wall = f"{full_seconds / seconds:.2f}" if seconds and full_seconds else "-"  # 0 s: none
            cells += [
                f"{speedup(full[0]['targeted'], target_curve):.2f}",
                "never reached" if seconds is None else wall,
            ]
        else:
            cells += ["-", "-"]
        cells.append(f"{run_offline + sum(sum(t.values()) for t in run_times):.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Speed-up: the steps (or seconds) full data needs to first reach its own final targeted "
        "accuracy, divided by those this method needs (0 / never reached: it did not get there; "
        "-: no seconds to divide, as full data is there at step 0). "
        "One seed of a small run: see bench/accel_bench.py for the experiment with several seeds "
        "and intervals.",
    ]
    return lines


if __name__ == "__main__":
    main(parse_args(Args))
