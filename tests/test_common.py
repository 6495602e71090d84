"""Unit tests of common.py: every expected number here is worked out by hand in the comment beside it."""

import json
import math
import threading
import time

import pytest
import torch

from common import (DataError, extract_final_answer, format_prompt, group_advantages, last_boxed_content,
                    load_examples, read_rollouts, response_logprobs, reward)
from machinery import write_jsonl

# ---------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize("completion, answer, expected", [
    ("so the total is \\boxed{18}.", "18", 1.0),
    ("\\boxed{17}", "18", 0.0),
    ("first \\boxed{3} then \\boxed{18}", "18", 1.0),            # the LAST box counts
    ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),                       # symbolic vs plain fraction
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{{1}+{1}}", "2", 1.0),                               # nested braces
    ("She has 1,234 apples", "1234", 1.0),                        # thousands separator
    ("It costs $18", "18", 1.0),
    ("18.0", "18", 1.0),
    ("3/4", "0.75", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("... so the answer is 42.", "42", 1.0),
    ("The answer is 42. Later I say 7", "42", 1.0),               # "answer is" beats the last number
    ("12 then 13", "13", 1.0),                                   # last number
    ("-5", "-5", 1.0),
    ("5", "-5", 0.0),
    ("", "3", 0.0),
    ("no numbers here at all", "3", 0.0),
    ("\\boxed{", "3", 0.0),                                       # unbalanced: no answer
    ("\\boxed{x^2+1}", "1+x^2", 1.0),                             # needs math-verify
    ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", 0.0),
])
def test_reward_cases(completion, answer, expected):
    assert reward(completion, answer) == expected


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


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    # r = [1, 0, 0, 1]: mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([[expected, -expected, -expected, expected]]), atol=1e-6)
    # r = [1, 0, 0, 0]: mean 0.25, unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5001, atol=1e-6)


def test_group_advantages_all_equal_and_single():
    assert torch.equal(group_advantages(torch.ones(2, 8)), torch.zeros(2, 8))
    assert torch.equal(group_advantages(torch.tensor([[1.0]])), torch.zeros(1, 1))


# ---------------------------------------------------------------------------------------------- log-probs


def test_response_logprobs_equal_a_direct_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[10, 11, 12], [13, 14], [15]]
    responses = [[20, 21], [22, 23, 24, 1], [25]]
    temperature = 0.7
    with torch.no_grad():
        logprobs, mask = response_logprobs(model, prompts, responses, temperature, pad_token_id=0)
        for i, (p, r) in enumerate(zip(prompts, responses)):  # one unpadded sequence at a time
            logits = model(torch.tensor([p + r])).logits[0] / temperature
            for t, token in enumerate(r):
                direct = torch.log_softmax(logits[len(p) + t - 1], -1)[token]
                assert torch.isclose(logprobs[i, t], direct, atol=1e-5)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert logprobs[0, 2:].abs().sum() == 0


def test_response_logprobs_entropy_of_uniform(tiny_model):
    """With all-zero weights in the head the next-token distribution is uniform: entropy = log(V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # tied to the embeddings: all logits become 0
    with torch.no_grad():
        logprobs, mask, entropy = response_logprobs(model, [[5, 6]], [[7, 8]], 1.0, with_entropy=True)
    vocab = model.config.vocab_size
    assert torch.allclose(entropy, torch.full((1, 2), math.log(vocab)), atol=1e-5)
    assert torch.allclose(logprobs, torch.full((1, 2), -math.log(vocab)), atol=1e-5)


# ---------------------------------------------------------------------------------------------- data


def test_load_examples_formats(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"}) + "\n")
    assert load_examples(gsm) == [{"id": "gsm:1", "prompt": "How many?", "answer": "1007"}]
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(json.dumps({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}.", "id": "m7"}) + "\n")
    assert load_examples(math_file) == [{"id": "m7", "prompt": "p", "answer": "\\frac{1}{2}"}]
    generic = tmp_path / "g.jsonl"
    generic.write_text(json.dumps({"prompt": "1+1", "answer": 2, "skill": "add"}) + "\n\n")
    assert load_examples(generic) == [{"id": "g:1", "prompt": "1+1", "answer": "2", "skill": "add"}]


def test_load_examples_real_gsm8k_if_present():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/gsm8k not beside the checkout")
    rows = load_examples(path)
    assert len(rows) > 1000 and all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in rows)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', "bad.jsonl:2: not valid JSON"),
    ('[1, 2]\n', "bad.jsonl:1: expected a JSON object"),
    ('{"text": "a"}\n', "bad.jsonl:1: row needs"),
    ('{"question": "q", "answer": "no marker"}\n', "bad.jsonl:1: GSM8K-style row has no"),
    ('{"problem": "q", "solution": "no box"}\n', "bad.jsonl:1: MATH-style row has no"),
    ('{"prompt": "a", "answer": "1", "id": "x"}\n{"prompt": "b", "answer": "1", "id": "x"}\n', "bad.jsonl:2: duplicate"),
    ('', "bad.jsonl: no rows"),
])
def test_load_examples_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", "\\(")):
        load_examples(path)


def test_read_rollouts_checks_schema(tmp_path, tiny_model):
    from conftest import make_synthetic_rollouts

    path = tmp_path / "r.jsonl"
    rows = make_synthetic_rollouts(tiny_model, path, n_prompts=3)
    assert [r["id"] for r in read_rollouts(path)] == ["p0", "p1", "p2"]
    rows[1]["behavior_logprobs"][0] = rows[1]["behavior_logprobs"][0][:-1]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match="r.jsonl:2: a response has"):
        read_rollouts(path)
    del rows[1]["rewards"]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match="r.jsonl:2: rollout row lacks \\['rewards'\\]"):
        read_rollouts(path)


# ---------------------------------------------------------------------------------------------- prompts


def test_format_prompt_with_and_without_chat_template():
    from make_demo import build_char_tokenizer

    assert format_prompt(build_char_tokenizer(), "2+3") == "2+3="
    plain = build_char_tokenizer(chat_template=None)
    assert format_prompt(plain, "2+3", system_prompt="Be brief.") == "Be brief.\n\nQuestion: 2+3\nAnswer:"
    assert format_prompt(plain, "2+3", system_prompt="") == "Question: 2+3\nAnswer:"
