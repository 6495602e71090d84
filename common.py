"""The maths and data formats that two or more CROPI stages share.

Each piece is a small function with a unit test in tests/test_common.py (numbers worked by hand):
data loading (GSM8K, MATH and generic rows; the rollouts schema), the verifiable 0/1 reward, prompt formatting,
per-token log-probs of responses, and GRPO group advantages; the Kronecker-factored projection of a layer's gradient
(sketch_grads.py --projector kronecker and machinery.py's hooks; tested in tests/test_common.py too). The plumbing
(files, processes, engines) is in machinery.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


# The system prompt of the authors' release.
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


class DataError(ValueError):
    """Bad input: the message names the file and line, or the flag, at fault. run_main prints it as one line."""


# ----------------------------------------------------------------------------------------------
# The verifiable reward
# ----------------------------------------------------------------------------------------------

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def extract_final_answer(completion: str, finished: bool = True) -> str | None:
    r"""The model's final answer: the last \boxed{...}, else "#### X", else "answer is X", else the last number.

    The last-number fallback applies to finished responses only (ended by a stop token): a response cut at the token
    limit mid-sentence ("... the final weight of the box was") has no answer yet, whatever its last number is.
    """
    boxed = last_boxed_content(completion)
    if boxed is not None:
        return boxed
    for marker in (r"####\s*([^\n]+)", r"answer is[:\s]*\$?\s*([^\n]+?)\s*(?:\.\s|\.$|$|\n)"):
        found = re.findall(marker, completion, flags=re.IGNORECASE)
        if found:
            return found[-1].strip()
    numbers = re.findall(_NUMBER, completion) if finished else []
    return numbers[-1] if numbers else None


def _normalize(answer: str) -> str:
    """Strip what math-verify should not see: thousands separators, dollar signs, a trailing period."""
    answer = answer.strip().rstrip(".").strip()
    answer = answer.replace("\\$", "").replace("$", "")
    answer = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
    return answer.strip()


def _as_number(text: str) -> float | None:
    try:
        if re.fullmatch(r"-?\d+/\d+", text):
            numerator, denominator = text.split("/")
            return int(numerator) / int(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def reward(completion: str, answer: str, finished: bool = True) -> float:
    """1.0 if the completion's final answer equals the gold answer mathematically, else 0.0. Never raises.

    finished = False (the response hit the token limit without a stop token): only an explicit final answer
    (\\boxed{}, "####", "answer is") counts, not the last number of unfinished reasoning.
    """
    try:
        predicted = extract_final_answer(completion or "", finished)
        if predicted is None:
            return 0.0
        predicted, gold = _normalize(predicted), _normalize(str(answer))
        if not predicted:
            return 0.0
        if predicted == gold:
            return 1.0
        pred_num, gold_num = _as_number(predicted), _as_number(gold)
        if pred_num is not None and gold_num is not None:  # plain numbers: no need for a symbolic check
            return float(math.isclose(pred_num, gold_num, rel_tol=1e-9, abs_tol=1e-9))
        return float(_math_verify_equal(gold, predicted))
    except Exception:
        return 0.0


def _math_verify_equal(gold: str, predicted: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which Python allows only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))  # gold first


# ----------------------------------------------------------------------------------------------
# GRPO group advantages
# ----------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_k = (r_k - mean(r)) / (std(r) + eps) over the last dim (the K responses of one prompt).

    std is the UNBIASED sample std (divide by K-1), as in the authors' release (torch.std's default).
    A group whose rewards are all equal gets A = 0 (and hence no gradient). A group of one response has no
    spread to normalise by, and gets A = 0 as well.
    """
    rewards = rewards.float()
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)  # correction=1: unbiased
    return (rewards - mean) / (std + eps)


# ----------------------------------------------------------------------------------------------
# Per-token log-probs of responses (shared by behaviour policy beta and current policy pi_theta)
# ----------------------------------------------------------------------------------------------

# A chunk of the LM head holds at most this many logits (256 MiB in float32): 441 tokens of a 151,936-token
# vocabulary. The full logits of a micro-batch are far larger: 16,384 tokens x 151,936 x 4 bytes = 10 GB per copy.
LOGITS_PER_CHUNK = 2 ** 26
# ... and at most this many tokens: the last chunk is padded to the full chunk, which must stay cheap for a small
# vocabulary (the demo's 99 words would otherwise make chunks of 677,000 tokens).
MAX_CHUNK_TOKENS = 4096


def logit_chunk_tokens(vocab_size: int) -> int:
    """Tokens per LM-head chunk: LOGITS_PER_CHUNK // vocab_size, within [1, MAX_CHUNK_TOKENS]."""
    return max(1, min(MAX_CHUNK_TOKENS, LOGITS_PER_CHUNK // vocab_size))


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The LM head's input [B, T, H]: the base model's last hidden states (after its final norm), without the
    [B, T, vocab] logits.

    The call goes through `model` itself, so that a DistributedDataParallel wrapper still syncs the gradients, with
    logits_to_keep=1 (the head computes the last position only); a forward hook on the base model (GPT-2's
    `transformer`, Llama's and Qwen2's `model`) keeps its output.
    """
    causal_lm = getattr(model, "module", model)  # unwrap DistributedDataParallel
    captured = []
    hook = causal_lm.base_model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[0]


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                  temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and the entropy [n] of n tokens from their hidden states [n, H], in float32 (autocast off).

    z = (h W^T + b) / T,   log pi(y) = z_y - logsumexp(z),   entropy = -sum_v pi_v log pi_v   (zeros unless asked)
    z is computed as (h / T) W^T + b / T, so that each [n, vocab] tensor is made once.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        scaled_bias = None if bias is None else bias.float() / temperature
        logits = torch.nn.functional.linear(hidden.float() / temperature, weight.float(), scaled_bias)
        log_probs = torch.log_softmax(logits, dim=-1)
        del logits  # freed before the next [n, vocab] tensor is made
        token_logprobs = log_probs.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else torch.zeros_like(token_logprobs)
    return token_logprobs, entropy


def chunked_head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                          with_entropy: bool = False, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """head_logprobs of N tokens [N, H], chunk_tokens at a time (0: logit_chunk_tokens of the vocabulary).

    Peak memory is O(chunk x vocab), not O(N x vocab): each chunk's logits are freed after the forward and
    recomputed in the backward (torch.utils.checkpoint). The last chunk is zero-padded to the full chunk size, so
    every chunk is one matrix product of the same shape and a token's result does not depend on the other tokens
    of the batch (batch-invariant).
    """
    chunk = chunk_tokens or logit_chunk_tokens(head.weight.shape[0])
    count, padding = len(targets), -len(targets) % chunk
    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, padding))
    targets = torch.nn.functional.pad(targets, (0, padding))
    pieces = [torch.utils.checkpoint.checkpoint(head_logprobs, h, head.weight, head.bias, y, temperature,
                                                with_entropy, use_reentrant=False)
              for h, y in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat([p[0] for p in pieces])[:count], torch.cat([p[1] for p in pieces])[:count]


def response_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], temperature: float,
                      pad_token_id: int = 0, with_entropy: bool = False, chunk_tokens: int = 0):
    """log pi(y_t | x, y_<t) of every response token, at sampling temperature T (softmax of logits / T).

    Rows are prompt + response, right-padded (so absolute positions start at 0 on every row). Only the hidden
    states of the response positions go through the LM head, in float32 and in chunks (chunked_head_logprobs).
    Returns (logprobs [B, Lr], mask [B, Lr]) and, with `with_entropy`, the per-token entropy [B, Lr] too;
    Lr is the longest response, mask is 1 on real response tokens. Gradients flow unless called under no_grad.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    batch = len(prompt_ids)
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    response_lengths = torch.tensor([len(r) for r in response_ids], device=device)
    total = int((prompt_lengths + response_lengths).max())
    longest_response = int(response_lengths.max())

    input_ids = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), device=device)
        attention_mask[i, :len(p) + len(r)] = 1
    hidden = final_hidden_states(model, input_ids, attention_mask)

    # Response token t of row i sits at position len(p_i) + t and is predicted by the hidden state at len(p_i) + t - 1.
    rows = torch.repeat_interleave(torch.arange(batch, device=device), response_lengths)
    steps = torch.cat([torch.arange(len(r), device=device) for r in response_ids])
    targets = torch.tensor([token for r in response_ids for token in r], dtype=torch.long, device=device)
    head = getattr(model, "module", model).get_output_embeddings()
    token_logprobs, token_entropy = chunked_head_logprobs(hidden[rows, prompt_lengths[rows] - 1 + steps], head,
                                                          targets, temperature, with_entropy, chunk_tokens)
    mask = (torch.arange(longest_response, device=device)[None, :] < response_lengths[:, None]).float()
    logprobs = torch.zeros(batch, longest_response, device=device).index_put((rows, steps), token_logprobs)
    if not with_entropy:
        return logprobs, mask
    entropy = torch.zeros(batch, longest_response, device=device).index_put((rows, steps), token_entropy)
    return logprobs, mask, entropy


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

def format_prompt(tokenizer, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The tokenizer's chat template when it has one, else a plain "system / question / Answer:" template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{prefix}Question: {question}\nAnswer:"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of an already formatted prompt (chat templates carry their own special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Data: .jsonl files (errors name file and line); GSM8K, MATH, generic rows -> {id, prompt, answer}; rollouts
# ----------------------------------------------------------------------------------------------

def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for every non-empty line; DataError names file and line on bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}")
            yield line_number, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox{...}) in text, nested braces handled; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5" form: the argument runs to the next space or "$"
        rest = text[start + len("\\boxed"):].strip()
        return re.split(r"[\s$]", rest, maxsplit=1)[0] or None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None  # unbalanced braces


def _row_to_example(obj: dict, where: str, default_id: str) -> dict:
    if "question" in obj and "answer" in obj:  # GSM8K: answer ends with "#### N"
        solution = str(obj["answer"])
        if "####" not in solution:
            raise DataError(f"{where}: GSM8K-style row has no '#### <answer>' in its answer field")
        prompt, answer = obj["question"], solution.rsplit("####", 1)[1].strip().replace(",", "")
    elif "problem" in obj and "solution" in obj:  # MATH: the gold answer is the last \boxed{...}
        answer = last_boxed_content(str(obj["solution"]))
        if answer is None:
            raise DataError(f"{where}: MATH-style row has no \\boxed{{...}} in its solution")
        prompt = obj["problem"]
    elif "prompt" in obj and "answer" in obj:
        prompt, answer = obj["prompt"], obj["answer"]
    else:
        raise DataError(f"{where}: row needs (question, answer), (problem, solution) or (prompt, answer); "
                        f"it has {sorted(obj)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: empty or non-text prompt")
    example = {"id": str(obj.get("id", default_id)), "prompt": prompt, "answer": str(answer).strip()}
    for extra in ("source", "skill"):
        if extra in obj:
            example[extra] = obj[extra]
    return example


def load_examples(path: str | os.PathLike) -> list[dict]:
    """Load a .jsonl (or .parquet) data file into rows {"id", "prompt", "answer"}.

    Ids are the file's own "id" field, else "<file stem>:<line number>" (stable across runs).
    """
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pandas and pyarrow (pip install pandas pyarrow)")
        records = enumerate(pd.read_parquet(path).to_dict("records"), start=1)
    else:
        records = iter_jsonl(path)
    examples, seen = [], set()
    for number, obj in records:
        example = _row_to_example(obj, f"{path}:{number}", f"{path.stem}:{number}")
        if example["id"] in seen:
            raise DataError(f"{path}:{number}: duplicate id {example['id']!r}")
        seen.add(example["id"])
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def load_data_files(paths: list[str]) -> list[dict]:
    """The rows of several data files, in order; ids must be unique across the files."""
    examples, first_seen = [], {}
    for path in paths:
        for example in load_examples(path):
            if example["id"] in first_seen:
                raise DataError(f"{path}: id {example['id']!r} already used in {first_seen[example['id']]}; "
                                f"ids must be unique across the data files")
            first_seen[example["id"]] = path
            examples.append(example)
    return examples


ROLLOUT_FIELDS = ("id", "prompt", "answer", "prompt_ids", "response_ids", "responses", "behavior_logprobs",
                  "rewards", "temperature")


def iter_rollouts(path: str | os.PathLike) -> Iterator[dict]:
    """Stream collect_rollouts.py's output row by row, checking its schema; DataError names file and line.

    Every row: id, prompt, answer, prompt_ids (list of int), response_ids (K lists of int), responses (K str),
    behavior_logprobs (K lists, one float per response token), rewards (K floats), temperature (float > 0).
    """
    count = 0
    for line_number, row in iter_jsonl(path):
        where = f"{path}:{line_number}"
        missing = [f for f in ROLLOUT_FIELDS if f not in row]
        if missing:
            raise DataError(f"{where}: rollout row lacks {missing}")
        k = len(row["response_ids"])
        if k == 0 or not row["prompt_ids"]:
            raise DataError(f"{where}: empty prompt_ids or response_ids")
        if not (len(row["responses"]) == len(row["behavior_logprobs"]) == len(row["rewards"]) == k):
            raise DataError(f"{where}: response_ids, responses, behavior_logprobs and rewards must all have "
                            f"K={k} entries")
        for ids, logprobs in zip(row["response_ids"], row["behavior_logprobs"]):
            if len(ids) != len(logprobs) or not ids:
                raise DataError(f"{where}: a response has {len(ids)} token ids but {len(logprobs)} behavior_logprobs")
        if not (isinstance(row["temperature"], (int, float)) and row["temperature"] > 0):
            raise DataError(f"{where}: temperature must be a number > 0, got {row['temperature']!r}")
        count += 1
        yield row
    if count == 0:
        raise DataError(f"{path}: no rollouts")


def read_rollouts(path: str | os.PathLike) -> list[dict]:
    """All rows of a rollouts file (see iter_rollouts), schema-checked."""
    return list(iter_rollouts(path))


def sample_rows(candidates: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Up to max_rows of the candidate row indices, a seeded uniform sample without replacement, sorted."""
    if max_rows <= 0 or len(candidates) <= max_rows:
        return np.sort(candidates)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=max_rows, replace=False))


PASS_RATE_BINS = ("0", "(0,.25]", "(.25,.5]", "(.5,.75]", "(.75,1)", "1")


def pass_rate_histogram(pass_rates: np.ndarray) -> dict[str, int]:
    """Counts of p = 0, the four quarters of (0, 1), and p = 1."""
    p = np.asarray(pass_rates, dtype=np.float64)
    masks = (p == 0, (p > 0) & (p <= .25), (p > .25) & (p <= .5), (p > .5) & (p <= .75), (p > .75) & (p < 1), p == 1)
    return {name: int(mask.sum()) for name, mask in zip(PASS_RATE_BINS, masks)}


# ----------------------------------------------------------------------------------------------
# Kronecker-factored projection of a layer's gradient (sketch_grads.py --projector kronecker, machinery's hooks)
# ----------------------------------------------------------------------------------------------

def kronecker_factor(k: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """P_out or P_in [k, dim] with N(0, 1/k) entries, so E[P^T P] = I and E<P_out G P_in^T, P_out H P_in^T> = <G, H>
    (vec(P_out G P_in^T) = (P_in kron P_out) vec(G)). A side of dim <= k is kept as it is: the identity."""
    if dim <= k:
        return torch.eye(dim, device=generator.device)
    return torch.randn(k, dim, generator=generator, device=generator.device).div_(k ** 0.5)


def group_outer_sums(outs: torch.Tensor, ins: torch.Tensor, row_group: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, k_out, k_in]: sum_t outs_t ins_t^T over the tokens t of each group's rows (outs [rows, T, k_out],
    ins [rows, T, k_in], row_group [rows]). With outs = P_out delta_t and ins = P_in x_t: P_out G P_in^T of each
    group's gradient G = sum_t delta_t x_t^T, never formed (one batched product per row, rows added to groups)."""
    per_row = torch.bmm(outs.transpose(1, 2), ins)
    return torch.zeros(groups, *per_row.shape[1:], device=outs.device).index_add_(0, row_group, per_row)
