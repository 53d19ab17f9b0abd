"""Label-free signals: what a run can tell about itself from its own samples, without gold.

Every train step measures them on the responses it voted with, every evaluation on its k
samples of every prompt. Each is a mean over prompts of a per-prompt value; `Tracker` adds the
ones that compare a prompt with an earlier visit of it. None reads a gold label. What each means,
and which way is bad, is the table SIGNALS (also in the README); which of them track accuracy is
measured, not assumed (README, "Knowing without labels").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ttrl_jax import grpo


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
    "length_drift": Signal(
        "response length relative to the base model's, minus 1",
        "far from 0: the responses changed form (shortcut answers, or rambling)",
    ),
}


@dataclasses.dataclass(frozen=True)
class Votes:
    """One sampling of some prompts of a task, as the vote sees it (host arrays)."""

    prompt_index_P: np.ndarray  # int; each prompt's index in its task
    answer_id_PN: np.ndarray  # int32; grpo.NO_ANSWER, grpo.NOT_DRAWN or a cluster id
    labels_P: list[list[str]]  # the canonical answer of each cluster id, per prompt
    length_PN: np.ndarray  # response tokens
    entropy_PN: np.ndarray  # mean per-token entropy of each response

    def majority_labels(self) -> list[str | None]:
        """Each prompt's majority answer (ties to the first seen), None without an answer."""
        majority_P, _ = grpo.majority_vote(self.answer_id_PN)
        majority_P = np.asarray(majority_P)
        return [labels[m] if m >= 0 else None for labels, m in zip(self.labels_P, majority_P)]

    @staticmethod
    def concatenate(parts: Sequence[Votes]) -> Votes:
        """The prompts of several samplings with the same N, in order."""
        cat = lambda name: np.concatenate([getattr(v, name) for v in parts])
        return Votes(
            cat("prompt_index_P"), cat("answer_id_PN"), [x for v in parts for x in v.labels_P],
            cat("length_PN"), cat("entropy_PN"),
        )  # fmt: skip


def prompt_signals(votes: Votes) -> dict[str, np.ndarray]:
    """Per-prompt values of the signals that need no earlier visit."""
    answer_PN = np.asarray(votes.answer_id_PN)
    P, N = answer_PN.shape
    drawn_PN = answer_PN != grpo.NOT_DRAWN
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


def summarize(votes: Votes) -> dict[str, float]:
    """The prompt means of `prompt_signals`."""
    return {k: float(v.mean()) for k, v in prompt_signals(votes).items()}


class Tracker:
    """The signals that compare a prompt with earlier visits: label churn (against the previous
    visit of the same kind: train step or evaluation), base agreement and length drift (against
    the evaluation before training). Its state goes into checkpoints, so a resumed run measures
    what the uninterrupted one did."""

    def __init__(self, state: dict[str, Any] | None = None):
        state = state or {}
        # prompt index (as a string: JSON keys) -> majority answer, per kind; None = no answer
        self.last: dict[str, dict[str, str | None]] = state.get("last", {"train": {}, "eval": {}})
        self.base: dict[str, str | None] = state.get("base", {})
        self.base_length: float | None = state.get("base_length")

    def state(self) -> dict[str, Any]:
        return {"last": self.last, "base": self.base, "base_length": self.base_length}

    def observe(self, votes: Votes, kind: str, is_base: bool = False) -> dict[str, float]:
        """Every signal of `votes` (kind "train" or "eval"); `is_base` marks the evaluation
        before training, which becomes the reference."""
        out = summarize(votes)
        keys = [str(int(i)) for i in votes.prompt_index_P]
        labels = votes.majority_labels()
        if is_base:
            self.base = dict(zip(keys, labels))
            self.base_length = out["response_length"]
        seen = self.last.setdefault(kind, {})
        before = [(seen[k], lab) for k, lab in zip(keys, labels) if k in seen]
        if before:
            out["label_churn"] = float(np.mean([a != b for a, b in before]))
        with_base = [(self.base[k], lab) for k, lab in zip(keys, labels) if self.base.get(k)]
        if with_base:
            out["base_agreement"] = float(np.mean([a == b for a, b in with_base]))
        if self.base_length:
            out["length_drift"] = out["response_length"] / self.base_length - 1.0
        seen.update(zip(keys, labels))
        return out
