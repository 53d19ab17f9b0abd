"""Grouped rollouts: prefill each prompt once, then decode N samples per prompt in one jitted loop.

One call handles P prompts × N samples = B rows, prompts left-padded to a bucket length T, up to
G = max_new_tokens new tokens per row:

1. **Prefill** the P prompts once, with the model's own cached forward.
2. **Decode** all B rows in a `lax.while_loop` that exits as soon as every row has emitted a
   stop token. The loop body is a one-token forward written for sampling (`_decode_step`). It
   uses the model's weights and modules (RMSNorm, RoPE, MLP) and the model's attention maths,
   with a layout chosen for decoding:
     - the N samples of a prompt share that prompt's keys and values (P rows, never copied N
       times), so attention to the prompt reads them once per prompt per step, as one batched
       matmul whose rows are the N·Q/K queries of the group;
     - weights are cast to the compute dtype and split into per-layer buffers once per call. A
       scanned layer stack slices (on CPU: copies) every layer's weights on every step, and with
       float32 master weights and bfloat16 compute it would read 4 bytes per weight per step;
     - response keys are stored [B, K, H, S] and values [B, K, S, H] (S = G - 1 slots), so
       both attention matmuls take a row-major right operand.
3. **Sample** with `sample_token`: temperature, top-k, top-p, min-p and greedy, without sorting
   the vocabulary (see there), one pair of uniforms per row and step.

Log-prob convention: `Rollout.logp_PNR` is log softmax(logits / temperature) at the sampled token
(raw logits when temperature is 0), i.e. the rollout policy's log-prob as the train step
recomputes it (verl divides by the rollout temperature the same way). It is NOT the log-prob under
the top-k/top-p/min-p-filtered distribution. `entropy_PNR` is the entropy of that same
(unfiltered, temperature-scaled) distribution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ttrl_jax import model as model_lib
from ttrl_jax import sharding

FINISH_STOP = 0  # the row emitted a stop token
FINISH_LENGTH = 1  # the row ran out of max_new_tokens

_NEG = -1e30  # floor for scaled logits: keeps exp() and e·(z - m) finite (no inf, no NaN)
_CANDIDATES = 64  # top-k / top-p fast path: exact while the answer lies in the 64 largest logits
_BISECT_STEPS = 32  # one step per bit of a float32


# ----------------------------------------------------------------------------- public types


@flax.struct.dataclass
class SamplingParams:
    """Traced sampling settings: changing their values never recompiles.

    temperature 0 is greedy (filters ignored); top_k 0, top_p 1 and min_p 0 are off. Filters
    apply in the order of transformers' `generate`: temperature, top-k, top-p (over the top-k
    renormalised distribution), min-p (relative to the most likely token, so the order does not
    matter for it).
    """

    temperature: jax.Array  # float32 scalar
    top_p: jax.Array  # float32 scalar
    top_k: jax.Array  # int32 scalar
    min_p: jax.Array  # float32 scalar

    @classmethod
    def make(
        cls, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
    ) -> SamplingParams:
        """Checks plain-number settings and wraps them as device scalars."""
        if isinstance(temperature, (int, float)) and not (
            math.isfinite(temperature) and temperature >= 0
        ):
            raise ValueError(f"temperature={temperature} must be finite and >= 0 (0 = greedy)")
        if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
        if isinstance(top_k, (int, float)) and (top_k < 0 or int(top_k) != top_k):
            raise ValueError(f"top_k={top_k} must be an integer >= 0 (0 = off)")
        if isinstance(min_p, (int, float)) and not 0 <= min_p <= 1:
            raise ValueError(f"min_p={min_p} must be in [0, 1] (0 = off)")
        return cls(
            temperature=jnp.asarray(temperature, jnp.float32),
            top_p=jnp.asarray(top_p, jnp.float32),
            top_k=jnp.asarray(top_k, jnp.int32),
            min_p=jnp.asarray(min_p, jnp.float32),
        )


@flax.struct.dataclass
class Rollout:
    """N sampled responses for each of P prompts (T = max_new_tokens response slots).

    The prompts themselves are the caller's; `train.sequence_inputs(prompt, prompt_mask,
    tokens, mask)` rebuilds full sequences with the same positions the sampler used.
    """

    tokens_PNR: jax.Array  # int32; pad_id after the first stop token and past the last step
    mask_PNR: jax.Array  # bool; True on response tokens up to and including the first stop token
    logp_PNR: jax.Array  # float32; log softmax(logits / temperature)[token]; 0 where masked
    entropy_PNR: jax.Array  # float32; entropy of softmax(logits / temperature); 0 where masked
    length_PN: jax.Array  # int32; number of True in mask_PNR (stop token included)
    finish_PN: jax.Array  # int32; FINISH_STOP or FINISH_LENGTH
    num_steps: jax.Array  # int32 scalar; decode-loop iterations run (forwards after prefill)


# ----------------------------------------------------------------------------- entry point


def sample(
    params: Any,
    cfg: model_lib.ModelConfig,
    prompt_tokens_PT: jax.Array,
    prompt_mask_PT: jax.Array,
    key: jax.Array,
    sampling: SamplingParams,
    *,
    n_samples: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    mesh: Mesh | None = None,
) -> Rollout:
    """Samples `n_samples` responses for each left-padded prompt.

    Compiles once per (cfg, n_samples, max_new_tokens, stop_ids, pad_id, mesh) and prompt shape
    [P, T]; sampling values are traced. With a mesh, pass params in
    `sharding.param_shardings(cfg, mesh, SAMPLE_RULES)` and prompts in `batch_sharding`; rows
    are split over 'data', heads and vocabulary over 'model'.

    Args:
      params: model params ({'params': ...}), in any float dtype (cast to cfg.dtype once).
      cfg: the model config.
      prompt_tokens_PT: int token ids, left-padded (every row ends with a real token).
      prompt_mask_PT: bool, True on real prompt tokens; every row needs at least one.
      key: PRNG key; step t uses fold_in(key, t) and each row its own uniforms.
      sampling: temperature / top-p / top-k / min-p (traced).
      n_samples: N, responses per prompt (rows p*N .. p*N+N-1 belong to prompt p).
      max_new_tokens: response slots T; a row that emits no stop token ends with FINISH_LENGTH.
      stop_ids: token ids that end a response (the stop token is kept and masked True).
      pad_id: token id written after the stop token.
      mesh: optional (data, model) device mesh.

    Returns:
      A Rollout with [P, N, max_new_tokens] tokens, mask, log-probs and entropies.
    """
    if prompt_tokens_PT.ndim != 2 or prompt_tokens_PT.shape != prompt_mask_PT.shape:
        raise ValueError(
            f"prompt tokens {prompt_tokens_PT.shape} and mask {prompt_mask_PT.shape} must both "
            "be [P, T]"
        )
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"n_samples={n_samples} and max_new_tokens={max_new_tokens} must be >= 1")
    if isinstance(prompt_mask_PT, np.ndarray) and not prompt_mask_PT[:, -1].all():
        raise ValueError(
            "prompts must be left-padded with a real last token in every row "
            "(prompt_mask_PT[:, -1] is False somewhere)"
        )
    fn = compiled_sampler(cfg, n_samples, max_new_tokens, stop_ids, pad_id, mesh)
    return fn(params, prompt_tokens_PT, prompt_mask_PT, key, sampling)


def compiled_sampler(
    cfg: model_lib.ModelConfig,
    n_samples: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    mesh: Mesh | None = None,
):
    """The jitted `(params, prompt_PT, mask_PT, key, sampling) -> Rollout` for static settings
    (one per setting, reused: its compiled programs are cached per prompt shape)."""
    stop = tuple(int(s) for s in stop_ids)
    return _build(cfg, int(n_samples), int(max_new_tokens), stop, int(pad_id), mesh)


@functools.lru_cache(maxsize=64)
def _build(cfg, n_samples, max_new_tokens, stop_ids, pad_id, mesh):
    fn = functools.partial(
        _sample_impl,
        cfg=cfg,
        n_samples=n_samples,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_id=pad_id,
    )
    if mesh is None:
        return jax.jit(fn)
    batch = sharding.batch_sharding(mesh, 2, sharding.SAMPLE_RULES)
    batch3 = sharding.batch_sharding(mesh, 3, sharding.SAMPLE_RULES)
    out = Rollout(
        tokens_PNR=batch3,
        mask_PNR=batch3,
        logp_PNR=batch3,
        entropy_PNR=batch3,
        length_PN=batch,
        finish_PN=batch,
        num_steps=sharding.replicated(mesh),
    )
    return jax.jit(sharding.with_rules(fn, mesh, sharding.SAMPLE_RULES), out_shardings=out)


# ----------------------------------------------------------------------------- the loop


@flax.struct.dataclass
class _DecodeState:
    """Loop carry of the decode `lax.while_loop`."""

    step: jax.Array  # int32: index of the token sampled in this iteration (1 .. G-1)
    token_B: jax.Array  # int32: the token sampled in the previous iteration, fed now
    done_B: jax.Array  # bool: a stop token was sampled
    tokens_BT: jax.Array
    logp_BT: jax.Array
    entropy_BT: jax.Array
    k_gen: tuple[jax.Array, ...]  # per layer [B, K, H, S]: keys of the fed response tokens
    v_gen: tuple[jax.Array, ...]  # per layer [B, K, S, H]


def _sample_impl(
    params, prompt_PT, prompt_mask_PT, key, sampling, *, cfg, n_samples, max_new_tokens,
    stop_ids, pad_id,
) -> Rollout:  # fmt: skip
    P, T = prompt_PT.shape
    N, G = n_samples, max_new_tokens
    B = P * N
    prompt_mask_PT = prompt_mask_PT.astype(bool)
    logits_PV, prompt_kv = _prefill(cfg, params, prompt_PT.astype(jnp.int32), prompt_mask_PT)
    dparams = _decode_params(cfg, params, fuse=_model_axis_size() == 1)
    temperature = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)
    n_prompt_B = jnp.repeat(prompt_mask_PT.sum(-1, dtype=jnp.int32), N)

    # Token 0 comes from the prefill logits. Repeating them over the N samples costs one B×V
    # copy per call; every later step has B×V logits anyway.
    logits_BV = _constrain(jnp.repeat(logits_PV, N, axis=0), ("batch", "vocab"))
    token_B, logp_B, entropy_B = sample_token(logits_BV, jax.random.fold_in(key, 0), sampling)

    def put(buf_BT, value_B, step):
        update_B1 = value_B[:, None].astype(buf_BT.dtype)
        return jax.lax.dynamic_update_slice(buf_BT, update_B1, (0, step))

    cache_dtype = jnp.dtype(cfg.dtype)
    K, H = cfg.num_kv_heads, cfg.head_dim
    S = max(G - 1, 1)  # the last sampled token is never fed back
    k_gen = _constrain(
        jnp.zeros((B, K, H, S), cache_dtype), ("batch", "kv_heads", "head_dim", "cache_seq")
    )
    v_gen = _constrain(
        jnp.zeros((B, K, S, H), cache_dtype), ("batch", "kv_heads", "cache_seq", "head_dim")
    )
    state = _DecodeState(
        step=jnp.ones((), jnp.int32),
        token_B=token_B,
        done_B=_is_stop(token_B, stop_ids),
        tokens_BT=put(jnp.full((B, G), pad_id, jnp.int32), token_B, 0),
        logp_BT=put(jnp.zeros((B, G), jnp.float32), logp_B, 0),
        entropy_BT=put(jnp.zeros((B, G), jnp.float32), entropy_B, 0),
        k_gen=(k_gen,) * cfg.num_layers,
        v_gen=(v_gen,) * cfg.num_layers,
    )

    def cond(st: _DecodeState):
        return (st.step < G) & ~jnp.all(st.done_B)

    def body(st: _DecodeState):
        slot = st.step - 1  # the fed token sits in response slot `slot`
        z_BV, k_gen, v_gen = _decode_step(
            cfg, dparams, st.token_B, n_prompt_B + slot, slot, st.k_gen, st.v_gen,
            prompt_kv, prompt_mask_PT, N, temperature,
        )  # fmt: skip
        token_B, logp_B, entropy_B = _sample_scaled(
            z_BV, jax.random.fold_in(key, st.step), sampling
        )
        return _DecodeState(
            step=st.step + 1,
            token_B=token_B,
            done_B=st.done_B | _is_stop(token_B, stop_ids),
            tokens_BT=put(st.tokens_BT, token_B, st.step),
            logp_BT=put(st.logp_BT, logp_B, st.step),
            entropy_BT=put(st.entropy_BT, entropy_B, st.step),
            k_gen=k_gen,
            v_gen=v_gen,
        )

    final = jax.lax.while_loop(cond, body, state)
    return _finish(final, P, N, stop_ids, pad_id)


def _finish(st: _DecodeState, P: int, N: int, stop_ids, pad_id) -> Rollout:
    """Masks everything after the first stop token (cumulative-sum trick) and reshapes."""
    B, G = st.tokens_BT.shape
    stop_BT = _is_stop(st.tokens_BT, stop_ids).astype(jnp.int32)
    stops_before_BT = jnp.cumsum(stop_BT, axis=1) - stop_BT
    sampled_T = jnp.arange(G) < st.step  # slots filled before the loop exited
    mask_BT = (stops_before_BT == 0) & sampled_T[None, :]
    stopped_B = jnp.any(mask_BT & (stop_BT > 0), axis=1)
    rollout = Rollout(
        tokens_PNR=jnp.where(mask_BT, st.tokens_BT, pad_id).reshape(P, N, G),
        mask_PNR=mask_BT.reshape(P, N, G),
        logp_PNR=jnp.where(mask_BT, st.logp_BT, 0.0).reshape(P, N, G),
        entropy_PNR=jnp.where(mask_BT, st.entropy_BT, 0.0).reshape(P, N, G),
        length_PN=mask_BT.sum(1, dtype=jnp.int32).reshape(P, N),
        finish_PN=jnp.where(stopped_B, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32).reshape(P, N),
        num_steps=st.step - 1,
    )
    chex.assert_shape([rollout.tokens_PNR, rollout.mask_PNR, rollout.logp_PNR], (P, N, G))
    chex.assert_shape([rollout.entropy_PNR], (P, N, G))
    chex.assert_shape([rollout.length_PN, rollout.finish_PN], (P, N))
    return rollout


def _is_stop(tokens, stop_ids: tuple[int, ...]):
    stop = jnp.zeros(tokens.shape, bool)
    for s in stop_ids:
        stop = stop | (tokens == s)
    return stop


# ----------------------------------------------------------------------------- prefill


def _prefill(cfg, params, prompt_PT, prompt_mask_PT):
    """Last-position logits [P, V] and per-layer prompt keys [P,K,H,T] / values [P,K,T,H]."""
    P, T = prompt_PT.shape
    module = model_lib.Transformer(cfg)
    positions_PT = model_lib.left_pad_positions(prompt_mask_PT)
    cache = model_lib.init_cache(cfg, P, T)
    h_PTD, cache = module.apply(
        params, prompt_PT, positions_PT, prompt_mask_PT, cache, return_hidden=True
    )
    # Left padding puts every prompt's last real token at T-1: only that position is unembedded.
    logits_PV = module.apply(params, h_PTD[:, -1:], method=model_lib.Transformer.unembed)[:, 0]
    dtype = jnp.dtype(cfg.dtype)
    keys = tuple(
        _constrain(
            cache.k_LBSKH[i].astype(dtype).transpose(0, 2, 3, 1),
            ("batch", "kv_heads", "head_dim", "cache_seq"),
        )
        for i in range(cfg.num_layers)
    )
    values = tuple(
        _constrain(
            cache.v_LBSKH[i].astype(dtype).transpose(0, 2, 1, 3),
            ("batch", "kv_heads", "cache_seq", "head_dim"),
        )
        for i in range(cfg.num_layers)
    )
    return logits_PV, (keys, values)


# ----------------------------------------------------------------------------- decode step


def _decode_params(cfg, params, fuse: bool) -> dict[str, Any]:
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
        return _constrain(x, tuple(names) if index is None else tuple(names)[1:])

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
    out = dict(
        embed_VD=prep(p["embed"], logical["embed"]),
        final_norm_D=prep(p["final_norm"]["scale"], logical["final_norm"]["scale"]),
        layers=tuple(layers),
    )
    # Tied: the embedding is used as is ([V, D], contracted over D). A transposed [D, V] copy
    # measured no faster, even batched, and transposing 150k x D costs about a second on CPU.
    if not cfg.tie_embeddings:
        out["lm_head_DV"] = prep(p["lm_head"], logical["lm_head"])
    return out


def _decode_step(
    cfg, dp, token_B, position_B, slot, k_gen, v_gen, prompt_kv, prompt_mask_PT, N, temperature
):
    """One-token forward of every row: logits / temperature [B, V] (float32) and the updated
    response caches."""
    x_B1D = jnp.take(dp["embed_VD"], token_B, axis=0)[:, None]
    x_B1D = _constrain(x_B1D, ("batch", "seq", "act_embed"))
    cos_B1H, sin_B1H = model_lib.rope_tables(
        position_B[:, None], cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    )
    new_k, new_v = [], []
    for i, lp in enumerate(dp["layers"]):
        h_B1D = _rms_norm(cfg, lp["attn_norm"]["scale"], x_B1D, "embed")
        a_B1D, k_i, v_i = _attention(
            cfg, lp["attn"], h_B1D, cos_B1H, sin_B1H, slot, k_gen[i], v_gen[i],
            prompt_kv[0][i], prompt_kv[1][i], prompt_mask_PT, N,
        )  # fmt: skip
        new_k.append(k_i)
        new_v.append(v_i)
        x_B1D = x_B1D + a_B1D
        h_B1D = _rms_norm(cfg, lp["mlp_norm"]["scale"], x_B1D, "embed")
        x_B1D = x_B1D + _mlp(cfg, lp["mlp"], h_B1D)
        x_B1D = _constrain(x_B1D, ("batch", "seq", "act_embed"))
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
    return _constrain(z_BV, ("batch", "vocab")), tuple(new_k), tuple(new_v)


def _mlp(cfg, mp, x_B1D):
    """`model.MLP`, or the same maths with gate and up as one [D, 2, F] matrix."""
    if "gate_up" not in mp:
        return model_lib.MLP(cfg).apply({"params": mp}, x_B1D)
    gu_B12F = jnp.einsum("BTD,DCF->BTCF", x_B1D, mp["gate_up"])
    h_B1F = jax.nn.silu(gu_B12F[:, :, 0]) * gu_B12F[:, :, 1]
    return jnp.einsum("BTF,FD->BTD", h_B1F, mp["down"])


def _rms_norm(cfg, scale, x, axis_name):
    return model_lib.RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, axis_name).apply(
        {"params": {"scale": scale}}, x
    )


def _attention(
    cfg, ap, x_B1D, cos_B1H, sin_B1H, slot, k_BKHS, v_BKSH, k_PKHT, v_PKTH, prompt_mask_PT, N
):
    """Grouped-query attention of one new token per row over its prompt and its response so far.

    The same maths as `model.Attention` (f32 scores, -1e30 masking, softmax over all keys), with
    the prompt's keys shared by the N rows of a group and the softmax split over key sets.
    """
    B = x_B1D.shape[0]
    P = B // N
    Q, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = Q // K

    def proj(name, axis):
        y = jnp.einsum("BTD,DNH->BTNH", x_B1D, ap[name])
        if cfg.qkv_bias:
            y = y + ap[name + "_bias"]
        return _constrain(y, ("batch", "seq", axis, "head_dim"))

    if "qkv" in ap:
        qkv_B1NH = proj("qkv", None)
        q_B1QH, k_B1KH, v_B1KH = jnp.split(qkv_B1NH, (Q, Q + K), axis=2)
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

    scale = 1.0 / math.sqrt(H)
    q_BKGH = q_B1QH.reshape(B, K, G, H)
    # Response part: this row's own keys, slots 0 .. slot.
    s_BKGS = jnp.einsum("BKGH,BKHS->BKGS", q_BKGH, k_BKHS).astype(jnp.float32) * scale
    s_BKGS = jnp.where(jnp.arange(k_BKHS.shape[-1]) <= slot, s_BKGS, model_lib._NEG_INF)
    # Prompt part: the group's shared keys, one matmul per (prompt, kv head) over N·G queries.
    q_PKMH = _to_PKM(q_BKGH, P, N)
    s_PKMT = jnp.einsum("PKMH,PKHT->PKMT", q_PKMH, k_PKHT).astype(jnp.float32) * scale
    s_PKMT = jnp.where(prompt_mask_PT[:, None, None, :], s_PKMT, model_lib._NEG_INF)

    m_BKG = jnp.maximum(_to_BKG(s_PKMT.max(-1), P, N), s_BKGS.max(-1))
    p_PKMT = jnp.exp(s_PKMT - _to_PKM(m_BKG, P, N)[..., None])
    p_BKGS = jnp.exp(s_BKGS - m_BKG[..., None])
    denom_BKG = _to_BKG(p_PKMT.sum(-1), P, N) + p_BKGS.sum(-1)
    dtype = jnp.dtype(cfg.dtype)
    out_BKGH = _to_BKG(jnp.einsum("PKMT,PKTH->PKMH", p_PKMT.astype(dtype), v_PKTH), P, N)
    out_BKGH = out_BKGH + jnp.einsum("BKGS,BKSH->BKGH", p_BKGS.astype(dtype), v_BKSH)
    out_BQH = (out_BKGH / denom_BKG[..., None].astype(dtype)).reshape(B, Q, H)
    out_BQH = _constrain(out_BQH, ("batch", "heads", "head_dim"))
    a_BD = jnp.einsum("BQH,QHD->BD", out_BQH, ap["o"])
    return a_BD[:, None], k_BKHS, v_BKSH


def _to_PKM(x_BKG, P, N):
    """[B, K, G, ...] (B = P·N) -> [P, K, N·G, ...]: a group's queries side by side."""
    B, K, G = x_BKG.shape[:3]
    rest = x_BKG.shape[3:]
    y = x_BKG.reshape((P, N, K, G) + rest)
    return jnp.moveaxis(y, 2, 1).reshape((P, K, N * G) + rest)


def _to_BKG(x_PKM, P, N):
    """Inverse of `_to_PKM`."""
    K, M = x_PKM.shape[1:3]
    G = M // N
    rest = x_PKM.shape[3:]
    y = x_PKM.reshape((P, K, N, G) + rest)
    return jnp.moveaxis(y, 1, 2).reshape((P * N, K, G) + rest)


def _model_axis_size() -> int:
    """Size of the tensor-parallel mesh axis in effect while tracing (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get("model", 1)


def _constrain(x, names: tuple[str | None, ...]):
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


# ----------------------------------------------------------------------------- sampling


def sample_token(
    logits_BV: jax.Array, key: jax.Array, sampling: SamplingParams
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row from the filtered, temperature-scaled distribution.

    Exact (up to float32 rounding) and without sorting the vocabulary:
      - the vocabulary is viewed as [V/b, b] blocks; a row's draw picks a block by inverse CDF
        over block masses, then a token inside it by inverse CDF, with two uniforms per row.
        Two levels keep float32 resolution relative to each level's own mass. (Gumbel-max
        needs V random numbers per row: `bench sample` measured it 3x slower than this whole
        function for one row and 10x slower for 128 rows, on CPU.)
      - filters become one logit threshold per row, `keep z >= tau`: top-k's k-th largest
        logit (ties kept, as transformers does), top-p's smallest prefix of the sorted
        distribution reaching p (ties at the boundary kept), min-p's m + log(min_p).
        They are computed only when a filter is on (`lax.cond`), from the 64 largest logits
        (exact whenever the answer lies among them), else by bisection over float bits.
      - greedy (temperature 0) is the first index of the largest logit.

    Args:
      logits_BV: raw logits (any float dtype).
      key: PRNG key for this step; rows draw separate uniforms from it.
      sampling: temperature / top-p / top-k / min-p.

    Returns:
      (token_B int32, logp_B, entropy_B): log-prob and entropy of softmax(logits / temperature)
      (raw logits when greedy), unfiltered, float32.
    """
    greedy = sampling.temperature <= 0
    temperature = jnp.where(greedy, 1.0, sampling.temperature)
    z_BV = jnp.maximum(logits_BV.astype(jnp.float32) / temperature, _NEG)
    return _sample_scaled(z_BV, key, sampling)


def _sample_scaled(z_BV, key, sampling: SamplingParams):
    """`sample_token` on logits already divided by the temperature (finite, float32)."""
    B, V = z_BV.shape
    b = _block_width(V)
    nb = -(-V // b)
    greedy = sampling.temperature <= 0
    if nb * b != V:
        z_BV = jnp.pad(z_BV, ((0, 0), (0, nb * b - V)), constant_values=_NEG)
    # Passes over the vocabulary read z and use only ops that XLA:CPU's fused reduction kernels
    # take (sub, exp, mul, max, sum, sign): no B×V intermediate is materialised, only [B, V/b]
    # block statistics. The entropy pass shifts by the block max, not the row max, so that it
    # does not share `exp(z - m)` with the mass pass (a shared exp is materialised, then read
    # twice):  sum_i e_i (z_i - m) = sum_n [exp(bmax_n - m) A_n + (bmax_n - m) mass_n],
    # A_n = sum_{i in n} exp(z_i - bmax_n) (z_i - bmax_n).
    # The barriers stop XLA from rewriting a reduction of block statistics into a second full
    # pass over z (reduce(reduce(x)) -> reduce(x)), which would also share the exp.
    z_BNb = z_BV.reshape(B, nb, b)
    bmax_BN = jax.lax.optimization_barrier(z_BNb.max(-1))
    m_B = bmax_BN.max(-1)
    mass_BN = jax.lax.optimization_barrier(jnp.exp(z_BNb - m_B[:, None, None]).sum(-1))
    s_B = mass_BN.sum(-1)
    log_s_B = jnp.log(s_B)
    d_BNb = z_BNb - bmax_BN[..., None]
    a_BN = (jnp.exp(d_BNb) * d_BNb).sum(-1)
    shift_BN = bmax_BN - m_B[:, None]
    entropy_B = log_s_B - (jnp.exp(shift_BN) * a_BN + shift_BN * mass_BN).sum(-1) / s_B
    best_B = _first_argmax(z_BNb, bmax_BN, m_B)

    filtered = (~greedy) & (
        ((sampling.top_k > 0) & (sampling.top_k < V)) | (sampling.top_p < 1) | (sampling.min_p > 0)
    )
    tau_B, kept_BN = jax.lax.cond(
        filtered,
        lambda: _filter_threshold(z_BNb, bmax_BN, m_B, s_B, sampling),
        lambda: (jnp.full((B,), -jnp.inf), mass_BN),
    )
    u_B2 = jax.random.uniform(key, (B, 2))
    drawn_B = _draw(z_BNb, m_B, tau_B, kept_BN, u_B2, best_B)
    token_B = jnp.where(greedy, best_B, drawn_B)
    z_tok_B = jnp.take_along_axis(z_BV, token_B[:, None], axis=1)[:, 0]
    return token_B, z_tok_B - m_B - log_s_B, entropy_B


def _block_width(V: int) -> int:
    """Block width b of the [V/b, b] view: a power of two <= 128 dividing V with b*b <= V, so both
    levels stay short; vocabularies with no such divisor are padded to a multiple of 128."""
    for b in (128, 64, 32, 16, 8):
        if V % b == 0 and b * b <= V:
            return b
    return 128 if V >= 128 * 128 else 8


def _at_least(z, tau):
    """1.0 where z >= tau else 0.0, with arithmetic only (sign, add, min).

    Compare-and-select over the whole [B, V] block is what XLA:CPU's fast fused kernels cannot
    take; this form stays inside them. For finite z (and finite or -inf tau), z - tau is 0 only
    when z == tau. The draw re-checks the chosen block with a real comparison, so the support
    is exact even where this would round.
    """
    return jnp.minimum(jnp.sign(z - tau) + 1.0, 1.0)


def _first_argmax(z_BNb, bmax_BN, m_B):
    """Index of the first largest logit per row, from block maxima (no full-row argmax pass)."""
    b = z_BNb.shape[-1]
    block_B = jnp.argmax(bmax_BN == m_B[:, None], axis=-1)
    z_Bb = _gather_block(z_BNb, block_B)
    return (block_B * b + jnp.argmax(z_Bb, axis=-1)).astype(jnp.int32)


def _gather_block(z_BNb, block_B):
    return jnp.take_along_axis(z_BNb, block_B[:, None, None], axis=1)[:, 0]


def _draw(z_BNb, m_B, tau_B, kept_BN, u_B2, fallback_B):
    """Inverse-CDF draw among z >= tau: a block by its kept mass, then a token inside it."""
    nb, b = z_BNb.shape[1:]
    cum_BN = jnp.cumsum(kept_BN, axis=-1)
    target_B = u_B2[:, 0] * cum_BN[:, -1]
    block_B = jnp.sum(cum_BN <= target_B[:, None], axis=-1)
    # Rounding can push the target past the last block holding mass: clamp to that block.
    last_B = jnp.max(jnp.where(kept_BN > 0, jnp.arange(nb), -1), axis=-1)
    block_B = jnp.clip(jnp.minimum(block_B, last_B), 0, nb - 1)
    z_Bb = _gather_block(z_BNb, block_B)
    e_Bb = jnp.where(z_Bb >= tau_B[:, None], jnp.exp(z_Bb - m_B[:, None]), 0.0)
    cum_Bb = jnp.cumsum(e_Bb, axis=-1)
    index_B = jnp.sum(cum_Bb <= (u_B2[:, 1] * cum_Bb[:, -1])[:, None], axis=-1)
    last_in_B = jnp.max(jnp.where(e_Bb > 0, jnp.arange(b), -1), axis=-1)
    index_B = jnp.minimum(index_B, last_in_B)
    # The row's top token is in every kept set: the answer if the kept mass underflowed to 0.
    ok_B = (cum_BN[:, -1] > 0) & (last_in_B >= 0)
    return jnp.where(ok_B, block_B * b + index_B, fallback_B).astype(jnp.int32)


def _filter_threshold(z_BNb, bmax_BN, m_B, s_B, sampling: SamplingParams):
    """Per-row logit threshold of top-k, top-p and min-p combined, and kept mass per block."""
    B, nb, b = z_BNb.shape
    V = nb * b
    k, top_p, min_p = sampling.top_k, sampling.top_p, sampling.min_p
    use_k = (k > 0) & (k < V)
    use_p = top_p < 1
    neg_inf = jnp.full((B,), -jnp.inf)

    def kept_mass_BN(tau_B):  # per block, the sum of exp(z - m) over z >= tau
        e_BNb = jnp.exp(z_BNb - m_B[:, None, None])
        return (e_BNb * _at_least(z_BNb, tau_B[:, None, None])).sum(-1)

    def mass(tau_B):
        return kept_mass_BN(tau_B).sum(-1)

    def count(tau_B):
        return _at_least(z_BNb, tau_B[:, None, None]).sum((1, 2))

    def top_k_and_p():
        vals_BC = _largest_values(z_BNb, bmax_BN, _CANDIDATES)
        C = vals_BC.shape[1]
        # top-k: the k-th largest logit, from the candidates when k <= C, else by bisection.
        tau_k = jnp.where(use_k, vals_BC[:, jnp.clip(k - 1, 0, C - 1)], -jnp.inf)
        tau_k = jax.lax.cond(
            use_k & (k > C),
            lambda: _largest_threshold(count, k.astype(jnp.float32) * jnp.ones((B,))),
            lambda: tau_k,
        )
        s_k = jnp.where(use_k, mass(tau_k), s_B)
        # top-p over the top-k-renormalised distribution: the value at which the descending
        # cumulative mass first reaches p. Exact from the candidates if they hold that much.
        p_BC = jnp.where(vals_BC >= tau_k[:, None], jnp.exp(vals_BC - m_B[:, None]), 0.0)
        cum_BC = jnp.cumsum(p_BC, axis=-1) / s_k[:, None]
        j_B = jnp.sum(cum_BC < top_p, axis=-1)
        found_B = j_B < C
        at_j_B = jnp.take_along_axis(vals_BC, jnp.minimum(j_B, C - 1)[:, None], axis=1)[:, 0]
        tau_p = jnp.where(use_p & found_B, at_j_B, -jnp.inf)
        need_B = use_p & ~found_B
        tau_p = jax.lax.cond(
            jnp.any(need_B),
            lambda: jnp.where(
                need_B,
                _largest_threshold(lambda t: mass(jnp.maximum(t, tau_k)), top_p * s_k),
                tau_p,
            ),
            lambda: tau_p,
        )
        return jnp.maximum(tau_k, tau_p)

    tau_kp = jax.lax.cond(use_k | use_p, top_k_and_p, lambda: neg_inf)
    tau_min = jnp.where(min_p > 0, m_B + jnp.log(jnp.maximum(min_p, 1e-38)), -jnp.inf)
    tau_B = jnp.maximum(tau_kp, tau_min)
    return tau_B, kept_mass_BN(tau_B)


def _largest_values(z_BNb, bmax_BN, cap: int):
    """The `cap` largest logits of each row, sorted descending, without touching most blocks.

    Exact: take the `cap` blocks with the largest maxima (ties either way). A value among the
    row's `cap` largest that sat in an unselected block would be <= each selected block's max,
    i.e. there would already be `cap` values >= it among the candidates, so the `cap` largest
    candidate values are the row's `cap` largest values (as a multiset of values).
    """
    B, nb, b = z_BNb.shape
    n_blocks = min(cap, nb)
    _, blocks_BC = jax.lax.top_k(bmax_BN, n_blocks)
    cand_BX = jnp.take_along_axis(z_BNb, blocks_BC[:, :, None], axis=1).reshape(B, n_blocks * b)
    return jax.lax.top_k(cand_BX, min(cap, n_blocks * b))[0]


def _largest_threshold(fn, target_B):
    """Per row, the largest float t with fn(t) >= target, for fn non-increasing in t.

    Greedy over the 32 bits of an order-preserving integer key of float32 (most significant
    first). The answer is always a value present in the row, since fn only changes there.
    Keys below 2**23 (that of the lowest finite float) decode to -inf or NaN; NaN trials fail
    the test. They are reached only if even fn(lowest float) < target, which rounding can do
    for a top-p target near the total mass: the answer is then the lowest float (keep all).
    """

    def to_float(key_B):
        bits = jnp.where(key_B >= jnp.uint32(1 << 31), key_B ^ jnp.uint32(1 << 31), ~key_B)
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    def body(i, key_B):
        trial_B = key_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(fn(to_float(trial_B)) >= target_B, trial_B, key_B)

    key_B = jax.lax.fori_loop(0, _BISECT_STEPS, body, jnp.zeros(target_B.shape, jnp.uint32))
    return jnp.where(key_B < jnp.uint32(1 << 23), jnp.finfo(jnp.float32).min, to_float(key_B))
