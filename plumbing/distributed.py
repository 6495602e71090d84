"""Several processes: torchrun, one process per GPU (gloo on a CPU machine); the one helper that
places tensors; FSDP2 sharding; the training state saved and loaded in shards
(torch.distributed.checkpoint); whole weights gathered one tensor at a time."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

# one process: torch.distributed.checkpoint saves and loads as such, warning every time
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninit")


def get_device(local_rank: int = 0) -> torch.device:
    """cuda:<local_rank> when a GPU is present, else cpu: the one place that decides placement."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun, join the process group first."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, get_device()
    device = get_device(int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, so CPU and GPU run the same code."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish_distributed() -> None:
    """Leave the process group together. After the last collective each process says so through
    torchrun's store and waits for all the others (a precaution after gloo's issue #155, a process
    closing its connections while another still reads the last barrier; not seen to matter here).
    Then the group's threads must end while Python runs, not when it exits: a gloo group freed as
    the interpreter clears its modules can abort the process ('terminate called without an active
    exception'). destroy_process_group() forgets the group, but every device mesh (FSDP2's) keeps
    it, and DTensor's caches keep the meshes: the meshes let it go, and the stage's own objects
    (run_main collects them) are its last holders."""
    if dist.is_initialized():
        from torch.distributed.device_mesh import DeviceMesh

        dist.barrier()
        store, rank = dist.distributed_c10d._get_default_store(), dist.get_rank()
        store.set(f"finished/{rank}", "1")
        store.wait([f"finished/{r}" for r in range(dist.get_world_size())])
        dist.destroy_process_group()
        for mesh in (o for o in gc.get_objects() if isinstance(o, DeviceMesh)):
            getattr(mesh, "_pg_registry", {}).clear()  # where torch 2.13 keeps a mesh's groups


def all_sum(values, device: torch.device):
    """Sum over all processes of a list of numbers (a new list, in float64) or of a tensor (in
    place); the values themselves with one process."""
    is_tensor = isinstance(values, torch.Tensor)
    tensor = values if is_tensor else torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor if is_tensor else tensor.tolist()


def all_gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj):
    """Rank 0's obj, on every process."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list, rank: int, world: int) -> list:
    """This process's share: every world-th item, starting at its rank."""
    return items[rank::world]


def open_chunk_store(store, rank: int) -> set[int]:
    """Rank 0 opens (creates or checks) the ChunkStore; every rank gets the finished pieces."""
    return set(broadcast(sorted(store.open()) if rank == 0 else None))


def run_chunks(store, count: int, compute, rank: int, world: int, shared: bool = False):
    """compute(c) of every chunk c the ChunkStore has not finished, each saved when done: every
    process its share of the chunks, or (shared) every chunk on every process, rank 0 saving.
    Returns all chunks' results in order on rank 0 (None on the others) once all are done."""
    todo = [c for c in range(count) if c not in open_chunk_store(store, rank)]
    for c in todo if shared else shard(todo, rank, world):
        result = compute(c)
        if rank == 0 or not shared:
            store.save(c, result)
    barrier()
    return [store.load(c) for c in range(count)] if rank == 0 else None


def equal_pass_count(batches: list[list[int]]) -> list[list[int]]:
    """Split the largest micro-batches until this process has as many passes as the process with
    the most: a sharded model gathers its weights in every pass, a collective all must join."""
    most, batches = max(all_gather(len(batches))), list(batches)
    while len(batches) < most:
        largest = batches.pop(max(range(len(batches)), key=lambda i: len(batches[i])))
        if len(largest) < 2:
            raise RuntimeError(f"{most} passes needed but this process holds {len(batches) + 1}")
        batches += [largest[: len(largest) // 2], largest[len(largest) // 2 :]]
    return batches


def shard_model(model) -> None:
    """FSDP2: every decoder layer (the model's _no_split_modules) split over the processes and
    gathered for its own forward and backward only, then the rest as the root. Gradients are
    averaged over the processes. Build the optimizer after this (parameters become DTensors)."""
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **layer_precision(next(model.parameters()).device))
    fully_shard(model)


def layer_precision(device: torch.device) -> dict:
    """On CUDA the decoder layers compute in bf16: their float32 shards are gathered as bf16 and
    their inputs cast to it, and gradients are reduced in float32 into the float32 shards the
    optimizer steps (torch/distributed/fsdp/_fully_shard/_fsdp_api.py, MixedPrecisionPolicy).
    The root keeps float32: the embeddings, the final norm and the LM head, which stays whole
    after the forward (the root is not resharded, _fsdp_state.py), so that common.head_logprobs'
    LM head and log-softmax run in float32. On a CPU: no policy, float32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return {}
    return {"mp_policy": MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32)}


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_rows(grad) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient this process holds, and the indices of its rows in the whole tensor: (grad,
    None) when it holds all of it; a sharded gradient's own rows [rows, -1] and their indices (FSDP2
    splits rows as torch.chunk does)."""
    if not is_sharded(grad):
        return grad, None
    local, mesh = grad.to_local(), grad.device_mesh
    first = min(mesh.get_local_rank() * -(-grad.shape[0] // mesh.size()), grad.shape[0])
    rows = torch.arange(first, first + len(local), device=local.device)
    return local.reshape(len(local), -1), rows


def full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the whole model, one at a time, a sharded tensor gathered first (a
    collective: every process must iterate, in the same order)."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if is_sharded(tensor) else tensor


def gradient_sync(model, now: bool):
    """DDP all-reduces only the last backward of a step (no_sync before it)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not now:
        return model.no_sync()
    return contextlib.nullcontext()


def training_state(model, optimizer) -> dict:
    """The model's and the optimizer's state as this process holds them (its shards of a sharded
    model, the whole of a replicated one), keyed by parameter name: the tensors themselves."""
    from torch.distributed.checkpoint import state_dict as dcp

    model_state, optimizer_state = dcp.get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_state(state: dict, folder: Path) -> None:
    """Every process writes its own shards of `state` into `folder`, in parallel (a replicated
    tensor by one of them; torch.distributed.checkpoint): into .<folder>.tmp, renamed once all have
    written, so that a kill leaves no half-written state. Every process must call it."""
    import torch.distributed.checkpoint as dcp

    tmp = folder.with_name(f".{folder.name}.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    barrier()
    dcp.save(state, checkpoint_id=tmp)  # returns once every process has written
    if rank() == 0:
        os.replace(tmp, folder)
    barrier()


def load_training_state(model, optimizer, folder: Path, others: dict) -> dict:
    """save_state's folder back into the model and optimizer, sharded or not: each process reads
    the shards it holds, whoever wrote them. `others`: the other entries to read, each with a value
    of its structure; returned filled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = training_state(model, optimizer) | others  # a fresh AdamW's state is made first
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    return state


def gathered_weights(model) -> dict | None:
    """The whole model's weights on rank 0's CPU (None on the others), gathered one tensor at a
    time (full_weights); a tied weight (an LM head that is the embedding) stays one tensor."""
    weights, first_name = {}, {}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in full_weights(model):
        first = first_name.setdefault(id(parameters.get(name, tensor)), name)
        if rank() == 0:
            weights[name] = weights[first] if first != name else tensor.cpu()
    return weights if rank() == 0 else None
