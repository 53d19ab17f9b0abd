"""The compiled train step against upstream's step in PyTorch (bench/torch_peer.py), same weights,
same rollout, same run config: the losses, the gradients and the updated weights agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttrl_jax.bench import torch_peer
from ttrl_jax.bench import train as bench_train
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import train
from ttrl_jax.run import from_config

CFG = ModelConfig.tiny("qwen2", num_heads=4, num_kv_heads=2, tie_embeddings=True)
SIZE = bench_train.TrainSize(prompts=2, responses=4, prompt_len=5, response_len=6)


def torch_params(policy, tmp_path):
    """The torch model's weights as our params tree (through the HF format both sides read)."""
    policy.save_pretrained(tmp_path / "torch")
    return weights.load_hf(tmp_path / "torch")[1]


def setup(overrides):
    run_cfg = bench_train.run_config(SIZE, overrides)
    tp = from_config.train_parts(run_cfg, total_steps=1)
    opts = torch_peer.PeerOptions.from_config(run_cfg)
    params = model_lib.init_params(CFG, jax.random.key(0))
    batch = bench_train.make_rollout(CFG, *map(int, vars(SIZE).values()), seed=1)
    if not tp.step_cfg.recompute_old_logp:  # the peer recomputes what our sampler reported
        batch = bench_train.with_rollout_logp(CFG, params, batch, tp.hyper.temperature)
    policy, ref = torch_peer.torch_models(params, CFG, "eager", use_kl=run_cfg.optim.kl_coef > 0)
    return tp, opts, params, batch, policy, ref


def test_step_with_sgd_takes_the_same_gradient_steps(tmp_path):
    """With plain SGD after the clip, new weights = old - lr * clipped gradient per mini-batch:
    equal weights after the step mean equal gradients, every one of them."""
    import torch

    tp, opts, params, batch, policy, ref = setup([])
    lr = 0.5
    tx = optax.chain(optax.clip_by_global_norm(opts.grad_clip), optax.sgd(lr))
    step = train.build_train_step(CFG, tp.step_cfg, tx, optax.constant_schedule(lr))
    state = train.init_state(jax.tree.map(jnp.copy, params), tx)
    new_state, metrics = step(state, params, batch, jax.random.key(0), tp.hyper)
    out = torch_peer.torch_train_step(
        policy, ref, torch.optim.SGD(policy.parameters(), lr=lr),
        torch_peer.torch_rollout(batch, opts.n_train), opts,
    )  # fmt: skip
    assert abs(float(metrics["loss"]) - np.mean(out["loss"])) < 2e-7
    assert abs(float(metrics["grad_norm"]) - np.mean(out["grad_norm"])) < 1e-5
    moved = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), new_state.params, params
    )
    assert max(jax.tree.leaves(moved)) > 1e-2  # the step did move the weights
    diff = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
        new_state.params,
        torch_params(policy, tmp_path),
    )
    assert max(jax.tree.leaves(diff)) < 1e-5, diff


@pytest.mark.slow
def test_step_with_the_configs_adamw_ends_at_the_same_weights(tmp_path):
    # A large eps keeps Adam's direction g / (|g| + eps) smooth where a gradient is near zero
    # (there the sign of a 1e-9 gradient, which rounding may flip, would set the update).
    tp, opts, params, batch, policy, ref = setup(
        ["optim.lr=1e-2", "optim.eps=1e-3", "optim.weight_decay=0.1"]
    )
    step = train.build_train_step(CFG, tp.step_cfg, tp.tx, tp.lr_fn)
    state = train.init_state(jax.tree.map(jnp.copy, params), tp.tx)
    new_state, metrics = step(state, params, batch, jax.random.key(0), tp.hyper)
    out = torch_peer.torch_train_step(
        policy, ref, torch_peer.torch_optimizer(policy, opts, "loop"),
        torch_peer.torch_rollout(batch, opts.n_train), opts,
    )  # fmt: skip
    assert abs(float(metrics["loss"]) - np.mean(out["loss"])) < 1e-6
    diff = jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
        new_state.params,
        torch_params(policy, tmp_path),
    )
    # Each of the 2 updates moves a weight by up to lr = 1e-2; they agree far below that.
    assert max(jax.tree.leaves(diff)) < 1e-5, diff
