"""Peak resident memory of the three long-sequence passes, for a model shaped like Qwen2.5
(vocabulary 151,936).

The vocabulary is what makes long responses expensive: the logits of one micro-batch of 16,384
tokens are 16,384 x 151,936 floats (10 GB in float32). The body of the model here is tiny (Qwen2, 2
layers, width 64, random weights, a locally made word-level tokenizer of 151,936 entries), so the
figures show the cost of the LM head and of the pipeline around it, not of a real body. For every
response length L (--lengths), each in a fresh child process:
  collect: collect_rollouts.py's log-prob pass (common.batched_logprobs at its default
           --logprob-token-budget) on 2 prompts x 8 responses of L random tokens; the child writes
           them as a rollouts file (collect_rollouts.py's schema) with rewards 1,0,1,0,... (mixed,
           so that the sketch does its backward passes);
  sketch:  sketch_grads.py at its defaults on that file;
  grpo:    one grpo_train.py step, --batch-prompts 2 --group-size 4 --max-new-tokens L --backend hf,
           at its default micro-batching (a random model seldom samples <eos>: responses run to
           about L tokens).
The peak is the child's own VmHWM (its resident high-water mark); ru_maxrss would not do, since
Linux carries the parent's mark into a forked child. Each child runs under an address-space limit
(--limit-gb) so that a regression fails instead of exhausting the machine. One thread (--threads),
fixed seeds.

Writes bench/results/memory_bench.json (a finished point is kept and not rerun while the setup is
unchanged), memory_bench.md and memory_bench.png (peak against L).
Usage: python bench/memory_bench.py         (L = 256 512 1024 2048: about 10 minutes on 2 cores)
       python bench/memory_bench.py --lengths 256 512
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plumbing.cli import DataError, arg, run_main  # noqa: E402
from plumbing.files import write_jsonl  # noqa: E402
from plumbing.memory_plan import GIB, count_parameters, memory_plan  # noqa: E402

STAGES = ("collect", "sketch", "grpo")
QWEN_VOCAB = 151_936  # Qwen2.5's vocabulary (embedding rows)


@dataclasses.dataclass
class Args:
    lengths: list[int] = arg([256, 512, 1024, 2048], "response lengths L (tokens)")
    stages: list[str] = arg(list(STAGES), "passes to measure: collect, sketch, grpo")
    vocab_size: int = arg(QWEN_VOCAB, "vocabulary of the model (Qwen2.5: 151,936)")
    threads: int = arg(1, "torch threads of every child (OMP_NUM_THREADS)")
    limit_gb: float = arg(
        12.0, "address-space limit of every child, GB (RLIMIT_AS; virtual, not resident)"
    )
    work: str = arg(
        str(ROOT / "bench" / ".cache" / "memory_bench"), "folder of the model and the files"
    )
    results: str = arg(str(ROOT / "bench" / "results"), "folder of the result files")
    seed: int = arg(0, "seed of the model weights, the responses and the GRPO step")


# ----------------------------------------------------------------------------------------------
# The Qwen-shaped model and its inputs
# ----------------------------------------------------------------------------------------------


def build_qwen_shaped_model(folder: Path, vocab_size: int = QWEN_VOCAB, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Qwen2 (tied embeddings, as Qwen2.5-1.5B) with `vocab_size` words and
    random weights.

    Tokenizer: word level, <pad> = 0, <eos> = 1, <unk> = 2, one token per printable character, then
    filler words "<w3>", "<w4>", ... up to vocab_size entries (no chat template: prompts use the
    plain template).
    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").exists():
        return folder
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    vocab |= {f"<w{i}>": i for i in range(len(vocab), vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


QUESTIONS = ("What is 12 + 30?", "What is 7 times 6?")


def write_data(path: Path) -> Path:
    """The two prompts of the GRPO step and of the rollouts (generic rows id/prompt/answer)."""
    write_jsonl(
        path, [{"id": f"q{i}", "prompt": q, "answer": "42"} for i, q in enumerate(QUESTIONS)]
    )
    return path


def collect_point(model_dir: str, data: str, out: str, length: int, k: int, seed: int) -> None:
    """Child of the collect point: K random responses of `length` tokens per prompt, their
    behaviour log-probs by collect_rollouts.py's pass (common.batched_logprobs) at its default
    token budget, written as a rollouts file."""
    import torch

    import collect_rollouts
    import common
    from plumbing.data import load_examples
    from plumbing.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir, torch.device("cpu")).eval()
    rows = load_examples(data)
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = [
        common.encode_prompt(tokenizer, common.format_prompt(tokenizer, r["prompt"])) for r in rows
    ]
    responses = [
        [
            torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
            for _ in range(k)
        ]
        for _ in rows
    ]
    prompts, flat_responses = (
        [p for p in prompt_ids for _ in range(k)],
        [r for g in responses for r in g],
    )
    lengths = [len(p) + len(r) for p, r in zip(prompts, flat_responses)]
    batches = common.token_budget_batches(lengths, collect_rollouts.Args().logprob_token_budget)
    flat = common.batched_logprobs(
        model, prompts, flat_responses, 1.0, tokenizer.pad_token_id, batches
    )
    write_jsonl(
        out,
        [
            {
                "id": row["id"],
                "prompt": row["prompt"],
                "answer": row["answer"],
                "prompt_ids": prompt,
                "response_ids": group,
                "responses": tokenizer.batch_decode(group),
                "behavior_logprobs": [lp.tolist() for lp in flat[n * k : (n + 1) * k]],
                "rewards": [float(j % 2 == 0) for j in range(k)],
                "temperature": 1.0,
            }
            for n, (row, prompt, group) in enumerate(zip(rows, prompt_ids, responses))
        ],
    )


# ----------------------------------------------------------------------------------------------
# One measured child process
# ----------------------------------------------------------------------------------------------

# Prints the child's own resident high-water mark when it exits.
REPORT_PEAK = (
    "import atexit, re, sys\n"
    "atexit.register(lambda: print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+) kB', "
    "open('/proc/self/status').read()).group(1), flush=True))\n"
)


def child_peak(code: str, argv: list[str], threads: int, limit_gb: float) -> dict:
    """Run `python -c code argv...` (code sees sys.argv = ["-c", *argv]); its peak resident
    memory and wall time."""
    limit = int(limit_gb * 1e9)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", REPORT_PEAK + code, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    seconds = time.perf_counter() - start
    found = re.findall(r"PEAK_KB (\d+)", result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"child {argv} failed (exit {result.returncode}; address space limited to "
            f"{limit_gb} GB):\n{result.stderr[-3000:]}"
        )
    return {"peak_rss_gb": round(int(found[-1]) * 1024 / 1e9, 3), "wall_seconds": round(seconds, 1)}


def run_script_code(script: str) -> str:
    """Child code that runs one of the project's scripts as `python script argv...`."""
    return (
        f"import runpy\nsys.argv = [{str(ROOT / script)!r}] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )


def measure(stage: str, length: int, model_dir: Path, work: Path, args: Args) -> dict:
    """Peak memory of one pass at response length `length` (the collect point writes the sketch
    point's input)."""
    data, rollouts = work / "data.jsonl", work / f"rollouts_{length}.jsonl"
    if stage == "collect":
        code = "import memory_bench\n"
        code += "memory_bench.collect_point(*sys.argv[1:4], *map(int, sys.argv[4:]))\n"
        return child_peak(
            code,
            [str(model_dir), str(data), str(rollouts), str(length), "8", str(args.seed)],
            args.threads,
            args.limit_gb,
        )
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        if stage == "sketch":
            if not rollouts.exists():
                measure("collect", length, model_dir, work, args)
            argv = [
                "--model",
                str(model_dir),
                "--rollouts",
                str(rollouts),
                "--out",
                f"{scratch}/sketch.npy",
            ]
            return child_peak(run_script_code("sketch_grads.py"), argv, args.threads, args.limit_gb)
        argv = [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            f"{scratch}/ckpt",
            "--steps",
            "1",
            "--batch-prompts",
            "2",
            "--group-size",
            "4",
            "--max-new-tokens",
            str(length),
            "--backend",
            "hf",
            "--save-every",
            "0",
            "--seed",
            str(args.seed),
        ]
        point = child_peak(run_script_code("grpo_train.py"), argv, args.threads, args.limit_gb)
        metrics = json.loads(Path(f"{scratch}/ckpt.metrics.jsonl").read_text().splitlines()[-1])
        return point | {"response_length_mean": metrics["completions/mean_length"]}


# ----------------------------------------------------------------------------------------------
# Results: resumable json, markdown, plot
# ----------------------------------------------------------------------------------------------


def load_results(path: Path, setup: dict) -> dict:
    """The cached results when they were made with this setup, else a fresh record."""
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("setup") == setup:
            return cached
        print(f"{path}: made with another setup; measuring again")
    return {"setup": setup, "points": {}}


def memory_plans(model_dir: Path, length: int) -> dict:
    """plumbing.memory_plan of each pass as it runs on a CPU here at response length `length`
    (without the margin, 5% of whatever memory the machine has available): collect's log-prob pass
    and the sketch at their scripts' token budgets, GRPO's step (B x G = 8 sequences, hf) at the
    most tokens a pass holds and generate()'s KV cache of its 8 sequences."""
    from transformers import AutoConfig

    import collect_rollouts
    import common
    import grpo_train
    import sketch_grads
    from plumbing.memory_plan import pass_tokens
    from plumbing.models import load_tokenizer

    config, tokenizer = AutoConfig.from_pretrained(model_dir), load_tokenizer(str(model_dir))
    prompt = max(
        len(common.encode_prompt(tokenizer, common.format_prompt(tokenizer, q))) for q in QUESTIONS
    )
    num_params, grpo = count_parameters(config), grpo_train.Args()
    step_tokens = 8 * (prompt + length)  # the step's 2 prompts x 4 responses
    settings = {
        "collect": dict(token_budget=collect_rollouts.Args().logprob_token_budget),
        "sketch": dict(token_budget=sketch_grads.Args().token_budget),
        "grpo": dict(
            token_budget=pass_tokens(grpo.micro_batch_tokens, 8, prompt + length),
            generation_tokens=step_tokens,
        ),
    }
    plans = {}
    for stage, setting in settings.items():
        cpu = dict(checkpointing=False, device_type="cpu", card_gib=0.0)  # "auto" on a CPU: off
        plan = memory_plan(config, num_params, stage, **setting, **cpu)
        parts = {k: v for k, v in plan.items() if k not in ("total", "margin")}
        plans[stage] = {"token_budget": setting["token_budget"], "total": plan["total"]}
        plans[stage] |= {"length": length, "parts": parts}
    return plans


def markdown_report(results: dict) -> str:
    setup, points = results["setup"], results["points"]
    lengths = sorted({p["length"] for p in points.values()})
    lines = [
        "# Peak resident memory against response length",
        "",
        f"Model: Qwen2 shape with a {setup['vocab_size']:,}-word vocabulary, 2 layers, width 64, "
        f"random weights; {setup['threads']} thread(s), CPU. Peak = the child process's VmHWM, GB "
        "(1e9 bytes).",
        "",
        "| pass | " + " | ".join(f"L = {n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    labels = {
        "collect": "collect: behavior_logprobs, 2 x 8 responses",
        "sketch": "sketch_grads.py (defaults), 2 x 8 responses",
        "grpo": "grpo_train.py, one step, 2 x 4 samples",
    }
    for stage in STAGES:
        cells = [points.get(f"{stage}@{n}") for n in lengths]
        if any(cells):
            lines.append(
                f"| {labels[stage]} | "
                + " | ".join(
                    f"{c['peak_rss_gb']:.2f} GB ({c['wall_seconds']:.0f} s)" if c else "-"
                    for c in cells
                )
                + " |"
            )
    lines += ["", "Wall time in brackets (the whole child: imports, model loading, the pass).", ""]
    if results.get("plan"):
        lines += [
            "The memory plan each stage prints on a CPU (plumbing.memory_plan, GiB, without its "
            "margin of 5% of the memory available) for this model at L = "
            f"{max(p['length'] for p in results['plan'].values())}, beside the largest peak "
            "measured here: the tokens of a pass (token budget, or GRPO's 8 sequences when "
            "fewer), float32 activations, generate()'s KV cache (grpo), one float32 logit chunk "
            "and 1 GiB for the interpreter and its libraries. Memory follows the token budget.",
            "",
            "| pass | token budget | plan, GiB | largest peak measured, GiB |",
            "|---|---|---|---|",
        ]
        for stage, plan in results["plan"].items():
            peaks = [p["peak_rss_gb"] for p in points.values() if p["stage"] == stage]
            if peaks:
                lines.append(
                    f"| {stage} | {plan['token_budget']:,} | {plan['total']:.2f} "
                    f"({', '.join(f'{k} {v:.2f}' for k, v in plan['parts'].items() if v)}) | "
                    f"{max(peaks) * 1e9 / GIB:.2f} |"
                )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for stage in STAGES:
        found = sorted(
            (p["length"], p["peak_rss_gb"])
            for p in results["points"].values()
            if p["stage"] == stage
        )
        if found:
            axes.plot(*zip(*found), marker="o", label=stage)
    axes.axhline(3.0, color="grey", linestyle="--", linewidth=1, label="3 GB")
    lengths = sorted({p["length"] for p in results["points"].values()})
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.set_xlabel("response length L (tokens)")
    axes.set_ylabel("peak resident memory (GB)")
    axes.set_title(f"vocabulary {results['setup']['vocab_size']:,}, tiny body, CPU")
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(args: Args) -> None:
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        raise DataError(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
    work, results_dir = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_qwen_shaped_model(
        work / f"qwen_shaped_{args.vocab_size}", args.vocab_size, args.seed
    )
    write_data(work / "data.jsonl")
    path = results_dir / "memory_bench.json"
    results = load_results(
        path, {"vocab_size": args.vocab_size, "threads": args.threads, "seed": args.seed}
    )
    results["plan"] = memory_plans(model_dir, max(args.lengths))
    for length in args.lengths:
        for stage in [s for s in STAGES if s in args.stages]:
            key = f"{stage}@{length}"
            if key not in results["points"]:
                results["points"][key] = {"stage": stage, "length": length} | measure(
                    stage, length, model_dir, work, args
                )
                path.write_text(
                    json.dumps(results, indent=1) + "\n"
                )  # after every point: a kill loses one
            print(key, results["points"][key], flush=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    (results_dir / "memory_bench.md").write_text(markdown_report(results))
    plot(results, results_dir / "memory_bench.png")
    print(markdown_report(results))


if __name__ == "__main__":
    run_main(main, Args)
