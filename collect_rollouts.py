"""Step 0 of CROPI: offline rollouts of the behaviour policy beta = the initial model.

For every prompt x of the data files: sample K responses y_1..y_K ~ beta(. | x) (release: K=8, temperature 0.5,
top_p 1, up to 2048 new tokens), score each with the verifiable 0/1 reward r_k = reward(y_k, gold), and recompute
the behaviour log-probs log beta(y_{k,t} | x, y_{k,<t}) with a transformers forward pass of the initial model at the
sampling temperature (float32). The sampler's own log-probs differ numerically from a training forward pass; the
recomputed ones make the importance ratio rho = pi_theta / beta exactly 1 at stage 0 (sketch_grads.py).
These rollouts are made ONCE and reused in every stage.

Reads:  --model (HF folder or hub name), one or more --data files (.jsonl/.parquet, see common.load_examples).
Writes: OUT.jsonl, one line per prompt (in input order) with the fields
          id, prompt, answer, prompt_ids, response_ids, responses, behavior_logprobs, rewards, temperature
        (+ "skill"/"source" when the data row has them), and OUT.summary.json (pass-rate histogram, share of
        prompts whose K rewards are all equal, tokens generated, tokens/s, backend).
Resumable: finished chunks of prompts are appended to OUT.jsonl.partial (settings in OUT.jsonl.partial.json);
a re-run continues where a killed run stopped and produces the same rows (every chunk has its own seed).

Usage: python collect_rollouts.py --model demo/model --data demo/data/train.jsonl --out runs/rollouts.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
from common import DataError, arg


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
    num_gpus: int = arg(0, "GPUs to use, one data-parallel worker process per group of --tensor-parallel-size "
                           "GPUs (0 = all visible GPUs; on a CPU machine N > 1 runs N CPU worker processes)")
    tensor_parallel_size: int = arg(1, "vLLM: GPUs per engine (for models too big for one GPU)")
    gpu_memory_utilization: float = arg(0.6, "vLLM: share of GPU memory for the engine; the rest holds the "
                                             "transformers copy of the model that recomputes the log-probs")
    vllm_kv_cache_gib: float = arg(0.0, "vLLM: KV-cache size in GiB (0 = sized by --gpu-memory-utilization; on "
                                        "a CPU machine that is a share of the RAM, so set e.g. 1)")
    vllm_enforce_eager: bool = arg(False, "vLLM: skip torch.compile / CUDA graphs (quicker start-up, slower "
                                          "steps: for tests and short runs)")
    chunk_size: int = arg(64, "prompts per chunk; each chunk is seeded on its own and flushed to the partial file")
    hf_batch_size: int = arg(16, "hf backend: prompts per generate() call (each with K sequences)")
    logprob_token_budget: int = arg(16384, "behaviour log-prob pass: at most this many (padded) tokens per forward")
    shard_index: int = arg(0, "set by the parent for data-parallel workers: this worker's index")
    num_shards: int = arg(1, "set by the parent for data-parallel workers: number of workers (1 = no workers)")


# Settings that change the sampled rows: a partial file made with other values must not be continued.
SAMPLING_SETTINGS = ("model", "data", "k", "temperature", "top_p", "max_new_tokens", "seed", "backend",
                     "system_prompt", "chunk_size", "hf_batch_size")


# ----------------------------------------------------------------------------------------------
# Small pure pieces (unit-tested)
# ----------------------------------------------------------------------------------------------

def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (seed, chunk index, ...): independent streams without accidental overlaps.

    62 bits leave room for vLLM's seed + sample index and stay a valid int64.
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 2)


def chunk_ranges(n_prompts: int, chunk_size: int) -> list[range]:
    """Prompt indices of every chunk: consecutive runs of `chunk_size` in input order."""
    return [range(start, min(start + chunk_size, n_prompts)) for start in range(0, n_prompts, chunk_size)]


def stop_token_ids(tokenizer, generation_config) -> set[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids (e.g. Qwen2.5: <|im_end|> and <|endoftext|>)."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return {tokenizer.eos_token_id, *configured}


def clean_response(token_ids: list[int], stop_ids: set[int], pad_token_id: int | None) -> list[int]:
    """Cut a generated sequence after its first stop token (EOS, kept) and drop pad tokens (left by batched
    generate)."""
    response = []
    for token in token_ids:
        if token in stop_ids:
            response.append(token)
            break
        if token != pad_token_id:
            response.append(token)
    return response


def token_budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that (rows x longest row) <= token_budget in every batch.

    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest first: the first one sets the width
        if current and (len(current) + 1) * width > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


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
        "tokens_generated": sum(lengths),
        "mean_response_tokens": sum(lengths) / len(lengths),
    }


# ----------------------------------------------------------------------------------------------
# The resumable partial file
# ----------------------------------------------------------------------------------------------

def partial_paths(out: Path) -> list[Path]:
    """OUT.jsonl.partial, plus the per-worker OUT.jsonl.partial.w<i> files of a data-parallel run."""
    return sorted(out.parent.glob(out.name + ".partial")) + sorted(out.parent.glob(out.name + ".partial.w*[0-9]"))


def read_partial(path: Path) -> dict[str, dict]:
    """Rows of a partial file by id. A trailing line cut by a kill is dropped (and truncated off the file)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    try:  # the file now holds complete lines only
        return {row["id"]: row for _, row in common.iter_jsonl(path)}
    except DataError as e:
        raise DataError(f"{e}; delete the file to start over") from None


def check_or_write_settings(path: Path, settings: dict) -> None:
    """Refuse to continue a partial file made with other sampling settings; write them on a fresh start."""
    if path.exists():
        stored = json.loads(path.read_text())
        differ = {key: (stored.get(key), settings[key]) for key in settings if stored.get(key) != settings[key]}
        if differ:
            details = "; ".join(f"{key}: partial has {old!r}, now {new!r}" for key, (old, new) in differ.items())
            raise SystemExit(f"error: {path} was made with other settings ({details}). Re-run with the same "
                             f"settings, or delete {path.name.removesuffix('.json')}* to start over.")
    else:
        common.write_json(path, settings)


# ----------------------------------------------------------------------------------------------
# Sampling backends: both return, per prompt, K lists of response token ids (EOS kept, no padding)
# ----------------------------------------------------------------------------------------------

# generate() fills unset options from the model's generation_config.json (e.g. Qwen2.5: top_k 20, repetition
# penalty 1.05). Pin them to plain temperature + top_p sampling, as the release's vLLM sampling does.
PLAIN_SAMPLING = dict(top_k=0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0)


def context_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_prompt_lengths(model: str, examples: list[dict], prompt_ids: list[list[int]]) -> None:
    """A prompt that fills the model's context leaves no room for a response: say which one."""
    from transformers import AutoConfig

    context = context_length(AutoConfig.from_pretrained(model))
    for example, ids in zip(examples, prompt_ids):
        if context is not None and len(ids) >= context:
            raise SystemExit(f"error: prompt {example['id']!r} has {len(ids)} tokens, the model's context is "
                             f"{context}: no room for a response")


class HFSampler:
    """transformers generate(): prompts left-padded in batches, num_return_sequences=K, seeded per chunk."""

    def __init__(self, model, tokenizer, args: Args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.context = context_length(model.config)
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)

    def sample(self, prompt_ids: list[list[int]], chunk_seed: int, prompt_indices: list[int]) -> list[list[list[int]]]:
        args, tokenizer, device = self.args, self.tokenizer, next(self.model.parameters()).device
        torch.manual_seed(chunk_seed)  # the whole chunk consumes one RNG stream: a resumed chunk is identical
        responses = []
        for start in range(0, len(prompt_ids), args.hf_batch_size):
            batch = prompt_ids[start:start + args.hf_batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, p in enumerate(batch):  # left padding: every prompt ends where generation starts
                input_ids[i, width - len(p):] = torch.tensor(p)
                attention_mask[i, width - len(p):] = 1
            max_new = args.max_new_tokens if self.context is None else min(args.max_new_tokens, self.context - width)
            with torch.no_grad(), common.autocast(device):
                output = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
                    temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new,
                    num_return_sequences=args.k, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(self.stop_ids), **PLAIN_SAMPLING)
            generated = output[:, width:].tolist()  # rows: prompt 0's K samples, then prompt 1's, ...
            for i in range(len(batch)):
                responses.append([clean_response(generated[i * args.k + j], self.stop_ids, tokenizer.pad_token_id)
                                  for j in range(args.k)])
        return responses


class VLLMSampler:
    """vLLM engine fed with the prompt token ids (not text, so the ids match exactly); one seed per prompt."""

    def __init__(self, tokenizer, args: Args):
        from vllm import LLM

        from transformers import GenerationConfig

        self.tokenizer, self.args = tokenizer, args
        try:
            generation_config = GenerationConfig.from_pretrained(args.model)
        except OSError:  # no generation_config.json: the tokenizer's EOS is the only stop token
            generation_config = None
        self.stop_ids = stop_token_ids(tokenizer, generation_config)  # vLLM stops on the same ones
        self.llm = LLM(model=args.model, tokenizer=args.model, seed=args.seed,
                       tensor_parallel_size=args.tensor_parallel_size,
                       gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.vllm_enforce_eager,
                       kv_cache_memory_bytes=int(args.vllm_kv_cache_gib * 2 ** 30) or None)

    def sample(self, prompt_ids: list[list[int]], chunk_seed: int, prompt_indices: list[int]) -> list[list[list[int]]]:
        from vllm import SamplingParams, TokensPrompt

        args = self.args
        # A seed per prompt (vLLM gives the K samples seed, seed+1, ...): results do not depend on batching.
        params = [SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p,
                                 max_tokens=args.max_new_tokens, seed=derive_seed(args.seed, index),
                                 skip_special_tokens=False)
                  for index in prompt_indices]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        return [[clean_response(list(sample.token_ids), self.stop_ids, None)
                 for sample in output.outputs] for output in outputs]


# ----------------------------------------------------------------------------------------------
# Behaviour log-probs: log beta(y_t | x, y_<t) at the sampling temperature, by a transformers forward pass
# ----------------------------------------------------------------------------------------------

def behavior_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float,
                      pad_token_id: int, token_budget: int) -> list[list[float]]:
    """log softmax(logits / T)[y_t] of every response token, in batches of at most token_budget tokens.

    Computed under common.autocast, exactly as sketch_grads.py computes pi_theta's log-probs (bf16 autocast on
    CUDA, float32 on CPU), so that at stage 0 the importance ratio rho = pi_theta / beta is 1 up to batching noise.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    result: list[list[float]] = [[] for _ in lengths]
    device = next(model.parameters()).device
    with torch.no_grad(), common.autocast(device):
        for batch in token_budget_batches(lengths, token_budget):
            logprobs, mask = common.response_logprobs(model, [prompt_ids[i] for i in batch],
                                                      [response_ids[i] for i in batch], temperature, pad_token_id)
            for row, i in enumerate(batch):
                result[i] = logprobs[row, :len(response_ids[i])].float().cpu().tolist()
    return result


# ----------------------------------------------------------------------------------------------
# One worker: sample, score and recompute log-probs chunk by chunk, appending to its partial file
# ----------------------------------------------------------------------------------------------

def load_all_examples(paths: list[str]) -> list[dict]:
    examples, first_seen = [], {}
    for path in paths:
        for example in common.load_examples(path):
            if example["id"] in first_seen:
                raise DataError(f"{path}: id {example['id']!r} already used in {first_seen[example['id']]}; "
                                f"ids must be unique across the --data files")
            first_seen[example["id"]] = path
            examples.append(example)
    return examples


def collect(args: Args, backend: str, examples: list[dict], prompt_ids: list[list[int]], done: set[str],
            partial: Path) -> tuple[int, float]:
    """Run every unfinished chunk of this worker; returns (tokens generated, seconds spent sampling)."""
    chunks = [(c, r) for c, r in enumerate(chunk_ranges(len(examples), args.chunk_size))
              if c % args.num_shards == args.shard_index and any(examples[i]["id"] not in done for i in r)]
    if not chunks:
        return 0, 0.0
    device = common.get_device()
    tokenizer = common.load_tokenizer(args.model)
    sampler = (VLLMSampler(tokenizer, args) if backend == "vllm" else None)
    model = common.load_model(args.model, device, dtype=torch.float32).eval()  # beta, float32 for the log-probs
    if sampler is None:
        sampler = HFSampler(model, tokenizer, args)
    tokens, sampling_seconds = 0, 0.0
    with open(partial, "a", encoding="utf-8") as f:
        for chunk_index, indices in tqdm(chunks, desc=f"chunks ({backend})", disable=args.num_shards > 1):
            indices = list(indices)
            chunk_prompts = [prompt_ids[i] for i in indices]
            # 1. y_k ~ beta(. | x), K per prompt (a partly written chunk is re-sampled whole: same seed, same rows)
            start = time.perf_counter()
            responses = sampler.sample(chunk_prompts, derive_seed(args.seed, chunk_index), indices)
            sampling_seconds += time.perf_counter() - start
            # 2. log beta(y_{k,t} | x, y_{k,<t}) at the sampling temperature, recomputed by a forward pass
            flat_prompts = [p for p, group in zip(chunk_prompts, responses) for _ in group]
            flat_responses = [r for group in responses for r in group]
            flat_logprobs = behavior_logprobs(model, flat_prompts, flat_responses, args.temperature,
                                              tokenizer.pad_token_id, args.logprob_token_budget)
            # 3. r_k = reward(y_k, gold) in {0, 1}
            lines = []
            for n, (i, group) in enumerate(zip(indices, responses)):
                example = examples[i]
                if example["id"] in done:
                    continue
                texts = tokenizer.batch_decode(group, skip_special_tokens=True)
                row = {"id": example["id"], "prompt": example["prompt"], "answer": example["answer"],
                       "prompt_ids": prompt_ids[i], "response_ids": group, "responses": texts,
                       "behavior_logprobs": flat_logprobs[n * args.k:(n + 1) * args.k],
                       "rewards": [common.reward(text, example["answer"]) for text in texts],
                       "temperature": args.temperature}
                row |= {key: example[key] for key in ("skill", "source") if key in example}
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                tokens += sum(len(r) for r in group)
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
    return tokens, sampling_seconds


def run_workers(args: Args, n_workers: int) -> None:
    """Data parallel: one process per group of GPUs, each taking every n-th chunk into its own partial file.

    One engine per GPU (rather than one tensor-parallel engine over all of them) keeps small models fast and works
    for any head count (Qwen2.5-1.5B's 12 heads do not split over 8 GPUs).
    """
    processes = []
    for worker in range(n_workers):
        gpus = range(worker * args.tensor_parallel_size, (worker + 1) * args.tensor_parallel_size)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        argv = [sys.executable, str(Path(__file__).resolve())]
        for field in dataclasses.fields(Args):
            value = getattr(args, field.name)
            if field.name in ("shard_index", "num_shards", "num_gpus"):
                continue
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
                continue
            for item in (value if isinstance(value, list) else [value]):
                argv += [flag, str(item)]
        argv += ["--shard-index", str(worker), "--num-shards", str(n_workers), "--num-gpus", "1"]
        processes.append(subprocess.Popen(argv, env=env))
    failed = [worker for worker, process in enumerate(tqdm(processes, desc="workers")) if process.wait() != 0]
    if failed:
        raise SystemExit(f"error: data-parallel worker(s) {failed} failed; re-run the same command to resume")


def main(args: Args) -> None:
    if not args.model or not args.data or not args.out:
        raise SystemExit("error: --model, --data and --out are required")
    if args.k < 1 or args.temperature <= 0 or args.chunk_size < 1 or args.hf_batch_size < 1:
        raise SystemExit("error: --k, --chunk-size and --hf-batch-size must be >= 1 and --temperature > 0")
    out = Path(args.out)
    summary_path = out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
    if out.exists() and not partial_paths(out):
        print(f"{out} is already complete; nothing to do (delete it to collect again)")
        return
    common.seed_everything(args.seed)
    backend = common.choose_backend(args.backend)
    examples = load_all_examples(args.data)
    tokenizer = common.load_tokenizer(args.model)
    prompt_ids = [common.encode_prompt(tokenizer, common.format_prompt(tokenizer, e["prompt"], args.system_prompt))
                  for e in examples]
    check_prompt_lengths(args.model, examples, prompt_ids)

    settings = {key: getattr(args, key) for key in SAMPLING_SETTINGS} | {"backend": backend}
    settings["model"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    settings["data"] = [str(Path(p).resolve()) for p in args.data]
    settings_path = Path(f"{out}.partial.json")
    done_before = {}
    for path in partial_paths(out):
        done_before |= read_partial(path)
    unknown = sorted(set(done_before) - {e["id"] for e in examples})
    if unknown:
        raise SystemExit(f"error: the partial files of {out} hold ids not in the data (e.g. {unknown[0]!r}); "
                         f"delete {out.name}.partial* to start over")

    n_workers = args.num_gpus or max(torch.cuda.device_count(), 1)
    n_workers = max(n_workers // args.tensor_parallel_size, 1)
    start = time.perf_counter()
    if args.num_shards > 1:  # a data-parallel worker started by run_workers: collect, and leave merging to the parent
        partial = out.with_name(f"{out.name}.partial.w{args.shard_index}")
        collect(args, backend, examples, prompt_ids, set(done_before), partial)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    check_or_write_settings(settings_path, settings)
    if n_workers > 1:
        run_workers(args, n_workers)
        sampling_seconds, timed = time.perf_counter() - start, "wall time of the data-parallel workers"
    else:
        _, sampling_seconds = collect(args, backend, examples, prompt_ids, set(done_before),
                                      out.with_name(f"{out.name}.partial"))
        timed = "sampling calls only"

    # Merge: every prompt once, in input order, written atomically; then the partial files go.
    rows_by_id = {}
    for path in partial_paths(out):
        rows_by_id |= read_partial(path)
    missing = [e["id"] for e in examples if e["id"] not in rows_by_id]
    if missing:
        raise SystemExit(f"error: {len(missing)} prompts have no rollouts (e.g. {missing[0]!r}); re-run to resume")
    rows = [rows_by_id[e["id"]] for e in examples]
    common.write_jsonl(out, rows)
    new_tokens = sum(len(r) for row in rows if row["id"] not in done_before for r in row["response_ids"])
    summary = summarize(rows, args.k) | {
        "backend": backend,
        "tokens_generated_this_run": new_tokens,
        "sampling_seconds_this_run": round(sampling_seconds, 3),
        "tokens_per_second": round(new_tokens / sampling_seconds, 1) if sampling_seconds > 0 else None,
        "timed": timed,
        "settings": settings,
    }
    common.write_json(summary_path, summary)
    for path in partial_paths(out) + [settings_path]:
        path.unlink()
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    print(f"wrote {out} and {summary_path}")


if __name__ == "__main__":  # the guard vLLM needs: its engine workers are spawned processes
    common.run_main(main, Args)
