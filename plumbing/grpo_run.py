"""grpo_train.py's run state: processes, the policy (DDP-wrapped or FSDP2-sharded), the frozen
reference, AdamW, the sampling engine, the resume state, the metrics (TRL's names), the Hugging
Face checkpoints."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import torch

import common
from plumbing import distributed as dist
from plumbing import models
from plumbing.cli import DataError
from plumbing.data import load_examples, read_jsonl
from plumbing.engines import choose_backend, make_engine
from plumbing.files import ChunkStore, append_jsonl, atomic_path, fingerprint, read_json, write_json
from plumbing.memory_plan import pass_tokens, plan_memory
from plumbing.trackers import open_tracker


def run_settings(args) -> dict:
    """The flags and the content of every file the run reads (models, data); not where the
    curves go (--report-to, --run-name), which changes no result."""
    paths = [args.model, args.ref_model, args.data, *args.eval_data]
    settings = dataclasses.asdict(args) | fingerprint(paths)
    return {k: v for k, v in settings.items() if k not in ("report_to", "run_name")}


class TrainingRun:
    def __init__(self, args):
        self.args = args
        self.rank, self.world, self.device = dist.init_distributed()
        if args.batch_prompts % (self.world * args.mini_batches):
            share = f"the processes ({self.world}) x --mini-batches ({args.mini_batches})"
            raise DataError(f"--batch-prompts {args.batch_prompts} must be divisible by {share}")
        models.seed_everything(args.seed + self.rank)  # (the sampler seeds each prompt itself)
        self.backend = choose_backend(args.backend)
        self.examples = load_examples(args.data)
        self.eval_sets = {Path(p).stem: load_examples(p) for p in args.eval_data}
        self.tokenizer = models.load_tokenizer(args.model)
        self.pad = self.tokenizer.pad_token_id
        rows = self.examples + [row for evals in self.eval_sets.values() for row in evals]
        self.longest_prompt = max(len(self.encode(row["prompt"])) for row in rows)
        # a pass of the update holds at most this process's B / processes x G sequences
        sequences = args.batch_prompts // self.world * args.group_size
        longest = self.longest_prompt + args.max_new_tokens
        checkpointing = models.use_checkpointing(args.gradient_checkpointing, self.device)
        plan = dict(checkpointing=checkpointing, fsdp=args.fsdp, world=self.world)
        plan |= dict(token_budget=pass_tokens(args.micro_batch_tokens, sequences, longest))
        plan |= dict(vllm_share=args.gpu_memory_utilization if self.backend == "vllm" else 0.0)
        share = " or --gpu-memory-utilization" if self.device.type == "cuda" else ""
        if self.backend == "hf":  # generate()'s KV cache: a step's or an evaluation's sequences
            calls = [(sequences, args.max_new_tokens)]
            calls += [(len(rows), args.eval_max_new_tokens) for rows in self.eval_sets.values()]
            plan["generation_tokens"] = max(
                min(args.hf_generation_batch, n) * (self.longest_prompt + new) for n, new in calls
            )
            share = " or --hf-generation-batch"
        flags = f"--micro-batch-tokens{share}, or use --fsdp on"
        self.sharded = plan_memory(args.model, self.device, "grpo", **plan, flags=flags)
        if self.sharded and args.dynamic_sampling:  # processes may keep different group counts
            raise DataError("--dynamic-sampling with a sharded model (--fsdp) is not supported")
        # a resume state made with other settings or another process count: refused up front
        settings = run_settings(args) | {"world_size": self.world}
        self.store = ChunkStore(f"{args.out}.resume", settings)
        finished = dist.open_chunk_store(self.store, self.rank)
        self.metrics_path = Path(args.metrics or f"{args.out}.metrics.jsonl")
        self.report = open_tracker(args, self.metrics_path.parent) if self.rank == 0 else None
        self.model = models.load_policy(args.model, self.device, checkpointing, train=True)
        self.ref_model = None
        if args.kl_coef > 0:  # only log-probs: bf16 weights on CUDA (the log-softmax is float32)
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            reference = args.ref_model or args.model
            self.ref_model = (
                models.load_model(reference, self.device, dtype).eval().requires_grad_(False)
            )
        for model in filter(None, (self.model, self.ref_model) if self.sharded else ()):
            dist.shard_model(model)
        adamw = dict(lr=args.lr, weight_decay=args.weight_decay, fused=self.device.type == "cuda")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **adamw)
        self.start_step = self.load_resume_state(finished)
        logged = read_jsonl(self.metrics_path) if self.start_step and self.rank == 0 else []
        self.num_tokens = next((r["num_tokens"] for r in logged[::-1] if "num_tokens" in r), 0)
        self.trainer = self.model
        if self.world > 1 and not self.sharded:  # gradients live in DDP's buckets: no 2nd copy
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.trainer = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids, gradient_as_bucket_view=True
            )
        sampler = self.model  # a sharded model would gather weights at every decoding step
        if self.sharded and self.backend == "hf":
            sampler = models.load_model(args.model, self.device).eval()
        options = dict(seed=args.seed, hf_batch_sequences=args.hf_generation_batch)
        options |= dict(
            max_model_len=self.max_model_len(), gpu_memory_utilization=args.gpu_memory_utilization
        )
        self.engine = make_engine(self.backend, sampler, self.tokenizer, args.model, **options)
        self.engine_is_stale = True

    def encode(self, question: str) -> list[int]:
        text = common.format_prompt(self.tokenizer, question, self.args.system_prompt)
        return common.encode_prompt(self.tokenizer, text)

    def max_model_len(self) -> int | None:
        """vLLM's context: the longest prompt plus the longest response, within the model's."""
        if self.backend != "vllm":
            return None
        needed = self.longest_prompt + max(self.args.max_new_tokens, self.args.eval_max_new_tokens)
        return min(needed, models.context_length(self.model.config) or needed)

    def sync_engine(self) -> None:
        if self.engine_is_stale:
            self.engine.push_weights(self.model)
            self.engine_is_stale = False

    def log(self, row: dict) -> None:
        """One line of the metrics file, sent to the tracker too; evaluations also printed."""
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)
            self.report(row)
            if any(key.startswith("eval/") for key in row):
                print({k: v for k, v in row.items() if k == "step" or k.startswith("eval/")})

    def evaluate(self) -> dict:
        """Greedy accuracy (temperature 0) on every eval file, each rank every world-th prompt:
        {"eval/<file stem>/accuracy": a, ..., "timing_s/testing": seconds}."""
        if not self.eval_sets:
            return {}
        start, accuracies, last_number = time.perf_counter(), {}, self.args.last_number_when_cut
        self.sync_engine()
        for name, rows in self.eval_sets.items():
            mine = dist.shard(rows, self.rank, self.world)
            prompts = [self.encode(r["prompt"]) for r in mine]
            greedy = dict(temperature=0.0, top_p=1.0, max_new_tokens=self.args.eval_max_new_tokens)
            responses = [g[0] for g in self.engine.generate(prompts, 1, **greedy)] if mine else []
            rule = dict(stop_ids=self.engine.stop_ids, last_number_when_cut=last_number)
            rewards = common.score_responses(
                self.tokenizer, responses, [r["answer"] for r in mine], **rule
            )
            correct, total = dist.all_sum([sum(rewards), len(mine)], self.device)
            accuracies[f"eval/{name}/accuracy"] = correct / total
        return accuracies | {"timing_s/testing": time.perf_counter() - start}

    def log_step(self, step: int, rewards, groups, updates, times, rounds) -> dict:
        """The metrics line of a step, for the whole batch (all ranks), under the names of TRL's
        GRPOTrainer (verl's for the times and throughput), with the evaluation when one is due
        (every --eval-every steps and the last). groups: [(prompt ids, [G response ids])];
        updates: grpo_update's sums; times = (rollout, update, step) seconds."""
        response_ids = [response for _, responses in groups for response in responses]
        rollout_time, update_time, step_time = times
        per_token = ("kl", "entropy", "clip_fraction", "clip_high", "ratio")
        sums = {key: sum(u[key] for u in updates) / self.args.ppo_epochs for key in per_token}
        sums |= {key: sum(u[key] for u in updates) / len(updates) for key in ("loss", "pg_loss")}
        sums |= dict(reward=rewards.sum(), reward_sq=(rewards**2).sum(), responses=rewards.numel())
        sums |= dict(groups=len(rewards), equal=(rewards == rewards[:, :1]).all(dim=1).sum())
        cut = sum(not ids or ids[-1] not in self.engine.stop_ids for ids in response_ids)
        sums |= dict(cut=cut, tokens=sum(map(len, response_ids)), rounds=rounds)
        sums["prompt_tokens"] = sum(len(prompt) * len(responses) for prompt, responses in groups)
        total = dict(zip(sums, dist.all_sum([float(v) for v in sums.values()], self.device)))
        tokens, n = total["tokens"], total["responses"]
        mean, all_tokens = total["reward"] / n, total["prompt_tokens"] + tokens
        self.num_tokens += int(all_tokens)  # prompt and completion tokens so far (TRL)
        row = {
            "step": self.args.step_offset + step + 1,
            "stage_step": step + 1,
            "reward": mean,
            "reward_std": math.sqrt(max(total["reward_sq"] - n * mean**2, 0) / max(n - 1, 1)),
            "frac_reward_zero_std": total["equal"] / total["groups"],
            "completions/mean_length": tokens / n,
            "completions/clipped_ratio": total["cut"] / n,
            "kl": total["kl"] / tokens,
            "entropy": total["entropy"] / tokens,
            "clip_ratio/low_mean": (total["clip_fraction"] - total["clip_high"]) / tokens,
            "clip_ratio/high_mean": total["clip_high"] / tokens,
            "clip_ratio/region_mean": total["clip_fraction"] / tokens,
            "ratio_mean": total["ratio"] / tokens,
            "loss": total["loss"],
            "policy_loss": total["pg_loss"],
            "grad_norm": sum(u["grad_norm"] for u in updates) / len(updates),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "num_tokens": self.num_tokens,
            "sampling_rounds": total["rounds"] / self.world,
            "timing_s/gen": rollout_time,
            "timing_s/update_actor": update_time,
            "timing_s/step": step_time,
            "perf/throughput": all_tokens / step_time / self.world,
        }
        stage_step, args = step + 1, self.args
        due = stage_step == args.steps or args.eval_every and stage_step % args.eval_every == 0
        self.log(row | (self.evaluate() if due else {}))
        return row

    def save(self, step: int) -> None:
        """Every --save-every steps: a Hugging Face checkpoint <out>-<logged step>/ (the last
        --keep-checkpoints of them kept), then the resume state (so that a kill between the two
        redoes the checkpoint)."""
        if self.args.keep_checkpoints:
            logged_step = self.args.step_offset + step
            self.save_checkpoint(f"{self.args.out}-{logged_step}", step=logged_step)
            if self.rank == 0:
                for folder in self.checkpoints(logged_step)[: -self.args.keep_checkpoints]:
                    shutil.rmtree(folder)
        self.save_resume_state(step)

    def checkpoints(self, step: int) -> list[Path]:
        """The checkpoints <out>-<n>/ written with this --out (their grpo_train.json says so), in
        the order in which to keep the last ones: any after `step` (an earlier run's) first, then
        by n."""
        out = Path(self.args.out)
        found = {p: p.name[len(out.name) + 1 :] for p in out.parent.glob(f"{out.name}-*")}
        found = {p: int(n) for p, n in found.items() if n.isdigit() and self.is_ours(p)}
        return sorted(found, key=lambda p: (found[p] <= step, found[p]))

    def is_ours(self, folder: Path) -> bool:
        marker = folder / "grpo_train.json"
        return marker.is_file() and read_json(marker)["settings"]["out"] == self.args.out

    def save_resume_state(self, step: int) -> None:
        """<out>.resume/chunk_<step>.dcp/: every process writes its shards of the model and AdamW
        state and its RNG state, in parallel, with the metrics file's size (rank 0's); the previous
        state goes once this one is complete."""
        size = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        state = dist.training_state(self.model, self.optimizer)
        state |= {"metrics_bytes": dist.broadcast(size), f"rng_{self.rank}": models.rng_state()}
        dist.save_state(state, self.store.folder / f"chunk_{step:06d}.dcp")
        if self.rank == 0:
            self.store.keep_only(step)

    def load_resume_state(self, finished: set[int]) -> int:
        """The step to start from: 0, or that of the latest resume state (all restored)."""
        if not finished:
            return 0
        step, mine = max(finished), f"rng_{self.rank}"
        others = {"metrics_bytes": 0, mine: models.rng_state()}
        folder = self.store.load(step)
        state = dist.load_training_state(self.model, self.optimizer, folder, others)
        models.set_rng_state(state[mine])
        if self.rank == 0 and self.metrics_path.exists():  # lines written after the save go
            os.truncate(self.metrics_path, state["metrics_bytes"])
        print(f"resuming {self.store.folder} at step {step}/{self.args.steps}")
        return step

    def save_checkpoint(self, folder: str, step: int) -> None:
        """The policy in Hugging Face format (safetensors, config, tokenizer) and grpo_train.json,
        written atomically; the weights gathered on rank 0 one tensor at a time."""
        weights = dist.gathered_weights(self.model)
        if self.rank == 0:
            with atomic_path(folder, folder=True) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
                self.tokenizer.save_pretrained(tmp)
                meta = {"settings": run_settings(self.args), "world_size": self.world}
                meta |= {"backend": self.backend, "step": step} | models.cpu_kernels()
                write_json(tmp / "grpo_train.json", meta)
        dist.barrier()

    def finish(self) -> None:
        """The output checkpoint --out; then the resume state goes."""
        self.save_checkpoint(self.args.out, step=self.args.step_offset + self.args.steps)
        if self.rank == 0:
            self.store.remove()
            print(f"wrote {self.args.out}")
        self.engine.close()
        dist.finish_distributed()
