"""rl/vote.py: the majority vote against golden cases and upstream's Counter vote, under jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax.rl import advantages, rewards, vote


@pytest.mark.parametrize(
    ("ids", "majority", "ratio"),
    [
        ([0, 1, 1, 0], 0, 0.5),  # tie -> smallest id
        ([0, 1, 2, 1, 2, 3], 1, 2 / 6),  # tie between 1 and 2
        ([-1, -1, -1, -1], -1, 0.0),  # no answers
        ([2, 2, 2, 2], 2, 1.0),  # all agree
        ([0, 1, 2, 3], 0, 0.25),  # all differ
        ([-1, -1, -1, 0, 1, 1], 1, 2 / 6),  # no-answer most frequent, never wins
        ([-1, -1, 0, -1], 0, 0.25),
    ],
)
def test_majority_vote_golden(ids, majority, ratio):
    majority_P, ratio_P = vote.majority_vote(jnp.array([ids], jnp.int32))
    chex.assert_shape((majority_P, ratio_P), (1,))
    assert majority_P.dtype == jnp.int32 and ratio_P.dtype == jnp.float32
    assert int(majority_P[0]) == majority
    assert float(ratio_P[0]) == pytest.approx(ratio, abs=1e-7)


def test_majority_vote_matches_counter_reference(random_answer_ids, counter_vote):
    rng = np.random.default_rng(0)
    for num_n, clusters in ((8, 3), (16, 6), (64, 12)):
        ids = random_answer_ids(rng, 64, num_n, clusters, p_none=0.3)
        majority_P, ratio_P = jax.jit(vote.majority_vote)(jnp.asarray(ids))
        ref_majority, ref_ratio = counter_vote(ids)
        np.testing.assert_array_equal(np.asarray(majority_P), ref_majority)
        np.testing.assert_allclose(np.asarray(ratio_P), ref_ratio, rtol=0, atol=1e-7)


def test_vote_pipeline_under_jit(random_answer_ids):
    ids = jnp.asarray(random_answer_ids(np.random.default_rng(16), 4, 8))

    @jax.jit
    def pipeline(ids, key):
        majority, ratio = vote.majority_vote(ids)
        reward = rewards.vote_reward(ids, majority)
        index = advantages.select_responses(key, 4, 8, 4, True)
        return advantages.group_advantages(advantages.gather_responses(reward, index)), ratio

    adv, ratio = pipeline(ids, jax.random.key(0))
    chex.assert_shape(adv, (4, 4))
    chex.assert_shape(ratio, (4,))
    chex.assert_tree_all_finite(adv)
