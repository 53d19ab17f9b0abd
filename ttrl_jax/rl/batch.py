"""The rollout batch as the train step takes it: what rollouts build and the step consumes.

Shape suffixes: the package's alphabet (ttrl_jax/__init__.py).
"""

from __future__ import annotations

import flax
import jax


@flax.struct.dataclass
class StepBatch:
    """One rollout batch as the train step consumes it (R = response length)."""

    prompt_PT: jax.Array  # int32, left-padded
    prompt_mask_PT: jax.Array  # bool
    response_PNR: jax.Array  # int32, padded after the stop token
    response_mask_PNR: jax.Array  # bool, True up to and including the stop token
    logp_PNR: jax.Array  # float32, rollout log-probs of the sampled tokens
    entropy_PNR: jax.Array  # float32, rollout per-token entropies
    answer_id_PN: jax.Array  # int32, -1 = no answer
    gold_id_P: jax.Array  # int32, -1 = no gold label (metrics only, never trained on)
