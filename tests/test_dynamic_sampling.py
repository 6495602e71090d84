"""grpo_train.py --dynamic-sampling (DAPO): groups whose G rewards are all equal are replaced, at
most N rounds."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script
from test_grpo_train import ENV, digit_toy, toy_flags  # noqa: F401  (digit_toy: the module's fixture)

import grpo_train
import plumbing.distributed
from grpo_train import dynamic_sampling


def scripted_rounds(rounds: list[list[list[int]]]):
    """A sample_round that returns hand-made rewards [groups, G] per round, groups named
    'r<round>g<index>'."""
    calls = []

    def sample_round(r: int):
        calls.append(r)
        return [f"r{r}g{i}" for i in range(len(rounds[r]))], torch.tensor(
            rounds[r], dtype=torch.float32
        )

    return sample_round, calls


def test_all_equal_groups_are_replaced_by_new_prompts():
    sample_round, calls = scripted_rounds(
        [
            [
                [1, 1, 1, 1],
                [0, 1, 0, 0],
                [0, 0, 0, 0],
                [1, 0, 1, 1],
            ],  # round 0: groups 1 and 3 mixed
            [
                [0, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 0, 0, 1],
                [0, 1, 1, 1],
            ],  # round 1: groups 1, 2, 3 mixed; 2 fill the batch
            [[0, 1, 0, 1]] * 4,  # never needed
        ]
    )
    groups, rewards, rounds = dynamic_sampling(sample_round, batch_size=4, max_rounds=5)
    assert groups == ["r0g1", "r0g3", "r1g1", "r1g2"] and rounds == 2 and calls == [0, 1]
    assert rewards.tolist() == [[0, 1, 0, 0], [1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]]


def test_the_cap_on_rounds_is_respected():
    sample_round, calls = scripted_rounds(
        [[[1, 1], [0, 1]], [[0, 0], [0, 0]], [[1, 0], [1, 1]], [[0, 1], [0, 1]]]
    )
    groups, rewards, rounds = dynamic_sampling(sample_round, batch_size=2, max_rounds=2)
    assert calls == [0, 1] and rounds == 2
    assert groups == ["r0g1"] and rewards.tolist() == [
        [0, 1]
    ]  # one mixed group in 2 rounds: trained on 1


def test_no_mixed_group_at_all_trains_on_the_last_round_and_zero_rounds_is_off():
    sample_round, calls = scripted_rounds([[[1, 1], [0, 0]], [[0, 0], [1, 1]]])
    groups, rewards, rounds = dynamic_sampling(sample_round, batch_size=2, max_rounds=2)
    assert groups == ["r1g0", "r1g1"] and rewards.tolist() == [[0, 0], [1, 1]] and rounds == 2
    sample_round, calls = scripted_rounds([[[1, 1], [0, 1]]])
    groups, rewards, rounds = dynamic_sampling(
        sample_round, batch_size=2, max_rounds=0
    )  # off: plain GRPO
    assert groups == ["r0g0", "r0g1"] and rounds == 1 and calls == [0]


def test_a_prompt_is_seeded_by_its_place_in_the_round_whichever_rank_samples_it(monkeypatch):
    """sample_round seeds the round's j-th prompt by (seed, step, round, j): the two ranks of a
    2-process run pass the seeds that one process passes for the whole batch, all distinct, and
    another step or round gets others."""
    passed = []

    class Engine:
        def generate(self, prompt_ids, n, temperature, top_p, max_new_tokens, seeds):
            passed.extend(seeds)
            return [[[1]] * n for _ in prompt_ids]

    def score(tokenizer, responses, answers, **rule):
        return [0.0] * len(answers)

    monkeypatch.setattr(grpo_train.common, "score_responses", score)
    args = grpo_train.Args(model="m", data="d", out="o", batch_prompts=4, group_size=2, seed=5)
    examples = [{"prompt": str(i), "answer": "1"} for i in range(6)]

    def seeds(step, round_, world):
        passed.clear()
        for rank in range(world):
            run = SimpleNamespace(args=args, rank=rank, world=world, examples=examples)
            run.engine, run.encode, run.tokenizer = Engine(), lambda question: [3], None
            run.engine.stop_ids = {0}
            grpo_train.sample_round(run, step, round_)
        return list(passed)

    one_process = seeds(step=3, round_=1, world=1)
    assert seeds(step=3, round_=1, world=2) == one_process and len(set(one_process)) == 4
    assert not set(one_process) & set(seeds(step=4, round_=1, world=1) + seeds(3, 0, world=1))


def test_a_replicated_process_keeps_its_passes_when_another_runs_more(monkeypatch):
    """Dynamic sampling can leave a process one group while another runs 8 passes. Replicated
    (DDP: a buffer broadcast in the first forward, an all-reduce in the last backward) it runs its
    own passes; only a sharded model's passes, collectives all, must match."""
    monkeypatch.setattr(plumbing.distributed, "all_gather", lambda count: [count, 8])
    prompts, responses = [[1] * 3] * 2, [[2] * 3] * 2  # one group of G = 2, 6 tokens each
    assert grpo_train.micro_batches(prompts, responses, 6) == [[0], [1]]
    with pytest.raises(RuntimeError, match="8 passes needed but this process holds 2"):
        grpo_train.micro_batches(prompts, responses, 6, sharded=True)


def test_script_logs_the_sampling_rounds(digit_toy, tmp_path):  # noqa: F811
    model_dir, data = digit_toy
    out = tmp_path / "ckpt"
    run_script(*toy_flags(model_dir, data, out, 2, "--dynamic-sampling", "3"), env=ENV)
    lines = [json.loads(line) for line in Path(f"{out}.metrics.jsonl").read_text().splitlines()]
    assert [m["stage_step"] for m in lines] == [1, 2]
    assert all(1 <= m["sampling_rounds"] <= 3 for m in lines)
    refused = run_script(
        *toy_flags(
            model_dir, data, tmp_path / "x", 1, "--dynamic-sampling", "2", "--mini-batches", "2"
        ),
        env=ENV,
        check=False,
    )
    assert refused.returncode != 0 and "--dynamic-sampling needs --mini-batches 1" in refused.stderr
