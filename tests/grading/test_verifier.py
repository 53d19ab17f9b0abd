"""grading/verifier.py: math-verify in a killable worker; time limits per answer and per group."""

import threading
import time

import numpy as np
import pytest

from ttrl_jax.grading import verifier
from ttrl_jax.grading.clustering import answer_ids, cluster_answers

LIMIT_S = 1.0


# A safety bound for "returns instead of hanging", not a benchmark.
SAFETY_BOUND_S = 3 * LIMIT_S + 2.0


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """Starts the math-verify worker once, so start-up time never counts against a bound."""
    assert cluster_answers(["\\frac12", "0.5"]) == ([0, 0], -1)


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def test_clustering_works_off_the_main_thread():
    # math-verify's own signal-based timeouts fail outside the main thread; ours must not.
    results = []
    thread = threading.Thread(target=lambda: results.append(cluster_answers(["1/2", "0.5"])))
    thread.start()
    thread.join()
    assert results == [([0, 0], -1)]


@pytest.mark.parametrize(
    "answer",
    [
        "10^{10^{10}}",
        "9^{9^{9^{9}}}",
        "((100!)!)!",
        "10^{123456789012}",
        "{" * 400 + "1" + "}" * 400,
        "1" * 10**6,
        "\\boxed{" + "{" * 10_000,
    ],
)
def test_absurd_answers_return_within_the_limit(answer):
    (ids, gold_id), elapsed = timed(
        cluster_answers, [answer, "5", answer], gold="5", timeout_s=LIMIT_S
    )
    assert elapsed < SAFETY_BOUND_S
    assert ids[1] == gold_id == (0 if ids[0] == -1 else 1)
    assert ids[0] == ids[2]  # identical strings still agree (or are both no answer)
    assert ids[0] != ids[1]


def test_hanging_answer_is_cut_off_and_remembered():
    # Passes the cheap filters, but sympy evaluates (10^10)!: only the time limit stops it.
    answer = "(10^{10})!"
    (ids, gold_id), elapsed = timed(
        cluster_answers, [answer, "6", r"\frac{12}{2}"], gold="5", timeout_s=LIMIT_S
    )
    assert elapsed < SAFETY_BOUND_S
    assert (ids, gold_id) == ([0, 1, 1], 2)
    # The replacement worker answers, and the hanging answer costs nothing the second time.
    (ids, gold_id), elapsed = timed(
        cluster_answers, ["6.0", answer, r"\frac{12}{2}"], gold=answer, timeout_s=LIMIT_S
    )
    assert elapsed < SAFETY_BOUND_S
    assert (ids, gold_id) == ([0, 1, 0], 1)


def test_hanging_comparison_is_cut_off_and_remembered():
    # Each equation parses quickly; comparing the two makes sympy solve degree-100 polynomials.
    answers = ["x^{100}+x+1=0", "x^{99}+x+1=0", r"\frac12", "0.5", "x^{99}+x+1=0"]
    expected = [0, 1, 2, 2, 1]
    (ids, gold_id), elapsed = timed(cluster_answers, answers, gold="1/2", timeout_s=LIMIT_S)
    assert elapsed < SAFETY_BOUND_S
    assert (ids, gold_id) == (expected, 2)
    (ids, gold_id), elapsed = timed(cluster_answers, answers, gold="1/2", timeout_s=LIMIT_S)
    assert elapsed < SAFETY_BOUND_S
    assert (ids, gold_id) == (expected, 2)


def test_adversarial_responses_in_answer_ids():
    responses_PN = [
        [r"so \boxed{9^{9^{9^{9}}}}", r"\boxed{" + "{" * 10_000, "x" * 10**6, r"\boxed{25}"],
        [r"\boxed{" + "1" * 10**6 + "}", "The answer is 1/2.", r"\boxed{0.5}", "no idea"],
    ]
    (answer_id_PN, gold_id_P), elapsed = timed(
        answer_ids, responses_PN, ["025", r"\frac{1}{2}"], timeout_s=LIMIT_S
    )
    assert elapsed < SAFETY_BOUND_S
    np.testing.assert_array_equal(answer_id_PN, [[0, -1, -1, 1], [-1, 0, 0, -1]])
    np.testing.assert_array_equal(gold_id_P, [1, 0])


def test_group_time_bound_holds_with_many_slow_answers():
    # Six answers that parse in a fraction of the limit (each kill would re-parse them all)
    # and six whose factorial runs for minutes: the group still ends within its budget.
    limit_s = 0.5
    slow = [f"(10^{{5}}+{k})!" for k in range(11, 17)]
    hanging = [f"(10^{{7}}+{k})!" for k in range(11, 17)]
    answers = [a for pair in zip(slow, hanging) for a in pair] + ["0.5", r"\frac12"]
    (ids, gold_id), elapsed = timed(cluster_answers, answers, gold="1/2", timeout_s=limit_s)
    bound_s = (len(answers) + 1) * limit_s  # every answer and the gold go to math-verify
    assert elapsed < bound_s + 1.0  # + killing and replacing workers
    assert ids[-1] == ids[-2] == gold_id  # the short answers and the gold went first
    assert len(set(ids[:-2])) == 12  # the slow answers are distinct from each other


def test_cluster_takes_answers_shortest_first_whatever_their_order():
    for answers in (["0.5", "\\frac{1}{2}", "3"], ["3", "\\frac{1}{2}", "0.5"]):
        rep_of, gold_rep = verifier.cluster(answers, "1/2", timeout_s=LIMIT_S)
        assert rep_of == {"0.5": "0.5", "\\frac{1}{2}": "0.5", "3": "3"}
        assert gold_rep == "0.5"


def test_absurd_and_overlong_answers_never_reach_sympy():
    assert verifier.sympy_eligible("\\frac{1}{2}") and verifier.sympy_eligible("100!")
    for answer in ("10^{10^{10}}", "2^{123456789}", "1234567!", "3!!", "1" * 301, "(" * 13 + ")"):
        assert not verifier.sympy_eligible(answer), answer


def test_a_spare_idle_past_the_start_up_limit_is_still_used():
    # The spare started long ago has its "ready" message waiting; promoting it after a time-out
    # must read that message, not call the worker dead for having started too long ago.
    spare = verifier._VERIFIER._spare
    assert spare is not None and spare.conn.poll(verifier.WORKER_STARTUP_TIMEOUT_S)
    spare.started -= 2 * verifier.WORKER_STARTUP_TIMEOUT_S
    ids, gold_id = cluster_answers(["(10^{7}+11)!", "0.5"], gold="1/2", timeout_s=0.5)
    assert ids[1] == gold_id != ids[0]  # the hanging answer's kill promoted the old spare
    assert cluster_answers([r"\frac12", "0.5"]) == ([0, 0], -1)
