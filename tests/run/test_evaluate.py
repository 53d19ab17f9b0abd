"""run/evaluate.py: evaluation metrics against hand-computed values."""

import jax
import numpy as np
import pytest

from ttrl_jax.run import evaluate


def test_score_hand_computed():
    answer_id_PN = np.array([[0, 0, 1, 0], [1, 1, 0, -1], [0, 1, 2, 3], [2, 2, 2, 2]])
    gold_id_P = np.array([0, 0, 4, -1])  # prompt 3 has no gold: it does not count
    m = evaluate.score(answer_id_PN, gold_id_P)
    assert m["avg@4"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert m["maj@4"] == pytest.approx(
        1 / 3
    )  # prompt 0 right; prompt 1 majority 1; prompt 2 tie -> 0
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["answered"] == pytest.approx(11 / 12)
    with pytest.raises(ValueError, match="no prompt has a gold answer"):
        evaluate.score(answer_id_PN, np.full(4, -1))


def test_evaluate_on_a_fixed_rollout(fixed_generator):
    b = lambda x: f"so \\boxed{{{x}}}"
    texts = {
        0: [b("1/2"), b("0.5"), b(3), "no answer"],  # gold 1/2: 2 of 4 right, majority right
        1: [b(7), b(8), b(8), b(7)],  # gold 8: 2 of 4, tie goes to 7 (first seen): maj wrong
        2: [b(5), b(5), b(5), b(5)],  # gold 6: all wrong
    }
    gen = fixed_generator(texts)
    m = evaluate.evaluate(
        gen, None, [[0], [1], [2]], ["\\frac{1}{2}", "8", "6"], key=jax.random.key(0), k=4,
        batch_prompts=2, greedy=True,
    )  # fmt: skip
    assert m["avg@4"] == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["greedy"] == pytest.approx(1 / 3)  # greedy = first text: right, wrong, wrong
    assert gen.calls == 4  # two batches (the second padded to 2 prompts), sampled + greedy


def test_free_text_answers_count_with_the_last_number_fallback(fixed_generator):
    texts = {0: ["9 + 8 equals 17.", "It is 17", "The sum is 16.", "seventeen"]}
    common = dict(key=jax.random.key(0), k=4, batch_prompts=1, greedy=False)
    strict = evaluate.evaluate(fixed_generator(texts), None, [[0]], ["17"], **common)
    free = evaluate.evaluate(
        fixed_generator(texts), None, [[0]], ["17"], last_number_fallback=True, **common
    )
    assert strict["answered"] == 0.0
    assert free["answered"] == pytest.approx(3 / 4) and free["avg@4"] == pytest.approx(2 / 4)
