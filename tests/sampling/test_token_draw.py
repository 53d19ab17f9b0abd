"""sampling/token_draw.py: the sampling head's draws against the filtered distribution by its
definition (temperature, top-k, top-p, min-p), its fast and bisection paths, greedy, checks."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax.sampling import token_draw

_sample_token = jax.jit(token_draw.sample_token)


DRAWS = 20_000


def _draw(logits_V, seed=0, draws=DRAWS, **kw):
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (draws, len(logits_V)))
    tok, logp, ent = _sample_token(
        logits_BV, jax.random.key(seed), token_draw.SamplingParams.make(**kw)
    )
    return np.asarray(tok), np.asarray(logp), np.asarray(ent)


LOGITS_128 = np.random.default_rng(0).normal(0, 2.0, 128)


FLAT_128 = np.random.default_rng(1).normal(0, 0.1, 128)  # top 64 hold about half the mass


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=5),
        dict(temperature=0.8, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=1.2, top_k=40, top_p=0.9, min_p=0.01),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_sample_token_matches_filtered_distribution(kw, filtered_probs, check_distribution):
    tokens, logp, entropy = _draw(LOGITS_128, **kw)
    check_distribution(tokens, filtered_probs(LOGITS_128, **kw))
    # Log-probs and entropy are those of softmax(logits / temperature), unfiltered.
    ref = jax.nn.log_softmax(jnp.asarray(LOGITS_128, jnp.float32) / kw["temperature"])
    np.testing.assert_allclose(logp, np.asarray(ref)[tokens], atol=1e-5)
    np.testing.assert_allclose(entropy, -(np.exp(ref) * ref).sum(), atol=1e-5)


@pytest.mark.parametrize(
    "kw", [dict(top_k=100), dict(top_p=0.9), dict(top_k=90, top_p=0.8)], ids=str
)
def test_sample_token_bisection_path(kw, filtered_probs, check_distribution):
    # k > 64 candidates, or top-p mass not reached within the 64 largest: exact bisection.
    tokens, _, _ = _draw(FLAT_128, seed=5, **kw)
    expected = filtered_probs(FLAT_128, **kw)
    assert 64 < (expected > 0).sum() < 128
    check_distribution(tokens, expected)


def test_sample_token_top_p_just_below_one_keeps_everything(filtered_probs, check_distribution):
    # p = 1 - 2**-24 is not "off", but no token's mass ahead reaches it: all are kept, and float
    # rounding of the total mass must not turn the bisection's threshold into NaN.
    top_p = float(np.nextafter(np.float32(1), np.float32(0)))
    tokens, _, _ = _draw(FLAT_128, seed=7, top_p=top_p)
    check_distribution(tokens, filtered_probs(FLAT_128, top_p=top_p))
    assert len(np.unique(tokens)) == 128


def test_sample_token_candidates_from_many_blocks(filtered_probs, check_distribution):
    # V = 8192 is viewed as 128 blocks of 64; the 40 largest logits all sit in block 3, the next
    # ones spread out, so the candidate blocks must be chosen by their maxima, not by position.
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1, 8192)
    logits[192:232] = 9 + rng.normal(0, 0.3, 40)
    for kw in (dict(top_k=50), dict(top_k=7), dict(top_p=0.8), dict(top_k=45, top_p=0.99)):
        tokens, _, _ = _draw(logits, seed=6, draws=2000, **kw)
        check_distribution(tokens, filtered_probs(logits, **kw))


def test_sample_token_greedy():
    logits = np.random.default_rng(3).normal(0, 1, 128).astype(np.float32)
    logits[[17, 90]] = 5.0  # a tie for the largest logit
    tokens, logp, entropy = _draw(logits, temperature=0.0, top_k=1, top_p=0.1)
    assert (tokens == 17).all()  # the first index of the largest logit; filters are ignored
    ref = jax.nn.log_softmax(jnp.asarray(logits))  # raw logits: temperature 1
    np.testing.assert_allclose(logp, ref[17], atol=1e-6)
    np.testing.assert_allclose(entropy, -(np.exp(ref) * ref).sum(), atol=1e-6)


def test_sampling_params_validation():
    for kw, msg in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
    ]:
        with pytest.raises(ValueError, match=msg):
            token_draw.SamplingParams.make(**kw)
