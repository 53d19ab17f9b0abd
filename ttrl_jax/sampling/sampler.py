"""Grouped rollouts: prefill each prompt once, then decode N samples per prompt in one jitted loop.

One call handles P prompts × N samples = B rows, prompts left-padded to a bucket length T, up to
R = max_new_tokens new tokens per row:

1. **Prefill** the P prompts once, with the model's own cached forward.
2. **Decode** all B rows in a `lax.while_loop` that exits as soon as every row has emitted a
   stop token, and that drops stopped rows on the way: once no prompt has more than half of
   its rows running, the loop goes on with half as many rows per prompt (`halvings`). The
   loop body is `decode.decode_step`, a one-token forward written for sampling (prompt keys
   shared by a group's N rows, weights prepared once per call, the response cache read only
   as far as it is filled; see there). With `prompt_chunk`, the prompts are decoded
   in passes of that many (a `lax.map` over passes in the same program), so that only one
   pass's response caches, N·(R-1) slots per prompt, are live at a time.
3. **Sample** with `token_draw.sample_token`: temperature, top-k, top-p, min-p and greedy,
   without sorting the vocabulary (see there), one pair of uniforms per row and step.

`decode_groups` (the decode loop over groups of rows, each group one prefilled prompt) and
`prefill_prompts` are shared with rounds.py, which samples in rounds from one stored prefill.

Random streams are per response: response n of prompt p draws token t with
fold_in(fold_in(fold_in(key, p), n), t), p and n being indices the caller may set. So a response
does not depend on what else is in the batch: the same rows come out in one call or in several,
whole or in chunks of prompts.

Log-prob convention: `Rollout.logp_PNR` is log softmax(logits / temperature) at the sampled token
(raw logits when temperature is 0), i.e. the rollout policy's log-prob as the train step
recomputes it (verl divides by the rollout temperature the same way). It is NOT the log-prob under
the top-k/top-p/min-p-filtered distribution. `entropy_PNR` is the entropy of that same
(unfiltered, temperature-scaled) distribution.

Shape suffixes: ttrl_jax/__init__.py; b = P·n are the rows a level of the decode loop still
computes, n per prompt (a tile of B = P·N).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ttrl_jax import sharding
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.sampling import decode
from ttrl_jax.sampling.token_draw import SamplingParams, sample_scaled, sample_token

FINISH_STOP = 0  # the row emitted a stop token
FINISH_LENGTH = 1  # the row ran out of max_new_tokens
KV_BLOCK = 256  # response-cache slots per decode-attention block (see `sample`)
HALVINGS = 3  # a prompt's decoded rows may halve this often as they stop (see `_decode_pass`)

# Logical axes of the decode loop's caches: keys [rows, K, H, slots], values [rows, K, slots, H].
_KEYS = ("batch", "kv_heads", "head_dim", "cache_seq")
_VALUES = ("batch", "kv_heads", "cache_seq", "head_dim")


# ----------------------------------------------------------------------------- public types


@flax.struct.dataclass
class Rollout:
    """N sampled responses for each of P prompts (R = max_new_tokens response slots).

    The prompts themselves are the caller's; `logprobs.sequence_inputs(prompt, prompt_mask,
    tokens, mask)` rebuilds full sequences with the same positions the sampler used.
    """

    tokens_PNR: jax.Array  # int32; pad_id after the first stop token and past the last step
    mask_PNR: jax.Array  # bool; True on response tokens up to and including the first stop token
    logp_PNR: jax.Array  # float32; log softmax(logits / temperature)[token]; 0 where masked
    entropy_PNR: jax.Array  # float32; entropy of softmax(logits / temperature); 0 where masked
    length_PN: jax.Array  # int32; number of True in mask_PNR (stop token included)
    finish_PN: jax.Array  # int32; FINISH_STOP or FINISH_LENGTH
    num_steps: jax.Array  # int32 scalar; decode-loop iterations run, over all passes
    row_steps: jax.Array  # int32 scalar; rows x iterations computed (rows leave as they stop)


# ----------------------------------------------------------------------------- entry point


def sample(
    params: Any,
    cfg: ModelConfig,
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
    prompt_index_P: jax.Array | None = None,
    sample_index_PN: jax.Array | None = None,
    prompt_chunk: int | None = None,
    kv_block: int = KV_BLOCK,
    halvings: int = HALVINGS,
) -> Rollout:
    """Samples `n_samples` responses for each left-padded prompt.

    Compiles once per (cfg, n_samples, max_new_tokens, stop_ids, pad_id, mesh, prompt_chunk,
    kv_block) and prompt shape [P, T]; sampling values and indices are traced. With a mesh,
    pass params in `decoder.param_shardings(cfg, mesh, SAMPLE_RULES)` and prompts in
    `batch_sharding`; rows are split over 'data', heads and vocabulary over 'model'.

    Args:
      params: model params ({'params': ...}), in any float dtype (cast to cfg.dtype once).
      cfg: the model config.
      prompt_tokens_PT: int token ids, left-padded (every row ends with a real token).
      prompt_mask_PT: bool, True on real prompt tokens; every row needs at least one.
      key: PRNG key. Each response draws from its own stream, a function of the key, its
        prompt's index and its sample index only (see `row_keys`): the same response comes out
        whatever else is in the batch, in one call or over several.
      sampling: temperature / top-p / top-k / min-p (traced).
      n_samples: N, responses per prompt (rows p*N .. p*N+N-1 belong to prompt p).
      max_new_tokens: response slots R; a row that emits no stop token ends with FINISH_LENGTH.
      stop_ids: token ids that end a response (the stop token is kept and masked True).
      pad_id: token id written after the stop token.
      mesh: optional (data, model) device mesh.
      prompt_index_P: int, each prompt's index in the stream (default 0 .. P-1; traced).
      sample_index_PN: int, each response's sample index (default n for row (p, n); traced).
        E.g. a second call with sample indices 16 .. 31 of a prompt, and its prompt index,
        gives the responses that one call with n_samples=32 gives in those rows.
      prompt_chunk: prompts per pass (0 or None = all): the P prompts are sampled in P /
        prompt_chunk passes of one program, one pass's caches live at a time. The same
        responses either way. It must divide P (and, with a mesh, split over its 'data' axis).
      kv_block: response-cache slots per attention block: each decode step reads the blocks
        filled so far, not the whole max_new_tokens.
      halvings: how many times a prompt's decoded rows may halve as its responses stop (N ->
        N/2 -> ...; 0 = every row runs until the last one stops). The same responses either way,
        up to float rounding (a level's matmuls have fewer rows, which can round differently).

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
    P = prompt_tokens_PT.shape[0]
    for name, index, shape in (
        ("prompt_index_P", prompt_index_P, (P,)),
        ("sample_index_PN", sample_index_PN, (P, n_samples)),
    ):
        if index is not None and tuple(index.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(index.shape)}; it must be {shape}")
    fn = compiled_sampler(
        cfg, n_samples, max_new_tokens, stop_ids, pad_id, mesh, prompt_chunk, kv_block, halvings
    )
    return fn(
        params, prompt_tokens_PT, prompt_mask_PT, key, sampling, prompt_index_P, sample_index_PN
    )


def compiled_sampler(
    cfg: ModelConfig,
    n_samples: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    mesh: Mesh | None = None,
    prompt_chunk: int | None = None,
    kv_block: int = KV_BLOCK,
    halvings: int = HALVINGS,
):
    """The jitted `(params, prompt_PT, mask_PT, key, sampling[, prompt_index_P,
    sample_index_PN]) -> Rollout` for static settings (one per setting, reused: its compiled
    programs are cached per prompt shape)."""
    if int(kv_block) < 1:
        raise ValueError(f"kv_block={kv_block} must be >= 1")
    check_halvings(halvings)
    if prompt_chunk is not None and int(prompt_chunk) < 0:
        raise ValueError(f"prompt_chunk={prompt_chunk} must be >= 0 (0 or None = all prompts)")
    static = dict(
        cfg=cfg,
        n_samples=int(n_samples),
        max_new_tokens=int(max_new_tokens),
        stop_ids=tuple(int(s) for s in stop_ids),
        pad_id=int(pad_id),
        prompt_chunk=int(prompt_chunk or 0),
        kv_block=int(kv_block),
        halvings=int(halvings),
    )
    return _build(mesh, **static)


def check_halvings(halvings: int) -> None:
    """A clear error for a negative `halvings` (shared with rounds.py)."""
    if int(halvings) < 0:
        raise ValueError(f"halvings={halvings} must be >= 0 (0 = rows never leave the loop)")


@functools.lru_cache(maxsize=64)
def _build(mesh, **static):
    return jit_rollout(functools.partial(_sample_impl, **static), mesh)


def jit_rollout(fn, mesh: Mesh | None):
    """`fn` returning a Rollout, jitted; with a mesh, under the sample rules and with the
    Rollout's rows sharded over the data axis (its step count replicated)."""
    if mesh is None:
        return jax.jit(fn)
    per_token = sharding.batch_sharding(mesh, 3, sharding.SAMPLE_RULES)
    per_row = sharding.batch_sharding(mesh, 2, sharding.SAMPLE_RULES)
    # Rollout's fields in order: tokens, mask, logp, entropy; length, finish; the two counts.
    out = Rollout(*(per_token,) * 4, per_row, per_row, *(sharding.replicated(mesh),) * 2)
    return jax.jit(sharding.with_rules(fn, mesh, sharding.SAMPLE_RULES), out_shardings=out)


# ----------------------------------------------------------------------------- the loop


@flax.struct.dataclass
class _DecodeState:
    """Loop carry of the decode `lax.while_loop`, over the b = P·n rows of its level."""

    step: jax.Array  # int32: index of the token sampled in this iteration (1 .. R-1)
    token_b: jax.Array  # int32: the token sampled in the previous iteration, fed now
    done_b: jax.Array  # bool: a stop token was sampled
    key_b: jax.Array  # each row's random stream (`row_keys`)
    tokens_bR: jax.Array
    logp_bR: jax.Array
    entropy_bR: jax.Array
    k_gen: tuple[jax.Array, ...]  # per layer [b, K, H, S]: keys of the fed response tokens
    v_gen: tuple[jax.Array, ...]  # per layer [b, K, S, H]


def row_keys(key: jax.Array, prompt_index_P: jax.Array, sample_index_PN: jax.Array) -> jax.Array:
    """Each response's key, [P·N]: fold_in(fold_in(key, prompt index), sample index); its
    token t is drawn with fold_in(row key, t)."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    key_P = jax.vmap(jax.random.fold_in, (None, 0))(key, prompt_index_P)
    key_PN = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)))(key_P, sample_index_PN)
    return key_PN.reshape(-1)


def _sample_impl(
    params, prompt_PT, prompt_mask_PT, key, sampling, prompt_index_P=None, sample_index_PN=None,
    *, cfg, n_samples, max_new_tokens, stop_ids, pad_id, prompt_chunk, kv_block, halvings,
) -> Rollout:  # fmt: skip
    P = prompt_PT.shape[0]
    N = n_samples
    if prompt_index_P is None:
        prompt_index_P = jnp.arange(P, dtype=jnp.int32)
    if sample_index_PN is None:
        sample_index_PN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (P, N))
    # Once per call, shared by every pass: the decode weights, and the prefill of all prompts
    # (their caches are T slots per prompt, against N·(R-1) per prompt for the responses).
    dparams = decode.decode_params(cfg, params, fuse=decode.split_size("heads") == 1)
    prompt_mask_PT = prompt_mask_PT.astype(bool)
    logits_PV, prompt_kv = prefill_prompts(cfg, params, prompt_PT.astype(jnp.int32), prompt_mask_PT)
    per_prompt = (
        logits_PV,
        prompt_kv,
        prompt_mask_PT,
        prompt_index_P.astype(jnp.int32),
        sample_index_PN.astype(jnp.int32),
    )
    return decode_groups(
        dparams, key, sampling, per_prompt, cfg=cfg, N=N, R=max_new_tokens, stop_ids=stop_ids,
        pad_id=pad_id, kv_block=kv_block, chunk=prompt_chunk, halvings=halvings,
    )  # fmt: skip


def decode_groups(
    dparams, key, sampling, per_group, *, cfg, N, R, stop_ids, pad_id, kv_block, chunk, halvings
) -> Rollout:
    """Decodes the N rows of each group of `per_group` = (logits_UV, (keys, values),
    prompt_mask_UT, prompt_index_U, sample_index_UN[, live_UN]), a group being one prefilled
    prompt, in passes of `chunk` groups (0 = all)."""
    U = per_group[2].shape[0]
    decode_pass = functools.partial(
        _decode_pass, dparams, key, sampling,
        cfg=cfg, N=N, R=R, stop_ids=stop_ids, pad_id=pad_id, kv_block=kv_block, halvings=halvings,
    )  # fmt: skip
    C = _passes(U, chunk, decode.split_size("batch"))
    if C == 1:
        return decode_pass(*per_group)

    # Pass c takes groups c, c + C, c + 2C, ...: with the groups split over the data axis in
    # contiguous blocks, every device then samples its own groups in every pass.
    def split(x):
        return jnp.swapaxes(x.reshape((U // C, C) + x.shape[1:]), 0, 1)

    def merge(x):
        return jnp.swapaxes(x, 0, 1).reshape((U,) + x.shape[2:])

    out = jax.lax.map(lambda xs: decode_pass(*xs), jax.tree.map(split, per_group))
    return out.replace(
        **{f: merge(getattr(out, f)) for f in _ROW_FIELDS},
        num_steps=out.num_steps.sum(),
        row_steps=out.row_steps.sum(),
    )


def _passes(P: int, prompt_chunk: int, data_size: int) -> int:
    """Number of passes over the prompts; checks that `prompt_chunk` splits them evenly."""
    if not prompt_chunk or prompt_chunk >= P:
        return 1
    if P % prompt_chunk or prompt_chunk % data_size:
        raise ValueError(
            f"prompt_chunk={prompt_chunk} must divide the {P} prompts of a call and be a "
            f"multiple of the mesh's data axis ({data_size}); choose such a chunk (or 0 = all)"
        )
    return P // prompt_chunk


def _decode_pass(
    dparams, key, sampling, logits_PV, prompt_kv, prompt_mask_PT, prompt_index_P,
    sample_index_PN, live_PN=None, *, cfg, N, R, stop_ids, pad_id, kv_block, halvings,
) -> Rollout:  # fmt: skip
    """One pass: decode the N rows of each of these prefilled prompts until all have stopped
    (rows not `live_PN` start stopped and come out empty).

    Rows that stop leave the loop: the pass runs in levels of n = N, N/2, ... rows per prompt
    (at most `halvings` halvings), and moves on to the next level as soon as no prompt has more
    than n/2 rows still running, carrying each prompt's running rows (and their caches and
    random streams) and dropping stopped ones. A row's random stream does not depend on the
    level it is decoded in, so this changes the cost of a pass, not its responses (up to float
    rounding: the logits of a row come from matmuls over fewer rows, which XLA may block
    differently; a token drawn right at a boundary of the inverse CDF can then flip).
    """
    P = prompt_mask_PT.shape[0]
    B = P * N
    key_B = row_keys(key, prompt_index_P, sample_index_PN)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))
    prompt_kv = (
        tuple(decode.constrain(k, _KEYS) for k in prompt_kv[0]),
        tuple(decode.constrain(v, _VALUES) for v in prompt_kv[1]),
    )
    temperature = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)
    n_prompt_P = prompt_mask_PT.sum(-1, dtype=jnp.int32)
    live_B = None if live_PN is None else live_PN.reshape(B)  # idle rows start stopped

    # Token 0 comes from the prefill logits. Repeating them over the N samples costs one B×V
    # copy per call; every later step has B×V logits anyway.
    logits_BV = decode.constrain(jnp.repeat(logits_PV, N, axis=0), ("batch", "vocab"))
    token_B, logp_B, entropy_B = sample_token(logits_BV, step_keys(key_B, 0), sampling)
    done_B = _is_stop(token_B, stop_ids)
    if live_B is not None:
        done_B = done_B | ~live_B

    cache_dtype = jnp.dtype(cfg.dtype)
    K, H = cfg.num_kv_heads, cfg.head_dim
    S = max(R - 1, 1)  # the last sampled token is never fed back
    k_gen = decode.constrain(jnp.zeros((B, K, H, S), cache_dtype), _KEYS)
    v_gen = decode.constrain(jnp.zeros((B, K, S, H), cache_dtype), _VALUES)
    state = _DecodeState(
        step=jnp.ones((), jnp.int32),
        token_b=token_B,
        done_b=done_B,
        key_b=key_B,
        tokens_bR=_put(jnp.full((B, R), pad_id, jnp.int32), token_B, 0),
        logp_bR=_put(jnp.zeros((B, R), jnp.float32), logp_B, 0),
        entropy_bR=_put(jnp.zeros((B, R), jnp.float32), entropy_B, 0),
        k_gen=(k_gen,) * cfg.num_layers,
        v_gen=(v_gen,) * cfg.num_layers,
    )
    loop = functools.partial(
        _decode_level, dparams, sampling, prompt_kv, prompt_mask_PT, n_prompt_P, temperature,
        cfg=cfg, R=R, stop_ids=stop_ids, kv_block=kv_block,
    )  # fmt: skip
    n, row_steps = N, jnp.zeros((), jnp.int32)
    row_Pn = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (P, N))
    for level in range(halvings + 1):
        last = level == halvings or n == 1
        start = state.step
        state = loop(state, n=n, last=last)
        row_steps = row_steps + P * n * (state.step - start)
        # (tokens, log-probs, entropies) of the pass's B rows; a later level's n rows per prompt
        # are written back where they came from (row_Pn: their indices among the prompt's N).
        level_bR = tuple(getattr(state, f) for f in _OUT_FIELDS)
        if level == 0:
            out_BR = level_bR
        else:
            out_BR = tuple(_scatter_rows(o, x, row_Pn) for o, x in zip(out_BR, level_bR))
        if last:
            break
        # Each prompt's running rows first (stable: in row order), then keep n/2 of them.
        keep_Pn = jnp.argsort(state.done_b.reshape(P, n), axis=1, stable=True)[:, : n // 2]
        row_Pn = jax.vmap(lambda r, i: r[i])(row_Pn, keep_Pn)
        state = _keep_rows(state, keep_Pn)
        n //= 2
    return _finish(*out_BR, state.step, row_steps, P, N, stop_ids, pad_id, live_B)


_OUT_FIELDS = ("tokens_bR", "logp_bR", "entropy_bR")


def _decode_level(
    dparams, sampling, prompt_kv, prompt_mask_PT, n_prompt_P, temperature, state, *, n, last,
    cfg, R, stop_ids, kv_block,
) -> _DecodeState:  # fmt: skip
    """The decode loop at n rows per prompt: until every row has stopped, or R tokens, or (not
    `last`) no prompt has more than n/2 rows running."""
    P = prompt_mask_PT.shape[0]
    n_prompt_b = jnp.repeat(n_prompt_P, n)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))

    def cond(st: _DecodeState):
        go = (st.step < R) & ~jnp.all(st.done_b)
        if last:
            return go
        return go & (jnp.max(jnp.sum(~st.done_b.reshape(P, n), axis=1)) > n // 2)

    def body(st: _DecodeState):
        slot = st.step - 1  # the fed token sits in response slot `slot`
        z_bV, k_gen, v_gen = decode.decode_step(
            cfg, dparams, st.token_b, n_prompt_b + slot, slot, st.k_gen, st.v_gen,
            prompt_kv, prompt_mask_PT, n, temperature, kv_block,
        )  # fmt: skip
        token_b, logp_b, entropy_b = sample_scaled(z_bV, step_keys(st.key_b, st.step), sampling)
        return st.replace(
            step=st.step + 1,
            token_b=token_b,
            done_b=st.done_b | _is_stop(token_b, stop_ids),
            tokens_bR=_put(st.tokens_bR, token_b, st.step),
            logp_bR=_put(st.logp_bR, logp_b, st.step),
            entropy_bR=_put(st.entropy_bR, entropy_b, st.step),
            k_gen=k_gen,
            v_gen=v_gen,
        )

    return jax.lax.while_loop(cond, body, state)


def _put(buf_bR, value_b, step):
    update_b1 = value_b[:, None].astype(buf_bR.dtype)
    return jax.lax.dynamic_update_slice(buf_bR, update_b1, (0, step))


def _keep_rows(state: _DecodeState, keep_Pm) -> _DecodeState:
    """The state of rows `keep_Pm` (indices among each prompt's n rows) only: m per prompt."""
    P = keep_Pm.shape[0]

    def keep(x_b, names=None):
        x_Pn = x_b.reshape((P, -1) + x_b.shape[1:])
        x_Pm = jax.vmap(lambda x, i: x[i])(x_Pn, keep_Pm)
        x_b = x_Pm.reshape((-1,) + x_b.shape[1:])
        return x_b if names is None else decode.constrain(x_b, names)

    return state.replace(
        token_b=keep(state.token_b),
        done_b=keep(state.done_b),
        key_b=keep(state.key_b),
        tokens_bR=keep(state.tokens_bR),
        logp_bR=keep(state.logp_bR),
        entropy_bR=keep(state.entropy_bR),
        k_gen=tuple(keep(k, _KEYS) for k in state.k_gen),
        v_gen=tuple(keep(v, _VALUES) for v in state.v_gen),
    )


def _scatter_rows(full_BR, level_bR, row_Pn):
    """`full_BR` with each prompt's rows `row_Pn` (indices among its N) set to `level_bR`."""
    P, n = row_Pn.shape
    full_PNR = full_BR.reshape((P, -1) + full_BR.shape[1:])
    level_PnR = level_bR.reshape((P, n) + level_bR.shape[1:])
    out = jax.vmap(lambda f, i, v: f.at[i].set(v))(full_PNR, row_Pn, level_PnR)
    return out.reshape(full_BR.shape)


_ROW_FIELDS = ("tokens_PNR", "mask_PNR", "logp_PNR", "entropy_PNR", "length_PN", "finish_PN")


def _finish(
    tokens_BR, logp_BR, entropy_BR, step, row_steps, P: int, N: int, stop_ids, pad_id, live_B=None
) -> Rollout:
    """Masks everything after the first stop token (cumulative-sum trick), and idle rows, and
    reshapes."""
    B, R = tokens_BR.shape
    stop_BR = _is_stop(tokens_BR, stop_ids).astype(jnp.int32)
    stops_before_BR = jnp.cumsum(stop_BR, axis=1) - stop_BR
    sampled_R = jnp.arange(R) < step  # slots filled before the loop exited
    mask_BR = (stops_before_BR == 0) & sampled_R[None, :]
    if live_B is not None:
        mask_BR = mask_BR & live_B[:, None]
    stopped_B = jnp.any(mask_BR & (stop_BR > 0), axis=1)
    rollout = Rollout(
        tokens_PNR=jnp.where(mask_BR, tokens_BR, pad_id).reshape(P, N, R),
        mask_PNR=mask_BR.reshape(P, N, R),
        logp_PNR=jnp.where(mask_BR, logp_BR, 0.0).reshape(P, N, R),
        entropy_PNR=jnp.where(mask_BR, entropy_BR, 0.0).reshape(P, N, R),
        length_PN=mask_BR.sum(1, dtype=jnp.int32).reshape(P, N),
        finish_PN=jnp.where(stopped_B, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32).reshape(P, N),
        num_steps=step - 1,
        row_steps=row_steps,
    )
    chex.assert_shape([rollout.tokens_PNR, rollout.mask_PNR, rollout.logp_PNR], (P, N, R))
    chex.assert_shape([rollout.entropy_PNR], (P, N, R))
    chex.assert_shape([rollout.length_PN, rollout.finish_PN], (P, N))
    return rollout


def _is_stop(tokens, stop_ids: tuple[int, ...]):
    stop = jnp.zeros(tokens.shape, bool)
    for s in stop_ids:
        stop = stop | (tokens == s)
    return stop


# ----------------------------------------------------------------------------- prefill


def prefill_prompts(cfg, params, prompt_PT, prompt_mask_PT):
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
    k_LPTKH, v_LPTKH = cache.k_LBSKH.astype(dtype), cache.v_LBSKH.astype(dtype)
    keys = tuple(decode.constrain(k.transpose(0, 2, 3, 1), _KEYS) for k in k_LPTKH)
    values = tuple(decode.constrain(v.transpose(0, 2, 1, 3), _VALUES) for v in v_LPTKH)
    return logits_PV, (keys, values)
