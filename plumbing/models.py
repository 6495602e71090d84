"""Models and tokenizers, seeds and RNG states."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import numpy as np
import torch

from plumbing.cli import DataError


def check_model(path: str, flag: str = "--model") -> int | None:
    """Before the weights load: a local folder with a config.json and a tokenizer (its vocabulary
    size returned: token ids must be below it), or a hub name 'org/name'."""
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise DataError(f"{flag} {path}: the folder has no config.json (not a checkpoint)")
        try:
            tokens = len(load_tokenizer(path))
        except (OSError, ValueError) as error:
            raise DataError(f"{flag} {path}: its tokenizer does not load ({error})") from None
        if tokens < 2:  # transformers makes an empty one when the files are missing
            raise DataError(f"{flag} {path}: no tokenizer files in the folder (save the tokenizer)")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path).get_text_config().vocab_size
    if Path(path).exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path):
        raise DataError(f"{flag} {path}: no such model folder (and not a hub name 'org/name')")
    return None


def load_model(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def load_policy(path: str, device: torch.device, checkpointing: bool, train: bool = False):
    """The model whose gradients are taken, dropout off. transformers recomputes activations
    (gradient checkpointing) only in train mode: then train mode, else `train`."""
    model = load_model(path, device)
    disable_dropout(model)
    model.train(train or checkpointing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_trainable(
    path: str, device, stage: str, *, world: int, fsdp: str, checkpointing: str, **plan
):
    """The stage's memory plan (refused before loading when it does not fit), then the policy
    (load_policy) sharded with FSDP2 when the plan says so: (model, sharded, checkpointing)."""
    from plumbing.distributed import shard_model
    from plumbing.memory_plan import plan_memory

    checkpointing = use_checkpointing(checkpointing, device)
    plan |= dict(checkpointing=checkpointing, fsdp=fsdp, world=world)
    sharded = plan_memory(path, device, stage, **plan)
    model = load_policy(path, device, checkpointing)
    if sharded:
        shard_model(model)
    return model, sharded, checkpointing


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model) -> None:
    """Dropout to 0, so that the same weights always give the same log-probs."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def context_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def use_checkpointing(setting: str, device: torch.device) -> bool:
    """--gradient-checkpointing: "on", or "auto" on CUDA (on a CPU it costs speed only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def cpu_kernels() -> dict:
    """The instruction set of torch's CPU kernels ("AVX2", "AVX512", ...) and their threads: the
    same inputs give the same bits only with both the same (run_cropi.sh's PIN_ISA pins them)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (seed, chunk, step, ...): independent streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 2)


def block_generator(seed: int, purpose: str, block: int, device: torch.device) -> torch.Generator:
    """A generator seeded by a hash of (seed, purpose, block): each block drawn on its own."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{block}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
