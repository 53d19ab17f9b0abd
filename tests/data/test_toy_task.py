"""data/toy_task.py: the toy chains, their format, slips and the unlabeled test split."""

import json
import re

import numpy as np
import pytest

from ttrl_jax.data import toy_task as task

_LINE_RE = re.compile(r"(\d+) ([-+*])(\d)=(\d+)")


def _solution_lines(response):
    """(a, op, d, b) per step line, and the boxed value."""
    *lines, last = response.split("\n")
    steps = []
    for line in lines:
        match = _LINE_RE.fullmatch(line)
        assert match, f"bad step line {line!r}"
        a, op, d, b = match.groups()
        steps.append((int(a), op, int(d), int(b)))
    assert re.fullmatch(r"\\boxed\{\d+\}", last), last
    return steps, task.extract_boxed_int(last)


def test_apply_op_reduces_modulo_10():
    assert task.apply_op(7, ("+", 8)) == 5
    assert task.apply_op(3, ("-", 5)) == 8
    assert task.apply_op(5, ("*", 3)) == 5
    with pytest.raises(ValueError, match="Unknown operation"):
        task.apply_op(1, ("/", 2))


def test_question_and_solution_format():
    problem = task.Problem(7, (("+", 8), ("*", 3), ("-", 5)))
    assert problem.question == "Start at 7 and apply +8, *3, -5 in order, modulo 10."
    assert task.format_solution(problem) == "7 +8=5\n5 *3=5\n5 -5=0\n\\boxed{0}"
    assert task.format_solution(problem, slip_step=1, slip_value=6) == (
        "7 +8=5\n5 *3=6\n6 -5=1\n\\boxed{1}"
    )
    assert problem.answer == 0


def test_generators_are_deterministic_per_seed():
    assert task.pretrain_examples(3, 50, slip_prob=0.3) == task.pretrain_examples(
        3, 50, slip_prob=0.3
    )
    assert task.pretrain_examples(3, 50) != task.pretrain_examples(4, 50)
    assert task.test_split(3, 20) == task.test_split(3, 20)
    assert task.test_split(3, 20) != task.test_split(4, 20)
    draw = lambda: task.make_problem(np.random.default_rng(7), 5)
    assert draw() == draw()


def test_clean_solutions_are_correct_and_lengths_in_range():
    examples = task.pretrain_examples(0, 500, min_steps=2, max_steps=4, slip_prob=0.0)
    assert not any(ex["slipped"] for ex in examples)
    n_steps = set()
    for ex in examples:
        problem = task.parse_question(ex["prompt"])
        n_steps.add(len(problem.ops))
        assert task.is_correct(ex["prompt"], ex["response"])
        assert task.extract_boxed_int(ex["response"]) == int(ex["answer"]) == problem.answer
    assert n_steps == {2, 3, 4}


def test_slips_happen_at_rate_and_chain_continues_from_them():
    examples = task.pretrain_examples(1, 2000, slip_prob=0.3)
    slipped = [ex["slipped"] for ex in examples]
    assert 0.27 < np.mean(slipped) < 0.33
    n_wrong_final = 0
    for ex in examples:
        problem = task.parse_question(ex["prompt"])
        steps, boxed = _solution_lines(ex["response"])
        assert [(op, d) for _, op, d, _ in steps] == list(problem.ops)
        previous = [problem.start] + [b for *_, b in steps[:-1]]
        assert [a for a, *_ in steps] == previous  # each line restates the last written value
        n_wrong = sum(b != task.apply_op(a, (op, d)) for a, op, d, b in steps)
        assert n_wrong == int(ex["slipped"])  # one slip, every later step computed correctly
        assert boxed == steps[-1][3]
        assert int(ex["answer"]) == problem.answer
        n_wrong_final += boxed != problem.answer
    # A slip is seldom erased later: only by a later *d with (slip - truth) * d = 0 modulo 10
    # (5% of these slips).
    assert 0.9 * sum(slipped) < n_wrong_final < sum(slipped)


def test_exclude_removes_questions():
    questions = [ex["prompt"] for ex in task.pretrain_examples(0, 40)]
    kept = task.pretrain_examples(0, 40, exclude=questions[:10])
    assert len(kept) == 40
    assert not {ex["prompt"] for ex in kept} & set(questions[:10])


def test_test_split_rows_like_benchmark_files():
    rows = task.test_split(0, 64, n_steps=5)
    assert len({row["prompt"] for row in rows}) == 64
    assert [row["id"] for row in rows] == [str(i) for i in range(64)]
    json.dumps(rows)  # written as a benchmark file as is
    for row in rows:
        problem = task.parse_question(row["prompt"])
        assert len(problem.ops) == 5
        assert row["answer"] == str(problem.answer)
    with pytest.raises(ValueError, match="distinct"):
        task.test_split(0, 3000, n_steps=1)


def test_is_correct_and_parse_errors():
    question = task.Problem(7, (("+", 8),)).question
    assert task.is_correct(question, "7 +8=5\n\\boxed{5}")
    assert task.is_correct(question, "\\boxed{12} no, \\boxed{ 5 }")
    assert not task.is_correct(question, "7 +8=5\n\\boxed{6}")
    assert not task.is_correct(question, "7 +8=5")
    with pytest.raises(ValueError, match="Not a toy-task question"):
        task.parse_question("What is 2+2?")
