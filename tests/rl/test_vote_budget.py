"""The adaptive vote's stopping rules and round plans on hand-made vote sequences."""

import functools
import itertools

import numpy as np
import pytest

from ttrl_jax.rl import vote
from ttrl_jax.rl import vote_budget as vb

ND = vote.NOT_DRAWN


def ids(*rows, n_max):
    """Answer-id rows (drawn prefixes) padded with NOT_DRAWN to n_max slots."""
    out = np.full((len(rows), n_max), ND, np.int32)
    for p, row in enumerate(rows):
        out[p, : len(row)] = row
    return out


def stop_point(sequence, budget):
    """How many votes of `sequence` (drawn one at a time) the rule draws before it settles."""
    for n in range(1, len(sequence) + 1):
        if vb.settled(ids(sequence[:n], n_max=budget.n_max), budget)[0]:
            return n
    raise AssertionError("never settled")


LEAD = vb.VoteBudget(rule="lead", n_max=16, n_min=1)
POSTERIOR = vb.VoteBudget(rule="posterior", n_max=16, n_min=1, error=0.05)
FIXED = vb.VoteBudget(rule="fixed", n_max=16, n_min=1)
SPLIT_5443 = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 0]  # ends 5 / 4 / 4 / 3


def test_a_settled_lead_stops():
    unanimous = [0] * 16
    # The lead rule needs the leader's count to reach the remaining budget (an answer not seen
    # yet could at best tie it, and a tie goes to the first seen); the posterior stops earlier.
    assert stop_point(unanimous, LEAD) == 8
    assert stop_point(unanimous, POSTERIOR) < 8
    assert stop_point(unanimous, FIXED) == 16
    # 8 to 1 with 7 to go: 1 could at best tie, and a tie goes to 0 (seen first).
    assert stop_point([0, 1] + [0] * 14, LEAD) == 9


def test_a_split_vote_runs_to_the_maximum():
    assert np.bincount(SPLIT_5443).tolist() == [5, 4, 4, 3]
    for budget in (LEAD, POSTERIOR, vb.VoteBudget("posterior", 16, 1, error=0.2)):
        assert stop_point(SPLIT_5443, budget) == 16


@pytest.mark.parametrize(
    "row, n_max, settled",
    [
        ([0, 0, 0, 1, 1], 6, True),  # 1 could tie 3-3 but 0 was seen first
        ([0, 1, 1, 1, 0], 6, False),  # 0 could tie 3-3 and wins it: seen first
        ([0, 0, 1, 1], 5, False),
        ([0, 1], 2, True),  # nothing remains: the tie goes to 0
        ([-1, -1, -1, 0, 0, 0], 8, True),  # no-answer is no competitor
        ([-1] * 7 + [0], 10, False),  # an answer not seen yet could reach 2 > 1
        ([0], 1, True),  # one answer, nothing remains
        ([0], 4, False),
        ([-1] * 8, 16, False),  # no answer yet: settled only at the maximum
        ([-1] * 16, 16, True),
    ],
)
def test_lead_rule_ties_and_edge_cases(row, n_max, settled):
    assert vb.lead_settled(ids(row, n_max=n_max), n_max)[0] == settled


def test_all_no_answer_runs_to_the_maximum():
    assert stop_point([-1] * 16, LEAD) == 16
    assert stop_point([-1] * 16, POSTERIOR) == 16


def test_posterior_error_is_monotone_in_the_evidence():
    rng = np.random.default_rng(0)
    for _ in range(40):
        row = list(rng.choice([0, 0, 0, 1, 2, -1], size=rng.integers(1, 12)))
        row = _first_seen(row)
        base = vb.overturn_probability(ids(row, n_max=16), 16)[0]
        lead = int(vote.majority_vote(ids(row, n_max=16))[0][0])
        if lead < 0:
            continue
        more_lead = vb.overturn_probability(ids(row + [lead], n_max=16), 16)[0]
        assert more_lead <= base + 1e-12
        # The same number of votes, one going to a rival instead: at least as uncertain.
        for rival in {a for a in row if a >= 0 and a != lead} | {-1, max(row) + 1}:
            other = vb.overturn_probability(ids(row + [rival], n_max=16), 16)[0]
            assert other >= more_lead - 1e-12
    # Along a unanimous sequence the error falls strictly until the lead is safe.
    errors = [vb.overturn_probability(ids([0] * n, n_max=16), 16)[0] for n in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] == 0


def _first_seen(row):
    """Renumber answer ids in order of first appearance, as rewards.cluster_answers does."""
    order = {}
    return [-1 if a < 0 else order.setdefault(a, len(order)) for a in row]


@functools.cache
def _exact_change(counts, n_none, m, new_mass):
    """P(the final winner is not today's) under the Dirichlet-process urn, by enumerating every
    way the m remaining draws fall (new answers as clusters of their own): the slow reference."""

    def winner(c):
        return max(range(len(c)), key=lambda a: (c[a], -a)) if any(c) else -1

    def walk(c, none, m):
        if m == 0:
            return float(winner(c) != lead)
        total = sum(c) + none + new_mass
        p = sum(c[a] / total * walk(c[:a] + (c[a] + 1,) + c[a + 1 :], none, m - 1)
                for a in range(len(c)))  # fmt: skip
        p += none / total * walk(c, none + 1, m - 1)
        return p + new_mass / total * walk(c + (1,), none, m - 1)

    lead = winner(counts)
    return walk(counts, n_none, m)


@pytest.mark.parametrize(
    "row, n_max",
    [
        ([0, 0, 1], 6),
        ([0, 0, 0, 1], 7),
        ([0, 1, 0, -1, 0], 9),
        ([0, 1, 1, 0, 2], 9),
        ([0, 0, 0, 0, 0], 9),
        ([-1, -1, 0], 6),
    ],  # fmt: skip
)
def test_posterior_bound_against_exact_enumeration(row, n_max):
    counts = tuple(int(c) for c in np.bincount([a for a in row if a >= 0]))
    exact = _exact_change(counts, row.count(-1), n_max - len(row), 1.0)
    bound = vb.overturn_probability(ids(row, n_max=n_max), n_max)[0]
    assert exact <= bound + 1e-12
    # Not far above: the union over competitors and the pooling of unseen answers cost little.
    assert bound <= 1.7 * exact + 1e-3


def _winner(full):
    """The full budget's winner: the most frequent answer, ties to the first seen in slot
    order; None without an answer."""
    counts = {}
    for a in full:
        if a >= 0:
            counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -list(full).index(a))) if counts else None


def _exact_change_slots(row, new_mass=1.0):
    """P(the full budget's winner is not today's leader) under the Dirichlet-process urn, the
    open slots filled in slot order by the urn's successive draws (new answers numbered 100+):
    the slow reference for responses drawn out of slot order."""
    row = list(row)
    lead = int(vote.majority_vote(np.array([row]))[0][0])
    open_slots = [i for i, a in enumerate(row) if a == ND]

    def walk(full, k):
        if k == len(open_slots):
            return float(_winner(full) != lead)
        drawn = [a for a in full if a != ND]
        total = len(drawn) + new_mass
        p = 0.0
        for a in set(drawn):
            full[open_slots[k]] = a
            p += drawn.count(a) / total * walk(full, k + 1)
        full[open_slots[k]] = 100 + k
        p += new_mass / total * walk(full, k + 1)
        full[open_slots[k]] = ND
        return p

    return walk(row, 0)


@pytest.mark.parametrize("seed", range(3))
def test_rules_on_slots_drawn_out_of_order(seed):
    # Responses drawn in a draw order that is not slot order (the trained ones first): a tie
    # goes to the first seen in *slot* order, so an undrawn slot before the leader's first
    # could hold the tie's winner. For every way the undrawn slots can fall (answers drawn
    # already, one not seen yet, no answer) the lead rule settles only if the winner is the
    # same in all of them, and the posterior's bound holds against the urn's exact chance.
    rng = np.random.default_rng(seed)
    n_max = 6
    for _ in range(40):
        drawn_slots = rng.choice(n_max, size=int(rng.integers(2, n_max)), replace=False)
        row = np.full(n_max, ND)
        row[drawn_slots] = rng.choice([0, 0, 1, 2, -1], size=len(drawn_slots))
        order = {}
        row = np.array([a if a < 0 else order.setdefault(a, len(order)) for a in row])
        lead = int(vote.majority_vote(row[None])[0][0])
        if lead < 0:
            continue
        open_slots = np.flatnonzero(row == ND)
        choices = [*sorted(order.values()), 99, -1]  # drawn answers, a new one, no answer
        outcomes = set()
        for fill in itertools.product(choices, repeat=len(open_slots)):
            full = row.copy()
            full[open_slots] = fill
            outcomes.add(_winner(full))
        if vb.lead_settled(row[None], n_max)[0]:
            assert outcomes == {lead}, row.tolist()
        bound = vb.overturn_probability(row[None], n_max)[0]
        assert _exact_change_slots(row) <= bound + 1e-12, row.tolist()


def test_a_tie_can_go_to_an_undrawn_slot():
    # 0 leads 3 to 1 with two responses to go; 1 can at best tie 3-3. Drawn in order, 0 was
    # seen first and keeps the tie: settled. With slot 0 open, 1 may turn up there and take
    # the tie: not settled.
    assert vb.lead_settled(np.array([[0, 0, 1, 0, ND, ND]]), 6)[0]
    assert not vb.lead_settled(np.array([[ND, 0, 0, 1, 0, ND]]), 6)[0]
    # The same for an answer not seen yet reaching the leader's 2.
    assert vb.lead_settled(np.array([[0, 0, ND, ND]]), 4)[0]
    assert not vb.lead_settled(np.array([[ND, 0, 0, ND]]), 4)[0]
    # No tie is possible (1 reaches 2 < 3): settled whatever the order.
    assert vb.lead_settled(np.array([[ND, 0, 0, 0, 1]]), 5)[0]
    # The posterior charges the open slot's tie too.
    assert (
        vb.overturn_probability(np.array([[ND, 0, 0, ND]]), 4)[0]
        > vb.overturn_probability(np.array([[0, 0, ND, ND]]), 4)[0]
    )


def test_posterior_settles_wherever_the_lead_rule_does():
    rng = np.random.default_rng(1)
    rows = [_first_seen(list(rng.choice([0, 0, 0, 0, 1, -1], size=rng.integers(1, 16))))
            for _ in range(200)]  # fmt: skip
    batch = np.concatenate([ids(r, n_max=16) for r in rows])
    lead = vb.lead_settled(batch, 16)
    error = vb.overturn_probability(batch, 16)
    assert lead.any() and (error[lead] == 0).all()
    assert (vb.settled(batch, POSTERIOR) >= lead).all()
    assert vb.settled(batch, POSTERIOR).sum() > lead.sum()


def test_the_vote_of_a_drawn_prefix_is_the_prefix_vote():
    # Slots past a prompt's draws (NOT_DRAWN) change neither its winner nor its ratio.
    rng = np.random.default_rng(2)
    for n in rng.integers(1, 13, 50):
        row = _first_seen(list(rng.integers(-1, 4, n)))
        padded = vote.majority_vote(ids(row, n_max=12))
        alone = vote.majority_vote(np.asarray([row]))
        assert int(padded[0][0]) == int(alone[0][0])
        assert float(padded[1][0]) == pytest.approx(float(alone[1][0]))


# ----------------------------------------------------------------------------- rounds


def test_draw_order_puts_the_trained_slots_first():
    order = vb.draw_order(np.array([[1, 5, 6], [0, 1, 2]]), 8)
    np.testing.assert_array_equal(order, [[1, 5, 6, 0, 2, 3, 4, 7], list(range(8))])


def test_first_round():
    plan = vb.first_round(np.tile(np.arange(6), (3, 1)), 4)
    np.testing.assert_array_equal(plan.group_prompt_U, [0, 1, 2])
    np.testing.assert_array_equal(plan.sample_index_UN, np.tile(np.arange(4), (3, 1)))
    assert plan.live_rows == 12
    plan = vb.first_round(vb.draw_order(np.array([[3, 5], [0, 4]]), 6), 3)
    np.testing.assert_array_equal(plan.sample_index_UN, [[3, 5, 0], [0, 4, 1]])


def test_next_round_follows_the_draw_order():
    order = vb.draw_order(np.array([[3, 5], [0, 4]]), 8)  # [3 5 0 1 2 4 6 7], [0 4 1 2 3 5 6 7]
    plan = vb.next_round(np.array([3, 3]), np.array([False, True]), 8, 2, order_PN=order)
    np.testing.assert_array_equal(plan.group_prompt_U, [0])  # one group of 2 for 2 prompts
    np.testing.assert_array_equal(plan.sample_index_UN, [[1, 2]])
    plan = vb.next_round(np.array([3, 3]), np.array([True, False]), 8, 4, order_PN=order)
    np.testing.assert_array_equal(plan.group_prompt_U, [1])
    np.testing.assert_array_equal(plan.sample_index_UN, [[2, 3, 5, 6]])


def test_next_round_gives_freed_rows_to_unsettled_prompts():
    # 8 prompts over 2 shards; 8 drawn each of at most 16, groups of 4. Unsettled: 1 and 2
    # (shard 0), 6 (shard 1): the round has 4 groups (2 per shard, the smallest size that
    # holds a group per unsettled prompt); prompt 6's shard gives its spare group to 6 too.
    drawn = np.full(8, 8)
    settled = np.ones(8, bool)
    settled[[1, 2, 6]] = False
    plan = vb.next_round(drawn, settled, n_max=16, n_step=4, shards=2)
    np.testing.assert_array_equal(plan.group_prompt_U, [1, 2, 6, 6])
    np.testing.assert_array_equal(plan.sample_index_UN, [[8, 9, 10, 11]] * 2 + [
        [8, 9, 10, 11], [12, 13, 14, 15]])  # fmt: skip
    assert plan.live_UN.all()
    # Needs smaller than a group leave rows idle; past n_max nothing is drawn.
    plan = vb.next_round(np.array([14, 8, 16, 8]), np.zeros(4, bool), 16, n_step=4)
    assert len(plan.group_prompt_U) == 4  # three prompts need rows
    np.testing.assert_array_equal(plan.group_prompt_U, [0, 1, 3, 1])
    np.testing.assert_array_equal(plan.live_UN.sum(1), [2, 4, 4, 4])
    np.testing.assert_array_equal(plan.sample_index_UN[0, :2], [14, 15])
    np.testing.assert_array_equal(plan.sample_index_UN[3], [12, 13, 14, 15])
    assert vb.next_round(np.full(4, 8), np.ones(4, bool), 16, 4) is None
    assert vb.next_round(np.full(4, 16), np.zeros(4, bool), 16, 4) is None


def test_round_plans_cover_each_prompt_once_per_sample():
    # Whatever settles when, the rounds draw each sample index of a prompt at most once, in
    # order, and never past n_max; a group draws for a prompt of its own shard.
    rng = np.random.default_rng(3)
    for _ in range(20):
        P, shards, n_max, n_step = 8, int(rng.choice([1, 2, 4])), 16, int(rng.integers(1, 6))
        drawn = np.full(P, 4)
        seen = [list(range(4)) for _ in range(P)]
        settled = np.zeros(P, bool)
        while (plan := vb.next_round(drawn, settled, n_max, n_step, shards)) is not None:
            G = len(plan.group_prompt_U)
            assert G in vb.round_sizes(P, shards)
            home = np.arange(G) // (G // shards)
            assert (plan.group_prompt_U // (P // shards) == home).all()
            for g, j in zip(*np.nonzero(plan.live_UN)):
                seen[plan.group_prompt_U[g]].append(int(plan.sample_index_UN[g, j]))
            drawn = np.array([len(s) for s in seen])
            settled |= rng.random(P) < 0.3
        for s in seen:
            assert s == list(range(len(s))) and len(s) <= n_max


def test_label_agreement_across_numberings():
    # The adaptive prefix numbers answers as they first appear in it; the full draw too, but
    # over more responses (here it sees answer "b" first in the same slot, "c" only later).
    adaptive = ids([0, 1, 0], [0, 1, 1], [-1, -1], n_max=5)
    full = np.array([[0, 1, 0, 1, 1], [0, 1, 1, 2, 2], [-1, -1, 0, -1, -1]])
    majority = lambda x: np.asarray(vote.majority_vote(x)[0])
    agree = vb.label_agreement(adaptive, full, majority(adaptive), majority(full))
    np.testing.assert_array_equal(agree, [False, True, False])
    m = vb.audit_metrics(adaptive, np.array([0, 1, 0]), full, np.array([1, 1, 0]),
                         np.ones((3, 5), bool))  # fmt: skip
    assert m["audit/label_agreement"] == pytest.approx(1 / 3)
    assert m["audit/label_accuracy"] == pytest.approx(2 / 3)  # prompts 0 and 1
    assert m["audit/label_accuracy_full"] == pytest.approx(3 / 3)
    assert m["audit/same_responses"] == 1.0


def test_vote_budget_settings():
    assert not vb.VoteBudget("lead", n_max=16, n_min=16).adaptive
    assert not vb.VoteBudget("fixed", n_max=16, n_min=8).adaptive
    assert vb.VoteBudget("posterior", n_max=16, n_min=8).adaptive
    with pytest.raises(ValueError, match="unknown vote rule 'majority'"):
        vb.settled(ids([0], n_max=2), vb.VoteBudget("majority", 2, 1))
    assert set(vb.VOTE_RULES) == {"fixed", "lead", "posterior"}
