"""One decoder for the Llama 3.x, Qwen2/Qwen2.5 and Qwen3 families, with a KV cache.

Read top-down: KV cache → Transformer → Block → Attention → MLP → norms and RoPE. The
architecture (ModelConfig, presets) is in config.py and the attention maths by backend in
attention.py; both are re-exported here. Layers are scanned (params stacked on a leading 'layers'
axis) so compile time does not grow with depth. LoRA adapters, when the variables hold them (a
"lora" collection beside "params"), are added to their projections (lora.py).

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ttrl_jax import sharding
from ttrl_jax.model import attention as attention_lib
from ttrl_jax.model import lora as lora_lib
from ttrl_jax.model.config import REMAT_POLICIES, ModelConfig, RopeScaling

# ----------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, plus which slots hold real (non-padding) tokens.

    Slots are written left to right, one chunk per call, at `index` (the same for every row:
    prompts are left-padded so all rows advance together).
    """

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    valid_BS: jax.Array  # bool
    index: jax.Array  # int32 scalar: next slot to write


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` rows and `max_len` slots."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k_LBSKH=jnp.zeros(shape, dtype),
        v_LBSKH=jnp.zeros(shape, dtype),
        valid_BS=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


CACHE_LOGICAL_AXES = KVCache(
    k_LBSKH=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    v_LBSKH=("layers", "batch", "cache_seq", "kv_heads", "head_dim"),
    valid_BS=("batch", "cache_seq"),
    index=(),
)


# ----------------------------------------------------------------------------- modules


def _dense_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


class Transformer(nn.Module):
    """Decoder-only LM: embed → L scanned blocks → final norm → logits."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = self.param(
            "embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.embed_dim),
            jnp.dtype(cfg.param_dtype),
        )
        block = Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        self.layers = nn.scan(
            block,
            # LoRA adapters are stacked by layer as the params are; each layer draws its own
            # adapter dropout masks.
            variable_axes={"params": 0, lora_lib.COLLECTION: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            out_axes=0,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg)
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "embed")
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                _dense_init(("embed", "vocab")),
                (cfg.embed_dim, cfg.vocab_size),
                jnp.dtype(cfg.param_dtype),
            )

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array,
        mask_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        segment_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder on a chunk of tokens.

        Args:
          tokens_BT: int token ids.
          positions_BT: RoPE positions (left-padded rows start their real tokens at 0).
          mask_BT: True for real tokens; padding keys are never attended to. None = all real.
          cache: without a cache, attention is causal within the chunk; with one, the chunk is
            written at `cache.index` and attends to every valid earlier slot (prefill and decode
            are the same call).
          return_hidden: return the final-normed hidden states `h_BTD` instead of logits (for
            chunked log-probs with `unembed`).
          segment_BT: without a cache, rows holding one prompt and several responses to it
            (0 = the prompt, 1.. = a response each; model/attention.py).

        Returns:
          (logits_BTV in float32, or h_BTD; the updated cache or None).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if mask_BT is None:
            mask_BT = jnp.ones((B, T), bool)
        x_BTD = jnp.take(self.embed, tokens_BT, axis=0).astype(cfg.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "residual_seq", "act_embed"))
        cos_BTH, sin_BTH = rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        if cache is None:
            kv, valid_BS, write_index = None, mask_BT, 0
        elif segment_BT is not None:
            raise ValueError("segment_BT is for a whole sequence at once, not a cached chunk")
        else:
            kv = (cache.k_LBSKH, cache.v_LBSKH)
            # A chunk as long as the cache can only land at slot 0 (dynamic_update_slice
            # clamps): a prefill, i.e. self-attention, which a kernel can take.
            write_index = 0 if cache.valid_BS.shape[1] == T else cache.index
            valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, mask_BT, (0, write_index))

        x_BTD, new_kv = self.layers(x_BTD, kv, cos_BTH, sin_BTH, valid_BS, write_index, segment_BT)
        h_BTD = self.final_norm(x_BTD)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k_LBSKH=new_kv[0],
                v_LBSKH=new_kv[1],
                valid_BS=valid_BS,
                index=jnp.asarray(write_index + T, jnp.int32),
            )
        if return_hidden:
            return h_BTD, new_cache
        return self.unembed(h_BTD), new_cache

    def unembed(self, h_BTD: jax.Array) -> jax.Array:
        """Logits (float32) from final-normed hidden states."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            w_DV = self.embed.astype(cfg.dtype).T
        else:
            w_DV = self.lm_head.astype(cfg.dtype)
        logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD.astype(cfg.dtype), w_DV)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "seq", "vocab"))
        return logits_BTV.astype(jnp.float32)


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, kv, cos_BTH, sin_BTH, valid_BS, write_index, segment_BT=None):
        cfg = self.cfg
        h_BTD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "embed", name="attn_norm")(x_BTD)
        a_BTD, kv = Attention(cfg, name="attn")(
            h_BTD, kv, cos_BTH, sin_BTH, valid_BS, write_index, segment_BT
        )
        x_BTD = x_BTD + a_BTD
        h_BTD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "embed", name="mlp_norm")(x_BTD)
        x_BTD = x_BTD + MLP(cfg, name="mlp")(h_BTD)
        # The residual stream between blocks is what a rematerialised backward pass keeps for
        # every layer; training splits its tokens over 'model' (see sharding.TRAIN_RULES).
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "residual_seq", "act_embed"))
        return x_BTD, kv


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and q/k RMSNorm, and a cache.

    The chunk's queries sit at slot `write_index` and attend every valid slot up to their own;
    the maths (plain, chunked or a kernel) is in attention.py.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, kv, cos_BTH, sin_BTH, valid_BS, write_index, segment_BT=None):
        cfg = self.cfg
        D, Q, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)

        def proj(name, heads, axis):
            w = self.param(name, _dense_init(("embed", axis, "head_dim")), (D, heads, H), pdt)
            y = jnp.einsum("BTD,DNH->BTNH", x_BTD, w.astype(cfg.dtype))
            y = _adapted(self, cfg, name, x_BTD, y)
            if cfg.qkv_bias:
                b_init = nn.with_logical_partitioning(nn.initializers.zeros, (axis, "head_dim"))
                y = y + self.param(name + "_bias", b_init, (heads, H), pdt).astype(cfg.dtype)
            return nn.with_logical_constraint(y, ("batch", "seq", axis, "head_dim"))

        q_BTQH = proj("q", Q, "heads")
        k_BTKH = proj("k", K, "kv_heads")
        v_BTKH = proj("v", K, "kv_heads")
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim, before RoPE
            q_BTQH = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="q_norm")(
                q_BTQH
            )
            k_BTKH = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="k_norm")(
                k_BTKH
            )
        q_BTQH = apply_rope(q_BTQH, cos_BTH, sin_BTH)
        k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)

        if kv is not None:
            k_BSKH, v_BSKH = kv
            start = (0, write_index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(k_BSKH, k_BTKH.astype(k_BSKH.dtype), start)
            v_BSKH = jax.lax.dynamic_update_slice(v_BSKH, v_BTKH.astype(v_BSKH.dtype), start)
            kv = (k_BSKH, v_BSKH)
        else:
            k_BSKH, v_BSKH = k_BTKH, v_BTKH

        out_BTQH = attention_lib.attend(
            q_BTQH, k_BSKH, v_BSKH, valid_BS, write_index,
            impl=cfg.attention, chunk=cfg.attention_chunk, segment_BS=segment_BT,
        )  # fmt: skip
        w_o = self.param("o", _dense_init(("heads", "head_dim", "embed")), (Q, H, D), pdt)
        y_BTD = jnp.einsum("BTQH,QHD->BTD", out_BTQH, w_o.astype(cfg.dtype))
        return _adapted(self, cfg, "o", out_BTQH, y_BTD), kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        D, F = cfg.embed_dim, cfg.mlp_dim
        pdt = jnp.dtype(cfg.param_dtype)
        w_gate = self.param("gate", _dense_init(("embed", "mlp")), (D, F), pdt).astype(cfg.dtype)
        w_up = self.param("up", _dense_init(("embed", "mlp")), (D, F), pdt).astype(cfg.dtype)
        w_down = self.param("down", _dense_init(("mlp", "embed")), (F, D), pdt).astype(cfg.dtype)
        g_BTF = _adapted(self, cfg, "gate", x_BTD, jnp.einsum("BTD,DF->BTF", x_BTD, w_gate))
        u_BTF = _adapted(self, cfg, "up", x_BTD, jnp.einsum("BTD,DF->BTF", x_BTD, w_up))
        h_BTF = nn.with_logical_constraint(jax.nn.silu(g_BTF) * u_BTF, ("batch", "seq", "mlp"))
        return _adapted(self, cfg, "down", h_BTF, jnp.einsum("BTF,FD->BTD", h_BTF, w_down))


def _adapted(module: nn.Module, cfg: ModelConfig, target: str, x, y):
    """A projection's output `y` of input `x`, plus its LoRA adapter's when it has one."""
    adapter = lora_lib.delta(module, cfg, target, x)
    return y if adapter is None else y + adapter


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the HF reference does."""

    eps: float
    dtype: str
    param_dtype: str
    axis_name: str

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            jnp.dtype(self.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Per-frequency inverse wavelengths, with Llama-3 scaling when given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions_BT, head_dim, theta, scaling):
    """cos and sin of shape [B, T, H], in float32 (HF's half-split layout)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTH = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTEH, cos_BTH, sin_BTH):
    """Rotates query/key heads by their positions (rotate-half convention)."""
    x1, x2 = jnp.split(x_BTEH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_BTEH.astype(jnp.float32) * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]
    return out.astype(x_BTEH.dtype)


# ----------------------------------------------------------------------------- helpers


def left_pad_positions(mask_BT: jax.Array) -> jax.Array:
    """Positions for left-padded rows: the first real token of each row is position 0."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1, 0)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Unsharded random params (plain arrays); see `sharded_init` for the mesh version."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = Transformer(cfg).init(key, tokens, tokens)
    return nn.meta.unbox(boxed)


def param_logical_axes(cfg: ModelConfig) -> Any:
    """Pytree of logical axis-name tuples, matching the params tree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens))
    return nn.get_partition_spec(boxed)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: sharding.Rules) -> Any:
    """NamedShardings for the params of `cfg` under one rules table."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return sharding.logical_to_shardings(shapes, param_logical_axes(cfg), mesh, rules)


def cache_shardings(cache_shapes: Any, mesh: Mesh, rules: sharding.Rules) -> Any:
    """NamedShardings for a KVCache (or its ShapeDtypeStructs)."""
    return sharding.logical_to_shardings(
        cache_shapes, CACHE_LOGICAL_AXES, mesh, rules, what="kv cache"
    )


def sharded_init(cfg: ModelConfig, mesh: Mesh, rules: sharding.Rules, key: jax.Array) -> Any:
    """Random params created directly in their sharded layout (never whole on one device)."""
    shardings = param_shardings(cfg, mesh, rules)
    init = sharding.with_rules(lambda k: init_params(cfg, k), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(key)


def count_params(params: Any) -> int:
    """Total number of parameters in a pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def forward(cfg: ModelConfig, params, tokens_BT, positions_BT, mask_BT=None, cache=None):
    """Functional entry point: `Transformer(cfg).apply(params, ...)`."""
    return Transformer(cfg).apply(params, tokens_BT, positions_BT, mask_BT, cache)
