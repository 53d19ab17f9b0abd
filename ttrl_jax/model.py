"""One decoder for the Llama 3.x, Qwen2/Qwen2.5 and Qwen3 families, with a KV cache.

Read top-down: ModelConfig → Transformer → Block → Attention → MLP → norms and RoPE.
Families differ by flags, never by subclasses. Layers are scanned (params stacked on a leading
'layers' axis) so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_NEG_INF = -1e30  # finite, so fully masked (padding) query rows give a uniform softmax, not NaN


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (HF rope_type 'llama3')."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder; hashable, so it can be a static jit argument."""

    model_type: str
    vocab_size: int  # V
    num_layers: int  # L
    embed_dim: int  # D
    num_heads: int  # Q
    num_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # recompute block activations in the backward pass (training memory)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """Builds a config from an HF `config.json` dict (llama, qwen2 or qwen3)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; ttrl_jax supports "
                f"{SUPPORTED_MODEL_TYPES} (Llama 3.x, Qwen2/Qwen2.5, Qwen3)"
            )
        if hf.get("use_sliding_window", False):
            raise ValueError("config.json sets use_sliding_window=true, which is not supported")
        if hf.get("mlp_bias", False):
            raise ValueError("config.json sets mlp_bias=true, which is not supported")
        # Newer transformers write rope settings under 'rope_parameters'.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(
                        scaling["original_max_position_embeddings"]
                    ),
                )
            elif kind != "default":
                raise ValueError(f"unsupported rope scaling {kind!r}; supported: 'llama3' or none")
        eos = hf.get("eos_token_id")
        num_heads = int(hf["num_attention_heads"])
        kw = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            embed_dim=int(hf["hidden_size"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
            mlp_dim=int(hf["intermediate_size"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 only with attention_bias.
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict that transformers loads into the same architecture."""
        arch = {
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }
        hf: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.embed_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.mlp_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.model_type == "qwen2":
            hf["use_sliding_window"] = False
        else:
            hf["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = False
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            hf["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return hf

    @classmethod
    def tiny(cls, model_type: str = "qwen2", **overrides) -> ModelConfig:
        """A few-thousand-parameter model for tests (GQA: 4 query heads over 2 kv heads)."""
        kw = dict(
            model_type=model_type,
            vocab_size=128,
            num_layers=2,
            embed_dim=32,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            mlp_dim=64,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            max_position_embeddings=256,
        )
        kw.update(overrides)
        return cls(**kw)


# Published config.json values of the full-size models (only the fields the loader reads).
PRESETS_HF: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M": dict(
        model_type="llama", vocab_size=49152, num_hidden_layers=30, hidden_size=576,
        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=0,
    ),
    "Qwen/Qwen2.5-0.5B": dict(
        model_type="qwen2", vocab_size=151936, num_hidden_layers=24, hidden_size=896,
        num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643,
    ),
    "Qwen/Qwen2.5-Math-1.5B": dict(
        model_type="qwen2", vocab_size=151936, num_hidden_layers=28, hidden_size=1536,
        num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=151643, eos_token_id=151643,
    ),
    "Qwen/Qwen2.5-Math-7B": dict(
        model_type="qwen2", vocab_size=152064, num_hidden_layers=28, hidden_size=3584,
        num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=4096, bos_token_id=151643, eos_token_id=151643,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", vocab_size=128256, num_hidden_layers=32, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "Qwen/Qwen3-8B": dict(
        model_type="qwen3", vocab_size=151936, num_hidden_layers=36, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=12288,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=40960, attention_bias=False, bos_token_id=151643,
        eos_token_id=151645,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a published full-size model, by hub id."""
    if name not in PRESETS_HF:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS_HF)}")
    return ModelConfig.from_hf(PRESETS_HF[name], **overrides)


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
        block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
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

        Returns:
          (logits_BTV in float32, or h_BTD; the updated cache or None).
        """
        cfg = self.cfg
        B, T = tokens_BT.shape
        if mask_BT is None:
            mask_BT = jnp.ones((B, T), bool)
        x_BTD = jnp.take(self.embed, tokens_BT, axis=0).astype(cfg.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
        cos_BTH, sin_BTH = rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        if cache is None:
            causal_TS = jnp.tril(jnp.ones((T, T), bool))
            mask_BTS = causal_TS[None] & mask_BT[:, None, :]
            kv, write_index = None, None
        else:
            write_index = cache.index
            valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, mask_BT, (0, write_index))
            slot_S = jnp.arange(valid_BS.shape[1])
            causal_TS = slot_S[None, :] <= (write_index + jnp.arange(T))[:, None]
            mask_BTS = causal_TS[None] & valid_BS[:, None, :]
            kv = (cache.k_LBSKH, cache.v_LBSKH)

        x_BTD, new_kv = self.layers(x_BTD, kv, cos_BTH, sin_BTH, mask_BTS, write_index)
        h_BTD = self.final_norm(x_BTD)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k_LBSKH=new_kv[0], v_LBSKH=new_kv[1], valid_BS=valid_BS, index=write_index + T
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
    def __call__(self, x_BTD, kv, cos_BTH, sin_BTH, mask_BTS, write_index):
        cfg = self.cfg
        h_BTD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "embed", name="attn_norm")(x_BTD)
        a_BTD, kv = Attention(cfg, name="attn")(h_BTD, kv, cos_BTH, sin_BTH, mask_BTS, write_index)
        x_BTD = x_BTD + a_BTD
        h_BTD = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, "embed", name="mlp_norm")(x_BTD)
        x_BTD = x_BTD + MLP(cfg, name="mlp")(h_BTD)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "act_embed"))
        return x_BTD, kv


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and q/k RMSNorm, and a cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, kv, cos_BTH, sin_BTH, mask_BTS, write_index):
        cfg = self.cfg
        D, Q, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)

        def proj(name, heads, axis):
            w = self.param(name, _dense_init(("embed", axis, "head_dim")), (D, heads, H), pdt)
            y = jnp.einsum("BTD,DNH->BTNH", x_BTD, w.astype(cfg.dtype))
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

        B, T = x_BTD.shape[:2]
        q_BTKGH = q_BTQH.reshape(B, T, K, Q // K, H)
        logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(cfg.dtype)).astype(
            jnp.float32
        ) / math.sqrt(H)
        logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _NEG_INF)
        probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(cfg.dtype)
        out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH.astype(cfg.dtype))
        out_BTQH = out_BTKGH.reshape(B, T, Q, H)
        w_o = self.param("o", _dense_init(("heads", "head_dim", "embed")), (Q, H, D), pdt)
        return jnp.einsum("BTQH,QHD->BTD", out_BTQH, w_o.astype(cfg.dtype)), kv


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
        g_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate)
        u_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, w_up)
        h_BTF = nn.with_logical_constraint(jax.nn.silu(g_BTF) * u_BTF, ("batch", "seq", "mlp"))
        return jnp.einsum("BTF,FD->BTD", h_BTF, w_down)


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


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """Rotates query/key heads by their positions (rotate-half convention)."""
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x_BTNH.astype(jnp.float32) * cos_BTH[:, :, None] + rotated * sin_BTH[:, :, None]
    return out.astype(x_BTNH.dtype)


# ----------------------------------------------------------------------------- helpers


def left_pad_positions(mask_BT: jax.Array) -> jax.Array:
    """Positions for left-padded rows: the first real token of each row is position 0."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1, 0)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Unsharded random params (plain arrays); see sharding.sharded_init for the mesh version."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = Transformer(cfg).init(key, tokens, tokens)
    return nn.meta.unbox(boxed)


def param_logical_axes(cfg: ModelConfig) -> Any:
    """Pytree of logical axis-name tuples, matching the params tree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens))
    return nn.get_partition_spec(boxed)


def count_params(params: Any) -> int:
    """Total number of parameters in a pytree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def forward(cfg: ModelConfig, params, tokens_BT, positions_BT, mask_BT=None, cache=None):
    """Functional entry point: `Transformer(cfg).apply(params, ...)`."""
    return Transformer(cfg).apply(params, tokens_BT, positions_BT, mask_BT, cache)
