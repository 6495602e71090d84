"""Steps 1a-1b of CROPI: POPI off-policy gradients of every prompt, compressed by a sparse random projection.

  1a  POPI gradient of prompt s0 from the behaviour policy's stored responses (no re-sampling, no re-tokenising):
        g(s0) = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} * grad log pi_theta(y_{k,t} | s0, y_{k,<t}) * A_k
        rho_{k,t} = exp(log pi_theta - log beta)  at the rollout's temperature,   A_k = GRPO group advantage
      = the gradient of the surrogate  L(s0) = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} A_k  (grad rho = rho grad log pi),
      per prompt (its K responses micro-batched by a token budget), eval mode (no dropout), all parameters in
      named_parameters() order; by default (--batched-backward) many prompts share a forward+backward and hooks take
      each prompt's exact share out of every layer, G = sum_{t in prompt} delta_t x_t^T, hashed in place.
      A prompt whose K rewards are all equal has A = 0, so g = 0: no backward, a zero row, listed in zero_rows.
  1b  sparse random projection P S g: S keeps a fixed random fraction --sparse-ratio F of the d coordinates (the same
      for every prompt, file and process given --seed; default F = 1, all of them: see README), P projects to N dims:
        countsketch            sketch[h(i)] += s(i) g_i, bucket h(i) and sign s(i) drawn from (seed, i) block by block;
                               E<Sg, Sh> = <g, h>; O(d) per prompt; at F = 1 hashed in place, layer by layer
        gaussian / rademacher  the release's dense d x N matrix (N(0,1)/sqrt(N) or +-1/sqrt(N) entries), generated block
                               by block from seeds, one GEMM per block for a chunk of prompts; O(d F N) per prompt
        none                   the kept coordinates themselves (with F = 1: the exact gradient, for tests and studies)
        kronecker              many prompts per forward+backward (F = 1): a weight matrix's G = sum_t delta_t x_t^T as
                               P_out G P_in^T = sum_t (P_out delta_t)(P_in x_t)^T, k x k (the rest exact), CountSketched
  1c  (validation sets, --mean-of-rows MAX) the release's target, the mean of up to MAX sketches (seeded sample of the
      prompts with mixed rewards) as ONE sketch: P S is linear, so (1/m) sum_i P S g(s_i) = P S (1/m) sum_i g(s_i).
      --val-rollouts V --val-out V.npy (once per set) sketch them in the same run as the pool (one model load).
Reads   --model (a transformers checkpoint: the current policy pi_theta(m)) and --rollouts (collect_rollouts.py's file).
Writes  --out SKETCH.npy   [rows, proj_dim] (float32 or float16), rows in the rollouts file's order (or one: the mean)
        SKETCH.json        metadata (projector, seed, ids, zero_rows, "mean_of", ...), which select_data.py checks
        SKETCH.npy.parts/  finished chunks while running (a killed run resumes from them; not with --mean-of-rows)
torchrun --nproc_per_node=G: the chunks (or the mean's prompts, partial sketches summed) go to the processes; rank 0
writes the same file as one process. --fsdp: each process takes a share of every prompt's responses instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

import machinery as M
from common import group_advantages, read_rollouts, response_logprobs
from machinery import arg

PROJECTORS = ("countsketch", "gaussian", "rademacher", "none", "kronecker")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclasses.dataclass
class Args:
    model: str = arg("", "checkpoint of the current policy pi_theta(m) (a transformers folder)")
    rollouts: str = arg("", "offline rollouts of the behaviour policy (collect_rollouts.py's .jsonl)")
    out: str = arg("", "output SKETCH.npy; the metadata goes to SKETCH.json beside it")
    projector: str = arg("countsketch", "countsketch (O(d)) | gaussian | rademacher (the release's) | none | kronecker")
    kronecker_dim: int = arg(64, "k of --projector kronecker: P_out [k, out], P_in [k, in] (a side of <= k kept whole)")
    proj_dim: int = arg(8192, "N, the sketch width (the release: 32768); ignored by --projector none")
    sparse_ratio: float = arg(1.0, "F, the kept fraction of the coordinates (1 = all; the release's 0.1 ranks worse)")
    seed: int = arg(0, "seed of the kept-coordinate subset and of the projection (the release: 0)")
    dtype: str = arg("float32", "dtype of the stored sketch: float32 | float16")
    token_budget: int = arg(8192, "padded tokens per forward/backward micro-batch (gradients are accumulated)")
    chunk_prompts: int = arg(32, "prompts sketched together (a batched backward, or a GEMM) and saved per resume chunk")
    clip_ratio: float | None = arg(None, "min(rho A, clip(rho, 1-c, 1+c) A), PPO-style (off, as in the release)")
    gradient_checkpointing: str = arg("auto", "recompute activations in the backward: auto (on CUDA only) | on | off")
    val_rollouts: list[str] = arg([], "a validation set's rollouts, sketched first in the same run (repeatable)")
    val_out: list[str] = arg([], "output SKETCH.npy of the --val-rollouts at the same position")
    mean_of_rows: int = arg(0, "validation sets (--val-rollouts, or --rollouts alone): ONE row, the sketch of the mean "
                               "gradient of up to this many mixed-reward prompts (the release: 100); 0 = a row each")
    mean_seed: int = arg(0, "seed of the --mean-of-rows sample (= select_data.py's --seed on a per-prompt sketch)")
    batched_backward: str = arg("auto", "a chunk of prompts a backward, exact per-prompt hooks: auto | on | off")
    fsdp: str = arg("auto", "shard the model (FSDP2): auto (GPUs, weights + grads over half a card) | on | off")


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


def surrogate_backward(model, batch: list[tuple], pad_token_id: int, clip_ratio: float | None = None,
                       recording=contextlib.nullcontext()) -> None:
    """Backward of sum_k w_k (1/|y_k|) sum_t rho_{k,t} over a micro-batch of responses (group, row, k, w_k = weight
    A_k / K) of one prompt or of several (a sum of surrogates); `recording` wraps the forward (the batched hooks)."""
    with recording, M.autocast(next(model.parameters()).device):
        logprobs, mask = response_logprobs(model, *M.pair_inputs(batch), pad_token_id)
    behavior, weights = M.pair_targets(batch, logprobs)
    popi_surrogate(logprobs.float(), behavior, mask, weights, 1, clip_ratio).backward()


def response_pairs(group: int, row: dict, weight: float = 1.0) -> list[tuple]:
    """(group, row, k, weight * A_k / K) for the K responses of a prompt: their terms' weights in the surrogate."""
    advantages = group_advantages(torch.tensor(row["rewards"], dtype=torch.float32))  # A_k
    return [(group, row, k, weight * a / len(advantages)) for k, a in enumerate(advantages.tolist())]


def accumulate_prompt_gradient(model, row: dict, token_budget: int, pad_token_id: int, clip_ratio: float | None = None,
                               weight: float = 1.0, share: tuple | None = None) -> None:
    """Add weight * grad L(s0), the gradient of one prompt's POPI surrogate, into the parameters' .grad.
    share = (rank, world) of a sharded model: this process's share of the K responses (L is a sum over them)."""
    pairs = response_pairs(0, row, weight)
    for batch in M.response_batches(row, token_budget, share):
        surrogate_backward(model, [pairs[i] for i in batch], pad_token_id, clip_ratio)


# ----------------------------------------------------------------------------------------------
# 1b  Sparse random projection: every random number comes from (seed, purpose, block) -> its own generator
# ----------------------------------------------------------------------------------------------

KEEP_BLOCK = 1 << 20         # coordinates per block of the keep-mask
HASH_BLOCK = 1 << 21         # coordinates per CountSketch hash block; up to 128 blocks (1 GiB of int32) are kept
DENSE_BLOCK_FLOATS = 1 << 24  # floats per generated block of a dense matrix (64 MB in float32)


def kept_coordinates(num_coordinates: int, sparse_ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted positions of the kept coordinates: coordinate i is kept when u_i < F, u_i uniform, drawn per block.
    Depends on (d, F, seed) only, so train and validation sketches and all processes keep the same subset."""
    if sparse_ratio >= 1:
        return torch.arange(num_coordinates, device=device)
    kept = []
    for block, start in enumerate(range(0, num_coordinates, KEEP_BLOCK)):
        size = min(KEEP_BLOCK, num_coordinates - start)
        uniform = torch.rand(size, generator=M.block_generator(seed, "keep", block, device), device=device)
        kept.append(torch.nonzero(uniform < sparse_ratio).squeeze(1) + start)
    return torch.cat(kept)


@functools.lru_cache(maxsize=128)  # the same for every prompt: drawn once (drawing costs ~3 hashings on a CPU)
def countsketch_draws(seed: int, block: int, proj_dim: int, device: torch.device) -> torch.Tensor:
    """r(i) uniform in [0, 2N) for the HASH_BLOCK coordinates i of hash block `block` of the projected vector:
    bucket h(i) = r // 2 and sign s(i) = +1 if r is odd, -1 if even (independent). The whole block is drawn from
    its own generator, so h and s of coordinate i depend on (seed, i) only, for any range of coordinates."""
    generator = M.block_generator(seed, "countsketch", block, device)
    return torch.randint(0, 2 * proj_dim, (HASH_BLOCK,), generator=generator, device=device, dtype=torch.int32)


def countsketch_project(grads: torch.Tensor, proj_dim: int, seed: int) -> torch.Tensor:
    """sketch[b, h(i)] += s(i) * grads[b, i] for every row b: O(d) per row, hashes drawn once per chunk of rows."""
    out = torch.zeros(grads.shape[0], proj_dim, dtype=grads.dtype, device=grads.device)
    for block, start in enumerate(range(0, grads.shape[1], HASH_BLOCK)):
        part = grads[:, start:start + HASH_BLOCK]
        draws = countsketch_draws(seed, block, proj_dim, grads.device)[:part.shape[1]]
        out.index_add_(1, draws >> 1, part * (draws & 1).to(grads.dtype).mul_(2).sub_(1))  # h(i), s(i)
    return out


def countsketch_gradient(parameters: list[torch.nn.Parameter], proj_dim: int, seed: int) -> torch.Tensor:
    """[N] CountSketch of the flat gradient read in place, parameter by parameter: the same sketch as
    countsketch_project of the flattened vector (a sum over pieces), without ever flattening it. Signs are applied
    once at the end: halves[r] sums the g_i with r(i) = r, and sketch[h] = halves[2h + 1] - halves[2h]."""
    device = parameters[0].device
    halves = torch.zeros(2 * proj_dim, device=device)
    draws, drawn_block = None, -1
    for block, start, piece in M.gradient_pieces(parameters, HASH_BLOCK):
        if block != drawn_block:  # pieces come in flat order: each block is drawn once
            draws, drawn_block = countsketch_draws(seed, block, proj_dim, device), block
        halves.index_add_(0, draws[start:start + len(piece)], piece.float())
    return halves[1::2] - halves[0::2]


def dense_block(kind: str, seed: int, block: int, rows: int, proj_dim: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows [block*B, block*B + rows) of the dense d_kept x N matrix: N(0,1)/sqrt(N) or +-1/sqrt(N) entries."""
    generator = M.block_generator(seed, kind, block, device)
    matrix = (torch.randn(rows, proj_dim, generator=generator, device=device) if kind == "gaussian" else  # rademacher:
              torch.randint(0, 2, (rows, proj_dim), generator=generator, device=device).float().mul_(2).sub_(1))
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
# The stage: 1a then 1b for every chunk of prompts (or 1a-1c: one validation mean), each process its share
# ----------------------------------------------------------------------------------------------

class Sketcher:
    """The model and how its gradient is projected: by hooks, each .grad hashed in place, or via a kept buffer."""

    def __init__(self, args: Args, device: torch.device, rank: int = 0, world: int = 1):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.streamed = args.projector == "countsketch" and args.sparse_ratio >= 1
        buffered = not (self.streamed or args.projector == "kronecker")  # the kept coordinates copied first
        self.model, self.share = M.load_model_for_gradients(args, device, rank, world, self.streamed, buffered)
        self.parameters = [p for _, p in M.trainable_parameters(self.model)]
        self.num_params = sum(p.numel() for p in self.parameters)
        self.num_kept, self.local_kept, self.buffer = self.num_params, None, None
        self.hooks = M.batch_hooks(self.model, args, device, self.share, self.streamed, countsketch_draws, HASH_BLOCK)
        if buffered:
            kept = kept_coordinates(self.num_params, args.sparse_ratio, args.seed, device)
            self.num_kept = len(kept)
            self.local_kept = M.split_kept_by_parameter(kept, [p.numel() for p in self.parameters])
            self.buffer = torch.empty(args.chunk_prompts, self.num_kept, device=device)
        self.width = self.num_kept if args.projector == "none" else args.proj_dim
        self.pad_token_id = self.model.config.pad_token_id or 0

    def sketch_rows(self, groups: list[list[dict]], weight: float = 1.0) -> torch.Tensor:
        """[len(groups), width]: row b = P S (weight * the sum of g(s0) over the prompts s0 of groups[b]); one
        prompt per group gives P S g(s0) per prompt (a zero row when its K rewards are all equal). Sharded: this
        process's part of it (its gradient shards; averaged over the processes, hence weight x world). Hooks: one
        forward+backward per token budget of all the groups' responses; the hooks take each group's share out of
        every layer (exactly, or P_out G P_in^T for kronecker)."""
        if self.hooks:  # every response of every prompt with mixed rewards
            pairs = [pair for b, group in enumerate(groups) for row in group if not is_zero_gradient(row["rewards"])
                     for pair in response_pairs(b, row, weight)]
            self.hooks.start(len(groups))
            for batch in M.pair_batches(pairs, self.args.token_budget):
                surrogate_backward(self.model, batch, self.pad_token_id, self.args.clip_ratio,
                                   self.hooks.recording(batch))
            if isinstance(self.hooks, M.CountSketchHooks):  # each group's exact gradient, hashed already
                return self.hooks.rows()
            return countsketch_project(self.hooks.rows(), self.args.proj_dim, self.args.seed)  # kronecker's k x k
        weight = weight * self.share[1] if self.share else weight
        sketches = torch.zeros(len(groups), self.width, device=self.device) if self.streamed else None
        flat = None if self.streamed else self.buffer[:len(groups)].zero_()
        for b, group in enumerate(groups):
            self.model.zero_grad(set_to_none=True)
            mixed = [row for row in group if not is_zero_gradient(row["rewards"])]  # all K rewards equal: g = 0
            for row in mixed:
                accumulate_prompt_gradient(self.model, row, self.args.token_budget, self.pad_token_id,
                                           self.args.clip_ratio, weight, self.share)
            if mixed and self.streamed:
                sketches[b] = countsketch_gradient(self.parameters, self.args.proj_dim, self.args.seed)
            elif mixed:
                M.flatten_kept_gradient(self.parameters, self.local_kept, flat[b])
        self.model.zero_grad(set_to_none=True)
        return sketches if self.streamed else project(flat, self.args.projector, self.args.proj_dim, self.args.seed)


def sketch_file(sketcher: Sketcher, args: Args, rows: list[dict], rollouts: str, out: str, mean_of_rows: int):
    """The rows of one rollouts file -> OUT.npy + OUT.json: a row per prompt, or (mean_of_rows > 0) the mean's."""
    output, dtype = M.SketchOutput(args, sketcher, rows, rollouts, out), DTYPES[args.dtype]
    if mean_of_rows:  # 1c: (1/m) sum_i P S g(s_i) = P S (1/m) sum_i g(s_i), the processes' shares summed
        mixed = [i for i, row in enumerate(rows) if not is_zero_gradient(row["rewards"])]  # g = 0 for the rest
        sample = M.mean_of_rows_sample(mixed, mean_of_rows, args.mean_seed, rollouts)
        mean = sketcher.sketch_rows([[rows[i] for i in output.split(sample.tolist())]], weight=1 / len(sample))
        return output.write(M.all_sum(mean, sketcher.device).to(dtype).cpu().numpy(),
                            M.mean_sketch_meta(output.settings, rows, sample, mean_of_rows, args.mean_seed))
    # 1a + 1b: sketcher.sketch_rows of each chunk of prompts (each process its share), resumable
    sketch = M.sketch_in_chunks(output.store, rows, args.chunk_prompts, sketcher.sketch_rows, output.split,
                                sketcher.share, sketcher.rank, sketcher.device, dtype)
    return output.write(sketch, {**output.settings, "ids": [row["id"] for row in rows],
                                 "zero_rows": [i for i, row in enumerate(rows) if is_zero_gradient(row["rewards"])]})


def sketch_grads(args: Args) -> dict | None:
    """The validation sets first (seconds each), then --rollouts (resumable by chunks), with one model load."""
    rank, world, device = M.init_distributed()
    files = [(read_rollouts(path), path, out, args.mean_of_rows) for path, out in zip(args.val_rollouts, args.val_out)]
    files.append((read_rollouts(args.rollouts), args.rollouts, args.out, 0 if files else args.mean_of_rows))
    sketcher = Sketcher(args, device, rank, world)  # after every file was read and checked
    metas = [sketch_file(sketcher, args, *file) for file in files]  # file: (rows, path, out, mean_of_rows)
    M.finish_distributed()
    return metas[-1]


def main(args: Args) -> dict | None:
    M.check_sketch_args(args, PROJECTORS, DTYPES)
    return sketch_grads(args)


if __name__ == "__main__":
    M.run_main(main, Args)
