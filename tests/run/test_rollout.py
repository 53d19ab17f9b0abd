"""run/rollout.py: response buckets."""

from ttrl_jax.run import rollout as rollout_lib


def test_response_bucket():
    assert rollout_lib.response_bucket(1, 3072) == 768
    assert rollout_lib.response_bucket(769, 3072) == 1536
    assert rollout_lib.response_bucket(3072, 3072) == 3072
    assert rollout_lib.response_bucket(10, 12) == 12
