"""Step 1g of CROPI: a short GRPO segment on the stage's selected subset, pi_theta(m) -> pi_theta(m+1).

Starting from checkpoint --model, run --steps GRPO steps on the prompts of --data and save the new checkpoint.
Every step (the order of `grpo_train` below):
  1. take B prompts of the subset (epoch-wise without replacement, seeded);
  2. sample G responses per prompt from the current policy (vLLM colocated, fed the trainer's weights; or HF);
  3. score each response 0/1 with common.reward and turn each group's rewards into advantages (common.group_advantages);
     with --dynamic-sampling (DAPO), groups whose G rewards are all equal are dropped and new prompts sampled instead;
  4. old log-probs pi_old of the sampled tokens, then --ppo-epochs passes over --mini-batches parts of the batch,
     one optimizer update each, of the clipped token-level surrogate with the k3 KL to the frozen reference model
     and an entropy bonus. The release: one epoch of one mini-batch (ratio 1: the clip never acts).

Reads:  --model, --ref-model (HF folders), --data and --eval-data (.jsonl rows id/prompt/answer).
Writes: --out (HF folder: model + tokenizer + grpo_train.json, written atomically), --metrics (one JSON line per
        step, plus eval lines {"step", "eval": {file stem: accuracy}}), --out.resume/ (every --save-every steps).

Usage: python grpo_train.py --model CKPT --ref-model INIT --data subset.jsonl --steps 100 --out NEW_CKPT
(several GPUs: torchrun --nproc_per_node=N grpo_train.py ...; each rank samples B/N prompts, DDP for the update).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from tqdm import tqdm

import common
import machinery as M
from machinery import arg


@dataclasses.dataclass
class Args:
    model: str = arg("", "checkpoint to start from, pi_theta(m) (HF folder)")
    ref_model: str = arg("", "frozen reference model of the KL term, the initial model (default: --model)")
    data: str = arg("", "training prompts of this stage (.jsonl with id, prompt, answer)")
    steps: int = arg(100, "GRPO steps E of this segment")
    out: str = arg("", "output checkpoint pi_theta(m+1) (HF folder)")
    eval_data: list[str] = arg([], "evaluation file (.jsonl); its accuracy is logged under the file's stem")
    eval_every: int = arg(0, "evaluate every N steps (0: only before and after the segment)")
    eval_at_start: bool = arg(False, "also evaluate before the first step when --step-offset > 0")
    metrics: str = arg("", "metrics .jsonl to append to (default: <out>.metrics.jsonl)")
    step_offset: int = arg(0, "added to the step numbers in the metrics, so stages concatenate into one curve")
    batch_prompts: int = arg(128, "prompts per step B (release: 128)")
    group_size: int = arg(8, "responses per prompt G (release: 8)")
    ppo_epochs: int = arg(1, "passes over each step's batch (release: 1)")
    mini_batches: int = arg(1, "optimizer updates per pass, each on a part of the prompts (release: 1)")
    lr: float = arg(1e-6, "AdamW learning rate (release: 1e-6), constant")
    weight_decay: float = arg(0.01, "AdamW weight decay (verl's default 0.01)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (verl's default 1.0)")
    kl_coef: float = arg(0.001, "coefficient of the k3 KL to the reference model (release: 0.001; 0 = no ref)")
    entropy_coef: float = arg(0.001, "coefficient of the entropy bonus (release: 0.001)")
    clip: float = arg(0.2, "PPO clip range eps of the ratio (release: 0.2); acts from the second update of a step")
    loss_agg: str = arg("token-mean", "token-mean (verl's default: mean over all tokens of the batch) or "
                                      "seq-mean-token-mean (mean per response, then over responses)")
    temperature: float = arg(1.0, "sampling temperature of the rollouts; log-probs use the same T")
    top_p: float = arg(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = arg(2048, "response length limit of the rollouts (release: 2048)")
    eval_max_new_tokens: int = arg(2048, "response length limit of the greedy evaluation")
    system_prompt: str = arg(common.DEFAULT_SYSTEM_PROMPT, "system prompt of the chat template")
    last_number_when_cut: bool = arg(False, "grade a response cut at the token limit by its last number too (the "
                                            "old rule; by default it needs an explicit \\boxed{}, #### or 'answer is')")
    backend: str = arg("auto", "rollout engine: vllm, hf (transformers generate), or auto "
                               "(vllm when importable and CUDA is present, else hf)")
    micro_batch_tokens: int = arg(16384, "padded tokens (rows x longest prompt+response) per forward/backward pass; "
                                         "sequences are grouped longest first and gradients accumulated")
    hf_generation_batch: int = arg(256, "sequences per transformers generate call (hf backend)")
    gpu_memory_utilization: float = arg(0.4, "share of GPU memory vLLM may take (the trainer uses the rest)")
    gradient_checkpointing: str = arg("auto", "recompute activations in the backward pass to save memory: on, off, "
                                              "or auto (on when training on CUDA)")
    fsdp: str = arg("auto", "shard weights, gradients and optimizer state over the processes (FSDP2): on, off, or "
                            "auto (on when a model replicated on every GPU does not fit the memory plan)")
    save_every: int = arg(50, "write the resume checkpoint <out>.resume/ every N steps (0: never)")
    seed: int = arg(0, "seed of the data order, the sampling and the update")
    dynamic_sampling: int = arg(0, "DAPO's dynamic sampling: drop groups whose G rewards are all equal and sample new "
                                   "prompts instead, in at most N sampling rounds per step (0: off, plain GRPO)")


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")

# ----------------------------------------------------------------------------------------------
# The math: small pure functions (tests/test_grpo_train.py checks them against hand-worked numbers)
# ----------------------------------------------------------------------------------------------

def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of step `step` (0-based): epoch-wise without replacement, one permutation per epoch.

    Position j = step * batch_size + i of the endless stream is example permutation_{j // N}[j % N], so the data
    order is a pure function of (seed, step) and a resumed run picks up exactly where it stopped.
    """
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
        indices.append(int(permutation[offset]))
    return indices


def dynamic_sampling(sample_round, batch_size: int, max_rounds: int) -> tuple[list, torch.Tensor, int]:
    """DAPO's dynamic sampling: keep the groups whose G rewards are not all equal (the others have A = 0, hence no
    policy gradient) and sample rounds of new prompts until batch_size groups are kept or max_rounds rounds were
    sampled; then train on fewer (on the last round if none was kept). max_rounds = 0: off, round 0 as sampled.

    sample_round(r) -> (groups, rewards [n, G]) of round r = 0, 1, ...; returns (groups, rewards, rounds sampled).
    """
    if max_rounds == 0:
        return *sample_round(0), 1
    kept, kept_rewards = [], []
    for rounds in range(1, max_rounds + 1):
        groups, rewards = sample_round(rounds - 1)
        mixed = (rewards != rewards[:, :1]).any(dim=1).tolist()
        kept += [group for group, keep in zip(groups, mixed) if keep]
        kept_rewards += [row for row, keep in zip(rewards, mixed) if keep]
        if len(kept) >= batch_size:
            break
    if not kept:
        return groups, rewards, rounds
    return kept[:batch_size], torch.stack(kept_rewards[:batch_size]), rounds


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Low-variance KL estimator k3 of KL(pi_theta || pi_ref) per token (Schulman's k3, verl's "low_var_kl").

    k3 = exp(ref - logp) - (ref - logp) - 1  >= 0, zero where pi_theta = pi_ref. As in verl, the log-ratio is
    clamped to [-20, 20] and k3 to [-10, 10] so that one extreme token cannot blow up the loss.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)


def grpo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate per token: (loss, ratio, clipped) each [B, L]; advantages [B] (one per response).

    r_t  = exp(logp_t - old_logp_t)                               (token-level importance ratio)
    loss = -min(r_t * A, clip(r_t, 1 - eps, 1 + eps) * A)          (PPO clipped objective, negated to minimise)
    clipped = 1 where the clipped term is the one taken (it then carries no gradient).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    unclipped_loss = -ratio * advantages
    clipped_loss = -torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    loss = torch.maximum(unclipped_loss, clipped_loss)
    return loss, ratio, (clipped_loss > unclipped_loss).float()


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float) -> torch.Tensor:
    """Reduce per-token values [B, L] to one number, as a SUM over this micro-batch divided by `normalizer`.

    token-mean:           sum_{i,t} v_it m_it / (tokens in the whole update batch)            (verl's default)
    seq-mean-token-mean:  sum_i [ sum_t v_it m_it / |y_i| ] / (responses in the whole update batch)
    Dividing by the whole batch's count (all micro-batches, all ranks) makes gradient accumulation and several
    processes give exactly the gradient of one big batch.
    """
    if mode == "token-mean":
        return (values * mask).sum() / normalizer
    if mode == "seq-mean-token-mean":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normalizer
    raise ValueError(f"--loss-agg must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# One optimizer update on a batch of sampled groups
# ----------------------------------------------------------------------------------------------

def micro_batches(prompt_ids: list[list[int]], response_ids: list[list[int]], token_budget: int) -> list[list[int]]:
    """Indices of each forward/backward pass: longest sequences first, rows x longest (prompt + response) <= budget
    (a longer sequence gets a pass of its own), so memory follows tokens, not a count of sequences; as many passes
    on every process (a sharded model's passes are collectives)."""
    return M.equal_pass_count(M.token_budget_batches([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)],
                                                     token_budget))


def grpo_update(model, ref_model, optimizer, prompt_ids: list[list[int]], response_ids: list[list[int]],
                advantages: torch.Tensor, args: Args, pad_token_id: int,
                old_logprobs: list[torch.Tensor] | None = None) -> dict:
    """One optimizer step of the GRPO loss on this rank's responses; returns summed statistics of the batch.

    old_logprobs: pi_old per response, taken before the step's first update; None when this is the step's only
    update (the weights have not moved since sampling, so pi_old is this very forward pass, detached: r = 1).
    `model` may be wrapped in DistributedDataParallel or sharded (FSDP2): gradients are then averaged over ranks,
    which the loss undoes by multiplying by world_size, so the result equals one process holding the whole batch.
    """
    device = next(model.parameters()).device
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    total_tokens, total_responses = M.all_sum([float(sum(len(r) for r in response_ids)), float(len(response_ids))],
                                              device)
    normalizer = total_tokens if args.loss_agg == "token-mean" else total_responses
    sums = dict(loss=0.0, pg_loss=0.0, kl=0.0, entropy=0.0, clip_fraction=0.0, ratio=0.0)
    optimizer.zero_grad(set_to_none=True)
    batches = micro_batches(prompt_ids, response_ids, args.micro_batch_tokens)
    for n, batch in enumerate(batches):
        prompts, responses = [prompt_ids[i] for i in batch], [response_ids[i] for i in batch]
        micro_advantages = advantages[batch].to(device)
        if ref_model is not None:
            with torch.no_grad(), M.autocast(device):
                ref_logprobs, _ = common.response_logprobs(ref_model, prompts, responses, args.temperature,
                                                           pad_token_id)
        with M.gradient_sync(model, now=n == len(batches) - 1):  # DDP: one all-reduce, in the last backward
            with M.autocast(device):
                logprobs, mask, entropy = common.response_logprobs(model, prompts, responses, args.temperature,
                                                                   pad_token_id, with_entropy=True)
            old = logprobs.detach() if old_logprobs is None else \
                torch.nn.utils.rnn.pad_sequence([old_logprobs[i] for i in batch], batch_first=True).to(device)
            pg_losses, ratio, clipped = grpo_token_losses(logprobs, old, micro_advantages, args.clip)
            # loss = agg(pg) + beta * agg(k3) - c_ent * agg(entropy)
            pg_loss = aggregate(pg_losses, mask, args.loss_agg, normalizer)
            loss = pg_loss - args.entropy_coef * aggregate(entropy, mask, args.loss_agg, normalizer)
            kl = torch.zeros_like(logprobs)
            if ref_model is not None:
                kl = k3_kl(logprobs, ref_logprobs)
                loss = loss + args.kl_coef * aggregate(kl, mask, args.loss_agg, normalizer)
            (loss * world_size).backward()
        sums["loss"] += loss.item()  # statistics: sums over tokens, divided by the token count by the caller
        sums["pg_loss"] += pg_loss.item()
        for name, values in (("kl", kl), ("entropy", entropy), ("clip_fraction", clipped), ("ratio", ratio)):
            sums[name] += float((values.detach() * mask).sum())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    sums["grad_norm"] = float(norm.full_tensor() if M.is_sharded(norm) else norm)
    optimizer.step()
    return sums


@torch.no_grad()
def policy_logprobs(model, prompt_ids, response_ids, args: Args, pad_token_id: int) -> list[torch.Tensor]:
    """pi_old: log-probs of every response token under the current weights, one tensor per response."""
    device, result = next(model.parameters()).device, [None] * len(response_ids)
    for batch in micro_batches(prompt_ids, response_ids, args.micro_batch_tokens):
        with M.autocast(device):
            logprobs, _ = common.response_logprobs(model, [prompt_ids[i] for i in batch],
                                                   [response_ids[i] for i in batch], args.temperature, pad_token_id)
        for row, i in zip(logprobs, batch):
            result[i] = row[:len(response_ids[i])].float().cpu()
    return result


# ----------------------------------------------------------------------------------------------
# The segment: steps 1-4 above, --steps times
# ----------------------------------------------------------------------------------------------

def grpo_train(args: Args) -> None:
    run = M.TrainingRun(args)  # processes, models, optimizer, engine, data, resume state, metrics, evaluation
    local_prompts = args.batch_prompts // run.world
    progress = tqdm(range(run.start_step, args.steps), desc="GRPO", disable=run.rank != 0, initial=run.start_step,
                    total=args.steps)
    for step in progress:
        step_start = time.perf_counter()
        # 1-2. This step's B prompts (this rank: its contiguous share), G responses each from the current policy, 0/1
        #      rewards [B, G]. Dynamic sampling's round r >= 1 draws prompts seeded by (seed, step, r) (resumable).
        def sample_round(r: int):
            indices = batch_indices(len(run.examples), args.batch_prompts, step, args.seed) if r == 0 else np.resize(
                np.random.default_rng([args.seed, step, r]).permutation(len(run.examples)), args.batch_prompts)
            return run.sample_groups(indices[run.rank * local_prompts:(run.rank + 1) * local_prompts], step, r)
        run.sync_engine()
        groups, rewards, rounds = dynamic_sampling(sample_round, local_prompts, args.dynamic_sampling)
        group_prompt_ids = [prompt for prompt, responses in groups for _ in responses]
        response_ids = [response for _, responses in groups for response in responses]
        rollout_time = time.perf_counter() - step_start

        # 3. Group advantages A_k = (r_k - mean(r)) / (std(r) + 1e-4).
        advantages = common.group_advantages(rewards).flatten()

        # 4. pi_old, then --ppo-epochs x --mini-batches updates of the clipped surrogate + k3 KL - entropy bonus.
        update_start = time.perf_counter()
        run.engine.release_memory(keep_weights=False)  # vLLM sleeps (CUDA) while the update needs the memory
        several_updates = args.ppo_epochs * args.mini_batches > 1
        old = policy_logprobs(run.model, group_prompt_ids, response_ids, args, run.pad) if several_updates else None
        parts = np.array_split(np.arange(len(groups)), args.mini_batches)  # whole groups per mini-batch
        updates = []
        for _ in range(args.ppo_epochs):
            for part in parts:
                seqs = slice(part[0] * args.group_size, (part[-1] + 1) * args.group_size)
                updates.append(grpo_update(run.trainer, run.ref_model, run.optimizer, group_prompt_ids[seqs],
                                           response_ids[seqs], advantages[seqs], args, run.pad,
                                           old[seqs] if old else None))
        run.engine_is_stale = True
        row = run.log_step(step, rewards, response_ids, updates, rollout_time, time.perf_counter() - update_start,
                           time.perf_counter() - step_start, rounds)
        progress.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}", s=f"{row['step_time_s']:.1f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            run.log_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            run.save_resume_state(step + 1)
    run.finish()


def main(args: Args) -> None:
    M.check_grpo_args(args, LOSS_AGGREGATIONS)
    if M.is_complete_checkpoint(args.out):
        M.ChunkStore(f"{args.out}.resume", {}).remove()
        print(f"{args.out} is already complete; nothing to do")
        return
    grpo_train(args)


if __name__ == "__main__":
    M.run_main(main, Args)
