"""Shared by the RL tests: random answer ids as grading produces them, upstream's vote."""

import collections

import numpy as np
import pytest


@pytest.fixture
def random_answer_ids():
    """(rng, P, N, clusters=4, p_none=0.2) -> answer ids [P, N] numbered by first appearance
    per row, as grading/clustering.py produces them, -1 for no answer."""
    return _random_answer_ids


@pytest.fixture
def counter_vote():
    """ids_PN -> (majority_P, ratio_P) by upstream TTRL's vote (the slow obvious reference)."""
    return _counter_vote


def _random_answer_ids(rng, num_p, num_n, num_clusters=4, p_none=0.2):
    """Answer ids numbered by first appearance per row, as grading/clustering.py produces them."""
    out = np.empty((num_p, num_n), np.int32)
    for p in range(num_p):
        labels = rng.integers(0, num_clusters, num_n)
        none = rng.random(num_n) < p_none
        first_seen = {}
        for n in range(num_n):
            if none[n]:
                out[p, n] = -1
            else:
                out[p, n] = first_seen.setdefault(labels[n], len(first_seen))
    return out


def _counter_vote(ids_PN):
    """Upstream TTRL's vote: Counter.most_common over the answers, no-answer excluded."""
    majority, ratio = [], []
    for row in ids_PN:
        counts = collections.Counter(int(a) for a in row if a >= 0)
        if not counts:
            majority.append(-1)
            ratio.append(0.0)
            continue
        answer, count = counts.most_common(1)[0]
        majority.append(answer)
        ratio.append(count / len(row))
    return np.array(majority), np.array(ratio, np.float32)
