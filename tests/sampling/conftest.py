"""Shared by the sampling tests: the filtered distribution by its definition, a chi-square check."""

import numpy as np
import pytest
from scipy import stats


@pytest.fixture
def filtered_probs():
    """(logits_V, temperature, top_k, top_p, min_p) -> the probabilities the head must draw by."""
    return _filtered_probs


@pytest.fixture
def check_distribution():
    """(tokens, expected) -> asserts the tokens' counts fit `expected` (chi-square, p > 1e-3)."""
    return _check_distribution


def _filtered_probs(logits_V, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered distribution by its definition (transformers' order), in float64."""
    z = np.asarray(logits_V, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1:
        probs = np.where(keep, np.exp(z - z.max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]  # mass strictly ahead in sorted order
        keep[order[before >= top_p]] = False
    if min_p > 0:
        keep &= np.exp(z - z.max()) >= min_p
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


def _check_distribution(tokens, expected):
    support = np.flatnonzero(expected > 0)
    assert np.isin(tokens, support).all(), "sampled a token outside the kept set"
    counts = np.bincount(tokens, minlength=len(expected))[support]
    want = len(tokens) * expected[support]
    rare = want < 5  # pooled into one bin, as the chi-square approximation needs
    counts = np.append(counts[~rare], counts[rare].sum())
    want = np.append(want[~rare], want[rare].sum())
    if want[-1] == 0:
        counts, want = counts[:-1], want[:-1]
    assert stats.chisquare(counts, want).pvalue > 1e-3
