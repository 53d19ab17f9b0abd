"""Host-side answer clustering: response texts -> per-prompt answer ids.

One prompt's N responses become `answer_id_N`: equivalent final answers share an id, ids are
0, 1, 2, ... in order of first appearance, -1 means no answer. The device-side majority vote
turns these ids into rewards.

Equivalence is decided in two tiers. Equal canonical strings (answers.py: spaces, `\\left`,
`\\dfrac`, units, leading zeros, "142.0") are equivalent without sympy. Distinct canonical forms
go to math-verify in a killable worker process (verifier.py), with a time limit per answer and
per group. The partition depends only on the multiset of answers, not on their order: the
equivalence is symmetric, and the distinct forms are clustered in a fixed order (shortest
first) before the ids are numbered by first appearance.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ttrl_jax.grading import verifier
from ttrl_jax.grading.answers import (
    ANSWER_MODES,
    canonical_answer,
    extract_answer,
    verifier_text,
)
from ttrl_jax.grading.verifier import DEFAULT_TIMEOUT_S

_INTEGER_RE = re.compile(r"-?\d+")


def _merge_equivalent(
    written: dict[str, list[str]], gold_canon: str | None, gold: str | None, timeout_s: float
) -> tuple[dict[str, str], str | None]:
    """Representative canonical form of each canonical form, and the gold's (None if unmatched)."""
    # `written` maps each distinct canonical form to the answers written that way.
    rep_of = {canon: canon for canon in written}
    gold_match = gold_canon if gold_canon in rep_of else None
    if gold_match is not None:
        gold = None  # an answer is written as the gold is: that answer's cluster is the gold's
    # Distinct integers are never equivalent: the common AIME/AMC case needs no sympy at all.
    canons = list(written) + ([] if gold is None else [gold_canon])
    if len(canons) < 2 or all(_INTEGER_RE.fullmatch(canon) for canon in canons):
        return rep_of, gold_match
    # math-verify reads each form as written (the shortest way it was written).
    text_of = {
        canon: min(map(verifier_text, forms), key=lambda t: (len(t), t))
        for canon, forms in written.items()
    }
    canon_of = {text: canon for canon, text in text_of.items()}
    gold_text = None if gold is None else verifier_text(gold)
    rep_text, gold_rep = verifier.cluster(list(canon_of), gold_text, timeout_s)
    rep_of = {canon: canon_of[rep_text[text]] for canon, text in text_of.items()}
    if gold_match is not None:
        return rep_of, rep_of[gold_match]
    return rep_of, None if gold_rep is None else canon_of[gold_rep]


def cluster_answers(
    answers: Sequence[str | None],
    gold: str | None = None,
    *,
    mode: str = "math",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[int], int]:
    """Clusters one prompt's extracted answers into ids.

    Args:
      answers: the N extracted answers of one prompt; None is no answer.
      gold: the reference answer, for metrics only (never for training); None if unknown.
      mode: "math" (string canonicalisation, then math-verify for distinct forms) or "choice"
        (letters compared as strings).
      timeout_s: wall-clock limit on math-verify work per distinct answer (parse plus
        comparisons with the clusters before it). An answer that hits it is equivalent only to
        identical canonical strings, in this call and later ones. The whole call spends at most
        timeout_s per distinct form sent to math-verify (the gold counts as one).

    Returns:
      (ids, gold_id): ids[i] is the cluster of answers[i], numbered 0, 1, 2, ... in order of
      first appearance, -1 for no answer (None, empty, or longer than MAX_ANSWER_CHARS). The
      partition depends only on the multiset of answers. gold_id is the id of the cluster
      equivalent to the gold, else an id no answer uses (the number of clusters), or -1 when
      gold is None.
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"cluster_answers: unknown mode {mode!r}; use one of {ANSWER_MODES}.")
    if not timeout_s > 0:
        raise ValueError(f"cluster_answers: timeout_s must be positive seconds, got {timeout_s}.")
    canons = [canonical_answer(a, mode) for a in answers]
    gold_canon = None if gold is None else canonical_answer(gold, mode)
    written: dict[str, list[str]] = {}
    for answer, canon in zip(answers, canons):
        if canon is not None:
            written.setdefault(canon, []).append(answer)
    if mode == "math":
        usable_gold = None if gold_canon is None else gold
        rep_of, gold_rep = _merge_equivalent(written, gold_canon, usable_gold, timeout_s)
    else:
        rep_of = {c: c for c in written}
        gold_rep = gold_canon if gold_canon in rep_of else None
    id_of: dict[str, int] = {}
    ids = [-1 if c is None else id_of.setdefault(rep_of[c], len(id_of)) for c in canons]
    if gold is None:
        return ids, -1
    return ids, len(id_of) if gold_rep is None else id_of[gold_rep]


def answer_ids(
    responses_PN: Sequence[Sequence[str]],
    golds_P: Sequence[str | None] | None = None,
    *,
    mode: str = "math",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Extracts and clusters the answers of P prompts x N responses.

    Args:
      responses_PN: decoded response texts, N per prompt.
      golds_P: reference answers for metrics (None entries, or None for all, when unknown).
      mode: "math" or "choice", see `extract_answer`.
      timeout_s: math-verify time limit per distinct answer, see `cluster_answers`.
      last_number_fallback: see `extract_answer`.

    Returns:
      answer_id_PN: int32 [P, N] cluster ids per prompt, -1 = no answer.
      gold_id_P: int32 [P] the gold's id in its prompt's numbering, -1 when unknown.
    """
    num_prompts = len(responses_PN)
    num_samples = len(responses_PN[0]) if num_prompts else 0
    if golds_P is None:
        golds_P = [None] * num_prompts
    if len(golds_P) != num_prompts:
        raise ValueError(
            f"answer_ids: {num_prompts} prompts of responses but {len(golds_P)} gold answers; "
            "pass one gold (or None) per prompt."
        )
    answer_id_PN = np.full((num_prompts, num_samples), -1, np.int32)
    gold_id_P = np.full((num_prompts,), -1, np.int32)
    for p, (responses_N, gold) in enumerate(zip(responses_PN, golds_P)):
        if len(responses_N) != num_samples:
            raise ValueError(
                f"answer_ids: prompt {p} has {len(responses_N)} responses, prompt 0 has "
                f"{num_samples}; every prompt needs the same number of samples N."
            )
        answers = [extract_answer(r, mode, last_number_fallback) for r in responses_N]
        ids, gold_id_P[p] = cluster_answers(answers, gold, mode=mode, timeout_s=timeout_s)
        answer_id_PN[p] = ids
    return answer_id_PN, gold_id_P


def cluster_labels(
    answers: Sequence[str | None], ids: Sequence[int], mode: str = "math"
) -> list[str]:
    """A name for each cluster of one prompt: the canonical form of its first answer, by id.

    Names compare answers across votes (a prompt's pseudo-label at two visits); two names that
    differ may still be equivalent forms math-verify would merge, which only canonicalisation
    catches here.
    """
    first: dict[int, int] = {}
    for n, a in enumerate(ids):
        first.setdefault(int(a), n)
    return [canonical_answer(answers[first[a]], mode) for a in range(max(first, default=-1) + 1)]
