"""The embedded CPU demo: a task family built like the paper's pool, and a tiny GPT-2 warm-started
on it.

Nothing can be downloaded on every machine, and a random model never earns a reward, so the demo
brings its own.

The design (issue 14), chosen from these properties of the paper's setting (GSM8K + MATH +
DeepScaleR for a 1.5B model, validation sets aimed at two of the sources) and not from any CROPI
result:
  * several sources, the targeted ones a minority: eight skills on numbers of digits 1-9 (RULES),
    integer answers checked by common.reward: rev "rev(473)" = 374, sort "sort(473)" = 347, rot
    "rot(473)" = 734 (rotated left), swap "swap(473)" = 374 (first and last digits), shift
    "shift(473)" = 584 (each digit + 1, 9 -> 1), skip "skip(4735)" = 43 (every other digit), max
    "max(23,45)" = 45, min "min(23,45)" = 23. run_cropi.sh aims its validation sets at two of them
    (TARGETED_SKILLS: a quarter of the pool);
  * what RL does to a pretrained model: it mostly makes likely what the model can already sample. So
    the warm-up teaches every skill its right rule and, at one level, also a typical wrong rule (the
    skill's misconception: rev leaves the number unchanged, sort sorts descending, rot rotates
    right, swap swaps the first two digits, shift shifts down, skip keeps the other digits, max and
    min give the other number): a share of those labels (--misconception-rate) follows the wrong
    rule. The model then samples both answers, the wrong one more often: GRPO has a reward to climb,
    and greedy accuracy rises when the right rule becomes the more likely one;
  * a spread of difficulty inside every skill, three levels in equal shares of the pool, validation
    and test sets, by number length (DIGITS): level 1 (3 digits; 2 for max and min) taught with the
    misconception, so it is solved sometimes (0 < pass rate < 1); level 2 (one digit longer) taught
    right, mostly always solved; level 3 (longer than any number in the warm-up) never solved, like
    competition problems beyond a small model;
  * splits disjoint per skill: a training pool, one validation and one test set per skill (the bench
    passes --test-per-skill 500: binomial noise <= +-0.022), and a supervised warm-up set;
  * a character-level tokenizer with a tiny chat template ("{question}=") made locally, and a
    4-layer GPT-2.
Measured on the default build (seed 0): see the README's demo section for the pass-rate spread of
the warm-started model and what GRPO on the full pool learns.

The build is reproducible to the byte: every draw is seeded, and the warm-up runs on the CPU, in one
thread, with deterministic kernels, so the same seed writes the same model.safetensors whatever the
machine's number of cores; and with torch's and MKL's AVX2 code (run_cropi.sh's PIN_ISA; by hand,
ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 python make_demo.py) whatever the x86 CPU. demo.json records
the sha256 of every file written, to compare builds, and the kernels that ran (cpu_capability).

Writes OUT/data/{train,val_<skill>,test_<skill>}.jsonl, OUT/model/ (HF checkpoint + tokenizer),
OUT/demo.json.
Usage: python make_demo.py --out demo
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from pathlib import Path

import torch

from plumbing.cli import DataError, arg, run_main
from plumbing.files import atomic_path, write_json, write_jsonl
from plumbing.models import cpu_kernels, seed_everything


@dataclasses.dataclass
class Args:
    out: str = arg("demo", "output folder (data/ and model/ are written inside)")
    seed: int = arg(0, "seed for the problems and the warm-up")
    pool_per_skill: int = arg(150, "training-pool prompts per skill (a third per level)")
    val_per_skill: int = arg(50, "validation prompts per skill (a third per level)")
    test_per_skill: int = arg(200, "test prompts per skill (a third per level)")
    warmup_per_skill: int = arg(
        800,
        "supervised warm-up problems per skill, half of level 1, half of level 2 "
        "(disjoint from the splits above)",
    )
    misconception_rate: float = arg(
        0.6,
        "share of the level-1 warm-up labels that follow the skill's typical wrong rule (RULES)",
    )
    warmup_steps: int = arg(1200, "supervised steps")
    warmup_batch: int = arg(64, "sequences per supervised step")
    warmup_lr: float = arg(1e-3, "AdamW learning rate of the warm-up")
    n_layer: int = arg(4, "GPT-2 layers")
    n_embd: int = arg(
        128, "GPT-2 width (head_dim = n_embd / n_head must be >= 32 for vLLM's CPU attention)"
    )
    n_head: int = arg(4, "GPT-2 attention heads")


# ----------------------------------------------------------------------------------------------
# The task family
# ----------------------------------------------------------------------------------------------

SKILLS = ("rev", "sort", "rot", "swap", "shift", "skip", "max", "min")
TARGETED_SKILLS = ("rot", "swap")  # run_cropi.sh's validation sets; the other six are untargeted
LEVELS = (1, 2, 3)  # numbers grow longer with the level; level 3 is never in the warm-up
DIGITS = {skill: (3, 4, 5) for skill in SKILLS} | {
    "max": (2, 3, 4),
    "min": (2, 3, 4),
}  # digits per number, per level
WARMUP_LEVELS = (1, 2)  # the supervised warm-up sees these levels only
MISCONCEPTION_LEVELS = (
    1,
)  # levels whose warm-up labels follow the typical wrong rule at --misconception-rate
# skill: (right rule, typical wrong rule), each from the number's digits (or the two numbers') to
# the answer's
RULES = {
    "rev": (lambda d: d[::-1], lambda d: d),  # 4735 -> 5374; wrong: unchanged
    "sort": (
        lambda d: "".join(sorted(d)),
        lambda d: "".join(sorted(d))[::-1],
    ),  # -> 3457; wrong: descending
    "rot": (lambda d: d[1:] + d[0], lambda d: d[-1] + d[:-1]),  # -> 7354; wrong: rotated right
    "swap": (
        lambda d: d[-1] + d[1:-1] + d[0],
        lambda d: d[1] + d[0] + d[2:],
    ),  # -> 5734; wrong: first two swapped
    "shift": (
        lambda d: "".join(str(int(c) % 9 + 1) for c in d),  # -> 5846 (9 -> 1);
        lambda d: "".join(str((int(c) - 2) % 9 + 1) for c in d),
    ),  #    wrong: shifted down (3624)
    "skip": (lambda d: d[::2], lambda d: d[1::2]),  # -> 43; wrong: the other digits (75)
    "max": (
        lambda a, b: max(a, b, key=int),
        lambda a, b: min(a, b, key=int),
    ),  # wrong: the other number
    "min": (lambda a, b: min(a, b, key=int), lambda a, b: max(a, b, key=int)),
}


def random_digits(rng: random.Random, length: int) -> str:
    """A number of `length` digits 1-9 (no 0: no answer ever starts with a 0)."""
    return "".join(rng.choice("123456789") for _ in range(length))


def random_problem(skill: str, level: int, rng: random.Random) -> tuple[str, int, int]:
    """One (question, answer, the skill's typical wrong answer) of a skill at a difficulty level,
    e.g. ("rev(4735)", 5374, 4735) or ("max(23,45)", 45, 23)."""
    right, wrong = RULES[skill]
    numbers = [
        random_digits(rng, DIGITS[skill][level - 1])
        for _ in range(2 if skill in ("max", "min") else 1)
    ]
    return f"{skill}({','.join(numbers)})", int(right(*numbers)), int(wrong(*numbers))


def level_counts(total: int, levels: tuple[int, ...]) -> dict[int, int]:
    """total rows split over the levels as evenly as whole numbers allow (the first levels get the
    remainder)."""
    return {
        level: total // len(levels) + (i < total % len(levels)) for i, level in enumerate(levels)
    }


def distinct_problems(
    skill: str, level: int, count: int, rng: random.Random
) -> list[tuple[str, tuple[int, int]]]:
    """`count` different problems (question, (answer, typical wrong answer)) of one skill and level,
    in the order drawn."""
    problems: dict[str, tuple[int, int]] = {}
    for _ in range(100 * count):
        if len(problems) == count:
            break
        question, answer, wrong = random_problem(skill, level, rng)
        problems.setdefault(question, (answer, wrong))
    if len(problems) < count:
        raise DataError(
            f"skill {skill} level {level} has fewer than {count} different problems: lower "
            f"--pool-per-skill, --val-per-skill, --test-per-skill or --warmup-per-skill"
        )
    return list(problems.items())


def make_splits(args: Args) -> dict[str, list[dict]]:
    """{"train": pool, "val_<skill>": ..., "test_<skill>": ..., "warmup": supervised set}, disjoint
    per skill.

    Pool, validation and test sets hold the three levels in equal shares; the warm-up holds levels 1
    and 2 only. Every (skill, level) draws from its own seeded stream, the test problems last, so a
    larger --test-per-skill only adds test problems: the pool, the validation sets, the warm-up set
    and hence the model stay the same.
    """
    splits: dict[str, list[dict]] = {"train": [], "warmup": []}
    for skill in SKILLS:
        sizes = {
            "train": args.pool_per_skill,
            f"val_{skill}": args.val_per_skill,
            "warmup": args.warmup_per_skill,
            f"test_{skill}": args.test_per_skill,
        }
        for level in LEVELS:
            problems_rng = random.Random(f"{args.seed}-{skill}-{level}")
            labels_rng = random.Random(
                f"{args.seed}-{skill}-{level}-labels"
            )  # which warm-up labels are wrong
            needed = {
                name: level_counts(size, WARMUP_LEVELS if name == "warmup" else LEVELS).get(
                    level, 0
                )
                for name, size in sizes.items()
            }
            problems = iter(distinct_problems(skill, level, sum(needed.values()), problems_rng))
            for name, count in needed.items():
                rows = splits.setdefault(name, [])
                for _ in range(count):
                    question, (answer, wrong) = next(problems)
                    row = {"prompt": question, "answer": str(answer)}
                    if (
                        name == "warmup"
                        and level in MISCONCEPTION_LEVELS
                        and labels_rng.random() < args.misconception_rate
                    ):
                        row["answer"] = str(wrong)
                    if name != "warmup":
                        row = {
                            "id": f"{name}-{skill}-L{level}-{len(rows)}",
                            **row,
                            "skill": skill,
                            "level": level,
                        }
                    rows.append(row)
    random.Random(args.seed).shuffle(splits["train"])
    return splits


# ----------------------------------------------------------------------------------------------
# A character-level tokenizer made locally (no hub), with a chat template that renders "{question}="
# ----------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{ message['content'] }}={%- endif %}{%- endfor %}"
)


def build_char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """One token per printable ASCII character (plus newline), <pad> = 0 and <eos> = 1."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_gpt2(tokenizer, n_layer: int, n_embd: int, n_head: int, n_positions: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------------------------
# Supervised warm-up, stopped early, reproducible to the byte
# ----------------------------------------------------------------------------------------------


def make_deterministic() -> None:
    """One thread and deterministic kernels, so that the warm-up adds in the same order whatever the
    cores.

    Float addition is not associative: a matrix product split over several threads adds its partial
    sums in another order, and within 20 optimizer steps the weights differ with the number of
    threads (without this, tests/test_make_demo.py fails). One thread fixes the order, whatever
    OMP_NUM_THREADS says. Another CPU type (e.g. AVX-512 instead of AVX2) runs other kernels and can
    still write other bits.
    """
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def supervised_batch(
    tokenizer, rows: list[dict]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and labels; the loss is on the answer and <eos> only, not on the
    question."""
    from common import encode_prompt, format_prompt

    sequences, prompt_lengths = [], []
    for row in rows:
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"]))
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        sequences.append(prompt + answer)
        prompt_lengths.append(len(prompt))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for i, n in enumerate(prompt_lengths):
        labels[i, :n] = -100
    return input_ids, attention_mask, labels


def warm_start(args: Args, tokenizer, warmup_rows: list[dict]):
    """Supervised training on the CPU even where a GPU is present (a GPU sums in other orders, and
    in bf16)."""
    model = build_tiny_gpt2(tokenizer, args.n_layer, args.n_embd, args.n_head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.warmup_lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    start = time.time()
    for step in range(1, args.warmup_steps + 1):
        input_ids, attention_mask, labels = supervised_batch(
            tokenizer, rng.sample(warmup_rows, args.warmup_batch)
        )
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.warmup_steps:
            print(
                f"warm-up step {step}/{args.warmup_steps}  loss {loss.item():.3f}  "
                f"{time.time() - start:.0f}s"
            )
    return model


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(args: Args) -> None:
    if not 0 <= args.misconception_rate <= 1:
        raise DataError(
            f"--misconception-rate {args.misconception_rate}: a share of the labels, from 0 to 1"
        )
    make_deterministic()
    seed_everything(args.seed)
    out = Path(args.out)
    splits = make_splits(args)
    for name, rows in splits.items():
        if name != "warmup":
            write_jsonl(out / "data" / f"{name}.jsonl", rows)
    tokenizer = build_char_tokenizer()
    model = warm_start(args, tokenizer, splits["warmup"])
    with atomic_path(out / "model", folder=True) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    written = [out / "data" / f"{name}.jsonl" for name in splits if name != "warmup"]
    written.append(out / "model" / "model.safetensors")
    sha256 = {str(path.relative_to(out)): file_sha256(path) for path in written}
    write_json(
        out / "demo.json",
        {
            "skills": list(SKILLS),
            **dataclasses.asdict(args),
            "parameters": sum(p.numel() for p in model.parameters()),
            "sha256": sha256,
            **cpu_kernels(),
        },
    )
    print(
        f"wrote {out}/data and {out}/model; sha256 of model.safetensors: "
        f"{sha256['model/model.safetensors']}"
    )


if __name__ == "__main__":
    run_main(main, Args)
