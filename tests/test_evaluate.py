"""python -m ttrl_jax.evaluate: its arguments, and a run's sampled tokens for --match-run."""

import pytest

from ttrl_jax import evaluate


def test_a_runs_tokens_are_its_steps_and_its_evaluations_on_the_task():
    records = [
        {"step": 0, "eval": True, "eval/sample_tokens": 100, "eval_other/sample_tokens": 7},
        {"step": 1, "train": True, "sample_tokens": 40},
        {"step": 2, "train": True, "sample_tokens": 60},
        {"step": 2, "eval": True, "eval/sample_tokens": 90},
        {"step": 2, "baseline": True, "base_maj@N/tokens": 290},
    ]
    assert evaluate.run_tokens(records) == 100 + 40 + 60 + 90


def test_bad_arguments_name_the_fix(capsys):
    for argv, message in (
        (["--k", "0"], "--k: 0 must be >= 1"),
        (["--top-p", "1.5"], "1.5 must be in (0, 1]"),
        (["--match-tokens", "many"], "'many' is not a int"),
    ):
        with pytest.raises(SystemExit):
            evaluate.main(argv)
        assert message in capsys.readouterr().err
