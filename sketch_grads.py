"""Steps 1a-1b of CROPI: POPI off-policy gradients of every prompt, compressed by a sparse random projection.

  1a  POPI gradient of prompt s0 from the behaviour policy's stored responses (no re-sampling, no re-tokenising):
        g(s0) = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} * grad log pi_theta(y_{k,t} | s0, y_{k,<t}) * A_k
        rho_{k,t} = exp(log pi_theta - log beta)  at the rollout's temperature,   A_k = GRPO group advantage
      = the gradient of the surrogate  L(s0) = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} A_k  (grad rho = rho grad log pi),
      taken with ONE backward per prompt (its K responses micro-batched by a token budget, gradients accumulated),
      model in eval mode (no dropout), all parameters, flattened in model.named_parameters() order.
      A prompt whose K rewards are all equal has A = 0, so g = 0: no backward, a zero row, listed in zero_rows.
  1b  sparse random projection: keep a fixed random subset of the d coordinates (fraction --sparse-ratio, the same
      subset for every prompt, every file and every process given --seed), then project the kept coordinates to
      --proj-dim numbers with
        gaussian / rademacher  the release's dense matrix (entries N(0,1)/sqrt(N) or +-1/sqrt(N)), generated block by
                               block from per-block seeds and applied to a chunk of prompts at once (one GEMM per
                               block); cost O(d_kept * N) per prompt, never a d x N matrix in memory
        countsketch            each kept coordinate i is added with a random sign s(i) into one random bucket h(i):
                               sketch[h(i)] += s(i) g_i; E<Sg, Sh> = <g, h>; cost O(d_kept) per prompt; h and s are
                               drawn chunk by chunk from per-chunk seeds (no stored index per coordinate)
        none                   no projection: the kept coordinates themselves (with --sparse-ratio 1: the exact
                               full gradient, for tests and fidelity studies)
Reads   --model (a transformers checkpoint: the current policy pi_theta(m)) and --rollouts (collect_rollouts.py's file:
        prompt_ids, response_ids, behavior_logprobs, rewards, temperature are used as they are).
Writes  --out SKETCH.npy   [rows, proj_dim] (float32 or float16), rows in the rollouts file's order
        SKETCH.json        metadata (model, num_params, projector, seed, sparse_ratio, proj_dim, dtype, rows, ids,
                           zero_rows, nonfinite_rows, rollouts, ...); the selection stage compares them
        SKETCH.npy.parts/  finished chunks while running (a killed run resumes from them)
Multi-process: torchrun --nproc_per_node=G sketch_grads.py ...  shards the chunks over the processes (gloo on CPU,
nccl on CUDA); rank 0 assembles the file, the same as a single process writes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import machinery as M
from common import DataError, group_advantages, read_rollouts, response_logprobs
from machinery import arg

PROJECTORS = ("countsketch", "gaussian", "rademacher", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclasses.dataclass
class Args:
    model: str = arg("", "checkpoint of the current policy pi_theta(m) (a transformers folder)")
    rollouts: str = arg("", "offline rollouts of the behaviour policy (collect_rollouts.py's .jsonl)")
    out: str = arg("", "output SKETCH.npy; the metadata goes to SKETCH.json beside it")
    projector: str = arg("countsketch", "countsketch (fast, O(d)) | gaussian | rademacher (the release's dense "
                                        "projections, O(d*N)) | none (the kept coordinates themselves)")
    proj_dim: int = arg(8192, "N, the sketch width (the release: 32768); ignored by --projector none")
    sparse_ratio: float = arg(0.1, "F, the fraction of gradient coordinates kept before the projection (1 = all)")
    seed: int = arg(0, "seed of the kept-coordinate subset and of the projection (the release: 0)")
    dtype: str = arg("float32", "dtype of the stored sketch: float32 | float16")
    token_budget: int = arg(8192, "padded tokens per forward/backward micro-batch (gradients are accumulated)")
    chunk_prompts: int = arg(8, "prompts projected together (one GEMM per matrix block) and saved per resume chunk")
    clip_ratio: float | None = arg(None, "PPO-style clip of rho to [1-c, 1+c] inside min(rho A, clip(rho) A); "
                                         "off by default, as in the release")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward (saves GPU memory on long "
                                              "responses; dropout stays off)")


# ----------------------------------------------------------------------------------------------
# 1a  The POPI surrogate: small pure functions
# ----------------------------------------------------------------------------------------------

def importance_ratio(current_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """rho_{k,t} = exp(log pi_theta - log beta) on real tokens, 0 on padding. Carries the gradient of log pi_theta."""
    return torch.exp((current_logprobs - behavior_logprobs) * mask) * mask


def popi_surrogate(current_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor,
                   advantages: torch.Tensor, num_responses: int, clip_ratio: float | None = None) -> torch.Tensor:
    """L = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} A_k over the rows given ([B, T] tensors, advantages [B]).

    K is passed separately so that micro-batches of one prompt's responses add up to the full surrogate.
    With clip_ratio c the token term is min(rho A, clip(rho, 1-c, 1+c) A) (PPO); the release does not clip.
    """
    rho = importance_ratio(current_logprobs, behavior_logprobs, mask)
    per_token = rho * advantages[:, None]
    if clip_ratio is not None:
        clipped = rho.clamp(1 - clip_ratio, 1 + clip_ratio) * advantages[:, None]
        per_token = torch.minimum(per_token, clipped)
    per_response = (per_token * mask).sum(dim=1) / mask.sum(dim=1)
    return per_response.sum() / num_responses


def is_zero_gradient(rewards: list[float]) -> bool:
    """All K rewards equal (or K = 1): every A_k is 0, so g(s0) = 0 exactly."""
    return len(set(rewards)) <= 1


def accumulate_prompt_gradient(model, row: dict, advantages: torch.Tensor, token_budget: int, pad_token_id: int,
                               clip_ratio: float | None = None) -> None:
    """Backward of the POPI surrogate of one prompt into the parameters' .grad (zeroed first)."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    prompt, responses = row["prompt_ids"], row["response_ids"]
    lengths = [len(prompt) + len(r) for r in responses]
    for batch in M.token_budget_batches(lengths, token_budget, longest_first=False):
        with M.autocast(device):
            logprobs, mask = response_logprobs(model, [prompt] * len(batch), [responses[i] for i in batch],
                                               row["temperature"], pad_token_id)
        behavior = torch.zeros_like(logprobs)
        for j, i in enumerate(batch):
            behavior[j, :len(row["behavior_logprobs"][i])] = torch.tensor(row["behavior_logprobs"][i])
        loss = popi_surrogate(logprobs.float(), behavior, mask, advantages[batch].to(device), len(responses),
                              clip_ratio)
        loss.backward()


# ----------------------------------------------------------------------------------------------
# 1b  Sparse random projection: every random number comes from (seed, purpose, block) -> its own generator
# ----------------------------------------------------------------------------------------------

KEEP_BLOCK = 1 << 20         # coordinates per block of the keep-mask
HASH_CHUNK = 1 << 21         # kept coordinates per CountSketch hash chunk
DENSE_BLOCK_FLOATS = 1 << 24  # floats per generated block of a dense matrix (64 MB in float32)


def kept_coordinates(num_coordinates: int, sparse_ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted positions of the kept coordinates: coordinate i is kept when u_i < F, u_i uniform, drawn per block.

    Depends on (d, F, seed) only, so train and validation sketches and all processes keep the same subset.
    """
    if sparse_ratio >= 1:
        return torch.arange(num_coordinates, device=device)
    kept = []
    for block, start in enumerate(range(0, num_coordinates, KEEP_BLOCK)):
        size = min(KEEP_BLOCK, num_coordinates - start)
        uniform = torch.rand(size, generator=M.block_generator(seed, "keep", block, device), device=device)
        kept.append(torch.nonzero(uniform < sparse_ratio).squeeze(1) + start)
    return torch.cat(kept)


def countsketch_hash(seed: int, chunk: int, size: int, proj_dim: int, device: torch.device):
    """Bucket h(i) in [0, N) and sign s(i) in {-1, +1} of the `size` kept coordinates of hash chunk `chunk`."""
    # one draw r uniform in [0, 2N) per coordinate: h = r // 2 and s = +1 or -1 from the lowest bit, independent
    generator = M.block_generator(seed, "countsketch", chunk, device)
    draws = torch.randint(0, 2 * proj_dim, (size,), generator=generator, device=device)
    return draws >> 1, (draws & 1).float().mul_(2).sub_(1)


def countsketch_project(grads: torch.Tensor, proj_dim: int, seed: int) -> torch.Tensor:
    """sketch[b, h(i)] += s(i) * grads[b, i] for every row b: O(d) per row, hashes drawn once per chunk of rows."""
    out = torch.zeros(grads.shape[0], proj_dim, dtype=grads.dtype, device=grads.device)
    for chunk, start in enumerate(range(0, grads.shape[1], HASH_CHUNK)):
        part = grads[:, start:start + HASH_CHUNK]
        buckets, signs = countsketch_hash(seed, chunk, part.shape[1], proj_dim, grads.device)
        out.index_add_(1, buckets, part * signs.to(grads.dtype))
    return out


def dense_block(kind: str, seed: int, block: int, rows: int, proj_dim: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [block*B, block*B + rows) of the dense d_kept x N matrix: N(0,1)/sqrt(N) or +-1/sqrt(N) entries."""
    generator = M.block_generator(seed, kind, block, device)
    if kind == "gaussian":
        matrix = torch.randn(rows, proj_dim, generator=generator, device=device)
    elif kind == "rademacher":
        matrix = torch.randint(0, 2, (rows, proj_dim), generator=generator, device=device).float().mul_(2).sub_(1)
    else:
        raise ValueError(f"unknown dense projector {kind!r}")
    return matrix.div_(proj_dim ** 0.5).to(dtype)


def dense_project(grads: torch.Tensor, kind: str, proj_dim: int, seed: int) -> torch.Tensor:
    """grads [B, d_kept] @ P [d_kept, N], P generated block by block: one GEMM per block for all B rows."""
    block_rows = max(1, DENSE_BLOCK_FLOATS // proj_dim)
    out = torch.zeros(grads.shape[0], proj_dim, dtype=grads.dtype, device=grads.device)
    for block, start in enumerate(range(0, grads.shape[1], block_rows)):
        part = grads[:, start:start + block_rows]
        out.addmm_(part, dense_block(kind, seed, block, part.shape[1], proj_dim, grads.device, grads.dtype))
    return out


def project(grads: torch.Tensor, projector: str, proj_dim: int, seed: int) -> torch.Tensor:
    """[B, d_kept] kept coordinates -> [B, N] sketches (none: the kept coordinates themselves)."""
    if projector == "none":
        return grads.clone()
    if projector == "countsketch":
        return countsketch_project(grads, proj_dim, seed)
    return dense_project(grads, projector, proj_dim, seed)


# ----------------------------------------------------------------------------------------------
# The stage: 1a then 1b for every chunk of prompts, each process its share of the chunks
# ----------------------------------------------------------------------------------------------

class Sketcher:
    """Holds the model, the kept-coordinate positions and one preallocated [chunk, d_kept] gradient buffer."""

    def __init__(self, args: Args, device: torch.device):
        self.args, self.device = args, device
        self.model = M.load_model(args.model, device)
        self.model.eval()  # no dropout
        if args.gradient_checkpointing:  # transformers only recomputes in train mode: zero every dropout instead
            self.model.gradient_checkpointing_enable()
            self.model.train()
            M.disable_dropout(self.model)
        named = M.trainable_parameters(self.model)
        self.parameters = [p for _, p in named]
        self.num_params = sum(p.numel() for p in self.parameters)
        kept = kept_coordinates(self.num_params, args.sparse_ratio, args.seed, device)
        self.num_kept = len(kept)
        self.local_kept = M.split_kept_by_parameter(kept, [p.numel() for p in self.parameters])
        del kept
        self.width = self.num_kept if args.projector == "none" else args.proj_dim
        self.buffer = torch.empty(args.chunk_prompts, self.num_kept, device=device)
        self.pad_token_id = self.model.config.pad_token_id or 0

    def sketch_rows(self, rows: list[dict]) -> torch.Tensor:
        """[len(rows), width] sketches of the given rollout rows (zero rows for all-equal rewards)."""
        grads = self.buffer[:len(rows)]
        for b, row in enumerate(rows):
            if is_zero_gradient(row["rewards"]):  # all K rewards equal: A = 0, g = 0 exactly, skip the backward
                grads[b].zero_()
                continue
            advantages = group_advantages(torch.tensor(row["rewards"], dtype=torch.float32))  # A_k
            accumulate_prompt_gradient(self.model, row, advantages, self.args.token_budget, self.pad_token_id,
                                       self.args.clip_ratio)
            M.flatten_kept_gradient(self.parameters, self.local_kept, grads[b])
        self.model.zero_grad(set_to_none=True)
        return project(grads, self.args.projector, self.args.proj_dim, self.args.seed)




def sketch_grads(args: Args) -> dict | None:
    rank, world, device = M.init_distributed()
    rows = read_rollouts(args.rollouts)
    sketcher = Sketcher(args, device)
    store = M.ChunkStore(f"{args.out}.parts", run_settings(args, sketcher, rows))
    num_chunks = -(-len(rows) // args.chunk_prompts)
    finished = M.open_chunk_store(store, rank)
    todo = M.shard([c for c in range(num_chunks) if c not in finished], rank, world)
    for c in tqdm(todo, desc=f"sketching {len(rows)} prompts, {args.chunk_prompts} per chunk", disable=rank != 0):
        chunk_rows = rows[c * args.chunk_prompts:(c + 1) * args.chunk_prompts]
        store.save(c, sketcher.sketch_rows(chunk_rows).to(DTYPES[args.dtype]).cpu().numpy())  # 1a + 1b
    M.barrier()
    meta = assemble(args, store, rows, num_chunks) if rank == 0 else None
    M.finish_distributed()
    return meta


# ----------------------------------------------------------------------------------------------
# Plumbing of this stage: input checks, settings, the final file
# ----------------------------------------------------------------------------------------------

def check_args(args: Args) -> None:
    if not (args.model and args.rollouts and args.out):
        raise DataError("--model, --rollouts and --out are required")
    if args.projector not in PROJECTORS:
        raise DataError(f"--projector must be one of {', '.join(PROJECTORS)}, got {args.projector!r}")
    if args.dtype not in DTYPES:
        raise DataError(f"--dtype must be float32 or float16, got {args.dtype!r}")
    if not 0 < args.sparse_ratio <= 1:
        raise DataError(f"--sparse-ratio must be in (0, 1], got {args.sparse_ratio}")
    if args.proj_dim < 1 or args.chunk_prompts < 1 or args.token_budget < 1:
        raise DataError("--proj-dim, --chunk-prompts and --token-budget must be >= 1")
    if args.clip_ratio is not None and not 0 < args.clip_ratio < 1:
        raise DataError(f"--clip-ratio must be in (0, 1), got {args.clip_ratio}")


def run_settings(args: Args, sketcher: Sketcher, rows: list[dict]) -> dict:
    """What a finished chunk depends on (chunks made with other settings must not be mixed in)."""
    return {"model": str(Path(args.model).resolve()), "rollouts": str(Path(args.rollouts).resolve()),
            "num_params": sketcher.num_params, "projector": args.projector, "seed": args.seed,
            "sparse_ratio": args.sparse_ratio, "proj_dim": sketcher.width, "dtype": args.dtype,
            "rows": len(rows), "chunk_prompts": args.chunk_prompts, "clip_ratio": args.clip_ratio,
            "rng_device": sketcher.device.type, "kept_coordinates": sketcher.num_kept}


def assemble(args: Args, store: M.ChunkStore, rows: list[dict], num_chunks: int) -> dict:
    """Concatenate the chunks into OUT.npy, write OUT.json (metadata), remove the chunk store."""
    out = Path(args.out)
    sketch = np.concatenate([store.load(c) for c in range(num_chunks)])
    meta = {**store.settings, "ids": [row["id"] for row in rows],
            "zero_rows": [i for i, row in enumerate(rows) if is_zero_gradient(row["rewards"])],
            "nonfinite_rows": np.flatnonzero(~np.isfinite(sketch).all(axis=1)).tolist()}
    M.save_npy(out, sketch)
    M.write_json(out.with_suffix(".json"), meta)
    store.remove()
    print(f"wrote {out} [{meta['rows']} x {meta['proj_dim']}] ({len(meta['zero_rows'])} zero-gradient rows, "
          f"{len(meta['nonfinite_rows'])} non-finite) and {out.with_suffix('.json')}")
    return meta


def main(args: Args) -> dict | None:
    check_args(args)
    return sketch_grads(args)


if __name__ == "__main__":
    M.run_main(main, Args)
