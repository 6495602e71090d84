"""Peak host memory of each process while grpo_train.py saves and loads its resume state.

Two processes (torchrun, gloo), a GPT-2 built from a config (12 layers, width 768, 16,384 words:
98M parameters, random weights), replicated (DDP's layout: every process holds the whole model) and
sharded (FSDP2, --fsdp on). Every process builds the model and AdamW, then in a fresh pair of
processes per phase:
  save: after one AdamW update (its state allocated), TrainingRun.save_resume_state;
  load: with a fresh model and AdamW, as a resumed run starts, TrainingRun.load_resume_state.
Measured per process: the resident set just before the phase and its high-water mark during the
phase (VmHWM, reset through /proc/self/clear_refs before the phase; Linux only). One thread.

Usage: python bench/resume_bench.py                    (about 2 minutes on 2 cores)
       python bench/resume_bench.py --code /tmp/old     (the plumbing/ of another checkout, e.g.
                                                         `git archive 2f3e895 | tar -x -C /tmp/old`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plumbing.cli import arg, run_main  # noqa: E402

CHILD = textwrap.dedent("""
    import inspect, json, sys, types
    from pathlib import Path
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config
    from plumbing import distributed as dist
    from plumbing.files import ChunkStore
    from plumbing.grpo_run import TrainingRun

    def resident():  # (VmRSS, VmHWM) in bytes
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return [int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")]

    phase, sharding, folder, layers, width, vocab = sys.argv[1:4] + [int(a) for a in sys.argv[4:]]
    rank, world, _ = dist.init_distributed()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64, vocab_size=vocab)
    model = AutoModelForCausalLM.from_config(config)
    if sharding == "sharded":
        dist.shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters())
    if phase == "save":
        for parameter in model.parameters():
            parameter.grad = torch.full_like(parameter, 1e-3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    run = TrainingRun.__new__(TrainingRun)  # only what saving and loading use
    run.model, run.optimizer, run.rank, run.world = model, optimizer, rank, world
    run.args, run.metrics_path = types.SimpleNamespace(steps=1), Path(folder) / "metrics.jsonl"
    run.store = ChunkStore(Path(folder) / "run.resume", {"bench": sharding})
    finished = dist.open_chunk_store(run.store, rank)
    dist.barrier()
    before = resident()[0]
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    if phase == "save":
        run.save_resume_state(1)
    elif "finished" in inspect.signature(TrainingRun.load_resume_state).parameters:
        run.load_resume_state(finished)
    else:  # commit 2f3e895 and before: the method opens the store itself
        run.load_resume_state()
    peak = resident()[1]
    local = [p.to_local() if dist.is_sharded(p) else p for p in model.parameters()]
    parameters = sum(p.numel() for p in local)  # a sharded model: this rank's share
    print("RESULT " + json.dumps(dict(rank=rank, before=before, peak=peak, local=parameters)))
    dist.finish_distributed()
""")


@dataclasses.dataclass
class Args:
    code: str = arg(str(ROOT), "project checkout whose plumbing/ is measured")
    layers: int = arg(12, "GPT-2 layers")
    width: int = arg(768, "GPT-2 width (heads of 64)")
    vocab_size: int = arg(16384, "GPT-2 vocabulary")
    port: int = arg(29650, "torchrun's port (and the next one)")


def run_phase(args: Args, phase: str, sharding: str, work: Path, port: int) -> list[dict]:
    script = work / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": args.code, "OMP_NUM_THREADS": "1"}
    sizes = [str(args.layers), str(args.width), str(args.vocab_size)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={port}", str(script), phase, sharding, str(work), *sizes]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=args.code)
    if done.returncode:
        raise SystemExit(f"{phase} {sharding} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda row: row["rank"])


def main(args: Args) -> None:
    gib = 2**30
    print(f"code: {args.code}")
    print("| layout | phase | rank | parameters held | RSS before | peak during | peak - before |")
    print("|---|---|---|---|---|---|---|")
    for sharding in ("replicated", "sharded"):
        with tempfile.TemporaryDirectory() as work:
            for i, phase in enumerate(("save", "load")):
                port = args.port + 2 * i + (sharding == "sharded")
                for row in run_phase(args, phase, sharding, Path(work), port):
                    before, peak = row["before"] / gib, row["peak"] / gib
                    cells = [sharding, phase, row["rank"], f"{row['local'] / 1e6:.1f}M"]
                    cells += [f"{before:.2f} GiB", f"{peak:.2f} GiB", f"{peak - before:+.2f} GiB"]
                    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    run_main(main, Args)
