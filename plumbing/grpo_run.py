"""grpo_train.py's run state: processes, the policy (DDP-wrapped or FSDP2-sharded), the frozen
reference, AdamW, the sampling engine, the resume state, the metrics file, the final checkpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

import common
from plumbing import distributed as dist
from plumbing import models
from plumbing.cli import DataError
from plumbing.data import load_examples
from plumbing.engines import choose_backend, make_engine
from plumbing.files import ChunkStore, append_jsonl, atomic_path, write_json
from plumbing.memory_plan import plan_memory


class TrainingRun:
    def __init__(self, args):
        self.args = args
        self.rank, self.world, self.device = dist.init_distributed()
        if args.batch_prompts % (self.world * args.mini_batches):
            share = f"the processes ({self.world}) x --mini-batches ({args.mini_batches})"
            raise DataError(f"--batch-prompts {args.batch_prompts} must be divisible by {share}")
        models.seed_everything(args.seed + self.rank)  # each rank samples its own responses
        self.backend = choose_backend(args.backend)
        checkpointing = models.use_checkpointing(args.gradient_checkpointing, self.device)
        plan = dict(token_budget=args.micro_batch_tokens, checkpointing=checkpointing)
        plan |= dict(fsdp=args.fsdp, world=self.world, vllm_share=args.gpu_memory_utilization)
        if self.backend != "vllm":
            plan["vllm_share"] = 0.0
        flags = "--micro-batch-tokens or --gpu-memory-utilization, or use --fsdp on"
        self.sharded = plan_memory(args.model, self.device, "grpo", **plan, flags=flags)
        if self.sharded and args.dynamic_sampling:  # processes may keep different group counts
            raise DataError("--dynamic-sampling with a sharded model (--fsdp) is not supported")
        self.examples = load_examples(args.data)
        self.eval_sets = {Path(p).stem: load_examples(p) for p in args.eval_data}
        self.tokenizer = models.load_tokenizer(args.model)
        self.pad = self.tokenizer.pad_token_id
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
        self.metrics_path = Path(args.metrics or f"{args.out}.metrics.jsonl")
        settings = {**dataclasses.asdict(args), "world_size": self.world}
        self.store = ChunkStore(f"{args.out}.resume", settings)
        self.start_step = self.load_resume_state()
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
        rows = self.examples + [r for rows in self.eval_sets.values() for r in rows]
        longest = max(len(self.encode(r["prompt"])) for r in rows)
        needed = longest + max(self.args.max_new_tokens, self.args.eval_max_new_tokens)
        return min(needed, models.context_length(self.model.config) or needed)

    def sync_engine(self) -> None:
        if self.engine_is_stale:
            self.engine.push_weights(self.model)
            self.engine_is_stale = False

    def log(self, row: dict, echo: bool = False) -> None:
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)
            print(row) if echo else None

    def evaluate(self, stage_step: int) -> None:
        """Greedy accuracy (temperature 0) on every eval file, each rank every world-th prompt."""
        if not self.eval_sets:
            return
        self.sync_engine()
        accuracies, last_number = {}, self.args.last_number_when_cut
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
            accuracies[name] = correct / total
        self.log({"step": self.args.step_offset + stage_step, "eval": accuracies}, echo=True)

    def log_step(self, step: int, rewards, response_ids, updates, times, rounds) -> dict:
        """One metrics line for the whole batch (all ranks): token statistics averaged over the
        epochs, sampling rounds over the ranks; times = (rollout, update, step) seconds."""
        per_token = ("kl", "clip_fraction", "entropy")
        sums = {key: sum(u[key] for u in updates) / self.args.ppo_epochs for key in per_token}
        sums["ratio"] = sum(u["ratio"] for u in updates) / self.args.ppo_epochs
        sums |= dict(reward=rewards.sum(), correct=(rewards == 1).sum(), responses=rewards.numel())
        sums |= dict(groups=len(rewards), equal=(rewards == rewards[:, :1]).all(dim=1).sum())
        sums |= dict(tokens=sum(map(len, response_ids)), loss=sum(u["loss"] for u in updates))
        values = dist.all_sum([float(v) for v in sums.values()] + [float(rounds)], self.device)
        total, rounds = dict(zip(sums, values)), values[-1]
        tokens, responses = total["tokens"], total["responses"]
        rollout_time, update_time, step_time = times
        row = {"step": self.args.step_offset + step + 1, "stage_step": step + 1}
        row["reward_mean"] = total["reward"] / responses
        row["accuracy"] = total["correct"] / responses
        row |= {key: total[key] / tokens for key in per_token}
        row["all_equal_share"] = total["equal"] / total["groups"]
        row["response_length"] = tokens / responses
        row |= {"tokens_per_s": tokens / step_time, "step_time_s": step_time}
        row |= {"rollout_time_s": rollout_time, "update_time_s": update_time}
        row |= {"loss": total["loss"] / len(updates), "ratio_mean": total["ratio"] / tokens}
        row["grad_norm"] = sum(u["grad_norm"] for u in updates) / len(updates)
        row["sampling_rounds"] = rounds / self.world
        self.log(row)
        return row

    def save_resume_state(self, step: int) -> None:
        """<out>.resume/: model and optimizer state, every rank's RNG states, the step and the
        metrics file's size."""
        rng_states = dist.all_gather(models.rng_state())
        state = dist.training_state(self.model, self.optimizer)
        if self.rank == 0:
            metrics_bytes = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            self.store.save(step, {**state, "metrics_bytes": metrics_bytes, "rng": rng_states})
        dist.barrier()

    def load_resume_state(self) -> int:
        """The step to start from: 0, or that of the latest resume state (all restored)."""
        finished = dist.open_chunk_store(self.store, self.rank)
        if not finished:
            return 0
        step = max(finished)
        state = self.store.load(step)
        dist.load_training_state(self.model, self.optimizer, state)
        models.set_rng_state(state["rng"][self.rank])
        if self.rank == 0 and self.metrics_path.exists():  # lines written after the save go
            os.truncate(self.metrics_path, state["metrics_bytes"])
        print(f"resuming {self.store.folder} at step {step}/{self.args.steps}")
        return step

    def save_checkpoint(self) -> None:
        """The output checkpoint, written atomically; then the resume state goes."""
        weights = dist.training_state(self.model)["model"] if self.sharded else None
        if self.rank == 0:
            with atomic_path(self.args.out, folder=True) as folder:
                self.model.save_pretrained(folder, state_dict=weights)
                self.tokenizer.save_pretrained(folder)
                meta = {"settings": dataclasses.asdict(self.args), "world_size": self.world}
                meta |= {"backend": self.backend} | models.cpu_kernels()
                write_json(folder / "grpo_train.json", meta)
            self.store.remove()
            print(f"wrote {self.args.out}")
        dist.finish_distributed()
