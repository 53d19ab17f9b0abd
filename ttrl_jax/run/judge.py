"""Label-free judgement of a run: a score for each evaluation, the step to keep, when to stop.

TTRL's users have no gold labels, so a run must tell from its own samples whether it helps.
`Judge` reads only the label-free signals of each evaluation (signals.py) and never a gold
label; the evaluation before training is the base model's.

The score is `base_vote_share`: the current samples' accuracy with the base model's majority
vote standing in for the gold label. The run's own majority ratio cannot serve: training on
the vote raises it whether the vote is right or wrong (it rose on every task measured, also
where TTRL made the model worse). The base model's vote is fixed before training, so the run
cannot inflate agreement with it; the score rises while TTRL sharpens the policy onto what
the base model already believed and falls when the policy drifts to answers the base model
did not favour, which on the tasks measured is where TTRL stops helping (README, "Knowing
without labels", has the measurements and where the score fails).

One failure the score cannot see: when the base model's vote already leans to a shortcut,
such as answering with a number copied from the question, TTRL sharpens the policy onto it and
the score rises while accuracy falls (measured on `addsub`: echo 0.42 -> 0.98 of the answers,
avg@16 0.22 -> 0.01). So an evaluation whose `echo` (signals.py) rose by more than
`max_echo_rise` above the base model's is not a candidate to keep and does not count as an
improvement. On the tasks measured echo rose by at most 0.03 (toy) or fell (apples: the base
model's copied answers were wrong ones that training removed) where TTRL helped; on addsub it
rose by 0.16 at step 15, one evaluation before accuracy started to fall, and kept rising.

The stop rule ("plateau"): end the run once `patience` evaluations in a row have not beaten
the best score by more than `min_gain`. The kept step is the best-scoring evaluation, the
earliest of those within `min_gain` of the best (fewer updates for the same score); the base
model is a candidate, so a run that never beats it keeps it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

from ttrl_jax.config.schema import GuardAction, StopRule

STOP_RULES: tuple[str, ...] = typing.get_args(StopRule)
SCORE = "base_vote_share"  # the signal the judge scores an evaluation by (signals.SIGNALS)


class Verdict(typing.NamedTuple):
    """The judge's reading after one evaluation."""

    step: int
    score: float
    best_step: int  # the step to keep so far (0 = the base model)
    excluded: str  # why this evaluation cannot be kept ("" when it can)
    stop: bool  # the stop rule ends the run here
    reason: str  # one line: why it stops, or "" when it goes on


class Judge:
    """Scores evaluations, names the step to keep, and stops a run whose score has stalled.

    Args:
      stop_rule: "off", or "plateau": stop after `patience` evaluations in a row without a
        score above the best so far by more than `min_gain`.
      patience: evaluations without improvement before the run stops.
      min_gain: how much a score must exceed the best to count as an improvement; scores within
        it of the best are ties, resolved to the earliest step.
      max_echo_rise: an evaluation whose `echo` signal exceeds the base model's by more than
        this is excluded (None: never).
      state: a `state()` from a checkpoint, to resume.
    """

    def __init__(
        self,
        stop_rule: str = "off",
        patience: int = 2,
        min_gain: float = 0.0,
        max_echo_rise: float | None = None,
        state: dict[str, Any] | None = None,
    ):
        if stop_rule not in STOP_RULES:
            raise ValueError(f"unknown stop rule {stop_rule!r}; choose one of {STOP_RULES}")
        self.stop_rule, self.patience, self.min_gain = stop_rule, patience, min_gain
        self.max_echo_rise = max_echo_rise
        state = state or {}
        self.scores = [(int(step), float(s)) for step, s in state.get("scores", [])]
        self.excluded: dict[int, str] = {int(k): v for k, v in state.get("excluded", {}).items()}
        self.base_echo: float | None = state.get("base_echo")
        self.stopped: str | None = state.get("stopped")

    def state(self) -> dict[str, Any]:
        return {
            "scores": [list(x) for x in self.scores], "stopped": self.stopped,
            "excluded": {str(k): v for k, v in self.excluded.items()}, "base_echo": self.base_echo,
        }  # fmt: skip

    def _candidates(self) -> list[tuple[int, float]]:
        return [(step, s) for step, s in self.scores if step not in self.excluded]

    @property
    def best_step(self) -> int | None:
        """The earliest candidate step whose score is within min_gain of the highest."""
        candidates = self._candidates()
        if not candidates:
            return None
        top = max(s for _, s in candidates)
        return next(step for step, s in candidates if s >= top - self.min_gain)

    def observe(self, step: int, signals: Mapping[str, float]) -> Verdict:
        """Scores the evaluation of `step` from its label-free signals; applies the stop rule."""
        if SCORE not in signals:
            raise ValueError(
                f"the evaluation of step {step} has no {SCORE} (it needs the base model's "
                "evaluation before training: eval.before_training=true)"
            )
        value = float(signals[SCORE])
        is_base = not self.scores or self.scores[0][0] == step
        self.scores = [x for x in self.scores if x[0] != step] + [(step, value)]
        self.excluded.pop(step, None)
        echo = signals.get("echo")
        if is_base:
            self.base_echo = None if echo is None else float(echo)
        elif self._echo_rose(echo):
            self.excluded[step] = (
                f"echo rose from the base model's {self.base_echo:.3f} to {echo:.3f} "
                f"(run.max_echo_rise={self.max_echo_rise}): answers copied from the question"
            )
        reason = self._plateau() if self.stop_rule == "plateau" else ""
        if reason:
            self.stopped = reason
        excluded = self.excluded.get(step, "")
        return Verdict(step, value, self.best_step, excluded, bool(reason), reason)

    def _echo_rose(self, echo: float | None) -> bool:
        if self.max_echo_rise is None or echo is None or self.base_echo is None:
            return False
        return echo > self.base_echo + self.max_echo_rise

    def stalled(self) -> int:
        """Evaluations since the last candidate that beat the best before it by more than
        min_gain (an excluded evaluation never does)."""
        best, since = -float("inf"), 0
        for step, s in self.scores:
            if step in self.excluded:
                since += 1
                continue
            since = 0 if s > best + self.min_gain else since + 1
            best = max(best, s)
        return since

    def _plateau(self) -> str:
        since = self.stalled()
        if since < self.patience:
            return ""
        (base_step, base), best = self.scores[0], self.best_step
        recent = [step for step, _ in self.scores[-since:]]
        n_excluded = sum(step in self.excluded for step in recent)
        why = f" ({n_excluded} excluded: echo rose)" if n_excluded else ""
        if best == base_step:
            return (
                f"no evaluation after training scored above the base model's {SCORE} "
                f"({base:.3f}) in {since} tries{why}: by its own signals TTRL does not help here"
            )
        return (
            f"{SCORE} has not risen above step {best}'s {dict(self.scores)[best]:.3f} in "
            f"{since} evaluations{why}"
        )


GUARD_ACTIONS: tuple[str, ...] = typing.get_args(GuardAction)


class CollapseGuard:
    """Acts when an evaluation's answers have collapsed: each prompt's answer entropy, averaged,
    below `fraction` of the base model's. The answers then no longer explore (pass@k falls), so
    further updates mostly sharpen wrong pseudo-labels too.

    Actions: "lr" halves the learning rate (down to 1/16 of the schedule's); "rollback" also
    returns the policy to the kept (best-scoring) checkpoint before it goes on.
    """

    def __init__(self, action: str = "off", fraction: float = 0.1, state: dict | None = None):
        if action not in GUARD_ACTIONS:
            raise ValueError(f"unknown collapse guard {action!r}; choose one of {GUARD_ACTIONS}")
        self.action, self.fraction = action, fraction
        state = state or {}
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.base_entropy: float | None = state.get("base_entropy")
        self.fired: list[int] = list(state.get("fired", []))

    def state(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale, "base_entropy": self.base_entropy, "fired": self.fired}

    def observe(self, step: int, signals: Mapping[str, float]) -> str:
        """The action to take after the evaluation of `step` ("" for none)."""
        entropy = float(signals["answer_entropy"])
        if step == 0 or self.base_entropy is None:
            self.base_entropy = self.base_entropy if step else entropy
            return ""
        if self.action == "off" or entropy >= self.fraction * self.base_entropy:
            return ""
        if self.lr_scale <= 1 / 16:
            return ""
        self.lr_scale /= 2
        self.fired.append(step)
        return self.action
