"""The GRPO loss of a mini-batch: PPO's clipped surrogate per token, the k3 KL, token means.

Jit-compatible pure functions of arrays; the clip values and coefficients may be traced values.
Shape suffixes: the package's alphabet (ttrl_jax/__init__.py).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

# verl clamps log-ratios before exponentiating so one wild token cannot overflow the loss.
_LOG_RATIO_CLAMP = 20.0
# verl's "low_var_kl" clamps the per-token k3 value to this magnitude.
_K3_CLAMP = 10.0


def valid_dual_clip(dual_clip: float | None) -> bool:
    """Whether `dual_clip` is a usable setting: None (off) or c > 1, which caps the loss of a
    negative-advantage token at c |A| (verl uses 3.0)."""
    return dual_clip is None or dual_clip > 1.0


def masked_token_mean(
    x_BR: jax.Array, mask_BR: jax.Array, num_tokens: jax.Array | float | None = None
) -> jax.Array:
    """verl's "token-mean": sum of x over unmasked tokens / number of unmasked tokens.

    `num_tokens` replaces the denominator, so that the means of the micro-batches of one
    mini-batch, each divided by the mini-batch's token count, add up to its token mean.
    An all-masked batch gives 0.
    """
    mask_BR = mask_BR.astype(jnp.float32)
    denominator = mask_BR.sum() if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    return (x_BR.astype(jnp.float32) * mask_BR).sum() / jnp.maximum(denominator, 1.0)


def ppo_token_loss(
    logp_new_BR: jax.Array,
    logp_old_BR: jax.Array,
    advantage_B: jax.Array,
    clip_low: float | jax.Array = 0.2,
    clip_high: float | jax.Array = 0.2,
    dual_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO clipped surrogate loss, with clip-higher and optional dual-clip (verl).

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp_new - logp_old)
    with the log-ratio clamped to [-20, 20]. With dual-clip c, a token with A < 0 has its loss
    capped at -A c = c |A| (Ye et al. 2020), so a huge ratio on a bad token cannot dominate.

    Args:
      logp_new_BR: log-probs of the sampled tokens under the policy being trained.
      logp_old_BR: the same under the rollout policy (no gradient flows into them).
      advantage_B: one advantage per response, or advantage_BR per token.
      clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high]; a larger
        clip_high is DAPO's clip-higher.
      dual_clip: None, or c > 1.

    Returns:
      loss_BR: per-token loss (unmasked; reduce with `masked_token_mean`).
      aux: per-token float indicators and values: "ratio"; "clipped" (the clipped branch is
        active); "clipped_lower" (dual-clip is active; only when dual_clip is set).
    """
    if isinstance(dual_clip, numbers.Real) and not valid_dual_clip(dual_clip):
        raise ValueError(
            f"dual_clip={dual_clip} must be > 1 (it caps the loss of a negative-advantage token "
            "at dual_clip * |A|); use 3.0 as verl does, or None to disable."
        )
    logp_old_BR = jax.lax.stop_gradient(logp_old_BR)
    advantage_BR = jax.lax.stop_gradient(advantage_B)
    if advantage_BR.ndim == logp_new_BR.ndim - 1:
        advantage_BR = advantage_BR[..., None]
    log_ratio_BR = jnp.clip(logp_new_BR - logp_old_BR, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio_BR = jnp.exp(log_ratio_BR)
    unclipped_BR = -advantage_BR * ratio_BR
    clipped_BR = -advantage_BR * jnp.clip(ratio_BR, 1.0 - clip_low, 1.0 + clip_high)
    loss_BR = jnp.maximum(unclipped_BR, clipped_BR)
    aux = {
        "ratio": ratio_BR,
        "clipped": (clipped_BR > unclipped_BR).astype(jnp.float32),
    }
    if dual_clip is not None:
        cap_BR = -advantage_BR * dual_clip
        negative_BR = advantage_BR < 0
        aux["clipped_lower"] = (negative_BR & (loss_BR > cap_BR)).astype(jnp.float32)
        loss_BR = jnp.where(negative_BR, jnp.minimum(loss_BR, cap_BR), loss_BR)
    return loss_BR, aux


def k3_kl(logp_new_BR: jax.Array, logp_ref_BR: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(new || ref): exp(d) - d - 1 with d = logp_ref - logp_new.

    Schulman's low-variance, always non-negative estimator; as verl's "low_var_kl", d is
    clamped to [-20, 20] before the exponential and the result to [-10, 10] (so at most 10).
    The gradient flows through logp_new only.
    """
    log_ratio_BR = jax.lax.stop_gradient(logp_ref_BR) - logp_new_BR
    log_ratio_BR = jnp.clip(log_ratio_BR, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    kl_BR = jnp.exp(log_ratio_BR) - log_ratio_BR - 1.0
    return jnp.clip(kl_BR, -_K3_CLAMP, _K3_CLAMP)


def grpo_loss(
    logp_new_BR: jax.Array,
    logp_old_BR: jax.Array,
    advantage_B: jax.Array,
    mask_BR: jax.Array,
    *,
    logp_ref_BR: jax.Array | None = None,
    entropy_BR: jax.Array | None = None,
    clip_low: float | jax.Array = 0.2,
    clip_high: float | jax.Array = 0.2,
    dual_clip: float | None = None,
    kl_coef: float | jax.Array = 0.0,
    entropy_coef: float | jax.Array = 0.0,
    num_tokens: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss of one mini-batch: token-mean PPO loss + k3 KL penalty - entropy bonus.

    loss = mean_tok(ppo) + kl_coef * mean_tok(k3(new, ref)) - entropy_coef * mean_tok(H),
    every mean over the unmasked tokens of the whole mini-batch (verl's "token-mean"). The
    clip values and coefficients may be traced values: changing them does not recompile.

    Args:
      logp_new_BR: log-probs of the sampled tokens under the policy being trained (this is
        where the gradient flows).
      logp_old_BR: the same under the rollout policy.
      advantage_B: one advantage per response (or advantage_BR per token).
      mask_BR: 1 on response tokens that count (not prompt, not after EOS, not a filtered
        prompt), 0 elsewhere.
      logp_ref_BR: the same under the reference (initial) policy; needed when kl_coef != 0.
        When given, aux gets "kl" even if kl_coef is 0.
      entropy_BR: per-token entropy of the policy being trained (differentiable); needed
        when entropy_coef != 0. When given, aux gets "entropy".
      clip_low, clip_high: PPO ratio clip range [1 - clip_low, 1 + clip_high].
      dual_clip: None, or c > 1 (verl uses 3.0).
      kl_coef: weight of the k3 KL penalty (upstream TTRL: 0.001).
      entropy_coef: weight of the entropy bonus.
      num_tokens: denominator of every token mean (default: tokens in mask_BR); pass the
        mini-batch's token count when it is split into micro-batches, so that their losses
        and aux values add up to the mini-batch's.

    Returns:
      loss: scalar float32.
      aux: scalar token means: "pg_loss", "clip_frac", "ratio_mean", "approx_kl" (mean of
        logp_old - logp_new), plus "clip_frac_lower" with dual_clip, "kl" with logp_ref_BR,
        "entropy" with entropy_BR.
    """
    for name, coef, array in (
        ("kl_coef", kl_coef, logp_ref_BR),
        ("entropy_coef", entropy_coef, entropy_BR),
    ):
        if array is None and not (isinstance(coef, numbers.Real) and coef == 0):
            needed = "logp_ref_BR" if name == "kl_coef" else "entropy_BR"
            raise ValueError(f"{name}={coef} needs {needed}; pass it, or set {name}=0.")

    def mean(x_BR):
        return masked_token_mean(x_BR, mask_BR, num_tokens)

    pg_loss_BR, ppo_aux = ppo_token_loss(
        logp_new_BR, logp_old_BR, advantage_B, clip_low, clip_high, dual_clip
    )
    pg_loss = mean(pg_loss_BR)
    aux = {
        "pg_loss": pg_loss,
        "clip_frac": mean(ppo_aux["clipped"]),
        "ratio_mean": mean(ppo_aux["ratio"]),
        "approx_kl": mean(jax.lax.stop_gradient(logp_old_BR) - logp_new_BR),
    }
    if "clipped_lower" in ppo_aux:
        aux["clip_frac_lower"] = mean(ppo_aux["clipped_lower"])
    loss = pg_loss
    if logp_ref_BR is not None:
        aux["kl"] = mean(k3_kl(logp_new_BR, logp_ref_BR))
        loss = loss + kl_coef * aux["kl"]
    if entropy_BR is not None:
        aux["entropy"] = mean(entropy_BR)
        loss = loss - entropy_coef * aux["entropy"]
    return loss, aux
