"""Rollout throughput of collect_rollouts.py's two backends (transformers generate and vLLM) on one
model.

Runs collect_rollouts.py as a user would (a subprocess per backend, same prompts, same settings) and
reports: tokens/s of the sampling calls alone (from OUT.summary.json), and end-to-end wall time
including imports, model loading / engine start-up and the behaviour log-prob pass.

Reads:  --model, --data (the first --prompts rows are used).
Writes: --out (a .json with one entry per backend) and prints a markdown table; scratch files go to
--work-dir.
Usage:  python bench/rollout_bench.py --model demo/model --data demo/data/train.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plumbing.cli import arg, parse_args  # noqa: E402
from plumbing.data import read_jsonl  # noqa: E402
from plumbing.files import write_json, write_jsonl  # noqa: E402


@dataclasses.dataclass
class Args:
    model: str = arg("demo/model", "model to sample from (HF folder)")
    data: str = arg("demo/data/train.jsonl", "data file; its first --prompts rows are used")
    prompts: int = arg(200, "prompts per backend")
    k: int = arg(8, "responses per prompt")
    temperature: float = arg(0.5, "sampling temperature")
    max_new_tokens: int = arg(2048, "longest response (the model's context length caps it too)")
    backends: list[str] = arg(
        ["hf", "vllm", "vllm-eager"],
        "backends to measure (vllm-eager = vllm with --vllm-enforce-eager); repeat the flag",
    )
    vllm_kv_cache_gib: float = arg(
        1.0, "vLLM KV-cache size in GiB (on a CPU machine it comes out of the RAM)"
    )
    out: str = arg("bench/rollout_bench.json", "results file")
    work_dir: str = arg("", "folder for the scratch rollouts (default: a temporary folder)")


def run_backend(args: Args, backend: str, data: Path, work: Path) -> dict:
    out = work / f"rollouts_{backend}.jsonl"
    for stale in work.glob(f"{out.name}*"):
        stale.unlink()
    command = [
        sys.executable,
        str(ROOT / "collect_rollouts.py"),
        "--model",
        args.model,
        "--data",
        str(data),
        "--out",
        str(out),
        "--k",
        str(args.k),
        "--temperature",
        str(args.temperature),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--backend",
        backend.removesuffix("-eager"),
        "--vllm-kv-cache-gib",
        str(args.vllm_kv_cache_gib),
    ]
    if backend.endswith("-eager"):
        command.append("--vllm-enforce-eager")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: {backend} backend failed:\n{result.stderr[-3000:]}")
    summary = json.loads(out.with_name(f"rollouts_{backend}.summary.json").read_text())
    return {
        "backend": backend,
        "prompts": summary["prompts"],
        "responses": summary["prompts"] * args.k,
        "tokens_generated": summary["tokens_generated"],
        "sampling_seconds": summary["sampling_seconds_this_run"],
        "sampling_tokens_per_second": summary["tokens_per_second"],
        "wall_seconds": round(wall, 1),
        "wall_tokens_per_second": round(summary["tokens_generated"] / wall, 1),
        "mean_pass_rate": summary["mean_pass_rate"],
    }


def main(args: Args) -> None:
    rows = read_jsonl(args.data)[: args.prompts]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        data = work / "bench_prompts.jsonl"
        write_jsonl(data, rows)
        results = [run_backend(args, backend, data, work) for backend in args.backends]
    write_json(
        args.out,
        {
            "model": args.model,
            "data": args.data,
            "k": args.k,
            "temperature": args.temperature,
            "results": results,
        },
    )
    print(
        "| backend | prompts x K | tokens | sampling s | sampling tok/s | wall s (incl. start-up) "
        "| wall tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['backend']} | {r['prompts']} x {args.k} | {r['tokens_generated']} | "
            f"{r['sampling_seconds']} | {r['sampling_tokens_per_second']} | {r['wall_seconds']} | "
            f"{r['wall_tokens_per_second']} |"
        )


if __name__ == "__main__":
    main(parse_args(Args))
