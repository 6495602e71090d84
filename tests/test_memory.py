"""Peak memory with a Qwen2.5-sized vocabulary (151,936 words): the acceptance check of
bench/memory_bench.py at a small scale. collect's log-prob pass, sketch_grads.py at its defaults (2
prompts x 8 responses) and one grpo_train.py step (2 prompts x 4 samples, hf backend, default
micro-batching) must each peak under 3 GB resident.

The responses are 128 tokens long here, to keep the test near a minute (three child processes);
bench/memory_bench.py measures 256 to 2,048 tokens (bench/results/memory_bench.md). Before the
chunked LM head these passes held the [tokens, 151,936] logits whole, and at 128 tokens they peaked
at 4.6 to 5.0 GB.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import memory_bench as mb  # noqa: E402

LENGTH = 128


def test_child_peak_is_the_child_own_memory():
    ballast = torch.ones(1 << 28)  # 1 GiB resident in this (parent) process: not the child's
    measured = mb.child_peak("block = bytearray(b'x') * 400_000_000\n", [], threads=1, limit_gb=4)
    assert ballast.sum() > 0
    assert 0.4 <= measured["peak_rss_gb"] < 0.6  # the 0.4 GB block plus a bare interpreter


def test_child_over_its_address_space_limit_fails_instead_of_taking_the_machine():
    with pytest.raises(RuntimeError, match="address space limited to 0.5 GB"):
        mb.child_peak("block = bytearray(b'x') * 1_000_000_000\n", [], threads=1, limit_gb=0.5)


@pytest.fixture(scope="module")
def qwen_shaped(tmp_path_factory):
    work = tmp_path_factory.mktemp("memory")
    model = mb.build_qwen_shaped_model(work / "model")
    mb.write_data(work / "data.jsonl")
    return model, work


@pytest.mark.parametrize(
    "stage", mb.STAGES
)  # collect first: it writes the rollouts file that sketch reads
def test_peak_memory_under_3_gb_with_a_qwen_sized_vocabulary(qwen_shaped, stage):
    model, work = qwen_shaped
    point = mb.measure(stage, LENGTH, model, work, mb.Args(threads=1, limit_gb=12))
    assert point["peak_rss_gb"] <= 3.0, point
    if (
        stage == "grpo"
    ):  # a random model seldom samples <eos>: the responses are (nearly) LENGTH long
        assert point["response_length_mean"] > LENGTH / 2, point
