"""A user's mistakes, each named in one line before the expensive work, and inputs edited in place
never taken for the ones an output was made from (the scripts alone; run_cropi.sh's own checks are
in test_run_cropi.py)."""

import json
import shutil
import time

import numpy as np
import pytest
from conftest import make_synthetic_rollouts, run_script
from test_collect_rollouts import collect_args, write_data
from test_select_data import write_rollouts, write_sketch

import common
from plumbing.cli import DataError
from plumbing.files import (
    ChunkStore,
    atomic_path,
    content_sha256,
    differences,
    fingerprint,
    load_npy,
)
from plumbing.models import check_model


def test_fingerprint_follows_the_content_of_files_and_folders(tmp_path):
    data, folder = tmp_path / "data.jsonl", tmp_path / "model"
    data.write_text("a\n")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = fingerprint([str(data), str(folder), str(tmp_path / "missing"), ""])
    assert list(first) == [f"content of {data}", f"content of {folder}"]  # missing: not hashed
    (folder / ".tmp_being_written").write_text("x")  # hidden files are left out
    content_sha256.cache_clear()
    assert fingerprint([str(data), str(folder)]) == first
    data.write_text("b\n")  # same size, other content
    content_sha256.cache_clear()
    assert fingerprint([str(data)])[f"content of {data}"] != first[f"content of {data}"]


def test_differences_by_hand():
    assert differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == (
        "b: was 2, now 3; c: was None, now 4"
    )
    assert differences({"a": 1}, {"a": 1}) == ""


def test_collect_redoes_a_data_file_edited_in_place(tiny_model, tmp_path):
    """Issue case: a data file cut from 8 rows to 4 under the same name."""
    data, out = write_data(tmp_path / "data.jsonl", 8), tmp_path / "out.jsonl"
    argv = collect_args(tiny_model, [data], out, "--backend", "hf")
    run_script(*argv)
    assert "already complete" in run_script(*argv).stdout
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    again = run_script(*argv)
    assert f"was made otherwise (content of {data}: was" in again.stdout
    assert len(out.read_text().splitlines()) == 4


def test_select_redoes_edited_rollouts(tmp_path):
    rollouts = write_rollouts(tmp_path / "train.jsonl", [[0, 1]] * 10)
    argv = ["select_data.py", "--train-rollouts", str(rollouts), "--method", "random"]
    argv += ["--ratio", "0.5", "--out", str(tmp_path / "out")]
    run_script(*argv)
    assert "nothing to do" in run_script(*argv).stdout
    write_rollouts(rollouts, [[0, 1]] * 4)
    again = run_script(*argv)
    assert "nothing to do" not in again.stdout
    assert len((tmp_path / "out" / "subset.jsonl").read_text().splitlines()) == 2


def test_a_model_folder_without_a_usable_tokenizer_is_refused(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, bare / name)
    with pytest.raises(DataError, match=f"--model {bare}: no tokenizer files"):
        check_model(str(bare))
    result = run_script(
        *collect_args(bare, [write_data(tmp_path / "d.jsonl", 2)], tmp_path / "o.jsonl"),
        check=False,
    )
    assert result.returncode != 0 and "no tokenizer files" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("o.jsonl*"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="its tokenizer does not load"):
        check_model(str(broken))
    config = json.loads((tiny_model / "config.json").read_text())
    assert check_model(str(tiny_model)) == config["vocab_size"]  # what token ids must stay below


def test_token_ids_outside_the_vocabulary_are_refused_with_file_and_line(tiny_model, tmp_path):
    rollouts = tmp_path / "roll.jsonl"
    rows = make_synthetic_rollouts(tiny_model, rollouts, n_prompts=3, k=2)
    rows[1]["response_ids"][0][0] = 10**6
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sketch.npy"
    argv = ["sketch_grads.py", "--model", str(tiny_model), "--rollouts", str(rollouts)]
    result = run_script(*argv, "--out", str(out), check=False)
    assert result.returncode != 0
    assert f"{rollouts}:2: token ids" in result.stderr and "outside the vocabulary" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("sketch*"))


def test_npy_files_are_named_in_every_error(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((10, 8), np.float32))
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.npy").write_text("hello world")
    for name, mmap in [("cut.npy", None), ("cut.npy", "r"), ("text.npy", None)]:
        with pytest.raises(DataError, match=f"{tmp_path / name}: cannot read it as a .npy"):
            load_npy(tmp_path / name, mmap_mode=mmap)
    assert load_npy(good).shape == (10, 8)
    rollouts = write_rollouts(tmp_path / "train.jsonl", [[0, 1]] * 8)
    ids = [f"p{i}" for i in range(8)]
    train = write_sketch(tmp_path / "train_sketch.npy", np.ones((8, 3), np.float32), ids)
    train.write_bytes(train.read_bytes()[:-20])  # truncated
    val = write_sketch(tmp_path / "val.npy", np.ones((1, 3), np.float32), ["mean"])
    argv = ["select_data.py", "--train-rollouts", str(rollouts), "--train-sketch", str(train)]
    argv += ["--val-sketch", str(val), "--ratio", "0.5", "--out", str(tmp_path / "o")]
    result = run_script(*argv, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{train}: cannot read it as a .npy array" in result.stderr


def test_unwritable_output_is_refused_before_the_model_loads(tiny_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    data = write_data(tmp_path / "d.jsonl", 2)
    result = run_script(*collect_args(tiny_model, [data], blocker / "out.jsonl"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (
        f"{blocker / 'out.jsonl'}: cannot write there ({blocker} is a file, not a folder)"
        in result.stderr
    )
    assert "sampling" not in result.stderr + result.stdout  # refused before any model work


def test_a_full_disk_names_the_file_and_the_free_space(tmp_path):
    """numpy's short write on a full disk is an OSError without strerror ("262144 requested and
    187360 written"): the message names the file and how much space is left."""
    target = tmp_path / "x.npy"
    message = rf"{target}: cannot write it \(262144 requested.*MiB free"
    with pytest.raises(DataError, match=message), atomic_path(target):
        raise OSError("262144 requested and 187360 written")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1"),
        ("\\boxed{x^2+1}", "{" * 10_000 + "x" + "}" * 10_000),
        ("\\boxed{" + "x+" * 3000 + "1}", "x+1"),
    ],
)
def test_the_reward_stays_fast_and_quiet_on_hostile_text(response, gold, capfd):
    start = time.perf_counter()
    assert common.reward(response, gold) == 0.0
    assert time.perf_counter() - start < 0.5
    assert capfd.readouterr().err == ""


def test_the_reward_still_verifies_ordinary_latex():
    assert common.reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert common.reward("\\boxed{\\sqrt{4}}", "2") == 1.0


def test_a_store_without_pieces_never_blocks_a_corrected_rerun(tmp_path):
    """A run refused (or killed) after its .parts folder was made but before its first piece: the
    rerun with corrected settings starts; once a piece exists, other settings are refused."""
    ChunkStore(tmp_path / "x.parts", {"max_new_tokens": 0}).open()
    store = ChunkStore(tmp_path / "x.parts", {"max_new_tokens": 8})
    assert store.open() == set()
    store.save(0, [{"a": 1}])
    with pytest.raises(DataError, match="max_new_tokens: was 8, now 0"):
        ChunkStore(tmp_path / "x.parts", {"max_new_tokens": 0}).open()
