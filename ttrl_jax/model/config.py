"""The architecture of a decoder: ModelConfig, its HF `config.json` mapping, published presets.

Llama 3.x, Qwen2/Qwen2.5 and Qwen3 differ by flags, never by subclasses. Also here: how the model
computes (attention maths, what the backward pass recomputes, LoRA adapters' settings), which are
static choices too.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import typing
from typing import Any, Literal

import jax

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
Attention = Literal["auto", "plain", "chunked", "pallas"]  # see attention.py
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(Attention)
ATTENTION_CHECKPOINT_NAME = "attention"  # names attention outputs for the remat policies
ATTENTION_MASK_VALUE = -1e30  # finite, so a fully masked row gives a uniform softmax, not NaN
_policies = jax.checkpoint_policies
_save_attention = _policies.save_only_these_names(ATTENTION_CHECKPOINT_NAME)
# What each block keeps for the backward pass (ModelConfig.remat); the rest is recomputed.
REMAT_POLICIES = {
    "block": _policies.nothing_saveable,  # only the block's input
    # Attention outputs; from the chunked and Pallas versions also their softmax statistics,
    # so their backward pass starts without rerunning the attention forward.
    "attention": _save_attention,
    "dots_no_batch": _policies.dots_with_no_batch_dims_saveable,  # projection outputs
    "dots_no_batch+attention": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _save_attention
    ),
    "dots": _policies.dots_saveable,  # every matmul output (plain attention's T×S scores too)
}
# The spellings of ModelConfig.remat besides true/false ("none" = false).
Remat = Literal["none", "block", "attention", "dots_no_batch", "dots_no_batch+attention", "dots"]
assert typing.get_args(Remat) == ("none", *REMAT_POLICIES)


# The projections a LoRA adapter can sit on, in the order of a block (lora.py).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the projections `targets`: `W x` becomes `W x + (alpha / rank) B A x`.

    The adapters themselves are lora.py's. This sits here, not there, because ModelConfig holds it
    (a static jit argument, so hashable) and lora.py reads ModelConfig's widths.
    """

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input, training only (PEFT's lora_dropout)
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"lora rank={self.rank} must be at least 1")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"lora targets={list(targets)} must be distinct names from "
                f"{', '.join(LORA_TARGETS)} (at least one)"
            )
        # One spelling per set of targets: [v, q] and [q, v] are the same model.
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in targets))

    @property
    def scale(self) -> float:
        """What B A x is multiplied by (PEFT's `scaling`)."""
        return self.alpha / self.rank


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
    # Block activations recomputed in the backward pass: False / "none" (keep all), True /
    # "block" (keep only each block's input), or a policy in REMAT_POLICIES.
    remat: bool | Remat = False
    attention: Attention = "auto"  # attention maths
    attention_chunk: int = 512  # block length of chunked attention
    # LoRA adapters the decoder applies when its variables hold them (lora.py); None = none.
    lora: LoraConfig | None = None

    def __post_init__(self):
        # One spelling each: False = no remat, else a REMAT_POLICIES name.
        remat = {True: "block", "none": False}.get(self.remat, self.remat)
        if remat is not False and remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat {self.remat!r}; choose false, true, 'none' or one of "
                f"{tuple(REMAT_POLICIES)}"
            )
        object.__setattr__(self, "remat", remat)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk={self.attention_chunk} must be at least 1")
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


# Published config.json values of the full-size models (only the fields the loader reads), by
# hub id: data, kept beside this module.
PRESETS_HF: dict[str, dict[str, Any]] = json.loads(
    importlib.resources.files(__package__).joinpath("presets_hf.json").read_text()
)


def preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of a published full-size model, by hub id."""
    if name not in PRESETS_HF:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS_HF)}")
    return ModelConfig.from_hf(PRESETS_HF[name], **overrides)
