"""Attention by backend against the plain einsum reference: chunked online softmax and the Pallas
splash kernel (interpreted on CPU, compiled for a v5e topology), values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax import sharding
from ttrl_jax.model import attention
from ttrl_jax.model import decoder as model
from ttrl_jax.model.config import ModelConfig

TOL = dict(atol=2e-5, rtol=0)


def _qkv(B, T, S, Q, K, H, seed):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return draw(B, T, Q, H), draw(B, S, K, H), draw(B, S, K, H), rng


def _left_padded(lengths, S):
    return jnp.asarray(np.arange(S)[None, :] >= S - np.asarray(lengths)[:, None])


def _real_rows_BT(valid_BS, q_offset, T):
    """Queries with at least one key to attend (the rows every implementation must agree on)."""
    slot_S = np.arange(valid_BS.shape[1])
    causal_TS = slot_S[None, :] <= q_offset + np.arange(T)[:, None]
    return (causal_TS[None] & np.asarray(valid_BS)[:, None, :]).any(-1)


def _value_and_grads(impl, q, k, v, valid_BS, q_offset, w_BTQH, chunk=4, jit_offset=False):
    """out, and d(sum(out * w))/d(q, k, v) for one implementation."""

    def loss(q, k, v, offset):
        out = attention.attend(q, k, v, valid_BS, offset, impl=impl, chunk=chunk)
        return (out * w_BTQH).sum(), out

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    if jit_offset:  # the cache index as a traced scalar, as inside the sampler's jit
        grads, out = jax.jit(grad)(q, k, v, jnp.int32(q_offset))
    else:
        grads, out = grad(q, k, v, q_offset)
    return out, grads


def _assert_matches_plain(impl, q, k, v, valid_BS, q_offset=0, chunk=4, jit_offset=False):
    T = q.shape[1]
    real_BT = _real_rows_BT(valid_BS, q_offset, T)
    rng = np.random.default_rng(7)
    # The loss reads real rows only: padding rows may differ but must not reach these grads.
    w_BTQH = jnp.asarray(rng.standard_normal(q.shape) * real_BT[:, :, None, None], jnp.float32)
    ref, ref_grads = _value_and_grads("plain", q, k, v, valid_BS, q_offset, w_BTQH)
    out, grads = _value_and_grads(impl, q, k, v, valid_BS, q_offset, w_BTQH, chunk, jit_offset)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out)[real_BT], np.asarray(ref)[real_BT], **TOL)
    for g, g_ref, name in zip(grads, ref_grads, "qkv"):
        assert bool(jnp.isfinite(g).all()), name
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), err_msg=name, **TOL)


# name -> (B, T, Q, K, H, chunk, lengths): GQA, MQA, MHA, lengths that no chunk divides, a row
# with no real token, a sequence shorter than one chunk.
SELF_CASES = {
    "gqa_left_padding_odd_length": (3, 13, 4, 2, 8, 4, (13, 9, 4)),
    "mqa_all_padding_row": (2, 17, 4, 1, 8, 5, (11, 0)),
    "mha_one_chunk": (2, 5, 2, 2, 16, 8, (5, 3)),
    "gqa_chunk_of_one": (1, 6, 6, 2, 8, 1, (4,)),
}


@pytest.mark.parametrize("case", sorted(SELF_CASES))
def test_chunked_equals_plain_self_attention(case):
    B, T, Q, K, H, chunk, lengths = SELF_CASES[case]
    q, k, v, _ = _qkv(B, T, T, Q, K, H, seed=len(case))
    _assert_matches_plain("chunked", q, k, v, _left_padded(lengths, T), chunk=chunk)


@pytest.mark.parametrize(
    "T,q_offset,jit_offset",
    [(5, 8, False), (5, 8, True), (1, 13, True), (3, 0, False)],
    ids=["prefill_after_prompt", "prefill_traced_index", "decode", "first_chunk"],
)
def test_chunked_equals_plain_cached(T, q_offset, jit_offset):
    """A chunk written at slot q_offset of a 19-slot cache whose prompt part is left-padded."""
    B, S, Q, K, H = 3, 19, 4, 2, 8
    q, k, v, rng = _qkv(B, T, S, Q, K, H, seed=T + q_offset)
    prompt_valid_BS = np.arange(S)[None, :] >= np.array([0, 3, 6])[:, None]
    chunk_valid_BT = rng.random((B, T)) < 0.8  # some new tokens are padding too
    valid_BS = prompt_valid_BS & (np.arange(S)[None, :] < q_offset)
    valid_BS[:, q_offset : q_offset + T] = chunk_valid_BT
    _assert_matches_plain(
        "chunked", q, k, v, jnp.asarray(valid_BS), q_offset, chunk=4, jit_offset=jit_offset
    )


def test_chunked_skips_future_and_unwritten_key_blocks():
    """Keys after the last query's slot are never read: NaNs there do not reach the output."""
    B, S, Q, K, H = 2, 16, 4, 2, 8
    q, k, v, _ = _qkv(B, 2, S, Q, K, H, seed=3)
    poisoned = lambda x: x.at[:, 8:].set(jnp.nan)
    valid_BS = jnp.asarray(np.arange(S) < 6)[None].repeat(B, 0)
    out = attention.attend(q, poisoned(k), poisoned(v), valid_BS, 4, impl="chunked", chunk=4)
    ref = attention.attend(q, k, v, valid_BS, 4, impl="plain")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)


def _shared_prompt_row(B, T, M, R, rng):
    """valid_BS and segment_BS of rows [left-padded prompt | M responses of R, each ending early
    or not], as rl/logprobs.py lays them out."""
    segment_S = np.concatenate([np.zeros(T, np.int32), np.repeat(np.arange(1, M + 1), R)])
    prompt_BT = np.arange(T)[None] >= rng.integers(0, T, (B, 1))
    response_BMR = np.arange(R)[None, None] < rng.integers(1, R + 1, (B, M, 1))
    valid_BS = np.concatenate([prompt_BT, response_BMR.reshape(B, M * R)], axis=1)
    return jnp.asarray(valid_BS), jnp.asarray(np.broadcast_to(segment_S, valid_BS.shape))


def _segment_reference(q, k, v, valid_BS, segment_BS):
    """The segment rule written out: each query attends through an explicit [B, T, S] mask."""
    seg = np.asarray(segment_BS)
    S = seg.shape[1]
    mask_BTS = np.asarray(valid_BS)[:, None, :] & (np.arange(S)[None, :] <= np.arange(S)[:, None])
    mask_BTS &= (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    K, H = k.shape[2], k.shape[3]
    k_BSQH, v_BSQH = (jnp.repeat(x, q.shape[2] // K, axis=2) for x in (k, v))
    s_BQTS = jnp.einsum("BTQH,BSQH->BQTS", q, k_BSQH) / np.sqrt(H)
    p_BQTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], s_BQTS, -1e30), axis=-1)
    return jnp.einsum("BQTS,BSQH->BTQH", p_BQTS, v_BSQH), mask_BTS.any(-1)


@pytest.mark.parametrize("impl,chunk", [("plain", 64), ("chunked", 4), ("chunked", 3)])
def test_shared_prompt_segments_by_attention(impl, chunk):
    """Rows of a prompt and its responses: every response attends to the prompt and to itself,
    never to another response; chunked (block-skipping) equals plain, values and gradients."""
    B, T, M, R, Q, K, H = 2, 5, 3, 4, 4, 2, 8
    rng = np.random.default_rng(chunk)
    valid_BS, segment_BS = _shared_prompt_row(B, T, M, R, rng)
    q, k, v, _ = _qkv(B, T + M * R, T + M * R, Q, K, H, seed=5)
    ref, real_BT = _segment_reference(q, k, v, valid_BS, segment_BS)
    w_BTQH = jnp.asarray(rng.standard_normal(q.shape) * real_BT[:, :, None, None], jnp.float32)

    def loss(q, k, v, impl, chunk):
        out = attention.attend(q, k, v, valid_BS, impl=impl, chunk=chunk, segment_BS=segment_BS)
        return (out * w_BTQH).sum(), out

    grads, out = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v, impl, chunk)
    ref_grads, _ = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v, "plain", 64)
    np.testing.assert_allclose(np.asarray(out)[real_BT], np.asarray(ref)[real_BT], **TOL)
    for g, g_ref, name in zip(grads, ref_grads, "qkv"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), err_msg=name, **TOL)


def test_chunked_skips_blocks_of_other_responses():
    """A key block holding only another response's keys is never read: NaNs there stay out."""
    B, T, M, R, Q, K, H = 1, 4, 3, 4, 4, 2, 8
    valid_BS = jnp.ones((B, T + M * R), bool)
    segment_BS = jnp.asarray(np.repeat(np.arange(M + 1), R)[None])
    q, k, v, _ = _qkv(B, T + M * R, T + M * R, Q, K, H, seed=9)
    poisoned = lambda x: x.at[:, T : T + R].set(jnp.nan)  # response 1's keys and values
    out = attention.attend(
        q, poisoned(k), poisoned(v), valid_BS, impl="chunked", chunk=4, segment_BS=segment_BS
    )
    ref = attention.attend(q, k, v, valid_BS, impl="plain", segment_BS=segment_BS)
    later = slice(T + R, None)  # responses 2 and 3
    np.testing.assert_allclose(np.asarray(out)[:, later], np.asarray(ref)[:, later], **TOL)


def test_segments_need_self_attention():
    q, k, v, _ = _qkv(1, 2, 6, 2, 1, 8, seed=0)
    with pytest.raises(ValueError, match="self-attention"):
        attention.attend(
            q, k, v, jnp.ones((1, 6), bool), 4, segment_BS=jnp.zeros((1, 6), jnp.int32)
        )


def test_pallas_interpreted_equals_plain():
    q, k, v, _ = _qkv(2, 20, 20, 4, 2, 8, seed=11)
    _assert_matches_plain("pallas", q, k, v, _left_padded((20, 13), 20))


@pytest.mark.parametrize("mesh_shape,Q,K", [((2, 2), 4, 2), ((1, 4), 4, 2), ((2, 2), 8, 2)])
def test_pallas_sharded_equals_plain(mesh_shape, Q, K):
    """Under shard_map: batch over data, heads over model; with K=2 over 4 model shards each
    shard takes the kv head of its query heads."""
    d, m = mesh_shape
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: d * m])
    q, k, v, _ = _qkv(2, 20, 20, Q, K, 8, seed=Q * m)
    valid_BS = _left_padded((20, 9), 20)
    w_BTQH = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
    w_BTQH = w_BTQH * valid_BS[:, :, None, None]
    rep = sharding.replicated(mesh)
    args = [jax.device_put(x, rep) for x in (q, k, v, valid_BS, w_BTQH)]

    def loss(impl, q, k, v, valid_BS, w_BTQH):
        return (attention.attend(q, k, v, valid_BS, impl=impl) * w_BTQH).sum()

    grads = {
        impl: jax.jit(
            sharding.with_rules(
                jax.grad(lambda *a, i=impl: loss(i, *a), (0, 1, 2)), mesh, sharding.TRAIN_RULES
            )  # fmt: skip
        )(*args)
        for impl in ("plain", "pallas")
    }
    for g, g_ref in zip(grads["pallas"], grads["plain"]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), **TOL)


def test_choose_on_cpu():
    assert sharding.active_platform() == "cpu"
    assert attention.choose("auto", 16, 16, 0, chunk=512) == "plain"  # one chunk: plain
    assert attention.choose("auto", 1024, 1024, 0, chunk=512) == "chunked"
    assert attention.choose("pallas", 1, 40, jnp.int32(7), chunk=512) == "chunked"  # decode
    with pytest.raises(ValueError, match=r"unknown attention 'flash'; choose one of"):
        attention.choose("flash", 4, 4, 0, chunk=4)
    with pytest.raises(ValueError, match=r"unknown attention 'flash'"):
        ModelConfig.tiny(attention="flash")


def test_choose_for_a_tpu_mesh(v5e_devices):
    """Compiling for TPU devices picks the kernel even though this process runs on CPU."""
    with sharding.activate(sharding.make_mesh((2, 2), v5e_devices), sharding.TRAIN_RULES):
        assert sharding.active_platform() == "tpu"
        assert attention.choose("auto", 16, 16, 0, chunk=512) == "pallas"
        assert attention.choose("auto", 1, 40, jnp.int32(7), chunk=512) == "plain"  # decode
        assert attention.choose("auto", 1, 4096, jnp.int32(7), chunk=512) == "chunked"


def test_pallas_compiles_for_v5e(v5e_devices):
    """Forward and backward of the splash kernel, sharded over a 2x2 v5e slice, by XLA:TPU."""
    mesh, rules = sharding.make_mesh((2, 2), v5e_devices), sharding.TRAIN_RULES
    B, T, Q, K, H = 4, 512, 4, 2, 128

    def abstract(shape, dtype, *names):
        named = jax.sharding.NamedSharding(mesh, sharding.mesh_axes_for(names, rules))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=named)

    q = abstract((B, T, Q, H), jnp.bfloat16, "batch", "seq", "heads", "head_dim")
    k = abstract((B, T, K, H), jnp.bfloat16, "batch", "seq", "kv_heads", "head_dim")
    valid = abstract((B, T), jnp.bool_, "batch", "seq")

    def compile_grad(impl):
        def loss(q, k, v, valid_BS):
            return attention.attend(q, k, v, valid_BS, impl=impl).astype(jnp.float32).sum()

        fn = sharding.with_rules(jax.grad(loss, (0, 1, 2)), mesh, rules)
        # The suite sets "highest" for CPU parity; TPU runs use the default (see attention.py).
        with jax.default_matmul_precision("default"):
            return jax.jit(fn).lower(q, k, k, valid).compile()

    kernel, plain = compile_grad("auto"), compile_grad("plain")
    assert "tpu_custom_call" in kernel.as_text()  # the Pallas kernels, not an XLA fallback
    assert "tpu_custom_call" not in plain.as_text()
    # Less than one device's T×T scores of all its heads (f32), forward and backward.
    scores_bytes = (B // 2) * (Q // 2) * T * T * 4
    assert kernel.memory_analysis().temp_size_in_bytes < scores_bytes


# ----------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_model_forward_and_cached_decoding_by_attention(impl):
    """model.forward with each attention equals plain: full forward, prefill and decode."""
    plain = ModelConfig.tiny("qwen3", num_heads=4, num_kv_heads=2)
    cfg = plain.replace(attention=impl, attention_chunk=4)
    params = model.init_params(plain, jax.random.key(0))
    T = 11
    tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, plain.vocab_size, (2, T)))
    mask_BT = _left_padded((11, 6), T)
    positions_BT = model.left_pad_positions(mask_BT)
    forward = jax.jit(model.forward, static_argnums=0)
    ref, _ = forward(plain, params, tokens_BT, positions_BT, mask_BT)
    out, _ = forward(cfg, params, tokens_BT, positions_BT, mask_BT)
    real = np.asarray(mask_BT)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-4, rtol=0)

    cache = model.init_cache(cfg, batch=2, max_len=T)
    logits = []
    for start, stop in [(0, 7)] + [(t, t + 1) for t in range(7, T)]:
        cols = slice(start, stop)
        out_BTV, cache = forward(
            cfg, params, tokens_BT[:, cols], positions_BT[:, cols], mask_BT[:, cols], cache
        )
        logits.append(np.asarray(out_BTV))
    decoded = np.concatenate(logits, axis=1)
    np.testing.assert_allclose(decoded[real], np.asarray(ref)[real], atol=1e-4, rtol=0)
    # A prefill that fills its cache is self-attention: the kernel's case.
    full, cache = forward(
        cfg, params, tokens_BT, positions_BT, mask_BT, model.init_cache(cfg, batch=2, max_len=T)
    )
    assert int(cache.index) == T
    np.testing.assert_allclose(np.asarray(full)[real], np.asarray(ref)[real], atol=1e-4, rtol=0)
