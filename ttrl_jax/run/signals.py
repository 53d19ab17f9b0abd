"""Label-free signals: what a run can tell about itself from its own samples, without gold.

Every train step measures them on the responses it voted with, every evaluation on its k
samples of every prompt. Each is a mean over prompts of a per-prompt value; `Tracker` adds the
ones that compare a prompt with an earlier visit of it. None reads a gold label. What each means,
and which way is bad, is the table SIGNALS (also in the README); which of them track accuracy is
measured, not assumed (README, "Knowing without labels").

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ttrl_jax.grading import answers as answers_lib
from ttrl_jax.rl import vote

# Numbers as a question writes them: 12, 3.5, 1,000 (not a sign: "x - 3" holds 3, not -3).
_NUMBER_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Signal:
    meaning: str
    bad: str  # which direction is bad, and why


SIGNALS: dict[str, Signal] = {
    "majority_ratio": Signal(
        "share of a prompt's responses that give its majority answer",
        "low: the vote is a guess. High is not good by itself: training on the vote raises it "
        "whether the vote is right or wrong",
    ),
    "vote_margin": Signal(
        "majority share minus the runner-up's share",
        "low: a coin flip between two answers decides the pseudo-label",
    ),
    "answer_entropy": Signal(
        "entropy (nats) of a prompt's answer distribution, over the responses with an answer",
        "falling to 0 on every prompt: the samples no longer explore (pass@n falls with it)",
    ),
    "distinct_answers": Signal(
        "number of different answers among a prompt's responses",
        "falling toward 1: diversity collapse; the pass@n proxy",
    ),
    "answered": Signal(
        "share of responses with an extractable final answer",
        "falling: the model stops answering in the asked-for form",
    ),
    "response_length": Signal(
        "mean response length in tokens", "either way, fast: see length_drift"
    ),
    "response_entropy": Signal(
        "mean per-token entropy of the responses (nats)",
        "toward 0: the policy has collapsed onto one way of writing",
    ),
    "label_churn": Signal(
        "share of prompts whose majority answer differs from the previous visit's",
        "high late in a run: the pseudo-labels never settle; 0 early: nothing is learned",
    ),
    "base_agreement": Signal(
        "share of prompts whose majority answer is the base model's majority answer (its "
        "evaluation before training)",
        "falling: the run is moving away from what the base model believed; right when the base "
        "vote was wrong, harmful when it was right",
    ),
    "base_vote_share": Signal(
        "share of responses that give the base model's majority answer: their accuracy with the "
        "base model's vote (its evaluation before training) standing in for the gold label (0 on "
        "a prompt the base model left unanswered); for the base evaluation itself, each response "
        "against the other responses' vote",
        "falling: the answers move away from the base model's consensus; it cannot see a gain "
        "beyond that consensus, only a loss of it",
    ),
    "base_collision": Signal(
        "chance that a response and a base-model response (its evaluation before training) give "
        "the same answer",
        "falling: the answers move to ones the base model rarely gave",
    ),
    "echo": Signal(
        "share of the answers that repeat a number written in the question (answered responses "
        "of prompts with a number in them)",
        "rising: the model learns to copy a number from the question instead of working the "
        "answer out, a shortcut the vote rewards when the base model already leans to it; "
        "run.max_echo_rise keeps the judge from keeping such a step",
    ),
    "length_drift": Signal(
        "response length relative to the base model's, minus 1",
        "far from 0: the responses changed form (shortcut answers, or rambling)",
    ),
}


@dataclasses.dataclass(frozen=True)
class Votes:
    """One sampling of some prompts of a task, as the vote sees it (host arrays)."""

    prompt_index_P: np.ndarray  # int; each prompt's index in its task
    answer_id_PN: np.ndarray  # int32; vote.NO_ANSWER, vote.NOT_DRAWN or a cluster id
    labels_P: list[list[str]]  # the canonical answer of each cluster id, per prompt
    length_PN: np.ndarray  # response tokens
    entropy_PN: np.ndarray  # mean per-token entropy of each response

    def majority_labels(self) -> list[str | None]:
        """Each prompt's majority answer (ties to the first seen), None without an answer."""
        majority_P, _ = vote.majority_vote(self.answer_id_PN)
        majority_P = np.asarray(majority_P)
        return [labels[m] if m >= 0 else None for labels, m in zip(self.labels_P, majority_P)]

    def answer_shares(self) -> list[dict[str, float]]:
        """Each prompt's answers and the share of its drawn responses that give each (no-answer
        responses count in the denominator only)."""
        out = []
        for labels, ids in zip(self.labels_P, np.asarray(self.answer_id_PN)):
            drawn = ids[ids != vote.NOT_DRAWN]
            counts = np.bincount(drawn[drawn >= 0], minlength=len(labels))
            out.append({a: c / max(len(drawn), 1) for a, c in zip(labels, counts) if c})
        return out

    @staticmethod
    def concatenate(parts: Sequence[Votes]) -> Votes:
        """The prompts of several samplings with the same N, in order."""
        cat = lambda name: np.concatenate([getattr(v, name) for v in parts])
        return Votes(
            cat("prompt_index_P"),
            cat("answer_id_PN"),
            [x for v in parts for x in v.labels_P],
            cat("length_PN"),
            cat("entropy_PN"),
        )


def prompt_signals(votes: Votes) -> dict[str, np.ndarray]:
    """Per-prompt values of the signals that need no earlier visit."""
    answer_PN = np.asarray(votes.answer_id_PN)
    P, N = answer_PN.shape
    drawn_PN = answer_PN != vote.NOT_DRAWN
    n_drawn_P = np.maximum(drawn_PN.sum(1), 1)
    count_PA = np.zeros((P, N), np.int64)
    p_idx, n_idx = np.nonzero(answer_PN >= 0)
    np.add.at(count_PA, (p_idx, answer_PN[p_idx, n_idx]), 1)
    top2_P2 = -np.sort(-count_PA, axis=1)[:, :2] if N > 1 else np.pad(count_PA, ((0, 0), (0, 1)))
    n_answered_P = count_PA.sum(1)
    share_PA = count_PA / np.maximum(n_answered_P, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy_P = -np.where(share_PA > 0, share_PA * np.log(share_PA), 0.0).sum(1)
    group_mean = lambda x_PN: np.where(drawn_PN, x_PN, 0).sum(1) / n_drawn_P
    return {
        "majority_ratio": top2_P2[:, 0] / n_drawn_P,
        "vote_margin": (top2_P2[:, 0] - top2_P2[:, 1]) / n_drawn_P,
        "answer_entropy": entropy_P,
        "distinct_answers": (count_PA > 0).sum(1).astype(np.float64),
        "answered": n_answered_P / n_drawn_P,
        "response_length": group_mean(np.asarray(votes.length_PN, np.float64)),
        "response_entropy": group_mean(np.asarray(votes.entropy_PN, np.float64)),
    }


def leave_one_out(votes: Votes) -> dict[str, np.ndarray]:
    """Per prompt, base_vote_share and base_collision of a sampling against itself, each
    response against the others: the share of responses that give the majority answer of the
    other responses (a tie for the majority counts as a share of one over the tied), and the
    chance that two different responses give the same answer. Unbiased estimates of what fresh
    samples of the same policy score against this sampling's vote and answers."""
    answer_PN = np.asarray(votes.answer_id_PN)
    P, N = answer_PN.shape
    n_drawn_P = (answer_PN != vote.NOT_DRAWN).sum(1)
    count_PA = np.zeros((P, N), np.int64)
    p_idx, n_idx = np.nonzero(answer_PN >= 0)
    np.add.at(count_PA, (p_idx, answer_PN[p_idx, n_idx]), 1)
    share_P, collision_P = np.zeros(P), np.zeros(P)
    for p in range(P):
        for a in np.nonzero(count_PA[p])[0]:  # every response with answer a, at once
            others_A = count_PA[p].copy()
            others_A[a] -= 1
            top = others_A.max()
            if top > 0 and others_A[a] == top:
                share_P[p] += count_PA[p, a] / (others_A == top).sum()
        pairs = n_drawn_P[p] * (n_drawn_P[p] - 1)
        if pairs:
            collision_P[p] = (count_PA[p] * (count_PA[p] - 1)).sum() / pairs
    share_P /= np.maximum(n_drawn_P, 1)
    return {"base_vote_share": share_P, "base_collision": collision_P}


def question_numbers(question: str) -> frozenset[str]:
    """The canonical forms (as vote labels name answers) of the numbers written in a question."""
    found = (answers_lib.canonical_answer(n) for n in _NUMBER_RE.findall(question))
    return frozenset(n for n in found if n is not None)


def echo(votes: Votes, numbers: Mapping[int, frozenset[str]]) -> float | None:
    """The `echo` signal: the mean over prompts with a number in the question and an answered
    response of the share of its answers that repeat one of them; None when no prompt counts."""
    shares = []
    for index, labels, ids in zip(votes.prompt_index_P, votes.labels_P, votes.answer_id_PN):
        written = numbers.get(int(index), frozenset())
        answered = [labels[a] for a in np.asarray(ids) if a >= 0]
        if written and answered:
            shares.append(np.mean([a in written for a in answered]))
    return float(np.mean(shares)) if shares else None


def summarize(votes: Votes) -> dict[str, float]:
    """The prompt means of `prompt_signals`."""
    return {k: float(v.mean()) for k, v in prompt_signals(votes).items()}


class Tracker:
    """The signals that compare a prompt with earlier visits: label churn (against the previous
    visit of the same kind: train step or evaluation), base agreement and length drift (against
    the evaluation before training), and `echo` for the prompts whose questions' numbers it is
    given (`numbers`: prompt index -> `question_numbers`). Its state goes into checkpoints, so a
    resumed run measures what the uninterrupted one did."""

    def __init__(
        self,
        state: dict[str, Any] | None = None,
        numbers: Mapping[int, frozenset[str]] | None = None,
    ):
        self.numbers = dict(numbers or {})
        state = state or {}
        # prompt index (as a string: JSON keys) -> majority answer, per kind; None = no answer
        self.last: dict[str, dict[str, str | None]] = state.get("last", {"train": {}, "eval": {}})
        self.base: dict[str, str | None] = state.get("base", {})
        # prompt index -> {answer: share of the base evaluation's responses}
        self.base_shares: dict[str, dict[str, float]] = state.get("base_shares", {})
        self.base_length: float | None = state.get("base_length")

    def state(self) -> dict[str, Any]:
        return {
            "last": self.last,
            "base": self.base,
            "base_shares": self.base_shares,
            "base_length": self.base_length,
        }

    def observe(self, votes: Votes, kind: str, is_base: bool = False) -> dict[str, float]:
        """Every signal of `votes` (kind "train" or "eval"); `is_base` marks the evaluation
        before training, which becomes the reference."""
        out = summarize(votes)
        keys = [str(int(i)) for i in votes.prompt_index_P]
        labels = votes.majority_labels()
        shares = votes.answer_shares()
        if is_base:
            self.base = dict(zip(keys, labels))
            self.base_shares = dict(zip(keys, shares))
            self.base_length = out["response_length"]
        seen = self.last.setdefault(kind, {})
        before = [(seen[k], lab) for k, lab in zip(keys, labels) if k in seen]
        if before:
            out["label_churn"] = float(np.mean([a != b for a, b in before]))
        with_base = [(self.base[k], lab) for k, lab in zip(keys, labels) if self.base.get(k)]
        if with_base:
            out["base_agreement"] = float(np.mean([a == b for a, b in with_base]))
        # Over every prompt the base evaluation saw; one it left unanswered counts 0.
        in_base = [(k, q) for k, q in zip(keys, shares) if k in self.base]
        if is_base:
            # The base's own responses chose its majority, so against it they agree more than
            # fresh samples of the same model would (the mode of 16 draws is the draws' best
            # fit): each response is scored against the other responses' vote instead.
            out.update({k: float(v.mean()) for k, v in leave_one_out(votes).items()})
        elif in_base:
            out["base_vote_share"] = float(
                np.mean([q.get(self.base[k], 0.0) if self.base[k] else 0.0 for k, q in in_base])
            )
            out["base_collision"] = float(
                np.mean(
                    [
                        sum(v * self.base_shares[k].get(a, 0.0) for a, v in q.items())
                        for k, q in in_base
                    ]
                )
            )
        echo_share = echo(votes, self.numbers)
        if echo_share is not None:
            out["echo"] = echo_share
        if self.base_length:
            out["length_drift"] = out["response_length"] / self.base_length - 1.0
        seen.update(zip(keys, labels))
        return out


# ----------------------------------------------------------------------------- which to watch


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties take their mean rank); nan for fewer than 3 points or a
    constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):  # ties: their mean rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def gold_correlations(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], gold: str = "avg@"
) -> dict[str, dict[str, float]]:
    """How well each signal tracks gold accuracy: per run, Spearman's rho between the signal
    and the gold metric over the run's evaluations; "pooled" over every run's evaluations
    after subtracting each run's base (step 0) values, so tasks of different difficulty
    compare as changes.

    Args:
      runs: name -> metrics.jsonl records of a run with gold labels.
      gold: the gold metric's key prefix after "eval/" (avg@k by default).

    Returns:
      signal -> {run name or "pooled": rho}.
    """
    out: dict[str, dict[str, float]] = {}
    pooled: dict[str, tuple[list[float], list[float]]] = {}
    for name, records in runs.items():
        evals = sorted((r for r in records if r.get("eval")), key=lambda r: r["step"])
        if not evals:
            continue
        target = next((k for k in evals[0] if k.startswith(f"eval/{gold}")), None)
        if target is None:
            continue
        ys = [r[target] for r in evals]
        for signal in SIGNALS:
            key = f"eval/{signal}"
            xs = [r.get(key, float("nan")) for r in evals]
            out.setdefault(signal, {})[name] = spearman(xs, ys)
            base_x = next((x for x in xs if np.isfinite(x)), float("nan"))
            px, py = pooled.setdefault(signal, ([], []))
            px += [x - base_x for x in xs]
            py += [y - ys[0] for y in ys]
    for signal, (xs, ys) in pooled.items():
        out[signal]["pooled"] = spearman(xs, ys)
    return out
