"""The memory plan: the estimated peak GPU memory of a stage, printed at its start and refused,
before anything is loaded, when it does not fit the card (naming the flags that shrink it)."""

from __future__ import annotations

import math

import torch

from plumbing.cli import DataError

GIB = 2**30
# Outside every part below: the CUDA context (about 0.5 GiB with lazy module loading), cuBLAS and
# cuBLASLt workspaces (32 MiB each on Hopper, NVIDIA's cublasSetWorkspace docs) and NCCL's buffers
# for the process groups (NCCL_BUFFSIZE 4 MiB a channel and peer): 1-2 GiB as issue 26 reads it,
# 1.5 here; and a margin for the caching allocator's fragmentation. Neither was measured: no GPU.
CUDA_OVERHEAD_GIB, MARGIN = 1.5, 0.05


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
    activations  values kept for the backward of `token_budget` tokens: with checkpointing one
                 [tokens, hidden] layer input per layer plus one layer's internals (~16 hidden +
                 4 intermediate values a token, bf16: autocast's or FSDP's matmuls), without it
                 every layer's internals; collect (no backward): ~4 layer inputs live. A layer
                 input (the residual stream) is float32 beside float32 weights, bf16 under FSDP's
                 bf16 policy (shards > 1)
    logits       one LM-head chunk in float32 (2^26 logits) x ~3 tensors (logits, softmax, grad)
    hashes       the CountSketch's cached hash draws (sketch): 8 B a coordinate, at most 2 GiB
    gathered     FSDP (shards > 1): the root's weights kept whole after its forward (embeddings
                 and LM head, float32; GRPO's reference: bf16 too) and two layers gathered in bf16
                 (the one computing, the one prefetched)
    cuda         the CUDA context, cuBLAS and NCCL buffers: CUDA_OVERHEAD_GIB
    margin       MARGIN x the card
    shards: processes that share weights, grads and optimizer state (FSDP); 1 = replicated.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    internals = token_budget * (16 * hidden + 4 * intermediate) * 2
    layer_input = token_budget * hidden * (2 if shards > 1 else 4)
    training = stage in ("sketch", "grpo")
    if not training:
        activations = layer_input * 4
    elif checkpointing:
        activations = layer_input * layers + internals
    else:
        activations = internals * layers
    root = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", True) else 2)
    layer = (num_params - root) / layers
    plan = {
        "weights": num_params * (4 + (2 if stage == "grpo" else 0)) / shards,
        "grads": num_params * 4 / shards if training else 0,
        "optimizer": num_params * 8 / shards if stage == "grpo" else 0,
        "vllm": vllm_share * card_gib * GIB if stage in ("collect", "grpo") else 0,
        "activations": activations,
        "logits": max(1, 2**26 // config.vocab_size) * config.vocab_size * 4 * 3,
        "hashes": min(num_params * 8, 2 * GIB) if stage == "sketch" else 0,
        "gathered": root * (6 if stage == "grpo" else 4) + 2 * layer * 2 if shards > 1 else 0,
        "cuda": CUDA_OVERHEAD_GIB * GIB,
        "margin": MARGIN * card_gib * GIB,
    }
    plan = {part: round(value / GIB, 2) for part, value in plan.items()}
    return plan | {"total": round(sum(plan.values()), 2)}


def refusal(plan: dict, card_gib: float, stage: str, flags: str) -> str | None:
    """Why the plan cannot run on the card, naming the flags to change; None when it fits. vLLM
    starts only when gpu_memory_utilization x the card is free after what this process holds
    already (vllm/v1/worker/utils.py, request_memory): the weights, DDP's gradient buckets (at
    most the grads) and the CUDA context."""
    free = card_gib - plan["weights"] - plan["grads"] - plan["cuda"]  # when vLLM starts
    share = math.floor(min(free, card_gib - plan["total"] + plan["vllm"]) / card_gib * 100) / 100
    fix = f" (fits with --gpu-memory-utilization {share:.2f})" if plan["vllm"] and share > 0 else ""
    if plan["vllm"] and plan["vllm"] > free:
        return (
            f"{stage}: vLLM needs {plan['vllm']:.1f} GiB free when it starts (--gpu-memory-"
            f"utilization x {card_gib:.1f}), {free:.1f} are after the weights, grads and CUDA "
            f"context; lower --gpu-memory-utilization{fix}"
        )
    if plan["total"] > card_gib:
        return (
            f"{stage}: the memory plan needs {plan['total']:.1f} GiB per GPU, the card "
            f"has {card_gib:.1f}; lower {flags}{fix}"
        )
    return None


def check_memory_plan(plan: dict, card_gib: float, stage: str, flags: str) -> None:
    """Print the plan; refuse it (DataError) when it does not fit the card."""
    parts = ", ".join(f"{part} {gib:.1f}" for part, gib in plan.items() if part != "total")
    print(
        f"memory plan ({stage}, GiB per GPU): {parts}; total {plan['total']:.1f} of {card_gib:.1f}"
    )
    reason = refusal(plan, card_gib, stage, flags)
    if reason:
        raise DataError(reason)


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
