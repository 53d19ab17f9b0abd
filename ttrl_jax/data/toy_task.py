"""The toy reasoning task: a chain of +, -, * operations modulo 10 with a worked solution.

Question: ``Start at 7 and apply +8, *3, -5 in order, modulo 10.``
Solution, one line per step, then the answer::

    7 +8=5
    5 *3=5
    5 -5=0
    \\boxed{0}

Every line restates the previous value, so one wrong step changes every later value (unless
a later ``*d`` maps the wrong and the right value to one, e.g. ``*5`` on 3 and 7). Modulo 10
every value is one digit, so every line has the same token layout and each step is a lookup in
a table of 10 x 26 entries: a small model learns the table quickly, and what remains hard is
keeping track of a long chain. Chains
with a *slip* (one random wrong intermediate value, the chain continuing correctly from it)
teach a model to err at random rather than systematically: its wrong answers then scatter
over many values and the majority vote recovers the truth, which is what TTRL feeds on.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence

import numpy as np

MODULUS = 10
_ADD_SUB_DIGITS = np.arange(1, 10)
_MUL_DIGITS = np.arange(2, 10)  # ×0 would erase the chain and ×1 does nothing
_OP_SYMBOLS = ("+", "-", "*")
_QUESTION_RE = re.compile(
    rf"Start at (\d+) and apply ([-+*]\d(?:, [-+*]\d)*) in order, modulo {MODULUS}\."
)
_BOXED_INT_RE = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")

Op = tuple[str, int]  # ("+", 8): the operator symbol and its single-digit operand


@dataclasses.dataclass(frozen=True)
class Problem:
    """A start value and a chain of operations, all modulo MODULUS."""

    start: int
    ops: tuple[Op, ...]

    @property
    def question(self) -> str:
        steps = ", ".join(f"{op}{d}" for op, d in self.ops)
        return f"Start at {self.start} and apply {steps} in order, modulo {MODULUS}."

    @property
    def answer(self) -> int:
        return chain_values(self.start, self.ops)[-1]


def apply_op(value: int, op: Op) -> int:
    """One step of the chain, reduced modulo MODULUS."""
    symbol, d = op
    if symbol == "+":
        return (value + d) % MODULUS
    if symbol == "-":
        return (value - d) % MODULUS
    if symbol == "*":
        return (value * d) % MODULUS
    raise ValueError(f"Unknown operation {symbol!r}; expected one of {_OP_SYMBOLS}.")


def chain_values(
    start: int, ops: Sequence[Op], slip_step: int | None = None, slip_value: int | None = None
) -> list[int]:
    """Values after each step; at `slip_step` the value is replaced by `slip_value`."""
    values, value = [], start
    for i, op in enumerate(ops):
        value = slip_value if i == slip_step else apply_op(value, op)
        values.append(value)
    return values


def make_problem(rng: np.random.Generator, n_steps: int) -> Problem:
    """Draw a uniform start value and `n_steps` operations (each kind equally likely).

    Args:
      rng: the numpy Generator that makes the draw reproducible.
      n_steps: number of operations, at least 1.

    Returns:
      The Problem.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}.")
    start = int(rng.integers(MODULUS))
    ops = []
    for symbol in rng.choice(_OP_SYMBOLS, size=n_steps):
        digits = _MUL_DIGITS if symbol == "*" else _ADD_SUB_DIGITS
        ops.append((str(symbol), int(rng.choice(digits))))
    return Problem(start, tuple(ops))


def format_solution(
    problem: Problem, slip_step: int | None = None, slip_value: int | None = None
) -> str:
    """The worked solution: one `a <op>d=b` line per step, then the boxed final value.

    The operator keeps the leading space it has in the question: the tokenizer makes " +",
    " -" and " *" single tokens different from "+", "-" and "*", and written the same way the
    operator of each step is a copy of a question token rather than a mapping between ids.
    """
    values = chain_values(problem.start, problem.ops, slip_step, slip_value)
    previous = [problem.start, *values[:-1]]
    lines = [f"{a} {op}{d}={b}" for a, (op, d), b in zip(previous, problem.ops, values)]
    lines.append(f"\\boxed{{{values[-1]}}}")
    return "\n".join(lines)


def parse_question(question: str) -> Problem:
    """Inverse of `Problem.question`; raises ValueError on any other text."""
    match = _QUESTION_RE.fullmatch(question.strip())
    if match is None:
        raise ValueError(
            f"Not a toy-task question: {question!r}. Expected the format of Problem.question, "
            "e.g. 'Start at 7 and apply +8, *3 in order, modulo 10.'."
        )
    ops = tuple((step[0], int(step[1:])) for step in match.group(2).split(", "))
    return Problem(int(match.group(1)), ops)


def extract_boxed_int(response: str) -> int | None:
    """The integer in the last `\\boxed{...}` of `response`, or None if there is none."""
    matches = _BOXED_INT_RE.findall(response)
    return int(matches[-1]) if matches else None


def is_correct(question: str, response: str) -> bool:
    """Whether the response's last boxed integer equals the recomputed answer to `question`."""
    return extract_boxed_int(response) == parse_question(question).answer


def pretrain_examples(
    seed: int,
    n: int,
    min_steps: int = 1,
    max_steps: int = 6,
    slip_prob: float = 0.0,
    exclude: Collection[str] = (),
) -> list[dict]:
    """Question/solution pairs for supervised pretraining.

    Args:
      seed: seed of the numpy Generator; the same seed gives the same examples.
      n: number of examples.
      min_steps, max_steps: chain lengths are drawn uniformly from this inclusive range.
      slip_prob: fraction of solutions that contain one slip: at a uniformly drawn step the
        written value is a uniformly drawn wrong one, and later steps continue correctly from
        it (so the boxed value is usually wrong).
      exclude: questions never to emit (e.g. the test split's prompts).

    Returns:
      A list of dicts with `prompt` (the question), `response` (the worked solution),
      `answer` (the true answer as a string) and `slipped` (whether the solution has a slip).
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"Need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}.")
    if not 0.0 <= slip_prob <= 1.0:
        raise ValueError(f"slip_prob must be in [0, 1], got {slip_prob}.")
    rng = np.random.default_rng((seed, 0))  # stream 0: pretraining, 1: test split
    exclude = set(exclude)
    examples = []
    while len(examples) < n:
        problem = make_problem(rng, int(rng.integers(min_steps, max_steps + 1)))
        slip_step = slip_value = None
        if rng.random() < slip_prob:
            slip_step = int(rng.integers(len(problem.ops)))
            correct = chain_values(problem.start, problem.ops)[slip_step]
            # Uniform over the MODULUS - 1 wrong values.
            slip_value = int((correct + rng.integers(1, MODULUS)) % MODULUS)
        if problem.question in exclude:
            continue
        examples.append(
            {
                "prompt": problem.question,
                "response": format_solution(problem, slip_step, slip_value),
                "answer": str(problem.answer),
                "slipped": slip_step is not None,
            }
        )
    return examples


def test_split(seed: int, n: int, n_steps: int = 5) -> list[dict]:
    """Distinct unlabeled-style test prompts in the format of the TTRL benchmark files.

    Args:
      seed: seed of the numpy Generator (a stream separate from `pretrain_examples`').
      n: number of prompts.
      n_steps: chain length; the default 5 is longer than most pretraining chains
        (uniform over 1..6) but inside their range.

    Returns:
      A list of dicts `{"prompt", "answer", "source", "id"}` like upstream `test.json`, with
      the answer as a string.
    """
    n_distinct = MODULUS * (2 * len(_ADD_SUB_DIGITS) + len(_MUL_DIGITS)) ** n_steps
    if n > n_distinct:
        raise ValueError(f"Only {n_distinct} distinct {n_steps}-step questions exist; asked {n}.")
    rng = np.random.default_rng((seed, 1))
    rows, seen = [], set()
    while len(rows) < n:
        problem = make_problem(rng, n_steps)
        if problem.question in seen:
            continue
        seen.add(problem.question)
        rows.append(
            {
                "prompt": problem.question,
                "answer": str(problem.answer),
                "source": "toy",
                "id": str(len(rows)),
            }
        )
    return rows
