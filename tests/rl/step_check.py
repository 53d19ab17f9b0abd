"""A check both train-step test modules share: the step on a 2x4 mesh, its rows packed at real
lengths, equals it unsharded and unpacked."""

import chex
import jax
import jax.numpy as jnp
import optax

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.rl import train


def sharded_step_equals_unsharded(cfg, trained, inputs, batch):
    """Runs one step from `trained` (the state's params) with the input params `inputs` (the
    reference, or with LoRA the frozen base) unsharded and on a 2x4 mesh, checks that the new
    params and metrics agree, and returns the sharded step's new state.

    SGD, so the comparison is linear in the gradients (Adam's g / sqrt(v) would magnify
    reduction-order rounding on near-zero gradients).
    """
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    step_cfg = train.StepConfig(n_train=4, mini_batch_prompts=2, micro_batch_rows=4)
    tx, lr_fn = optax.sgd(0.1), optax.constant_schedule(0.1)
    key, hyper = jax.random.key(5), train.StepHyper.make()
    step = train.build_train_step(cfg, step_cfg, tx, lr_fn)
    ref_state, ref_metrics = step(
        train.init_state(copy(trained), tx), copy(inputs), batch, key, hyper
    )
    mesh = sharding_lib.make_mesh("2x4", jax.devices()[:8])
    state_sh = train.state_shardings(cfg, tx, mesh)
    input_sh = model_lib.param_shardings(cfg, mesh, sharding_lib.TRAIN_RULES)
    sharded = train.build_train_step(cfg, step_cfg, tx, lr_fn, mesh, state_sh, input_sh)
    state = jax.device_put(train.init_state(copy(trained), tx), state_sh)
    packed_len = train.packed_length(cfg, step_cfg, batch, key, 1)
    new_state, metrics = sharded(
        state, jax.device_put(inputs, input_sh), batch, key, hyper, packed_len
    )
    assert int(metrics.pop("packed_overflow")) == 0
    chex.assert_trees_all_close(new_state.params, ref_state.params, atol=1e-6)
    chex.assert_trees_all_close(metrics, ref_metrics, atol=1e-5)
    return new_state
