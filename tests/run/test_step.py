"""run/step.py: the root key's streams, one a purpose and a step."""

import jax
import numpy as np

from ttrl_jax.run import step


def test_streams_are_reproducible_and_independent():
    root = jax.random.key(0)
    purposes = (step.SAMPLE, step.SELECT, step.EVAL, step.BASELINE)
    assert len(set(purposes)) == len(purposes)
    keys = {(p, s): jax.random.key_data(step.stream(root, p, s)) for p in purposes for s in (0, 1)}
    assert len({tuple(np.asarray(k).ravel()) for k in keys.values()}) == len(keys)
    again = jax.random.key_data(step.stream(jax.random.key(0), step.SAMPLE, 1))
    np.testing.assert_array_equal(again, keys[step.SAMPLE, 1])
