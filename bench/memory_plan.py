"""The memory plan of every GPU stage for Qwen2.5-1.5B and 7B on 8 x 80 GB cards at run_cropi.sh's
defaults.

Prints the markdown table docs/design.md shows: for each stage, the weights + grads + optimizer
state of a model replicated on every GPU, whether --fsdp auto shards it (over half a card), the
plan per GPU by part (plumbing.memory_plan) and, where the stage would refuse it, why and the flag
that makes it fit. The configs are written out here (no download): Qwen2.5's published shapes. The
sketch's --sparse-ratio F costs nothing extra: S is the sign 0 of the CountSketch, so the
release's F = 0.1 has the plan of F = 1. An 80 GB card: 79.2 GiB, what torch reports for one by
issue 26 (not measured here: no GPU).

Usage: python bench/memory_plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumbing.memory_plan import count_parameters, memory_plan, refusal, use_fsdp  # noqa: E402

CARD_GIB, GPUS = 79.2, 8
# stage, token budget, gradient checkpointing, vLLM's share of the card, how
STAGES = (
    ("collect", 16384, False, 0.6, "log-prob pass 16,384 tokens, vLLM 0.6"),
    ("sketch", 8192, True, 0.0, "8,192 tokens, checkpointing"),
    ("grpo", 16384, True, 0.4, "16,384 tokens, checkpointing, vLLM 0.4"),
)
FLAGS = {  # the flags each stage names when it refuses its plan
    "collect": "--gpu-memory-utilization or --logprob-token-budget",
    "sketch": "--token-budget, or use --fsdp on",
    "grpo": "--micro-batch-tokens or --gpu-memory-utilization, or use --fsdp on",
}


def qwen_configs() -> dict:
    from transformers import Qwen2Config

    def qwen(hidden, intermediate, heads, kv_heads, vocab, tied):
        return Qwen2Config(
            hidden_size=hidden,
            num_hidden_layers=28,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            tie_word_embeddings=tied,
        )

    return {
        "Qwen2.5-1.5B": qwen(1536, 8960, 12, 2, 151936, True),
        "Qwen2.5-7B": qwen(3584, 18944, 28, 4, 152064, False),
    }


def main() -> None:
    print(
        "| model | stage (defaults) | replicated: weights + grads + optimizer, GiB | "
        f"--fsdp auto on {GPUS} GPUs | plan per GPU, GiB of {CARD_GIB} | the stage |"
    )
    print("|---|---|---|---|---|---|")
    for name, config in qwen_configs().items():
        num_params = count_parameters(config)
        for stage, budget, checkpointing, vllm_share, how in STAGES:
            settings = dict(token_budget=budget, checkpointing=checkpointing)
            settings |= dict(vllm_share=vllm_share, card_gib=CARD_GIB)
            replicated = memory_plan(config, num_params, stage, **settings)
            # collect has no FSDP
            sharded = stage != "collect" and use_fsdp("auto", GPUS, replicated, CARD_GIB)
            plan = memory_plan(config, num_params, stage, **settings, shards=GPUS if sharded else 1)
            state = replicated["weights"] + replicated["grads"] + replicated["optimizer"]
            parts = [f"{part} {gib:.1f}" for part, gib in plan.items() if part != "total" and gib]
            reason = refusal(plan, CARD_GIB, stage, FLAGS[stage])
            print(
                f"| {name} ({num_params / 1e9:.2f}B) | {stage} ({how}) | {state:.1f} | "
                f"{'sharded' if sharded else 'replicated'} | **{plan['total']:.1f}**: "
                f"{', '.join(parts)} | {'refused: ' + reason if reason else 'runs'} |"
            )


if __name__ == "__main__":
    main()
