"""rl/advantages.py: response selection, group advantages, ETTRL reshaping, the prompt filter."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax.rl import advantages


def _ref_group_advantages(reward_PN, eps=1e-6):
    out = np.zeros_like(reward_PN, dtype=np.float64)
    for p, row in enumerate(reward_PN.astype(np.float64)):
        if len(set(row.tolist())) == 1:
            continue
        out[p] = (row - row.mean()) / (row.std(ddof=1) + eps)
    return out


def test_prompt_filter_mask():
    ratio = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(
        np.asarray(advantages.prompt_filter_mask(ratio, 0.5)), [0, 0, 1, 1, 1]
    )
    np.testing.assert_array_equal(np.asarray(advantages.prompt_filter_mask(ratio, 0.0)), [1] * 5)


def test_select_responses_first_k():
    index = advantages.select_responses(jax.random.key(0), 3, 8, 4, random_subset=False)
    chex.assert_shape(index, (3, 4))
    np.testing.assert_array_equal(np.asarray(index), np.tile(np.arange(4), (3, 1)))


def test_select_responses_random_subset():
    num_p, num_n, num_k = 4000, 8, 3
    index = np.asarray(advantages.select_responses(jax.random.key(7), num_p, num_n, num_k, True))
    assert index.shape == (num_p, num_k) and index.dtype == np.int32
    assert ((index >= 0) & (index < num_n)).all()
    assert (np.diff(index, axis=1) > 0).all()  # ascending, so without replacement
    # Uniform: each response is kept with probability K/N (std of the mean ~ 0.0077 here).
    keep_frequency = np.bincount(index.ravel(), minlength=num_n) / num_p
    np.testing.assert_allclose(keep_frequency, num_k / num_n, atol=0.04)
    # Rows are drawn independently, and the same key gives the same draw.
    assert len({tuple(row) for row in index[:200]}) > 30
    again = advantages.select_responses(jax.random.key(7), num_p, num_n, num_k, True)
    np.testing.assert_array_equal(np.asarray(again), index)
    other = advantages.select_responses(jax.random.key(8), num_p, num_n, num_k, True)
    assert not np.array_equal(np.asarray(other), index)


def test_select_responses_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_train"):
        advantages.select_responses(jax.random.key(0), 2, 4, 5, True)
    with pytest.raises(ValueError, match="num_train"):
        advantages.select_responses(jax.random.key(0), 2, 4, 0, False)


def test_gather_responses():
    rng = np.random.default_rng(3)
    x_PNR = rng.normal(size=(5, 8, 6)).astype(np.float32)
    index_PM = np.asarray(advantages.select_responses(jax.random.key(1), 5, 8, 3, True))
    got = advantages.gather_responses(jnp.asarray(x_PNR), jnp.asarray(index_PM))
    chex.assert_shape(got, (5, 3, 6))
    np.testing.assert_array_equal(np.asarray(got), x_PNR[np.arange(5)[:, None], index_PM])
    x_PN = x_PNR[..., 0]
    got = advantages.gather_responses(jnp.asarray(x_PN), jnp.asarray(index_PM))
    np.testing.assert_array_equal(np.asarray(got), x_PN[np.arange(5)[:, None], index_PM])


def test_group_advantages_matches_reference():
    rng = np.random.default_rng(4)
    reward = (rng.random((16, 8)) < 0.4).astype(np.float32)
    reward[:3] = rng.random((3, 8))  # soft rewards too
    got = jax.jit(advantages.group_advantages)(jnp.asarray(reward))
    chex.assert_shape(got, (16, 8))
    np.testing.assert_allclose(np.asarray(got), _ref_group_advantages(reward), rtol=1e-5, atol=1e-5)


def test_group_advantages_unbiased_std_golden():
    # rewards [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 -> (0.75 / 0.5, -0.25 / 0.5)
    got = advantages.group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    np.testing.assert_allclose(np.asarray(got), [[1.5, -0.5, -0.5, -0.5]], rtol=1e-6)
    unscaled = advantages.group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0]]), scale_by_std=False)
    np.testing.assert_allclose(np.asarray(unscaled), [[0.75, -0.25, -0.25, -0.25]], rtol=1e-6)


def test_group_advantages_zero_variance_is_exactly_zero():
    # 0.1 does not average back to exactly 0.1 in float32; the advantage must still be 0.
    reward = jnp.array([[1.0] * 6, [0.0] * 6, [0.1] * 6, [1 / 3] * 6])
    got = advantages.group_advantages(reward)
    assert (np.asarray(got) == 0.0).all()


def test_group_advantages_single_response_group():
    got = advantages.group_advantages(jnp.array([[1.0], [0.0]]))
    np.testing.assert_allclose(np.asarray(got), [[1 / (1 + 1e-6)], [0.0]], rtol=1e-7)


def test_ettrl_reshape():
    adv = jnp.array([[1.0, -1.0, 2.0, -2.0]])
    entropy = jnp.array([[0.5, 1.0, 1.5, 5.0]])  # mean 2.0
    got = advantages.ettrl_reshape(adv, entropy)
    # factors 1 + (2 - H) / 2 = 1.75, 1.5, 1.25, -0.5 -> clamped to 0
    np.testing.assert_allclose(np.asarray(got), [[1.75, -1.5, 2.5, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(advantages.ettrl_reshape(adv, entropy, alpha=0.0)), adv
    )
    # All-zero entropy (greedy decoding) leaves the advantage unchanged instead of NaN.
    zero = advantages.ettrl_reshape(adv, jnp.zeros_like(entropy))
    np.testing.assert_array_equal(np.asarray(zero), adv)

    rng = np.random.default_rng(5)
    adv = rng.normal(size=(8, 6)).astype(np.float32)
    entropy = rng.gamma(2.0, 0.5, size=(8, 6)).astype(np.float32)
    alpha = 0.7
    ref = np.empty_like(adv)
    for p in range(8):
        mean = entropy[p].mean()
        for n in range(6):
            ref[p, n] = adv[p, n] * max(0.0, 1 + alpha * (mean - entropy[p, n]) / mean)
    got = jax.jit(advantages.ettrl_reshape)(jnp.asarray(adv), jnp.asarray(entropy), alpha)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


def test_response_mean():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(advantages.response_mean(x, mask)), [1.5, 6.5, 0.0])
