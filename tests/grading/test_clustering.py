"""grading/clustering.py: equal answers share an id, in any order; answer_ids of P x N responses."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ttrl_jax.grading import clustering
from ttrl_jax.grading.answers import extract_answer
from ttrl_jax.grading.clustering import answer_ids, cluster_answers

# The benchmark files live in shared/ beside the checkout; tests skip when they are absent.
DATA_DIR = next(
    (
        p
        for p in (
            Path(__file__).resolve().parents[3] / "shared/data/ttrl",
            Path("/work/shared/data/ttrl"),
        )
        if p.is_dir()
    ),
    Path("/work/shared/data/ttrl"),
)


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
