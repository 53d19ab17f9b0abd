"""TTRL's rewards, per response of a vote group: the majority vote's, and the follow-ups'.

Rewards are computed on the whole vote group (the frequency of an answer is a property of the
group) and then gathered for the responses trained on, which advantages.py normalises among
themselves as one GRPO group. A reward term that is the same for every response of a group is
removed by that normalisation, so every option here varies within a group. Jit-compatible pure
functions of arrays; options are plain numbers, never a config object. Shape suffixes: the
package's alphabet (ttrl_jax/__init__.py).
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp

from ttrl_jax.rl import vote

# The reward variants of a TTRL step (train.py dispatches on the name).
Reward = Literal["majority", "soft_frequency", "self_certainty", "evol_novelty"]
REWARDS: tuple[str, ...] = typing.get_args(Reward)


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
    share_PN = count_PN / jnp.maximum(vote.drawn(answer_id_PN).sum(axis=1, keepdims=True), 1)
    return jnp.where(answer_id_PN >= 0, share_PN, 0.0).astype(jnp.float32)


def token_self_certainty(logits_BRV: jax.Array) -> jax.Array:
    """Self-certainty of each token's distribution: KL(Uniform_V || p), from the full logits.

    Kang et al., "Scalable Best-of-N Selection for LLMs via Self-Certainty" (2025), define a
    response's self-certainty as -1/(nV) sum_t sum_j log(V p_t(j)) = mean_t KL(U || p_t).
    Per token, KL(U || p) = -log V - mean_j log p(j) = logsumexp(z) - mean_j z_j - log V.
    It needs the mean log-probability over the whole vocabulary, which is not a function of
    the entropy and the chosen token's log-prob, so it is computed here from the logits
    (whoever holds them: the sampler while decoding, or the train step). Pass the model's raw
    logits (temperature 1), as the paper does; V is the last axis, padding rows included.
    A response's score is `advantages.response_mean(token_self_certainty(logits_BRV), mask_BR)`;
    used as a reward (Intuitor, RLIF), more confident responses rank higher within the group.
    """
    logits_BRV = logits_BRV.astype(jnp.float32)
    num_v = logits_BRV.shape[-1]
    return jax.nn.logsumexp(logits_BRV, axis=-1) - logits_BRV.mean(axis=-1) - math.log(num_v)


def evol_novelty_reward(
    feature_PND: jax.Array, answer_id_PN: jax.Array, majority_P: jax.Array
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
      feature_PND: float per-response features (the mean hidden state; any width D).
      answer_id_PN: answer ids as for `majority_vote`, -1 for no answer.
      majority_P: from `majority_vote` over the vote group.

    Returns:
      reward_PN: float32 in [-1, 1].
    """
    num_n = answer_id_PN.shape[-1]
    valid_PN = answer_id_PN >= 0
    majority_PN = vote_reward(answer_id_PN, majority_P) > 0
    minority_PN = valid_PN & ~majority_PN

    feature_PND = feature_PND.astype(jnp.float32)
    norm_PN1 = jnp.linalg.norm(feature_PND, axis=-1, keepdims=True)
    unit_PND = feature_PND / jnp.maximum(norm_PN1, 1e-8)
    sim_PNN = jnp.clip(jnp.einsum("pnd,pmd->pnm", unit_PND, unit_PND), 0.0, 1.0)

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
