"""rl/losses.py: PPO-clip (clip-higher, dual-clip), k3 KL, token means, grpo_loss, traced values."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax.rl import advantages, losses


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
