"""Shared test fixtures: a tiny GPT-2 with a locally made character tokenizer (no hub), and
synthetic rollouts."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import encode_prompt, format_prompt, response_logprobs  # noqa: E402
from make_demo import build_char_tokenizer, build_tiny_gpt2  # noqa: E402


def make_tiny_model(folder: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """2 layers, width 64, 2 heads (head_dim 32, the least vLLM's CPU attention accepts)."""
    torch.manual_seed(seed)
    tokenizer = (
        build_char_tokenizer() if chat_template else build_char_tokenizer(chat_template=None)
    )
    model = build_tiny_gpt2(tokenizer, n_layer=2, n_embd=64, n_head=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"))


def make_synthetic_rollouts(
    model_dir: Path,
    path: Path,
    n_prompts: int = 12,
    k: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    all_equal_every: int = 4,
) -> list[dict]:
    """A rollouts file in collect_rollouts.py's schema with random responses and random 0/1 rewards.

    Every `all_equal_every`-th prompt gets K equal rewards (a zero-gradient row). behavior_logprobs
    are the model's own log-probs at `temperature`, so the importance ratio is exactly 1 on this
    model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    for i in range(n_prompts):
        a, b = rng.randrange(10), rng.randrange(10)
        prompt_ids = encode_prompt(tokenizer, format_prompt(tokenizer, f"{a}+{b}"))
        response_ids = [
            [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(1, 6))]
            + [tokenizer.eos_token_id]
            for _ in range(k)
        ]
        if i % all_equal_every == all_equal_every - 1:
            rewards = [float(rng.random() < 0.5)] * k
        else:
            rewards = [0.0] * k
            rewards[rng.randrange(k)] = 1.0
            rewards = [r if r else float(rng.random() < 0.3) for r in rewards]
            if all(rewards):
                rewards[0] = 0.0
        with torch.no_grad():
            logprobs, mask, _ = response_logprobs(
                model, [prompt_ids] * k, response_ids, temperature, tokenizer.pad_token_id
            )
        rows.append(
            {
                "id": f"p{i}",
                "prompt": f"{a}+{b}",
                "answer": str(a + b),
                "prompt_ids": prompt_ids,
                "response_ids": response_ids,
                "responses": tokenizer.batch_decode(response_ids),
                "behavior_logprobs": [lp[m.bool()].tolist() for lp, m in zip(logprobs, mask)],
                "rewards": rewards,
                "temperature": temperature,
                "skill": ["add", "sub"][i % 2],
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_script(*args: str, env: dict | None = None, check: bool = True, timeout: float = 600):
    """Run one of the project's scripts as a user would (a subprocess of the same Python)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result
