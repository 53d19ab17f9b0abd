"""From rewards to the update's weights: which responses train, their GRPO advantages, reshaping.

Jit-compatible pure functions of arrays, vectorised over prompts (P) and responses (N, of which
M train); options are plain numbers, never a config object. Shape suffixes: the package's
alphabet (ttrl_jax/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def select_responses(
    key: jax.Array,
    num_prompts: int,
    num_vote: int,
    num_train: int,
    random_subset: bool,
    drawn_PN: jax.Array | None = None,
) -> jax.Array:
    """Which N_train of the N_vote responses per prompt go into the update.

    Args:
      key: PRNG key; unused when `random_subset` is False.
      num_prompts: P.
      num_vote: N_vote, responses sampled per prompt.
      num_train: N_train <= N_vote, responses kept per prompt.
      random_subset: True draws a uniform subset without replacement, independently per
        prompt; False keeps the first N_train (upstream TTRL's choice).
      drawn_PN: which slots hold a response (groups of varying size); None = all. Each prompt
        needs at least N_train drawn.

    Returns:
      index_PM: int32 indices into the N_vote axis, ascending within each row, M = N_train.
    """
    if not 0 < num_train <= num_vote:
        raise ValueError(
            f"num_train={num_train} must be in [1, num_vote={num_vote}]: the update trains on a "
            "subset of the voted responses; lower num_train or raise num_vote."
        )
    if drawn_PN is None and not random_subset:
        return jnp.broadcast_to(jnp.arange(num_train, dtype=jnp.int32), (num_prompts, num_train))
    if random_subset:
        # The first M of a uniformly random permutation form a uniform M-subset; empty slots
        # (sort key 2 > any uniform) come last.
        sort_key_PN = jax.random.uniform(key, (num_prompts, num_vote))
    else:
        sort_key_PN = jnp.broadcast_to(
            jnp.arange(num_vote, dtype=jnp.float32), (num_prompts, num_vote)
        )
    if drawn_PN is not None:
        sort_key_PN = jnp.where(drawn_PN, sort_key_PN, 2.0 + num_vote)
    order_PN = jnp.argsort(sort_key_PN, axis=1)
    return jnp.sort(order_PN[:, :num_train], axis=1).astype(jnp.int32)


def gather_responses(x_PN: jax.Array, index_PM: jax.Array) -> jax.Array:
    """Rows `index_PM` of the response axis (axis 1) of `x_PN...`; trailing axes are kept."""
    index = index_PM.reshape(index_PM.shape + (1,) * (x_PN.ndim - 2))
    return jnp.take_along_axis(x_PN, index, axis=1)


def group_advantages(
    reward_PN: jax.Array, eps: float = 1e-6, scale_by_std: bool = True
) -> jax.Array:
    """GRPO advantage: (r - mean_group) / (std_group + eps), one scalar per response.

    Matches verl's `compute_grpo_outcome_advantage`: the std is the unbiased one (ddof=1, as
    `torch.std`), eps is added to the std, and a group of one response gets mean 0 and std 1.
    A group whose rewards are all equal gets exactly 0 (it carries no signal), even where
    float rounding would leave r - mean a few ulps away from 0.

    Args:
      reward_PN: float rewards, one group per row.
      eps: added to the std.
      scale_by_std: False gives Dr. GRPO's unscaled r - mean.

    Returns:
      advantage_PN: float32.
    """
    reward_PN = reward_PN.astype(jnp.float32)
    if reward_PN.shape[-1] == 1:
        return reward_PN / (1.0 + eps) if scale_by_std else reward_PN
    centred_PN = reward_PN - reward_PN.mean(axis=1, keepdims=True)
    if scale_by_std:
        centred_PN = centred_PN / (reward_PN.std(axis=1, ddof=1, keepdims=True) + eps)
    constant_P1 = reward_PN.max(axis=1, keepdims=True) == reward_PN.min(axis=1, keepdims=True)
    return jnp.where(constant_P1, 0.0, centred_PN)


def ettrl_reshape(
    advantage_PN: jax.Array, entropy_PN: jax.Array, alpha: float | jax.Array = 1.0
) -> jax.Array:
    """ETTRL's entropy-based advantage reshaping (EAR, "Adv-Res", arXiv 2508.11356).

    A' = A * max(0, 1 + alpha * (mean_group(H) - H) / mean_group(H)), with H a response's mean
    token entropy. alpha = 1 is the paper's factor Y_i = 1 + (avg H - H_i) / avg H: confident
    (low-entropy) responses get a larger update and uncertain ones a smaller one, which damps
    the over-confident early updates on wrong pseudo-labels. The paper's factor is negative
    for H > 2 * mean, which would flip the sign of the advantage; it is clamped at 0 here.
    A group whose mean entropy is 0 is left unchanged.

    Args:
      advantage_PN: group-normalised advantages.
      entropy_PN: mean per-token entropy of each response (see `response_mean`), >= 0.
      alpha: strength; 0 disables.

    Returns:
      advantage_PN reshaped, float32.
    """
    entropy_PN = entropy_PN.astype(jnp.float32)
    mean_P1 = entropy_PN.mean(axis=1, keepdims=True)
    # A zero mean means every entropy is 0, so the numerator is 0 too and the factor is 1.
    relative_PN = (mean_P1 - entropy_PN) / jnp.where(mean_P1 > 0, mean_P1, 1.0)
    return advantage_PN * jnp.maximum(1.0 + alpha * relative_PN, 0.0)


def response_mean(x_BR: jax.Array, mask_BR: jax.Array) -> jax.Array:
    """Mean of a per-token quantity over each response's own tokens (0 for an empty one)."""
    mask_BR = mask_BR.astype(jnp.float32)
    total_B = (x_BR.astype(jnp.float32) * mask_BR).sum(axis=-1)
    return total_B / jnp.maximum(mask_BR.sum(axis=-1), 1.0)


def prompt_filter_mask(majority_ratio_P: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """SRT prompt filter: 1.0 for prompts whose majority ratio is >= threshold, else 0.0.

    Low agreement means the pseudo-label is likely wrong; multiply the loss mask of a
    dropped prompt's responses by 0 so they do not count in the token mean. A prompt with
    no answer has ratio 0 and is dropped by any threshold > 0.
    """
    return (majority_ratio_P >= threshold).astype(jnp.float32)
