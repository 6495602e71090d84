"""Step 1g of CROPI: a short GRPO segment on the stage's selected subset, pi_theta(m) -> pi_theta(m+1).

Starting from checkpoint --model, run --steps GRPO steps on the prompts of --data and save the new checkpoint.
Every step (the order of the code below):
  1. take B prompts of the subset (epoch-wise without replacement, seeded);
  2. sample G responses per prompt from the current policy (vLLM colocated with the trainer, the trainer's weights
     pushed into the engine before sampling; or transformers `generate`);
  3. score each response 0/1 with common.reward and turn each group's rewards into advantages (common.group_advantages);
  4. one update of the clipped token-level surrogate, with the k3 KL to the frozen reference model and an entropy
     bonus (see `grpo_token_losses` and `aggregate`).

Reads:  --model (HF folder), --ref-model (HF folder, the initial model), --data (.jsonl rows id/prompt/answer),
        --eval-data files (same format).
Writes: --out (HF folder: model + tokenizer + grpo_train.json, written atomically),
        --metrics (one JSON line per step, plus eval lines {"step", "eval": {file stem: accuracy}}),
        --out.resume/ (model, optimizer, RNG states and data position every --save-every steps; deleted at the end).

One process:  python grpo_train.py --model CKPT --ref-model INIT --data subset.jsonl --steps 100 --out NEW_CKPT
Several:      torchrun --nproc_per_node=N grpo_train.py ...   (each rank samples B/N prompts; DDP for the update;
              gloo on CPU, nccl on CUDA)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common


@dataclasses.dataclass
class Args:
    model: str = common.arg("", "checkpoint to start from, pi_theta(m) (HF folder)")
    ref_model: str = common.arg("", "frozen reference model of the KL term, the initial model (default: --model)")
    data: str = common.arg("", "training prompts of this stage (.jsonl with id, prompt, answer)")
    steps: int = common.arg(100, "GRPO steps E of this segment")
    out: str = common.arg("", "output checkpoint pi_theta(m+1) (HF folder)")
    eval_data: list[str] = common.arg([], "evaluation file (.jsonl); its accuracy is logged under the file's stem")
    eval_every: int = common.arg(0, "evaluate every N steps (0: only before and after the segment)")
    eval_at_start: bool = common.arg(False, "also evaluate before the first step when --step-offset > 0")
    metrics: str = common.arg("", "metrics .jsonl to append to (default: <out>.metrics.jsonl)")
    step_offset: int = common.arg(0, "added to the step numbers in the metrics, so stages concatenate into one curve")
    batch_prompts: int = common.arg(128, "prompts per step B (release: 128)")
    group_size: int = common.arg(8, "responses per prompt G (release: 8)")
    lr: float = common.arg(1e-6, "AdamW learning rate (release: 1e-6), constant")
    weight_decay: float = common.arg(0.01, "AdamW weight decay (verl's default 0.01)")
    grad_clip: float = common.arg(1.0, "clip the global gradient norm to this (verl's default 1.0)")
    kl_coef: float = common.arg(0.001, "coefficient of the k3 KL to the reference model (release: 0.001; 0 = no ref)")
    entropy_coef: float = common.arg(0.001, "coefficient of the entropy bonus (release: 0.001)")
    clip: float = common.arg(0.2, "PPO clip range eps of the ratio (release: 0.2)")
    loss_agg: str = common.arg("token-mean", "token-mean (verl's default: mean over all tokens of the batch) or "
                                             "seq-mean-token-mean (mean per response, then over responses)")
    temperature: float = common.arg(1.0, "sampling temperature of the rollouts; log-probs use the same T")
    top_p: float = common.arg(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = common.arg(2048, "response length limit of the rollouts (release: 2048)")
    eval_max_new_tokens: int = common.arg(2048, "response length limit of the greedy evaluation")
    system_prompt: str = common.arg(common.DEFAULT_SYSTEM_PROMPT, "system prompt of the chat template")
    backend: str = common.arg("auto", "rollout engine: vllm, hf (transformers generate), or auto "
                                      "(vllm when importable and CUDA is present, else hf)")
    micro_batch_size: int = common.arg(16, "sequences per forward/backward pass (gradient accumulation)")
    hf_generation_batch: int = common.arg(256, "sequences per transformers generate call (hf backend)")
    gpu_memory_utilization: float = common.arg(0.4, "share of GPU memory vLLM may take (the trainer uses the rest)")
    gradient_checkpointing: bool = common.arg(False, "recompute activations in the backward pass (saves memory)")
    save_every: int = common.arg(50, "write the resume checkpoint <out>.resume/ every N steps (0: never)")
    seed: int = common.arg(0, "seed of the data order, the sampling and the update")


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

    token-mean:           sum_{i,t} v_it m_it / (tokens in the whole step batch)            (verl's default)
    seq-mean-token-mean:  sum_i [ sum_t v_it m_it / |y_i| ] / (responses in the whole step batch)
    Dividing by the whole batch's count (all micro-batches, all ranks) makes gradient accumulation and several
    processes give exactly the gradient of one big batch.
    """
    if mode == "token-mean":
        return (values * mask).sum() / normalizer
    if mode == "seq-mean-token-mean":
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normalizer
    raise ValueError(f"--loss-agg must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def disable_dropout(model) -> None:
    """Dropout probabilities to 0, so that the same weights give the same log-probs (old = new before the update)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def cut_at_eos(token_ids: list[int], eos_token_id: int, pad_token_id: int) -> list[int]:
    """A generated row up to and including its first EOS; without an EOS, the row without trailing padding."""
    if eos_token_id in token_ids:
        return token_ids[:token_ids.index(eos_token_id) + 1]
    while token_ids and token_ids[-1] == pad_token_id:
        token_ids = token_ids[:-1]
    return token_ids


# ----------------------------------------------------------------------------------------------
# Rollout engines: the same two calls (push weights, generate) for vLLM and transformers
# ----------------------------------------------------------------------------------------------

class HFSampler:
    """transformers `generate` on the training model itself (nothing to push)."""

    def __init__(self, tokenizer, batch_size: int):
        self.tokenizer, self.batch_size = tokenizer, batch_size

    def push_weights(self, model) -> None:
        pass

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, first_seed: int) -> list[list[int]]:
        """n responses per prompt (temperature 0 = greedy); prompts are left-padded; `first_seed` is unused here
        (transformers samples from torch's global RNG, which the resume checkpoint saves)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # with the KV cache (gradient checkpointing turns it off in train mode)
        rows = [ids for ids in prompt_ids for _ in range(n)]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        responses = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(r) for r in chunk)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
            with common.autocast(device):
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                        **sampling)
            responses += [cut_at_eos(row, eos, pad) for row in output[:, width:].tolist()]
        model.train(was_training)
        return responses


class VllmSampler:
    """vLLM colocated in this process; the trainer's weights are pushed into it before it samples."""

    def __init__(self, model_path: str, args: Args, world_size: int, max_model_len: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, so weights can be pushed
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache on CPU
        from vllm import LLM

        engine_args = dict(model=model_path, seed=args.seed, max_model_len=max_model_len, enable_prefix_caching=False,
                           dtype="bfloat16" if torch.cuda.is_available() else "float32")
        if torch.cuda.is_available():
            engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
        if world_size > 1:  # every torchrun rank has its own engine (data parallel), as TRL's colocate mode
            engine_args["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**engine_args)

    def push_weights(self, model) -> None:
        # The call that works in-process (see shared/notes/platform-facts.md): vLLM's own loader reads HF names.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(model.state_dict().items()),
                                                          "is_checkpoint_format": True})

    def generate(self, model, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, first_seed: int) -> list[list[int]]:
        """n responses per prompt; prompt i's requests use seeds first_seed + i*n + (0..n-1) (vLLM adds the index),
        so the samples depend on (seed, step, prompt position) only, not on the number of processes."""
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 max_tokens=max_new_tokens, seed=first_seed + i * n) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [list(completion.token_ids) for output in outputs for completion in output.outputs]


# ----------------------------------------------------------------------------------------------
# Several processes: each rank holds B / world_size prompts; sums are all-reduced
# ----------------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world_size, local_rank


def global_sums(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes (itself with one process)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------
# One GRPO update on a batch of sampled groups
# ----------------------------------------------------------------------------------------------

def grpo_update(model, ref_model, optimizer, prompt_ids: list[list[int]], response_ids: list[list[int]],
                advantages: torch.Tensor, args: Args, pad_token_id: int) -> dict:
    """One optimizer step of the GRPO loss on this rank's responses; returns summed statistics of the batch.

    `model` may be wrapped in DistributedDataParallel (gradients are then averaged over ranks, which the loss
    undoes by multiplying by world_size, so the result equals one process holding the whole batch).
    """
    device = next(model.parameters()).device
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_tokens = float(sum(len(r) for r in response_ids))
    total_tokens, total_responses = global_sums([local_tokens, float(len(response_ids))], device)
    normalizer = total_tokens if args.loss_agg == "token-mean" else total_responses
    sums = dict(loss=0.0, pg_loss=0.0, kl=0.0, entropy=0.0, clip_fraction=0.0, ratio=0.0)
    optimizer.zero_grad(set_to_none=True)
    starts = range(0, len(response_ids), args.micro_batch_size)
    for n, start in enumerate(starts):
        end = start + args.micro_batch_size
        prompts, responses = prompt_ids[start:end], response_ids[start:end]
        micro_advantages = advantages[start:end].to(device)
        if ref_model is not None:
            with torch.no_grad(), common.autocast(device):
                ref_logprobs, _ = common.response_logprobs(ref_model, prompts, responses, args.temperature,
                                                           pad_token_id)
        last = n == len(starts) - 1
        sync_context = model.no_sync() if (world_size > 1 and not last) else contextlib.nullcontext()
        with sync_context:
            with common.autocast(device):
                logprobs, mask, entropy = common.response_logprobs(model, prompts, responses, args.temperature,
                                                                   pad_token_id, with_entropy=True)
            # Old log-probs: the training model's own log-probs before the update. With one update per step the
            # weights have not moved since sampling, so they are this very forward pass, detached (r = 1 here,
            # and grad r = grad logp). Not the sampler's log-probs: vLLM's kernels differ from the trainer's.
            old_logprobs = logprobs.detach()
            pg_losses, ratio, clipped = grpo_token_losses(logprobs, old_logprobs, micro_advantages, args.clip)
            # loss = agg(pg) + beta * agg(k3) - c_ent * agg(entropy)
            pg_loss = aggregate(pg_losses, mask, args.loss_agg, normalizer)
            loss = pg_loss - args.entropy_coef * aggregate(entropy, mask, args.loss_agg, normalizer)
            kl = torch.zeros_like(logprobs)
            if ref_model is not None:
                kl = k3_kl(logprobs, ref_logprobs)
                loss = loss + args.kl_coef * aggregate(kl, mask, args.loss_agg, normalizer)
            (loss * world_size).backward()
        # statistics: sums over tokens (main divides them by the global token count)
        sums["loss"] += loss.item()
        sums["pg_loss"] += pg_loss.item()
        for name, values in (("kl", kl), ("entropy", entropy), ("clip_fraction", clipped), ("ratio", ratio)):
            sums[name] += float((values.detach() * mask).sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    sums["grad_norm"] = float(grad_norm)
    return sums


# ----------------------------------------------------------------------------------------------
# Evaluation: greedy accuracy per eval file
# ----------------------------------------------------------------------------------------------

def evaluate(model, sampler, tokenizer, eval_sets: dict[str, list[dict]], args: Args, rank: int,
             world_size: int) -> dict[str, float]:
    """Accuracy of greedy decoding (temperature 0) on every eval file; each rank does every world_size-th prompt."""
    device = next(model.parameters()).device
    accuracies = {}
    for name, rows in eval_sets.items():
        mine = rows[rank::world_size]
        prompt_ids = [common.encode_prompt(tokenizer, common.format_prompt(tokenizer, r["prompt"], args.system_prompt))
                      for r in mine]
        responses = sampler.generate(model, prompt_ids, 1, 0.0, 1.0, args.eval_max_new_tokens, 0) if mine else []
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        correct = sum(common.reward(t, r["answer"]) for t, r in zip(texts, mine))
        correct, total = global_sums([correct, float(len(mine))], device)
        accuracies[name] = correct / total
    return accuracies


# ----------------------------------------------------------------------------------------------
# Files: metrics lines, the resume checkpoint, the output checkpoint
# ----------------------------------------------------------------------------------------------

def append_metrics(path: Path, row: dict) -> None:
    """One JSON line, appended with a single write (a resumed run first cuts the file back to its saved size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resume_state(folder: Path, model, optimizer, step: int, examples_consumed: int, metrics_bytes: int,
                      rank: int, world_size: int) -> None:
    """<out>.resume/: model and optimizer state, every rank's RNG states, the step and data position."""
    rng_states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rng_states, rng_state())
    else:
        rng_states = [rng_state()]
    if rank == 0:
        with common.atomic_dir(folder) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "examples_consumed": examples_consumed, "metrics_bytes": metrics_bytes,
                        "world_size": world_size, "rng": rng_states}, tmp / "state.pt")
    if world_size > 1:
        dist.barrier()


def load_resume_state(folder: Path, model, optimizer, rank: int, world_size: int) -> dict:
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    if state["world_size"] != world_size:
        raise ValueError(f"{folder} was written by {state['world_size']} processes; resume it with as many "
                         f"(this run has {world_size}), or delete it to start the segment over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][rank])
    return state


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder / "grpo_train.json").is_file() and (folder / "config.json").is_file()


# ----------------------------------------------------------------------------------------------
# The segment
# ----------------------------------------------------------------------------------------------

def check_args(args: Args) -> None:
    for flag in ("model", "data", "out"):
        if not getattr(args, flag):
            raise SystemExit(f"grpo_train.py: --{flag.replace('_', '-')} is required")
    if args.loss_agg not in LOSS_AGGREGATIONS:
        raise SystemExit(f"grpo_train.py: --loss-agg must be one of {LOSS_AGGREGATIONS}, got {args.loss_agg!r}")
    if args.group_size < 2:
        raise SystemExit("grpo_train.py: --group-size must be >= 2 (a group of one has no advantage)")
    if args.steps < 0 or args.batch_prompts < 1 or args.micro_batch_size < 1 or args.hf_generation_batch < 1:
        raise SystemExit("grpo_train.py: --steps must be >= 0; --batch-prompts, --micro-batch-size and "
                         "--hf-generation-batch >= 1")
    if args.temperature <= 0:
        raise SystemExit(f"grpo_train.py: --temperature must be > 0 for sampling, got {args.temperature}")


def main(args: Args) -> None:
    check_args(args)
    out = Path(args.out)
    resume_folder = Path(f"{out}.resume")
    metrics_path = Path(args.metrics or f"{out}.metrics.jsonl")
    if is_complete_checkpoint(out):
        shutil.rmtree(resume_folder, ignore_errors=True)
        print(f"{out} is already complete; nothing to do")
        return
    rank, world_size, local_rank = init_distributed()
    if args.batch_prompts % world_size:
        raise SystemExit(f"grpo_train.py: --batch-prompts {args.batch_prompts} must be divisible by the number "
                         f"of processes {world_size}")
    common.seed_everything(args.seed + rank)  # each rank samples its own responses
    device = common.get_device(local_rank if world_size > 1 else None)

    examples = common.load_examples(args.data)
    eval_sets = {Path(p).stem: common.load_examples(p) for p in args.eval_data}
    tokenizer = common.load_tokenizer(args.model)
    model = common.load_model(args.model, device)
    disable_dropout(model)
    model.train()  # train mode (for gradient checkpointing) without dropout
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # DDP-safe
    ref_model = None
    if args.kl_coef > 0:
        ref_model = common.load_model(args.ref_model or args.model, device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    start_step = 0
    if resume_folder.is_dir():
        state = load_resume_state(resume_folder, model, optimizer, rank, world_size)
        start_step = state["step"]
        if rank == 0 and metrics_path.exists():  # drop the lines written after the checkpoint
            os.truncate(metrics_path, state["metrics_bytes"])
        print(f"resuming {resume_folder} at step {start_step}/{args.steps}")
    trainer = model
    if world_size > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                            else None)

    backend = common.choose_backend(args.backend)
    if backend == "vllm":
        longest_prompt = max(len(common.encode_prompt(tokenizer, common.format_prompt(tokenizer, r["prompt"],
                                                                                       args.system_prompt)))
                             for r in examples + [r for rows in eval_sets.values() for r in rows])
        max_model_len = longest_prompt + max(args.max_new_tokens, args.eval_max_new_tokens)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        sampler = VllmSampler(args.model, args, world_size, min(max_model_len, limit) if limit else max_model_len)
    else:
        sampler = HFSampler(tokenizer, args.hf_generation_batch)
    engine_is_stale = True

    def log_eval(stage_step: int) -> None:
        nonlocal engine_is_stale
        if not eval_sets:
            return
        if engine_is_stale:
            sampler.push_weights(model)
            engine_is_stale = False
        accuracies = evaluate(model, sampler, tokenizer, eval_sets, args, rank, world_size)
        if rank == 0:
            append_metrics(metrics_path, {"step": args.step_offset + stage_step, "eval": accuracies})
            print(f"step {args.step_offset + stage_step}: eval {accuracies}")

    evaluated_at_start = start_step == 0 and (args.step_offset == 0 or args.eval_at_start)
    if evaluated_at_start:
        log_eval(0)

    local_prompts = args.batch_prompts // world_size
    progress = tqdm(range(start_step, args.steps), desc="GRPO", disable=rank != 0, initial=start_step,
                    total=args.steps)
    for step in progress:
        step_start = time.perf_counter()
        # 1. This step's B prompts; this rank takes its contiguous share.
        indices = batch_indices(len(examples), args.batch_prompts, step, args.seed)
        mine = [examples[i] for i in indices[rank * local_prompts:(rank + 1) * local_prompts]]
        prompt_ids = [common.encode_prompt(tokenizer, common.format_prompt(tokenizer, r["prompt"], args.system_prompt))
                      for r in mine]

        # 2. G responses per prompt from the current policy (the engine first receives the trainer's weights).
        if engine_is_stale:
            sampler.push_weights(model)
        first_seed = args.seed * 10**9 + (step * args.batch_prompts + rank * local_prompts) * args.group_size
        response_ids = sampler.generate(model, prompt_ids, args.group_size, args.temperature, args.top_p,
                                        args.max_new_tokens, first_seed)
        rollout_time = time.perf_counter() - step_start

        # 3. 0/1 rewards and group advantages A_k = (r_k - mean(r)) / (std(r) + 1e-4).
        texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        answers = [r["answer"] for r in mine for _ in range(args.group_size)]
        rewards = torch.tensor([common.reward(t, a) for t, a in zip(texts, answers)]).view(-1, args.group_size)
        advantages = common.group_advantages(rewards).flatten()
        all_equal_groups = float((rewards == rewards[:, :1]).all(dim=1).sum())

        # 4. One update of the clipped surrogate + k3 KL - entropy bonus.
        update_start = time.perf_counter()
        group_prompt_ids = [ids for ids in prompt_ids for _ in range(args.group_size)]
        sums = grpo_update(trainer, ref_model, optimizer, group_prompt_ids, response_ids, advantages, args,
                           tokenizer.pad_token_id)
        engine_is_stale = True
        update_time = time.perf_counter() - update_start
        step_time = time.perf_counter() - step_start

        # Metrics over the whole batch (all ranks).
        tokens = float(sum(len(r) for r in response_ids))
        (reward_sum, correct, responses, groups, equal_groups, token_sum, kl_sum, entropy_sum, clip_sum,
         ratio_sum, loss_sum) = global_sums(
            [float(rewards.sum()), float((rewards == 1).sum()), float(rewards.numel()), float(rewards.shape[0]),
             all_equal_groups, tokens, sums["kl"], sums["entropy"], sums["clip_fraction"], sums["ratio"],
             sums["loss"]], device)
        row = {"step": args.step_offset + step + 1, "stage_step": step + 1,
               "reward_mean": reward_sum / responses, "accuracy": correct / responses,
               "kl": kl_sum / token_sum, "clip_fraction": clip_sum / token_sum, "entropy": entropy_sum / token_sum,
               "all_equal_share": equal_groups / groups, "response_length": token_sum / responses,
               "tokens_per_s": token_sum / step_time, "step_time_s": step_time, "rollout_time_s": rollout_time,
               "update_time_s": update_time, "loss": loss_sum, "ratio_mean": ratio_sum / token_sum,
               "grad_norm": sums["grad_norm"]}
        if rank == 0:
            append_metrics(metrics_path, row)
            progress.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}",
                                 s_per_step=f"{step_time:.2f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            log_eval(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            metrics_bytes = metrics_path.stat().st_size if metrics_path.exists() else 0
            save_resume_state(resume_folder, model, optimizer, step + 1, (step + 1) * args.batch_prompts,
                              metrics_bytes, rank, world_size)

    if args.steps > 0 or not evaluated_at_start:
        log_eval(args.steps)
    if rank == 0:
        with common.atomic_dir(out) as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            common.write_json(folder / "grpo_train.json", {**dataclasses.asdict(args), "world_size": world_size,
                                                           "backend": backend})
        shutil.rmtree(resume_folder, ignore_errors=True)
        print(f"wrote {out}")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run_main(main, Args)
