"""rl/rewards.py: each reward against a slow obvious version; every option varies within a group."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ttrl_jax.rl import advantages, rewards, vote


def _ref_evol(feature_PND, ids_PN, majority_P):
    """Loop version of the EVOL-RL reward manager's novelty reward (rewards.evol_novelty_reward)."""
    out = np.zeros(ids_PN.shape, np.float64)
    for p in range(ids_PN.shape[0]):
        ids, maj = ids_PN[p], majority_P[p]
        valid = [i for i in range(len(ids)) if ids[i] >= 0]
        correct = [i for i in valid if ids[i] == maj]
        wrong = [i for i in valid if ids[i] != maj]
        f = feature_PND[p].astype(np.float64)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
        sim = np.clip(f @ f.T, 0.0, 1.0)
        novelty = {}
        for i in valid:
            side = correct if i in correct else wrong
            group = [j for j in side if j != i]
            others = [j for j in valid if j != i]
            if group:
                avg = np.mean([sim[i, j] for j in group])
            elif others:
                avg = np.mean([sim[i, j] for j in others])
            else:
                avg = 0.5
            mx = max(sim[i, j] for j in others) if others else 0.5
            novelty[i] = 1.0 - 0.5 * avg - 0.5 * mx
        for side, low, alone in ((correct, 0.5, 1.0), (wrong, -1.0, -0.5)):
            if len(side) == 1:
                out[p, side[0]] = alone
            elif side:
                lo = min(novelty[i] for i in side)
                hi = max(novelty[i] for i in side)
                for i in side:
                    out[p, i] = low + 0.5 * (novelty[i] - lo) / (hi - lo) if hi > lo else low + 0.25
        for i in range(len(ids)):
            if ids[i] < 0:
                out[p, i] = -1.0
    return out


def test_vote_reward(random_answer_ids, counter_vote):
    ids = jnp.array([[0, 1, 0, -1], [-1, -1, -1, -1], [2, 2, 1, 0]], jnp.int32)
    majority_P, _ = vote.majority_vote(ids)
    reward = rewards.vote_reward(ids, majority_P)
    chex.assert_shape(reward, (3, 4))
    np.testing.assert_array_equal(np.asarray(reward), [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    rng = np.random.default_rng(1)
    ids = random_answer_ids(rng, 32, 16)
    ref_majority, _ = counter_vote(ids)
    ref = np.array([[float(a >= 0 and a == m) for a in row] for row, m in zip(ids, ref_majority)])
    reward = rewards.vote_reward(jnp.asarray(ids), jnp.asarray(ref_majority))
    np.testing.assert_array_equal(np.asarray(reward), ref)


def test_soft_frequency_reward(random_answer_ids):
    ids = jnp.array([[0, 0, 0, 1, 1, 2], [-1, -1, 0, -1, 0, 0]], jnp.int32)
    np.testing.assert_allclose(
        np.asarray(rewards.soft_frequency_reward(ids)),
        [[3 / 6, 3 / 6, 3 / 6, 2 / 6, 2 / 6, 1 / 6], [0, 0, 3 / 6, 0, 3 / 6, 3 / 6]],
        rtol=1e-6,
    )
    rng = np.random.default_rng(2)
    ids = random_answer_ids(rng, 32, 16)
    ref = np.array(
        [[(list(row).count(a) / len(row) if a >= 0 else 0.0) for a in row] for row in ids]
    )
    got = jax.jit(rewards.soft_frequency_reward)(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)


def test_token_self_certainty():
    rng = np.random.default_rng(6)
    logits = rng.normal(scale=3.0, size=(2, 5, 11)).astype(np.float32)
    got = jax.jit(rewards.token_self_certainty)(jnp.asarray(logits))
    chex.assert_shape(got, (2, 5))
    ref = np.empty((2, 5))
    for b in range(2):
        for t in range(5):
            z = logits[b, t].astype(np.float64)
            prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            v = len(z)
            ref[b, t] = sum((1 / v) * math.log((1 / v) / q) for q in prob)  # KL(U || p)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    assert (np.asarray(got) >= -1e-6).all()
    # Uniform distribution -> 0; a shift of the logits changes nothing.
    uniform = rewards.token_self_certainty(jnp.zeros((3, 7)))
    np.testing.assert_allclose(np.asarray(uniform), 0.0, atol=1e-6)
    shifted = rewards.token_self_certainty(jnp.asarray(logits) + 5.0)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(got), rtol=1e-5, atol=1e-5)


def test_evol_novelty_reward_matches_reference(random_answer_ids, counter_vote):
    rng = np.random.default_rng(7)
    num_p, num_n, num_e = 24, 8, 5
    ids = random_answer_ids(rng, num_p, num_n, num_clusters=3, p_none=0.25)
    ids[0] = -1  # no answers at all
    ids[1] = [-1] * (num_n - 1) + [0]  # a lone answered response
    ids[2] = 0  # everyone agrees
    ids[3] = [0, 0, 0, 1, -1, 0, 0, 0]  # a lone minority response
    feature = rng.normal(size=(num_p, num_n, num_e)).astype(np.float32)
    feature[4] = 1.0  # identical features -> ties on both sides
    majority, _ = counter_vote(ids)
    got = jax.jit(rewards.evol_novelty_reward)(
        jnp.asarray(feature), jnp.asarray(ids), jnp.asarray(majority, jnp.int32)
    )
    chex.assert_shape(got, (num_p, num_n))
    np.testing.assert_allclose(np.asarray(got), _ref_evol(feature, ids, majority), atol=1e-5)
    got = np.asarray(got)
    assert (got[0] == -1).all() and got[1, -1] == 1.0 and got[3, 3] == -0.5
    # The vote stays the anchor: every majority response outranks every other response.
    is_majority = ids == majority[:, None]
    for p in range(num_p):
        if is_majority[p].any() and (~is_majority[p]).any():
            assert got[p][is_majority[p]].min() > got[p][~is_majority[p]].max()


def test_every_reward_option_changes_the_advantage():
    """Each option must vary within a group; a group-constant term would be normalised away."""
    ids = jnp.array([[0, 0, 0, 1, 1, 2, 0, 1]], jnp.int32)
    majority, _ = vote.majority_vote(ids)
    base = advantages.group_advantages(rewards.vote_reward(ids, majority))
    soft = advantages.group_advantages(rewards.soft_frequency_reward(ids))
    assert not np.allclose(np.asarray(base), np.asarray(soft))
    feature = jax.random.normal(jax.random.key(0), (1, 8, 4))
    evol = advantages.group_advantages(rewards.evol_novelty_reward(feature, ids, majority))
    assert not np.allclose(np.asarray(base), np.asarray(evol))
    entropy = jnp.linspace(0.5, 1.5, 8)[None]
    reshaped = advantages.ettrl_reshape(base, entropy)
    assert not np.allclose(np.asarray(base), np.asarray(reshaped))
    logits = jax.random.normal(jax.random.key(1), (8, 3, 16)) * jnp.arange(1, 9)[:, None, None]
    certainty = advantages.response_mean(rewards.token_self_certainty(logits), jnp.ones((8, 3)))
    assert float(jnp.abs(advantages.group_advantages(certainty[None])).max()) > 0.5
