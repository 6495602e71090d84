"""Step 0 of CROPI: offline rollouts of the behaviour policy beta = the initial model, made ONCE.

For every prompt x of the data files:
  1. sample K responses y_1..y_K ~ beta(. | x)   (release: K = 8, 32 for validation prompts,
                                                  temperature 0.5, top_p 1, up to 2048 new tokens)
  2. recompute the behaviour log-probs  log beta(y_{k,t} | x, y_{k,<t})  by a forward pass of the
     initial model at the sampling temperature (the sampler's own differ numerically; recomputed
     ones make the importance ratio rho = pi_theta / beta exactly 1 at stage 0)
  3. score each response with the verifiable 0/1 reward  r_k = reward(y_k, gold).
Every later stage reuses these rollouts; nothing is sampled again for selection.

Reads   --model (HF folder or hub name), --data files (.jsonl/.parquet, plumbing/data.py).
Writes  OUT.jsonl, a line per prompt in input order: id, prompt, answer, prompt_ids, response_ids,
        responses, behavior_logprobs, rewards, temperature (+ skill/source), and OUT.summary.json
        (pass rates, tokens/s, the settings; written last). Finished chunks go to OUT.jsonl.parts/:
        a killed run resumes there and gives the same rows (each prompt has its own seed).
Several GPUs: torchrun --nproc_per_node=G collect_rollouts.py ... (each takes every G-th chunk).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

import common
from plumbing import distributed as dist
from plumbing import files
from plumbing.cli import DataError, arg, run_main
from plumbing.data import load_data_files, pass_rate_histogram
from plumbing.engines import choose_backend, make_engine
from plumbing.memory_plan import plan_memory
from plumbing.models import (
    check_model,
    context_length,
    cpu_kernels,
    derive_seed,
    load_model,
    load_tokenizer,
)


@dataclasses.dataclass
class Args:
    model: str = arg("", "initial model = behaviour policy beta (HF folder)", required=True)
    data: list[str] = arg([], "data file(s); rows go to one output in input order", required=True)
    out: str = arg(
        "", "output rollouts .jsonl; its summary goes to OUT.summary.json", required=True
    )
    k: int = arg(8, "responses per prompt (release: 8, 32 for validation prompts)", at_least=1)
    temperature: float = arg(0.5, "sampling temperature; the behaviour log-probs use the same")
    top_p: float = arg(1.0, "nucleus sampling threshold (release: 1.0)")
    max_new_tokens: int = arg(2048, "longest response in tokens", at_least=1)
    seed: int = arg(0, "sampling seed; prompt i is sampled with a seed derived from (seed, i)")
    backend: Literal["auto", "vllm", "hf"] = arg("auto", "sampler (auto: vLLM on CUDA)")
    system_prompt: str = arg(common.DEFAULT_SYSTEM_PROMPT, "system prompt ('' for none)")
    gpu_memory_utilization: float = arg(0.6, "vLLM's share of GPU memory (the rest: log-probs)")
    vllm_kv_cache_gib: float = arg(0.0, "vLLM KV cache in GiB (0: by the share above)", at_least=0)
    vllm_enforce_eager: bool = arg(False, "vLLM without compilation (quicker start: tests)")
    chunk_size: int = arg(64, "prompts per chunk (a piece of OUT.jsonl.parts)", at_least=1)
    hf_batch_size: int = arg(16, "hf: prompts per generate() call (K sequences each)", at_least=1)
    min_mixed: int = arg(0, "fail when fewer prompts have mixed rewards (0 < pass rate < 1)")
    logprob_token_budget: int = arg(16384, "log-prob pass: padded tokens a forward", at_least=1)


# What the rows depend on: finished chunks and a finished OUT made with other values are not reused.
SAMPLING_SETTINGS = ("model", "data", "k", "temperature", "top_p", "max_new_tokens", "seed")
SAMPLING_SETTINGS += ("system_prompt", "chunk_size", "hf_batch_size")


def summarize(rows: list[dict], seconds: float, tokens: int) -> dict:
    """Prompts by pass rate, those with mixed rewards (a non-zero gradient), tokens, tokens/s."""
    pass_rates = [sum(row["rewards"]) / len(row["rewards"]) for row in rows]
    lengths = [len(ids) for row in rows for ids in row["response_ids"]]
    return dict(
        prompts=len(rows),
        pass_rate_histogram=pass_rate_histogram(pass_rates),
        mean_pass_rate=sum(pass_rates) / len(rows),
        prompts_with_mixed_rewards=sum(0 < p < 1 for p in pass_rates),
        tokens_generated=sum(lengths),
        mean_response_tokens=sum(lengths) / len(lengths),
        sampling_seconds_this_run=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1) if seconds else None,
    )


def collect_chunk(args: Args, examples: list[dict], *, engine, model, tokenizer, seeds, progress):
    """Steps 1-3 for the prompts of one chunk; returns (rollout rows, seconds spent sampling)."""
    prompt_ids = [example["prompt_ids"] for example in examples]
    # 1. y_k ~ beta(. | x), K per prompt, each prompt with its own seed
    start = time.perf_counter()
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seeds=seeds, progress=progress)
    groups = engine.generate(prompt_ids, args.k, max_new_tokens=args.max_new_tokens, **sampling)
    sampling_seconds = time.perf_counter() - start
    engine.release_memory(keep_weights=True)  # vLLM sleeps (CUDA): the pass below gets its memory
    # 2. log beta(y_{k,t} | x, y_{k,<t}) at the sampling temperature, recomputed by a forward pass
    prompts = [p for p, group in zip(prompt_ids, groups) for _ in group]
    responses = [r for group in groups for r in group]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    batches = common.token_budget_batches(lengths, args.logprob_token_budget)
    pass_settings = dict(temperature=args.temperature, pad_token_id=tokenizer.pad_token_id)
    flat_logprobs = common.batched_logprobs(
        model, prompts, responses, **pass_settings, batches=batches
    )
    rows, k = [], args.k
    for n, (example, group) in enumerate(zip(examples, groups)):
        # 3. r_k = reward(y_k, gold) in {0, 1}; one cut at the token limit needs an explicit answer
        answers = [example["answer"]] * len(group)
        row = {key: example[key] for key in ("id", "prompt", "answer", "prompt_ids")}
        row["response_ids"] = group
        row["responses"] = tokenizer.batch_decode(group, skip_special_tokens=True)
        row["behavior_logprobs"] = [lp.tolist() for lp in flat_logprobs[n * k : (n + 1) * k]]
        row["rewards"] = common.score_responses(tokenizer, group, answers, stop_ids=engine.stop_ids)
        row["temperature"] = args.temperature
        rows.append(row | {key: example[key] for key in ("skill", "source") if key in example})
    return rows, sampling_seconds


def collect_rollouts(args: Args, settings: dict, examples: list[dict], tokenizer) -> None:
    """Steps 1-3 chunk by chunk (each process every world-th chunk; a killed run resumes), then
    rank 0 writes every row in input order, and the summary last."""
    rank, world, device = dist.init_distributed()
    backend, vllm_share = settings["backend"], args.gpu_memory_utilization
    plan = dict(token_budget=args.logprob_token_budget, checkpointing=False)
    plan |= dict(vllm_share=vllm_share if backend == "vllm" else 0.0)
    plan |= dict(vllm_kv_cache_gib=args.vllm_kv_cache_gib)
    share = "--gpu-memory-utilization" if device.type == "cuda" else "--vllm-kv-cache-gib"
    if backend == "hf":  # generate()'s KV cache: a call's --hf-batch-size x K sequences
        longest = max(len(example["prompt_ids"]) for example in examples) + args.max_new_tokens
        plan["generation_tokens"] = args.hf_batch_size * args.k * longest
        share = "--hf-batch-size"
    plan_memory(args.model, device, "collect", **plan, flags=f"{share} or --logprob-token-budget")
    model = load_model(args.model, device, dtype=torch.float32).eval()  # beta, for log-probs
    # Under torchrun, building a vLLM engine is a collective over all ranks (its external_launcher
    # executor joins process groups): every rank builds it, even one with no chunk to sample.
    options = dict(gpu_memory_utilization=vllm_share, kv_cache_gib=args.vllm_kv_cache_gib)
    options |= dict(seed=args.seed, hf_batch_sequences=args.hf_batch_size * args.k)
    engine = make_engine(
        backend, model, tokenizer, args.model, **options, enforce_eager=args.vllm_enforce_eager
    )
    chunks = [examples[i : i + args.chunk_size] for i in range(0, len(examples), args.chunk_size)]
    progress = tqdm(unit="response", disable=rank > 0, desc=f"sampling ({backend}, a process)")
    timing = {"tokens": 0, "seconds": 0.0}

    def collect(c: int) -> list[dict]:
        models = dict(engine=engine, model=model, tokenizer=tokenizer, progress=progress)
        # prompt i of the data (chunk c's j-th: i = c x chunk size + j) seeded by (seed, i) only
        first = c * args.chunk_size
        seeds = [derive_seed(args.seed, first + j) for j in range(len(chunks[c]))]
        rows, seconds = collect_chunk(args, chunks[c], **models, seeds=seeds)
        timing["tokens"] += sum(len(r) for row in rows for r in row["response_ids"])
        timing["seconds"] += seconds
        return rows

    store = files.ChunkStore(f"{args.out}.parts", settings)
    done = dist.run_chunks(store, len(chunks), collect, rank=rank, world=world)
    tokens, seconds = dist.all_sum([timing["tokens"], timing["seconds"]], device)
    if rank == 0:  # every prompt once, in input order; the summary last
        rows = [row for chunk in done for row in chunk]
        files.write_jsonl(args.out, rows)
        summary = summarize(rows, seconds, tokens) | {"backend": backend, "settings": settings}
        summary |= cpu_kernels()
        files.write_json(summary_path(args), summary | {"tokens_generated_this_run": int(tokens)})
        store.remove()
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    engine.close()
    dist.finish_distributed()


def read_examples(args: Args) -> tuple[list[dict], object]:
    """Every data row, its prompt formatted and encoded; a prompt that fills the model's context
    leaves no room for a response: refused, by id."""
    from transformers import AutoConfig

    examples, tokenizer = load_data_files(args.data), load_tokenizer(args.model)
    context = context_length(AutoConfig.from_pretrained(args.model))
    for example in examples:
        text = common.format_prompt(tokenizer, example["prompt"], args.system_prompt)
        example["prompt_ids"] = common.encode_prompt(tokenizer, text)
        if context is not None and len(example["prompt_ids"]) >= context:
            raise DataError(
                f"prompt {example['id']!r} has {len(example['prompt_ids'])} tokens, "
                f"the model's context is {context}: no room for a response"
            )
    return examples, tokenizer


def summary_path(args: Args) -> Path:
    return Path(args.out).with_name(Path(args.out).name.removesuffix(".jsonl") + ".summary.json")


def main(args: Args) -> None:
    if args.temperature <= 0:
        raise DataError(f"--temperature must be > 0, got {args.temperature}")
    check_model(args.model)
    files.check_writable(args.out)
    load_data_files(args.data)  # every data file parsed before any model is loaded
    settings = {key: getattr(args, key) for key in SAMPLING_SETTINGS}
    settings["data"] = [str(Path(p).resolve()) for p in args.data]
    settings["backend"] = choose_backend(args.backend)
    if Path(args.model).exists():
        settings["model"] = str(Path(args.model).resolve())
    settings |= files.fingerprint([args.model, *args.data])
    if files.already_done(summary_path(args), settings) and Path(args.out).is_file():
        print(f"{args.out} is already complete with these settings; nothing to do")
    else:
        if summary_path(args).is_file():
            earlier = files.read_json(summary_path(args)).get("settings", {})
            changed = files.differences(earlier, settings)
            print(f"{args.out} was made otherwise ({changed}): collecting again")
        examples, tokenizer = read_examples(args)
        collect_rollouts(args, settings, examples, tokenizer)
    summary = json.loads(summary_path(args).read_text())
    if summary["prompts_with_mixed_rewards"] < args.min_mixed:  # they alone carry a gradient
        raise DataError(
            f"{args.out}: only {summary['prompts_with_mixed_rewards']} of {summary['prompts']} "
            f"prompts have mixed rewards (pass rate {summary['mean_pass_rate']:.3f}); at least "
            f"{args.min_mixed} are needed to define a gradient direction. Try more responses per "
            "prompt (--k; VAL_K in run_cropi.sh), easier prompts, another temperature or model"
        )


if __name__ == "__main__":  # the guard vLLM needs: its engine workers are spawned processes
    run_main(main, Args)
