"""Answer extraction, canonical forms and clustering into per-prompt answer ids."""

import itertools
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ttrl_jax.grading import answers, clustering
from ttrl_jax.grading.clustering import (
    answer_ids,
    canonical_answer,
    cluster_answers,
    extract_answer,
)

# The benchmark files live in shared/ beside the checkout; tests skip when they are absent.
DATA_DIR = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[2] / "shared/data/ttrl",
            Path("/work/shared/data/ttrl"),
        )
        if p.is_dir()
    ),
    Path("/work/shared/data/ttrl"),
)
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


# --- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),
        (
            r"first \boxed{1}, then \boxed{\left( 3, \frac{\pi}{2} \right)}",
            r"\left( 3, \frac{\pi}{2} \right)",
        ),
        (r"\boxed{2} but really \fbox{12}", "12"),
        (r"\fbox{12} no, \boxed{13}", "13"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\boxed{\boxed{7}}", "7"),
        (r"\boxed{5} and then the truncated \boxed{\frac{1}{", None),
        (r"\boxed{}", None),
        ("The answer is 25.", "25"),
        ("the ANSWER is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("Final Answer: 1.5\nDone.", "1.5"),
        ("answer: 3, wait, answer: 4", "4"),
        ("**Final Answer:** **42**", "42"),
        ("The final answer is:\n$$\n7\n$$", "7"),
        ("The answer is $\\$36$.", "\\$36"),
        ("no final answer here, just 3 and 4", None),
    ],
)
def test_extract_math(text, expected):
    assert extract_answer(text) == expected


def test_last_number_fallback():
    text = "we get 3 apples and then 1,234.5 pears"
    assert extract_answer(text) is None
    assert extract_answer(text, last_number_fallback=True) == "1,234.5"
    assert extract_answer("The answer is 7 but 8", last_number_fallback=True) == "7 but 8"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{C}", "C"),
        (r"\boxed{\text{(B)}}", "B"),
        (r"\boxed{d}", "D"),
        ("The correct answer is (C).", "C"),
        ("Answer: D", "D"),
        ("the answer is **A** because", "A"),
        ("Answer: B. Wait, the answer is (A)", "A"),
        ("(B)", "B"),
        ("the answer is a bit unclear", None),
        (r"\boxed{Darwin}", None),
        ("I cannot decide.", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_answer(text, mode="choice") == expected


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown mode"):
        extract_answer("x", mode="code")
    with pytest.raises(ValueError, match="unknown mode"):
        cluster_answers(["1"], mode="code")


def test_extraction_of_megabyte_text_returns():
    cases = [
        "\\boxed{" + "{" * 10_000,
        "\\boxed{" * 100_000,
        "{" * 10**6 + "\\boxed{5}",
        "answer: " * 100_000,
        "the answer is $" + "1" * 10**6,
        "1," * 500_000,
    ]
    for text in cases:
        _, elapsed = timed(extract_answer, text, last_number_fallback=True)
        assert elapsed < SAFETY_BOUND_S
        _, elapsed = timed(extract_answer, text, mode="choice")
        assert elapsed < SAFETY_BOUND_S
    assert extract_answer(cases[0]) is None
    assert extract_answer(cases[2]) == "5"


# --- canonical strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("025", "25"),
        ("142.0", "142"),
        ("-0.50", "-0.5"),
        (".5", "0.5"),
        ("0", "0"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}"),
        (r"$\left( 3, \frac{\pi}{2} \right)$", r"(3,\frac{\pi}{2})"),
        (r"5.4 \text{ cents}", "5.4"),
        (r"15\mbox{ cm}^2", "15"),
        (r"11,\! 111,\! 111,\! 100", "11111111100"),
        (r"30^\circ", "30"),
        (r"\$18.90", "18.9"),
        (r"50\%", "50"),
        ("x = 5", "5"),
        (r"\text{(B)}", "B"),
        (r"\text{Evelyn}", "Evelyn"),
        ("137 1/2", "137 1/2"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ],
)
def test_canonical_answer(answer, expected):
    assert canonical_answer(answer) == expected


def test_canonical_answer_rejects_missing_and_overlong():
    assert canonical_answer(None) is None
    assert canonical_answer("  ") is None
    assert canonical_answer("1" * (answers.MAX_ANSWER_CHARS + 1)) is None


# --- clustering --------------------------------------------------------------------------------


def test_half_in_four_forms_shares_one_id():
    ids, gold_id = cluster_answers([r"\frac12", "0.5", "1/2", r"\dfrac{1}{2}", "3"], gold="0.50")
    assert ids == [0, 0, 0, 0, 1]
    assert gold_id == 0


def test_ids_follow_first_appearance():
    assert cluster_answers(["7", "3", "7", None, "3", "5"]) == ([0, 1, 0, -1, 1, 2], -1)
    # A tie keeps first-appearance order; breaking it is the vote's job.
    assert cluster_answers(["3", "5", "5", "3"]) == ([0, 1, 1, 0], -1)


def test_group_without_answers():
    assert cluster_answers([None, None, None]) == ([-1, -1, -1], -1)
    assert cluster_answers([None, ""], gold="5") == ([-1, -1], 0)
    assert cluster_answers([]) == ([], -1)


def test_all_agree_and_all_differ():
    assert cluster_answers(["25", "025", "25.0", "$25$"], gold="025") == ([0, 0, 0, 0], 0)
    assert cluster_answers(["1", "2", "3", "4"], gold="5") == ([0, 1, 2, 3], 4)
    ids, gold_id = cluster_answers([r"\frac{1}{3}", r"\sqrt{2}", r"\pi", "x+1"], gold=r"\pi")
    assert (ids, gold_id) == ([0, 1, 2, 3], 2)


def test_gold_id_semantics():
    answers = ["3", r"\frac{1}{2}", "3"]
    assert cluster_answers(answers) == ([0, 1, 0], -1)
    assert cluster_answers(answers, gold="0.5") == ([0, 1, 0], 1)  # equivalent via math-verify
    assert cluster_answers(answers, gold="03") == ([0, 1, 0], 0)  # equal canonical strings
    assert cluster_answers(answers, gold="4") == ([0, 1, 0], 2)  # fresh id
    assert cluster_answers(answers, gold="") == ([0, 1, 0], 2)  # unusable gold: fresh id


@pytest.mark.parametrize(
    "first, second",
    [
        (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
        (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"),
        (r"\frac{2\pi}{3}", r"2\pi/3"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
        (r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2)\cup(3,\infty)"),
        (r"\left(\frac{3}{5},\frac{8}{3}\right]", r"(0.6, 8/3]"),
        (r"137 \frac{1}{2}", "137.5"),
        (r"\frac{x+2}{2}", r"\frac{x}{2}+1"),
        ("x=5", "5"),
        ("1/3", "0.333333"),
    ],
)
def test_equivalent_math_forms(first, second):
    assert cluster_answers([first, second], gold=second) == ([0, 0], 0)


@pytest.mark.parametrize(
    "first, second",
    [
        ("(1,2)", "[1,2]"),
        (r"\frac{1}{2}", r"\frac{1}{3}"),
        (r"\pi", "3.14"),
        ("x+1", "x+2"),
        ("5", r"(5, 6)"),
        (r"\sqrt{2}", "2"),
    ],
)
def test_distinct_math_forms(first, second):
    assert cluster_answers([first, second], gold=second) == ([0, 1], 1)


def test_choice_clustering():
    assert cluster_answers(["C", "(C)", "B", None], gold="C", mode="choice") == ([0, 0, 1, -1], 0)
    assert cluster_answers(["A", "B"], gold="D", mode="choice") == ([0, 1], 2)


def test_clustering_works_off_the_main_thread():
    # math-verify's own signal-based timeouts fail outside the main thread; ours must not.
    results = []
    thread = threading.Thread(target=lambda: results.append(cluster_answers(["1/2", "0.5"])))
    thread.start()
    thread.join()
    assert results == [([0, 0], -1)]


# --- adversarial answers -----------------------------------------------------------------------


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


# --- answer_ids --------------------------------------------------------------------------------


def test_answer_ids_shapes_and_modes():
    responses_PN = [
        [r"\boxed{2}", "The answer is 2.", r"\boxed{3}"],
        ["nothing", "nothing", "still nothing"],
    ]
    answer_id_PN, gold_id_P = answer_ids(responses_PN)
    assert answer_id_PN.dtype == np.int32 and answer_id_PN.shape == (2, 3)
    assert gold_id_P.dtype == np.int32 and gold_id_P.shape == (2,)
    np.testing.assert_array_equal(answer_id_PN, [[0, 0, 1], [-1, -1, -1]])
    np.testing.assert_array_equal(gold_id_P, [-1, -1])
    answer_id_PN, gold_id_P = answer_ids([["Answer: B", r"\boxed{B}", "(A)"]], ["A"], mode="choice")
    np.testing.assert_array_equal(answer_id_PN, [[0, 0, 1]])
    np.testing.assert_array_equal(gold_id_P, [1])
    answer_id_PN, _ = answer_ids([["it is 4", "maybe 4.0"]], last_number_fallback=True)
    np.testing.assert_array_equal(answer_id_PN, [[0, 0]])


def test_answer_ids_rejects_ragged_input():
    with pytest.raises(ValueError, match="same number of samples"):
        answer_ids([["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="one gold"):
        answer_ids([["a"], ["b"]], ["1"])


# --- the benchmark answers ---------------------------------------------------------------------


def _reformatted(gold: str) -> str:
    """A differently written but equivalent answer, where that is easy to produce."""
    if re.fullmatch(r"\d+(\.0+)?", gold):  # AIME "025", AMC "142.0"
        return str(int(float(gold)))
    text = gold.replace(r"\dfrac", r"\frac").replace(r"\left", "").replace(r"\right", "")
    if not re.search(r"\d\s*\\frac", text):  # leave mixed numbers like 137 \frac{1}{2} alone
        text = re.sub(r"\\frac\{(\d+)\}\{(\d+)\}", r"\1/\2", text)
    return "$" + text.replace(" ", "") + "$"


@pytest.mark.parametrize("bench", ["AIME-TTT", "AMC-TTT", "MATH-TTT"])
def test_benchmark_golds_match_their_own_answers(bench):
    path = DATA_DIR / bench / "test.json"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    golds = [item["answer"] for item in json.loads(path.read_text())]
    for gold in golds:
        boxed = extract_answer(f"Reasoning.\nSo the result is $\\boxed{{{gold}}}$.")
        stated = extract_answer(f"Reasoning.\nThe final answer is ${gold}$. I hope it is correct.")
        assert boxed == stated == gold.strip()
        ids, gold_id = cluster_answers([boxed, stated, _reformatted(gold)], gold=gold)
        assert (ids, gold_id) == ([0, 0, 0], 0), gold
        if re.fullmatch(r"\d+(\.0+)?", gold):
            wrong = str(int(float(gold)) + 1)
            assert cluster_answers([wrong], gold=gold) == ([0], 1), gold


# --- held-out style cases ----------------------------------------------------------------------

# Each group: forms of one answer, which must share one id (and the gold's, the first form).
SAME_ANSWER = [
    [r"\frac{3}{4}", "0.75", "3/4", r"\dfrac34"],
    [r"2\frac{1}{2}", r"\frac{5}{2}", "2.5", r"2 \frac{1}{2}"],
    [r"30^\circ", "30", "30°", r"30^{\circ}", r"30\text{ degrees}"],
    [r"5 \text{ cm}", "5", r"5\,\mathrm{cm}"],
    [r"\text{(C)}", "C", "(C)", r"\textbf{(C)}"],
    [r"[1, 2)", "[1,2)", r"\left[1,2\right)"],
    [r"(-\infty, 3]", r"(-\infty,3]"],
    [r"\{1, 2, 3\}", r"\{3, 2, 1\}", r"\left\{1,2,3\right\}"],
    [r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"],
    [r"25\%", "25", "25 percent", r"25\text{ percent}"],
    [r"1.5 \times 10^{3}", "1500", r"1.5\cdot10^3"],
    [r"6.02 \times 10^{23}", r"6.02\times10^{23}"],
    [r"2\sqrt{3}", r"\sqrt{12}"],
    [r"\frac{\pi}{4}", r"\pi/4", r"0.25\pi"],
    [r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"],
    [r"-\frac{1}{2}", "-0.5", r"\frac{-1}{2}"],
    ["-7", "-7.0", "-07"],
    ["1,000,000", "1000000", "1{,}000{,}000", r"1,\!000,\!000"],
    [r"\$1,234.50", "1234.5"],
    ["x = 5", "5", "x=5"],
    [r"k = \frac{1}{3}", r"\frac{1}{3}"],
    ["y = 2x + 3", "y=2x+3"],
    [r"x \in [-2, 7]", r"-2 \le x \le 7", "[-2,7]"],
    [r"\text{Evelyn}", "Evelyn", "evelyn"],
    ["3^{10}", "59049"],
    [r"p = -1 \text{ and } p = \dfrac{15}{8}", r"-1, \frac{15}{8}"],
    ["19, 46, and 82", r"19, 46, \text{ and } 82"],
    ["32,349", r"32,\! 349", "32349"],
]
DIFFERENT_ANSWERS = [
    ("12:00", "1:00"),
    (r"\frac{1}{0}", "5/0"),
    ("3:0", "12:00"),
    ("32, 349", "32349"),
    ("0,111", "111"),
    ("x = 2x+3", "z=2x+3"),
    ("(1,2)", r"\{1,2\}"),
    (r"0.5\%", "0.5"),
    ("0.28", "28"),
    ("-5", "5"),
    ("[1,2]", "(1,2)"),
    ("(2,1)", "(1,2)"),
    ("2.5", "2.50001"),
    (r"\text{yes}", r"\text{no}"),
    ("x > 5", "x < 5"),
    ("y = x^2", "y = x^3"),
    ("1, 2", "12"),
]


@pytest.mark.parametrize("forms", SAME_ANSWER, ids=lambda forms: forms[0])
def test_forms_of_one_answer_share_an_id(forms):
    assert cluster_answers(forms, gold=forms[0]) == ([0] * len(forms), 0)


@pytest.mark.parametrize("a, b", DIFFERENT_ANSWERS)
def test_different_answers_get_different_ids(a, b):
    assert cluster_answers([a, b], gold=b) == ([0, 1], 1)


def test_held_out_responses():
    responses_PN = [
        ["Final Answer: The largest $n$ is 34.", r"so \boxed{34}", "Therefore $n = 34$."],
        [
            r"$\boxed{255}$ so far. Final Answer: The final answer is $10,455$. I hope it is "
            "correct.",
            r"\boxed{10455}",
            r"\boxed{255}",
        ],
    ]
    answer_id_PN, gold_id_P = answer_ids(responses_PN, ["34", "10455"])
    np.testing.assert_array_equal(answer_id_PN, [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(gold_id_P, [0, 0])


def test_distinct_integers_need_no_sympy(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("math-verify was called for distinct integers")

    monkeypatch.setattr(clustering.verifier, "cluster", fail)
    assert cluster_answers(["25", "025", "7", "-3", None, "x = 7"], gold="007") == (
        [0, 0, 1, 2, -1, 1],
        1,
    )


# --- order independence ------------------------------------------------------------------------

MIXED_GROUP = [
    "(1,2)", r"\{1,2\}", r"\{2,1\}", "x=5", "5", "y=5", r"\frac12", "0.5", "1/2", "x = 2x+3",
    "z=2x+3", "2x+3", r"28\%", "28", "0.28", None, "12:00", "1:00", r"\frac{1}{0}", "1,2",
    r"(-\infty, 2)", r"x < 2", "[1,2]", r"\sqrt{2}", r"\frac{2}{\sqrt{2}}", "1.414214", "C",
]  # fmt: skip


def _clusters(ids, gold_id, order):
    """The clusters, and the gold's, as sets of indices into the unshuffled group."""
    id_of = dict(zip(order.tolist(), ids))
    members = lambda cluster: frozenset(i for i, c in id_of.items() if c == cluster)  # noqa: E731
    return {members(c) for c in set(ids) if c >= 0}, members(gold_id)


def test_ids_depend_only_on_the_multiset_of_answers():
    rng = np.random.default_rng(0)
    reference = None
    for _ in range(40):
        order = rng.permutation(len(MIXED_GROUP))
        ids, gold_id = cluster_answers([MIXED_GROUP[i] for i in order], gold=r"\sqrt{2}")
        seen = [cluster for cluster in ids if cluster >= 0]
        assert list(dict.fromkeys(seen)) == list(range(len(set(seen))))  # first appearance
        clusters = _clusters(ids, gold_id, order)
        reference = reference or clusters
        assert clusters == reference
    partition, gold_members = reference
    assert {MIXED_GROUP[i] for i in gold_members} == {
        r"\sqrt{2}",
        r"\frac{2}{\sqrt{2}}",
        "1.414214",
    }
    named = {frozenset(MIXED_GROUP[i] for i in cluster) for cluster in partition}
    for alone in ("12:00", "1:00", r"\frac{1}{0}", "0.28"):  # zoo is equal to nothing
        assert frozenset({alone}) in named
    assert frozenset({r"28\%", "28"}) in named


@pytest.mark.parametrize("permutation", list(itertools.permutations(range(3))))
def test_interval_and_sets_in_any_order(permutation):
    group = ["(1,2)", r"\{1,2\}", r"\{2,1\}"]
    ids, _ = cluster_answers([group[i] for i in permutation])
    by_answer = {group[i]: cluster for i, cluster in zip(permutation, ids)}
    assert by_answer[r"\{1,2\}"] == by_answer[r"\{2,1\}"] != by_answer["(1,2)"]


# --- the time bound of a group -----------------------------------------------------------------


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


def test_a_spare_idle_past_the_start_up_limit_is_still_used():
    # The spare started long ago has its "ready" message waiting; promoting it after a time-out
    # must read that message, not call the worker dead for having started too long ago.
    from ttrl_jax import verifier

    spare = verifier._VERIFIER._spare
    assert spare is not None and spare.conn.poll(verifier.WORKER_STARTUP_TIMEOUT_S)
    spare.started -= 2 * verifier.WORKER_STARTUP_TIMEOUT_S
    ids, gold_id = cluster_answers(["(10^{7}+11)!", "0.5"], gold="1/2", timeout_s=0.5)
    assert ids[1] == gold_id != ids[0]  # the hanging answer's kill promoted the old spare
    assert cluster_answers([r"\frac12", "0.5"]) == ([0, 0], -1)
