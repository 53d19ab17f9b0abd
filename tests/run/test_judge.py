"""The label-free judge: scores, the kept step, the plateau stop rule, the collapse guard."""

import json

import pytest

from ttrl_jax.run import judge


def feed(j, scores, start=0, every=3):
    """Observes evaluations at steps start, start + every, ... with the given scores."""
    return [
        j.observe(start + i * every, {judge.SCORE: s, "answer_entropy": 1.0})
        for i, s in enumerate(scores)
    ]


def test_plateau_stops_after_patience_and_keeps_the_best():
    j = judge.Judge("plateau", patience=2)
    verdicts = feed(j, [0.34, 0.32, 0.39, 0.45, 0.49, 0.47, 0.46, 0.50])
    stops = [v.step for v in verdicts if v.stop]
    assert stops[0] == 18  # 0.47 (15) and 0.46 (18) do not beat 0.49 (12)
    assert verdicts[6].best_step == 12
    assert "step 12" in verdicts[6].reason and "0.490" in verdicts[6].reason
    assert j.stopped == verdicts[6].reason


def test_a_run_that_never_beats_the_base_stops_and_keeps_it():
    j = judge.Judge("plateau", patience=2)
    verdicts = feed(j, [0.30, 0.28, 0.25])
    assert [v.stop for v in verdicts] == [False, False, True]
    assert verdicts[-1].best_step == 0
    assert "base model" in verdicts[-1].reason


def test_off_never_stops_but_still_names_the_best():
    j = judge.Judge("off")
    verdicts = feed(j, [0.3, 0.5, 0.2, 0.1, 0.1, 0.1])
    assert not any(v.stop for v in verdicts)
    assert j.best_step == 3 and j.stopped is None


def test_min_gain_makes_near_ties_go_to_the_earlier_step():
    j = judge.Judge("plateau", patience=3, min_gain=0.02)
    verdicts = feed(j, [0.3, 0.5, 0.51, 0.515, 0.505])
    assert j.best_step == 3  # 0.51 and 0.515 are within 0.02 of 0.515; step 3 is the earliest
    assert verdicts[-1].stop  # three evaluations without a gain above 0.02


def test_state_round_trips_and_resumes_the_same_decisions():
    j = judge.Judge("plateau", patience=2)
    feed(j, [0.3, 0.4])
    resumed = judge.Judge("plateau", patience=2, state=json.loads(json.dumps(j.state())))
    for step, s in ((6, 0.35), (9, 0.38)):
        a = j.observe(step, {judge.SCORE: s})
        b = resumed.observe(step, {judge.SCORE: s})
        assert a == b
    assert a.stop and resumed.stopped == j.stopped


def test_reobserving_a_step_replaces_its_score():
    j = judge.Judge()
    feed(j, [0.3, 0.4])
    j.observe(3, {judge.SCORE: 0.1})
    assert j.scores == [(0, 0.3), (3, 0.1)] and j.best_step == 0


def test_a_step_whose_answers_echo_the_question_is_never_kept():
    # The addsub failure: the score keeps rising while the answers turn into numbers copied
    # from the question; those evaluations are excluded and count as no gain.
    j = judge.Judge("plateau", patience=2, max_echo_rise=0.1)
    scores = [0.26, 0.29, 0.33, 0.39, 0.41, 0.42]
    echoes = [0.42, 0.47, 0.45, 0.58, 0.70, 0.88]
    verdicts = [
        j.observe(3 * i, {judge.SCORE: s, "echo": e})
        for i, (s, e) in enumerate(zip(scores, echoes))
    ]
    assert [bool(v.excluded) for v in verdicts] == [False, False, False, True, True, True]
    assert "0.420 to 0.580" in verdicts[3].excluded
    assert verdicts[4].stop and verdicts[4].best_step == 6 and "2 excluded" in verdicts[4].reason
    assert json.loads(json.dumps(j.state())) == j.state()
    resumed = judge.Judge("plateau", patience=2, max_echo_rise=0.1, state=j.state())
    assert resumed.best_step == 6 and resumed.excluded == j.excluded


def test_echo_is_ignored_when_off_or_unmeasured():
    for rise, echoes in ((None, [0.4, 0.9, 0.9]), (0.1, [None, 0.9, 0.9]), (0.1, [0.4, 0.5, 0.45])):
        j = judge.Judge(max_echo_rise=rise)
        for i, (s, e) in enumerate(zip([0.3, 0.4, 0.5], echoes)):
            j.observe(3 * i, {judge.SCORE: s} if e is None else {judge.SCORE: s, "echo": e})
        assert j.best_step == 6 and not j.excluded


def test_missing_base_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="eval.before_training"):
        judge.Judge().observe(3, {"majority_ratio": 0.5})


def test_unknown_rules_are_errors():
    with pytest.raises(ValueError, match="stop rule"):
        judge.Judge("sometimes")
    with pytest.raises(ValueError, match="collapse guard"):
        judge.CollapseGuard("panic")


def test_collapse_guard_halves_the_learning_rate_when_answers_collapse():
    g = judge.CollapseGuard("lr", fraction=0.1)
    assert g.observe(0, {"answer_entropy": 1.6}) == ""  # the base model's: the reference
    assert g.observe(3, {"answer_entropy": 0.5}) == ""
    assert g.observe(6, {"answer_entropy": 0.15}) == "lr" and g.lr_scale == 0.5
    assert g.observe(9, {"answer_entropy": 0.1}) == "lr" and g.lr_scale == 0.25
    for step in range(12, 30, 3):
        g.observe(step, {"answer_entropy": 0.0})
    assert g.lr_scale == 1 / 16 and g.fired == [6, 9, 12, 15]
    restored = judge.CollapseGuard("lr", 0.1, state=json.loads(json.dumps(g.state())))
    assert restored.state() == g.state()


def test_collapse_guard_off_only_watches():
    g = judge.CollapseGuard("off")
    g.observe(0, {"answer_entropy": 1.0})
    assert g.observe(3, {"answer_entropy": 0.0}) == "" and g.lr_scale == 1.0
