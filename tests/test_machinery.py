"""Tests of machinery.py: files, the resumable chunk store, batching, the generation engines' pure pieces, the
command line. Expected numbers are worked by hand in the comments."""

import dataclasses

import numpy as np
import pytest
import torch

import machinery as M
from common import DataError, read_jsonl
from machinery import arg, atomic_dir, atomic_path, parse_args, write_jsonl


# ---------------------------------------------------------------------------------------------- files


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [{"a": 1}])
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert read_jsonl(target) == [{"a": 1}]           # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as folder:
        (folder / "a").write_text("1")
    with atomic_dir(target) as folder:
        (folder / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_chunk_store_saves_resumes_and_refuses_other_settings(tmp_path):
    store = M.ChunkStore(tmp_path / "out.parts", {"seed": 0, "k": 4})
    assert store.open() == set()
    store.save(0, np.arange(3, dtype=np.float32))
    store.save(2, [{"id": "a"}, {"id": "b"}])
    store.save(5, {"step": 5, "weights": torch.ones(2)})
    assert M.ChunkStore(tmp_path / "out.parts", {"seed": 0, "k": 4}).open() == {0, 2, 5}  # a rerun sees them
    np.testing.assert_array_equal(store.load(0), [0, 1, 2])
    assert store.load(2) == [{"id": "a"}, {"id": "b"}]
    assert torch.equal(store.load(5)["weights"], torch.ones(2))
    assert not list((tmp_path / "out.parts").glob(".*tmp"))  # atomic writes leave no temp files
    with pytest.raises(DataError, match=r"k: was 4, now 8"):
        M.ChunkStore(tmp_path / "out.parts", {"seed": 0, "k": 8}).open()
    store.keep_only(5)
    assert store.finished() == {5}
    with pytest.raises(DataError, match="piece 0 is missing"):
        store.load(0)
    store.remove()
    assert not (tmp_path / "out.parts").exists()


def test_token_budget_batches_longest_first_within_budget():
    # lengths by index: 3, 10, 5, 7. Longest first: 1 (10), 3 (7), 2 (5), 0 (3).
    # [1, 3]: 2 rows x width 10 = 20 <= 20; adding 2 would make 3 x 10 = 30 -> new batch [2, 0]: 2 x 5 = 10.
    assert M.token_budget_batches([3, 10, 5, 7], token_budget=20) == [[1, 3], [2, 0]]
    assert M.token_budget_batches([30, 4], token_budget=10) == [[0], [1]]  # too long for the budget: alone


def test_token_budget_batches_in_input_order():
    # lengths 3, 10, 5, 7, budget 20: [0] then adding 1 gives 2 x 10 = 20 <= 20 -> [0, 1]; adding 2: 3 x 10 = 30 -> new
    # batch [2]; adding 3: 2 x 7 = 14 -> [2, 3].
    assert M.token_budget_batches([3, 10, 5, 7], 20, longest_first=False) == [[0, 1], [2, 3]]
    assert M.token_budget_batches([30, 4], 10, longest_first=False) == [[0], [1]]


def test_clean_response_keeps_first_eos_and_drops_padding():
    eos, pad = {1}, 0
    assert M.clean_response([5, 6, 1, 0, 0], eos, pad) == [5, 6, 1]
    assert M.clean_response([5, 6, 1, 7, 1], eos, pad) == [5, 6, 1]  # nothing after the first EOS
    assert M.clean_response([5, 6, 7], eos, pad) == [5, 6, 7]  # cut by max_new_tokens: no EOS to keep
    assert M.clean_response([5, 1, 1, 1], eos, 1) == [5, 1]  # pad == eos (tokenizers without a pad token)
    assert M.clean_response([5, 9, 6, 1], {1, 9}, pad) == [5, 9]  # several stop tokens: the first one ends it


def test_stop_token_ids_join_tokenizer_and_generation_config():
    class Tokenizer:
        eos_token_id = 1

    class GenerationConfig:
        eos_token_id = [7, 1]

    assert M.stop_token_ids(Tokenizer(), GenerationConfig()) == {1, 7}
    assert M.stop_token_ids(Tokenizer(), None) == {1}


def test_shard_takes_every_world_th_item():
    assert M.shard(list(range(7)), 1, 3) == [1, 4]
    assert M.shard(list(range(7)), 0, 1) == list(range(7))


def test_parse_args_flags():
    import dataclasses

    @dataclasses.dataclass
    class Args:
        proj_dim: int = arg(8, "dims")
        val_sketch: list[str] = arg([], "repeatable")
        exact: bool = arg(False, "a switch")
        seed: int | None = arg(None, "optional")

    args = parse_args(Args, ["--proj-dim", "16", "--val-sketch", "a", "--val-sketch", "b", "--exact", "--seed", "3"])
    assert args == Args(proj_dim=16, val_sketch=["a", "b"], exact=True, seed=3)
    assert parse_args(Args, []) == Args()
    with pytest.raises(SystemExit):
        parse_args(Args, ["--proj-dim", "many"])


def test_memory_plan_by_hand():
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=2)  # intermediate 4 x 64 = 256
    plan = M.memory_plan(config, num_params=2 ** 28, stage="grpo", token_budget=2 ** 20, checkpointing=True,
                         vllm_share=0.5, card_gib=10)
    # weights 2^28 x (4 + 2) B = 1.5 GiB; grads x 4 = 1; AdamW x 8 = 2; vLLM 0.5 x 10 = 5
    # activations: layer inputs 2^20 x 64 x 2 B x 2 layers = 0.25 GiB + one layer 2^20 x (16 x 64 + 4 x 256) x 2 B = 4
    # logits: 2^26 // 1024 = 2^16 tokens x 1024 x 4 B x 3 = 0.75 GiB
    assert plan == {"weights": 1.5, "grads": 1.0, "optimizer": 2.0, "vllm": 5.0, "activations": 4.25, "logits": 0.75,
                    "hashes": 0, "kept": 0, "total": 14.5}
    without = M.memory_plan(config, 2 ** 28, "grpo", 2 ** 20, checkpointing=False, vllm_share=0.5, card_gib=10)
    assert without["activations"] == 8.0  # every layer's internals: 2 x 4 GiB
    sketch = M.memory_plan(config, 2 ** 28, "sketch", 2 ** 20, True)
    assert sketch["optimizer"] == 0 and sketch["hashes"] == 1.0  # 2^28 x 4 B = 1 GiB of hash draws, the cap
    assert sketch["kept"] == 0  # CountSketch at F = 1: nothing copied
    buffered = M.memory_plan(config, 2 ** 28, "sketch", 2 ** 20, True, kept_fraction=0.25, buffer_rows=32)
    assert buffered["kept"] == 8.5  # 2^28 / 4 kept coordinates x (8 B position + 32 rows x 4 B) = 2^26 x 136 B
    assert buffered["total"] == sketch["total"] + 8.5
    with pytest.raises(DataError, match="needs 14.5 GiB per GPU, the card has 10; lower --micro-batch-tokens"):
        M.check_memory_plan(plan, 10, "grpo", "--micro-batch-tokens")
    assert M.count_parameters(config) == 1024 * 64 + 1024 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    # sharded over 4 processes: weights, grads and optimizer state / 4 (0.375 GiB rounds to 0.38); the rest unchanged
    sharded = M.memory_plan(config, 2 ** 28, "grpo", 2 ** 20, True, vllm_share=0.5, card_gib=10, shards=4)
    assert (sharded["weights"], sharded["grads"], sharded["optimizer"], sharded["total"]) == (0.38, 0.25, 0.5, 11.13)


def test_fsdp_is_chosen_when_the_replicated_state_takes_over_half_a_card():
    # weights + grads + optimizer state 1.5 + 1 + 2 = 4.5 GiB: over half a card of 8, not of 10
    plan = {"weights": 1.5, "grads": 1.0, "optimizer": 2.0, "vllm": 5.0, "activations": 4.25, "logits": 0.75}
    assert M.use_fsdp("auto", 8, plan, card=8) and not M.use_fsdp("auto", 8, plan, card=10)
    assert not M.use_fsdp("auto", 1, plan, card=8)  # one process: nothing to share the state with
    assert M.use_fsdp("on", 8, plan, card=80) and not M.use_fsdp("off", 8, plan, card=8)
