"""bench/torch_peer.py: upstream's step refuses the settings it does not implement."""

import pytest

from ttrl_jax.bench import torch_peer
from ttrl_jax.bench import train as bench_train


def test_the_peer_refuses_settings_it_does_not_implement():
    size = bench_train.TrainSize(2, 2, 4, 4)
    with pytest.raises(ValueError, match="ttrl.reward"):
        torch_peer.PeerOptions.from_config(
            bench_train.run_config(size, ["ttrl.reward=soft_frequency"])
        )
