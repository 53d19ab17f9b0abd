"""Sampling in rounds from one prefill: the prompts are prefilled once (`prefill`), then every
round decodes groups of rows from the stored keys and values (`sample_groups`).

A round is U groups x n rows. Group g draws the samples `sample_index_UN[g]` of prompt
`group_prompt_U[g]` and reads that prompt's prefilled keys and values; several groups may draw
for the same prompt, so rows freed by one prompt can go to another. The per-response random
streams (see sampler.py) make every response the one `sampler.sample` gives for the same prompt
and sample index, whichever round and group draw it. Rows not `live_UN` are idle: they start
stopped, so they never hold the loop up, and come out empty (mask False, length 0).

Static shapes: one program per (U, n, max_new_tokens) and prompt shape, whatever the groups are
assigned to; an adaptive vote compiles its first round [P x n_vote_min] and its later rounds
[U x n_vote_step] once each.

Memory: the prefill (T slots per prompt and layer) stays on the devices across the rounds; a
round holds a gathered copy for its U groups (T slots each) and the response caches of its U·n
rows (R - 1 slots each), against P·N rows for the fixed budget in one call.

With a mesh, prompts and groups are both split over the data axis in contiguous blocks; a group
draws only for a prompt of its own block, so the gather of its keys and values stays on the
devices that hold them (and, across hosts, a process samples only its own prompts).

Shape suffixes: ttrl_jax/__init__.py; besides its letters, Z counts the data shards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ttrl_jax import sharding
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.sampling import decode, token_draw
from ttrl_jax.sampling import sampler as sampler_lib

_KEYS = ("batch", "kv_heads", "head_dim", "cache_seq")
_VALUES = ("batch", "kv_heads", "cache_seq", "head_dim")


@flax.struct.dataclass
class Prefill:
    """The prompts' prefill, kept on the devices for every round of a step."""

    logits_PV: jax.Array  # float32: the logits after each prompt's last token
    keys: tuple[jax.Array, ...]  # per layer [P, K, H, T], compute dtype
    values: tuple[jax.Array, ...]  # per layer [P, K, T, H]
    prompt_mask_PT: jax.Array  # bool
    prompt_index_P: jax.Array  # int32: each prompt's index in the random streams


def prefill(
    params: Any,
    cfg: ModelConfig,
    prompt_tokens_PT: jax.Array,
    prompt_mask_PT: jax.Array,
    *,
    mesh: Mesh | None = None,
    prompt_index_P: jax.Array | None = None,
) -> Prefill:
    """Prefills left-padded prompts once, for `sample_groups` to decode from.

    Args:
      params, cfg, prompt_tokens_PT, prompt_mask_PT, mesh: as for `sampler.sample`.
      prompt_index_P: each prompt's index in the random streams (default 0 .. P-1).
    """
    P = prompt_tokens_PT.shape[0]
    if prompt_index_P is None:
        prompt_index_P = np.arange(P, dtype=np.int32)
        if mesh is not None:
            prompt_index_P = jax.device_put(prompt_index_P, sharding.batch_sharding(mesh, 1))
    T = prompt_tokens_PT.shape[1]
    fn = compiled_prefill(cfg, P, T, mesh)
    return fn(params, prompt_tokens_PT, prompt_mask_PT, prompt_index_P)


@functools.lru_cache(maxsize=16)
def compiled_prefill(cfg: ModelConfig, P: int, T: int, mesh: Mesh | None = None):
    """The jitted `(params, prompt_PT, mask_PT, prompt_index_P) -> Prefill` for [P, T] prompts
    (with a mesh, its output placed as `prefill_shardings`)."""
    fn = functools.partial(_prefill_impl, cfg=cfg)
    if mesh is None:
        return jax.jit(fn)
    fn = sharding.with_rules(fn, mesh, sharding.SAMPLE_RULES)
    return jax.jit(fn, out_shardings=prefill_shardings(cfg, P, T, mesh))


def _prefill_impl(params, prompt_PT, prompt_mask_PT, prompt_index_P, *, cfg) -> Prefill:
    mask_PT = prompt_mask_PT.astype(bool)
    logits_PV, (keys, values) = sampler_lib.prefill_prompts(
        cfg, params, prompt_PT.astype(jnp.int32), mask_PT
    )
    return Prefill(logits_PV, keys, values, mask_PT, prompt_index_P.astype(jnp.int32))


def prefill_shapes(cfg: ModelConfig, P: int, T: int) -> Prefill:
    """The Prefill of P prompts of length T as ShapeDtypeStructs."""
    dtype = jnp.dtype(cfg.dtype)
    K, H, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    sds = jax.ShapeDtypeStruct
    return Prefill(
        logits_PV=sds((P, cfg.vocab_size), jnp.float32),
        keys=(sds((P, K, H, T), dtype),) * L,
        values=(sds((P, K, T, H), dtype),) * L,
        prompt_mask_PT=sds((P, T), jnp.bool_),
        prompt_index_P=sds((P,), jnp.int32),
    )


def prefill_shardings(cfg: ModelConfig, P: int, T: int, mesh: Mesh) -> Prefill:
    """Where a Prefill lives: prompts over the data axis, kv heads over the model axis (copied
    where they do not divide it), as the decode loop reads them."""
    L = cfg.num_layers
    logical = Prefill(
        logits_PV=("batch", None),
        keys=(_KEYS,) * L,
        values=(_VALUES,) * L,
        prompt_mask_PT=("batch", None),
        prompt_index_P=("batch",),
    )
    return sharding.logical_to_shardings(
        prefill_shapes(cfg, P, T), logical, mesh, sharding.SAMPLE_RULES, what="prefill"
    )


def abstract_prefill(cfg: ModelConfig, P: int, T: int, mesh: Mesh) -> Prefill:
    """The Prefill as sharded ShapeDtypeStructs: an argument of ahead-of-time compiles (plan)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        prefill_shapes(cfg, P, T),
        prefill_shardings(cfg, P, T, mesh),
    )


# ----------------------------------------------------------------------------- rounds


def sample_groups(
    params: Any,
    cfg: ModelConfig,
    prefilled: Prefill,
    key: jax.Array,
    sampling: token_draw.SamplingParams,
    group_prompt_U: jax.Array,
    sample_index_UN: jax.Array,
    live_UN: jax.Array | None = None,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    mesh: Mesh | None = None,
    group_chunk: int | None = None,
    kv_block: int = sampler_lib.KV_BLOCK,
    halvings: int = sampler_lib.HALVINGS,
) -> sampler_lib.Rollout:
    """One round: n responses for each of U groups, decoded from the prefill.

    Compiles once per (cfg, n, max_new_tokens, stop_ids, pad_id, mesh, group_chunk, kv_block)
    and shapes; the group assignment, indices and sampling values are traced.

    Args:
      params: model params (the sampler's layout with a mesh), as for `sampler.sample`.
      cfg: the model config.
      prefilled: from `prefill` with the same params.
      key: the same PRNG key for every round of a step: response n of prompt p is the same
        whichever round draws it.
      sampling: temperature / top-p / top-k / min-p (traced).
      group_prompt_U: int, the prompt (row of the prefill) each group draws for; with a mesh,
        a prompt of the group's own data shard (groups and prompts split in contiguous blocks).
      sample_index_UN: int, each row's sample index within its prompt.
      live_UN: bool, rows that draw (default all); the others come out empty.
      max_new_tokens, stop_ids, pad_id, kv_block, halvings: as for `sampler.sample`.
      mesh: optional (data, model) device mesh.
      group_chunk: groups per decode pass (0 or None = all), as `prompt_chunk` in `sample`.

    Returns:
      A Rollout with [U, n, max_new_tokens] tokens, mask, log-probs and entropies.
    """
    P = prefilled.prompt_mask_PT.shape[0]
    U, n = sample_index_UN.shape
    shards = sharding.data_size(mesh)
    if tuple(group_prompt_U.shape) != (U,):
        raise ValueError(f"group_prompt_U has shape {tuple(group_prompt_U.shape)}; want ({U},)")
    if live_UN is not None and tuple(live_UN.shape) != (U, n):
        raise ValueError(f"live_UN has shape {tuple(live_UN.shape)}; want {(U, n)}")
    if P % shards or U % shards:
        raise ValueError(
            f"{P} prompts and {U} groups must both split over the mesh's data axis ({shards})"
        )
    if isinstance(group_prompt_U, np.ndarray):
        home = np.arange(U) // (U // shards)
        if ((group_prompt_U < 0) | (group_prompt_U >= P)).any() or (
            (group_prompt_U // (P // shards)) != home
        ).any():
            raise ValueError(
                f"group_prompt_U={group_prompt_U.tolist()} must name, for each group, one of the "
                f"{P} prompts of its own data shard (prompts and groups split in {shards} blocks)"
            )
    if live_UN is None:
        live_UN = np.ones((U, n), bool)
    fn = compiled_groups(
        cfg, n, max_new_tokens, stop_ids, pad_id, mesh, group_chunk, kv_block, halvings
    )
    args = (group_prompt_U, sample_index_UN, live_UN)
    if mesh is not None:
        args = tuple(
            jax.device_put(x, sharding.batch_sharding(mesh, np.ndim(x)))
            if isinstance(x, np.ndarray)
            else x
            for x in args
        )
    return fn(params, prefilled, key, sampling, *args)


def compiled_groups(
    cfg: ModelConfig,
    n_rows: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    mesh: Mesh | None = None,
    group_chunk: int | None = None,
    kv_block: int = sampler_lib.KV_BLOCK,
    halvings: int = sampler_lib.HALVINGS,
):
    """The jitted round `(params, prefill, key, sampling, group_prompt_U, sample_index_UN,
    live_UN) -> Rollout` for static settings; with a mesh, what the memory plan compiles for
    abstract arguments (see `abstract_prefill`)."""
    if int(kv_block) < 1:
        raise ValueError(f"kv_block={kv_block} must be >= 1")
    sampler_lib.check_halvings(halvings)
    static = dict(
        cfg=cfg, N=int(n_rows), R=int(max_new_tokens), stop_ids=tuple(int(s) for s in stop_ids),
        pad_id=int(pad_id), chunk=int(group_chunk or 0), kv_block=int(kv_block),
        halvings=int(halvings),
    )  # fmt: skip
    return _build_groups(mesh, **static)


@functools.lru_cache(maxsize=64)
def _build_groups(mesh, **static):
    return sampler_lib.jit_rollout(functools.partial(_groups_impl, **static), mesh)


def _groups_impl(
    params, prefilled: Prefill, key, sampling, group_prompt_U, sample_index_UN, live_UN, *,
    cfg, N, R, stop_ids, pad_id, chunk, kv_block, halvings,
) -> sampler_lib.Rollout:  # fmt: skip
    dparams = decode.decode_params(cfg, params, fuse=decode.split_size("heads") == 1)
    P, U = prefilled.prompt_mask_PT.shape[0], group_prompt_U.shape[0]
    shards = decode.split_size("batch")
    # Each group's prompt, as an index into its own data shard's block of prompts.
    local_ZU = (group_prompt_U.astype(jnp.int32) % (P // shards)).reshape(shards, U // shards)

    def gather(x_P, names=None):
        x_ZP = x_P.reshape((shards, P // shards) + x_P.shape[1:])
        x_ZU = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))(x_ZP, local_ZU)
        x_U = x_ZU.reshape((U,) + x_P.shape[1:])
        return x_U if names is None else decode.constrain(x_U, names)

    per_group = (
        gather(prefilled.logits_PV, ("batch", "vocab")),
        (
            tuple(gather(k, _KEYS) for k in prefilled.keys),
            tuple(gather(v, _VALUES) for v in prefilled.values),
        ),
        gather(prefilled.prompt_mask_PT),
        gather(prefilled.prompt_index_P),
        sample_index_UN.astype(jnp.int32),
        live_UN.astype(bool),
    )
    return sampler_lib.decode_groups(
        dparams, key, sampling, per_group, cfg=cfg, N=N, R=R, stop_ids=stop_ids, pad_id=pad_id,
        kv_block=kv_block, chunk=chunk, halvings=halvings,
    )  # fmt: skip


def abstract_round_inputs(
    cfg: ModelConfig, mesh: Mesh, prompts: int, prompt_len: int, groups: int, rows: int
) -> tuple[Prefill, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """A round's arguments after (params, prefill, key, sampling) and the prefill itself, as
    sharded ShapeDtypeStructs: (prefill, group_prompt_U, sample_index_UN, live_UN). With them a
    memory plan compiles `compiled_groups(cfg, rows, ...)` for a round of `groups` x `rows`."""

    def per_group(shape, dtype):
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
        )

    return (
        abstract_prefill(cfg, prompts, prompt_len, mesh),
        per_group((groups,), jnp.int32),
        per_group((groups, rows), jnp.int32),
        per_group((groups, rows), jnp.bool_),
    )
