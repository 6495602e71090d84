"""Step 0 of CROPI: offline rollouts of the behaviour policy beta = the initial model, made ONCE.

For every prompt x of the data files:
  1. sample K responses y_1..y_K ~ beta(. | x)    (release: K=8, 32 for validation prompts, temperature 0.5, top_p 1,
                                                   up to 2048 new tokens)
  2. recompute the behaviour log-probs  log beta(y_{k,t} | x, y_{k,<t})  with a transformers forward pass of the
     initial model at the sampling temperature. The sampler's own log-probs differ numerically from a training
     forward pass; recomputed ones make the importance ratio rho = pi_theta / beta exactly 1 at stage 0.
  3. score each response with the verifiable 0/1 reward  r_k = reward(y_k, gold).
These rollouts are reused by every stage (sketch_grads.py reads them; nothing is sampled again for selection).

Reads   --model (HF folder or hub name), one or more --data files (.jsonl/.parquet, see common.load_examples).
Writes  OUT.jsonl, one line per prompt (in input order) with the fields
          id, prompt, answer, prompt_ids, response_ids, responses, behavior_logprobs, rewards, temperature
        (+ "skill"/"source" when the data row has them), and OUT.summary.json (pass-rate histogram, share of
        prompts whose K rewards are all equal, tokens generated, tokens/s, backend).
Resumable: finished chunks of prompts go to OUT.jsonl.parts/ (machinery.ChunkStore); a rerun continues where a
killed run stopped and gives the same rows (every chunk has its own seed).
Several GPUs: torchrun --nproc_per_node=G collect_rollouts.py ...  (each process takes every G-th chunk).

Usage: python collect_rollouts.py --model demo/model --data demo/data/train.jsonl --out runs/rollouts.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import machinery as M
from common import DataError
from machinery import arg


@dataclasses.dataclass
class Args:
    model: str = arg("", "initial model = behaviour policy beta (HF folder or hub name)")
    data: list[str] = arg([], "data file(s); repeat the flag for several, rows go to one output in input order")
    out: str = arg("", "output rollouts file (.jsonl); its summary goes to OUT.summary.json")
    k: int = arg(8, "responses sampled per prompt (release: 8 for training prompts, 32 for validation prompts)")
    temperature: float = arg(0.5, "sampling temperature; the behaviour log-probs are computed at the same one")
    top_p: float = arg(1.0, "nucleus sampling threshold (release: 1.0)")
    max_new_tokens: int = arg(2048, "longest response in tokens (also capped by the model's context length)")
    seed: int = arg(0, "sampling seed; chunk c of the prompts is sampled with a seed derived from (seed, c)")
    backend: str = arg("auto", "auto | vllm | hf; auto = vLLM when it is importable and a CUDA GPU is present")
    system_prompt: str = arg(common.DEFAULT_SYSTEM_PROMPT, "system prompt of the chat template ('' for none)")
    last_number_when_cut: bool = arg(False, "grade a response cut at the token limit by its last number too (the old "
                                            "rule; by default it needs an explicit \\boxed{}, #### or 'answer is')")
    gpu_memory_utilization: float = arg(0.6, "vLLM: share of GPU memory for the engine; the rest holds the "
                                             "transformers copy of the model that recomputes the log-probs")
    vllm_kv_cache_gib: float = arg(0.0, "vLLM: KV-cache size in GiB (0 = sized by --gpu-memory-utilization)")
    vllm_enforce_eager: bool = arg(False, "vLLM: skip torch.compile / CUDA graphs (quicker start-up, slower "
                                          "steps: for tests and short runs)")
    chunk_size: int = arg(64, "prompts per chunk; each chunk is seeded on its own and saved when finished")
    hf_batch_size: int = arg(16, "hf backend: prompts per generate() call (each with K sequences)")
    min_mixed: int = arg(0, "fail (after writing OUT) when fewer prompts have mixed rewards (0 < pass rate < 1): a "
                            "validation set needs some to define a gradient direction")
    logprob_token_budget: int = arg(16384, "behaviour log-prob pass: at most this many (padded) tokens per forward")


# Settings that change the sampled rows: finished chunks made with other values must not be continued.
SAMPLING_SETTINGS = ("model", "data", "k", "temperature", "top_p", "max_new_tokens", "seed", "backend",
                     "system_prompt", "chunk_size", "hf_batch_size", "last_number_when_cut")


# ----------------------------------------------------------------------------------------------
# Small pure pieces (unit-tested)
# ----------------------------------------------------------------------------------------------

def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (seed, chunk index, ...): independent streams without accidental overlaps."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 2)


def chunk_ranges(n_prompts: int, chunk_size: int) -> list[range]:
    """Prompt indices of every chunk: consecutive runs of `chunk_size` in input order."""
    return [range(start, min(start + chunk_size, n_prompts)) for start in range(0, n_prompts, chunk_size)]


def summarize(rows: list[dict], k: int) -> dict:
    """Pass-rate histogram over prompts, share of prompts with K equal rewards (no gradient), response tokens."""
    pass_counts = [int(round(sum(row["rewards"]))) for row in rows]
    lengths = [len(ids) for row in rows for ids in row["response_ids"]]
    return {
        "prompts": len(rows),
        "responses_per_prompt": k,
        "pass_rate_histogram": {f"{j}/{k}": pass_counts.count(j) for j in range(k + 1)},
        "mean_pass_rate": sum(pass_counts) / (k * len(rows)),
        "share_all_rewards_equal": sum(c in (0, k) for c in pass_counts) / len(rows),
        "prompts_with_mixed_rewards": sum(0 < c < k for c in pass_counts),
        "tokens_generated": sum(lengths),
        "mean_response_tokens": sum(lengths) / len(lengths),
    }


def behavior_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float,
                      pad_token_id: int, token_budget: int) -> list[list[float]]:
    """log beta(y_t | x, y_<t) = log softmax(logits / T)[y_t] of every response token, by batches of at most
    token_budget (padded) tokens, longest first.

    Computed under machinery.autocast, exactly as sketch_grads.py computes pi_theta's log-probs (bf16 autocast on
    CUDA, float32 on CPU), so that at stage 0 the importance ratio rho = pi_theta / beta is 1 up to batching noise.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    result: list[list[float]] = [[] for _ in lengths]
    device = next(model.parameters()).device
    with torch.no_grad(), M.autocast(device):
        for batch in M.token_budget_batches(lengths, token_budget):
            logprobs, _ = common.response_logprobs(model, [prompt_ids[i] for i in batch],
                                                   [response_ids[i] for i in batch], temperature, pad_token_id)
            for row, i in enumerate(batch):
                result[i] = logprobs[row, :len(response_ids[i])].float().cpu().tolist()
    return result


# ----------------------------------------------------------------------------------------------
# The stage: sample, recompute log-probs, score; chunk by chunk, every process its share of the chunks
# ----------------------------------------------------------------------------------------------

def collect_chunk(args: Args, engine, model, tokenizer, examples: list[dict], prompt_ids: list[list[int]],
                  chunk_index: int, indices: list[int], progress=None) -> tuple[list[dict], float]:
    """Steps 1-3 for the prompts of one chunk; returns (rollout rows, seconds spent sampling)."""
    chunk_prompts = [prompt_ids[i] for i in indices]
    # 1. y_k ~ beta(. | x), K per prompt; one seed per chunk, so a resumed chunk is sampled exactly as before
    start = time.perf_counter()
    responses = engine.generate(chunk_prompts, args.k, args.temperature, args.top_p, args.max_new_tokens,
                                seed=derive_seed(args.seed, chunk_index), progress=progress)
    sampling_seconds = time.perf_counter() - start
    engine.release_memory(keep_weights=True)  # vLLM sleeps (CUDA): the log-prob pass below gets its memory
    # 2. log beta(y_{k,t} | x, y_{k,<t}) at the sampling temperature, recomputed by a forward pass
    flat_logprobs = behavior_logprobs(model, [p for p, group in zip(chunk_prompts, responses) for _ in group],
                                      [r for group in responses for r in group], args.temperature,
                                      tokenizer.pad_token_id, args.logprob_token_budget)
    # 3. r_k = reward(y_k, gold) in {0, 1}; a response cut at the token limit needs an explicit final answer
    rows = []
    for n, (i, group) in enumerate(zip(indices, responses)):
        example = examples[i]
        texts = tokenizer.batch_decode(group, skip_special_tokens=True)
        finished = [args.last_number_when_cut or (bool(ids) and ids[-1] in engine.stop_ids) for ids in group]
        row = {"id": example["id"], "prompt": example["prompt"], "answer": example["answer"],
               "prompt_ids": prompt_ids[i], "response_ids": group, "responses": texts,
               "behavior_logprobs": flat_logprobs[n * args.k:(n + 1) * args.k],
               "rewards": [common.reward(text, example["answer"], done) for text, done in zip(texts, finished)],
               "temperature": args.temperature}
        rows.append(row | {key: example[key] for key in ("skill", "source") if key in example})
    return rows, sampling_seconds


def collect_rollouts(args: Args) -> None:
    rank, world, device = M.init_distributed()
    backend = M.choose_backend(args.backend)
    examples = common.load_data_files(args.data)
    tokenizer = M.load_tokenizer(args.model)
    prompt_ids = [common.encode_prompt(tokenizer, common.format_prompt(tokenizer, e["prompt"], args.system_prompt))
                  for e in examples]
    check_prompt_lengths(args.model, examples, prompt_ids)

    out = Path(args.out)
    store = M.ChunkStore(f"{out}.parts", sampling_settings(args, backend))
    chunks = chunk_ranges(len(examples), args.chunk_size)
    finished = M.open_chunk_store(store, rank)
    todo = M.shard([c for c in range(len(chunks)) if c not in finished], rank, world)
    tokens, sampling_seconds = 0, 0.0
    # Under torchrun, building a vLLM engine is a collective over all ranks (its external_launcher executor joins
    # process groups and all-reduces the free memory): every rank builds it, even one with no chunk to sample.
    if todo or backend == "vllm":
        M.plan_memory(args.model, device, "collect", args.logprob_token_budget, False,
                      args.gpu_memory_utilization if backend == "vllm" else 0.0,
                      "--gpu-memory-utilization or --logprob-token-budget")
        model = M.load_model(args.model, device, dtype=torch.float32).eval()  # beta, float32 for the log-probs
        engine = M.make_engine(backend, model, tokenizer, args.model, args.seed, args.hf_batch_size * args.k,
                               gpu_memory_utilization=args.gpu_memory_utilization,
                               kv_cache_gib=args.vllm_kv_cache_gib, enforce_eager=args.vllm_enforce_eager)
        progress = tqdm(total=sum(len(chunks[c]) for c in todo) * args.k, unit="response", disable=rank != 0,
                        desc=f"sampling ({backend}, this process)")
        for c in todo:
            rows, seconds = collect_chunk(args, engine, model, tokenizer, examples, prompt_ids, c, list(chunks[c]),
                                          progress)
            store.save(c, rows)
            tokens += sum(len(r) for row in rows for r in row["response_ids"])
            sampling_seconds += seconds
    tokens, sampling_seconds = M.all_sum([tokens, sampling_seconds], device)
    M.barrier()
    if rank == 0:
        merge(args, store, len(chunks), backend, tokens, sampling_seconds)
    M.finish_distributed()


# ----------------------------------------------------------------------------------------------
# Plumbing of this stage: input checks, settings, the final merge
# ----------------------------------------------------------------------------------------------

def check_args(args: Args) -> None:
    if not args.model or not args.data or not args.out:
        raise DataError("--model, --data and --out are required")
    if args.k < 1 or args.temperature <= 0 or args.chunk_size < 1 or args.hf_batch_size < 1:
        raise DataError("--k, --chunk-size and --hf-batch-size must be >= 1 and --temperature > 0")
    M.check_model(args.model)
    common.load_data_files(args.data)  # every data file parsed before any model is loaded


def check_prompt_lengths(model: str, examples: list[dict], prompt_ids: list[list[int]]) -> None:
    """A prompt that fills the model's context leaves no room for a response: say which one."""
    from transformers import AutoConfig

    context = M.context_length(AutoConfig.from_pretrained(model))
    for example, ids in zip(examples, prompt_ids):
        if context is not None and len(ids) >= context:
            raise DataError(f"prompt {example['id']!r} has {len(ids)} tokens, the model's context is {context}: "
                            f"no room for a response")


def sampling_settings(args: Args, backend: str) -> dict:
    settings = {key: getattr(args, key) for key in SAMPLING_SETTINGS} | {"backend": backend}
    settings["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    settings["data"] = [str(Path(p).resolve()) for p in args.data]
    return settings


def merge(args: Args, store: M.ChunkStore, num_chunks: int, backend: str, tokens: float, seconds: float) -> None:
    """Every prompt once, in input order, written atomically with its summary; then the chunk store goes."""
    out = Path(args.out)
    rows = [row for c in range(num_chunks) for row in store.load(c)]
    M.write_jsonl(out, rows)
    summary = summarize(rows, args.k) | {
        "backend": backend, "tokens_generated_this_run": int(tokens),
        "sampling_seconds_this_run": round(seconds, 3),  # summed over processes
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "timed": "sampling calls only, per process", "settings": store.settings}
    M.write_json(summary_path(args), summary)
    store.remove()
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    print(f"wrote {out} and {summary_path(args)}")


def summary_path(args: Args) -> Path:
    return Path(args.out).with_name(Path(args.out).name.removesuffix(".jsonl") + ".summary.json")


def earlier_settings(args: Args) -> dict | None:
    """The settings OUT was made with (from OUT.summary.json), None when there is no complete OUT."""
    if not Path(args.out).exists() or Path(f"{args.out}.parts").exists() or not summary_path(args).exists():
        return None
    return json.loads(summary_path(args).read_text()).get("settings")


def check_directions(args: Args) -> None:
    """Prompts whose K rewards are all equal carry no gradient; refuse a file with fewer than --min-mixed others."""
    summary = json.loads(summary_path(args).read_text())
    if summary["prompts_with_mixed_rewards"] < args.min_mixed:
        raise DataError(f"{args.out}: only {summary['prompts_with_mixed_rewards']} of {summary['prompts']} prompts "
                        f"have mixed rewards (pass rate {summary['mean_pass_rate']:.3f} over {args.k} responses "
                        f"each); at least {args.min_mixed} are needed to define a gradient direction. Try more "
                        f"responses per prompt (--k; VAL_K in run_cropi.sh), easier prompts, another temperature, "
                        f"or another model")


def main(args: Args) -> None:
    check_args(args)
    earlier = earlier_settings(args)
    if earlier is not None and earlier == sampling_settings(args, M.choose_backend(args.backend)):
        print(f"{args.out} is already complete with these settings; nothing to do")
    else:
        if earlier is not None:
            print(f"{args.out} was made with other settings: collecting again")
        M.seed_everything(args.seed)
        collect_rollouts(args)
    check_directions(args)


if __name__ == "__main__":  # the guard vLLM needs: its engine workers are spawned processes
    M.run_main(main, Args)
