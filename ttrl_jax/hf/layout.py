"""The Hugging Face checkpoint format as ttrl_jax reads and writes it: file names, the
param ⇄ tensor-name table, and the tokenizer's fit to the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ttrl_jax.model.config import ModelConfig

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
HUB_PATTERNS = (
    CONFIG,
    GENERATION_CONFIG,
    "model*.safetensors",
    SAFETENSORS_INDEX,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some older exports saved beside the weights; recomputed from the config.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
SAVE_DTYPES = ("float32", "bfloat16", "float16")
EMBED_NAME = "model.embed_tokens.weight"
LM_HEAD_NAME = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one of our params maps to HF tensors (one per layer when `hf_name` has '{i}')."""

    path: tuple[str, ...]  # key path under params['params']
    hf_name: str
    hf_shape: tuple[int, ...]  # torch layout, one layer
    shape: tuple[int, ...]  # our layout, one layer
    transpose: bool  # torch Linear weights are [out, in]; ours are [in, ...out]

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.layered:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(num_layers)]

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(self.shape)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(y.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(y.reshape(self.hf_shape))


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The param ⇄ HF tensor table for `cfg`, in the order tensors are saved."""
    D, Q, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    F, V = cfg.mlp_dim, cfg.vocab_size
    layer, attn = "model.layers.{i}.", "model.layers.{i}.self_attn."
    Spec = TensorSpec
    specs = [Spec(("embed",), EMBED_NAME, (V, D), (V, D), False)]
    for n, heads in (("q", Q), ("k", K), ("v", K)):
        path = ("layers", "attn", n)
        specs.append(Spec(path, f"{attn}{n}_proj.weight", (heads * H, D), (D, heads, H), True))
        if cfg.qkv_bias:
            bias_path = ("layers", "attn", f"{n}_bias")
            specs.append(Spec(bias_path, f"{attn}{n}_proj.bias", (heads * H,), (heads, H), False))
    specs.append(Spec(("layers", "attn", "o"), f"{attn}o_proj.weight", (D, Q * H), (Q, H, D), True))
    if cfg.qk_norm:
        for n in ("q_norm", "k_norm"):
            specs.append(
                Spec(("layers", "attn", n, "scale"), f"{attn}{n}.weight", (H,), (H,), False)
            )
    specs += [
        Spec(("layers", "attn_norm", "scale"), f"{layer}input_layernorm.weight", (D,), (D,), False),
        Spec(
            ("layers", "mlp_norm", "scale"),
            f"{layer}post_attention_layernorm.weight",
            (D,),
            (D,),
            False,
        ),
        Spec(("layers", "mlp", "gate"), f"{layer}mlp.gate_proj.weight", (F, D), (D, F), True),
        Spec(("layers", "mlp", "up"), f"{layer}mlp.up_proj.weight", (F, D), (D, F), True),
        Spec(("layers", "mlp", "down"), f"{layer}mlp.down_proj.weight", (D, F), (F, D), True),
        Spec(("final_norm", "scale"), "model.norm.weight", (D,), (D,), False),
    ]
    if not cfg.tie_embeddings:
        specs.append(Spec(("lm_head",), LM_HEAD_NAME, (V, D), (D, V), True))
    return specs


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_tokenizer(tokenizer: Any, cfg: ModelConfig) -> None:
    """Raises if the tokenizer can emit ids outside the model's embedding table."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}: ids "
            f">= {cfg.vocab_size} would index past the embedding table. Use the tokenizer that "
            "was shipped with this model (a larger model vocab, as Qwen pads it, is fine)"
        )
