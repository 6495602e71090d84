"""The report of one CROPI run (the last step of run_cropi.sh): report.md and PNG plots in OUT_DIR.

Reads OUT_DIR/stage_<m>/{metrics.jsonl, subset.jsonl, *.done}, OUT_DIR/rollouts/train.jsonl, and writes
OUT_DIR/metrics.jsonl (all stages' metrics in one file), OUT_DIR/report.md, accuracy.png, selection.png, time.png.
  targeted accuracy   = mean accuracy over the test sets named in --targeted (those the validation sets aim at)
  untargeted accuracy = mean over the other test sets
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np

from common import iter_jsonl, read_jsonl
from machinery import arg, atomic_path, parse_args, write_jsonl

PASS_RATE_BINS = np.linspace(0, 1, 6)  # pass-rate histogram bins: [0,.2), [.2,.4), ... [.8,1]


@dataclasses.dataclass
class Args:
    out_dir: str = arg("runs/demo", "the run folder written by run_cropi.sh")
    stages: int = arg(1, "number of stages in the run")
    targeted: str = arg("", "comma-separated test-set names (file stems) that the validation sets aim at")
    method: str = arg("cropi", "selection method of the run (for the title)")


def load_metrics(out_dir: Path, stages: int) -> list[dict]:
    rows = []
    for m in range(stages):
        path = out_dir / f"stage_{m}" / "metrics.jsonl"
        if path.exists():
            rows += [dict(row, stage=m) for _, row in iter_jsonl(path)]
    return rows


def accuracy_curves(metrics: list[dict], targeted: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{"targeted": [(step, mean acc)], "untargeted": [...], "<test set>": [...]} from the eval lines."""
    curves: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    seen_steps = set()
    for row in metrics:
        if "eval" not in row or row["step"] in seen_steps:  # stage m's final eval == stage m+1's first
            continue
        seen_steps.add(row["step"])
        accuracies = row["eval"]
        for name, value in accuracies.items():
            curves[name].append((row["step"], value))
        for group, names in (("targeted", [n for n in accuracies if n in targeted]),
                             ("untargeted", [n for n in accuracies if n not in targeted])):
            if names:
                curves[group].append((row["step"], float(np.mean([accuracies[n] for n in names]))))
    return dict(curves)


def stage_seconds(out_dir: Path, stage: int) -> dict[str, float]:
    """Wall-clock seconds of the finished steps of one stage, read from the .done markers of run_cropi.sh."""
    stage_dir = out_dir / f"stage_{stage}"
    seconds = {"sketch": 0.0, "select": 0.0, "train": 0.0}
    for marker in stage_dir.glob("*.done"):
        kind = "sketch" if marker.stem.startswith("sketch") else marker.stem
        if kind in seconds:
            seconds[kind] += float(marker.read_text().strip() or 0)
    return seconds


def pass_rate_histogram(pass_rates: list[float]) -> list[int]:
    counts, _ = np.histogram(pass_rates, bins=PASS_RATE_BINS)
    return counts.tolist()


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
    skill_of = {i: row.get("skill", row.get("source", "all")) for i, row in pool.items()}
    skills = sorted(set(skill_of.values()))

    lines = [f"# CROPI run report: {out_dir} (method {args.method}, {args.stages} stages)", ""]

    # Accuracy per step
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        steps, values = zip(*points)
        style = {"linewidth": 2.5} if name in ("targeted", "untargeted") else {"linewidth": 0.8, "alpha": 0.6}
        ax.plot(steps, values, label=name, **style)
    ax.set(xlabel="GRPO step", ylabel="test accuracy", title=f"{args.method}: accuracy per step")
    ax.legend(fontsize=7)
    with atomic_path(out_dir / "accuracy.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    lines += ["## Accuracy", "", "![accuracy](accuracy.png)", "",
              "| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    all_steps = sorted({s for points in curves.values() for s, _ in points})
    for step in all_steps:
        cells = [f"{dict(points).get(step, float('nan')):.3f}" for points in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")

    # Selection per stage: composition and pass rates of the selected prompts vs the pool
    lines += ["", "## Selection per stage", "", "![selection](selection.png)", "",
              "pass-rate bins: [0,.2), [.2,.4), [.4,.6), [.6,.8), [.8,1] (offline pass rate of the K behaviour responses)",
              "", "| stage | selected | " + " | ".join(skills) + " | pass-rate histogram (selected) |",
              "|---" * (len(skills) + 3) + "|",
              f"| pool | {len(pool)} | " + " | ".join(str(sum(s == k for s in skill_of.values())) for k in skills)
              + f" | {pass_rate_histogram(list(pool_pass.values()))} |"]
    composition = []
    for m in range(args.stages):
        subset_path = out_dir / f"stage_{m}" / "subset.jsonl"
        ids = [row["id"] for row in read_jsonl(subset_path)] if subset_path.exists() else []
        counts = collections.Counter(skill_of.get(i, "?") for i in ids)
        composition.append(counts)
        lines.append(f"| {m} | {len(ids)} | " + " | ".join(str(counts[k]) for k in skills)
                     + f" | {pass_rate_histogram([pool_pass[i] for i in ids if i in pool_pass])} |")
    save_stacked_bars(out_dir / "selection.png", {skill: [c[skill] for c in composition] for skill in skills},
                      ylabel="selected prompts", title="composition of the selection")

    # Time split
    lines += ["", "## Wall-clock time per stage (seconds)", "", "![time](time.png)", "",
              "| stage | sketch | select | train | selection share |", "|---|---|---|---|---|"]
    times = [stage_seconds(out_dir, m) for m in range(args.stages)]
    for m, t in enumerate(times):
        total = sum(t.values())
        share = (t["sketch"] + t["select"]) / total if total else float("nan")
        lines.append(f"| {m} | {t['sketch']:.0f} | {t['select']:.0f} | {t['train']:.0f} | {share:.0%} |")
    lines += ["", "Selection share = (sketch + select) / stage time. The authors' release: 44% "
              "(2776 s of 6360 s per stage, Qwen2.5-1.5B, 8 GPUs)."]
    save_stacked_bars(out_dir / "time.png", {kind: [t[kind] for t in times] for kind in ("sketch", "select", "train")},
                      ylabel="seconds", title="time per stage")

    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/report.md")


if __name__ == "__main__":
    main(parse_args(Args))
