"""Tests of ttrl_jax.grpo: golden cases, slow obvious references, jit behaviour."""

import collections
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax.rl import advantages, losses, rewards, vote


def _random_answer_ids(rng, num_p, num_n, num_clusters=4, p_none=0.2):
    """Answer ids numbered by first appearance per row, as rewards.py produces them."""
    out = np.empty((num_p, num_n), np.int32)
    for p in range(num_p):
        labels = rng.integers(0, num_clusters, num_n)
        none = rng.random(num_n) < p_none
        first_seen = {}
        for n in range(num_n):
            if none[n]:
                out[p, n] = -1
            else:
                out[p, n] = first_seen.setdefault(labels[n], len(first_seen))
    return out


# ----------------------------------------------------------------------------- references


def _ref_vote(ids_PN):
    """Upstream TTRL's vote: Counter.most_common over the answers, no-answer excluded."""
    majority, ratio = [], []
    for row in ids_PN:
        counts = collections.Counter(int(a) for a in row if a >= 0)
        if not counts:
            majority.append(-1)
            ratio.append(0.0)
            continue
        answer, count = counts.most_common(1)[0]
        majority.append(answer)
        ratio.append(count / len(row))
    return np.array(majority), np.array(ratio, np.float32)


def _ref_group_advantages(reward_PN, eps=1e-6):
    out = np.zeros_like(reward_PN, dtype=np.float64)
    for p, row in enumerate(reward_PN.astype(np.float64)):
        if len(set(row.tolist())) == 1:
            continue
        out[p] = (row - row.mean()) / (row.std(ddof=1) + eps)
    return out


def _ref_ppo(logp_new, logp_old, adv, clip_low, clip_high, dual_clip):
    loss = np.zeros_like(logp_new)
    clipped = np.zeros_like(logp_new)
    for b in range(logp_new.shape[0]):
        for t in range(logp_new.shape[1]):
            a = adv[b]
            r = math.exp(min(max(logp_new[b, t] - logp_old[b, t], -20.0), 20.0))
            r_clip = min(max(r, 1 - clip_low), 1 + clip_high)
            value = max(-a * r, -a * r_clip)
            clipped[b, t] = float(-a * r_clip > -a * r)
            if dual_clip is not None and a < 0:
                value = min(value, -a * dual_clip)
            loss[b, t] = value
    return loss, clipped


def _ref_evol(feature_PND, ids_PN, majority_P):
    """Loop version of the EVOL-RL reward manager's novelty reward (see grpo docstring)."""
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


# ----------------------------------------------------------------------------- vote


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


def test_majority_vote_matches_counter_reference():
    rng = np.random.default_rng(0)
    for num_n, clusters in ((8, 3), (16, 6), (64, 12)):
        ids = _random_answer_ids(rng, 64, num_n, clusters, p_none=0.3)
        majority_P, ratio_P = jax.jit(vote.majority_vote)(jnp.asarray(ids))
        ref_majority, ref_ratio = _ref_vote(ids)
        np.testing.assert_array_equal(np.asarray(majority_P), ref_majority)
        np.testing.assert_allclose(np.asarray(ratio_P), ref_ratio, rtol=0, atol=1e-7)


def test_vote_reward():
    ids = jnp.array([[0, 1, 0, -1], [-1, -1, -1, -1], [2, 2, 1, 0]], jnp.int32)
    majority_P, _ = vote.majority_vote(ids)
    reward = rewards.vote_reward(ids, majority_P)
    chex.assert_shape(reward, (3, 4))
    np.testing.assert_array_equal(np.asarray(reward), [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    rng = np.random.default_rng(1)
    ids = _random_answer_ids(rng, 32, 16)
    ref_majority, _ = _ref_vote(ids)
    ref = np.array([[float(a >= 0 and a == m) for a in row] for row, m in zip(ids, ref_majority)])
    reward = rewards.vote_reward(jnp.asarray(ids), jnp.asarray(ref_majority))
    np.testing.assert_array_equal(np.asarray(reward), ref)


def test_soft_frequency_reward():
    ids = jnp.array([[0, 0, 0, 1, 1, 2], [-1, -1, 0, -1, 0, 0]], jnp.int32)
    np.testing.assert_allclose(
        np.asarray(rewards.soft_frequency_reward(ids)),
        [[3 / 6, 3 / 6, 3 / 6, 2 / 6, 2 / 6, 1 / 6], [0, 0, 3 / 6, 0, 3 / 6, 3 / 6]],
        rtol=1e-6,
    )
    rng = np.random.default_rng(2)
    ids = _random_answer_ids(rng, 32, 16)
    ref = np.array(
        [[(list(row).count(a) / len(row) if a >= 0 else 0.0) for a in row] for row in ids]
    )
    got = jax.jit(rewards.soft_frequency_reward)(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)


def test_prompt_filter_mask():
    ratio = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(
        np.asarray(advantages.prompt_filter_mask(ratio, 0.5)), [0, 0, 1, 1, 1]
    )
    np.testing.assert_array_equal(np.asarray(advantages.prompt_filter_mask(ratio, 0.0)), [1] * 5)


# ----------------------------------------------------------------------------- selection


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


# ----------------------------------------------------------------------------- advantages


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


def test_evol_novelty_reward_matches_reference():
    rng = np.random.default_rng(7)
    num_p, num_n, num_e = 24, 8, 5
    ids = _random_answer_ids(rng, num_p, num_n, num_clusters=3, p_none=0.25)
    ids[0] = -1  # no answers at all
    ids[1] = [-1] * (num_n - 1) + [0]  # a lone answered response
    ids[2] = 0  # everyone agrees
    ids[3] = [0, 0, 0, 1, -1, 0, 0, 0]  # a lone minority response
    feature = rng.normal(size=(num_p, num_n, num_e)).astype(np.float32)
    feature[4] = 1.0  # identical features -> ties on both sides
    majority, _ = _ref_vote(ids)
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


# ----------------------------------------------------------------------------- losses


def test_masked_token_mean():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(losses.masked_token_mean(x, mask)) == pytest.approx(7 / 3)
    assert float(losses.masked_token_mean(x, jnp.zeros_like(mask))) == 0.0
    # Micro-batches divided by the whole mini-batch's token count add up to its mean.
    parts = [losses.masked_token_mean(x[i : i + 1], mask[i : i + 1], num_tokens=3) for i in (0, 1)]
    assert float(sum(parts)) == pytest.approx(7 / 3)


def test_ppo_token_loss_matches_reference():
    rng = np.random.default_rng(8)
    logp_old = -rng.random((6, 7)).astype(np.float32) * 3
    logp_new = logp_old + rng.normal(scale=0.4, size=(6, 7)).astype(np.float32)
    adv = rng.normal(size=6).astype(np.float32)
    for clip_low, clip_high, dual_clip in ((0.2, 0.2, None), (0.2, 0.28, 3.0), (0.1, 0.3, 1.5)):
        loss, aux = losses.ppo_token_loss(
            jnp.asarray(logp_new), jnp.asarray(logp_old), jnp.asarray(adv),
            clip_low, clip_high, dual_clip,
        )  # fmt: skip
        ref_loss, ref_clipped = _ref_ppo(logp_new, logp_old, adv, clip_low, clip_high, dual_clip)
        chex.assert_shape(loss, (6, 7))
        np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(aux["clipped"]), ref_clipped)
        assert ("clipped_lower" in aux) == (dual_clip is not None)


def test_ppo_clip_higher_and_dual_clip_hand_cases():
    def one(ratio, adv, **kw):
        loss, aux = losses.ppo_token_loss(
            jnp.log(jnp.array([[ratio]])), jnp.zeros((1, 1)), jnp.array([adv]), **kw
        )
        return float(loss[0, 0]), {k: float(v[0, 0]) for k, v in aux.items()}

    # A > 0, ratio 1.25: clipped at 1.2 with the symmetric range, free with clip-higher 0.28.
    loss, aux = one(1.25, 1.0, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-1.2) and aux["clipped"] == 1.0
    loss, aux = one(1.25, 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25) and aux["clipped"] == 0.0
    # A < 0, ratio 0.7: the lower clip 0.8 is active (pessimistic max).
    loss, aux = one(0.7, -1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.8) and aux["clipped"] == 1.0
    # A < 0, ratio 5: unbounded without dual-clip, capped at c |A| = 3 with it.
    loss, aux = one(5.0, -1.0)
    assert loss == pytest.approx(5.0) and "clipped_lower" not in aux
    loss, aux = one(5.0, -2.0, dual_clip=3.0)
    assert loss == pytest.approx(6.0) and aux["clipped_lower"] == 1.0
    # Dual-clip never touches a positive advantage.
    loss, aux = one(5.0, 2.0, dual_clip=3.0)
    assert loss == pytest.approx(-2.4) and aux["clipped_lower"] == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        one(1.0, 1.0, dual_clip=1.0)


def test_k3_kl():
    rng = np.random.default_rng(9)
    logp = -rng.random((3, 5)).astype(np.float32)
    assert (np.asarray(losses.k3_kl(jnp.asarray(logp), jnp.asarray(logp))) == 0.0).all()
    ref_logp = logp + rng.normal(size=(3, 5)).astype(np.float32)
    got = np.asarray(losses.k3_kl(jnp.asarray(logp), jnp.asarray(ref_logp)))
    d = (ref_logp - logp).astype(np.float64)
    np.testing.assert_allclose(got, np.exp(d) - d - 1, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all()
    # verl's clamp: a huge log-ratio gives at most 10.
    assert float(losses.k3_kl(jnp.array([-30.0]), jnp.array([0.0]))[0]) == 10.0


def _loss_inputs(seed, num_b=6, num_t=9):
    rng = np.random.default_rng(seed)
    logp_old = -rng.random((num_b, num_t)).astype(np.float32) * 2
    lengths = rng.integers(1, num_t + 1, num_b)
    mask = (np.arange(num_t)[None] < lengths[:, None]).astype(np.float32)
    return dict(
        logp_new_BR=jnp.asarray(logp_old + rng.normal(scale=0.3, size=logp_old.shape)),
        logp_old_BR=jnp.asarray(logp_old),
        advantage_B=jnp.asarray(rng.normal(size=num_b).astype(np.float32)),
        mask_BR=jnp.asarray(mask),
        logp_ref_BR=jnp.asarray(logp_old + rng.normal(scale=0.3, size=logp_old.shape)),
        entropy_BR=jnp.asarray(rng.random((num_b, num_t)).astype(np.float32)),
    )


def test_grpo_loss_is_zero_when_advantages_are_zero():
    inputs = _loss_inputs(10)
    inputs["advantage_B"] = jnp.zeros_like(inputs["advantage_B"])
    loss, aux = losses.grpo_loss(**inputs, kl_coef=0.0, entropy_coef=0.0, dual_clip=3.0)
    assert float(loss) == 0.0 and float(aux["pg_loss"]) == 0.0
    assert float(aux["kl"]) > 0 and float(aux["entropy"]) > 0  # still measured


def test_grpo_loss_on_policy():
    inputs = _loss_inputs(11)
    inputs["logp_new_BR"] = inputs["logp_old_BR"]
    mask = np.asarray(inputs["mask_BR"])
    adv = np.asarray(inputs["advantage_B"])
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    loss, aux = losses.grpo_loss(**inputs)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(aux["clip_frac"]) == 0.0 and float(aux["ratio_mean"]) == 1.0
    assert float(aux["approx_kl"]) == 0.0

    # d loss / d logp_new = -A * ratio / num_tokens = -A / num_tokens on unmasked tokens.
    def loss_of(logp_new):
        rest = (inputs[k] for k in ("logp_old_BR", "advantage_B", "mask_BR"))
        return losses.grpo_loss(logp_new, *rest)[0]

    grad = np.asarray(jax.grad(loss_of)(inputs["logp_old_BR"]))
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-6, atol=1e-9)


def test_grpo_loss_combines_terms():
    inputs = _loss_inputs(12)
    mask = np.asarray(inputs["mask_BR"])
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    loss, aux = losses.grpo_loss(**inputs, kl_coef=0.05, entropy_coef=0.01, **kw)
    pg_BR, _ = _ref_ppo(
        *(np.asarray(inputs[k]) for k in ("logp_new_BR", "logp_old_BR", "advantage_B")),
        0.2, 0.28, 3.0,
    )  # fmt: skip
    d = np.asarray(inputs["logp_ref_BR"]) - np.asarray(inputs["logp_new_BR"])
    kl_BR = np.exp(d) - d - 1
    n = mask.sum()
    pg, kl = (pg_BR * mask).sum() / n, (kl_BR * mask).sum() / n
    ent = (np.asarray(inputs["entropy_BR"]) * mask).sum() / n
    assert float(aux["pg_loss"]) == pytest.approx(pg, rel=1e-5)
    assert float(aux["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(aux["entropy"]) == pytest.approx(ent, rel=1e-5)
    assert float(loss) == pytest.approx(pg + 0.05 * kl - 0.01 * ent, rel=1e-5)
    assert set(aux) == {
        "pg_loss", "clip_frac", "clip_frac_lower", "ratio_mean", "approx_kl", "kl", "entropy"
    }  # fmt: skip


def test_grpo_loss_micro_batches_add_up():
    inputs = _loss_inputs(13, num_b=8)
    kw = dict(kl_coef=0.01, entropy_coef=0.001, dual_clip=3.0)
    loss, aux = losses.grpo_loss(**inputs, **kw)
    num_tokens = inputs["mask_BR"].sum()
    parts = [
        losses.grpo_loss(
            **{k: v[i : i + 4] for k, v in inputs.items()}, num_tokens=num_tokens, **kw
        )
        for i in (0, 4)
    ]
    assert float(parts[0][0] + parts[1][0]) == pytest.approx(float(loss), rel=1e-5)
    for key in aux:
        assert float(parts[0][1][key] + parts[1][1][key]) == pytest.approx(
            float(aux[key]), rel=1e-5, abs=1e-7
        )


def test_grpo_loss_requires_arrays_for_nonzero_coefs():
    inputs = _loss_inputs(14)
    del inputs["logp_ref_BR"], inputs["entropy_BR"]
    with pytest.raises(ValueError, match="logp_ref_BR"):
        losses.grpo_loss(**inputs, kl_coef=0.001)
    with pytest.raises(ValueError, match="entropy_BR"):
        losses.grpo_loss(**inputs, entropy_coef=0.001)
    _, aux = losses.grpo_loss(**inputs)
    assert "kl" not in aux and "entropy" not in aux and "clip_frac_lower" not in aux


# ----------------------------------------------------------------------------- jit


def test_traced_hyperparameters_do_not_recompile():
    traces = []

    @jax.jit
    def step(inputs, clip_low, clip_high, kl_coef, entropy_coef, alpha, threshold):
        traces.append(None)
        adv = advantages.ettrl_reshape(inputs["adv_PN"], inputs["entropy_PN"], alpha)
        keep = advantages.prompt_filter_mask(inputs["ratio_P"], threshold)
        mask_BR = inputs["mask_BR"] * jnp.repeat(keep, adv.shape[1])[:, None]
        return losses.grpo_loss(
            inputs["logp_new_BR"], inputs["logp_old_BR"], adv.reshape(-1), mask_BR,
            logp_ref_BR=inputs["logp_ref_BR"], entropy_BR=inputs["entropy_BR"],
            clip_low=clip_low, clip_high=clip_high, dual_clip=3.0,
            kl_coef=kl_coef, entropy_coef=entropy_coef,
        )  # fmt: skip

    base = _loss_inputs(15, num_b=6)
    inputs = {k: base[k] for k in ("logp_new_BR", "logp_old_BR", "mask_BR", "logp_ref_BR")}
    inputs["entropy_BR"] = base["entropy_BR"]
    inputs["adv_PN"] = base["advantage_B"].reshape(2, 3)
    inputs["entropy_PN"] = jnp.arange(1.0, 7.0).reshape(2, 3)
    inputs["ratio_P"] = jnp.array([0.3, 0.9])
    results = [
        step(inputs, 0.2, 0.2, 0.0, 0.0, 1.0, 0.0),
        step(inputs, 0.1, 0.28, 0.001, 0.01, 0.5, 0.5),
        step(inputs, 0.3, 0.4, 0.1, 0.0, 0.0, 0.95),
    ]
    assert len(traces) == 1
    assert len({float(loss) for loss, _ in results}) == 3
    # Under jit the same values as eagerly.
    eager = step.__wrapped__(inputs, 0.1, 0.28, 0.001, 0.01, 0.5, 0.5)
    chex.assert_trees_all_close(results[1], eager, rtol=1e-6, atol=1e-7)


def test_vote_pipeline_under_jit():
    ids = jnp.asarray(_random_answer_ids(np.random.default_rng(16), 4, 8))

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
