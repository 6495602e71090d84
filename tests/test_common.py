"""Unit tests of common.py: every expected number here is worked out by hand in the comment beside
it."""

import json
import math
import re
import sys
import threading
import time

import pytest
import torch

import common
from common import (
    chunked_head_logprobs,
    extract_final_answer,
    format_prompt,
    group_advantages,
    head_logprobs,
    response_logprobs,
    reward,
)
from plumbing.cli import DataError
from plumbing.data import last_boxed_content, load_examples, read_rollouts
from plumbing.files import write_jsonl

# ------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("so the total is \\boxed{18}.", "18", 1.0),
        ("\\boxed{17}", "18", 0.0),
        ("first \\boxed{3} then \\boxed{18}", "18", 1.0),  # the LAST box counts
        ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),  # symbolic vs plain fraction
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{{1}+{1}}", "2", 1.0),  # nested braces
        ("She has 1,234 apples", "1234", 1.0),  # thousands separator
        ("It costs $18", "18", 1.0),
        ("18.0", "18", 1.0),
        ("3/4", "0.75", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("... so the answer is 42.", "42", 1.0),
        ("The answer is 42. Later I say 7", "42", 1.0),  # "answer is" beats the last number
        ("12 then 13", "13", 1.0),  # last number
        ("-5", "-5", 1.0),
        ("5", "-5", 0.0),
        ("", "3", 0.0),
        ("no numbers here at all", "3", 0.0),
        ("\\boxed{", "3", 0.0),  # unbalanced: no answer
        ("\\boxed{x^2+1}", "1+x^2", 1.0),  # needs math-verify
        ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", 0.0),
    ],
)
def test_reward_cases(completion, answer, expected):
    assert reward(completion, answer) == expected


def test_reward_of_a_response_cut_at_the_token_limit():
    cut = (
        "The box weighed 2 pounds, then 6 more were added, so the final weight of the box of "
        "goodies was"
    )
    assert reward(cut + " 8 pounds.", "8") == 1.0  # finished: the last number is the answer
    assert reward(cut, "6", finished=False) == 0.0  # cut mid-sentence: "6" is not an answer yet
    assert reward(cut, "6", finished=True) == 1.0  # the old rule (last number) would have paid it
    assert (
        reward(cut + " \\boxed{8} and", "8", finished=False) == 1.0
    )  # explicit answers count even when cut
    assert reward("so #### 8\nand then", "8", finished=False) == 1.0
    assert reward("The answer is 8. Now", "8", finished=False) == 1.0
    assert extract_final_answer(cut, finished=False) is None


def test_reward_pays_every_gsm8k_gold_solution_finished_or_cut():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/gsm8k not beside the checkout")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    golds = load_examples(path)
    paid = [
        reward(row["answer"], gold["answer"], finished)
        for row, gold in zip(rows, golds)
        for finished in (True, False)
    ]
    assert len(rows) == 1319 and sum(paid) == 2 * 1319


def test_reward_never_raises_on_garbage():
    for junk in [None, "\\boxed{\\frac{", "}{}{}{\\\\", "\x00\xff", "$$$", "1/0", "\\boxed{1/0}"]:
        assert reward(junk, "1") in (0.0, 1.0)


def test_reward_is_fast_on_a_long_string():
    text = ("blah 12, " * 11000) + "\\boxed{7}"  # ~100 kB
    start = time.perf_counter()
    assert reward(text, "7") == 1.0
    assert reward(text[:-9], "7") == 0.0
    assert time.perf_counter() - start < 1.0


def test_reward_works_outside_the_main_thread():
    """math-verify's timeout uses signals, which only work in the main thread."""
    results = []
    thread = threading.Thread(target=lambda: results.append(reward("\\boxed{x^2+1}", "1+x^2")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_extract_final_answer_order():
    assert extract_final_answer("#### 5 and \\boxed{6}") == "6"
    assert extract_final_answer("x #### 5\n more 9") == "5"
    assert last_boxed_content("\\boxed{a{b}c} \\boxed{d}") == "d"
    assert last_boxed_content("\\boxed{a{b}c}") == "a{b}c"


# --------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    # r = [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(
        adv, torch.tensor([[expected, -expected, -expected, expected]]), atol=1e-6
    )
    # r = [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001, atol=1e-6)


def test_group_advantages_all_equal_and_single():
    assert torch.equal(group_advantages(torch.ones(2, 8)), torch.zeros(2, 8))
    assert torch.equal(group_advantages(torch.tensor([[1.0]])), torch.zeros(1, 1))


# ---------------------------------------------------------------------------------------- log-probs


def test_response_logprobs_equal_a_direct_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[10, 11, 12], [13, 14], [15]]
    responses = [[20, 21], [22, 23, 24, 1], [25]]
    temperature = 0.7
    with torch.no_grad():
        logprobs, mask, entropy = response_logprobs(
            model, prompts, responses, temperature, pad_token_id=0
        )
        assert entropy is None  # not asked for
        for i, (p, r) in enumerate(zip(prompts, responses)):  # one unpadded sequence at a time
            logits = model(torch.tensor([p + r])).logits[0] / temperature
            for t, token in enumerate(r):
                direct = torch.log_softmax(logits[len(p) + t - 1], -1)[token]
                assert torch.isclose(logprobs[i, t], direct, atol=1e-5)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert logprobs[0, 2:].abs().sum() == 0


def test_response_logprobs_entropy_of_uniform(tiny_model):
    """With all-zero weights in the head the next-token distribution is uniform: entropy =
    log(V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # tied to the embeddings: all logits become 0
    with torch.no_grad():
        logprobs, mask, entropy = response_logprobs(
            model, [[5, 6]], [[7, 8]], 1.0, with_entropy=True
        )
    vocab = model.config.vocab_size
    assert torch.allclose(entropy, torch.full((1, 2), math.log(vocab)), atol=1e-5)
    assert torch.allclose(logprobs, torch.full((1, 2), -math.log(vocab)), atol=1e-5)


def chunk_sizes(monkeypatch) -> list[int]:
    """The token count of every LM-head chunk that common.chunked_head_logprobs computes from now
    on."""
    sizes, real = [], common.head_logprobs

    def recorded(hidden, *args):
        sizes.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(common, "head_logprobs", recorded)
    return sizes


def test_lm_head_chunk_size_by_hand(monkeypatch):
    sizes = chunk_sizes(monkeypatch)

    def chunks(vocab: int, tokens: int) -> list[int]:
        sizes.clear()
        head = torch.nn.Linear(1, vocab, bias=False)
        with torch.no_grad():
            logprobs, _ = chunked_head_logprobs(
                torch.ones(tokens, 1), head, torch.zeros(tokens, dtype=torch.long), 1.0
            )
        assert logprobs.shape == (tokens,)  # the padding is cut off again
        return list(sizes)

    assert chunks(151_936, 500) == [
        441,
        441,
    ]  # 2**26 = 67,108,864 logits // 151,936 = 441.7; 500 tokens + 382 padding
    assert chunks(99, 10) == [
        4096
    ]  # 677,861 tokens would fit: capped, the last chunk is padded to it
    monkeypatch.setattr(common, "LOGITS_PER_CHUNK", 50)
    assert chunks(99, 3) == [1, 1, 1]  # 50 // 99 = 0: never less than one token


def test_head_logprobs_by_hand():
    # W = identity on the first two words, zero on the third; bias [0, ln 2, 0].
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    bias = torch.tensor([0.0, math.log(2), 0.0])
    hidden = torch.tensor([[math.log(2), 0.0], [0.0, 0.0]])
    # token 0: z = [ln 2, ln 2, 0] -> pi = [2/5, 2/5, 1/5]; target 2: ln(1/5);
    #          entropy = 2 (2/5) ln(5/2) + (1/5) ln 5
    # token 1: z = [0, ln 2, 0]    -> pi = [1/4, 1/2, 1/4]; target 1: ln(1/2);
    #          entropy = (1/2) ln 4 + (1/2) ln 2
    logprobs, entropy = head_logprobs(
        hidden, weight, bias, torch.tensor([2, 1]), 1.0, with_entropy=True
    )
    assert torch.allclose(logprobs, torch.tensor([math.log(1 / 5), math.log(1 / 2)]), atol=1e-6)
    expected = [0.8 * math.log(2.5) + 0.2 * math.log(5), 0.5 * math.log(4) + 0.5 * math.log(2)]
    assert torch.allclose(entropy, torch.tensor(expected), atol=1e-6)
    # T = 2 halves the logits: token 1, z = [0, ln 2 / 2, 0] -> pi_1 = sqrt 2 / (2 + sqrt 2)
    logprobs, _ = head_logprobs(hidden, weight, bias, torch.tensor([2, 1]), 2.0, with_entropy=False)
    assert logprobs[1].item() == pytest.approx(
        math.log(math.sqrt(2) / (2 + math.sqrt(2))), abs=1e-6
    )


def _tiny_qwen2(vocab_size: int = 300):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def _full_logits_reference(model, prompts, responses, temperature):
    """The plain O(B x T x vocab) computation, one unpadded sequence at a time: log-probs and
    entropies."""
    logprobs, entropies = [], []
    for p, r in zip(prompts, responses):
        logits = (
            model(torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1].float()
            / temperature
        )
        log_probs = torch.log_softmax(logits, -1)
        logprobs.append(log_probs.gather(1, torch.tensor(r)[:, None]).squeeze(1))
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    return logprobs, entropies


@pytest.mark.parametrize("architecture", ["gpt2", "qwen2"])
def test_chunked_logprobs_and_gradients_equal_the_full_logits(
    tiny_model, architecture, monkeypatch
):
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(tiny_model)
        if architecture == "gpt2"
        else _tiny_qwen2()
    )
    prompts = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
    responses = [
        [20, 21, 5, 6, 7],
        [22, 23, 24, 1],
        [25],
    ]  # 10 tokens: chunks of 4, 4 and 2 (+2 padding)
    monkeypatch.setattr(
        common, "LOGITS_PER_CHUNK", 4 * model.get_output_embeddings().weight.shape[0]
    )  # 4 tokens
    sizes = chunk_sizes(monkeypatch)
    logprobs, mask, entropy = response_logprobs(model, prompts, responses, 0.7, with_entropy=True)
    assert sizes == [4, 4, 4]
    (logprobs.sum() + 0.3 * entropy.sum()).backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected_logprobs, expected_entropy = _full_logits_reference(model, prompts, responses, 0.7)
    (
        sum(x.sum() for x in expected_logprobs) + 0.3 * sum(x.sum() for x in expected_entropy)
    ).backward()
    for i, r in enumerate(responses):
        assert torch.allclose(logprobs[i, : len(r)], expected_logprobs[i], atol=1e-5)
        assert torch.allclose(entropy[i, : len(r)], expected_entropy[i], atol=1e-5)
        assert logprobs[i, len(r) :].abs().sum() == 0 and entropy[i, len(r) :].abs().sum() == 0
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    for got, p in zip(chunked_grads, model.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-5)


def test_lm_head_is_float32_and_batch_invariant_under_bf16_autocast(monkeypatch):
    """The same token's log-prob is bit-identical alone or among other tokens, under CPU bf16
    autocast.

    (Only the head is: the transformer body itself, in transformers' kernels, gives slightly
    different hidden states for a padded row than for the same row alone.)
    """
    monkeypatch.setattr(
        common, "LOGITS_PER_CHUNK", 16 * 1000
    )  # chunks of 16 tokens of a 1,000-word vocabulary
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False)
    sequence = torch.randn(7, 64).bfloat16()  # hidden states as an autocast body returns them
    targets = torch.randint(0, 1000, (7,))
    others, other_targets = torch.randn(30, 64).bfloat16(), torch.randint(0, 1000, (30,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone, _ = chunked_head_logprobs(sequence, head, targets, 0.7)
        for offset in (
            0,
            5,
            16,
            23,
        ):  # first, mid-chunk, at a chunk boundary, straddling two chunks
            hidden = torch.cat([others[:offset], sequence, others[offset:]])
            batch, _ = chunked_head_logprobs(
                hidden,
                head,
                torch.cat([other_targets[:offset], targets, other_targets[offset:]]),
                0.7,
            )
            assert torch.equal(batch[offset : offset + 7], alone), offset
    assert alone.dtype == torch.float32
    expected = (
        torch.log_softmax(sequence.float() @ head.weight.T / 0.7, -1)
        .gather(1, targets[:, None])
        .squeeze(1)
    )
    assert torch.allclose(
        alone, expected, atol=1e-5
    )  # float32, not bf16's three significant digits


# --------------------------------------------------------------------------------------------- data


def test_load_examples_formats(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"}) + "\n")
    assert load_examples(gsm) == [{"id": "gsm:1", "prompt": "How many?", "answer": "1007"}]
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(
        json.dumps({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}.", "id": "m7"}) + "\n"
    )
    assert load_examples(math_file) == [{"id": "m7", "prompt": "p", "answer": "\\frac{1}{2}"}]
    generic = tmp_path / "g.jsonl"
    generic.write_text(json.dumps({"prompt": "1+1", "answer": 2, "skill": "add"}) + "\n\n")
    assert load_examples(generic) == [{"id": "g:1", "prompt": "1+1", "answer": "2", "skill": "add"}]


def write_parquet(path, rows: list[dict]):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def test_load_examples_reads_verl_parquet_rows_and_the_other_shapes_from_parquet(tmp_path):
    question = "Natalia sold 48 clips in April and half as many in May. How many in all?"
    verl = [  # the authors' release: verl's rows (examples/data_preprocess/gsm8k.py, math)
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": question}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "72"},
            "extra_info": {"split": "train", "index": 0, "answer": "... #### 72"},
        },
        {
            "data_source": "DigitalLearningGmbH/MATH-lighteval",
            "prompt": [{"role": "user", "content": "Half of 1?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
            "extra_info": {"split": "train", "index": 1, "answer": "\\boxed{\\frac{1}{2}}"},
        },
    ]
    assert load_examples(write_parquet(tmp_path / "train.parquet", verl)) == [
        {"id": "train:1", "prompt": question, "answer": "72", "source": "openai/gsm8k"},
        {
            "id": "train:2",
            "prompt": "Half of 1?",
            "answer": "\\frac{1}{2}",
            "source": "DigitalLearningGmbH/MATH-lighteval",
        },
    ]
    gsm = [{"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"}]
    assert load_examples(write_parquet(tmp_path / "gsm.parquet", gsm)) == [
        {"id": "gsm:1", "prompt": "How many?", "answer": "1007"}
    ]
    math_rows = [{"problem": "p", "solution": "so \\boxed{3}.", "id": "m7"}]
    assert load_examples(write_parquet(tmp_path / "math.parquet", math_rows)) == [
        {"id": "m7", "prompt": "p", "answer": "3"}
    ]
    generic = [{"prompt": "1+1", "answer": "2", "skill": "add"}, {"prompt": "2+2", "answer": "4"}]
    assert load_examples(write_parquet(tmp_path / "g.parquet", generic)) == [
        {"id": "g:1", "prompt": "1+1", "answer": "2", "skill": "add"},
        {"id": "g:2", "prompt": "2+2", "answer": "4"},  # a null skill (parquet's columns): none
    ]


def test_load_examples_parquet_errors_are_one_line(tmp_path, monkeypatch):
    system = {"role": "system", "content": "Be brief."}
    with_system = dict(
        prompt=[system, {"role": "user", "content": "1+1"}],
        reward_model={"style": "rule", "ground_truth": "2"},
    )
    path = write_parquet(tmp_path / "bad.parquet", [with_system])
    message = "bad.parquet:1: a verl prompt must be one user message; it has ['system', 'user']"
    with pytest.raises(DataError, match=re.escape(message)):
        load_examples(path)
    no_truth = dict(prompt=[{"role": "user", "content": "1+1"}], reward_model={"style": "rule"})
    with pytest.raises(DataError, match="bad.parquet:1: missing or empty answer"):
        load_examples(write_parquet(path, [no_truth]))
    (tmp_path / "text.parquet").write_text("not parquet\n")
    with pytest.raises(DataError, match="text.parquet: not a readable parquet file"):
        load_examples(tmp_path / "text.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"needs pyarrow: \.venv/bin/pip install pyarrow"):
        load_examples(path)


def test_load_examples_real_gsm8k_if_present():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/gsm8k not beside the checkout")
    rows = load_examples(path)
    assert len(rows) > 1000 and all(
        r["answer"].lstrip("-").replace(".", "").isdigit() for r in rows
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n',
            "bad.jsonl:2: not valid JSON",
        ),
        ("[1, 2]\n", "bad.jsonl:1: expected a JSON object"),
        ('{"text": "a"}\n', "bad.jsonl:1: a row needs"),
        ('{"question": "q", "answer": "no marker"}\n', "bad.jsonl:1: GSM8K-style row has no"),
        ('{"problem": "q", "solution": "no box"}\n', "bad.jsonl:1: MATH-style row has no"),
        (
            '{"prompt": "a", "answer": "1", "id": "x"}\n'
            '{"prompt": "b", "answer": "1", "id": "x"}\n',
            "bad.jsonl:2: duplicate",
        ),
        ("", "bad.jsonl: no rows"),
        (
            '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": null}\n',
            "bad.jsonl:2: missing or empty answer",
        ),
        ('{"prompt": "a", "answer": ""}\n', "bad.jsonl:1: missing or empty answer"),
        ('{"prompt": "a", "answer": "  "}\n', "bad.jsonl:1: missing or empty answer"),
        (
            b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n',
            "bad.jsonl:2: not UTF-8 text",
        ),
    ],
)
def test_load_examples_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message.replace("(", "\\(")):
        load_examples(path)


def test_read_rollouts_checks_schema(tmp_path, tiny_model):
    from conftest import make_synthetic_rollouts

    path = tmp_path / "r.jsonl"
    rows = make_synthetic_rollouts(tiny_model, path, n_prompts=3)
    assert [r["id"] for r in read_rollouts(path)] == ["p0", "p1", "p2"]
    rows[1]["behavior_logprobs"][0] = rows[1]["behavior_logprobs"][0][:-1]
    write_jsonl(path, rows)
    with pytest.raises(
        DataError, match=r"r.jsonl:2: a response of (\d+) tokens has (?!\1)\d+ log-probs"
    ):
        read_rollouts(path)
    del rows[1]["rewards"]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match="r.jsonl:2: rollout row lacks \\['rewards'\\]"):
        read_rollouts(path)
    rows = make_synthetic_rollouts(tiny_model, path, n_prompts=3)
    rows[2]["rewards"][1] = 0.5  # a reward is 0 or 1, nothing between
    write_jsonl(path, rows)
    with pytest.raises(DataError, match="r.jsonl:3: rewards must be 0 or 1, got \\[.*0.5"):
        read_rollouts(path)


# ------------------------------------------------------------------------------------------ prompts


def test_format_prompt_with_and_without_chat_template():
    from make_demo import build_char_tokenizer

    assert format_prompt(build_char_tokenizer(), "2+3") == "2+3="
    plain = build_char_tokenizer(chat_template=None)
    assert (
        format_prompt(plain, "2+3", system_prompt="Be brief.")
        == "Be brief.\n\nQuestion: 2+3\nAnswer:"
    )
    assert format_prompt(plain, "2+3", system_prompt="") == "Question: 2+3\nAnswer:"
