"""The maths two or more CROPI stages share, each a small function unit-tested in
tests/test_common.py with numbers worked by hand: the verifiable 0/1 reward, GRPO group advantages,
per-token log-probs of responses (for beta, pi_theta and pi_old alike), prompt formatting.
Files, processes and engines are plumbing: the package plumbing/."""

from __future__ import annotations

import math
import re
import threading

import torch

from plumbing.data import last_boxed_content
from plumbing.distributed import autocast

# The system prompt of the authors' release.
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# ------------------------------------------------------------------------- the verifiable reward
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def extract_final_answer(completion: str, finished: bool = True) -> str | None:
    r"""The last \boxed{...}, else "#### X", else "answer is X", else (finished responses only:
    one cut at the token limit has no answer yet) the last number."""
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
    """Without thousands separators, dollar signs and a trailing period."""
    answer = answer.strip().rstrip(".").strip().replace("\\$", "").replace("$", "")
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer).strip()


def _as_number(text: str) -> float | None:
    try:
        if re.fullmatch(r"-?\d+/\d+", text):
            numerator, denominator = text.split("/")
            return int(numerator) / int(denominator)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def reward(completion: str, answer: str, finished: bool = True) -> float:
    """1.0 if the completion's final answer equals the gold answer mathematically, else 0.0.
    finished = False (cut at the token limit): only an explicit final answer counts."""
    try:
        predicted = extract_final_answer(completion or "", finished)
        if predicted is None or not _normalize(predicted):
            return 0.0
        predicted, gold = _normalize(predicted), _normalize(str(answer))
        if predicted == gold:
            return 1.0
        pred_number, gold_number = _as_number(predicted), _as_number(gold)
        if pred_number is not None and gold_number is not None:
            return float(math.isclose(pred_number, gold_number, rel_tol=1e-9, abs_tol=1e-9))
        return float(_math_verify_equal(gold, predicted))
    except Exception:
        return 0.0


# Longer or deeper answers are not handed to math-verify, whose parse can take seconds on them
# (10,000 nested braces: 6 s and 20 KB of warnings); the longest MATH answers are ~100 characters.
MAX_VERIFIED_CHARS, MAX_VERIFIED_DEPTH = 300, 10


def _brace_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


def _math_verify_equal(gold: str, predicted: str) -> bool:
    from math_verify import parse, verify

    for text in (gold, predicted):
        if len(text) > MAX_VERIFIED_CHARS or _brace_depth(text) > MAX_VERIFIED_DEPTH:
            return False

    # math-verify's timeouts use signal.alarm, which Python allows only in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))  # gold first


def score_responses(
    tokenizer, response_ids, answers, stop_ids: set[int], last_number_when_cut=False
):
    """r_k = reward(y_k, gold) of each response; one that ends without a stop token was cut at the
    token limit and needs an explicit final answer (unless last_number_when_cut)."""
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    finished = [last_number_when_cut or (bool(ids) and ids[-1] in stop_ids) for ids in response_ids]
    return [reward(text, answer, done) for text, answer, done in zip(texts, answers, finished)]


# ----------------------------------------------------------------------- GRPO group advantages
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A_k = (r_k - mean(r)) / (std(r) + eps) over the last dim (the K responses of a prompt).
    std is the UNBIASED sample std (K - 1), as in the authors' release. Equal rewards (or K = 1)
    give A = 0, hence no gradient."""
    rewards = rewards.float()
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    mean, std = rewards.mean(dim=-1, keepdim=True), rewards.std(dim=-1, keepdim=True)
    return (rewards - mean) / (std + eps)


# ------------------------------------------- per-token log-probs (beta, pi_theta, pi_old alike)
# An LM-head chunk holds at most 2^26 logits (256 MiB in float32: 441 tokens of Qwen's 151,936
# words; a micro-batch's full logits would be 16,384 x 151,936 x 4 B = 10 GB), and at most 4,096
# tokens (the last chunk is padded to a full one, which must stay cheap for a small vocabulary).
LOGITS_PER_CHUNK, MAX_CHUNK_TOKENS = 2**26, 4096


def head_logprobs(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    """log pi(target) and the entropy [n] of n tokens from their hidden states [n, H], float32:
    z = (h W^T + b) / T,  log pi(y) = z_y - logsumexp(z),  entropy = -sum_v pi_v log pi_v."""
    with torch.autocast(hidden.device.type, enabled=False):
        scaled_bias = None if bias is None else bias.float() / temperature
        logits = torch.nn.functional.linear(
            hidden.float() / temperature, weight.float(), scaled_bias
        )
        log_probs = torch.log_softmax(logits, dim=-1)
        del logits  # freed before the next [n, vocab] tensor is made
        token_logprobs = log_probs.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logprobs, entropy


def chunked_head_logprobs(hidden, head, targets, temperature: float, with_entropy: bool = False):
    """head_logprobs of N tokens, a chunk at a time: peak memory O(chunk x vocab), each chunk's
    logits recomputed in the backward (checkpoint). The last chunk is zero-padded, so every chunk is
    the same matrix product and a token's result does not depend on the batch (batch-invariant)."""
    vocab = head.weight.shape[0]
    chunk = max(1, min(MAX_CHUNK_TOKENS, LOGITS_PER_CHUNK // vocab))
    count, padding = len(targets), -len(targets) % chunk
    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, padding))
    targets = torch.nn.functional.pad(targets, (0, padding))
    pieces = []
    for h, y in zip(hidden.split(chunk), targets.split(chunk)):
        inputs = (h, head.weight, head.bias, y, temperature, with_entropy)
        pieces.append(
            torch.utils.checkpoint.checkpoint(head_logprobs, *inputs, use_reentrant=False)
        )
    logprobs = torch.cat([p[0] for p in pieces])[:count]
    return logprobs, torch.cat([p[1] for p in pieces])[:count] if with_entropy else None


def response_logprobs(
    model, prompt_ids, response_ids, temperature, pad_token_id=0, with_entropy=False
):
    """log pi(y_t | x, y_<t) of every response token at sampling temperature T, as (logprobs
    [B, Lr], mask [B, Lr], entropy [B, Lr] or None). Rows are prompt + response, right-padded;
    only the response positions go through the LM head, in float32 and in chunks. The model is
    called through its own forward (a DDP wrapper syncs gradients) with logits_to_keep=1; a hook on
    the base model keeps its last hidden states."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device, batch = next(model.parameters()).device, len(prompt_ids)
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
    response_lengths = torch.tensor([len(r) for r in response_ids], device=device)
    input_ids = torch.full((batch, int((prompt_lengths + response_lengths).max())), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r))
        attention_mask[i, : len(p) + len(r)] = 1
    causal_lm = getattr(model, "module", model)  # unwrap DistributedDataParallel
    captured = []
    hook = causal_lm.base_model.register_forward_hook(lambda m, a, out: captured.append(out[0]))
    try:
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    # response token t of row i sits at len(p_i) + t, predicted by the hidden state before it
    rows = torch.repeat_interleave(torch.arange(batch, device=device), response_lengths)
    first = response_lengths.cumsum(0) - response_lengths  # each row's first in the flat order
    steps = torch.arange(len(rows), device=device) - first[rows]
    targets = torch.tensor([t for r in response_ids for t in r], dtype=torch.long, device=device)
    hidden = captured[0][rows, prompt_lengths[rows] - 1 + steps]
    head = causal_lm.get_output_embeddings()
    token_logprobs, token_entropy = chunked_head_logprobs(
        hidden, head, targets, temperature, with_entropy=with_entropy
    )
    longest = int(response_lengths.max())
    mask = (torch.arange(longest, device=device)[None, :] < response_lengths[:, None]).float()
    logprobs = torch.zeros(batch, longest, device=device).index_put((rows, steps), token_logprobs)
    entropy = None
    if with_entropy:
        entropy = torch.zeros(batch, longest, device=device).index_put((rows, steps), token_entropy)
    return logprobs, mask, entropy


def token_budget_batches(lengths: list[int], budget: int, longest_first: bool = True):
    """Indices grouped so that rows x longest row <= budget in every batch (longest first: less
    padding; else consecutive runs in input order). A longer sequence gets a batch of its own."""
    order = (
        sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if longest_first
        else range(len(lengths))
    )
    batches, current, longest = [], [], 0
    for i in order:
        if current and max(longest, lengths[i]) * (len(current) + 1) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    return batches + [current] if current else batches


@torch.no_grad()
def batched_logprobs(model, prompt_ids, response_ids, temperature, pad_token_id, batches):
    """log pi(y_t | x, y_<t) of every response token, one float tensor per response, computed by
    `batches` (lists of indices) under autocast as in training (bf16 on CUDA): beta's behaviour
    log-probs (collect_rollouts.py) and GRPO's pi_old (grpo_train.py) both come from here."""
    result = [None] * len(response_ids)
    device = next(model.parameters()).device
    for batch in batches:
        prompts, responses = [prompt_ids[i] for i in batch], [response_ids[i] for i in batch]
        with autocast(device):
            logprobs = response_logprobs(
                model, prompts, responses, temperature, pad_token_id=pad_token_id
            )[0]
        for row, i in zip(logprobs, batch):
            result[i] = row[: len(response_ids[i])].float().cpu()
    return result


# ----------------------------------------------------------------------------------- prompts
def format_prompt(tokenizer, question: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The tokenizer's chat template when it has one, else "system / Question: ... / Answer:"."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{prefix}Question: {question}\nAnswer:"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt (chat templates carry their own special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
