"""make_demo.py: the demo's splits are disjoint and seeded, and a build is byte-identical whatever the thread count."""

import dataclasses
import hashlib
import json
from pathlib import Path

from conftest import run_script
from make_demo import SKILLS, Args, make_splits

SMALL_BUILD = ("--warmup-steps", "20", "--warmup-per-skill", "100", "--pool-per-skill", "30", "--val-per-skill", "16",
               "--test-per-skill", "8")


def test_splits_are_seeded_and_disjoint_per_skill():
    args = Args(pool_per_skill=30, val_per_skill=16, test_per_skill=8, warmup_per_skill=100)
    splits = make_splits(args)
    assert splits == make_splits(args)
    assert splits != make_splits(dataclasses.replace(args, seed=1))
    prompts = [row["prompt"] for rows in splits.values() for row in rows]  # a problem belongs to one skill
    assert len(prompts) == len(set(prompts)) == len(SKILLS) * (30 + 16 + 8 + 100)


def build(folder: Path, threads: int) -> dict[str, bytes]:
    """Build the small demo with `threads` OpenMP/MKL threads in the environment; its files' bytes by name."""
    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run_script("make_demo.py", "--out", str(folder), *SMALL_BUILD, env=threads_env)
    files = sorted(folder.glob("data/*.jsonl")) + [folder / "model" / "model.safetensors"]
    return {str(path.relative_to(folder)): path.read_bytes() for path in files}


def test_build_is_byte_identical_with_one_or_two_threads(tmp_path):
    one_thread = build(tmp_path / "one", threads=1)
    two_threads = build(tmp_path / "two", threads=2)
    assert one_thread.keys() == two_threads.keys()
    assert len(one_thread) == 1 + 2 * len(SKILLS) + 1
    for name in one_thread:
        assert one_thread[name] == two_threads[name], f"{name} differs between 1 and 2 threads"
    recorded = json.loads((tmp_path / "one" / "demo.json").read_text())["sha256"]
    assert recorded == {name: hashlib.sha256(data).hexdigest() for name, data in one_thread.items()}
