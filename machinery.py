"""The machinery of the CROPI stages: everything a reader of the algorithm may skip.

The stage scripts hold the paper's algorithm; `common.py` holds the maths they share. What is here is plumbing,
one way for each kind:
  * command line     an Args dataclass becomes argparse flags; bad input ends in one line naming file or flag
  * files            atomic writes (temp file + rename), .jsonl reading with file:line errors
  * resuming         ONE resumable chunk store (a folder of finished pieces + the settings that made them)
  * processes        ONE way to run on several processes: torchrun (nccl on CUDA, gloo on CPU) + sharding helpers
  * devices, models  the one helper that places tensors, bf16 autocast on CUDA, loading models and tokenizers
  * generation       one transformers engine and one vLLM engine, shared by collect_rollouts.py and grpo_train.py,
                     with one stop-token rule and one weight-push method
  * sketch files     memory-mapped reading and consistency checks of sketch_grads.py's .npy + .json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import types
import typing
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
from common import DataError, read_jsonl


# ----------------------------------------------------------------------------------------------
# Command line: every stage keeps its settings in one Args dataclass at the top of the file
# ----------------------------------------------------------------------------------------------

def arg(default, help: str):
    """A dataclass field with its --help text; lists default to empty and collect repeated flags."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def parse_args(args_class, argv: list[str] | None = None):
    """Build an argparse parser from a dataclass: field `proj_dim` becomes flag `--proj-dim`.

    bool fields get --flag/--no-flag; list fields take the flag once per item (--val-sketch a --val-sketch b).
    """
    description = (sys.modules[args_class.__module__].__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(args_class)
    for f in dataclasses.fields(args_class):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        elif typing.get_origin(kind) is list:
            item_type = typing.get_args(kind)[0]
            parser.add_argument(flag, dest=f.name, action="append", type=item_type, default=argparse.SUPPRESS,
                                help=f"{help_text} (repeat the flag for several; default: {f.default_factory()})")
        else:
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # "int | None": use the non-None type
                kind = next(t for t in typing.get_args(kind) if t is not type(None))
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_text)
    namespace = vars(parser.parse_args(argv))
    for f in dataclasses.fields(args_class):  # an unset list flag falls back to its default list
        if f.name not in namespace:
            namespace[f.name] = f.default_factory()
    return args_class(**namespace)


def check_choices(*checks: tuple[str, str, tuple[str, ...]]) -> None:
    """(flag, value, allowed) triples: a value outside its allowed ones is refused, naming the flag."""
    for flag, value, allowed in checks:
        if value not in allowed:
            raise DataError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def run_main(main, args_class) -> None:
    """Parse the Args dataclass and run main(args); bad input (DataError) ends in one clear line, not a traceback."""
    args = parse_args(args_class)
    try:
        main(args)
    except DataError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    print(f"{Path(sys.argv[0]).name}: {peak_memory()}", flush=True)


def peak_memory() -> str:
    """This process's resident high-water mark (VmHWM; not ru_maxrss, which a child inherits from its parent) and,
    on CUDA, the peak of allocated GPU memory: the figures to hold against the memory plan."""
    status = Path("/proc/self/status")
    found = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    text = f"peak memory {int(found[1]) * 1024 / 2**30:.2f} GiB resident" if found else "peak memory unknown"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated on the GPU"
    rank = os.environ.get("RANK")
    return f"{text} (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else text


# ----------------------------------------------------------------------------------------------
# Files: .jsonl read/write with errors that name file and line, atomic writes (temp file + rename)
# ----------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it.

    A reader (or a resumed run) therefore sees either the old file or the complete new one, never half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the artefact the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like atomic_path, for a folder (e.g. a model checkpoint): fill the yielded temp folder, then it is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as one JSON object per line, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One JSON line appended with a single write (a resumed run first cuts the file back to its saved size)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# Resuming: ONE chunk store for every long stage
# ----------------------------------------------------------------------------------------------

class ChunkStore:
    """A folder of the finished pieces of a long stage, so that a killed run resumes where it stopped.

    FOLDER/settings.json records what the pieces depend on; FOLDER/chunk_<index>.<npy|jsonl|pt> is one finished
    piece (an array, a list of rows, or any other object such as a training state), each written atomically, so a
    kill leaves only whole pieces. A rerun with the same settings skips the finished pieces; with other settings it
    is refused with the names of what differs. The stage removes the folder when its output is complete.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder, self.settings = Path(folder), settings

    def open(self) -> set[int]:
        """Create the folder (or check its settings against ours) and return the indices of the finished pieces."""
        settings_file = self.folder / "settings.json"
        if settings_file.exists():
            earlier = json.loads(settings_file.read_text())
            changed = sorted(k for k in set(earlier) | set(self.settings) if earlier.get(k) != self.settings.get(k))
            if changed:
                details = "; ".join(f"{k}: was {earlier.get(k)!r}, now {self.settings.get(k)!r}" for k in changed)
                raise DataError(f"{self.folder} holds pieces of a run with other settings ({details}); rerun with "
                                f"the same settings, or delete that folder to start over")
        else:
            write_json(settings_file, self.settings)
        return self.finished()

    def finished(self) -> set[int]:
        return {int(f.name.split(".")[0].split("_")[1]) for f in self.folder.glob("chunk_*.*")}

    def _file(self, index: int) -> Path:
        found = sorted(self.folder.glob(f"chunk_{index:06d}.*"))
        if not found:
            raise DataError(f"{self.folder}: piece {index} is missing; rerun to resume")
        return found[0]

    def save(self, index: int, value) -> None:
        """Write piece `index` atomically: an ndarray as .npy, a list of dicts as .jsonl, anything else as .pt."""
        if isinstance(value, np.ndarray):
            save_npy(self.folder / f"chunk_{index:06d}.npy", value)
        elif isinstance(value, list):
            write_jsonl(self.folder / f"chunk_{index:06d}.jsonl", value)
        else:
            with atomic_path(self.folder / f"chunk_{index:06d}.pt") as tmp:
                torch.save(value, tmp)

    def load(self, index: int):
        path = self._file(index)
        if path.suffix == ".npy":
            return np.load(path)
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        return torch.load(path, map_location="cpu", weights_only=False)

    def keep_only(self, index: int) -> None:
        """Delete every piece but `index` (a training state needs only its latest save)."""
        for path in self.folder.glob("chunk_*.*"):
            if int(path.name.split(".")[0].split("_")[1]) != index:
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Several processes: torchrun, one process per GPU (gloo on a CPU machine)
# ----------------------------------------------------------------------------------------------

def get_device(local_rank: int | None = None) -> torch.device:
    """cuda:<local_rank> when a GPU is present, else cpu. The one place that decides device placement."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun, join the process group first."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, get_device()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = get_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float] | torch.Tensor:
    """Element-wise sum over all processes of a list of numbers (a new list, summed in float64) or of a tensor
    (summed in place and returned); the values themselves with one process."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor if isinstance(values, torch.Tensor) else tensor.tolist()


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj):
    """Rank 0's obj, on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of `items`: every world-th item, starting at its rank."""
    return items[rank::world]


def open_chunk_store(store: ChunkStore, rank: int) -> set[int]:
    """Rank 0 opens (creates or checks) the store; every rank gets the finished pieces."""
    return set(broadcast(sorted(store.open()) if rank == 0 else None))


# ----------------------------------------------------------------------------------------------
# Devices, seeds, models
# ----------------------------------------------------------------------------------------------

def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU, so CPU and GPU run the same code."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_model(path: str, flag: str = "--model") -> None:
    """Before any loading: a model is a local folder with a config.json, or a hub name of the form 'org/name'."""
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise DataError(f"{flag} {path}: the folder has no config.json (not a transformers checkpoint)")
    elif Path(path).exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path):
        raise DataError(f"{flag} {path}: no such model folder (and not a hub name of the form 'org/name')")


def load_model(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model) -> None:
    """Dropout probabilities to 0, so that the same weights always give the same log-probs."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def block_generator(seed: int, purpose: str, block: int, device: torch.device) -> torch.Generator:
    """A generator seeded by a hash of (seed, purpose, block): each block's numbers can be drawn on their own."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{block}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def context_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def token_budget_batches(lengths: list[int], token_budget: int, longest_first: bool = True) -> list[list[int]]:
    """Group sequence indices so that (rows x longest row) <= token_budget in every batch.

    longest_first sorts by length first (less padding); otherwise batches are consecutive runs in input order.
    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if longest_first else range(len(lengths))
    batches, current, longest = [], [], 0
    for i in order:
        if current and max(longest, lengths[i]) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


# ----------------------------------------------------------------------------------------------
# Memory plan: the estimated peak GPU memory of a stage, printed at its start, refused when it does not fit
# ----------------------------------------------------------------------------------------------

GIB = 2 ** 30


def count_parameters(config) -> int:
    """Parameters of a model built from `config` on the meta device (no memory, exact count)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def memory_plan(config, num_params: int, stage: str, token_budget: int, checkpointing: bool,
                vllm_share: float = 0.0, card_gib: float = 80.0, logit_chunk: int = 0, shards: int = 1,
                kept_fraction: float = 0.0, buffer_rows: int = 0) -> dict[str, float]:
    """Estimated peak GiB per GPU of one stage ("collect", "sketch" or "grpo"), by part:
      weights     float32 policy, 4 B a parameter (the reference model of GRPO: bf16, 2 B more)
      grads       float32, 4 B a parameter (sketch, grpo)
      optimizer   AdamW's two float32 moments, 8 B a parameter (grpo)
      vllm        the engine's share of the card (collect, grpo); asleep during the update, but the plan counts it
                  so that sampling, when the trainer's weights, grads and optimizer are resident too, fits
      activations bf16 hidden states kept for the backward for `token_budget` tokens: with checkpointing one
                  [tokens, hidden] input per layer plus one layer's internals (~(16 hidden + 4 intermediate) values
                  a token) recomputed; without, the internals of every layer
      logits      one LM-head chunk in float32: logit_chunk tokens x vocabulary x ~3 tensors (logits, softmax, grad)
      hashes      the CountSketch's kept hash draws (sketch): 4 B a coordinate, at most 1 GiB
      kept        the sketch's copy of the kept coordinates (F < 1 or a dense projector): kept_fraction x num_params
                  coordinates, each an int64 position and a float32 in each of the buffer's `buffer_rows` rows
    shards: processes that share weights, grads and optimizer state (a sharded data-parallel run); 1 = replicated.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_layer_internals = token_budget * (16 * hidden + 4 * intermediate) * 2
    layer_inputs = token_budget * hidden * 2 * layers
    training = stage in ("sketch", "grpo")
    plan = {"weights": num_params * (4 + (2 if stage == "grpo" else 0)) / shards,
            "grads": num_params * 4 / shards if training else 0,
            "optimizer": num_params * 8 / shards if stage == "grpo" else 0,
            "vllm": vllm_share * card_gib * GIB if stage in ("collect", "grpo") else 0,
            "activations": (layer_inputs + per_layer_internals if checkpointing else per_layer_internals * layers)
            if training else token_budget * hidden * 2 * 4,
            "logits": (logit_chunk or max(1, 2 ** 26 // config.vocab_size)) * config.vocab_size * 4 * 3,
            "hashes": min(num_params * 4, GIB) if stage == "sketch" else 0,
            "kept": kept_fraction * num_params * (8 + 4 * buffer_rows)}
    plan = {part: round(value / GIB, 2) for part, value in plan.items()}
    return plan | {"total": round(sum(plan.values()), 2)}


def check_memory_plan(plan: dict[str, float], card_gib: float, stage: str, flags: str) -> None:
    """Print the plan; refuse, before loading anything, a plan above the card, naming the flags that shrink it."""
    parts = ", ".join(f"{part} {gib:.1f}" for part, gib in plan.items() if part != "total")
    print(f"memory plan ({stage}, GiB per GPU): {parts}; total {plan['total']:.1f} of {card_gib:.0f}")
    if plan["total"] > card_gib:
        raise DataError(f"{stage}: the memory plan needs {plan['total']:.1f} GiB per GPU, the card has "
                        f"{card_gib:.0f}; lower {flags}")


def plan_memory(model_path: str, device: torch.device, stage: str, token_budget: int, checkpointing: bool,
                vllm_share: float, flags: str, fsdp: str = "off", world: int = 1, kept: tuple[float, int] = (0.0, 0)
                ) -> bool:
    """On a GPU: print the stage's memory plan for this model and refuse it before loading when it does not fit.
    Returns whether to shard the model over the `world` processes (use_fsdp; on a CPU, where no plan is made: only
    with --fsdp on). kept: memory_plan's (kept_fraction, buffer_rows)."""
    card = card_gib(device)
    if card is None:
        return fsdp == "on"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    num_params = count_parameters(config)
    plan_of = functools.partial(memory_plan, config, num_params, stage, token_budget, checkpointing, vllm_share, card,
                                kept_fraction=kept[0], buffer_rows=kept[1])
    plan = plan_of(shards=1)
    sharded = use_fsdp(fsdp, world, plan, card)
    if sharded:
        plan = plan_of(shards=world)
    check_memory_plan(plan, card, f"{stage}, FSDP over {world} GPUs" if sharded else stage, flags)
    return sharded


def use_fsdp(fsdp: str, world: int, replicated_plan: dict[str, float], card: float) -> bool:
    """--fsdp on, or auto when the weights, grads and optimizer state of a model replicated on every GPU would take
    more than half the card (sharding costs communication; below that, replicas leave room enough)."""
    state = replicated_plan["weights"] + replicated_plan["grads"] + replicated_plan["optimizer"]
    return fsdp == "on" or (fsdp == "auto" and world > 1 and state > card / 2)


def card_gib(device: torch.device) -> float | None:
    """The GPU's memory in GiB (None on a CPU: no plan is enforced there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


# ----------------------------------------------------------------------------------------------
# Generation engines: the same three calls for transformers and vLLM
#   engine = make_engine(...); engine.push_weights(model); engine.generate(prompt_ids, n, ...)
# ----------------------------------------------------------------------------------------------

def choose_backend(requested: str) -> str:
    """The generation engine for --backend: "vllm", "hf" (transformers generate), or "auto".

    auto = vLLM when it is importable and a CUDA GPU is present, else transformers: on a CPU, vLLM's per-step
    overhead makes it far slower than generate() for small models (bench/rollout_bench.py).
    """
    if requested not in ("auto", "vllm", "hf"):
        raise DataError(f"--backend must be auto, vllm or hf, got {requested!r}")
    if requested == "hf" or (requested == "auto" and not torch.cuda.is_available()):
        return "hf"
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # on a GPU node a broken vLLM must not silently turn into transformers generate
        raise DataError(f"--backend {requested}: vLLM cannot be imported ({e}); run 'bash install.sh', or pass "
                        f"--backend hf to sample with transformers generate (much slower)") from None
    return "vllm"


def stop_token_ids(tokenizer, generation_config) -> set[int]:
    """The one stop-token rule: the tokenizer's EOS plus the generation config's EOS ids (e.g. Qwen2.5-Instruct:
    <|im_end|> and <|endoftext|>)."""
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return {tokenizer.eos_token_id, *configured}


def clean_response(token_ids: list[int], stop_ids: set[int], pad_token_id: int | None) -> list[int]:
    """A generated sequence up to and including its first stop token, without pad tokens."""
    response = []
    for token in token_ids:
        if token in stop_ids:
            response.append(token)
            break
        if token != pad_token_id:
            response.append(token)
    return response


# generate() fills unset options from the model's generation_config.json (e.g. Qwen2.5: top_k 20, repetition
# penalty 1.05). Pin them to plain temperature + top_p sampling, as vLLM's sampling does.
PLAIN_SAMPLING = dict(top_k=0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0)


class TransformersEngine:
    """transformers generate() on the given model: the trainer's own (nothing to push), or, when the trainer is
    sharded, a whole copy that receives the trainer's weights (a sharded model would gather its weights at every
    decoding step, a collective that processes generating different lengths cannot join). Samples from torch's
    global RNG: seeded by the call's `seed`, or (seed None) continuing the stream the caller seeded or restored."""

    def __init__(self, model, tokenizer, batch_sequences: int):
        self.model, self.tokenizer, self.batch_sequences = model, tokenizer, batch_sequences
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        self.context = context_length(model.config)

    def push_weights(self, model) -> None:
        if model is not self.model:
            self.model.load_state_dict(dict(full_weights(model)))

    def release_memory(self, keep_weights: bool) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int | None = None, progress=None) -> list[list[list[int]]]:
        """n responses per prompt (temperature 0: greedy), stop token kept, no padding.
        progress: a tqdm bar counting responses, moved after every generate() call."""
        if seed is not None:
            torch.manual_seed(seed)
        model, pad = self.model, self.tokenizer.pad_token_id
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()  # with the KV cache (gradient checkpointing turns it off in train mode)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, **PLAIN_SAMPLING) if temperature > 0 \
            else dict(do_sample=False, repetition_penalty=1.0)
        rows = [ids for ids in prompt_ids for _ in range(n)]  # prompt 0's n copies, then prompt 1's, ...
        flat = []
        for start in range(0, len(rows), self.batch_sequences):
            batch = rows[start:start + self.batch_sequences]
            width = max(len(r) for r in batch)
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=device)  # left padding
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
            max_new = max_new_tokens if self.context is None else min(max_new_tokens, self.context - width)
            with autocast(device):
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new,
                                        pad_token_id=pad, eos_token_id=sorted(self.stop_ids), **sampling)
            flat += [clean_response(row, self.stop_ids, pad) for row in output[:, width:].tolist()]
            report_progress(progress, flat[-len(batch):])
        model.train(was_training)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


class VLLMEngine:
    """A vLLM engine in this process (one per torchrun rank, data parallel, as TRL's colocate mode), fed with
    token ids; the trainer's weights can be pushed into it."""

    def __init__(self, model_path: str, seed: int, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.6, kv_cache_gib: float = 0.0, enforce_eager: bool = False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process, so weights can be pushed
        from transformers import GenerationConfig
        from vllm import LLM

        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS is the only stop token
            generation_config = None
        self.stop_ids = stop_token_ids(load_tokenizer(model_path), generation_config)
        self.sleep_mode = torch.cuda.is_available()  # vLLM's sleep mode is CUDA-only
        self.asleep = False
        engine_args = dict(model=model_path, tokenizer=model_path, seed=seed, max_model_len=max_model_len,
                           enable_prefix_caching=False, enforce_eager=enforce_eager, enable_sleep_mode=self.sleep_mode,
                           dtype="bfloat16" if torch.cuda.is_available() else "float32",
                           kv_cache_memory_bytes=int(kv_cache_gib * 2 ** 30) or None)
        if torch.cuda.is_available():
            engine_args["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GB of KV cache on a CPU machine
        if dist.is_initialized() and dist.get_world_size() > 1:
            engine_args["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**engine_args)

    def release_memory(self, keep_weights: bool) -> None:
        """Sleep mode (CUDA): give the GPU memory back while others work. keep_weights: offload the weights to CPU
        and restore them on waking (level 1); else discard them (level 2), for weights that are pushed anew."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def push_weights(self, model) -> None:
        """The trainer's weights into the engine (vLLM's own loader reads the transformers names). From sleep, the
        weights' memory is woken first and the KV cache after, so the two never peak together with the push."""
        self.wake_up(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model),
                                                          "is_checkpoint_format": True})
        self.wake_up(["kv_cache"])

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int | None = None, progress=None) -> list[list[list[int]]]:
        """n responses per prompt. One seed per call: the engine runs in this process and samples requests without
        a seed of their own from torch's global generator, which `seed` resets (a seed per request would put vLLM
        on its slower per-request sampling path). The same call gives the same samples."""
        from vllm import SamplingParams, TokensPrompt

        self.wake_up()
        if seed is not None:
            torch.manual_seed(seed)  # the CPU and the current CUDA device's generators
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, skip_special_tokens=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        groups = [[clean_response(list(sample.token_ids), self.stop_ids, None) for sample in output.outputs]
                  for output in outputs]
        report_progress(progress, [r for group in groups for r in group])
        return groups


def report_progress(progress, responses: list[list[int]]) -> None:
    """Move a tqdm bar that counts responses, and show the generated tokens per second so far."""
    if progress is None:
        return
    progress.tokens = getattr(progress, "tokens", 0) + sum(len(r) for r in responses)
    progress.update(len(responses))
    elapsed = progress.format_dict["elapsed"]
    progress.set_postfix(tokens_per_s=f"{progress.tokens / elapsed:.0f}" if elapsed else "-")


def make_engine(backend: str, model, tokenizer, model_path: str, seed: int, hf_batch_sequences: int, **vllm_args):
    """The engine for a backend chosen by choose_backend: "hf" samples from `model`, "vllm" loads `model_path`."""
    if backend == "vllm":
        return VLLMEngine(model_path, seed, **vllm_args)
    return TransformersEngine(model, tokenizer, hf_batch_sequences)


# ----------------------------------------------------------------------------------------------
# Sharded training (FSDP2): one decoder layer's weights, grads and optimizer state per process share
# ----------------------------------------------------------------------------------------------

FSDP = ("auto", "on", "off")


def shard_model(model) -> None:
    """FSDP2: every decoder layer (the model's _no_split_modules) split over the processes and gathered for its own
    forward and backward only, then the rest (embeddings, final norm, LM head) as the root. Gradients are averaged
    over the processes, as DDP does. Build the optimizer after this: the parameters become sharded DTensors."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the whole model, one at a time; a sharded tensor is gathered from the processes first (a
    collective: every process must iterate, in the same order)."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if is_sharded(tensor) else tensor


def gradient_sync(model, now: bool):
    """Context of one backward: DDP all-reduces only the last backward of a step (no_sync before it); a sharded
    model reduce-scatters every backward (holding whole gradients until the last would undo the sharding)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not now:
        return model.no_sync()
    return contextlib.nullcontext()


def equal_pass_count(batches: list[list[int]]) -> list[list[int]]:
    """Split the largest micro-batches until this process has as many passes as the process with the most: a
    sharded model gathers its weights in every pass, a collective all processes must join. Every process holds the
    same number of sequences, so the split always succeeds."""
    most = max(all_gather(len(batches)))
    batches = list(batches)
    while len(batches) < most:
        largest = batches.pop(max(range(len(batches)), key=lambda i: len(batches[i])))
        if len(largest) < 2:
            raise RuntimeError(f"{most} passes needed but this process holds {len(batches) + 1} sequences")
        batches += [largest[:len(largest) // 2], largest[len(largest) // 2:]]
    return batches


def training_state(model, optimizer) -> dict:
    """Whole (unsharded) model and optimizer (None: model only) state on rank 0's CPU, for a resume file or the
    final checkpoint: every process must call it (the shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:  # tied weights (an LM head that is the embedding) stay one tensor, saved once
        weights, first_name = get_model_state_dict(model, options=options), {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            if name in weights:
                weights[name] = weights[first_name.setdefault(id(parameter), name)]
        return {"model": weights}
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def load_training_state(model, optimizer, state: dict) -> None:
    """training_state's dict back into a model and optimizer, sharded or not (each process takes its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------
# Gradients as one flat vector (sketch_grads.py): every .grad in parameter order, read in place or copied
# ----------------------------------------------------------------------------------------------

def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """model.named_parameters() order, requires_grad only (tied tensors are listed once by named_parameters)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def split_kept_by_parameter(kept: torch.Tensor, sizes: list[int]) -> list[torch.Tensor | None]:
    """Per parameter: the positions (inside that parameter) of its kept coordinates; None = all of them."""
    bounds = torch.tensor([0] + sizes, device=kept.device).cumsum(0)
    cuts = torch.searchsorted(kept, bounds).tolist()
    local = []
    for i, size in enumerate(sizes):
        positions = kept[cuts[i]:cuts[i + 1]] - bounds[i]
        local.append(None if len(positions) == size else positions)
    return local


def flatten_kept_gradient(parameters: list[torch.nn.Parameter], local_kept: list[torch.Tensor | None],
                          out: torch.Tensor) -> None:
    """Write the kept coordinates of every parameter's .grad, in order, into the preallocated row `out`."""
    offset = 0
    for p, positions in zip(parameters, local_kept):
        count = p.numel() if positions is None else len(positions)
        target = out[offset:offset + count]
        if p.grad is None:
            target.zero_()
        elif positions is None:
            target.copy_(p.grad.reshape(-1))
        else:
            torch.index_select(p.grad.reshape(-1).to(out.dtype), 0, positions, out=target)
        offset += count


def local_gradient(p: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
    """p's gradient held by this process, flat and read in place, and the index inside p of its first coordinate:
    all of it (0), or a sharded gradient's own rows (FSDP2 splits the rows over the processes as torch.chunk does)."""
    if not is_sharded(p.grad):
        return p.grad.reshape(-1), 0
    rows_per_process = -(-p.shape[0] // p.grad.device_mesh.size())
    first_row = min(p.grad.device_mesh.get_local_rank() * rows_per_process, p.shape[0])
    return p.grad.to_local().reshape(-1), first_row * (p.numel() // p.shape[0])


def gradient_pieces(parameters: list[torch.nn.Parameter], block_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The flat gradient (every .grad in order) cut at the multiples of block_size, read in place (no copy):
    (block, position of the piece's first coordinate inside that block, the piece) in flat order. A parameter
    without a .grad (its coordinates are 0) gives no piece; a sharded one, this process's rows only."""
    offset = 0  # flat index of the current parameter's first coordinate
    for p in parameters:
        if p.grad is not None:
            (flat, first), done = local_gradient(p), 0
            while done < len(flat):
                block, start = divmod(offset + first + done, block_size)
                take = min(len(flat) - done, block_size - start)
                yield block, start, flat[done:done + take]
                done += take
        offset += p.numel()


# ----------------------------------------------------------------------------------------------
# The sketch stage's plumbing (sketch_grads.py): its flags, its model, its settings, writing SKETCH.npy + .json
# ----------------------------------------------------------------------------------------------

def check_sketch_args(args, projectors: tuple[str, ...], dtypes: dict) -> None:
    if not (args.model and args.rollouts and args.out):
        raise DataError("--model, --rollouts and --out are required")
    if len(args.val_rollouts) != len(args.val_out):
        raise DataError(f"{len(args.val_rollouts)} --val-rollouts but {len(args.val_out)} --val-out: give one "
                        "output per validation set")
    outs = [args.out, *args.val_out]
    if len(set(outs)) < len(outs):
        raise DataError(f"--out and --val-out name the same file twice: {outs}")
    check_choices(("--projector", args.projector, projectors), ("--dtype", args.dtype, tuple(dtypes)),
                  ("--gradient-checkpointing", args.gradient_checkpointing, CHECKPOINTING), ("--fsdp", args.fsdp, FSDP),
                  ("--batched-backward", args.batched_backward, CHECKPOINTING))
    if args.fsdp == "on" and not (args.projector == "countsketch" and args.sparse_ratio >= 1):
        raise DataError("--fsdp on hashes each process's gradient shards: it needs --projector countsketch and "
                        "--sparse-ratio 1")
    if not 0 < args.sparse_ratio <= 1:
        raise DataError(f"--sparse-ratio must be in (0, 1], got {args.sparse_ratio}")
    if args.batched_backward == "on" and (args.projector != "countsketch" or args.sparse_ratio < 1
                                          or args.fsdp == "on"):
        raise DataError("--batched-backward on hashes each prompt's exact gradient: it needs --projector countsketch, "
                        "--sparse-ratio 1 and no --fsdp (kronecker batches by itself)")
    if args.projector == "kronecker" and (args.sparse_ratio < 1 or args.kronecker_dim < 1):
        raise DataError("--projector kronecker sketches every coordinate: it needs --sparse-ratio 1 and "
                        "--kronecker-dim >= 1")
    if args.proj_dim < 1 or args.chunk_prompts < 1 or args.token_budget < 1 or args.mean_of_rows < 0:
        raise DataError("--proj-dim, --chunk-prompts and --token-budget must be >= 1, --mean-of-rows >= 0")
    if args.clip_ratio is not None and not 0 < args.clip_ratio < 1:
        raise DataError(f"--clip-ratio must be in (0, 1), got {args.clip_ratio}")


CHECKPOINTING = ("auto", "on", "off")


def use_checkpointing(setting: str, device: torch.device) -> bool:
    """--gradient-checkpointing: "on", or "auto" on CUDA (memory; on a CPU the recomputation costs speed only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def use_batched_backward(setting: str, share, checkpointing: bool) -> bool:
    """Many prompts per forward+backward (CountSketchHooks): auto = unless the model is sharded (FSDP) or
    recomputes its activations (checkpointing, on CUDA by default: the hooks would hold every layer's input, which
    checkpointing exists to free; long responses fill a backward with one prompt anyway)."""
    if setting == "on" and share:
        raise DataError("--batched-backward on: not with a sharded model (FSDP); use --fsdp off or "
                        "--batched-backward off")
    return setting == "on" or (setting == "auto" and not share and not checkpointing)


def batch_hooks(model, args, device: torch.device, share, streamed: bool, countsketch_draws, block_size: int):
    """The hooks that take each prompt's share out of a backward of many (parameters frozen), or None (a backward
    per prompt): KroneckerHooks for --projector kronecker; CountSketchHooks for --batched-backward (with auto, also
    None for a module without a rule). streamed: CountSketch at F = 1 (Sketcher.streamed);
    countsketch_draws(seed, block, N, device): a hash block's draws."""
    if args.projector == "kronecker":
        return KroneckerHooks(model, args.seed, args.kronecker_dim)
    if not (streamed and use_batched_backward(args.batched_backward, share,
                                              use_checkpointing(args.gradient_checkpointing, device))):
        return None
    try:
        block_draws = lambda block: countsketch_draws(args.seed, block, args.proj_dim, device)  # noqa: E731 (cached)
        return CountSketchHooks(model, functools.partial(draws_of_range, block_draws, block_size), args.proj_dim)
    except DataError as error:
        if args.batched_backward == "on":
            raise
        print(f"sketch_grads.py: one backward per prompt: {error}")
        return None


def draws_of_range(block_draws, block_size: int, offset: int, count: int) -> torch.Tensor:
    """The hash draws of the flat coordinates offset .. offset + count - 1: the blocks they span, sliced and joined."""
    first, last = offset // block_size, (offset + count - 1) // block_size
    blocks = [block_draws(block) for block in range(first, last + 1)]
    start = offset - first * block_size
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks))[start:start + count]


def response_batches(row: dict, token_budget: int, share: tuple[int, int] | None) -> list[list[int]]:
    """Micro-batches (indices, in file order) of one prompt's responses (prompt + response tokens each) by token
    budget: all of them, or with share = (rank, world) of a sharded model this process's share, in as many passes
    as every other process."""
    lengths = [len(row["prompt_ids"]) + len(response) for response in row["response_ids"]]
    mine = list(range(len(lengths))) if share is None else shard(list(range(len(lengths))), *share)
    batches = token_budget_batches([lengths[i] for i in mine], token_budget, longest_first=False)
    batches = [[mine[j] for j in batch] for batch in batches]
    return batches if share is None else equal_pass_count(batches)


def mean_sketch_meta(settings: dict, rows: list[dict], sample, max_rows: int, seed: int) -> dict:
    """SKETCH.json of a --mean-of-rows sketch: one row, and the rows of the rollouts file it averages."""
    return {**settings, "rows": 1, "ids": ["mean"], "zero_rows": [], "mean_of": {
        "rows": sample.tolist(), "ids": [rows[i]["id"] for i in sample], "count": len(sample), "max_rows": max_rows,
        "seed": seed, "rollouts_rows": len(rows)}}


def check_responses_per_process(rows: list[dict], world: int, path: str, share) -> None:
    """A sharded sketch splits each prompt's responses over the processes: every process needs one at least."""
    if not share:  # replicated: each process takes whole prompts
        return
    fewest = min(len(row["response_ids"]) for row in rows)
    if fewest < world:
        raise DataError(f"{path}: a prompt has {fewest} responses, fewer than the {world} processes sharing the "
                        "model (--fsdp); collect more responses per prompt or use --fsdp off")


def load_model_for_gradients(args, device: torch.device, rank: int, world: int, streamed: bool, buffered: bool):
    """The policy whose gradients are taken, in eval mode (no dropout), after its memory plan, and whether it is
    sharded: (model, (rank, world) or None). With checkpointing (use_checkpointing): recompute activations in the
    backward; transformers does that only in train mode, so train mode, dropout 0. FSDP only for the streamed
    CountSketch, which hashes each process's gradient shards (use_fsdp). buffered: the kept coordinates are copied
    into a [--chunk-prompts, F d] buffer (planned as memory_plan's "kept")."""
    checkpointing = use_checkpointing(args.gradient_checkpointing, device)
    flags = ("--token-budget, --chunk-prompts or --sparse-ratio" if buffered else
             "--token-budget or use --fsdp on" if streamed else "--token-budget")  # FSDP: streamed CountSketch only
    kept = (args.sparse_ratio, args.chunk_prompts) if buffered else (0.0, 0)
    sharded = plan_memory(args.model, device, "sketch", args.token_budget, checkpointing, 0.0, flags,
                          args.fsdp if streamed else "off", world, kept)
    model = load_model(args.model, device).eval()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        disable_dropout(model)
    if sharded:
        shard_model(model)
    return model, (rank, world) if sharded else None


def sketch_settings(args, rollouts: str, num_params: int, width: int, num_kept: int, device: torch.device,
                    rows: int) -> dict:
    """What a sketch of the rollouts file depends on: SKETCH.json's fields, and the settings of its resumable chunks."""
    return {"model": str(Path(args.model).resolve()), "rollouts": str(Path(rollouts).resolve()),
            "num_params": num_params, "projector": args.projector, "seed": args.seed,
            "sparse_ratio": args.sparse_ratio, "proj_dim": width, "dtype": args.dtype, "rows": rows,
            "chunk_prompts": args.chunk_prompts, "clip_ratio": args.clip_ratio, "rng_device": device.type,
            "kept_coordinates": num_kept,
            **({"kronecker_dim": args.kronecker_dim} if args.projector == "kronecker" else {})}


def write_sketch(path: str, sketch: np.ndarray, meta: dict) -> dict:
    """OUT.npy and OUT.json; meta gains nonfinite_rows, the rows with a NaN or an infinity."""
    out = Path(path)
    meta["nonfinite_rows"] = np.flatnonzero(~np.isfinite(sketch).all(axis=1)).tolist()
    save_npy(out, sketch)
    write_json(out.with_suffix(".json"), meta)
    print(f"wrote {out} [{meta['rows']} x {meta['proj_dim']}] ({len(meta['zero_rows'])} zero-gradient rows, "
          f"{len(meta['nonfinite_rows'])} non-finite) and {out.with_suffix('.json')}")
    return meta


# ----------------------------------------------------------------------------------------------
# Sketch files (sketch_grads.py's SKETCH.npy + SKETCH.json), read by select_data.py
# ----------------------------------------------------------------------------------------------

# Sketch metadata that must agree between the train sketch and every validation sketch.
MATCHING_FIELDS = ("projector", "seed", "sparse_ratio", "proj_dim", "num_params")
SKETCH_FIELDS = ("model", "rows", "ids", "zero_rows", "nonfinite_rows") + MATCHING_FIELDS


def open_sketch(npy_path: str, flag: str) -> tuple[np.memmap, dict]:
    """Memory-map SKETCH.npy and read SKETCH.json beside it; refuse files that disagree with themselves."""
    npy_path = Path(npy_path)
    json_path = npy_path.with_suffix(".json")
    for path in (npy_path, json_path):
        if not path.is_file():
            raise DataError(f"{flag} {npy_path}: {path} does not exist")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg})") from None
    missing = [f for f in SKETCH_FIELDS if f not in meta]
    if missing:
        raise DataError(f"{json_path}: sketch metadata lacks {missing}")
    sketch = np.load(npy_path, mmap_mode="r")
    if sketch.ndim != 2 or sketch.dtype not in (np.float16, np.float32) or not sketch.flags.c_contiguous:
        raise DataError(f"{npy_path}: expected a C-ordered 2-D float16 or float32 array, got {sketch.ndim}-D "
                        f"{sketch.dtype}")
    if sketch.shape[0] != meta["rows"] or len(meta["ids"]) != meta["rows"]:
        raise DataError(f"{npy_path} has {sketch.shape[0]} rows but {json_path} says rows={meta['rows']} "
                        f"with {len(meta['ids'])} ids")
    if sketch.shape[1] != meta["proj_dim"]:
        raise DataError(f"{npy_path} has {sketch.shape[1]} columns but {json_path} says proj_dim={meta['proj_dim']}")
    return sketch, meta


def check_sketches_match(train_meta: dict, train_path: str, val_meta: dict, val_path: str) -> None:
    """Scores are only meaningful when both sketches come from the same projection of the same parameters."""
    for field in MATCHING_FIELDS + ("kronecker_dim",):
        if train_meta.get(field) != val_meta.get(field):
            raise DataError(f"sketch metadata differ in {field!r}: {train_meta[field]!r} in {train_path} "
                            f"but {val_meta[field]!r} in {val_path}; make both with the same sketch_grads.py settings")
    if val_meta["model"] != train_meta["model"]:
        print(f"warning: {val_path} was sketched at model {val_meta['model']!r}, the train sketch at "
              f"{train_meta['model']!r}", file=sys.stderr)


def excluded_rows(meta: dict, n_rows: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (zero-gradient, non-finite) of the rows the metadata lists."""
    masks = []
    for field in ("zero_rows", "nonfinite_rows"):
        indices = np.asarray(meta[field], dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
            raise DataError(f"{where}: {field} holds an index outside 0..{n_rows - 1}")
        mask = np.zeros(n_rows, dtype=bool)
        mask[indices] = True
        masks.append(mask)
    return masks[0], masks[1]


def sketch_rows(sketch: np.memmap, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the sketch in the file's dtype, no copy: a tensor over its own short-lived map of the
    file, so pages already used leave the process with it (one map of the whole file would keep them all
    resident, up to the file's size)."""
    # mode "c" (copy-on-write) gives a writable view of the read-only file, which torch.from_numpy accepts
    part = np.memmap(sketch.filename, dtype=sketch.dtype, mode="c", shape=(stop - start, sketch.shape[1]),
                     offset=sketch.offset + start * sketch.shape[1] * sketch.itemsize)
    return torch.from_numpy(part)


def iter_sketch_chunks(sketch: np.memmap, chunk_rows: int, desc: str):
    """(first row, float32 chunk) over the sketch, each chunk read through its own map (sketch_rows)."""
    for start in tqdm(range(0, sketch.shape[0], chunk_rows), desc=desc, unit="chunk"):
        stop = min(start + chunk_rows, sketch.shape[0])
        yield start, sketch_rows(sketch, start, stop).float().numpy()  # torch widens float16 ~3x faster than numpy


def map_sketch_chunks(function, sketch: np.memmap, chunk_rows: int, desc: str) -> list:
    """[function(rows) for every chunk of chunk_rows rows of the sketch (sketch_rows: file dtype, no copy)], in
    row order. The chunks are independent: torch.get_num_threads() of them (OMP_NUM_THREADS, else one per core)
    are computed at once, each on one thread, which keeps every core busy while a chunk waits for the disk."""
    def run(start: int):
        return function(sketch_rows(sketch, start, min(start + chunk_rows, sketch.shape[0])))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per chunk: no nested thread pools
    try:
        with ThreadPoolExecutor(threads) as pool:
            starts = range(0, sketch.shape[0], chunk_rows)
            return list(tqdm(pool.map(run, starts), total=len(starts), desc=desc, unit="chunk"))
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def reading_ahead(path: str, window: int = 64 << 20):
    """While the with-block runs, a background thread pulls the file (none if path is "") into the page cache, at
    most half the memory free now (more would push out other files, such as the one the block reads). It touches
    one byte per page through short-lived maps, so nothing is copied, with a torch op, which releases the GIL while
    the disk answers (numpy's max would hold it and stall the block). A file not yet cached then comes from disk
    while the block computes."""
    stop = threading.Event()
    free_memory = os.sysconf("SC_AVPHYS_PAGES") * mmap.PAGESIZE
    size = min(os.path.getsize(path), free_memory // 2) if path and os.path.isfile(path) else 0

    def touch() -> None:
        for start in range(0, size, window):
            if stop.is_set():
                return
            part = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(min(window, size - start),))
            torch.from_numpy(part)[::mmap.PAGESIZE].max()  # one byte per page: the kernel reads the page in

    thread = threading.Thread(target=touch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------------------------
# Selection (select_data.py): its flags, reading the pool, reusing an earlier selection, writing and printing it
# ----------------------------------------------------------------------------------------------

def check_select_args(args, methods: tuple[str, ...]) -> None:
    if args.method not in methods:
        raise DataError(f"--method must be one of {', '.join(methods)}, got {args.method!r}")
    if not args.train_rollouts or not args.out:
        raise DataError("--train-rollouts and --out are required")
    if args.chunk_rows < 1:
        raise DataError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    if args.method == "cropi" and (not args.train_sketch or not args.val_sketch):
        raise DataError("--method cropi needs --train-sketch and at least one --val-sketch")
    if args.rrf_k < 0:
        raise DataError(f"--rrf-k must be >= 0, got {args.rrf_k}")
    if args.method == "influence_once" and not args.reuse_selection:
        raise DataError("--method influence_once needs --reuse-selection DIR (an earlier cropi output folder)")


POOL_FIELDS = ("id", "prompt", "answer", "skill", "source")  # what a selected row carries into subset.jsonl


def read_selection_pool(path: str) -> tuple[list[dict], np.ndarray]:
    """What selection uses of a rollouts file: the data rows {"id","prompt","answer"} (+ "skill"/"source") and the
    offline pass rates p = mean of the K rewards. Streamed, checking only these fields (common.iter_rollouts checks
    the whole schema, at ~1.3x the time), with the garbage collector paused (it would rescan the kept rows over
    and over): at a million prompts this reading is one of the longest steps of select_data.py."""
    rows, pass_rates = [], []
    gc.disable()
    try:
        for line_number, obj in common.iter_jsonl(path):
            rewards = obj.get("rewards")
            if not ("id" in obj and "prompt" in obj and "answer" in obj and rewards):
                raise DataError(f"{path}:{line_number}: a rollout row needs id, prompt, answer and K >= 1 rewards")
            rows.append({field: obj[field] for field in POOL_FIELDS if field in obj})
            pass_rates.append(sum(rewards) / len(rewards))
    finally:
        gc.enable()
    if not rows:
        raise DataError(f"{path}: no rollouts")
    repeated = [i for i, count in Counter(row["id"] for row in rows).items() if count > 1]
    if repeated:
        raise DataError(f"{path}: duplicate id {repeated[0]!r}")
    return rows, np.array(pass_rates, dtype=np.float64)


def write_json_rows(path: str | os.PathLike, obj: dict, rows_key: str) -> None:
    """write_json, but with the long list obj[rows_key] last, one compact line per item: json indents with its
    pure-Python encoder, and only its C encoder is quick on the 100,000 selected rows of a million-prompt pool."""
    head = json.dumps({key: value for key, value in obj.items() if key != rows_key}, indent=2, ensure_ascii=False)
    rows = ",\n    ".join(json.dumps(row, ensure_ascii=False) for row in obj[rows_key])
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(f'{head[:-2]},\n  "{rows_key}": [\n    {rows}\n  ]\n}}\n')


def composition(pool: list[dict], selected: np.ndarray) -> dict:
    """For each of "source"/"skill" carried by the rows: {value: [selected count, pool count]}."""
    result = {}
    for field in ("source", "skill"):
        if any(field in row for row in pool):
            in_pool = Counter(str(row.get(field)) for row in pool)
            chosen = Counter(str(pool[i].get(field)) for i in selected)
            result[field] = {value: [chosen[value], count] for value, count in sorted(in_pool.items())}
    return result


def print_selection_summary(selection: dict) -> None:
    excluded = ""
    if "eligible" in selection:
        excluded = (f"; {selection['eligible']} eligible, excluded {selection['excluded_zero_gradient']} "
                    f"zero-gradient and {selection['excluded_nonfinite']} non-finite")
    print(f"{selection['method']}: selected {selection['num_selected']} of {selection['pool_size']} prompts "
          f"(N_sel = {selection['n_select']}{excluded}) in {selection['seconds']['total']:.1f} s")
    if selection.get("note"):
        print(f"note: {selection['note']}")
    histogram = selection["pass_rate_histogram"]
    print(f"{'offline pass rate':>18} {'pool':>8} {'selected':>9}")
    for name in histogram['pool']:
        print(f"{name:>18} {histogram['pool'][name]:>8} {histogram['selected'][name]:>9}")
    for field, counts in selection["composition"].items():
        print(f"by {field}: " + ", ".join(f"{value} {chosen}/{total}" for value, (chosen, total) in counts.items()))


def ids_fingerprint(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def check_sketch_ids(meta: dict, ids: list[str], sketch_path: str, rollouts_path: str) -> None:
    """A sketch scores the prompts of its rollouts file, row for row."""
    if [str(i) for i in meta["ids"]] != [str(i) for i in ids]:
        mismatch = next((i for i, (a, b) in enumerate(zip(meta["ids"], ids)) if str(a) != str(b)),
                        min(len(meta["ids"]), len(ids)))
        raise DataError(f"--train-sketch {sketch_path} does not match --train-rollouts {rollouts_path}: "
                        f"{len(meta['ids'])} vs {len(ids)} ids, first difference at row {mismatch}")


def read_earlier_selection(folder: str, pool_ids: list[str], n_select: int, ratio: float):
    """(selection.json, subset ids best first, scores.npy) of an earlier cropi selection of the same pool and N_sel."""
    folder = Path(folder)
    selection_path = folder / "selection.json"
    if not selection_path.is_file():
        raise DataError(f"--reuse-selection {folder}: no selection.json (was that select_data.py run completed?)")
    earlier = json.loads(selection_path.read_text())
    if earlier.get("method") != "cropi":
        raise DataError(f"--reuse-selection {folder}: made with method {earlier.get('method')!r}, not 'cropi'")
    if earlier.get("train_ids_sha256") != ids_fingerprint(pool_ids):
        raise DataError(f"--reuse-selection {folder}: made from {earlier.get('train_rollouts')}, whose ids differ "
                        f"from the --train-rollouts given now")
    if earlier.get("n_select") != n_select:
        raise DataError(f"--reuse-selection {folder}: selected N_sel={earlier.get('n_select')} "
                        f"(ratio {earlier.get('ratio')}), but --ratio {ratio} gives N_sel={n_select}")
    subset_ids = [row["id"] for row in read_jsonl(folder / "subset.jsonl")]
    if subset_ids != [d["id"] for d in earlier["selected_details"]]:
        raise DataError(f"--reuse-selection {folder}: subset.jsonl and selection.json list different prompts")
    return earlier, subset_ids, np.load(folder / "scores.npy")


# ----------------------------------------------------------------------------------------------
# GRPO training plumbing (grpo_train.py): processes, models, engine, resume state, metrics, evaluation, saving
# ----------------------------------------------------------------------------------------------

def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / "grpo_train.json").is_file() and (Path(folder) / "config.json").is_file()


def check_grpo_args(args, loss_aggregations: tuple[str, ...]) -> None:
    """grpo_train.py's flags and input files, checked before any model is loaded."""
    for flag in ("model", "data", "out"):
        if not getattr(args, flag):
            raise DataError(f"--{flag.replace('_', '-')} is required")
    check_choices(("--loss-agg", args.loss_agg, loss_aggregations), ("--fsdp", args.fsdp, FSDP),
                  ("--gradient-checkpointing", args.gradient_checkpointing, CHECKPOINTING))
    if args.group_size < 2:
        raise DataError("--group-size must be >= 2 (a group of one has no advantage)")
    if min(args.batch_prompts, args.micro_batch_tokens, args.hf_generation_batch, args.ppo_epochs,
           args.mini_batches) < 1 or args.steps < 0 or args.dynamic_sampling < 0:
        raise DataError("--steps and --dynamic-sampling must be >= 0; --batch-prompts, --micro-batch-tokens, "
                        "--hf-generation-batch, --ppo-epochs and --mini-batches >= 1")
    if args.dynamic_sampling and args.mini_batches > 1:
        raise DataError("--dynamic-sampling needs --mini-batches 1: its batch can hold fewer groups than B")
    if args.temperature <= 0:
        raise DataError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    check_model(args.model)
    check_model(args.ref_model or args.model, "--ref-model")
    for path in [args.data, *args.eval_data]:  # every data file parsed before any model is loaded
        common.load_examples(path)


class TrainingRun:
    """Everything grpo_train.py's loop uses besides the algorithm: the processes, policy (`trainer`: DDP-wrapped, or
    sharded with FSDP2 by --fsdp), reference model, optimizer, generation engine, data, the resume state and the
    metrics file."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world, self.device = init_distributed()
        if args.batch_prompts % (self.world * args.mini_batches):
            raise DataError(f"--batch-prompts {args.batch_prompts} must be divisible by the number of processes "
                            f"({self.world}) x --mini-batches ({args.mini_batches})")
        seed_everything(args.seed + self.rank)  # each rank samples its own responses
        self.backend = choose_backend(args.backend)
        self.sharded = plan_memory(args.model, self.device, "grpo", args.micro_batch_tokens,
                                   use_checkpointing(args.gradient_checkpointing, self.device),
                                   args.gpu_memory_utilization if self.backend == "vllm" else 0.0,
                                   "--micro-batch-tokens or --gpu-memory-utilization, use --fsdp on, or train a "
                                   "smaller model", args.fsdp, self.world)
        self.examples = common.load_examples(args.data)
        self.eval_sets = {Path(p).stem: common.load_examples(p) for p in args.eval_data}
        self.tokenizer = load_tokenizer(args.model)
        self.pad = self.tokenizer.pad_token_id
        self.encode = lambda question: common.encode_prompt(
            self.tokenizer, common.format_prompt(self.tokenizer, question, args.system_prompt))
        self.model = load_model(args.model, self.device)
        disable_dropout(self.model)
        self.model.train()  # train mode (for gradient checkpointing) without dropout
        if use_checkpointing(args.gradient_checkpointing, self.device):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if args.kl_coef > 0:
            # the frozen reference only gives log-probs: bf16 weights on CUDA (its log-softmax is float32 anyway)
            ref_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.ref_model = load_model(args.ref_model or args.model, self.device, ref_dtype).eval().requires_grad_(False)
        if self.sharded and args.dynamic_sampling:  # its processes may keep different numbers of groups
            raise DataError("--dynamic-sampling with a sharded model (--fsdp) is not supported: use --fsdp off")
        if self.sharded:
            for model in filter(None, (self.model, self.ref_model)):
                shard_model(model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           fused=self.device.type == "cuda")
        self.metrics_path = Path(args.metrics or f"{args.out}.metrics.jsonl")
        self.store = ChunkStore(f"{args.out}.resume", {**dataclasses.asdict(args), "world_size": self.world})
        self.start_step = self.load_resume_state()
        self.trainer = self.model
        if self.world > 1 and not self.sharded:
            self.trainer = torch.nn.parallel.DistributedDataParallel(  # gradients live in the buckets: no 2nd copy
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        engine_model = load_model(args.model, self.device).eval() if self.sharded and self.backend == "hf" else self.model
        self.engine = make_engine(self.backend, engine_model, self.tokenizer, args.model, args.seed,
                                  args.hf_generation_batch, max_model_len=self.max_model_len(),
                                  gpu_memory_utilization=args.gpu_memory_utilization)
        self.engine_is_stale = True
        self.evaluated_at_start = self.start_step == 0 and (args.step_offset == 0 or args.eval_at_start)
        if self.evaluated_at_start:
            self.log_eval(0)

    def max_model_len(self) -> int | None:
        """vLLM's context: the longest prompt plus the longest response, within the model's own context."""
        if self.backend != "vllm":
            return None
        rows = self.examples + [r for rows in self.eval_sets.values() for r in rows]
        longest = max(len(self.encode(r["prompt"])) for r in rows)
        needed = longest + max(self.args.max_new_tokens, self.args.eval_max_new_tokens)
        limit = context_length(self.model.config)
        return min(needed, limit) if limit else needed

    def sampling_seed(self, step: int, round_: int = 0) -> int | None:
        """vLLM: one seed per (seed, step, rank[, sampling round]), so a resumed run samples as before. transformers:
        None, continuing the torch RNG stream of this rank (seeded at the start, saved in and restored from the
        resume state)."""
        if self.backend != "vllm":
            return None
        entropy = [self.args.seed, step, self.rank] + ([round_] if round_ else [])
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def sample_groups(self, indices: list[int], step: int, round_: int = 0) -> tuple[list, torch.Tensor]:
        """G responses from the current policy to each prompt of `indices` and their 0/1 rewards:
        ([(prompt ids, [G response ids])] per prompt, rewards [prompts, G])."""
        rows = [self.examples[i] for i in indices]
        prompt_ids = [self.encode(r["prompt"]) for r in rows]
        g = self.args.group_size
        groups = self.engine.generate(prompt_ids, g, self.args.temperature, self.args.top_p, self.args.max_new_tokens,
                                      seed=self.sampling_seed(step, round_))
        rewards = self.rewards([r for group in groups for r in group], [r["answer"] for r in rows for _ in range(g)])
        return list(zip(prompt_ids, groups)), torch.tensor(rewards).view(-1, g)

    def sync_engine(self) -> None:
        if self.engine_is_stale:
            self.engine.push_weights(self.model)
            self.engine_is_stale = False

    def log_eval(self, stage_step: int) -> None:
        if not self.eval_sets:
            return
        self.sync_engine()
        accuracies = self.evaluate()
        if self.rank == 0:
            append_jsonl(self.metrics_path, {"step": self.args.step_offset + stage_step, "eval": accuracies})
            print(f"step {self.args.step_offset + stage_step}: eval {accuracies}")

    def rewards(self, response_ids: list[list[int]], answers: list[str]) -> list[float]:
        """0/1 reward of each response (common.reward); one cut at the token limit needs an explicit final answer
        unless --last-number-when-cut."""
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        finished = [self.args.last_number_when_cut or (ids and ids[-1] in self.engine.stop_ids) for ids in response_ids]
        return [common.reward(t, a, bool(f)) for t, a, f in zip(texts, answers, finished)]

    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (temperature 0) on every eval file; each rank does every world-th prompt."""
        accuracies = {}
        for name, rows in self.eval_sets.items():
            mine = shard(rows, self.rank, self.world)
            prompts = [self.encode(r["prompt"]) for r in mine]
            groups = self.engine.generate(prompts, 1, 0.0, 1.0, self.args.eval_max_new_tokens) if mine else []
            correct = sum(self.rewards([g[0] for g in groups], [r["answer"] for r in mine]))
            correct, total = all_sum([correct, len(mine)], self.device)
            accuracies[name] = correct / total
        return accuracies

    def log_step(self, step: int, rewards: torch.Tensor, response_ids: list[list[int]], updates: list[dict],
                 rollout_time: float, update_time: float, step_time: float, sampling_rounds: int = 1) -> dict:
        """One metrics line for the whole batch (all ranks); token statistics averaged over the epochs;
        sampling_rounds: rounds of dynamic sampling (1 without), averaged over the ranks."""
        epochs = self.args.ppo_epochs
        stats = {key: sum(u[key] for u in updates) for key in ("kl", "entropy", "clip_fraction", "ratio", "loss")}
        all_equal_groups = float((rewards == rewards[:, :1]).all(dim=1).sum())
        (reward_sum, correct, responses, groups, equal_groups, token_sum, kl_sum, entropy_sum, clip_sum,
         ratio_sum, loss_sum, rounds_sum) = all_sum(
            [float(rewards.sum()), float((rewards == 1).sum()), float(rewards.numel()), float(rewards.shape[0]),
             all_equal_groups, float(sum(len(r) for r in response_ids)), stats["kl"] / epochs,
             stats["entropy"] / epochs, stats["clip_fraction"] / epochs, stats["ratio"] / epochs, stats["loss"],
             float(sampling_rounds)],
            self.device)
        row = {"step": self.args.step_offset + step + 1, "stage_step": step + 1,
               "reward_mean": reward_sum / responses, "accuracy": correct / responses,
               "kl": kl_sum / token_sum, "clip_fraction": clip_sum / token_sum, "entropy": entropy_sum / token_sum,
               "all_equal_share": equal_groups / groups, "response_length": token_sum / responses,
               "tokens_per_s": token_sum / step_time, "step_time_s": step_time, "rollout_time_s": rollout_time,
               "update_time_s": update_time, "loss": loss_sum / len(updates), "ratio_mean": ratio_sum / token_sum,
               "grad_norm": sum(u["grad_norm"] for u in updates) / len(updates),
               "sampling_rounds": rounds_sum / self.world}
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)
        return row

    def save_resume_state(self, step: int) -> None:
        """<out>.resume/: model and optimizer state, every rank's RNG states, the step and the metrics file size."""
        rng_states, state = all_gather(rng_state()), training_state(self.model, self.optimizer)
        if self.rank == 0:
            metrics_bytes = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            self.store.save(step, {**state, "metrics_bytes": metrics_bytes, "rng": rng_states})
            self.store.keep_only(step)
        barrier()

    def load_resume_state(self) -> int:
        """The step to start from: 0, or that of the latest resume state (model, optimizer, RNG, metrics restored)."""
        finished = open_chunk_store(self.store, self.rank)
        if not finished:
            return 0
        step = max(finished)
        state = self.store.load(step)
        load_training_state(self.model, self.optimizer, state)
        set_rng_state(state["rng"][self.rank])
        if self.rank == 0 and self.metrics_path.exists():  # drop the lines written after the checkpoint
            os.truncate(self.metrics_path, state["metrics_bytes"])
        print(f"resuming {self.store.folder} at step {step}/{self.args.steps}")
        return step

    def finish(self) -> None:
        """Final evaluation, the output checkpoint (atomically), then the resume state goes."""
        if self.args.steps > 0 or not self.evaluated_at_start:
            self.log_eval(self.args.steps)
        weights = training_state(self.model, None)["model"] if self.sharded else None  # gathered onto rank 0's CPU
        if self.rank == 0:
            with atomic_dir(self.args.out) as folder:
                self.model.save_pretrained(folder, state_dict=weights)
                self.tokenizer.save_pretrained(folder)
                write_json(folder / "grpo_train.json", {**dataclasses.asdict(self.args), "world_size": self.world,
                                                        "backend": self.backend})
            self.store.remove()
            print(f"wrote {self.args.out}")
        finish_distributed()


# ----------------------------------------------------------------------------------------------
# The sketch stage, continued: its resumable loop over chunks, the validation sample, and the batched sketch
# (--projector kronecker): hooks that see every layer's inputs and output gradients in ONE forward+backward of
# many prompts and add up each group's (prompt's) share of every parameter's sketch
# ----------------------------------------------------------------------------------------------

class SketchOutput:
    """One output of sketch_grads.py: its settings (chunks and .json), its resumable chunk store, the prompts this
    process takes (split: a share of them, or with a sharded model all of them), and the write by rank 0."""

    def __init__(self, args, sketcher, rows: list[dict], rollouts: str, out: str):
        check_responses_per_process(rows, sketcher.world, rollouts, sketcher.share)
        self.settings = sketch_settings(args, rollouts, sketcher.num_params, sketcher.width, sketcher.num_kept,
                                        sketcher.device, len(rows))
        self.store, self.out, self.rank = ChunkStore(f"{out}.parts", self.settings), out, sketcher.rank
        self.split = (lambda items: items) if sketcher.share else (
            lambda items: shard(items, sketcher.rank, sketcher.world))

    def write(self, sketch: np.ndarray, meta: dict) -> dict | None:
        if self.rank != 0:
            return None
        write_sketch(self.out, sketch, meta)  # adds nonfinite_rows to meta
        self.store.remove()
        return meta


def sketch_in_chunks(store: ChunkStore, rows: list[dict], chunk_prompts: int, sketch_rows, split, share,
                     rank: int, device: torch.device, dtype: torch.dtype) -> np.ndarray | None:
    """sketch_rows([[row] for each prompt of the chunk]) of every unfinished chunk of chunk_prompts prompts, saved to
    the store: this process's share of the chunks (split), or with a sharded model (share) every chunk, its parts
    summed over the processes. Rank 0 returns all chunks' rows in order, the other ranks None."""
    num_chunks = -(-len(rows) // chunk_prompts)
    finished = open_chunk_store(store, rank)
    todo = split([c for c in range(num_chunks) if c not in finished])
    for c in tqdm(todo, desc=f"sketching {len(rows)} prompts, {chunk_prompts} per chunk", disable=rank > 0):
        part = sketch_rows([[row] for row in rows[c * chunk_prompts:(c + 1) * chunk_prompts]])
        chunk = all_sum(part, device) if share else part
        if rank == 0 or not share:
            store.save(c, chunk.to(dtype).cpu().numpy())
    barrier()
    return np.concatenate([store.load(c) for c in range(num_chunks)]) if rank == 0 else None


def mean_of_rows_sample(candidates: list[int], max_rows: int, seed: int, path: str = "") -> np.ndarray:
    """1c: up to max_rows of the candidates (the rows with mixed rewards), the seeded draw select_data.py makes among
    the usable rows of a per-prompt sketch (common.sample_rows), so that averaging there with --seed gives these."""
    if len(candidates) == 0:
        raise DataError(f"--mean-of-rows: no prompt of {path} has mixed rewards (every gradient is 0)")
    return common.sample_rows(np.array(candidates, dtype=np.int64), max_rows, seed)


def pair_batches(pairs: list[tuple], token_budget: int) -> list[list[tuple]]:
    """Micro-batches of (group, row, k, weight) response pairs by token budget, in input order; one sampling
    temperature per micro-batch (response_logprobs takes one)."""
    batches = []
    for temperature in dict.fromkeys(row["temperature"] for _, row, _, _ in pairs):
        mine = [pair for pair in pairs if pair[1]["temperature"] == temperature]
        lengths = [len(row["prompt_ids"]) + len(row["response_ids"][k]) for _, row, k, _ in mine]
        batches += [[mine[i] for i in batch] for batch in token_budget_batches(lengths, token_budget, False)]
    return batches


def pair_inputs(batch: list[tuple]) -> tuple[list, list, float]:
    """response_logprobs' prompts, responses and temperature of a micro-batch of response pairs."""
    return ([row["prompt_ids"] for _, row, _, _ in batch], [row["response_ids"][k] for _, row, k, _ in batch],
            batch[0][1]["temperature"])


def pair_targets(batch: list[tuple], logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The behaviour log-probs [B, Lr] (0 on padding) and the pairs' weights [B] of a micro-batch, on its device."""
    behavior = torch.zeros_like(logprobs)
    for j, (_, row, k, _) in enumerate(batch):
        behavior[j, :len(row["behavior_logprobs"][k])] = torch.tensor(row["behavior_logprobs"][k])
    return behavior, torch.tensor([weight for *_, weight in batch], device=logprobs.device)


class KroneckerHooks:
    """Per-group sketches of every trainable parameter's gradient, from one forward+backward of many rows.

    The backward of the sum of the groups' losses gives each token's delta_t = dL/d(a layer's output); a group's
    gradient is the sum over its tokens, so each group's share is summed with the row -> group map:
      W [out, in] of a Linear / Conv1D (y = W x + b) or the LM head:  P_out G P_in^T = sum_t (P_out delta_t)(P_in x_t)^T
      an embedding E [V, H] (token v_t, output gradient g_t):        sum_t (P_out e_{v_t})(P_in g_t)^T
        (a tied LM head and its embedding are one parameter: one P_out, P_in, both parts added)
      the bias of a Linear / Conv1D: sum_t delta_t, exactly
      norm weights and biases (LayerNorm, RMSNorm: each token alone): exactly, by re-running the module on the rows
    P_out [k, out] and P_in [k, in] of the parameter numbered i (common.kronecker_factor) are drawn from
    (seed, "kronecker-out" or "kronecker-in", i); the sums are common.group_outer_sums.
    The parameters are frozen while hooked: the backward then computes the activations' gradients only, not the
    dW = delta^T x of every layer summed over all rows (a third of a usual backward), which no sketch reads.
    """
    flag = "--projector kronecker"  # the flag that uses these hooks, for error messages

    def __init__(self, model, seed: int, k: int):
        from transformers.pytorch_utils import Conv1D

        self.model, self.seed, self.k, self.active = model, seed, k, False
        self.parameters = [p for _, p in trainable_parameters(model)]
        self.index = {id(p): i for i, p in enumerate(self.parameters)}
        self.head = model.get_output_embeddings()
        self.factors, self.exact, self.handles = {}, set(), []  # factors: id(weight) -> (P_out, P_in)
        self.transposed = set()  # weights stored as [in, out]
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if module is self.head or not own:
                continue
            if isinstance(module, (torch.nn.Linear, Conv1D)):  # Conv1D (GPT-2) stores W^T: [in, out]
                shape = module.weight.shape if isinstance(module, torch.nn.Linear) else module.weight.shape[::-1]
                self.add_factors(module.weight, *shape)
                if isinstance(module, Conv1D):
                    self.transposed.add(id(module.weight))
                self.exact.update(id(p) for p in own if p is not module.weight)
                self.handles.append(module.register_forward_hook(self.linear_hook))
            elif isinstance(module, torch.nn.Embedding):
                self.add_factors(module.weight, *module.weight.shape)
                self.handles.append(module.register_forward_hook(self.embedding_hook))
            elif type(module).__name__.endswith("Norm"):
                self.exact.update(id(p) for p in own)
                self.handles.append(module.register_forward_hook(self.norm_hook))
            else:
                raise DataError(f"{self.flag} has no rule for {name} ({type(module).__name__})")
        if getattr(self.head, "bias", None) is not None:
            raise DataError(f"{self.flag}: an LM head with a bias is not supported")
        if id(self.head.weight) not in self.factors:  # an untied head
            self.add_factors(self.head.weight, *self.head.weight.shape)
        self.handles.append(model.register_forward_hook(self.model_hook))
        missed = [n for n, p in trainable_parameters(model) if id(p) not in self.factors and id(p) not in self.exact]
        if missed:
            raise DataError(f"{self.flag} has no rule for the parameters {missed}")
        for p in self.parameters:
            p.requires_grad_(False)
        self.sums: dict[int, torch.Tensor] = {}

    def add_factors(self, weight, out_dim: int, in_dim: int) -> None:
        index, device = self.index[id(weight)], weight.device
        self.factors[id(weight)] = tuple(
            common.kronecker_factor(self.k, dim, block_generator(self.seed, f"kronecker-{side}", index, device))
            for side, dim in (("out", out_dim), ("in", in_dim)))

    def width(self, p) -> int:
        """Columns of p's sketch: k_out x k_in for a matrix, its own size when exact."""
        if id(p) in self.factors:
            return self.factors[id(p)][0].shape[0] * self.factors[id(p)][1].shape[0]
        return p.numel()

    def start(self, groups: int) -> None:
        """Zero sketches for `groups` groups; the micro-batches recorded next add into them."""
        device = self.parameters[0].device
        self.groups = groups
        self.sums = {id(p): torch.zeros(groups, self.width(p), device=device) for p in self.parameters}

    def rows(self) -> torch.Tensor:
        """[groups, sum of widths]: every parameter's sketch, in parameter order."""
        return torch.cat([self.sums[id(p)] for p in self.parameters], dim=1)

    @contextlib.contextmanager
    def recording(self, batch: list[tuple]):
        """Within it: the forward of a micro-batch of response pairs (group, row, k, weight), one sequence each."""
        device = self.parameters[0].device
        self.row_group = torch.tensor([group for group, *_ in batch], device=device)
        lengths = torch.tensor([len(row["response_ids"][k]) for _, row, k, _ in batch], device=device)
        self.head_group = torch.repeat_interleave(self.row_group, lengths)  # response tokens, row by row
        self.head_seen, self.active, self.head_tap = 0, True, None
        try:
            yield
        finally:
            self.active = False
            if self.head_tap is not None:
                self.head_tap.__exit__(None, None, None)
        if self.head_seen < len(self.head_group):
            raise RuntimeError(f"{self.flag} saw {self.head_seen} of the {len(self.head_group)} response "
                               "tokens go through the LM head (common.head_logprobs)")

    def project_in(self, weight, x: torch.Tensor) -> torch.Tensor:
        return x @ self.factors[id(weight)][1].T  # P_in x_t

    def project_out(self, weight, delta: torch.Tensor) -> torch.Tensor:
        return delta @ self.factors[id(weight)][0].T  # P_out delta_t

    def add_matrix(self, weight, outs: torch.Tensor, ins: torch.Tensor, row_group: torch.Tensor) -> None:
        self.sums[id(weight)] += common.group_outer_sums(outs, ins, row_group, self.groups).reshape(self.groups, -1)

    def linear_hook(self, module, args, output):
        if not self.active:  # gradient checkpointing re-runs the forward in the backward: seen already
            return
        row_group = self.row_group
        with torch.autocast(output.device.type, enabled=False):
            ins = self.project_in(module.weight, args[0].detach().float())  # P_in x_t  [rows, T, k_in]

        def backward(delta):
            self.add_matrix(module.weight, self.project_out(module.weight, delta.float()), ins, row_group)
            if module.bias is not None:  # sum_t delta_t, per group
                self.sums[id(module.bias)].index_add_(0, row_group, delta.float().sum(1))
        output.register_hook(backward)

    def embedding_hook(self, module, args, output):
        if not self.active:
            return None
        ids, row_group = args[0], self.row_group
        if not output.requires_grad:  # frozen: the backward starts from the embeddings
            output.requires_grad_()
        if ids.shape[0] != len(row_group):  # looked up once for all rows (GPT-2's positions): a copy per row
            ids, output = ids.expand(len(row_group), -1), output.expand(len(row_group), -1, -1)
        # torch leaves the padding token's row without a gradient: its tokens do not count (no mask without one)
        counted = None if module.padding_idx is None else (ids != module.padding_idx)[..., None]
        output.register_hook(lambda grad: self.add_embedding(
            module.weight, ids, grad.float() if counted is None else grad.float() * counted, row_group))
        return output

    def add_embedding(self, weight, ids: torch.Tensor, grad: torch.Tensor, row_group: torch.Tensor) -> None:
        """E's share of each group: sum_t (P_out e_{v_t})(P_in g_t)^T, token v_t, output gradient g_t."""
        p_out, p_in = self.factors[id(weight)]
        self.add_matrix(weight, p_out.T[ids], grad @ p_in.T, row_group)  # P_out e_v = column v of P_out

    def norm_hook(self, module, args, output):
        if not self.active:
            return
        x, row_group = args[0].detach(), self.row_group
        output.register_hook(lambda grad: self.add_norm(module, x, grad, row_group))

    def add_norm(self, module, x: torch.Tensor, grad: torch.Tensor, row_group: torch.Tensor) -> None:
        """The module's own parameters' gradient for each group, exactly: the vjp of the module re-run on each row
        (torch.func.vmap over the rows), the rows' gradients added to their groups."""
        params = dict(module.named_parameters(recurse=False))
        copies = {name: p.detach() for name, p in params.items()}

        def row_gradient(x_row, grad_row):  # a row alone: the norm works token by token, so rows do not mix
            _, vjp = torch.func.vjp(lambda weights: torch.func.functional_call(module, weights, (x_row,)), copies)
            return vjp(grad_row)[0]
        with torch.enable_grad():
            per_row = torch.func.vmap(row_gradient)(x, grad)
        for name, p in params.items():
            self.sums[id(p)].index_add_(0, row_group, per_row[name].float().reshape(len(x), -1))

    def model_hook(self, module, args, output):
        """After the model's own forward: the LM head is applied next as a function (common.head_logprobs), not
        called as a module; a TorchFunctionMode sees those calls until the end of the recording."""
        if self.active and self.head_tap is None:
            self.head_tap = HeadTap(self)
            self.head_tap.__enter__()

    def head_hook(self, ins: torch.Tensor, logits: torch.Tensor) -> None:
        """One chunk of response tokens through the head: ins = h_t / T [n, H], logits z_t [n, V] (the head's
        output, whose gradient is delta_t); tokens past the last one (a chunk's padding) get no gradient."""
        count = len(ins)
        token_group = self.head_group[self.head_seen:self.head_seen + count]
        token_group = torch.nn.functional.pad(token_group, (0, count - len(token_group)))
        self.head_seen += min(count, len(self.head_group) - self.head_seen)
        weight = self.head.weight
        ins = self.project_in(weight, ins.detach().float())[:, None]
        logits.register_hook(lambda delta: self.add_matrix(weight, self.project_out(weight, delta.float())[:, None],
                                                           ins, token_group))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for p in self.parameters:
            p.requires_grad_(True)


def group_runs(row_group: torch.Tensor) -> list[tuple[int, slice]]:
    """(group, slice of its rows) for each run of equal consecutive entries: slices are views, not copies (the
    rows of a micro-batch come group by group; a group met twice is simply added twice)."""
    groups, counts = torch.unique_consecutive(row_group, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [(group, slice(end - count, end)) for group, count, end in zip(groups.tolist(), counts.tolist(), ends)]


class CountSketchHooks(KroneckerHooks):
    """Each group's EXACT gradient, CountSketched, from one forward+backward of many prompts (--batched-backward):
    KroneckerHooks' rules with P_out = P_in = I. A weight's share of group b, G_b = sum_t delta_t x_t^T over b's
    tokens, is formed one layer and one group at a time (in the weight's storage layout) and hashed at once at the
    weight's own flat coordinates, an embedding's rows e_{v_t} g_t^T without forming E's shape at all; biases and
    norms are summed exactly and hashed at the end. The CountSketch is linear, so each row equals the streamed
    CountSketch of that group's .grad (sketch_grads.countsketch_gradient) up to float rounding.
    draws(offset, n): the hash draws r(i) of the flat coordinates offset .. offset + n - 1."""
    flag = "--batched-backward"

    def __init__(self, model, draws, proj_dim: int):
        self.draws, self.proj_dim = draws, proj_dim
        super().__init__(model, seed=0, k=0)
        offsets = torch.tensor([0] + [p.numel() for p in self.parameters]).cumsum(0).tolist()
        self.offset = {id(p): offset for p, offset in zip(self.parameters, offsets)}

    def add_factors(self, weight, out_dim: int, in_dim: int) -> None:
        self.factors[id(weight)] = None  # hashed as it is, at its own coordinates

    def width(self, p) -> int:
        return p.numel()

    def project_in(self, weight, x: torch.Tensor) -> torch.Tensor:
        return x

    def project_out(self, weight, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def start(self, groups: int) -> None:
        """halves[b, r] sums group b's g_i with draw r(i) = r (sketch = odd minus even, as countsketch_gradient)."""
        device = self.parameters[0].device
        self.groups = groups
        self.halves = torch.zeros(groups, 2 * self.proj_dim, device=device)
        self.sums = {id(p): torch.zeros(groups, p.numel(), device=device) for p in self.parameters
                     if id(p) in self.exact}

    def rows(self) -> torch.Tensor:
        """[groups, N], once per start(): the exact parameters' sums hashed in, then odd minus even halves."""
        for p in self.parameters:
            if id(p) in self.exact:
                self.halves.index_add_(1, self.draws(self.offset[id(p)], p.numel()), self.sums[id(p)])
        return self.halves[:, 1::2] - self.halves[:, 0::2]

    def add_matrix(self, weight, outs: torch.Tensor, ins: torch.Tensor, row_group: torch.Tensor) -> None:
        """G_b = sum over group b's rows and tokens of delta_t x_t^T (outs = delta [rows, T, out], ins = x [rows,
        T, in]), stored [out, in], or [in, out] for GPT-2's Conv1D, hashed into group b's row."""
        draws = self.draws(self.offset[id(weight)], weight.numel())
        for group, rows in group_runs(row_group):
            delta, x = outs[rows].flatten(0, 1), ins[rows].flatten(0, 1)
            grad = x.T @ delta if id(weight) in self.transposed else delta.T @ x
            self.halves[group].index_add_(0, draws, grad.reshape(-1))

    def add_embedding(self, weight, ids: torch.Tensor, grad: torch.Tensor, row_group: torch.Tensor) -> None:
        """E [V, H] gets g_t in row v_t: coordinates offset + v_t H + (0 .. H-1), hashed token by token."""
        draws = self.draws(self.offset[id(weight)], weight.numel()).view(weight.shape)
        for group, rows in group_runs(row_group):
            self.halves[group].index_add_(0, draws[ids[rows]].reshape(-1), grad[rows].reshape(-1))


class HeadTap(torch.overrides.TorchFunctionMode):
    """Calls of F.linear with the LM head's weight (common.head_logprobs) go to KroneckerHooks.head_hook."""

    def __init__(self, hooks: KroneckerHooks):
        super().__init__()
        self.hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and args[1] is self.hooks.head.weight:
            self.hooks.head_hook(args[0], out)
        return out
