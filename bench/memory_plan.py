"""The memory plan of every GPU stage for Qwen2.5-1.5B and 7B on 8 x 80 GB cards at run_cropi.sh's defaults.

Prints the markdown table the README's GPU section shows: for each stage, the weights + grads + optimizer state of a
model replicated on every GPU, whether --fsdp auto shards it (over half a card), and the plan per GPU by part
(machinery.memory_plan). The configs are written out here (no download): Qwen2.5's published shapes.

Usage: python bench/memory_plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import machinery as M  # noqa: E402

CARD_GIB, GPUS = 80.0, 8
RELEASE_KEPT = (0.1, 32)  # the release's F = 0.1 (a buffered sketch) at sketch_grads.py's --chunk-prompts 32
# stage, token budget, gradient checkpointing, vLLM's share of the card, (F, buffer rows) of a buffered sketch, how
STAGES = (("collect", 16384, False, 0.6, (0.0, 0), "log-prob pass 16,384 tokens, vLLM 0.6"),
          ("sketch", 8192, True, 0.0, (0.0, 0), "8,192 tokens, checkpointing"),
          ("sketch", 8192, True, 0.0, RELEASE_KEPT, "the release's --sparse-ratio 0.1, --chunk-prompts 32"),
          ("grpo", 16384, True, 0.4, (0.0, 0), "16,384 tokens, checkpointing, vLLM 0.4"))


def qwen_configs() -> dict:
    from transformers import Qwen2Config

    return {"Qwen2.5-1.5B": Qwen2Config(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                                        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                        tie_word_embeddings=True),
            "Qwen2.5-7B": Qwen2Config(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                      tie_word_embeddings=False)}


def main() -> None:
    print(f"| model | stage (defaults) | replicated: weights + grads + optimizer, GiB | --fsdp auto on {GPUS} GPUs | "
          f"plan per GPU, GiB of {CARD_GIB:.0f} |")
    print("|---|---|---|---|---|")
    for name, config in qwen_configs().items():
        num_params = M.count_parameters(config)
        for stage, budget, checkpointing, vllm_share, kept, how in STAGES:
            def plan_of(shards: int, rows: int = kept[1]) -> dict:
                return M.memory_plan(config, num_params, stage, budget, checkpointing, vllm_share, CARD_GIB,
                                     shards=shards, kept_fraction=kept[0], buffer_rows=rows)
            replicated = plan_of(1)
            # collect has no FSDP; a buffered sketch neither (sketch_grads.py shards only the streamed CountSketch)
            sharded = stage != "collect" and not kept[0] and M.use_fsdp("auto", GPUS, replicated, CARD_GIB)
            plan = plan_of(GPUS) if sharded else replicated
            state = replicated["weights"] + replicated["grads"] + replicated["optimizer"]
            parts = ", ".join(f"{part} {gib:.1f}" for part, gib in plan.items() if part != "total" and gib)
            if plan["total"] > CARD_GIB:  # refused at the start: the most buffer rows that fit
                fitting = [rows for rows in range(kept[1], 0, -1) if plan_of(1, rows)["total"] <= CARD_GIB]
                parts += f"; refused, fits with --chunk-prompts {fitting[0]}" if fitting else "; refused at any chunk"
            print(f"| {name} ({num_params / 1e9:.2f}B) | {stage} ({how}) | {state:.1f} | "
                  f"{'sharded' if sharded else 'replicated'} | **{plan['total']:.1f}**: {parts} |")


if __name__ == "__main__":
    main()
