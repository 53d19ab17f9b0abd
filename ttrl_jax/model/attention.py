"""Attention maths by backend: plain einsum (the reference), chunked online softmax, Pallas TPU.

Every implementation computes the same masked softmax. Query t of a chunk sits at slot
`q_offset + t` and attends key slot s iff `valid_BS[b, s]` and `s <= q_offset + t`: causal,
left padding (invalid keys are never attended), and the cached case (a chunk written at
`q_offset` attends every valid earlier slot). Rows with at least one key to attend ("real rows")
agree across implementations up to rounding. A row with none (a padding position) gets a finite
value that depends on the implementation; no real row ever reads it, and its masked scores get
no gradient, so it cannot reach a real row's gradients.

- "plain": f32 scores, -1e30 masking, softmax over all S keys (a fully masked row is the
  uniform average). Memory O(T·S) per head, kept for the backward pass.
- "chunked": the same maths as an online softmax over blocks of queries and keys (flash
  attention in plain JAX) with a custom VJP that recomputes block scores, so neither pass holds
  more than one block of scores; key blocks entirely in a query block's future are skipped
  (causal), as are cache slots after the last written one.
- "pallas": the splash attention kernel shipped with JAX (TPU), forward and backward, for
  self-attention over a whole chunk (training, prefill): causal mask in the kernel, GQA native
  (query head q reads kv head q // G), left padding as segment ids (padding is segment 0, real
  tokens segment 1, so padding queries attend only earlier padding and no row is empty). Run
  per device under `shard_map` (batch and heads as the active rules split them). Elsewhere
  (cached decode) it uses "chunked"; off TPU it runs in Pallas's interpreter (slow; for tests).
- "auto": "pallas" on TPU; elsewhere "plain" while T and S fit one chunk (then plain *is* one
  chunk, and its rounding is kept), else "chunked".

Segments (`segment_BS`, self-attention only) add one rule for rows that hold a prompt and
several responses to it (rl/logprobs.py): key s is seen by query t only if s is in segment 0
(the shared prompt) or in t's own segment. "plain" and "chunked" take them ("chunked" also skips
every block of scores the rule masks whole: another response's keys); "pallas" falls back to
them (its kernel's segment ids cannot say "the prompt is shared").

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.model.config import ATTENTION_CHECKPOINT_NAME as CHECKPOINT_NAME
from ttrl_jax.model.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from ttrl_jax.model.config import ATTENTION_MASK_VALUE as _NEG_INF

_LANES = 128  # splash blocks are multiples of the TPU lane width


def attend(
    q_BTQH, k_BSKH, v_BSKH, valid_BS, q_offset=0, *, impl="auto", chunk=512, segment_BS=None
):
    """Grouped-query attention of T queries over S key slots; output [B, T, Q, H] in q's dtype.

    Args:
      q_BTQH: queries (RoPE applied), in the compute dtype.
      k_BSKH, v_BSKH: keys and values (cast to q's dtype); Q is a multiple of K.
      valid_BS: bool, True for slots holding real tokens.
      q_offset: slot of the first query: 0 (an int) for self-attention over the chunk, or the
        cache write index (int or traced scalar).
      impl: one of IMPLEMENTATIONS.
      chunk: block length of "chunked" (queries and keys), and the size up to which "auto"
        stays plain.
      segment_BS: int, optional; 0 = the shared prompt, 1.. = one response each (see above).
    """
    T, S = q_BTQH.shape[1], k_BSKH.shape[1]
    k_BSKH, v_BSKH = k_BSKH.astype(q_BTQH.dtype), v_BSKH.astype(q_BTQH.dtype)
    if segment_BS is not None:
        if S != T:  # (q_offset is then 0, though a traced one under remat)
            raise ValueError("segments are for self-attention over a whole chunk (no cache)")
        impl = "plain" if impl == "plain" or chunk >= T else "chunked"
    else:
        impl = choose(impl, T, S, q_offset, chunk)
    if impl == "plain":
        return _plain(q_BTQH, k_BSKH, v_BSKH, valid_BS, q_offset, segment_BS)
    if impl == "chunked":
        return _chunked(q_BTQH, k_BSKH, v_BSKH, valid_BS, q_offset, chunk, segment_BS)
    return _pallas(q_BTQH, k_BSKH, v_BSKH, valid_BS)


def choose(impl: str, T: int, S: int, q_offset, chunk: int) -> str:
    """The implementation that runs for `impl` on these shapes ("auto" and fallbacks resolved)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention {impl!r}; choose one of {IMPLEMENTATIONS}")
    self_attention = isinstance(q_offset, int) and q_offset == 0 and S == T
    if impl == "auto":
        if sharding_lib.active_platform() == "tpu" and self_attention:
            return "pallas"
        return "plain" if max(T, S) <= chunk else "chunked"
    if impl == "pallas" and not self_attention:
        return "chunked"
    return impl


def _mask_BTS(valid_BS, q_offset, T, segment_BS=None):
    slot_S = jnp.arange(valid_BS.shape[1])
    causal_TS = slot_S[None, :] <= (q_offset + jnp.arange(T))[:, None]
    mask_BTS = causal_TS[None] & valid_BS[:, None, :]
    if segment_BS is not None:  # self-attention: query t is slot t
        same_BTS = segment_BS[:, :, None] == segment_BS[:, None, :]
        mask_BTS &= same_BTS | (segment_BS[:, None, :] == 0)
    return mask_BTS


# ----------------------------------------------------------------------------- plain


def _plain(q_BTQH, k_BSKH, v_BSKH, valid_BS, q_offset, segment_BS=None):
    B, T, Q, H = q_BTQH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTQH.reshape(B, T, K, Q // K, H)
    scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH).astype(jnp.float32)
    logits_BKGTS = scores_BKGTS / math.sqrt(H)
    mask_BTS = _mask_BTS(valid_BS, q_offset, T, segment_BS)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _NEG_INF)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(q_BTQH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return checkpoint_name(out_BTKGH.reshape(B, T, Q, H), CHECKPOINT_NAME)


# ----------------------------------------------------------------------------- chunked


def _chunked(q_BTQH, k_BSKH, v_BSKH, valid_BS, q_offset, chunk, segment_BS=None):
    B, T, Q, H = q_BTQH.shape
    S, K = k_BSKH.shape[1:3]
    cq, ck = min(chunk, T), min(chunk, S)
    pad_T, pad_S = -T % cq, -S % ck  # odd lengths: padded queries are dropped, keys invalid
    q_BTKGH = jnp.pad(q_BTQH, ((0, 0), (0, pad_T), (0, 0), (0, 0))).reshape(
        B, T + pad_T, K, Q // K, H
    )
    kv_pad = ((0, 0), (0, pad_S), (0, 0), (0, 0))
    k_BSKH, v_BSKH = jnp.pad(k_BSKH, kv_pad), jnp.pad(v_BSKH, kv_pad)
    valid_BS = jnp.pad(valid_BS, ((0, 0), (0, pad_S)))
    offset = jnp.asarray(q_offset, jnp.int32)
    if segment_BS is not None:  # self-attention (T == S): padded queries and keys get -1
        segment_BS = jnp.pad(segment_BS, ((0, 0), (0, pad_S)), constant_values=-1)
    out_BTKGH = _flash(cq, ck, q_BTKGH, k_BSKH, v_BSKH, valid_BS, offset, segment_BS)
    return out_BTKGH[:, :T].reshape(B, T, Q, H)


def _keys(k_BSKH, v_BSKH, valid_BS, j, ck):
    """Key block j: keys, values, validity and slot numbers."""
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, j * ck, ck, axis=1)
    return take(k_BSKH), take(v_BSKH), take(valid_BS), j * ck + jnp.arange(ck)


def _block_mask(valid_Bs, slot_t, slot_s, segment_BS, ck, j):
    """mask_Bts of one block: causal, valid keys, and the segment rule when there are segments
    (query slots are `slot_t`: segments are only given for self-attention)."""
    mask_Bts = (slot_s[None, :] <= slot_t[:, None])[None] & valid_Bs[:, None, :]
    if segment_BS is None:
        return mask_Bts
    seg_Bt = jnp.take(segment_BS, slot_t, axis=1)
    seg_Bs = jax.lax.dynamic_slice_in_dim(segment_BS, j * ck, ck, axis=1)
    return mask_Bts & ((seg_Bt[:, :, None] == seg_Bs[:, None, :]) | (seg_Bs[:, None, :] == 0))


def _block_scores(q_BtKGH, k_BsKH, mask_Bts):
    """f32 scores of one block, masked as the plain version masks them, and the mask."""
    H = q_BtKGH.shape[-1]
    s_BKGts = jnp.einsum("BtKGH,BsKH->BKGts", q_BtKGH, k_BsKH).astype(jnp.float32) / math.sqrt(H)
    mask_B11ts = mask_Bts[:, None, None]
    return jnp.where(mask_B11ts, s_BKGts, _NEG_INF), mask_B11ts


def _unless_masked(mask_Bts, segment_BS, compute, carry):
    """`compute(carry)`, or `carry` unchanged when segments mask the whole block (a block of
    one response's queries over another's keys adds nothing: skipped, not computed)."""
    if segment_BS is None:
        return compute(carry)
    return jax.lax.cond(mask_Bts.any(), compute, lambda c: c, carry)


def _key_blocks(offset, i, cq, ck, n_blocks):
    """Key blocks that query block i can see: none after its last query's slot."""
    return jnp.minimum(n_blocks, (offset + (i + 1) * cq - 1) // ck + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(cq, ck, q_BTKGH, k_BSKH, v_BSKH, valid_BS, offset, segment_BS):
    return _flash_fwd(cq, ck, q_BTKGH, k_BSKH, v_BSKH, valid_BS, offset, segment_BS)[0]


def _flash_fwd(cq, ck, q_BTKGH, k_BSKH, v_BSKH, valid_BS, offset, segment_BS):
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    dtype = q_BTKGH.dtype

    def query_block(i):
        q_BtKGH = jax.lax.dynamic_slice_in_dim(q_BTKGH, i * cq, cq, axis=1)
        slot_t = offset + i * cq + jnp.arange(cq)

        def key_block(j, carry):
            k_BsKH, v_BsKH, valid_Bs, slot_s = _keys(k_BSKH, v_BSKH, valid_BS, j, ck)
            mask_Bts = _block_mask(valid_Bs, slot_t, slot_s, segment_BS, ck, j)

            def compute(carry):
                m_BKGt, l_BKGt, acc_BKGtH = carry
                s_BKGts, _ = _block_scores(q_BtKGH, k_BsKH, mask_Bts)
                m_new = jnp.maximum(m_BKGt, s_BKGts.max(-1))
                p_BKGts = jnp.exp(s_BKGts - m_new[..., None])
                rescale = jnp.exp(m_BKGt - m_new)
                pv_BKGtH = jnp.einsum(
                    "BKGts,BsKH->BKGtH",
                    p_BKGts.astype(dtype),
                    v_BsKH,
                    preferred_element_type=jnp.float32,
                )
                acc_BKGtH = acc_BKGtH * rescale[..., None] + pv_BKGtH
                return m_new, l_BKGt * rescale + p_BKGts.sum(-1), acc_BKGtH

            return _unless_masked(mask_Bts, segment_BS, compute, carry)

        init = (
            jnp.full((B, K, G, cq), -jnp.inf, jnp.float32),
            jnp.zeros((B, K, G, cq), jnp.float32),
            jnp.zeros((B, K, G, cq, H), jnp.float32),
        )
        n_keys = _key_blocks(offset, i, cq, ck, S // ck)
        m_BKGt, l_BKGt, acc_BKGtH = jax.lax.fori_loop(0, n_keys, key_block, init)
        out_BtKGH = (acc_BKGtH / l_BKGt[..., None]).astype(dtype).transpose(0, 3, 1, 2, 4)
        return out_BtKGH, m_BKGt + jnp.log(l_BKGt)

    out_CBtKGH, lse_CBKGt = jax.lax.map(query_block, jnp.arange(T // cq))
    out_BTKGH = out_CBtKGH.swapaxes(0, 1).reshape(B, T, K, G, H)
    out_BTKGH = checkpoint_name(out_BTKGH, CHECKPOINT_NAME)
    lse_CBKGt = checkpoint_name(lse_CBKGt, CHECKPOINT_NAME)
    residuals = (q_BTKGH, k_BSKH, v_BSKH, valid_BS, offset, segment_BS, out_BTKGH, lse_CBKGt)
    return out_BTKGH, residuals


def _flash_bwd(cq, ck, res, dout_BTKGH):
    q_BTKGH, k_BSKH, v_BSKH, valid_BS, offset, segment_BS, out_BTKGH, lse_CBKGt = res
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    dtype = q_BTKGH.dtype
    # d softmax: ds = p * (dp - sum_s p dp), and sum_s p dp = sum_H dout * out for each row.
    delta_BTKG = jnp.einsum(
        "BTKGH,BTKGH->BTKG", dout_BTKGH.astype(jnp.float32), out_BTKGH.astype(jnp.float32)
    )

    def query_block(carry, i):
        dk_BSKH, dv_BSKH = carry
        q_BtKGH = jax.lax.dynamic_slice_in_dim(q_BTKGH, i * cq, cq, axis=1)
        do_BtKGH = jax.lax.dynamic_slice_in_dim(dout_BTKGH, i * cq, cq, axis=1).astype(dtype)
        delta_BKGt = jax.lax.dynamic_slice_in_dim(delta_BTKG, i * cq, cq, axis=1).transpose(
            0, 2, 3, 1
        )
        lse_BKGt = lse_CBKGt[i]
        slot_t = offset + i * cq + jnp.arange(cq)

        def key_block(j, carry):
            k_BsKH, v_BsKH, valid_Bs, slot_s = _keys(k_BSKH, v_BSKH, valid_BS, j, ck)
            mask_Bts = _block_mask(valid_Bs, slot_t, slot_s, segment_BS, ck, j)

            def compute(carry):
                dq_BtKGH, dk_BSKH, dv_BSKH = carry
                s_BKGts, mask = _block_scores(q_BtKGH, k_BsKH, mask_Bts)
                p_BKGts = jnp.exp(s_BKGts - lse_BKGt[..., None])
                f32 = dict(preferred_element_type=jnp.float32)
                dv_BsKH = jnp.einsum("BKGts,BtKGH->BsKH", p_BKGts.astype(dtype), do_BtKGH, **f32)
                dp_BKGts = jnp.einsum("BtKGH,BsKH->BKGts", do_BtKGH, v_BsKH, **f32)
                # Masked scores are constants (-1e30): no gradient flows through them.
                ds_BKGts = jnp.where(mask, p_BKGts * (dp_BKGts - delta_BKGt[..., None]), 0.0)
                ds_BKGts = (ds_BKGts / math.sqrt(H)).astype(dtype)
                dq_BtKGH = dq_BtKGH + jnp.einsum("BKGts,BsKH->BtKGH", ds_BKGts, k_BsKH, **f32)
                dk_BsKH = jnp.einsum("BKGts,BtKGH->BsKH", ds_BKGts, q_BtKGH, **f32)

                def add(acc, d):
                    old = jax.lax.dynamic_slice_in_dim(acc, j * ck, ck, axis=1)
                    return jax.lax.dynamic_update_slice_in_dim(acc, old + d, j * ck, axis=1)

                return dq_BtKGH, add(dk_BSKH, dk_BsKH), add(dv_BSKH, dv_BsKH)

            return _unless_masked(mask_Bts, segment_BS, compute, carry)

        init = (jnp.zeros((B, cq, K, G, H), jnp.float32), dk_BSKH, dv_BSKH)
        n_keys = _key_blocks(offset, i, cq, ck, S // ck)
        dq_BtKGH, dk_BSKH, dv_BSKH = jax.lax.fori_loop(0, n_keys, key_block, init)
        return (dk_BSKH, dv_BSKH), dq_BtKGH.astype(dtype)

    zeros = jnp.zeros((B, S, K, H), jnp.float32)
    (dk_BSKH, dv_BSKH), dq_CBtKGH = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(T // cq))
    dq_BTKGH = dq_CBtKGH.swapaxes(0, 1).reshape(B, T, K, G, H)
    no_segment = None if segment_BS is None else np.zeros(segment_BS.shape, jax.dtypes.float0)
    return dq_BTKGH, dk_BSKH.astype(dtype), dv_BSKH.astype(dtype), None, None, no_segment


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- pallas


def _pallas(q_BTQH, k_BSKH, v_BSKH, valid_BS):
    """Splash attention per device: batch and heads split as the active rules split them."""
    interpret = sharding_lib.active_platform() != "tpu"
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if not interpret and q_BTQH.dtype != jnp.float32 and precision not in ("default", "bfloat16"):
        # The setting reaches the kernel's dots, and Mosaic fails on it with bfloat16 operands.
        raise ValueError(
            f"attention 'pallas' in {q_BTQH.dtype} cannot compile with "
            f"jax_default_matmul_precision={precision!r}; leave it unset or use 'chunked'"
        )
    if sharding_lib.active_mesh() is None:  # one device
        return _splash(q_BTQH, k_BSKH, v_BSKH, valid_BS, interpret)
    G = q_BTQH.shape[2] // k_BSKH.shape[2]
    batch_axis, _, heads_axis, _ = sharding_lib.active_spec(
        ("batch", "seq", "heads", "head_dim"), q_BTQH.shape
    )
    kv_heads_axis = sharding_lib.active_spec(("kv_heads",), k_BSKH.shape[2:3])[0]
    # Only rows and heads are split: every device attends over whole sequences.
    q_spec = PartitionSpec(batch_axis, None, heads_axis, None)
    kv_spec = PartitionSpec(batch_axis, None, kv_heads_axis, None)

    def per_device(q_BTQH, k_BSKH, v_BSKH, valid_BS):
        Q_local = q_BTQH.shape[2]
        if k_BSKH.shape[2] * G != Q_local:
            # kv heads replicated (fewer than the head shards): take this shard's query heads'.
            first = jax.lax.axis_index(heads_axis) * Q_local
            kv_head_Q = (first + jnp.arange(Q_local)) // G
            k_BSKH, v_BSKH = k_BSKH[:, :, kv_head_Q], v_BSKH[:, :, kv_head_Q]
        return _splash(q_BTQH, k_BSKH, v_BSKH, valid_BS, interpret)

    return jax.shard_map(
        per_device,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(batch_axis, None)),
        out_specs=q_spec,
        check_vma=False,
    )(q_BTQH, k_BSKH, v_BSKH, valid_BS)


def _splash(q_BTQH, k_BTKH, v_BTKH, valid_BT, interpret):
    B, T, Q, H = q_BTQH.shape
    pad = -T % _LANES  # padded positions are padding (segment 0) and are dropped
    seq_pad = ((0, 0), (0, pad), (0, 0), (0, 0))
    # The kernel takes no softmax scale: scale the queries (the plain version scales scores).
    q_BQTH = jnp.pad(q_BTQH / jnp.asarray(math.sqrt(H), q_BTQH.dtype), seq_pad).transpose(
        0, 2, 1, 3
    )
    k_BKTH = jnp.pad(k_BTKH, seq_pad).transpose(0, 2, 1, 3)
    v_BKTH = jnp.pad(v_BTKH, seq_pad).transpose(0, 2, 1, 3)
    segment_BT = jnp.pad(valid_BT, ((0, 0), (0, pad))).astype(jnp.int32)
    kernel = _splash_kernel(T + pad, Q, interpret)
    out_BQTH = jax.vmap(kernel)(
        q_BQTH, k_BKTH, v_BKTH, segment_ids=splash.SegmentIds(segment_BT, segment_BT)
    )
    return out_BQTH.transpose(0, 2, 1, 3)[:, :T]


def _splash_kernel(T: int, Q: int, interpret: bool):
    """A causal splash kernel for T positions and Q query heads (block tables built on the host
    at trace time; not cached, as they become constants of the trace that builds them)."""
    block = next(b for b in (512, 256, _LANES) if T % b == 0)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * Q)
    return splash.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=CHECKPOINT_NAME,
        interpret=interpret,
    )
