"""run/baseline.py: the base model's vote, its responses per prompt set by the run's tokens."""

import jax
import pytest

from ttrl_jax.run import baseline


def test_the_vote_grows_in_rounds_until_it_has_spent_the_runs_tokens(fixed_generator):
    b = lambda x: f"so \\boxed{{{x}}}"
    gen = fixed_generator({0: [b(1), b(2)], 1: [b(3), b(3)]})  # every response is 5 tokens
    base = baseline.matched_vote(
        gen, None, [[0], [1]], ["1", "4"], jax.random.key(0), run_tokens=40, round_votes=2,
        batch_prompts=2, progress=False,
    )  # fmt: skip
    # Round one: 2 prompts x 2 responses x 5 tokens = 20; round two spends the other 20.
    assert (base.n_votes, base.tokens, gen.calls) == (4, 40, 2)
    # Prompt 0's vote is a tie, which goes to the first answer seen ("1", right); prompt 1's
    # "3" is wrong.
    assert base.metrics["base_maj@N/accuracy"] == pytest.approx(1 / 2)
    assert base.metrics["base_maj@N/majority_ratio"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert base.votes.answer_id_PN.shape == (2, 4)


def test_without_golds_only_the_label_free_signals(fixed_generator):
    gen = fixed_generator({0: ["\\boxed{1}"] * 3})
    base = baseline.matched_vote(
        gen, None, [[0]], [None], jax.random.key(0), run_tokens=15, round_votes=3,
        batch_prompts=1, progress=False,
    )  # fmt: skip
    assert base.n_votes == 3 and "base_maj@N/accuracy" not in base.metrics
    assert base.metrics["base_maj@N/majority_ratio"] == 1.0
