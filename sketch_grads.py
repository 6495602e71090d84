"""Steps 1a-1c of CROPI: POPI off-policy gradients of every prompt, compressed by a random sketch.

1a  g(s0) = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} grad log pi_theta(y_{k,t} | s0, y_{k,<t}) A_k from
    beta's stored responses (rho = pi_theta / beta per token, A_k the GRPO advantage): the gradient
    of the surrogate L(s0) below. All K rewards equal: A = 0, g = 0 (a zero row, in zero_rows).
1b  P S g: S keeps a random share F of the d coordinates (--sparse-ratio; release: 0.1, default: 1);
    P is a CountSketch to N dims: sketch[h(i)] += s(i) g_i, bucket h(i) and sign s(i) = +-1 drawn
    from (seed, i); s(i) = 0 where S drops i. --projector none: P = I, the exact gradient.
1c  --mean-of-rows M: a validation set's mean gradient over M seeded mixed-reward prompts, ONE row.
Writes --out SKETCH.npy [rows, N] (a row per prompt, in file order) + SKETCH.json (settings, ids,
zero_rows, mean_of); SKETCH.npy.parts/ while running (a killed run resumes). Under torchrun each
process takes its share of the prompts (--fsdp: of every prompt's responses).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from common import group_advantages, response_logprobs, token_budget_batches
from plumbing import distributed as dist
from plumbing.cli import DataError, arg, run_main
from plumbing.data import read_rollouts
from plumbing.files import ChunkStore, check_writable, fingerprint
from plumbing.grad_hooks import GroupGradientHooks, group_runs
from plumbing.models import block_generator, check_model, cpu_kernels, load_trainable
from plumbing.sketch_files import write_sketch

SETTINGS = ("projector", "seed", "sparse_ratio", "dtype", "chunk_prompts")  # + model, ...
AUTO_ON_OFF = Literal["auto", "on", "off"]


@dataclasses.dataclass
class Args:
    model: str = arg("", "the current policy pi_theta(m) (a transformers folder)", required=True)
    rollouts: str = arg("", "the pool's offline rollouts (collect_rollouts.py)", required=True)
    out: str = arg("", "output SKETCH.npy; its metadata goes to SKETCH.json", required=True)
    projector: Literal["countsketch", "none"] = arg("countsketch", "none: the exact gradient")
    proj_dim: int = arg(8192, "N, the sketch width (the release: 32768)", at_least=1)
    sparse_ratio: float = arg(1.0, "F in (0, 1], the kept share of coordinates (release: 0.1)")
    seed: int = arg(0, "seed of the kept coordinates and of the hash (the release: 0)")
    dtype: Literal["float32", "float16"] = arg("float32", "dtype of the stored sketch")
    token_budget: int = arg(8192, "padded tokens per forward/backward micro-batch", at_least=1)
    chunk_prompts: int = arg(32, "prompts sketched together, saved as a chunk", at_least=1)
    gradient_checkpointing: AUTO_ON_OFF = arg("auto", "recompute activations (auto: on CUDA)")
    val_rollouts: list[str] = arg([], "a validation set's rollouts, sketched in the same run")
    val_out: list[str] = arg([], "output SKETCH.npy of the --val-rollouts at the same position")
    mean_of_rows: int = arg(0, "1c: each --val-rollouts as ONE row (release: 100)", at_least=0)
    mean_seed: int = arg(0, "seed of the --mean-of-rows sample")
    batched_backward: AUTO_ON_OFF = arg("auto", "many prompts a backward (auto: when it fits)")
    fsdp: AUTO_ON_OFF = arg("auto", "shard the model (FSDP2; auto: on GPUs, when it does not fit)")


# ------------------------------------------------------ 1a  the POPI surrogate: small functions
def importance_ratio(current_logprobs, behavior_logprobs, mask) -> torch.Tensor:
    """rho_{k,t} = exp(log pi_theta - log beta) on real tokens, 0 on padding (carries the grad)."""
    return torch.exp((current_logprobs - behavior_logprobs) * mask) * mask


def popi_surrogate(current_logprobs, behavior_logprobs, mask, advantages, num_responses: int):
    """L = (1/K) sum_k (1/|y_k|) sum_t rho_{k,t} A_k over the rows given ([B, T], advantages [B]);
    K separately, so that micro-batches of one prompt's responses add up to the whole L."""
    rho = importance_ratio(current_logprobs, behavior_logprobs, mask)
    per_response = (rho * advantages[:, None] * mask).sum(dim=1) / mask.sum(dim=1)
    return per_response.sum() / num_responses


def is_zero_gradient(rewards: list[float]) -> bool:
    """All K rewards equal (or K = 1): every A_k is 0, so g(s0) = 0 exactly."""
    return len(set(rewards)) <= 1


# A term of a sum of surrogates: response k of a rollout row, prompt group b, weight w = A_k / K
Term = NamedTuple("Term", [("group", int), ("row", dict), ("k", int), ("weight", float)])


def surrogate_terms(groups: list[list[dict]], weight: float) -> list[Term]:
    """The terms of sum_{s0 in group b} weight * L(s0), for every group b; g = 0 prompts skipped."""
    terms = []
    for b, group in enumerate(groups):
        for row in (row for row in group if not is_zero_gradient(row["rewards"])):
            advantages = group_advantages(torch.tensor(row["rewards"], dtype=torch.float32))
            w = [weight * a / len(advantages) for a in advantages.tolist()]  # weight * A_k / K
            terms += [Term(b, row, k, w_k) for k, w_k in enumerate(w)]
    return terms


def surrogate(model, terms: list[Term], pad: int) -> torch.Tensor:
    """sum over the terms of w (1/|y_k|) sum_t rho_{k,t} (one temperature per micro-batch)."""
    responses = [t.row["response_ids"][t.k] for t in terms]
    inputs = ([t.row["prompt_ids"] for t in terms], responses, terms[0].row["temperature"])
    with dist.autocast(next(model.parameters()).device):
        logprobs, mask, _ = response_logprobs(model, *inputs, pad_token_id=pad)
    behavior = [x for t in terms for x in t.row["behavior_logprobs"][t.k]]  # beta, token by token
    behavior = mask.masked_scatter(mask.bool(), torch.tensor(behavior, device=mask.device))  # 0-pad
    weights = torch.tensor([t.weight for t in terms], device=logprobs.device)
    return popi_surrogate(logprobs.float(), behavior, mask, weights, num_responses=1)


def micro_batches(terms: list[Term], token_budget: int) -> list[list[Term]]:
    """By token budget in input order, one sampling temperature per micro-batch."""
    batches = []
    for temperature in dict.fromkeys(t.row["temperature"] for t in terms):
        mine = [t for t in terms if t.row["temperature"] == temperature]
        lengths = [len(t.row["prompt_ids"]) + len(t.row["response_ids"][t.k]) for t in mine]
        in_order = token_budget_batches(lengths, token_budget, longest_first=False)
        batches += [[mine[i] for i in batch] for batch in in_order]
    return batches


# --------------------------------------------------- 1b  the CountSketch, S folded into its signs
HASH_BLOCK = 1 << 21  # coordinates per block of hash draws
KEPT_DRAWS_BYTES = 2 * 2**30  # parameters' draws kept for the next prompts, up to 2 GiB in all


@functools.lru_cache(maxsize=4)  # small parameters side by side share a block
def block_draws(seed: int, block: int, proj_dim: int, sparse_ratio: float, exact: bool, device):
    """r(i) for the HASH_BLOCK coordinates i of a block: bucket h(i) = r // 2, sign s(i) = +1 if r
    is odd, -1 if even (r uniform in [0, 2N), from its own generator: it depends on (seed, i)
    only); r = 2N for a coordinate S drops (u_i >= F): sign 0. exact (P = I): r = 2i + 1."""
    first = block * HASH_BLOCK
    if exact:
        draws = torch.arange(first, first + HASH_BLOCK, device=device).mul_(2).add_(1)
    else:
        hashes = dict(generator=block_generator(seed, "countsketch", block, device), device=device)
        draws = torch.randint(0, 2 * proj_dim, (HASH_BLOCK,), dtype=torch.int64, **hashes)
    if sparse_ratio < 1:
        keep = block_generator(seed, "keep", block, device)
        uniform = torch.rand(HASH_BLOCK, generator=keep, device=device)
        draws[uniform >= sparse_ratio] = 2 * proj_dim  # the slot of dropped coordinates
    return draws


class CountSketch:
    """P S of each group's gradient, added piece by piece: halves[b, r] sums group b's g_i with
    r(i) = r, and sketch[b, h] = halves[b, 2h + 1] - halves[b, 2h] (the signs applied once)."""

    def __init__(self, parameters, args: Args, device: torch.device):
        exact = args.projector == "none"  # P = I
        sizes = [p.numel() for p in parameters]
        self.width = sum(sizes) if exact else args.proj_dim
        self.offset = {id(p): int(o) for p, o in zip(parameters, np.cumsum([0] + sizes))}
        self.hash = dict(seed=args.seed, proj_dim=self.width, sparse_ratio=args.sparse_ratio)
        self.hash |= dict(exact=exact, device=device)  # block_draws' settings
        self.device, self.kept = device, {}

    def draws(self, p) -> torch.Tensor:
        """The draws r(i) of p's coordinates, in p's flat layout, int64 (index_add_ is fastest with
        them); kept while KEPT_DRAWS_BYTES allow, since drawing costs about three times hashing."""
        if id(p) in self.kept:
            return self.kept[id(p)]
        first, count = self.offset[id(p)], p.numel()
        blocks = range(first // HASH_BLOCK, (first + count - 1) // HASH_BLOCK + 1)
        drawn = torch.cat([block_draws(block=b, **self.hash) for b in blocks])
        draws = drawn[first % HASH_BLOCK :][:count]  # from p's first coordinate in its first block
        if draws.nbytes + sum(kept.nbytes for kept in self.kept.values()) <= KEPT_DRAWS_BYTES:
            self.kept[id(p)] = draws = draws.clone()  # not a view: the blocks are not all kept
        return draws

    def start(self, groups: int) -> None:
        self.halves = torch.zeros(groups, 2 * self.width + 1, device=self.device)

    def add(self, groups: list[int] | None, p, values: torch.Tensor, rows=None) -> None:
        """The groups' (None: every group's) shares of p's gradient, values [len(groups), ...]:
        each shaped like p, or p's rows `rows`; a stretch of consecutive groups at once."""
        draws = self.draws(p) if rows is None else self.draws(p).view(p.shape[0], -1)[rows]
        groups = range(len(self.halves)) if groups is None else groups
        values, draws = values.reshape(len(groups), -1), draws.reshape(-1)
        for offset, at in group_runs([g - i for i, g in enumerate(groups)]):  # id - position
            self.halves[offset + at.start : offset + at.stop].index_add_(1, draws, values[at])

    def rows(self) -> torch.Tensor:
        return self.halves[:, 1 : 2 * self.width : 2] - self.halves[:, 0 : 2 * self.width : 2]


# ------------------------------------------------ the stage: 1a + 1b for groups of prompts at once
class Sketcher:
    """The policy, its CountSketch and (batched backward) the hooks that feed it every layer."""

    def __init__(self, args: Args, device: torch.device, rank: int, world: int):
        self.args, self.device, self.rank, self.world, self.hooks = args, device, rank, world, None
        plan = dict(token_budget=args.token_budget, flags="--token-budget, or use --fsdp on")
        plan |= dict(world=world, fsdp=args.fsdp, checkpointing=args.gradient_checkpointing)
        # eval mode, or train mode with gradient checkpointing (dropout off either way)
        self.model, sharded, checkpointing = load_trainable(args.model, device, "sketch", **plan)
        self.share = (rank, world) if sharded else None
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.sketch = CountSketch(self.parameters, args, device)
        if args.batched_backward == "on" and sharded:
            raise DataError("--batched-backward on: not with a sharded model (--fsdp)")
        # auto: not sharded, nor with checkpointing (CUDA's default), whose memory hooks would undo
        on = args.batched_backward == "on"
        if on or (args.batched_backward == "auto" and not sharded and not checkpointing):
            self.hooks = GroupGradientHooks.attach(self.model, self.sketch, required=on)
        self.pad_token_id = self.model.config.pad_token_id or 0

    def sketch_groups(self, groups: list[list[dict]], weight: float = 1.0) -> torch.Tensor:
        """[len(groups), N]: row b = P S (weight * sum of g(s0) over the prompts s0 of groups[b]);
        sharded: this process's part (its responses, averaged over processes: weight x world)."""
        self.sketch.start(len(groups))
        if self.hooks:  # one forward+backward per token budget of all the groups' responses
            self.hooks.start(len(groups))
            for batch in micro_batches(surrogate_terms(groups, weight), self.args.token_budget):
                row_ids = [(t.row["prompt_ids"], t.row["response_ids"][t.k]) for t in batch]
                with self.hooks.recording([t.group for t in batch], row_ids):
                    loss = surrogate(self.model, batch, self.pad_token_id)
                loss.backward()
            self.hooks.finish()
            return self.sketch.rows()
        terms = surrogate_terms(groups, weight * (self.share[1] if self.share else 1))
        for b in range(len(groups)):  # a backward per group, then its .grad sketched in place
            mine = [t for t in terms if t.group == b]
            if self.share:  # its share; as many terms (pads of weight 0) and passes as the others
                mine += [t._replace(weight=0.0) for t in mine[:1]] * (-len(mine) % self.share[1])
                mine = dist.shard(mine, *self.share)
            batches = micro_batches(mine, self.args.token_budget)
            for batch in dist.equal_pass_count(batches) if self.share else batches:
                surrogate(self.model, batch, self.pad_token_id).backward()
            for p in (p for p in self.parameters if p.grad is not None):
                self.sketch.add([b], p, *dist.local_rows(p.grad))  # its values, their rows
            self.model.zero_grad(set_to_none=True)
        return self.sketch.rows()


def sketch_file(sketcher: Sketcher, rows: list[dict], rollouts: str, out: str, mean_of_rows: int):
    """One rollouts file -> OUT.npy + OUT.json: a row per prompt, or (mean_of_rows) the mean's.
    Each process takes its share of the prompts; sharded (FSDP), every process all of them."""
    args, rank, sharded, world = sketcher.args, sketcher.rank, bool(sketcher.share), sketcher.world
    if sharded and min(len(row["response_ids"]) for row in rows) < world:
        raise DataError(f"{rollouts}: a prompt has fewer responses than the {world} processes")
    settings = {key: getattr(args, key) for key in SETTINGS} | fingerprint([args.model, rollouts])
    settings |= dict(model=str(Path(args.model).resolve()), rollouts=str(Path(rollouts).resolve()))
    settings |= dict(rows=len(rows), num_params=sum(p.numel() for p in sketcher.parameters))
    settings["proj_dim"], settings["rng_device"] = sketcher.sketch.width, sketcher.device.type
    to_numpy = lambda sketch: sketch.to(getattr(torch, args.dtype)).cpu().numpy()  # noqa: E731
    if mean_of_rows:  # 1c: (1/m) sum_i P S g(s_i) = P S (1/m) sum_i g(s_i), parts of all processes
        sample = mean_sample(rows, mean_of_rows, args.mean_seed, rollouts)
        mine = sample if sharded else dist.shard(sample, rank, world)
        mean = sketcher.sketch_groups([[rows[i] for i in mine]], weight=1 / len(sample))
        mean = to_numpy(dist.all_sum(mean, sketcher.device))
        mean_of = dict(rows=sample, ids=[rows[i]["id"] for i in sample], count=len(sample))
        mean_of |= dict(max_rows=mean_of_rows, seed=args.mean_seed, rollouts_rows=len(rows))
        meta = settings | dict(rows=1, ids=["mean"], zero_rows=[], mean_of=mean_of)
        return write_sketch(out, mean, meta | cpu_kernels()) if rank == 0 else None
    # 1a + 1b, a chunk of prompts at a time, resumable
    chunks = [rows[i : i + args.chunk_prompts] for i in range(0, len(rows), args.chunk_prompts)]

    def sketch_part(c: int) -> np.ndarray:
        part = sketcher.sketch_groups([[row] for row in chunks[c]])
        return to_numpy(dist.all_sum(part, sketcher.device) if sharded else part)

    store = ChunkStore(f"{out}.parts", settings)
    parts = dist.run_chunks(store, len(chunks), sketch_part, rank=rank, world=world, shared=sharded)
    if rank != 0:
        return None
    zero_rows = [i for i, row in enumerate(rows) if is_zero_gradient(row["rewards"])]
    meta = settings | dict(ids=[r["id"] for r in rows], zero_rows=zero_rows) | cpu_kernels()
    write_sketch(out, np.concatenate(parts), meta)
    store.remove()
    return meta


def mean_sample(rows: list[dict], max_rows: int, seed: int, rollouts: str) -> list[int]:
    """1c: up to max_rows of the prompts with mixed rewards (the others have g = 0), seeded."""
    mixed = np.array([i for i, row in enumerate(rows) if not is_zero_gradient(row["rewards"])])
    if len(mixed) == 0:
        raise DataError(f"--mean-of-rows: no prompt of {rollouts} has mixed rewards (every g is 0)")
    if len(mixed) > max_rows:
        mixed = np.random.default_rng(seed).choice(mixed, size=max_rows, replace=False)
    return sorted(int(i) for i in mixed)


def main(args: Args) -> dict | None:
    """The validation sets first (seconds each), then --rollouts, with one model load."""
    outs = {args.out, *args.val_out}
    if len(args.val_rollouts) != len(args.val_out) or len(outs) <= len(args.val_out):
        raise DataError("give one --val-out per --val-rollouts, each a file of its own")
    if not 0 < args.sparse_ratio <= 1:
        raise DataError(f"--sparse-ratio must be in (0, 1], got {args.sparse_ratio}")
    vocabulary = check_model(args.model)  # token ids must be below it
    check_writable(*outs)
    val_files = [(read_rollouts(path, vocabulary), path) for path in args.val_rollouts]
    pool = read_rollouts(args.rollouts, vocabulary)  # all read and checked before the model loads
    rank, world, device = dist.init_distributed()
    sketcher = Sketcher(args, device, rank, world)
    for (rows, path), out in zip(val_files, args.val_out):
        sketch_file(sketcher, rows, path, out, mean_of_rows=args.mean_of_rows)
    pool_mean = 0 if val_files else args.mean_of_rows  # --rollouts alone may be a validation set
    meta = sketch_file(sketcher, pool, args.rollouts, args.out, mean_of_rows=pool_mean)
    dist.finish_distributed()
    return meta


if __name__ == "__main__":
    run_main(main, Args)
