"""Built-in word problems and arithmetic for small instruct models: real-model tasks on a CPU.

Each is a list of unlabeled questions (the gold answers ride along for metrics only), made
deterministically so that every machine trains on the same prompts. SmolLM2-135M-Instruct at
temperature 0.7 with 32 new tokens, "Answer with a number only." after each question
(configs/smollm2-135m_<task>.yaml), seed 0:

| task | questions | avg@16 | maj@16 | pass@16 | greedy |
|---|---:|---:|---:|---:|---:|
| `apples`: "Tom has 3 apples and buys 5 more. How many ..." | 81 | 0.25 | 0.43 | 0.99 | 0.79 |
| `addsub`: add or take away, varied names and objects | 64 | 0.16 | 0.27 | 0.72 | 0.48 |
| `sum2`: "What is 24 + 19?", two-digit sums | 64 | 0.17 | 0.34 | 0.70 | 0.41 |

(`python -m ttrl_jax.evaluate`; a run's own evaluation before training draws with another key:
on `sum2` it measured 0.11 / 0.16 / 0.59 / 0.22, so these figures carry a few points of
sampling noise, more on maj@16.)

`apples` is where TTRL on this model helps; `addsub` is the kind of task a new user tries next,
where the base model's vote is wrong on three prompts of four; `sum2` asks for arithmetic the
model half knows (carries).
"""

from __future__ import annotations

import random

APPLES = "apples"
ADDSUB = "addsub"
SUM2 = "sum2"

_NAMES = (
    "Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sara",
    "Ravi", "Lena", "Ben", "Zoe", "Max", "Ivy", "Sam", "Nora",
)  # fmt: skip
_OBJECTS = (
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells",
    "balloons", "stamps", "coins", "toy cars", "buttons", "crayons", "candies", "flowers",
)  # fmt: skip


def apples() -> list[dict[str, str]]:
    """81 questions: every pair of one-digit counts, one bought after the other."""
    return [
        {
            "id": f"apples-{a}-{b}",
            "prompt": f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?",
            "answer": str(a + b),
        }
        for a in range(1, 10)
        for b in range(1, 10)
    ]


def addsub() -> list[dict[str, str]]:
    """64 one-step questions, alternately adding (2-9 and 2-9 more) and taking away (1 to a-1
    of 5-18); names and objects drawn from 16 each."""
    rng = random.Random(2504)
    items = []
    for i in range(64):
        name, thing = rng.choice(_NAMES), rng.choice(_OBJECTS)
        if i % 2 == 0:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            answer = a + b
        else:
            a = rng.randint(5, 18)
            b = rng.randint(1, a - 1)
            q = (
                f"{name} has {a} {thing} and gives away {b}. "
                f"How many {thing} does {name} have left?"
            )
            answer = a - b
        items.append({"id": f"addsub-{i}", "prompt": q, "answer": str(answer)})
    return items


def sum2() -> list[dict[str, str]]:
    """64 sums of two two-digit numbers (10-49 each), most with a carry."""
    rng = random.Random(1608)
    items = []
    for i in range(64):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        items.append({"id": f"sum2-{i}", "prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return items
