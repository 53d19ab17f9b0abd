"""Label-free signals: per-prompt values against slow obvious versions, the tracker's memory."""

import collections
import math
from pathlib import Path

import numpy as np
import pytest

from ttrl_jax.rl import vote
from ttrl_jax.run import signals


def make_votes(answers_PN, index=None, length=None, entropy=None):
    """Votes from per-response answer strings (None = no answer, "-" = not drawn)."""
    P, N = len(answers_PN), len(answers_PN[0])
    ids = np.full((P, N), vote.NO_ANSWER, np.int32)
    labels = []
    for p, row in enumerate(answers_PN):
        names: list[str] = []
        for n, a in enumerate(row):
            if a == "-":
                ids[p, n] = vote.NOT_DRAWN
            elif a is not None:
                if a not in names:
                    names.append(a)
                ids[p, n] = names.index(a)
        labels.append(names)
    return signals.Votes(
        np.arange(P) if index is None else np.asarray(index),
        ids,
        labels,
        np.full((P, N), 10) if length is None else np.asarray(length),
        np.zeros((P, N)) if entropy is None else np.asarray(entropy),
    )


def naive_signals(row):
    """One prompt's signals the slow obvious way."""
    drawn = [a for a in row if a != "-"]
    answered = [a for a in drawn if a is not None]
    counts = collections.Counter(answered).most_common()
    top = counts[0][1] if counts else 0
    second = counts[1][1] if len(counts) > 1 else 0
    entropy = -sum(c / len(answered) * math.log(c / len(answered)) for _, c in counts)
    return {
        "majority_ratio": top / len(drawn),
        "vote_margin": (top - second) / len(drawn),
        "answer_entropy": entropy,
        "distinct_answers": len(counts),
        "answered": len(answered) / len(drawn),
    }


ROWS = [
    ["3", "3", "5", None, "3", "5"],
    ["7", "8", "9", "10", "11", "12"],
    [None, None, None, None, None, None],
    ["4", "4", "4", "4", "-", "-"],
    ["1", "2", "2", "1", "-", "-"],
]


def test_prompt_signals_match_a_naive_count():
    got = signals.prompt_signals(make_votes(ROWS))
    for p, row in enumerate(ROWS):
        for name, value in naive_signals(row).items():
            assert got[name][p] == pytest.approx(value), (p, name)


def test_response_means_skip_slots_not_drawn():
    length = [[10, 20, 30, 40], [5, 7, 99, 99]]
    entropy = [[0.5, 0.5, 1.0, 1.0], [0.2, 0.4, 9.0, 9.0]]
    votes = make_votes([["1", "1", "2", "2"], ["3", "3", "-", "-"]], length=length, entropy=entropy)
    got = signals.prompt_signals(votes)
    np.testing.assert_allclose(got["response_length"], [25.0, 6.0])
    np.testing.assert_allclose(got["response_entropy"], [0.75, 0.3])


def test_majority_labels_follow_the_vote_ties_to_first_seen():
    votes = make_votes([["5", "6", "6", "5"], [None, None, None, None], ["2", "9", "9", "1"]])
    assert votes.majority_labels() == ["5", None, "9"]


def test_tracker_churn_base_agreement_and_drift():
    tracker = signals.Tracker()
    base = make_votes([["1", "1", "2"], ["5", "6", "6"], [None, None, None]], index=[0, 1, 2])
    first = tracker.observe(base, "eval", is_base=True)
    assert first["base_agreement"] == 1.0  # prompts 0 and 1: the base has an answer
    assert "label_churn" not in first and first["length_drift"] == 0.0
    # Against its own vote, each base response is scored by the others': prompt 0's two "1"s
    # face a tie (1/2 each) and its "2" a vote for "1"; prompt 1 alike; prompt 2 has none.
    assert first["base_vote_share"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert first["base_collision"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)  # 2 of 6 pairs
    later = make_votes(
        [["1", "1", "1"], ["5", "5", "6"], ["4", "4", "4"]],
        index=[0, 1, 2],
        length=np.full((3, 3), 15),
    )
    got = tracker.observe(later, "eval")
    assert got["base_agreement"] == pytest.approx(1 / 2)  # prompt 1 moved from 6 to 5
    assert got["label_churn"] == pytest.approx(2 / 3)  # prompts 1 and 2 changed label
    assert got["length_drift"] == pytest.approx(0.5)
    # The base vote as the label: prompt 0 all "1" (its base majority), prompt 1 a third "6",
    # prompt 2 none (the base model left it unanswered).
    assert got["base_vote_share"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    # Chance of the same answer as a base response: 1 * 2/3, and 2/3 * 1/3 + 1/3 * 2/3, and 0.
    assert got["base_collision"] == pytest.approx((2 / 3 + 4 / 9 + 0) / 3)
    # Train visits compare with earlier train visits of the same prompt only.
    train = tracker.observe(make_votes([["5", "5", "5"]], index=[1]), "train")
    assert "label_churn" not in train
    again = tracker.observe(make_votes([["6", "6", "5"]], index=[1]), "train")
    assert again["label_churn"] == 1.0


def slow_leave_one_out(answers):
    """One prompt's answers (None = no answer): each response against the others' vote, the
    tied leaders sharing its point; the same answer for two different responses."""
    share = collision = 0.0
    for i, a in enumerate(answers):
        others = collections.Counter(b for j, b in enumerate(answers) if j != i and b is not None)
        top = max(others.values(), default=0)
        leaders = [b for b, c in others.items() if c == top]
        if a is not None and top and a in leaders:
            share += 1 / len(leaders)
        same = sum(1 for j, b in enumerate(answers) if j != i and a is not None and b == a)
        collision += same / (len(answers) - 1)
    return share / len(answers), collision / len(answers)


def test_question_numbers_as_vote_labels_name_them():
    numbers = signals.question_numbers("Ann has 12 pens, 3.50 dollars and 1,000 beads; x - 4?")
    assert numbers == {"12", "3.5", "1000", "4"}
    assert signals.question_numbers("How many?") == frozenset()


def test_echo_against_a_naive_count():
    rows = [
        ["3", "5", "5", None],
        ["7", "8", "-", "-"],
        [None, None, None, None],
        ["1", "2", "2", "9"],
    ]
    numbers = {0: frozenset({"5"}), 1: frozenset({"9"}), 2: frozenset({"3"}), 3: frozenset()}
    votes = make_votes(rows)
    expected = np.mean([2 / 3, 0 / 2])  # prompt 2 has no answer, prompt 3 no number
    assert signals.echo(votes, numbers) == pytest.approx(expected)
    assert signals.echo(votes, {}) is None
    tracker = signals.Tracker(numbers={0: frozenset({"3"})})
    assert tracker.observe(votes, "eval", is_base=True)["echo"] == pytest.approx(1 / 3)
    assert "echo" not in signals.Tracker().observe(votes, "eval", is_base=True)


def test_leave_one_out_against_the_slow_version():
    rng = np.random.default_rng(0)
    rows = [[rng.choice(["1", "2", "3", None]) for _ in range(7)] for _ in range(40)]
    rows += [["4"] * 7, [None] * 7, ["1", "2", "3", "4", "5", "6", "7"]]
    got = signals.leave_one_out(make_votes(rows))
    want = np.array([slow_leave_one_out(r) for r in rows])
    np.testing.assert_allclose(got["base_vote_share"], want[:, 0], atol=1e-12)
    np.testing.assert_allclose(got["base_collision"], want[:, 1], atol=1e-12)
    # An unbiased guess of a fresh draw's agreement: never above the in-sample majority share.
    assert np.all(
        got["base_vote_share"] <= signals.prompt_signals(make_votes(rows))["majority_ratio"]
    )


def test_tracker_state_round_trips_through_json():
    import json

    tracker = signals.Tracker()
    tracker.observe(make_votes([["1", "1"], ["2", "3"]]), "eval", is_base=True)
    restored = signals.Tracker(json.loads(json.dumps(tracker.state())))
    votes = make_votes([["1", "2"], ["3", "3"]])
    assert restored.observe(votes, "eval") == tracker.observe(votes, "eval")


def naive_spearman(x, y):
    n = len(x)
    rx = np.argsort(np.argsort(x))
    ry = np.argsort(np.argsort(y))
    return 1 - 6 * ((rx - ry) ** 2).sum() / (n * (n * n - 1))


def test_spearman_equals_the_textbook_formula_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=9), rng.normal(size=9)
        assert signals.spearman(x, y) == pytest.approx(naive_spearman(x, y))


def test_spearman_with_ties_and_degenerate_input():
    # Ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3]; of y [0, 1, 2, 3] itself.
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
    assert signals.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(expected)
    assert math.isnan(signals.spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(signals.spearman([1, 2], [1, 2]))


def test_gold_correlations_per_run_and_pooled():
    def run(avgs, ratios):
        return [
            {"step": i, "eval": True, "eval/avg@16": a, "eval/majority_ratio": m}
            for i, (a, m) in enumerate(zip(avgs, ratios))
        ]

    runs = {"up": run([0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6]),
            "down": run([0.5, 0.4, 0.3, 0.2], [0.3, 0.4, 0.5, 0.6])}  # fmt: skip
    got = signals.gold_correlations(runs)
    assert got["majority_ratio"]["up"] == pytest.approx(1.0)
    assert got["majority_ratio"]["down"] == pytest.approx(-1.0)
    assert abs(got["majority_ratio"]["pooled"]) < 1e-9  # changes cancel between the runs
    assert math.isnan(got["vote_margin"]["up"])  # not logged


def test_readme_documents_every_signal():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Knowing without labels") :]
    for name, signal in signals.SIGNALS.items():
        assert f"| `{name}` | {signal.meaning} | {signal.bad} |" in section, name
