"""run/from_config.py: the step's settings a config implies."""

import pytest

from ttrl_jax.config.load import load_config
from ttrl_jax.run import from_config


@pytest.mark.parametrize(
    "overrides, recomputed",
    [
        (["model.dtype=float32"], False),  # auto: the sampler's log-probs are the policy's
        (["model.dtype=float32", "sample.top_p=0.9", "sample.top_k=20"], False),
        (["model.dtype=bfloat16"], True),  # auto: the decode and the forward round differently
        (["model.dtype=float32", "sample.temperature=0"], True),
        (["model.dtype=float32", "optim.old_logp=recompute"], True),
        (["model.dtype=bfloat16", "optim.old_logp=sampler"], False),
    ],
)
def test_old_logp_auto_takes_the_samplers_only_where_they_are_exact(overrides, recomputed):
    cfg = load_config(None, overrides)
    assert from_config.recomputes_old_logp(cfg) is recomputed
    assert from_config.step_config(cfg).recompute_old_logp is recomputed


def test_share_prompts_reaches_the_step():
    assert from_config.step_config(load_config(None, [])).share_prompts is True
    off = load_config(None, ["optim.share_prompts=false"])
    assert from_config.step_config(off).share_prompts is False
