"""The memory plan: the estimated peak memory of a stage (per GPU, or on a CPU the process's
resident memory), printed at its start and refused, before anything is loaded, when it does not
fit the card or the machine's available memory (naming the flags that shrink it)."""

from __future__ import annotations

import math
import os

import torch

from common import LOGITS_PER_CHUNK, MAX_CHUNK_TOKENS
from plumbing.cli import DataError

GIB = 2**30
# Outside every part below: the CUDA context (about 0.5 GiB with lazy module loading), cuBLAS and
# cuBLASLt workspaces (32 MiB each on Hopper, NVIDIA's cublasSetWorkspace docs) and NCCL's buffers
# for the process groups (NCCL_BUFFSIZE 4 MiB a channel and peer): 1-2 GiB as issue 26 reads it,
# 1.5 here; and a margin for the caching allocator's fragmentation. Neither was measured: no GPU.
# On a CPU: the interpreter with torch and transformers (0.4 GiB resident after the imports),
# vLLM's engine and the allocator's slack: 1.0, what SmolLM2-135M's collect peaks with vLLM (3.9-4.2
# GiB, docs/design.md) hold beyond the other parts of its plan (2.9).
RUNTIME_GIB, MARGIN = {"cuda": 1.5, "cpu": 1.0}, 0.05


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
    device_type="cuda",
    vllm_kv_cache_gib=0.0,
    generation_tokens=0,
) -> dict:
    """Estimated peak GiB per GPU (device_type "cpu": per process) of one stage ("collect",
    "sketch" or "grpo"), by part:
    weights      float32 policy, 4 B a parameter (GRPO's reference model: bf16, 2 B more; float32
                 on a CPU, 4 B more)
    grads        float32, 4 B a parameter (sketch, grpo)
    optimizer    AdamW's two float32 moments, 8 B a parameter (grpo)
    vllm         the engine's share of the card (collect, grpo; a vllm_share of 0: no engine);
                 on a CPU its own float32 copy of the weights and its KV cache (vllm_kv_cache_gib,
                 0: vLLM-CPU's 1 GiB)
    kv_cache     transformers generate()'s keys and values (the hf sampler) of generation_tokens
                 tokens (a generate() call's sequences x their longest): per token and layer, 2 x
                 the key-value heads x the head dim, bf16 under autocast on CUDA, float32 on a CPU
    activations  values kept for the backward of `token_budget` tokens (the most one pass holds,
                 pass_tokens): with checkpointing one [tokens, hidden] layer input per layer plus
                 one layer's internals (~16 hidden + 4 intermediate values a token, bf16 under
                 autocast or FSDP's policy on CUDA, float32 on a CPU), without it
                 every layer's internals; collect (no backward): ~4 layer inputs live. A layer
                 input (the residual stream) is float32 beside float32 weights, bf16 under FSDP's
                 bf16 policy (shards > 1)
    logits       one LM-head chunk in float32 (common.chunked_head_logprobs: at most 2^26 logits
                 and 4,096 tokens) x ~3 tensors (logits, softmax, grad); GRPO's entropy ~2 more
    hashes       the CountSketch's cached hash draws (sketch): 8 B a coordinate, at most 2 GiB
    gathered     FSDP (shards > 1): the root's weights kept whole after its forward (embeddings
                 and LM head, float32; GRPO's reference: bf16 too) and two layers gathered in bf16
                 (the one computing, the one prefetched)
    runtime      the CUDA context, cuBLAS and NCCL buffers; on a CPU the interpreter and its
                 libraries: RUNTIME_GIB
    margin       MARGIN x the card (on a CPU: x the memory available)
    shards: processes that share weights, grads and optimizer state (FSDP); 1 = replicated.
    """
    hidden, layers, on_cpu = config.hidden_size, config.num_hidden_layers, device_type == "cpu"
    autocast_bytes = 4 if on_cpu else 2  # a value bf16 under CUDA autocast: float32 on a CPU
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    internals = token_budget * (16 * hidden + 4 * intermediate) * autocast_bytes
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
    grpo, sampling = stage == "grpo", stage in ("collect", "grpo")
    reference = autocast_bytes if grpo else 0
    engine = vllm_share * card_gib * GIB  # on a CPU: the weights and the KV cache
    if on_cpu and vllm_share:
        engine = num_params * 4 + (vllm_kv_cache_gib or 1.0) * GIB
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv_cache = generation_tokens * layers * 2 * kv_heads * head_dim * autocast_bytes
    chunk_tokens = min(MAX_CHUNK_TOKENS, max(1, LOGITS_PER_CHUNK // config.vocab_size))
    plan = {
        "weights": num_params * (4 + reference) / shards,
        "grads": num_params * 4 / shards if training else 0,
        "optimizer": num_params * 8 / shards if grpo else 0,
        "vllm": engine if sampling else 0,
        "kv_cache": kv_cache if sampling else 0,
        "activations": activations,
        "logits": min(chunk_tokens, token_budget) * config.vocab_size * 4 * (5 if grpo else 3),
        "hashes": min(num_params * 8, 2 * GIB) if stage == "sketch" else 0,
        "gathered": root * (6 if grpo else 4) + 2 * layer * 2 if shards > 1 else 0,
        "runtime": RUNTIME_GIB[device_type] * GIB,
        "margin": MARGIN * card_gib * GIB,
    }
    plan = {part: round(value / GIB, 2) for part, value in plan.items()}
    return plan | {"total": round(sum(plan.values()), 2)}


def refusal(plan: dict, card_gib: float, stage: str, flags: str, device_type="cuda") -> str | None:
    """Why the plan cannot run on the card (or, on a CPU, in the memory available to this process),
    naming the flags to change; None when it fits. On CUDA, vLLM starts only when
    gpu_memory_utilization x the card is free after what this process holds already
    (vllm/v1/worker/utils.py, request_memory): the weights, DDP's gradient buckets (at most the
    grads) and the CUDA context."""
    if device_type == "cpu":
        if plan["total"] <= card_gib:
            return None
        return (
            f"{stage}: the memory plan needs {plan['total']:.1f} GiB per process, this machine has "
            f"{card_gib:.1f} GiB available for it; lower {flags}"
        )
    free = card_gib - plan["weights"] - plan["grads"] - plan["runtime"]  # when vLLM starts
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


def check_memory_plan(plan: dict, card_gib: float, stage: str, flags: str, device_type="cuda"):
    """Print the plan; refuse it (DataError) when it does not fit."""
    parts = ", ".join(f"{part} {gib:.1f}" for part, gib in plan.items() if part != "total")
    unit = "GiB per process" if device_type == "cpu" else "GiB per GPU"
    print(f"memory plan ({stage}, {unit}): {parts}; total {plan['total']:.1f} of {card_gib:.1f}")
    reason = refusal(plan, card_gib, stage, flags, device_type)
    if reason:
        raise DataError(reason)


def use_fsdp(fsdp: str, world: int, replicated_plan: dict, card: float, device_type="cuda"):
    """--fsdp on, or auto on GPUs when the weights, grads and optimizer state of a replicated model
    would take more than half the card (sharding costs communication; below that, replicas fit)."""
    state = replicated_plan["weights"] + replicated_plan["grads"] + replicated_plan["optimizer"]
    auto = device_type == "cuda" and world > 1 and state > card / 2
    return fsdp == "on" or (fsdp == "auto" and auto)


def pass_tokens(token_budget: int, sequences: int, longest: int) -> int:
    """The most padded tokens one forward/backward holds, for `sequences` of at most `longest`
    tokens: common.token_budget_batches keeps rows x longest row <= the budget, and gives a longer
    sequence a pass of its own."""
    return max(longest, min(token_budget, sequences * longest))


def plan_memory(
    model_path,
    device,
    stage,
    *,
    token_budget,
    checkpointing,
    flags,
    vllm_share=0.0,
    vllm_kv_cache_gib=0.0,
    generation_tokens=0,
    fsdp="off",
    world=1,
) -> bool:
    """Print the stage's plan and refuse it before loading when it does not fit the GPU or (on a
    CPU) the memory available. Returns whether to shard the model over the `world` processes."""
    from transformers import AutoConfig

    card, device_type = memory_gib(device), device.type
    config = AutoConfig.from_pretrained(model_path)
    settings = dict(token_budget=token_budget, checkpointing=checkpointing, card_gib=card)
    settings |= dict(vllm_share=vllm_share, vllm_kv_cache_gib=vllm_kv_cache_gib)
    settings |= dict(device_type=device_type, generation_tokens=generation_tokens)
    num_params = count_parameters(config)
    plan = memory_plan(config, num_params, stage, **settings)
    sharded = use_fsdp(fsdp, world, plan, card, device_type)
    if sharded:
        plan = memory_plan(config, num_params, stage, **settings, shards=world)
    where = f"{stage}, FSDP over {world} processes" if sharded else stage
    check_memory_plan(plan, card, where, flags, device_type)
    return sharded


def memory_gib(device: torch.device) -> float:
    """The GPU's memory in GiB; on a CPU, the memory available now (Linux's MemAvailable, else
    the machine's) shared by this machine's processes of the run (torchrun's LOCAL_WORLD_SIZE)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available / GIB / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
