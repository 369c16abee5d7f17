"""Generate the arithmetic prompts of the math GRPO example (deterministic, seeded).

Writes, next to this file, in slime's format ``{"prompt": ..., "label": "42"}``:

* ``train.jsonl``      2000 string prompts,
* ``test.jsonl``        200 string prompts (another seed),
* ``train_chat.jsonl``  200 chat-message prompts with a system prompt (use
  ``--input-key prompt --label-key label --apply-chat-template``).

The mix is tuned so SmolLM2-135M-Instruct solves about half of it at T=0.7 (GRPO needs
groups that are neither all right nor all wrong): mostly one-digit sums and products, some
one-step word problems, a few two-digit sums.

Usage: ``python examples/math_grpo/make_data.py [--out-dir DIR] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Answer with just the number."
SYSTEM_PROMPT = "You are a helpful math assistant. Answer with just the number."

_SUM = ["What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?", "Add {a} and {b}."]
_PROD = ["What is {a} * {b}?", "Compute {a} * {b}.", "What is {a} times {b}?", "Multiply {a} by {b}."]
_DIFF = ["What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?"]
_NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Zoe"]
_THINGS = ["apples", "books", "coins", "pens", "cards", "marbles", "stickers", "cookies"]


def _sum1(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice(_SUM).format(a=a, b=b), a + b


def _prod1(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return rng.choice(_PROD).format(a=a, b=b), a * b


def _diff1(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(2, 9)
    b = rng.randint(1, a)
    return rng.choice(_DIFF).format(a=a, b=b), a - b


def _word(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if rng.random() < 0.6:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b
    a = a + b
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b


def _sum2(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 49), rng.randint(1, 9)
    if rng.random() < 0.4:
        b = rng.randint(10, 49)
    return rng.choice(_SUM).format(a=a, b=b), a + b


# (generator, weight): the mix of the dataset.
MIX = [(_sum1, 0.35), (_prod1, 0.25), (_diff1, 0.10), (_word, 0.20), (_sum2, 0.10)]


def make_items(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs drawn from :data:`MIX` with ``random.Random(seed)``."""
    rng = random.Random(seed)
    gens, weights = zip(*MIX)
    out = []
    for _ in range(n):
        question, answer = rng.choices(gens, weights)[0](rng)
        out.append((question, str(answer)))
    return out


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_items(2000, args.seed)
    test = make_items(200, args.seed + 1)
    chat = make_items(200, args.seed + 2)
    _write(out / "train.jsonl", [{"prompt": f"{q} {INSTRUCTION}", "label": a} for q, a in train])
    _write(out / "test.jsonl", [{"prompt": f"{q} {INSTRUCTION}", "label": a} for q, a in test])
    _write(out / "train_chat.jsonl", [
        {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}], "label": a}
        for q, a in chat
    ])
    print(f"wrote {len(train)} train, {len(test)} test, {len(chat)} chat prompts to {out}")


if __name__ == "__main__":
    main()
