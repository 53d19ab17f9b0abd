"""The compiled TTRL step with LoRA (rl/train.py, model/lora.py): the update is the merged model's
gradient with respect to the adapters, only adapters carry optimizer state, the base stays as it
was and is the KL reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model import lora
from ttrl_jax.model.config import LoraConfig, ModelConfig
from ttrl_jax.rl import advantages, losses, rewards, train, vote
from ttrl_jax.rl.batch import StepBatch

from . import step_check

CFG = ModelConfig.tiny("qwen2", num_heads=8, num_kv_heads=4, lora=LoraConfig(rank=4, alpha=8.0))
P, N, T, R = 4, 6, 5, 4


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    lengths_PN = rng.integers(1, R + 1, (P, N))
    answer_id_PN = [[0, 0, 1, 0, -1, 2], [0, 1, 1, 2, 1, 0], [1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1]]
    return StepBatch(
        prompt_PT=jnp.asarray(rng.integers(0, CFG.vocab_size, (P, T)), jnp.int32),
        prompt_mask_PT=jnp.asarray(np.arange(T)[None] >= rng.integers(0, 3, (P, 1))),
        response_PNR=jnp.asarray(rng.integers(0, CFG.vocab_size, (P, N, R)), jnp.int32),
        response_mask_PNR=jnp.asarray(np.arange(R)[None, None] < lengths_PN[..., None]),
        logp_PNR=jnp.asarray(rng.normal(-5.0, 0.3, (P, N, R)), jnp.float32),
        entropy_PNR=jnp.asarray(rng.uniform(0.5, 2.0, (P, N, R)), jnp.float32),
        answer_id_PN=jnp.asarray(answer_id_PN, jnp.int32),
        gold_id_P=jnp.asarray([0, 1, -1, 0], jnp.int32),
    )


@pytest.fixture(scope="module")
def base():
    return model_lib.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def trained_adapters():
    """Adapters away from their initial values (B != 0, so A has gradients too)."""
    adapters = lora.init_adapters(CFG, jax.random.key(1))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def reference_loss(adapters, base, batch, k, temperature, kl_coef):
    """The GRPO loss of the merged model on the first k responses per prompt: full-vocabulary
    log-probs of the merged weights, the base's as the KL reference."""
    majority_P, ratio_P = vote.majority_vote(batch.answer_id_PN)
    advantage_PM = advantages.group_advantages(
        rewards.vote_reward(batch.answer_id_PN, majority_P)[:, :k]
    )
    keep_P = advantages.prompt_filter_mask(ratio_P, 0.0)
    response_BR = batch.response_PNR[:, :k].reshape(P * k, R)
    rmask_BR = batch.response_mask_PNR[:, :k].reshape(P * k, R)
    prompt_BT = jnp.repeat(batch.prompt_PT, k, axis=0)
    pmask_BT = jnp.repeat(batch.prompt_mask_PT, k, axis=0)
    tokens_BS = jnp.concatenate([prompt_BT, response_BR], 1)
    mask_BS = jnp.concatenate([pmask_BT, rmask_BR], 1)
    positions_BS = model_lib.left_pad_positions(mask_BS)

    def logp(params):
        logits = model_lib.forward(CFG, params, tokens_BS, positions_BS, mask_BS)[0]
        logp_BRV = jax.nn.log_softmax(logits[:, T - 1 : T + R - 1] / temperature)
        return jnp.take_along_axis(logp_BRV, response_BR[..., None], -1)[..., 0]

    loss, _ = losses.grpo_loss(
        logp(lora.merge(CFG, base, adapters)),
        batch.logp_PNR[:, :k].reshape(P * k, R),
        advantage_PM.reshape(-1),
        rmask_BR & jnp.repeat(keep_P > 0, k)[:, None],
        logp_ref_BR=logp(base),
        dual_clip=3.0,
        kl_coef=kl_coef,
    )
    return loss


def test_update_is_the_merged_models_gradient(base, trained_adapters):
    """One mini-batch in two micro-batches, SGD: new adapters = adapters - lr · d loss(merge(base,
    adapters)) / d adapters, with the base (no adapters) as the KL reference."""
    batch, k, lr, temperature, kl_coef = make_batch(1), 4, 0.5, 0.7, 0.1
    step_cfg = train.StepConfig(
        n_train=k, mini_batch_prompts=P, micro_batch_rows=P * k // 2, random_select=False,
        recompute_old_logp=False, use_kl=True, dual_clip=3.0,
    )  # fmt: skip
    tx = optax.sgd(lr)
    step = train.build_train_step(CFG, step_cfg, tx, optax.constant_schedule(lr))
    hyper = train.StepHyper.make(temperature=temperature, kl_coef=kl_coef)
    state = train.init_state(copy(trained_adapters), tx)
    new_state, metrics = step(state, base, batch, jax.random.key(0), hyper)

    loss_fn = jax.jit(jax.value_and_grad(reference_loss), static_argnums=(3, 4, 5))
    loss, grads = loss_fn(trained_adapters, base, batch, k, temperature, kl_coef)
    expected = jax.tree.map(lambda a, g: a - lr * g, trained_adapters, grads)
    chex.assert_trees_all_close(new_state.params, expected, atol=2e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss), abs=1e-5)
    assert float(metrics["kl"]) > 0  # the trained adapters moved the policy off the base
    assert 0 < float(metrics["clip_frac"]) < 1


@pytest.fixture(scope="module")
def adam_step():
    step_cfg = train.StepConfig(n_train=4, mini_batch_prompts=2, micro_batch_rows=4)
    tx, lr_fn = train.make_optimizer(1e-2, total_updates=20, warmup_ratio=0.0)
    return tx, lr_fn, train.build_train_step(CFG, step_cfg, tx, lr_fn)


def test_only_adapters_train_and_the_base_is_the_reference(base, adam_step):
    """Fresh adapters: the first ratio is 1 and the KL to the base 0; after the step the state
    holds adapters and adapter-shaped Adam moments only, and the base is unchanged."""
    tx, _, step = adam_step
    adapters = lora.init_adapters(CFG, jax.random.key(1))
    before = jax.device_get(base)
    new_state, metrics = step(
        train.init_state(copy(adapters), tx), base, make_batch(), jax.random.key(3),
        train.StepHyper.make(),
    )  # fmt: skip
    assert abs(float(metrics["ratio_first_minibatch"]) - 1.0) < 1e-6
    assert float(metrics["grad_norm"]) > 0 and int(new_state.step) == 2
    assert jax.tree.structure(new_state.params) == jax.tree.structure(adapters)
    adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
    moments = [x for x in jax.tree.leaves(new_state.opt_state) if x.ndim > 0]
    assert moments and {x.shape for x in moments} == adapter_shapes
    assert len(moments) == 2 * len(jax.tree.leaves(adapters))  # Adam's mu and nu
    chex.assert_trees_all_equal(jax.device_get(base), before)
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(new_state.params)), jax.tree.leaves(adapters))]  # fmt: skip
    assert all(moved)  # B moves first; A moves in the second update, once B is not 0


def test_the_step_never_differentiates_the_base(base, adam_step):
    """The backward pass forms no gradient of a frozen weight: the LoRA step's temporaries are
    smaller than full fine-tuning's by more than one copy of the params (its gradients)."""
    tx, lr_fn, step = adam_step
    state = train.init_state(lora.init_adapters(CFG, jax.random.key(1)), tx)
    lowered = step.lower(state, base, make_batch(), jax.random.key(0), train.StepHyper.make())
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    compiled = lowered.compile()
    # Full fine-tuning holds the params' gradients and Adam moments (3 more copies) on top.
    full = train.build_train_step(
        CFG.replace(lora=None), train.StepConfig(n_train=4, mini_batch_prompts=2,
                                                 micro_batch_rows=4), tx, lr_fn,
    )  # fmt: skip
    full_state = train.init_state(copy(base), tx)
    full_compiled = full.lower(full_state, base, make_batch(), jax.random.key(0),
                               train.StepHyper.make()).compile()  # fmt: skip
    lora_temp = compiled.memory_analysis().temp_size_in_bytes
    full_temp = full_compiled.memory_analysis().temp_size_in_bytes
    assert lora_temp < full_temp - params_bytes, (lora_temp, full_temp, params_bytes)


def test_dropout_draws_masks_in_the_loss_only(base, trained_adapters):
    """With lora.dropout the loss's forward drops adapter inputs: the update changes, and the
    same key gives the same update."""
    cfg = CFG.replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    step_cfg = train.StepConfig(n_train=4, mini_batch_prompts=2, micro_batch_rows=4)
    tx = optax.sgd(0.1)
    hyper, batch = train.StepHyper.make(), make_batch(2)
    run = lambda c, key: train.build_train_step(c, step_cfg, tx, optax.constant_schedule(0.1))(
        train.init_state(copy(trained_adapters), tx), base, batch, key, hyper
    )
    plain, _ = run(CFG, jax.random.key(0))
    one, metrics = run(cfg, jax.random.key(0))
    again, _ = run(cfg, jax.random.key(0))
    chex.assert_trees_all_equal(one.params, again.params)
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one.params, plain.params)
    assert max(jax.tree.leaves(diff)) > 1e-4
    assert np.isfinite(float(metrics["loss"]))


def test_sharded_lora_step_equals_unsharded(base, trained_adapters):
    new_state = step_check.sharded_step_equals_unsharded(CFG, trained_adapters, base, make_batch(4))
    up_b = new_state.params["lora"]["layers"]["mlp"]["up_b"]
    assert up_b.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
