"""The adaptive vote budget: when a prompt's vote is settled, and what the next round draws.

Host numpy, pure functions of the answer ids. Slot n of a prompt holds its sample n (the
sampler's per-response random streams make it the response the fixed budget draws there);
`answer_id_PN` holds vote.NOT_DRAWN on the slots not drawn yet. A prompt's slots are drawn in
its draw order (`draw_order`): first the responses the update trains on, so that an adaptive
vote trains on exactly the fixed budget's responses, then the others in slot order. The
drawn slots need not be a prefix, and the rules below hold for any drawn subset.

Stopping rules, for a budget of at most `n_max` responses per prompt:
  - "fixed": never settled before `n_max` (the fixed budget).
  - "lead": settled when no way of drawing the remaining responses changes the winner: every
    other answer, even given all of them, stays behind the leader (or ties it and loses the
    tie-break, first seen in slot order, whatever the undrawn slots hold); an answer not seen
    yet counts as a competitor too.
  - "posterior": settled when the probability that the remaining responses change the winner
    is below `error`, under the posterior predictive of a Dirichlet process (a Pólya urn: the
    next response repeats a drawn answer, no-answer included, in proportion to its count, or is
    an answer not seen yet with weight `new_mass`). The probability is bounded above by the sum,
    over competitors, of the exact chance that this one competitor overtakes the leader (all
    answers not seen yet pooled into one competitor), so the true error is below `error` too.
Both rules see "no answer" as a category that absorbs draws but never wins; a prompt without
any answer yet is settled only at `n_max`. The vote, settled or not, is the full budget's
whenever its winner is: its responses, and so its rewards, are the full budget's.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import numpy as np
from scipy import special

from ttrl_jax.rl.vote import NOT_DRAWN, majority_vote

VoteRule = Literal["fixed", "lead", "posterior"]
VOTE_RULES: tuple[str, ...] = typing.get_args(VoteRule)


@dataclasses.dataclass(frozen=True)
class VoteBudget:
    """How many responses a prompt's vote may draw, and when it stops."""

    rule: VoteRule = "fixed"
    n_max: int = 64  # sample.n_vote
    n_min: int = 64  # first round per prompt (sample.n_vote_min)
    n_step: int = 16  # rows per group in later rounds (sample.n_vote_step)
    error: float = 0.02  # posterior: the largest accepted chance that the winner changes
    new_mass: float = 1.0  # posterior: weight of answers not seen yet
    audit: bool = False  # also draw the full budget and compare the two votes

    @property
    def adaptive(self) -> bool:
        return self.rule != "fixed" and self.n_min < self.n_max


# ----------------------------------------------------------------------------- tallies


def _tally(answer_id_N: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Counts per answer id (ids are first-seen order), responses drawn, no-answers drawn."""
    ids = np.asarray(answer_id_N)
    ids = ids[ids != NOT_DRAWN]
    answered = ids[ids >= 0]
    return np.bincount(answered).astype(np.int64), len(ids), int((ids < 0).sum())


def _ties(answer_id_N: np.ndarray, lead: int) -> tuple[np.ndarray, bool]:
    """Whether the leader surely wins a final tie against each drawn answer, and against an
    answer not seen yet. A tie goes to the answer first seen in slot order over the full
    draw; the leader's first slot may be preceded by a slot not drawn yet, which could hold
    any answer. Drawn in order (a prefix), this is "the leader was seen first"."""
    ids = np.asarray(answer_id_N)
    undrawn = np.flatnonzero(ids == NOT_DRAWN)
    first_open = int(undrawn[0]) if len(undrawn) else len(ids)
    first_seen = np.array([np.flatnonzero(ids == a)[0] for a in range(ids.max() + 1)])
    ahead = first_seen[lead] < first_open
    return ahead & (first_seen[lead] < first_seen), bool(ahead)


def votes_drawn(answer_id_PN: np.ndarray) -> np.ndarray:
    """Responses drawn per prompt."""
    return (np.asarray(answer_id_PN) != NOT_DRAWN).sum(-1)


# ----------------------------------------------------------------------------- rules


def lead_settled(answer_id_PN: np.ndarray, n_max: int) -> np.ndarray:
    """Whether no way of drawing the remaining n_max - n responses can change each winner."""
    out = []
    for ids in np.asarray(answer_id_PN):
        counts, n, _ = _tally(ids)
        remaining = n_max - n
        if remaining <= 0:
            out.append(True)
            continue
        if counts.sum() == 0:
            out.append(False)
            continue
        lead = int(np.argmax(counts))  # the first maximum: the first-seen among ties
        wins_tie, wins_tie_new = _ties(ids, lead)
        others = np.delete(np.arange(len(counts)), lead)
        reach = counts[others] + remaining  # each competitor given every remaining response
        beaten = (reach > counts[lead]) | ((reach == counts[lead]) & ~wins_tie[others])
        # An answer not seen yet: all the remaining responses at best.
        new_beats = remaining > counts[lead] or (remaining == counts[lead] and not wins_tie_new)
        out.append(not beaten.any() and not new_beats)
    return np.array(out, bool)


def _beta_binomial(sizes: np.ndarray, a: float, b: float) -> np.ndarray:
    """pmf [len(sizes), max n + 1] of BetaBinomial(n, a, b) for each n of `sizes`, over
    k = 0 .. max n (0 past n)."""
    k = np.arange(int(sizes.max()) + 1)[None, :]
    n = sizes[:, None].astype(np.float64)
    inside = k <= n
    if b == 0:  # every draw goes the a-way
        return (k == n).astype(np.float64)
    if a == 0:
        return (k == 0).astype(np.float64)
    kk = np.where(inside, k, 0)
    log = (
        special.gammaln(n + 1)
        - special.gammaln(kk + 1)
        - special.gammaln(n - kk + 1)
        + special.betaln(kk + a, n - kk + b)
        - special.betaln(a, b)
    )
    return np.where(inside, np.exp(log), 0.0)


def _overtake(c_lead: int, c_j: int, w_j: float, w_rest: float, m: int, first: bool) -> float:
    """Chance that competitor j (count c_j, urn weight w_j) ends ahead of the leader after m
    more draws, ties going to j when it was seen `first`; the rest of the urn weighs w_rest."""
    # s draws go to the pair {lead, j}; k of those to j (Pólya urn: both are beta-binomial).
    p_s = _beta_binomial(np.array([m]), c_lead + w_j, w_rest)[0]
    s = np.arange(m + 1)
    p_k_s = _beta_binomial(s, w_j, c_lead)
    k = np.arange(m + 1)[None, :]
    margin = (c_j + k) - (c_lead + s[:, None] - k)
    wins = (margin > 0) | ((margin == 0) & first)
    return float((p_s[:, None] * p_k_s * (wins & (k <= s[:, None]))).sum())


def overturn_probability(answer_id_PN: np.ndarray, n_max: int, new_mass: float = 1.0) -> np.ndarray:
    """Upper bound, per prompt, on the chance that the full budget's winner is not today's.

    See the module docstring: exact per competitor under the Pólya-urn predictive, summed over
    competitors (answers not seen yet pooled into one), capped at 1. 0 when nothing remains.
    """
    if not new_mass > 0:
        raise ValueError(f"new_mass={new_mass} must be > 0")
    out = []
    for ids in np.asarray(answer_id_PN):
        counts, n, n_none = _tally(ids)
        m = n_max - n
        if m <= 0:
            out.append(0.0)
            continue
        total = n + new_mass
        if counts.sum() == 0:
            # The winner changes unless every remaining response again gives no answer.
            stay = np.prod((n_none + np.arange(m)) / (total + np.arange(m)))
            out.append(float(1.0 - stay))
            continue
        lead = int(np.argmax(counts))
        c_lead = int(counts[lead])
        wins_tie, wins_tie_new = _ties(ids, lead)
        error = 0.0
        for j, c_j in enumerate(counts):
            if j == lead or c_j + m < c_lead:
                continue  # the leader itself, or a competitor that cannot catch up
            w_rest = total - c_lead - c_j
            error += _overtake(c_lead, int(c_j), float(c_j), w_rest, m, first=not wins_tie[j])
        if m > c_lead or (m == c_lead and not wins_tie_new):  # an answer not seen yet
            w_rest = total - c_lead - new_mass
            error += _overtake(c_lead, 0, new_mass, w_rest, m, first=not wins_tie_new)
        out.append(min(error, 1.0))
    return np.array(out, np.float64)


def settled(answer_id_PN: np.ndarray, budget: VoteBudget) -> np.ndarray:
    """Whether each prompt's vote stops drawing (always at the budget's maximum)."""
    done = votes_drawn(answer_id_PN) >= budget.n_max
    if budget.rule == "fixed":
        return done
    lead = lead_settled(answer_id_PN, budget.n_max)
    if budget.rule == "lead":
        return done | lead
    if budget.rule == "posterior":
        error = overturn_probability(answer_id_PN, budget.n_max, budget.new_mass)
        return done | lead | (error < budget.error)
    raise ValueError(f"unknown vote rule {budget.rule!r}; choose one of {VOTE_RULES}")


# ----------------------------------------------------------------------------- rounds


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """One round of U groups x n rows: group g draws for prompt group_prompt_U[g]."""

    group_prompt_U: np.ndarray  # int32
    sample_index_UN: np.ndarray  # int32: each row's sample index within its prompt
    live_UN: np.ndarray  # bool: False = an idle row (its response is discarded)

    @property
    def live_rows(self) -> int:
        return int(self.live_UN.sum())


def draw_order(train_index_PM: np.ndarray, n_max: int) -> np.ndarray:
    """Each prompt's slots in the order its vote draws them: the M slots the update trains on
    (ascending), then the others (ascending). [P, n_max] int32."""
    train = np.asarray(train_index_PM)
    chosen_PN = np.zeros((len(train), n_max), bool)
    np.put_along_axis(chosen_PN, train, True, axis=1)
    # A stable sort on "not chosen" keeps slot order within each part.
    return np.argsort(~chosen_PN, axis=1, kind="stable").astype(np.int32)


def slot_order(num_prompts: int, n_max: int) -> np.ndarray:
    """Every prompt's slots in slot order: the draw order without a trained subset first."""
    return np.broadcast_to(np.arange(n_max, dtype=np.int32), (num_prompts, n_max))


def first_round(order_PN: np.ndarray, n_min: int) -> RoundPlan:
    """The first n_min slots of every prompt's draw order, one group per prompt."""
    order_PN = np.asarray(order_PN, np.int32)
    P = len(order_PN)
    return RoundPlan(
        np.arange(P, dtype=np.int32), order_PN[:, :n_min].copy(), np.ones((P, n_min), bool)
    )


def round_sizes(num_prompts: int, shards: int = 1) -> tuple[int, ...]:
    """The group counts a later round may have: P/4, P/2 and P where they split over the data
    shards. Each is one compiled round program; smaller rounds would save little, as a decode
    step with few rows costs about what reading the weights costs (on TPU, and for small models
    on CPU), and would add compiles."""
    sizes = {g for g in (num_prompts // 4, num_prompts // 2) if g >= shards and g % shards == 0}
    return (*sorted(sizes), num_prompts)


def next_round(
    drawn_P: np.ndarray,
    settled_P: np.ndarray,
    n_max: int,
    n_step: int,
    shards: int = 1,
    order_PN: np.ndarray | None = None,
) -> RoundPlan | None:
    """The next round's groups for the unsettled prompts, or None when every vote is settled.

    The prompts and the round's U groups are split into `shards` equal blocks (the mesh's data
    axis): a group draws only for a prompt of its own block, whose prompt keys and values sit
    on the same devices. U is the smallest of `round_sizes` that gives every unsettled prompt
    one group; the slots left over go round-robin to the unsettled prompts still short of
    n_max (rows freed by settled prompts go to unsettled ones: a static round shape computes
    them anyway). A group's rows past its prompt's need, and unused groups, are idle. A prompt
    draws its slots in `order_PN` (`draw_order`; default slot order), drawn_P of them so far.
    """
    drawn_P, settled_P = np.asarray(drawn_P), np.asarray(settled_P)
    P = len(drawn_P)
    if order_PN is None:
        order_PN = slot_order(P, n_max)
    if P % shards:
        raise ValueError(f"{P} prompts must split over {shards} data shards")
    need_P = np.where(settled_P, 0, np.maximum(n_max - drawn_P, 0))
    if not need_P.any():
        return None
    prompts = P // shards
    busiest = max((need_P[d * prompts : (d + 1) * prompts] > 0).sum() for d in range(shards))
    groups = next(g for g in round_sizes(P, shards) if g // shards >= busiest)
    slots = groups // shards
    group_prompt = np.zeros(groups, np.int32)
    sample_index = np.zeros((groups, n_step), np.int32)
    live = np.zeros((groups, n_step), bool)
    next_P = drawn_P.astype(np.int64).copy()
    for d in range(shards):
        block = range(d * prompts, (d + 1) * prompts)
        g, end = d * slots, (d + 1) * slots
        group_prompt[g:end] = block.start  # idle groups read their block's first prompt
        while g < end and any(need_P[p] > 0 for p in block):
            for p in block:
                if need_P[p] <= 0 or g == end:
                    continue
                rows = min(n_step, int(need_P[p]))
                group_prompt[g] = p
                sample_index[g, :rows] = order_PN[p, next_P[p] : next_P[p] + rows]
                live[g, :rows] = True
                next_P[p] += rows
                need_P[p] -= rows
                g += 1
    return RoundPlan(group_prompt, sample_index, live)


# ----------------------------------------------------------------------------- audit


def label_agreement(
    adaptive_id_PN: np.ndarray,
    full_id_PN: np.ndarray,
    majority_P: np.ndarray,
    full_majority_P: np.ndarray,
) -> np.ndarray:
    """Whether each prompt's adaptive pseudo-label is the full budget's, across numberings.

    The adaptive ids number the drawn prefix, the full ids the whole draw; a label is carried
    over through the first response that gave it. Both "no answer" (-1) also agree.
    """
    out = []
    for ids, full, m, full_m in zip(adaptive_id_PN, full_id_PN, majority_P, full_majority_P):
        if m < 0:
            out.append(bool(full_m < 0))
            continue
        first = int(np.flatnonzero(np.asarray(ids) == m)[0])
        out.append(bool(full[first] == full_m))
    return np.array(out, bool)


def audit_metrics(
    adaptive_id_PN: np.ndarray,
    adaptive_gold_P: np.ndarray,
    full_id_PN: np.ndarray,
    full_gold_P: np.ndarray,
    same_PN: np.ndarray,
) -> dict[str, float]:
    """The adaptive vote against the fixed budget's vote over the same full draw.

    Args:
      adaptive_id_PN, adaptive_gold_P: the adaptive vote's ids (NOT_DRAWN past its draws).
      full_id_PN, full_gold_P: the full draw's ids.
      same_PN: whether each drawn adaptive response equals the full draw's in its slot.
    """
    adaptive, full = (np.asarray(majority_vote(ids)[0]) for ids in (adaptive_id_PN, full_id_PN))
    drawn_PN = np.asarray(adaptive_id_PN) != NOT_DRAWN
    out = {
        "audit/label_agreement": float(
            label_agreement(adaptive_id_PN, full_id_PN, adaptive, full).mean()
        ),
        "audit/same_responses": float(np.asarray(same_PN)[drawn_PN].mean()),
    }
    gold_P = np.asarray(full_gold_P) >= 0
    if gold_P.any():
        hit = adaptive == np.asarray(adaptive_gold_P)
        out["audit/label_accuracy"] = float(hit[gold_P].mean())
        out["audit/label_accuracy_full"] = float((full == np.asarray(full_gold_P))[gold_P].mean())
    return out
