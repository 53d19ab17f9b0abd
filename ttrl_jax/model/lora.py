"""LoRA: low-rank adapters on a frozen base model's projections, as a parameter tree of their own.

The adapters are the flax collection "lora", beside the base model's "params", stacked on the
layer axis as the base's layers are:

    {"params": base}                    the base model, which is also the KL reference
    {"params": base, "lora": adapters}  the policy: each targeted projection W x becomes
                                        W x + (alpha / rank) B A x

so the reference costs no second copy of the model. The decoder adds an adapter wherever the
collection holds one (`delta`): two thin matmuls beside the frozen one, so the backward pass forms
the gradients of A and B and never the full-size dW of a frozen weight. The sampler reads
`merge`d weights instead: one matmul per projection per decoded token, as the base model costs
(adapters beside the weights would read A and B again at every token; a merge reads the weights
once per step). A starts uniform and B at zero, as PEFT initialises them, so fresh adapters leave
the base model's output exactly as it was.

An adapter's A has its projection's input axes and B its output axes (q: A [D, J], B [J, Q, H];
o: A [Q, H, J], B [J, D]), with the same logical names, so one rules table shards both trees.

Shape suffixes: ttrl_jax/__init__.py, and J the adapters' rank.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ttrl_jax import sharding
from ttrl_jax.model.config import LoraConfig, ModelConfig

COLLECTION = "lora"
ADAPTER_DTYPE = jnp.float32  # adapters and their optimizer state, whatever the base's dtype


class Target(NamedTuple):
    """A projection an adapter can sit on: its module in a block, its input and output axes."""

    module: str  # "attn" or "mlp"
    in_shape: tuple[int, ...]
    in_axes: tuple[str, ...]  # logical names
    out_shape: tuple[int, ...]
    out_axes: tuple[str, ...]


def targets(cfg: ModelConfig) -> dict[str, Target]:
    """The projections `cfg.lora` adapts, by name (q, k, v, o, gate, up, down)."""
    lora = require(cfg)
    D, Q, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    every = {
        "q": Target("attn", (D,), ("embed",), (Q, H), ("heads", "head_dim")),
        "k": Target("attn", (D,), ("embed",), (K, H), ("kv_heads", "head_dim")),
        "v": Target("attn", (D,), ("embed",), (K, H), ("kv_heads", "head_dim")),
        "o": Target("attn", (Q, H), ("heads", "head_dim"), (D,), ("embed",)),
        "gate": Target("mlp", (D,), ("embed",), (F,), ("mlp",)),
        "up": Target("mlp", (D,), ("embed",), (F,), ("mlp",)),
        "down": Target("mlp", (F,), ("mlp",), (D,), ("embed",)),
    }
    return {name: every[name] for name in lora.targets}


def require(cfg: ModelConfig) -> LoraConfig:
    if cfg.lora is None:
        raise ValueError("the model config has no LoRA settings (ModelConfig.lora is None)")
    return cfg.lora


def names(target: str) -> tuple[str, str]:
    """The variable names of a projection's A and B in the "lora" collection."""
    return target + "_a", target + "_b"


# ----------------------------------------------------------------------------- the tree


def init_adapters(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh adapters {"lora": {"layers": {module: {"q_a": A, "q_b": B, ...}}}} in float32.

    A is uniform in ±1/sqrt(fan_in) (PEFT's kaiming_uniform with a = sqrt(5)), B is zero.
    """
    lora, L = require(cfg), cfg.num_layers
    tree: dict[str, dict[str, jax.Array]] = {}
    for (name, t), k in zip(targets(cfg).items(), jax.random.split(key, len(cfg.lora.targets))):
        bound = 1.0 / math.sqrt(math.prod(t.in_shape))
        a_name, b_name = names(name)
        module = tree.setdefault(t.module, {})
        module[a_name] = jax.random.uniform(
            k, (L, *t.in_shape, lora.rank), ADAPTER_DTYPE, -bound, bound
        )
        module[b_name] = jnp.zeros((L, lora.rank, *t.out_shape), ADAPTER_DTYPE)
    return {COLLECTION: {"layers": tree}}


def adapter_shapes(cfg: ModelConfig) -> dict:
    """The adapters' ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda: init_adapters(cfg, jax.random.key(0)))


def adapter_logical_axes(cfg: ModelConfig) -> dict:
    """The adapters' logical axes: A takes its projection's input axes, B its output axes, the
    rank axis is never split (a rank-16 axis over 16 devices would leave one column each)."""
    tree: dict[str, dict[str, PartitionSpec]] = {}
    for name, t in targets(cfg).items():
        a_name, b_name = names(name)
        module = tree.setdefault(t.module, {})
        module[a_name] = PartitionSpec("layers", *t.in_axes, None)
        module[b_name] = PartitionSpec("layers", None, *t.out_axes)
    return {COLLECTION: {"layers": tree}}


def adapter_shardings(cfg: ModelConfig, mesh: Mesh, rules: sharding.Rules) -> dict:
    """NamedShardings of the adapters under one rules table."""
    return sharding.logical_to_shardings(
        adapter_shapes(cfg), adapter_logical_axes(cfg), mesh, rules, what="LoRA adapters"
    )


def sharded_init_adapters(
    cfg: ModelConfig, mesh: Mesh, rules: sharding.Rules, key: jax.Array
) -> dict:
    """Fresh adapters created directly in their sharded layout."""
    return jax.jit(
        lambda k: init_adapters(cfg, k), out_shardings=adapter_shardings(cfg, mesh, rules)
    )(key)


def with_adapters(base: dict, adapters: dict) -> dict:
    """The policy's variables: the base's "params" and the adapters' "lora"."""
    return {**base, **adapters}


# ----------------------------------------------------------------------------- the maths


def delta(module: nn.Module, cfg: ModelConfig, target: str, x: jax.Array) -> jax.Array | None:
    """scale · B A x of the projection `target` when `module`'s "lora" collection holds its
    adapter (x: [B, T, <the projection's input axes>]), else None.

    With lora.dropout and a "dropout" rng given to `apply` (the train step's loss), x is dropped
    out first, a mask of its own per projection (PEFT's lora_dropout); without the rng (old and
    reference log-probs) it is the deterministic adapter.
    """
    a_name, b_name = names(target)
    if not module.has_variable(COLLECTION, a_name):
        return None
    lora = require(cfg)
    a = module.get_variable(COLLECTION, a_name).astype(cfg.dtype)
    b = module.get_variable(COLLECTION, b_name).astype(cfg.dtype)
    if lora.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    h_BTJ = jnp.tensordot(x, a, axes=a.ndim - 1) * lora.scale  # scaled at rank width: cheapest
    return jnp.tensordot(h_BTJ, b, axes=1)


def merge(cfg: ModelConfig, params: dict, adapters: dict, dtype: Any = None) -> dict:
    """Full params {"params": ...}: each targeted W + scale · A B (summed in float32), every
    leaf in `dtype` (None: each W keeps its own)."""
    lora = require(cfg)
    merged = jax.tree.map(lambda x: x, params)  # new dicts, the same leaves
    layers = merged["params"]["layers"]
    found = adapters[COLLECTION]["layers"]
    for name, t in targets(cfg).items():
        a_name, b_name = names(name)
        a = found[t.module][a_name].astype(jnp.float32)
        b = found[t.module][b_name].astype(jnp.float32)
        # [L, in..., J] x [L, J, out...] -> [L, in..., out...]: W's own shape, batched by layer.
        ab = jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((0,), (0,))))
        w = layers[t.module][name]
        # Rounded once, to the dtype asked for: a bfloat16 base merged for float32 compute keeps
        # the adapters' full precision (it is then the policy the decoder computes).
        out = w.dtype if dtype is None else dtype
        layers[t.module][name] = (w.astype(jnp.float32) + lora.scale * ab).astype(out)
    if dtype is not None:
        merged = jax.tree.map(lambda x: x.astype(dtype), merged)
    return merged


def count(cfg: ModelConfig) -> int:
    """Trained parameters of the adapters."""
    return sum(x.size for x in jax.tree.leaves(adapter_shapes(cfg)))
