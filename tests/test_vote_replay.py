"""The vote replay: an adaptive rule run over a fixed-budget run's recorded votes."""

import json

import numpy as np

from ttrl_jax import vote_replay
from ttrl_jax.config import load as config_lib
from ttrl_jax.rl import vote_budget as vb

ND = vb.NOT_DRAWN


def write_run(path, steps, *overrides):
    """A run folder: its config (n_vote 4, n_train 2, the first two trained, unless overridden)
    and one train record per step of answer-id rows."""
    path.mkdir()
    base = ["sample.n_vote=4", "sample.n_train=2", "ttrl.select=first", "sample.n_vote_step=2"]
    config_lib.save_config(config_lib.load_config(None, [*base, *overrides]), path / "config.yaml")
    with open(path / "answers.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "kind": "eval", "prompts": []}) + "\n")
        for step, rows in enumerate(steps, 1):
            prompts = [{"index": i, "labels": [], "ids": ids} for i, ids in enumerate(rows)]
            f.write(json.dumps({"step": step, "kind": "train", "prompts": prompts}) + "\n")


def test_renumber_follows_the_drawn_slots():
    got = vote_replay.renumber(np.array([[ND, 3, -1, 1, 3, ND], [2, 2, ND, 0, 5, 0]]))
    np.testing.assert_array_equal(got, [[ND, 0, -1, 1, 0, ND], [0, 0, ND, 1, 2, 1]])


def test_replay_draws_what_the_rounds_draw(tmp_path, capsys):
    # Prompt 0 is unanimous: its first two (the trained ones) settle it under the lead rule.
    # Prompt 1 splits 1-1, then draws its last two. Prompt 2 is 0, 0 then 1, 1: the lead rule
    # stops at 2 (a 2-2 tie goes to the first seen) and agrees with the full vote.
    write_run(tmp_path / "run", [[[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]]] * 2)
    _, steps = vote_replay.replay_run(str(tmp_path / "run"), ["ttrl.vote_rule=lead"])
    assert [s["votes"] for s in steps] == [[2, 4, 2]] * 2
    assert all(all(s["agree"]) for s in steps)
    assert vote_replay.main([str(tmp_path / "run"), "--rule", "lead"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| run | lead | – | 2.67 | 33.3% | 6 of 6 |"


def test_replay_counts_labels_that_differ(tmp_path, capsys):
    # 0, 0 then 1, 1, 1, 1 of six: a loose posterior (error 0.5) stops at the trained two and
    # keeps 0, which the full budget's 4-2 for 1 overturns.
    write_run(tmp_path / "run", [[[0, 0, 1, 1, 1, 1]]], "sample.n_vote=6")
    assert vote_replay.main([str(tmp_path / "run"), "--error", "0.5", "0.01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| run | posterior | 0.5 | 2.00 | 66.7% | 0 of 1 |"
    assert out[3] == "| run | posterior | 0.01 | 6.00 | 0.0% | 1 of 1 |"


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    assert vote_replay.main([str(tmp_path / "missing")]) == 2
    assert "config.yaml not found: give the output folder of a run" in capsys.readouterr().err
    write_run(tmp_path / "adaptive", [[[0, 0, ND, ND]]], "ttrl.vote_rule=lead")
    assert vote_replay.main([str(tmp_path / "adaptive")]) == 2
    assert "replay needs a fixed-budget run" in capsys.readouterr().err
    write_run(tmp_path / "short", [[[0, 0, 1]]])
    assert vote_replay.main([str(tmp_path / "short")]) == 2
    assert "step 1 has prompts without all sample.n_vote=4 answers" in capsys.readouterr().err
