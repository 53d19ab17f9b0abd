"""The one-token decoder forward of the sampling loop, in a layout chosen for decoding.

It uses the model's weights and modules (RMSNorm, RoPE, MLP) and the maths of `model.Attention`,
laid out for one new token per row:
  - the N samples of a prompt share that prompt's keys and values (P rows, never copied N
    times), so attention to the prompt reads them once per prompt per step, as one batched
    matmul whose rows are the J = N·G queries of the group;
  - weights are cast to the compute dtype and split into per-layer buffers once per call. A
    scanned layer stack slices (on CPU: copies) every layer's weights on every step, and with
    float32 master weights and bfloat16 compute it would read 4 bytes per weight per step.
    Under tensor parallelism with weights already in the compute dtype (the TPU layout), the
    per-layer buffers would be a second copy of the weights for the whole loop (3 GiB per
    device for a 7B model over 4 chips), so each step reads its layer out of the stacked
    weights instead;
  - response keys are stored [B, K, H, S] and values [B, K, S, H] (S response slots), so both
    attention matmuls take a row-major right operand;
  - a response cache longer than one block (`kv_block` slots) is read block by block, only the
    blocks filled so far, combined with the prompt part by the online softmax: a step costs
    what its response length needs, not max_new_tokens.

Shape letters are the package's (ttrl_jax/__init__.py: B = P·N rows, T prompt length, S
response-cache slots, Q/K/G/H heads, E the heads of one projection, here also Q + 2K fused);
besides them, J = N·G is the number of queries of a prompt's group at one kv head, I the
gate/up pair of the fused MLP and c the slots of one block of the response cache.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ttrl_jax import sharding
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ATTENTION_MASK_VALUE as MASK_VALUE


def decode_params(cfg, params, fuse: bool) -> dict[str, Any]:
    """Weights in the compute dtype, one buffer per layer.

    With `fuse` (no tensor parallelism), each layer's q/k/v projections become one [D, Q+2K, H]
    matrix and gate/up one [D, 2, F] matrix: one matrix product instead of three (two); small
    matrix-vector products run well below memory bandwidth on CPU. With tensor parallelism they
    stay apart, each in its own sharded layout.
    """
    p = params["params"]
    dtype = jnp.dtype(cfg.dtype)
    logical = model_lib.param_logical_axes(cfg)["params"]

    def prep(x, names, index=None):
        x = x.astype(dtype) if index is None else x[index].astype(dtype)
        return constrain(x, tuple(names) if index is None else tuple(names)[1:])

    out = dict(
        embed_VD=prep(p["embed"], logical["embed"]),
        final_norm_D=prep(p["final_norm"]["scale"], logical["final_norm"]["scale"]),
    )
    # Tied: the embedding is used as is ([V, D], contracted over D). A transposed [D, V] copy
    # measured no faster, even batched, and transposing 150k x D costs about a second on CPU.
    if not cfg.tie_embeddings:
        out["lm_head_DV"] = prep(p["lm_head"], logical["lm_head"])
    if not fuse and all(x.dtype == dtype for x in jax.tree.leaves(p["layers"])):
        out["stacked_layers"] = jax.tree.map(
            lambda x, n: constrain(x, tuple(n)),
            p["layers"],
            logical["layers"],
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        return out
    layers = []
    for i in range(cfg.num_layers):
        layer = jax.tree.map(
            lambda x, n, i=i: prep(x, n, i),
            p["layers"],
            logical["layers"],
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )
        if fuse:
            attn = dict(layer["attn"])
            attn["qkv"] = jnp.concatenate([attn.pop(n) for n in ("q", "k", "v")], axis=1)
            if cfg.qkv_bias:
                biases = [attn.pop(n + "_bias") for n in ("q", "k", "v")]
                attn["qkv_bias"] = jnp.concatenate(biases, axis=0)
            mlp = layer["mlp"]
            layer = dict(
                layer,
                attn=attn,
                mlp=dict(gate_up=jnp.stack([mlp["gate"], mlp["up"]], axis=1), down=mlp["down"]),
            )
        layers.append(layer)
    out["layers"] = tuple(layers)
    return out


def layer_params(dp: dict[str, Any], i: int, slot) -> Any:
    """Layer i's decode weights: its own buffers, or its slice of the stacked weights, indexed
    through the traced `slot` so that the slice stays in the loop body (a slice hoisted out of
    the decode loop would be a copy for the whole loop)."""
    if "layers" in dp:
        return dp["layers"][i]
    L = jax.tree.leaves(dp["stacked_layers"])[0].shape[0]
    index = jnp.minimum(i, jnp.maximum(slot, 0) + L)  # = i; slot >= 0 only known at run time
    return jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), dp["stacked_layers"]
    )


def decode_step(
    cfg, dp, token_B, position_B, slot, k_gen, v_gen, prompt_kv, prompt_mask_PT, N, temperature,
    kv_block,
):  # fmt: skip
    """One-token forward of every row: logits / temperature [B, V] (float32) and the updated
    response caches. Attention reads the response caches in blocks of `kv_block` slots, only
    those up to `slot`."""
    x_B1D = jnp.take(dp["embed_VD"], token_B, axis=0)[:, None]
    x_B1D = constrain(x_B1D, ("batch", "seq", "act_embed"))
    cos_B1H, sin_B1H = model_lib.rope_tables(
        position_B[:, None], cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    )
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
        lp = layer_params(dp, i, slot)
        h_B1D = _rms_norm(cfg, lp["attn_norm"]["scale"], x_B1D, "embed")
        a_B1D, k_i, v_i = _attention(
            cfg, lp["attn"], h_B1D, cos_B1H, sin_B1H, slot, k_gen[i], v_gen[i],
            prompt_kv[0][i], prompt_kv[1][i], prompt_mask_PT, N, kv_block,
        )  # fmt: skip
        new_k.append(k_i)
        new_v.append(v_i)
        x_B1D = x_B1D + a_B1D
        h_B1D = _rms_norm(cfg, lp["mlp_norm"]["scale"], x_B1D, "embed")
        x_B1D = x_B1D + _mlp(cfg, lp["mlp"], h_B1D)
        x_B1D = constrain(x_B1D, ("batch", "seq", "act_embed"))
    h_BD = _rms_norm(cfg, dp["final_norm_D"], x_B1D, "embed")[:, 0]

    def unembed(h_BD):
        if "lm_head_DV" in dp:
            return jnp.einsum("BD,DV->BV", h_BD, dp["lm_head_DV"])
        return jnp.einsum("BD,VD->BV", h_BD, dp["embed_VD"])

    if jnp.dtype(cfg.dtype) == jnp.float32:
        # Scaling the hidden state instead of the logits saves a B×V pass on CPU; in float32
        # it changes the logits by rounding only. In bfloat16 it would round h once more.
        z_BV = unembed(h_BD * (1.0 / temperature))
    else:
        z_BV = unembed(h_BD).astype(jnp.float32) / temperature
    return constrain(z_BV, ("batch", "vocab")), tuple(new_k), tuple(new_v)


def _mlp(cfg, mp, x_B1D):
    """`model.MLP`, or the same maths with gate and up as one [D, 2, F] matrix."""
    if "gate_up" not in mp:
        return model_lib.MLP(cfg).apply({"params": mp}, x_B1D)
    gu_B1IF = jnp.einsum("BTD,DIF->BTIF", x_B1D, mp["gate_up"])
    h_B1F = jax.nn.silu(gu_B1IF[:, :, 0]) * gu_B1IF[:, :, 1]
    return jnp.einsum("BTF,FD->BTD", h_B1F, mp["down"])


def _rms_norm(cfg, scale, x, axis_name):
    return model_lib.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, axis_name).apply(
        {"params": {"scale": scale}}, x
    )


def _attention(
    cfg, ap, x_B1D, cos_B1H, sin_B1H, slot, k_BKHS, v_BKSH, k_PKHT, v_PKTH, prompt_mask_PT, N,
    kv_block,
):  # fmt: skip
    """Grouped-query attention of one new token per row over its prompt and its response so far.

    The same maths as `model.Attention` (f32 scores, -1e30 masking, softmax over all keys), with
    the prompt's keys shared by the N rows of a group and the softmax split over key sets. A
    response cache longer than `kv_block` slots is read block by block, only up to `slot`.
    """
    B = x_B1D.shape[0]
    Q, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = Q // K

    def proj(name, axis):
        y = jnp.einsum("BTD,DEH->BTEH", x_B1D, ap[name])
        if cfg.qkv_bias:
            y = y + ap[name + "_bias"]
        return constrain(y, ("batch", "seq", axis, "head_dim"))

    if "qkv" in ap:
        qkv_B1EH = proj("qkv", None)
        q_B1QH, k_B1KH, v_B1KH = jnp.split(qkv_B1EH, (Q, Q + K), axis=2)
    else:
        q_B1QH, k_B1KH, v_B1KH = proj("q", "heads"), proj("k", "kv_heads"), proj("v", "kv_heads")
    if cfg.qk_norm:
        q_B1QH = _rms_norm(cfg, ap["q_norm"]["scale"], q_B1QH, "head_dim")
        k_B1KH = _rms_norm(cfg, ap["k_norm"]["scale"], k_B1KH, "head_dim")
    q_B1QH = model_lib.apply_rope(q_B1QH, cos_B1H, sin_B1H)
    k_B1KH = model_lib.apply_rope(k_B1KH, cos_B1H, sin_B1H)

    # Write the new token's key/value into its response slot, then attend (it sees itself). The
    # updated caches feed both the attention matmuls and the loop carry; XLA updates them in
    # place. (Attending to the old cache plus the new key separately makes XLA copy the caches
    # every step, as it cannot order the reads of the old buffer before the in-place write.)
    k_BKHS = jax.lax.dynamic_update_slice(
        k_BKHS, k_B1KH[:, 0, :, :, None].astype(k_BKHS.dtype), (0, 0, 0, slot)
    )
    v_BKSH = jax.lax.dynamic_update_slice(
        v_BKSH, v_B1KH.transpose(0, 2, 1, 3).astype(v_BKSH.dtype), (0, 0, slot, 0)
    )

    q_BKGH = q_B1QH.reshape(B, K, G, H)
    attend = _blocked_attention if k_BKHS.shape[-1] > kv_block else _whole_attention
    out_BQH = attend(cfg, q_BKGH, slot, k_BKHS, v_BKSH, k_PKHT, v_PKTH, prompt_mask_PT, N, kv_block)
    out_BQH = constrain(out_BQH, ("batch", "heads", "head_dim"))
    a_BD = jnp.einsum("BQH,QHD->BD", out_BQH, ap["o"])
    return a_BD[:, None], k_BKHS, v_BKSH


def _whole_attention(
    cfg, q_BKGH, slot, k_BKHS, v_BKSH, k_PKHT, v_PKTH, prompt_mask_PT, N, kv_block
):
    """`_attention`'s softmax over the prompt and every response slot (those past `slot`
    masked), in one pass: for caches of at most `kv_block` slots."""
    B, K, G, H = q_BKGH.shape
    P = B // N
    scale = 1.0 / math.sqrt(H)
    # Response part: this row's own keys, slots 0 .. slot.
    s_BKGS = jnp.einsum("BKGH,BKHS->BKGS", q_BKGH, k_BKHS).astype(jnp.float32) * scale
    s_BKGS = jnp.where(jnp.arange(k_BKHS.shape[-1]) <= slot, s_BKGS, MASK_VALUE)
    s_PKJT = _prompt_scores(q_BKGH, k_PKHT, prompt_mask_PT, N)

    m_BKG = jnp.maximum(_to_BKG(s_PKJT.max(-1), P, N), s_BKGS.max(-1))
    p_PKJT = jnp.exp(s_PKJT - _to_PKJ(m_BKG, P, N)[..., None])
    p_BKGS = jnp.exp(s_BKGS - m_BKG[..., None])
    denom_BKG = _to_BKG(p_PKJT.sum(-1), P, N) + p_BKGS.sum(-1)
    dtype = jnp.dtype(cfg.dtype)
    out_BKGH = _to_BKG(jnp.einsum("PKJT,PKTH->PKJH", p_PKJT.astype(dtype), v_PKTH), P, N)
    out_BKGH = out_BKGH + jnp.einsum("BKGS,BKSH->BKGH", p_BKGS.astype(dtype), v_BKSH)
    return (out_BKGH / denom_BKG[..., None].astype(dtype)).reshape(B, K * G, H)


def _blocked_attention(cfg, q_BKGH, slot, k_BKHS, v_BKSH, k_PKHT, v_PKTH, prompt_mask_PT, N, c):
    """`_attention`'s softmax over the prompt and the filled response slots, the response cache
    read in blocks of c slots (only those up to `slot`), combined by the online softmax.

    Block j covers slots [j·c, j·c + c); the last one, if S is not a multiple of c, is read as
    the c slots ending at S, its slots below j·c masked (they belong to block j - 1). The sums
    of probability-weighted values accumulate in float32.
    """
    B, K, G, H = q_BKGH.shape
    P, S = B // N, k_BKHS.shape[-1]
    scale = 1.0 / math.sqrt(H)
    dtype = jnp.dtype(cfg.dtype)
    f32 = jnp.float32
    s_PKJT = _prompt_scores(q_BKGH, k_PKHT, prompt_mask_PT, N)
    m_BKG = _to_BKG(s_PKJT.max(-1), P, N)  # finite: every prompt has a real token
    p_PKJT = jnp.exp(s_PKJT - _to_PKJ(m_BKG, P, N)[..., None])
    l_BKG = _to_BKG(p_PKJT.sum(-1), P, N)
    pv_PKJH = jnp.einsum(
        "PKJT,PKTH->PKJH", p_PKJT.astype(dtype), v_PKTH, preferred_element_type=f32
    )
    acc_BKGH = _to_BKG(pv_PKJH, P, N)

    def block(j, carry):
        m_BKG, l_BKG, acc_BKGH = carry
        start = jnp.minimum(j * c, S - c)
        k_BKHc = jax.lax.dynamic_slice_in_dim(k_BKHS, start, c, axis=3)
        v_BKcH = jax.lax.dynamic_slice_in_dim(v_BKSH, start, c, axis=2)
        s_BKGc = jnp.einsum("BKGH,BKHc->BKGc", q_BKGH, k_BKHc).astype(f32) * scale
        slot_c = start + jnp.arange(c)
        s_BKGc = jnp.where((slot_c >= j * c) & (slot_c <= slot), s_BKGc, MASK_VALUE)
        new_m_BKG = jnp.maximum(m_BKG, s_BKGc.max(-1))
        rescale_BKG = jnp.exp(m_BKG - new_m_BKG)
        p_BKGc = jnp.exp(s_BKGc - new_m_BKG[..., None])
        pv_BKGH = jnp.einsum(
            "BKGc,BKcH->BKGH", p_BKGc.astype(dtype), v_BKcH, preferred_element_type=f32
        )
        return (
            new_m_BKG,
            l_BKG * rescale_BKG + p_BKGc.sum(-1),
            acc_BKGH * rescale_BKG[..., None] + pv_BKGH,
        )

    carry = (m_BKG, l_BKG, acc_BKGH)
    _, l_BKG, acc_BKGH = jax.lax.fori_loop(0, slot // c + 1, block, carry)
    return (acc_BKGH / l_BKG[..., None]).astype(dtype).reshape(B, K * G, H)


def _prompt_scores(q_BKGH, k_PKHT, prompt_mask_PT, N):
    """Scaled float32 scores of a group's J = N·G queries over its shared prompt keys, one
    matmul per (prompt, kv head), padding masked."""
    P = q_BKGH.shape[0] // N
    q_PKJH = _to_PKJ(q_BKGH, P, N)
    s_PKJT = jnp.einsum("PKJH,PKHT->PKJT", q_PKJH, k_PKHT).astype(jnp.float32)
    s_PKJT = s_PKJT * (1.0 / math.sqrt(q_BKGH.shape[-1]))
    return jnp.where(prompt_mask_PT[:, None, None, :], s_PKJT, MASK_VALUE)


def _to_PKJ(x_BKG, P, N):
    """[B, K, G, ...] (B = P·N) -> [P, K, J, ...] (J = N·G): a group's queries side by side."""
    B, K, G = x_BKG.shape[:3]
    rest = x_BKG.shape[3:]
    y = x_BKG.reshape((P, N, K, G) + rest)
    return jnp.moveaxis(y, 2, 1).reshape((P, K, N * G) + rest)


def _to_BKG(x_PKJ, P, N):
    """Inverse of `_to_PKJ`."""
    K, J = x_PKJ.shape[1:3]
    G = J // N
    rest = x_PKJ.shape[3:]
    y = x_PKJ.reshape((P, K, N, G) + rest)
    return jnp.moveaxis(y, 1, 2).reshape((P * N, K, G) + rest)


def split_size(name: str) -> int:
    """Devices the logical axis `name` is split over while tracing (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axis = sharding.mesh_axes_for((name,), nn.get_logical_axis_rules())[0]
    axes = () if axis is None else (axis,) if isinstance(axis, str) else axis
    return math.prod(dict(mesh.shape)[a] for a in axes)


def constrain(x, names: tuple[str | None, ...]):
    """`nn.with_logical_constraint` that, like `sharding.logical_to_shardings`, replicates a
    dimension in REPLICATE_IF_INDIVISIBLE (kv heads) instead of padding it to the mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    kept = []
    for name, dim in zip(names, x.shape):
        if name in sharding.REPLICATE_IF_INDIVISIBLE:
            axis = sharding.mesh_axes_for((name,), nn.get_logical_axis_rules())[0]
            size = 1 if axis is None else mesh.shape[axis]
            if dim % size:
                name = None
        kept.append(name)
    return nn.with_logical_constraint(x, tuple(kept))
