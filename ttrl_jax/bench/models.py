"""The model a benchmark runs: a preset's shapes with random weights, or a checkpoint's own.

`--model` takes a preset (a hub id from `model.config.PRESETS_HF`, or its name after the slash
in any case: `smollm2-135m`), or a local HF folder or .gguf file, whose weights are loaded.
Random weights time the same work as trained ones; both sides always get the same weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import jax

from ttrl_jax.hf import export as hf_export
from ttrl_jax.hf import load as weights
from ttrl_jax.model import config as model_config
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M"


def preset_name(name: str) -> str | None:
    """The preset `name` stands for (a hub id, or its part after the slash in any case)."""
    if name in model_config.PRESETS_HF:
        return name
    matches = [p for p in model_config.PRESETS_HF if p.split("/")[-1].lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def parse_size(spec: str, form: str) -> tuple[int, int, int, int]:
    """'8x16x128x256' -> (8, 16, 128, 256); anything else is an error that shows `form`."""
    try:
        a, b, c, d = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {spec!r} is not of the form {form}") from None
    return a, b, c, d


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, run, sizes: tuple[list[str], str] = ()
) -> argparse.ArgumentParser:
    """A sub-command running `run(args)`, described by its docstring, with the model arguments
    and, given (defaults, help), a --sizes list."""
    p = sub.add_parser(name, help=help, description=run.__doc__)
    add_model_args(p)
    if sizes:
        p.add_argument("--sizes", nargs="+", default=sizes[0], help=sizes[1])
    p.set_defaults(run=run)
    return p


def add_model_args(p: argparse.ArgumentParser, *, default_layers: int = 0) -> None:
    """--model, --layers and --vocab, as every sub-command takes them."""
    known = ", ".join(sorted(model_config.PRESETS_HF))
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a preset ({known}; or the name after the slash) with random weights, or a "
        "local HF folder or .gguf file (its weights)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=default_layers,
        help="decoder layers of a preset; 0 = the model's own",
    )
    p.add_argument("--vocab", type=int, default=0, help="vocabulary of a preset; 0 = its own")


def load(args: argparse.Namespace, dtype: str, seed: int = 0) -> tuple[ModelConfig, Any]:
    """(config, params) of `args.model` in `dtype` (compute and storage).

    Raises:
      ValueError: neither a preset nor an existing path, or --layers/--vocab on a checkpoint.
    """
    dtypes = dict(dtype=dtype, param_dtype=dtype)
    name = preset_name(args.model)
    if name is not None:
        overrides = dict(dtypes)
        if args.layers:
            overrides["num_layers"] = args.layers
        if args.vocab:
            overrides["vocab_size"] = args.vocab
        cfg = model_config.preset(name, **overrides)
        init = jax.jit(model_lib.init_params, static_argnums=0)
        return cfg, init(cfg, jax.random.key(seed))
    if not Path(args.model).expanduser().exists():
        raise ValueError(
            f"--model {args.model!r} is neither a preset "
            f"({', '.join(sorted(model_config.PRESETS_HF))}) nor an existing HF folder or "
            ".gguf file"
        )
    if args.layers or args.vocab:
        raise ValueError(
            "--layers and --vocab change a preset's shapes; a checkpoint keeps its own"
        )
    cfg, params = weights.load_hf(args.model, **dtypes)
    return cfg, params


def describe(cfg: ModelConfig) -> str:
    """One line of the shapes that set the work."""
    tied = "tied" if cfg.tie_embeddings else "untied"
    return (
        f"{cfg.model_type} L={cfg.num_layers} D={cfg.embed_dim} Q={cfg.num_heads} "
        f"K={cfg.num_kv_heads} H={cfg.head_dim} F={cfg.mlp_dim} V={cfg.vocab_size} {tied}"
    )


def torch_model(params: Any, cfg: ModelConfig, dtype: str, **kwargs):
    """transformers' model holding our weights, through our own HF export."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = hf_export.save_hf(params, cfg, os.path.join(tmp, "model"), dtype=dtype)
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), **kwargs
        )


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights one decoder layer multiplies each position by (q/k/v/o and the MLP)."""
    D, Q, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    return D * (Q + 2 * K) * H + Q * H * D + 3 * D * F


def label_unembedding(model) -> None:
    """Runs `model.lm_head` under `record_function("unembed")`, so profiles name its time."""
    import torch

    inner = model.lm_head.forward

    def forward(*args, **kwargs):
        with torch.profiler.record_function("unembed"):
            return inner(*args, **kwargs)

    model.lm_head.forward = forward
