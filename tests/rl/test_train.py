"""The compiled TTRL step against slow, obvious references."""

import functools
from collections import Counter

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.model import config as model_config
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import advantages, logprobs, train, vote
from ttrl_jax.rl.batch import StepBatch
from ttrl_jax.sampling import sampler, token_draw

from . import step_check

CFG = ModelConfig.tiny("qwen2", num_heads=8, num_kv_heads=4)
P, N, T, R = 4, 6, 5, 4


def make_batch(seed=0, answer_id_PN=None, gold_id_P=None):
    rng = np.random.default_rng(seed)
    lengths_PN = rng.integers(1, R + 1, (P, N))
    rmask = np.arange(R)[None, None] < lengths_PN[..., None]
    if answer_id_PN is None:
        answer_id_PN = np.array(
            [[0, 0, 1, 0, -1, 2], [0, 1, 1, 2, 1, 0], [-1, -1, -1, -1, -1, -1], [0, 0, 0, 0, 0, 0]]
        )
    if gold_id_P is None:
        gold_id_P = np.array([0, 2, -1, 1])
    return StepBatch(
        prompt_PT=jnp.asarray(rng.integers(0, CFG.vocab_size, (P, T)), jnp.int32),
        prompt_mask_PT=jnp.asarray(np.arange(T)[None] >= rng.integers(0, 3, (P, 1))),
        response_PNR=jnp.asarray(rng.integers(0, CFG.vocab_size, (P, N, R)), jnp.int32),
        response_mask_PNR=jnp.asarray(rmask),
        logp_PNR=jnp.asarray(rng.normal(-2.0, 0.3, (P, N, R)), jnp.float32),
        entropy_PNR=jnp.asarray(rng.uniform(0.5, 2.0, (P, N, R)), jnp.float32),
        answer_id_PN=jnp.asarray(answer_id_PN, jnp.int32),
        gold_id_P=jnp.asarray(gold_id_P, jnp.int32),
    )


def params_copy(params):
    return jax.tree.map(jnp.copy, params)


@pytest.fixture(scope="module")
def params():
    return model_lib.init_params(CFG, jax.random.key(0))


def naive_advantages(answer_id_PN, k):
    """Majority vote with Counter (first-seen wins ties), then (r - mean) / (std + eps)."""
    out = np.zeros((len(answer_id_PN), k))
    for p, row in enumerate(np.asarray(answer_id_PN)):
        counts = Counter(int(a) for a in row if a >= 0)
        majority = counts.most_common(1)[0][0] if counts else None
        r = np.array([float(a == majority) for a in row[:k]])
        if r.max() != r.min():
            out[p] = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    return out


def naive_loss(params, batch, old_PMR, ref_params, adv_PM, k, temp, kl_coef, clip, dual):
    """Token-mean clipped PPO + k3 KL, one response and one token at a time."""
    total, count = 0.0, 0
    for p in range(P):
        for n in range(k):
            tokens = jnp.concatenate([batch.prompt_PT[p], batch.response_PNR[p, n]])
            mask = jnp.concatenate([batch.prompt_mask_PT[p], batch.response_mask_PNR[p, n]])
            pos = jnp.maximum(jnp.cumsum(mask) - 1, 0)
            logits = model_lib.forward(CFG, params, tokens[None], pos[None], mask[None])[0][0]
            ref = model_lib.forward(CFG, ref_params, tokens[None], pos[None], mask[None])[0][0]
            for r in range(R):
                if not batch.response_mask_PNR[p, n, r]:
                    continue
                tok = batch.response_PNR[p, n, r]
                lp = jax.nn.log_softmax(logits[T - 1 + r] / temp)[tok]
                lp_ref = jax.nn.log_softmax(ref[T - 1 + r] / temp)[tok]
                a = adv_PM[p, n]
                ratio = jnp.exp(lp - old_PMR[p, n, r])
                loss = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1 - clip, 1 + clip))
                if a < 0:
                    loss = jnp.minimum(loss, -a * dual)
                d = lp_ref - lp
                total = total + loss + kl_coef * (jnp.exp(d) - d - 1)
                count += 1
    return total / count


def test_response_logp_matches_full_forward(params):
    batch = make_batch()
    p, pm = batch.prompt_PT, batch.prompt_mask_PT
    r, rm = batch.response_PNR[:, 0], batch.response_mask_PNR[:, 0]
    out = logprobs.response_logp(
        CFG, params, p, pm, r, rm, jnp.float32(0.7), with_entropy=True,
        with_self_certainty=True, with_features=True, logit_chunk=3,
    )  # fmt: skip
    tokens, mask, pos = logprobs.sequence_inputs(p, pm, r, rm)
    logits = model_lib.forward(CFG, params, tokens, pos, mask)[0][:, T - 1 : T + R - 1]
    logp_all = jax.nn.log_softmax(logits / 0.7)
    chex.assert_trees_all_close(
        out["logp_BR"], jnp.take_along_axis(logp_all, r[..., None], -1)[..., 0], atol=1e-5
    )
    chex.assert_trees_all_close(
        out["entropy_BR"], -(jnp.exp(logp_all) * logp_all).sum(-1), atol=1e-5
    )
    chex.assert_shape(out["feature_BD"], (P, CFG.embed_dim))
    chex.assert_shape(out["self_certainty_BR"], (P, R))


@pytest.mark.parametrize("tie", [True, False])
def test_response_logp_gradient_matches_full_forward(tie):
    """The log-prob path's own VJP (chunks of 3 positions, the last one padded) against
    autodiff through the full forward's log_softmax."""
    cfg = CFG.replace(tie_embeddings=tie)
    params = model_lib.init_params(cfg, jax.random.key(1))
    batch = make_batch(2)
    p, pm = batch.prompt_PT, batch.prompt_mask_PT
    r, rm = batch.response_PNR[:, 1], batch.response_mask_PNR[:, 1]
    w_PR = jnp.asarray(np.random.default_rng(0).normal(size=r.shape), jnp.float32)

    def ours(params):
        logp = logprobs.response_logp(cfg, params, p, pm, r, rm, jnp.float32(0.7), logit_chunk=3)
        return (logp["logp_BR"] * w_PR).sum()

    def reference(params):
        tokens, mask, pos = logprobs.sequence_inputs(p, pm, r, rm)
        logits = model_lib.forward(cfg, params, tokens, pos, mask)[0][:, T - 1 : T + R - 1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), r[..., None], -1)[..., 0]
        return (logp * w_PR).sum()

    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_shared_prompt_rows_give_each_rows_log_probs_and_gradients(tie):
    """group=N: one row per prompt holding its N responses, against one row per response (log-
    probs, entropies and features at real positions; gradients of a weighted sum)."""
    cfg = CFG.replace(tie_embeddings=tie)
    params = model_lib.init_params(cfg, jax.random.key(2))
    batch = make_batch(3)
    rows = lambda x: jnp.repeat(x, N, axis=0)
    p, pm = rows(batch.prompt_PT), rows(batch.prompt_mask_PT)
    r, rm = batch.response_PNR.reshape(P * N, R), batch.response_mask_PNR.reshape(P * N, R)
    w_BR = jnp.asarray(np.random.default_rng(1).normal(size=r.shape), jnp.float32) * rm

    def run(group, packed_len=None):
        def f(params):
            out = logprobs.response_logp(
                cfg, params, p, pm, r, rm, jnp.float32(0.7), with_entropy=True,
                with_features=True, logit_chunk=3, group=group, packed_len=packed_len,
            )  # fmt: skip
            return (out["logp_BR"] * w_BR).sum(), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (ref_value, alone), ref_grads = run(1)
    # Packed at real lengths: exactly the rows' real tokens, and with padding after them.
    need = logprobs.packed_length(
        np.asarray(pm[::N]).sum(-1), np.asarray(rm).reshape(P, N, R).sum(-1), 1, T + N * R
    )
    assert need < T + N * R  # the batch has padding to drop
    for packed_len in (None, need, need + 5):
        (value, shared), grads = run(N, packed_len)
        for name in ("logp_BR", "entropy_BR"):
            np.testing.assert_allclose(
                np.where(rm, shared[name], 0), np.where(rm, alone[name], 0), atol=2e-5
            )
        np.testing.assert_allclose(shared["feature_BD"], alone["feature_BD"], atol=2e-5)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        chex.assert_trees_all_close(grads, ref_grads, atol=2e-5)


def test_packed_layout_by_hand():
    """Prompt [_ a b] (one pad), responses [c d _], [_ _ _] (empty, e.g. not drawn), [e _ _]."""
    prompt_mask = jnp.array([[False, True, True]])
    response_mask = jnp.array([[[True, True, False], [False] * 3, [True, False, False]]])
    layout = logprobs.packed_layout(prompt_mask, response_mask, 7)
    # slots: a b c d e pad pad; sources index [prompt (3) | responses (3 x 3)]
    np.testing.assert_array_equal(layout.source_PS, [[1, 2, 3, 4, 9, 0, 0]])
    np.testing.assert_array_equal(layout.positions_PS, [[0, 1, 2, 3, 2, 0, 0]])
    np.testing.assert_array_equal(layout.segment_PS, [[0, 0, 1, 1, 3, -1, -1]])
    np.testing.assert_array_equal(layout.mask_PS, [[True] * 5 + [False] * 2])
    np.testing.assert_array_equal(layout.end_P, [5])
    # c from b's slot, d from c's; e (response 2's first token) from b's slot too
    np.testing.assert_array_equal(layout.slot_PMR[0, 0, :2], [1, 2])
    assert int(layout.slot_PMR[0, 2, 0]) == 1
    assert logprobs.packed_length(np.array([2, 3]), np.array([[2, 0, 1], [4, 4, 1]]), 4, 30) == 12
    assert logprobs.packed_length(np.array([2, 3]), np.array([[2, 0, 1], [4, 4, 1]]), 64, 30) == 30


def test_shared_prompt_rows_need_whole_groups(params):
    batch = make_batch()
    p, pm = batch.prompt_PT, batch.prompt_mask_PT
    r, rm = batch.response_PNR[:, 0], batch.response_mask_PNR[:, 0]
    with pytest.raises(ValueError, match="groups of 3 rows per prompt"):
        logprobs.response_logp(CFG, params, p, pm, r, rm, jnp.float32(1.0), group=3)


@pytest.mark.parametrize(
    "attention,platform,T,R,rows_micro,share,group",
    [
        ("auto", "cpu", 64, 32, 16, True, 8),  # T + M·R = 320: one chunk
        ("auto", "cpu", 128, 256, 16, True, 8),  # past one chunk: the chunked loop skips blocks
        ("auto", "tpu", 64, 32, 16, True, 8),
        ("auto", "tpu", 128, 256, 16, True, 1),  # would leave the splash kernel
        ("pallas", "cpu", 128, 256, 16, True, 1),
        ("auto", "cpu", 64, 32, 12, True, 1),  # micro-batches split a prompt's rows
        ("auto", "cpu", 64, 32, 16, False, 1),
    ],
)
def test_prompt_group(monkeypatch, attention, platform, T, R, rows_micro, share, group):
    monkeypatch.setattr(sharding_lib, "active_platform", lambda: platform)
    sc = train.StepConfig(n_train=8, share_prompts=share)
    assert train.prompt_group(CFG.replace(attention=attention), sc, T, R, rows_micro) == group


def test_update_equals_naive_sgd_step(params):
    """One mini-batch of two micro-batches, SGD: new params = params - lr * grad(naive loss)."""
    batch = make_batch(1)
    k, lr, temp, kl_coef = 4, 0.5, 0.7, 0.1
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    step_cfg = train.StepConfig(
        n_train=k, mini_batch_prompts=P, micro_batch_rows=P * k // 2, random_select=False,
        recompute_old_logp=False, use_kl=True, dual_clip=3.0,
    )  # fmt: skip
    tx = optax.sgd(lr)
    step = train.build_train_step(CFG, step_cfg, tx, optax.constant_schedule(lr))
    hyper = train.StepHyper.make(temperature=temp, kl_coef=kl_coef)
    state = train.init_state(params_copy(params), tx)
    new_state, metrics = step(state, params_copy(ref_params), batch, jax.random.key(0), hyper)

    adv = naive_advantages(batch.answer_id_PN, k)
    old = batch.logp_PNR[:, :k]
    grads = jax.grad(naive_loss)(params, batch, old, ref_params, adv, k, temp, kl_coef, 0.2, 3.0)
    expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    chex.assert_trees_all_close(new_state.params, expected, atol=2e-6)
    assert 0 < float(metrics["clip_frac"]) < 1  # the random old log-probs exercise the clip
    assert int(new_state.step) == 1


@pytest.fixture(scope="module")
def default_step():
    step_cfg = train.StepConfig(n_train=4, mini_batch_prompts=2, micro_batch_rows=4)
    tx, lr_fn = train.make_optimizer(1e-2, total_updates=20, warmup_ratio=0.0)
    return step_cfg, tx, lr_fn, train.build_train_step(CFG, step_cfg, tx, lr_fn)


def test_on_policy_first_ratio_is_one_and_kl_zero(params, default_step):
    _, tx, _, step = default_step
    state = train.init_state(params_copy(params), tx)
    _, metrics = step(state, params_copy(params), make_batch(), jax.random.key(3),
                      train.StepHyper.make())  # fmt: skip
    assert abs(float(metrics["ratio_first_minibatch"]) - 1.0) < 1e-6
    assert float(metrics["grad_norm"]) > 0
    chex.assert_shape(metrics["loss"], ())


def test_zero_advantage_gives_zero_loss_and_no_change(params):
    """Every group agrees: advantages, loss and gradients are exactly 0."""
    batch = make_batch(2, answer_id_PN=np.zeros((P, N), int))
    step_cfg = train.StepConfig(n_train=3, mini_batch_prompts=1, use_kl=False)
    tx = optax.sgd(1.0)
    step = train.build_train_step(CFG, step_cfg, tx, optax.constant_schedule(1.0))
    state = train.init_state(params_copy(params), tx)
    new_state, metrics = step(state, None, batch, jax.random.key(0), train.StepHyper.make())
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0
    chex.assert_trees_all_equal(new_state.params, params)


def test_rollout_metrics_hand_computed():
    batch = make_batch()
    majority_P, ratio_P = jnp.array([0, 1, -1, 0]), jnp.array([3, 3, 0, 6]) / 6
    m = train.rollout_metrics(
        batch, majority_P, ratio_P, jnp.zeros((P, 4)), jnp.zeros((P, 4)), jnp.ones(P)
    )
    # Gold known for prompts 0, 1, 3: majorities 0 (right), 1 (wrong), 0 (wrong).
    assert float(m["label_accuracy"]) == pytest.approx(1 / 3)
    # Prompt 0: vote rewards [1,1,0,1,0,0] vs gold [1,1,0,1,0,0] -> 1; prompt 1: vote
    # [0,1,1,0,1,0] vs gold [0,0,0,1,0,0] -> 2/6; prompt 3: vote all 1 vs gold all 0 -> 0.
    assert float(m["reward_accuracy"]) == pytest.approx((1 + 2 / 6 + 0) / 3)
    assert float(m["pass_at_n_vote"]) == pytest.approx(2 / 3)
    assert float(m["rollout_accuracy"]) == pytest.approx((3 / 6 + 1 / 6 + 0) / 3)
    assert float(m["majority_ratio"]) == pytest.approx(12 / 24)
    assert float(m["answered"]) == pytest.approx(17 / 24)


def test_step_has_no_host_callbacks(params, default_step):
    _, tx, _, step = default_step
    state = train.init_state(params_copy(params), tx)
    hlo = step.lower(
        state, params, make_batch(), jax.random.key(0), train.StepHyper.make()
    ).as_text()
    assert "callback" not in hlo.lower()


def test_packed_step_equals_the_unpacked_step(params):
    """Rows packed at the trained responses' real lengths (the host's length for the step's own
    choice of responses, with KL and recomputed old log-probs): the update and metrics of the
    T + M·R rows; a length too short is reported, never dropped silently."""
    step_cfg = train.StepConfig(n_train=4, mini_batch_prompts=2, micro_batch_rows=4)
    tx = optax.sgd(0.1)
    step = train.build_train_step(CFG, step_cfg, tx, optax.constant_schedule(0.1))
    batch, key = make_batch(5), jax.random.key(7)
    hyper = train.StepHyper.make(temperature=0.7, kl_coef=0.1)
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    packed_len = train.packed_length(CFG, step_cfg, batch, key, 1)
    assert packed_len < T + 4 * R
    assert train.packed_length(CFG, step_cfg, batch, key, 0) is None  # off

    def run(**kw):
        state = train.init_state(params_copy(params), tx)
        return step(state, params_copy(ref_params), batch, key, hyper, **kw)

    ref_state, ref_metrics = run()
    state, metrics = run(packed_len=packed_len)
    chex.assert_trees_all_close(state.params, ref_state.params, atol=2e-6)
    assert int(metrics.pop("packed_overflow")) == 0
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
    _, short = run(packed_len=packed_len - 1)
    assert int(short["packed_overflow"]) >= 1


def test_sharded_step_equals_unsharded(params):
    new_state = step_check.sharded_step_equals_unsharded(CFG, params, params, make_batch(4))
    gate = new_state.params["params"]["layers"]["mlp"]["gate"]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model")


def _logp_loss(cfg):
    batch = make_batch()
    args = (batch.prompt_PT, batch.prompt_mask_PT, batch.response_PNR[:, 0],
            batch.response_mask_PNR[:, 0], jnp.float32(1.0))  # fmt: skip
    return lambda p: logprobs.response_logp(cfg, p, *args)["logp_BR"].sum()


@pytest.mark.parametrize(
    "remat,attention",
    [(True, "plain")]
    + [(name, "plain") for name in model_config.REMAT_POLICIES]
    # The chunked VJP's saved outputs must be the ones its backward pass reads.
    + [("attention", "chunked"), ("dots_no_batch+attention", "chunked")],
)
def test_remat_gives_the_same_gradients(params, remat, attention, no_remat_grads):
    """model.remat trades compute for memory; the gradients must not change."""
    cfg = CFG.replace(attention=attention, attention_chunk=4, remat=remat)
    grads = jax.jit(jax.grad(_logp_loss(cfg)))(params)
    chex.assert_trees_all_close(grads, no_remat_grads(attention), atol=1e-6)


@pytest.fixture(scope="module")
def no_remat_grads(params):
    @functools.cache
    def grads(attention):
        cfg = CFG.replace(attention=attention, attention_chunk=4)
        return jax.jit(jax.grad(_logp_loss(cfg)))(params)

    return grads


def test_remat_policies_keep_what_they_name(params):
    """Bytes held for the backward pass (the residuals of jax.vjp), policy by policy."""

    def residual_bytes(remat):
        _, vjp_fn = jax.vjp(_logp_loss(CFG.replace(attention="plain", remat=remat)), params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))

    kept = {name: residual_bytes(name) for name in ("none", *model_config.REMAT_POLICIES)}
    assert residual_bytes(True) == kept["block"]
    assert kept["block"] < kept["dots_no_batch"] < kept["dots"] < kept["none"]
    # "attention" keeps exactly each layer's attention output [B, T+R, Q, H] in float32.
    B, S = P, T + R
    attention_outputs = CFG.num_layers * B * S * CFG.num_heads * CFG.head_dim * 4
    assert kept["attention"] - kept["block"] == attention_outputs
    assert kept["dots_no_batch+attention"] - kept["dots_no_batch"] == attention_outputs
    assert CFG.replace(remat="none").remat is False and CFG.replace(remat=True).remat == "block"
    with pytest.raises(ValueError, match=r"unknown remat 'dot'; choose false, true, 'none' or"):
        CFG.replace(remat="dot")


def ragged(batch, drawn_P, seed):
    """`batch` with only the first drawn_P[p] slots of prompt p drawn; the empty slots hold
    garbage that depends on `seed` (the step must not read it)."""
    rng = np.random.default_rng(seed)
    drawn_PN = np.arange(N)[None] < np.asarray(drawn_P)[:, None]
    garbage = lambda x, hi: np.where(
        drawn_PN.reshape(drawn_PN.shape + (1,) * (x.ndim - 2)), x, rng.integers(0, hi, x.shape)
    )
    return batch.replace(
        response_PNR=jnp.asarray(garbage(np.asarray(batch.response_PNR), CFG.vocab_size)),
        logp_PNR=jnp.asarray(garbage(np.asarray(batch.logp_PNR), 5), jnp.float32),
        response_mask_PNR=jnp.asarray(np.asarray(batch.response_mask_PNR) & drawn_PN[..., None]),
        answer_id_PN=jnp.asarray(np.where(drawn_PN, batch.answer_id_PN, -2), jnp.int32),
    )


def test_ragged_groups_equal_the_groups_given_whole(params):
    """Groups of 4 drawn slots out of N = 6 train exactly as a batch of N = 4."""
    step_cfg = train.StepConfig(n_train=3, mini_batch_prompts=2, random_select=False)
    tx = optax.sgd(0.1)
    step = train.build_train_step(CFG, step_cfg, tx, optax.constant_schedule(0.1))
    hyper, key = train.StepHyper.make(), jax.random.key(0)
    batch = make_batch(5)
    out = step(train.init_state(params_copy(params), tx), params_copy(params),
               ragged(batch, [4] * P, 1), key, hyper)  # fmt: skip
    whole = jax.tree.map(lambda x: x[:, :4] if x.ndim >= 2 and x.shape[1] == N else x, batch)
    whole = whole.replace(prompt_PT=batch.prompt_PT, prompt_mask_PT=batch.prompt_mask_PT)
    expected = step(train.init_state(params_copy(params), tx), params_copy(params), whole, key,
                    hyper)  # fmt: skip
    chex.assert_trees_all_close(out[0].params, expected[0].params, atol=1e-7)
    for k, v in expected[1].items():
        assert float(out[1][k]) == pytest.approx(float(v), abs=1e-6), k


@pytest.mark.parametrize("random_select", [False, True])
def test_ragged_groups_never_read_empty_slots(params, random_select):
    step_cfg = train.StepConfig(n_train=3, mini_batch_prompts=2, random_select=random_select)
    tx = optax.sgd(0.1)
    step = train.build_train_step(CFG, step_cfg, tx, optax.constant_schedule(0.1))
    hyper, key, batch = train.StepHyper.make(), jax.random.key(2), make_batch(6)
    drawn_P = [3, 6, 4, 5]
    runs = [
        step(train.init_state(params_copy(params), tx), params_copy(params),
             ragged(batch, drawn_P, seed), key, hyper)
        for seed in (1, 2)
    ]  # fmt: skip
    chex.assert_trees_all_equal(runs[0][0].params, runs[1][0].params)
    chex.assert_trees_all_equal(runs[0][1], runs[1][1])
    assert float(runs[0][1]["votes_drawn"]) == pytest.approx(np.mean(drawn_P))
    # The vote of a short group is the vote of its drawn answers alone.
    answer_PN = ragged(batch, drawn_P, 1).answer_id_PN
    majority_P, ratio_P = vote.majority_vote(answer_PN)
    for p, n in enumerate(drawn_P):
        m, r = vote.majority_vote(batch.answer_id_PN[p : p + 1, :n])
        assert int(majority_P[p]) == int(m[0]) and float(ratio_P[p]) == pytest.approx(float(r[0]))
    index_PM = advantages.select_responses(key, P, N, 3, random_select, vote.drawn(answer_PN))
    assert all((np.asarray(index_PM)[p] < n).all() for p, n in enumerate(drawn_P))


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_the_samplers_log_probs_are_the_recomputed_ones(params, top_p):
    # optim.old_logp=auto takes the sampler's log-probs in float32 instead of recomputing them
    # before the updates: they must be the step's own, to float rounding. A top-p filter
    # changes which tokens are drawn, not the log-prob reported for them.
    rng, k, temperature = np.random.default_rng(5), 3, 0.7
    prompt_PT = jnp.asarray(rng.integers(1, CFG.vocab_size, (P, T)), jnp.int32)
    mask_PT = jnp.asarray(np.arange(T)[None] >= np.array([[0], [2], [4], [1]]))
    sampling = token_draw.SamplingParams.make(temperature=temperature, top_p=top_p)
    out = sampler.sample(
        params, CFG, prompt_PT, mask_PT, jax.random.key(1), sampling, n_samples=k,
        max_new_tokens=R, stop_ids=[], pad_id=0,
    )  # fmt: skip
    rows = lambda x: jnp.repeat(x, k, axis=0)
    mask_BR = out.mask_PNR.reshape(P * k, R)
    recomputed = logprobs.response_logp(
        CFG, params, rows(prompt_PT), rows(mask_PT), out.tokens_PNR.reshape(P * k, R), mask_BR,
        jnp.float32(temperature),
    )["logp_BR"]  # fmt: skip
    assert CFG.dtype == "float32" and bool(mask_BR.any())
    np.testing.assert_allclose(
        np.where(mask_BR, recomputed, 0), out.logp_PNR.reshape(P * k, R), atol=2e-5
    )
