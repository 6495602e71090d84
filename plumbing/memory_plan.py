"""The memory plan: the estimated peak GPU memory of a stage, printed at its start and refused,
before anything is loaded, when it does not fit the card (naming the flags that shrink it)."""

from __future__ import annotations

import torch

from plumbing.cli import DataError

GIB = 2**30


def count_parameters(config) -> int:
    """Parameters of a model built from `config` on the meta device (no memory, exact count)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def memory_plan(
    config,
    num_params,
    stage,
    *,
    token_budget,
    checkpointing,
    vllm_share=0.0,
    card_gib=80.0,
    shards=1,
) -> dict:
    """Estimated peak GiB per GPU of one stage ("collect", "sketch" or "grpo"), by part:
    weights      float32 policy, 4 B a parameter (GRPO's reference model: bf16, 2 B more)
    grads        float32, 4 B a parameter (sketch, grpo)
    optimizer    AdamW's two float32 moments, 8 B a parameter (grpo)
    vllm         the engine's share of the card (collect, grpo)
    activations  bf16 values kept for the backward of `token_budget` tokens: with checkpointing
                 one [tokens, hidden] input per layer plus one layer's internals (~16 hidden +
                 4 intermediate values a token), without it every layer's internals
    logits       one LM-head chunk in float32 (2^26 logits) x ~3 tensors (logits, softmax, grad)
    hashes       the CountSketch's cached hash draws (sketch): 4 B a coordinate, at most 1 GiB
    shards: processes that share weights, grads and optimizer state (FSDP); 1 = replicated.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    internals = token_budget * (16 * hidden + 4 * intermediate) * 2
    training = stage in ("sketch", "grpo")
    if not training:
        activations = token_budget * hidden * 2 * 4
    elif checkpointing:
        activations = token_budget * hidden * 2 * layers + internals
    else:
        activations = internals * layers
    plan = {
        "weights": num_params * (4 + (2 if stage == "grpo" else 0)) / shards,
        "grads": num_params * 4 / shards if training else 0,
        "optimizer": num_params * 8 / shards if stage == "grpo" else 0,
        "vllm": vllm_share * card_gib * GIB if stage in ("collect", "grpo") else 0,
        "activations": activations,
        "logits": max(1, 2**26 // config.vocab_size) * config.vocab_size * 4 * 3,
        "hashes": min(num_params * 4, GIB) if stage == "sketch" else 0,
    }
    plan = {part: round(value / GIB, 2) for part, value in plan.items()}
    return plan | {"total": round(sum(plan.values()), 2)}


def check_memory_plan(plan: dict, card_gib: float, stage: str, flags: str) -> None:
    """Print the plan; refuse a plan above the card, naming the flags that shrink it."""
    parts = ", ".join(f"{part} {gib:.1f}" for part, gib in plan.items() if part != "total")
    print(
        f"memory plan ({stage}, GiB per GPU): {parts}; total {plan['total']:.1f} of {card_gib:.0f}"
    )
    if plan["total"] > card_gib:
        raise DataError(
            f"{stage}: the memory plan needs {plan['total']:.1f} GiB per GPU, the card "
            f"has {card_gib:.0f}; lower {flags}"
        )


def use_fsdp(fsdp: str, world: int, replicated_plan: dict, card: float) -> bool:
    """--fsdp on, or auto when the weights, grads and optimizer state of a replicated model would
    take more than half the card (sharding costs communication; below that, replicas fit)."""
    state = replicated_plan["weights"] + replicated_plan["grads"] + replicated_plan["optimizer"]
    return fsdp == "on" or (fsdp == "auto" and world > 1 and state > card / 2)


def plan_memory(
    model_path,
    device,
    stage,
    *,
    token_budget,
    checkpointing,
    flags,
    vllm_share=0.0,
    fsdp="off",
    world=1,
) -> bool:
    """On a GPU: print the stage's plan and refuse it before loading when it does not fit.
    Returns whether to shard the model over the `world` processes (on a CPU: --fsdp on only)."""
    card = card_gib(device)
    if card is None:
        return fsdp == "on"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    settings = dict(
        token_budget=token_budget, checkpointing=checkpointing, vllm_share=vllm_share, card_gib=card
    )
    num_params = count_parameters(config)
    plan = memory_plan(config, num_params, stage, **settings)
    sharded = use_fsdp(fsdp, world, plan, card)
    if sharded:
        plan = memory_plan(config, num_params, stage, **settings, shards=world)
    check_memory_plan(plan, card, f"{stage}, FSDP over {world} GPUs" if sharded else stage, flags)
    return sharded


def card_gib(device: torch.device) -> float | None:
    """The GPU's memory in GiB; None on a CPU (no plan is enforced there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB
