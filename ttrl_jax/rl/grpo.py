"""The RL math of TTRL as small pure functions of arrays: vote, rewards, advantages, losses.

Everything here is jit-compatible and vectorised over prompts (P) and responses (N); options
are plain numbers, never a config object. The order of a TTRL step (DESIGN.md §1):

    majority_P, ratio_P = majority_vote(answer_id_PN)            # over the N_vote group
    reward_PN = vote_reward(answer_id_PN, majority_P)            # or another reward below
    index_PM = select_responses(key, P, N_vote, N_train, True)   # M = N_train
    reward_PM = gather_responses(reward_PN, index_PM)
    advantage_PM = group_advantages(reward_PM)                   # then optional reshaping
    loss, aux = grpo_loss(logp_new_BR, logp_old_BR, advantage_B, mask_BR, ...)

Rewards are computed on the whole vote group (the frequency of an answer is a property of
the group) and then gathered for the selected responses, which are normalised among
themselves as one GRPO group. A reward term that is the same for every response of a group
is removed by that normalisation, so every option here varies within a group.
"""

from __future__ import annotations

import math
import numbers
import typing
from typing import Literal

import jax
import jax.numpy as jnp

# The reward variants of a TTRL step (train.py dispatches on the name).
Reward = Literal["majority", "soft_frequency", "self_certainty", "evol_novelty"]
REWARDS: tuple[str, ...] = typing.get_args(Reward)

# verl clamps log-ratios before exponentiating so one wild token cannot overflow the loss.
_LOG_RATIO_CLAMP = 20.0
# verl's "low_var_kl" clamps the per-token k3 value to this magnitude.
_K3_CLAMP = 10.0


# ----------------------------------------------------------------------------- vote

NO_ANSWER = -1  # the response was drawn and has no final answer
NOT_DRAWN = -2  # a slot of a group smaller than N (an adaptive vote stopped early): no response


def drawn(answer_id_PN: jax.Array) -> jax.Array:
    """True on the slots that hold a response (groups of varying size share one N)."""
    return answer_id_PN != NOT_DRAWN


def majority_vote(answer_id_PN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Majority answer id per prompt and the fraction of responses that gave it.

    Args:
      answer_id_PN: int answer cluster ids per response, NO_ANSWER (-1) for "no answer",
        NOT_DRAWN (-2) for an empty slot, otherwise in [0, N). Ids must be numbered in order of
        first appearance within the prompt (as `rewards.py` does) for ties to go to the
        first-seen answer, as upstream's `Counter.most_common` does.

    Returns:
      majority_P: int32 most frequent id among ids >= 0; ties go to the smallest id; -1 when
        the prompt has no answer at all. "No answer" never wins, however frequent.
      majority_ratio_P: float32 count(majority) / responses drawn (no-answer ones included);
        0 when there is no answer.
    """
    num_n = answer_id_PN.shape[-1]
    # one_hot maps negative ids to an all-zero row, so they are never counted.
    count_PA = jax.nn.one_hot(answer_id_PN, num_n, dtype=jnp.int32).sum(axis=1)
    top_count_P = count_PA.max(axis=1)
    # argmax returns the first maximum: the smallest id among ties.
    majority_P = jnp.where(top_count_P > 0, jnp.argmax(count_PA, axis=1), -1).astype(jnp.int32)
    n_drawn_P = jnp.maximum(drawn(answer_id_PN).sum(axis=1), 1)
    return majority_P, top_count_P.astype(jnp.float32) / n_drawn_P


def vote_reward(answer_id_PN: jax.Array, majority_P: jax.Array) -> jax.Array:
    """TTRL reward: 1.0 where a response's answer is the prompt's majority answer, else 0.0."""
    majority_P1 = majority_P[:, None]
    return ((answer_id_PN == majority_P1) & (majority_P1 >= 0)).astype(jnp.float32)


def soft_frequency_reward(answer_id_PN: jax.Array) -> jax.Array:
    """Fraction of the group that gave the same answer as this response; 0 for no answer.

    The soft form of the vote (TTRV, SRT's self-consistency): a response agreeing with 40 % of
    the group earns 0.4 whether or not its answer is the plurality.
    """
    count_PN = (answer_id_PN[:, :, None] == answer_id_PN[:, None, :]).sum(axis=-1)
    share_PN = count_PN / jnp.maximum(drawn(answer_id_PN).sum(axis=1, keepdims=True), 1)
    return jnp.where(answer_id_PN >= 0, share_PN, 0.0).astype(jnp.float32)


def prompt_filter_mask(majority_ratio_P: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """SRT prompt filter: 1.0 for prompts whose majority ratio is >= threshold, else 0.0.

    Low agreement means the pseudo-label is likely wrong; multiply the loss mask of a
    dropped prompt's responses by 0 so they do not count in the token mean. A prompt with
    no answer has ratio 0 and is dropped by any threshold > 0.
    """
    return (majority_ratio_P >= threshold).astype(jnp.float32)


# ----------------------------------------------------------------------------- selection


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


# ----------------------------------------------------------------------------- advantages


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


def token_self_certainty(logits_BRV: jax.Array) -> jax.Array:
    """Self-certainty of each token's distribution: KL(Uniform_V || p), from the full logits.

    Kang et al., "Scalable Best-of-N Selection for LLMs via Self-Certainty" (2025), define a
    response's self-certainty as -1/(nV) sum_t sum_j log(V p_t(j)) = mean_t KL(U || p_t).
    Per token, KL(U || p) = -log V - mean_j log p(j) = logsumexp(z) - mean_j z_j - log V.
    It needs the mean log-probability over the whole vocabulary, which is not a function of
    the entropy and the chosen token's log-prob, so it is computed here from the logits
    (whoever holds them: the sampler while decoding, or the train step). Pass the model's raw
    logits (temperature 1), as the paper does; V is the last axis, padding rows included.
    A response's score is `response_mean(token_self_certainty(logits_BRV), mask_BR)`; used as
    a reward (Intuitor, RLIF), more confident responses rank higher within the group.
    """
    logits_BRV = logits_BRV.astype(jnp.float32)
    num_v = logits_BRV.shape[-1]
    return jax.nn.logsumexp(logits_BRV, axis=-1) - logits_BRV.mean(axis=-1) - math.log(num_v)


def evol_novelty_reward(
    feature_PNE: jax.Array, answer_id_PN: jax.Array, majority_P: jax.Array
) -> jax.Array:
    """EVOL-RL reward: the majority anchor with a novelty bonus inside each side of the vote.

    Follows the reference implementation of EVOL-RL ("Evolving Language Models without
    Labels", Zhou et al. 2025), with the caller's per-response feature vectors (e.g. the
    policy's mean-pooled last hidden state over the response) in place of its separate
    embedding model:
      - similarity: cosine of the features, clipped to [0, 1], among responses with an answer;
      - novelty_i = 1 - (0.5 * mean sim to the others on the same side of the vote
        + 0.5 * max sim to any other answered response); the mean falls back to all others
        when i is alone on its side, and both terms to 0.5 when i is the only answer;
      - majority responses: novelty min-max rescaled to [0.5, 1] (1.0 if alone, 0.75 if all
        tie); other answered responses: to [-1, -0.5] (-0.5 if alone, -0.75 if all tie);
        no-answer responses: -1.
    So every majority response outranks every minority one (the vote stays the anchor) and
    novelty only orders responses within each side. One deliberate difference: upstream gives
    -1 to every response of a group with a single answered response; here that response keeps
    its anchor value (1.0 if it is the majority).

    Args:
      feature_PNE: float per-response features, E any width.
      answer_id_PN: answer ids as for `majority_vote`, -1 for no answer.
      majority_P: from `majority_vote` over the vote group.

    Returns:
      reward_PN: float32 in [-1, 1].
    """
    num_n = answer_id_PN.shape[-1]
    valid_PN = answer_id_PN >= 0
    majority_PN = vote_reward(answer_id_PN, majority_P) > 0
    minority_PN = valid_PN & ~majority_PN

    feature_PNE = feature_PNE.astype(jnp.float32)
    norm_PN1 = jnp.linalg.norm(feature_PNE, axis=-1, keepdims=True)
    unit_PNE = feature_PNE / jnp.maximum(norm_PN1, 1e-8)
    sim_PNN = jnp.clip(jnp.einsum("pne,pme->pnm", unit_PNE, unit_PNE), 0.0, 1.0)

    other_PNN = valid_PN[:, None, :] & ~jnp.eye(num_n, dtype=bool)
    same_side_PNN = other_PNN & (majority_PN[:, :, None] == majority_PN[:, None, :])
    num_other_PN = other_PNN.sum(axis=-1)
    num_same_PN = same_side_PNN.sum(axis=-1)
    mean_same_PN = (sim_PNN * same_side_PNN).sum(-1) / jnp.maximum(num_same_PN, 1)
    mean_other_PN = (sim_PNN * other_PNN).sum(-1) / jnp.maximum(num_other_PN, 1)
    mean_sim_PN = jnp.where(
        num_same_PN > 0, mean_same_PN, jnp.where(num_other_PN > 0, mean_other_PN, 0.5)
    )
    max_sim_PN = jnp.where(
        num_other_PN > 0, jnp.where(other_PNN, sim_PNN, -jnp.inf).max(axis=-1), 0.5
    )
    novelty_PN = 1.0 - 0.5 * mean_sim_PN - 0.5 * max_sim_PN

    reward_PN = jnp.where(
        majority_PN,
        _rescale_within(novelty_PN, majority_PN, low=0.5, high=1.0, alone=1.0),
        _rescale_within(novelty_PN, minority_PN, low=-1.0, high=-0.5, alone=-0.5),
    )
    return jnp.where(valid_PN, reward_PN, -1.0).astype(jnp.float32)


def _rescale_within(
    x_PN: jax.Array, member_PN: jax.Array, *, low: float, high: float, alone: float
) -> jax.Array:
    """Min-max rescale x over each row's members to [low, high]; `alone` for a lone member."""
    x_min_P1 = jnp.where(member_PN, x_PN, jnp.inf).min(axis=1, keepdims=True)
    x_max_P1 = jnp.where(member_PN, x_PN, -jnp.inf).max(axis=1, keepdims=True)
    span_P1 = x_max_P1 - x_min_P1
    spread_P1 = span_P1 > 0
    unit_PN = (x_PN - x_min_P1) / jnp.where(spread_P1, span_P1, 1.0)
    scaled_PN = jnp.where(spread_P1, low + (high - low) * unit_PN, 0.5 * (low + high))
    return jnp.where(member_PN.sum(axis=1, keepdims=True) == 1, alone, scaled_PN)


# ----------------------------------------------------------------------------- losses


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
    if dual_clip is not None and isinstance(dual_clip, numbers.Real) and dual_clip <= 1.0:
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
