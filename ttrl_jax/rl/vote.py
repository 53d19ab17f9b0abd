"""The TTRL vote: each prompt's majority answer among its responses, on device or host.

Answer ids come from grading/clustering.py: 0, 1, 2, ... per prompt in order of first
appearance, NO_ANSWER for a response without a final answer, NOT_DRAWN for an empty slot of a
group smaller than N (an adaptive vote that stopped early). The same `majority_vote` serves the
compiled step, evaluation's maj@k, the adaptive budget's audit and the label-free signals.
Shape suffixes: the package's alphabet (ttrl_jax/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
        first appearance within the prompt (as grading/clustering.py does) for ties to go to the
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
