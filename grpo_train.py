"""Step 1g of CROPI: a GRPO segment on the stage's selected subset, pi_theta(m) -> pi_theta(m+1).

From checkpoint --model, --steps GRPO steps on the prompts of --data; every step:
  1. B prompts of the subset (epoch-wise without replacement, seeded by (seed, step));
  2. G responses per prompt from the current policy (vLLM colocated and fed the trainer's weights,
     or transformers generate), scored 0/1 by common.reward; with --dynamic-sampling (DAPO),
     groups whose G rewards are all equal are dropped and new prompts sampled instead;
  3. group advantages A_i = (r_i - mean(r)) / (std(r) + 1e-4);
  4. --ppo-epochs passes over --mini-batches parts of the batch, one AdamW update each, of the
     clipped token-level surrogate + k3 KL to the frozen reference - entropy bonus (the release:
     one update per step, so the ratio is 1 and the clip never acts).
Reads   --model, --ref-model (HF folders), --data and --eval-data (.jsonl: id, prompt, answer).
Writes  --out (HF folder + grpo_train.json, atomically), --metrics (a JSON line per step, TRL's
        names: README "Metrics"; --report-to: live curves too); every --save-every steps the
        resume state --out.resume/ and an HF checkpoint --out-<step>/ (the last --keep-checkpoints).
Several GPUs: torchrun --nproc_per_node=N grpo_train.py ... (B/N prompts a rank; DDP or FSDP2).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

import common
from plumbing import distributed as dist
from plumbing.cli import DataError, arg, run_main
from plumbing.data import load_examples
from plumbing.files import already_done, check_writable
from plumbing.grpo_run import TrainingRun, run_settings
from plumbing.models import check_model, derive_seed

AUTO_ON_OFF = Literal["auto", "on", "off"]
TRACKERS = Literal["none", "tensorboard", "wandb", "trackio"]


@dataclasses.dataclass
class Args:
    model: str = arg("", "checkpoint to start from, pi_theta(m)", required=True)
    ref_model: str = arg("", "frozen reference of the KL term (default: --model)")
    data: str = arg("", "prompts of this stage (.jsonl: id, prompt, answer)", required=True)
    steps: int = arg(100, "GRPO steps E of this segment", at_least=0)
    out: str = arg("", "output checkpoint pi_theta(m+1) (HF folder)", required=True)
    eval_data: list[str] = arg([], "evaluation file; its accuracy is logged under its stem")
    eval_every: int = arg(0, "evaluate every N steps (0: before and after only)", at_least=0)
    eval_at_start: bool = arg(False, "also evaluate before the first step when --step-offset > 0")
    metrics: str = arg("", "metrics .jsonl to append to (default: <out>.metrics.jsonl)")
    step_offset: int = arg(0, "added to the logged steps, so that stages make one curve")
    batch_prompts: int = arg(128, "prompts per step B (release: 128)", at_least=1)
    group_size: int = arg(8, "responses per prompt G (release: 8)", at_least=2)
    ppo_epochs: int = arg(1, "passes over each step's batch (release: 1)", at_least=1)
    mini_batches: int = arg(1, "updates per pass, on parts of the batch (release: 1)", at_least=1)
    lr: float = arg(1e-6, "AdamW learning rate, constant (release: 1e-6)")
    weight_decay: float = arg(0.01, "AdamW weight decay (verl's default)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (verl's default)")
    kl_coef: float = arg(0.001, "k3 KL coefficient (release: 0.001; 0: no reference model)")
    entropy_coef: float = arg(0.001, "entropy bonus coefficient (release: 0.001)")
    clip: float = arg(0.2, "PPO clip range of the ratio (release: 0.2)")
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = arg("token-mean", "as verl's")
    temperature: float = arg(1.0, "sampling temperature; the log-probs use the same")
    top_p: float = arg(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = arg(2048, "response length limit (release: 2048)", at_least=1)
    eval_max_new_tokens: int = arg(2048, "response length limit of the evaluation", at_least=1)
    system_prompt: str = arg(common.DEFAULT_SYSTEM_PROMPT, "system prompt ('' for none)")
    last_number_when_cut: bool = arg(False, "grade a response cut at the limit by its last number")
    backend: Literal["auto", "vllm", "hf"] = arg("auto", "sampler (auto: vLLM on CUDA)")
    micro_batch_tokens: int = arg(16384, "padded tokens per forward/backward", at_least=1)
    hf_generation_batch: int = arg(256, "sequences per generate() call (hf)", at_least=1)
    gpu_memory_utilization: float = arg(0.4, "vLLM's share of GPU memory (the trainer: the rest)")
    gradient_checkpointing: AUTO_ON_OFF = arg("auto", "recompute activations (auto: on CUDA)")
    fsdp: AUTO_ON_OFF = arg("auto", "shard the model (FSDP2; auto: when replicas do not fit)")
    save_every: int = arg(50, "resume state + checkpoint every N steps (0: never)", at_least=0)
    keep_checkpoints: int = arg(1, "HF checkpoints <out>-<step>/ kept (0: none)", at_least=0)
    seed: int = arg(0, "seed of the data order, the sampling and the update")
    report_to: TRACKERS = arg("none", "live curves (TRL's report_to); tensorboard beside --metrics")
    run_name: str = arg("", "W&B/Trackio run GROUP/NAME (default: --out's folder name)")
    dynamic_sampling: int = arg(0, "DAPO: sampling rounds per step at most (0: off)", at_least=0)


# --------------------------------------------------------------------- the maths, unit-tested
def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of step `step`: position j = step * B + i of the endless stream is example
    permutation_{j // N}[j % N] (one permutation per epoch), a pure function of (seed, step)."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(np.random.default_rng([seed, epoch]).permutation(num_examples)[offset]))
    return indices


def round_indices(num_examples: int, batch_size: int, step: int, round_: int, seed: int):
    """Sampling round r of a step: round 0 its batch; round r >= 1 (dynamic sampling) a fresh
    permutation seeded by (seed, step, r), repeated to B prompts."""
    if round_ == 0:
        return batch_indices(num_examples, batch_size, step, seed)
    permutation = np.random.default_rng([seed, step, round_]).permutation(num_examples)
    return [int(permutation[i % num_examples]) for i in range(batch_size)]


def dynamic_sampling(sample_round, batch_size: int, max_rounds: int):
    """DAPO: keep the groups whose G rewards are not all equal (the others have A = 0, hence no
    gradient), sampling rounds of new prompts until batch_size are kept or max_rounds were sampled
    (then fewer; the last round if none). max_rounds = 0: off. sample_round(r) -> (groups,
    rewards [n, G]); returns (groups, rewards, rounds sampled)."""
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
    """k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 per token, verl's "low_var_kl" estimator of
    KL(pi_theta || pi_ref); the log-ratio clamped to [-20, 20] and k3 to [-10, 10] as in verl."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)


def grpo_token_losses(logprobs, old_logprobs, advantages, clip: float):
    """r_t = exp(logp_t - old_logp_t),  loss = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A);
    returns (loss, ratio, clipped) [B, L]; clipped = 1 where the clipped term is taken."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped_loss = -ratio * advantages[:, None]
    clipped_loss = -torch.clamp(ratio, 1 - clip, 1 + clip) * advantages[:, None]
    loss = torch.maximum(unclipped_loss, clipped_loss)
    return loss, ratio, (clipped_loss > unclipped_loss).float()


def aggregate(values, mask, mode: str, normalizer: float) -> torch.Tensor:
    """A SUM over this micro-batch divided by the whole update batch's count (all micro-batches,
    all ranks), so accumulation and processes give exactly the gradient of one big batch:
      token-mean:           sum_{i,t} v_it m_it / (tokens of the batch)             (verl's default)
      seq-mean-token-mean:  sum_i [sum_t v_it m_it / |y_i|] / (responses of the batch)"""
    if mode == "token-mean":
        return (values * mask).sum() / normalizer
    if mode == "seq-mean-token-mean":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normalizer
    raise ValueError(f"unknown loss aggregation {mode!r}")


def micro_batches(prompt_ids, response_ids, token_budget: int, sharded=False) -> list[list[int]]:
    """Forward/backward passes by token budget, longest first; sharded, as many on every process
    (each pass gathers the weights, a collective; DDP's come once a step, whatever the passes)."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    batches = common.token_budget_batches(lengths, token_budget)
    return dist.equal_pass_count(batches) if sharded else batches


# ------------------------------------------------------------------------- one optimizer update
def grpo_update(
    model, ref_model, optimizer, prompt_ids, response_ids, advantages, args, pad_id, old=None
):
    """One optimizer step of the GRPO loss on this rank's responses; returns summed statistics.
    old: pi_old log-probs per response, taken before the step's first update; None when this is the
    step's only update (pi_old is this very forward pass, detached: r = 1). Gradients averaged
    over the processes (DDP, FSDP) are multiplied back by their number: one big batch's gradient."""
    device, agg = next(model.parameters()).device, args.loss_agg
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    counts = [float(sum(len(r) for r in response_ids)), float(len(response_ids))]
    tokens, responses = dist.all_sum(counts, device)
    normalizer = tokens if agg == "token-mean" else responses
    statistics = ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "clip_high", "ratio")
    sums = dict.fromkeys(statistics, 0.0)
    optimizer.zero_grad(set_to_none=True)
    sharded = dist.is_sharded(next(model.parameters()))
    batches = micro_batches(prompt_ids, response_ids, args.micro_batch_tokens, sharded)
    for n, batch in enumerate(batches):
        prompts, responses = [prompt_ids[i] for i in batch], [response_ids[i] for i in batch]
        inputs = (prompts, responses, args.temperature)
        if ref_model is not None:
            with torch.no_grad(), dist.autocast(device):
                ref_logprobs = common.response_logprobs(ref_model, *inputs, pad_token_id=pad_id)[0]
        with dist.gradient_sync(model, now=n == len(batches) - 1):  # DDP: in the last backward
            with dist.autocast(device):
                logprobs, mask, entropy = common.response_logprobs(
                    model, *inputs, pad_token_id=pad_id, with_entropy=True
                )
            pi_old = logprobs.detach()  # one update per step: pi_old is this forward pass
            if old is not None:
                pi_old = torch.nn.utils.rnn.pad_sequence([old[i] for i in batch], True).to(device)
            a = advantages[batch].to(device)
            losses, ratio, clipped = grpo_token_losses(logprobs, pi_old, a, args.clip)
            # loss = agg(pg) - c_ent agg(entropy) + beta agg(k3)
            pg_loss = aggregate(losses, mask, agg, normalizer)
            loss = pg_loss - args.entropy_coef * aggregate(entropy, mask, agg, normalizer)
            kl = torch.zeros_like(logprobs)
            if ref_model is not None:
                kl = k3_kl(logprobs, ref_logprobs)
                loss = loss + args.kl_coef * aggregate(kl, mask, agg, normalizer)
            (loss * world).backward()
        sums["loss"] += loss.item()  # statistics: sums, divided by the counts when logged
        sums["pg_loss"] += pg_loss.item()
        token_values = dict(kl=kl, entropy=entropy, clip_fraction=clipped, ratio=ratio)
        token_values["clip_high"] = clipped * (a > 0)[:, None]  # r > 1 + eps (else r < 1 - eps)
        for name, values in token_values.items():
            sums[name] += float((values.detach() * mask).sum())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    sums["grad_norm"] = float(norm.full_tensor() if dist.is_sharded(norm) else norm)
    optimizer.step()
    return sums


# ------------------------------------------------------------------ sampling, scoring, the loop
def sample_round(run: TrainingRun, step: int, round_: int):
    """1-2. This rank's share of round r's prompts, G responses each from the current policy and
    their 0/1 rewards: ([(prompt ids, [G response ids])], rewards [prompts, G])."""
    args, share, g = run.args, run.args.batch_prompts // run.world, run.args.group_size
    indices = round_indices(
        len(run.examples), args.batch_prompts, step, round_=round_, seed=args.seed
    )
    rows = [run.examples[i] for i in indices[run.rank * share :][:share]]
    prompt_ids = [run.encode(row["prompt"]) for row in rows]
    # the round's j-th prompt seeded by (seed, step, round, j) only, whichever rank samples it
    seeds = [derive_seed(args.seed, step, round_, run.rank * share + j) for j in range(share)]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seeds=seeds)
    groups = run.engine.generate(prompt_ids, g, max_new_tokens=args.max_new_tokens, **sampling)
    answers = [row["answer"] for row in rows for _ in range(g)]
    rule = dict(stop_ids=run.engine.stop_ids, last_number_when_cut=args.last_number_when_cut)
    responses = [response for group in groups for response in group]
    rewards = common.score_responses(run.tokenizer, responses, answers, **rule)
    return list(zip(prompt_ids, groups)), torch.tensor(rewards).view(-1, g)


def grpo_train(args: Args) -> None:
    run = TrainingRun(args)  # processes, models, optimizer, engine, data, resume state, metrics
    evaluated_at_start = run.start_step == 0 and (args.step_offset == 0 or args.eval_at_start)
    if evaluated_at_start and (evaluation := run.evaluate()):
        run.log({"step": args.step_offset} | evaluation)
    steps = range(run.start_step, args.steps)
    progress = tqdm(steps, "GRPO", initial=run.start_step, total=args.steps, disable=run.rank > 0)
    for step in progress:
        step_start = time.perf_counter()
        # 1-2. prompts, G responses each, rewards [B, G] (dynamic sampling: more rounds)
        run.sync_engine()
        sample = functools.partial(sample_round, run, step)
        share = args.batch_prompts // run.world
        groups, rewards, rounds = dynamic_sampling(sample, share, args.dynamic_sampling)
        prompt_ids = [prompt for prompt, responses in groups for _ in responses]
        response_ids = [response for _, responses in groups for response in responses]
        rollout_time = time.perf_counter() - step_start
        # 3. A_i = (r_i - mean(r)) / (std(r) + 1e-4) per group
        advantages = common.group_advantages(rewards).flatten()
        # 4. pi_old (several updates only), then the updates
        update_start = time.perf_counter()
        run.engine.release_memory(keep_weights=False)  # vLLM sleeps (CUDA) during the update
        old = None
        if args.ppo_epochs * args.mini_batches > 1:
            batches = micro_batches(prompt_ids, response_ids, args.micro_batch_tokens, run.sharded)
            options = dict(temperature=args.temperature, pad_token_id=run.pad, batches=batches)
            old = common.batched_logprobs(run.model, prompt_ids, response_ids, **options)
        updates, models = [], (run.trainer, run.ref_model, run.optimizer)  # policy, ref., AdamW
        for _ in range(args.ppo_epochs):
            for part in np.array_split(np.arange(len(groups)), args.mini_batches):  # whole groups
                seqs = slice(part[0] * args.group_size, (part[-1] + 1) * args.group_size)
                batch = dict(prompt_ids=prompt_ids[seqs], response_ids=response_ids[seqs])
                batch |= dict(advantages=advantages[seqs], old=old[seqs] if old else None)
                updates.append(grpo_update(*models, **batch, args=args, pad_id=run.pad))
        run.engine_is_stale = True
        times = (rollout_time, time.perf_counter() - update_start, time.perf_counter() - step_start)
        row = run.log_step(step, rewards, groups, updates, times=times, rounds=rounds)
        progress.set_postfix(reward=f"{row['reward']:.3f}", s=f"{row['timing_s/step']:.1f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            run.save(step + 1)
    if args.steps == 0 and not evaluated_at_start and (evaluation := run.evaluate()):
        run.log({"step": args.step_offset} | evaluation)
    run.finish()


def main(args: Args) -> None:
    check_model(args.model)
    check_model(args.ref_model or args.model, "--ref-model")
    check_writable(args.out, args.metrics or f"{args.out}.metrics.jsonl")
    for path in [args.data, *args.eval_data]:  # every data file parsed before any model loads
        load_examples(path)
    if args.dynamic_sampling and args.mini_batches > 1:
        raise DataError("--dynamic-sampling needs --mini-batches 1 (it can keep fewer groups)")
    if args.temperature <= 0:
        raise DataError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    if already_done(f"{args.out}/grpo_train.json", run_settings(args)):
        print(f"{args.out} is already complete with these settings; nothing to do")
        return
    grpo_train(args)


if __name__ == "__main__":
    run_main(main, Args)
