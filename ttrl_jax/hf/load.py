"""Hugging Face checkpoints ⇄ ttrl_jax params: config.json and safetensors (single or sharded).

Loading reads one tensor at a time, stacks the L per-layer tensors of a parameter on the host and
places the stack straight onto its target sharding, so host memory peaks at about one stacked
parameter (a 7B model never sits whole on the host). Saving (`save_hf`, from export.py)
gathers one parameter at a time and writes safetensors shards that transformers and vLLM load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.hf import gguf
from ttrl_jax.hf.layout import (
    CONFIG,
    EMBED_NAME,
    HARMLESS_SUFFIXES,
    HUB_PATTERNS,
    LM_HEAD_NAME,
    PICKLE_SUFFIXES,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    TensorSpec,
    get_path,
    set_path,
    tensor_specs,
)
from ttrl_jax.model import decoder
from ttrl_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- locating files


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) if names else "nothing"


def _looks_like_local_path(name: str) -> bool:
    # A hub id is 'name' or 'org/name'; anything else can only be meant as a local path.
    windows_sep = os.sep != "/" and os.sep in name
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or windows_sep


def resolve_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    patterns: Sequence[str] = HUB_PATTERNS,
) -> Path:
    """A local folder as is, a .gguf file converted once (gguf.cached_folder), or a hub id
    downloaded (only the files matching `patterns`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        return gguf.cached_folder(path)
    if path.exists():
        raise NotADirectoryError(
            f"{path} is a file; pass the folder that holds config.json and the *.safetensors files"
        )
    name = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_local_path(name):
        raise FileNotFoundError(
            f"model folder {path} does not exist; pass a folder with config.json and "
            "*.safetensors, or a Hugging Face hub id such as 'Qwen/Qwen2.5-Math-1.5B'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=list(patterns)))
    except Exception as err:  # network, auth, gating, unknown repo: one actionable message for all
        raise OSError(
            f"{name!r} is not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err}). Pass a local folder with config.json and "
            f"*.safetensors; or download it where the hub is reachable (`hf download {name}`) and "
            "set HF_HUB_OFFLINE=1 to use the cache; for gated models (Llama) run `hf auth login` "
            "or set HF_TOKEN."
        ) from err


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The parsed config.json of a model folder."""
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG} (found: {_listing(folder)}); pass the folder of a "
            "Hugging Face model (config.json + *.safetensors)"
        )
    with open(path) as f:
        return json.load(f)


def _config_from_hf(hf: dict[str, Any], folder: Path, **overrides) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except KeyError as err:
        raise ValueError(f"{folder / CONFIG} lacks the field {err.args[0]!r}") from err
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG}: {err}") from err


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index or the single file."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard files that are not in the folder: {missing[:5]}; "
                "the download is incomplete: fetch the missing files"
            )
        return files
    single = folder / SAFETENSORS
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); ttrl_jax loads "
            "safetensors only, because unpickling can run arbitrary code. Convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out_dir) "
            "writes safetensors."
        )
    raise FileNotFoundError(
        f"{folder} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX} (found: {_listing(folder)})"
    )


class _Reader:
    """Lazily opened safetensors files; reads one tensor at a time into host numpy."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack):
        self.files = files
        self._stack = stack
        self._handles: dict[tuple[Path, str], Any] = {}

    def _handle(self, name: str, framework: str = "numpy"):
        key = (self.files[name], framework)
        if key not in self._handles:
            self._handles[key] = self._stack.enter_context(safe_open(key[0], framework=framework))
        return self._handles[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        if self._handle(name).get_slice(name).get_dtype() != "BF16":
            return self._handle(name).get_tensor(name)
        # numpy has no native bfloat16, so safetensors' numpy reader refuses it; its flax reader
        # gives a jax array, which we keep on the host CPU device and view as ml_dtypes bfloat16.
        with jax.default_device(_host_device()):
            return np.asarray(self._handle(name, "flax").get_tensor(name))


def _host_device():
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # the CPU backend is disabled (JAX_PLATFORMS=tpu): default device
        return None


# ----------------------------------------------------------------------------- loading


def load_hf(
    name_or_path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_lib.Rules | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
    **overrides: Any,
) -> tuple[ModelConfig, dict]:
    """Loads an HF Llama 3.x / Qwen2 / Qwen3 checkpoint (safetensors) into ttrl_jax params.

    Args:
      name_or_path: a local folder (config.json + model.safetensors or a sharded index), a
        .gguf file (converted once into a cache folder, see ttrl_jax.gguf), or a hub id such as
        'Qwen/Qwen2.5-Math-1.5B' (downloaded, or taken from the hub cache).
      mesh: place each param directly onto its NamedSharding on this mesh; None = unsharded
        arrays on the default device.
      rules: the rules table for `mesh` (default sharding.TRAIN_RULES).
      param_dtype: storage dtype of the params (default float32, whatever the files hold).
      dtype: compute dtype written into the returned config (default float32).
      revision: hub branch, tag or commit.
      **overrides: other ModelConfig fields, e.g. remat=True.

    Returns:
      (config, params) with params = {'params': {...}} as `model.init_params` makes them.
    """
    t0 = time.perf_counter()
    folder = resolve_folder(name_or_path, revision)
    hf = read_hf_config(folder)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if dtype is not None:
        overrides["dtype"] = dtype
    cfg = _config_from_hf(hf, folder, **overrides)
    files = _weight_files(folder)
    with contextlib.ExitStack() as stack:
        reader = _Reader(files, stack)
        cfg, specs = _tie_as_transformers_does(cfg, reader, folder)
        _check_names(specs, cfg, set(files), folder)
        _check_shapes(specs, cfg, reader)
        shardings = None
        if mesh is not None:
            rules = sharding_lib.TRAIN_RULES if rules is None else rules
            shardings = decoder.param_shardings(cfg, mesh, rules)["params"]
        params: dict[str, Any] = {}
        for spec in specs:
            host = _read_stacked(spec, cfg, reader)
            sharding = get_path(shardings, spec.path) if shardings is not None else None
            set_path(params, spec.path, _place(host, sharding))
            del host
    log.info("loaded %s (%s) in %.1f s", folder, cfg.model_type, time.perf_counter() - t0)
    return cfg, {"params": params}


def _tie_as_transformers_does(
    cfg: ModelConfig, reader: _Reader, folder: Path
) -> tuple[ModelConfig, list[TensorSpec]]:
    """Resolves tie_word_embeddings against the tensors actually present, like transformers.

    A tied checkpoint may still hold lm_head.weight: equal to the embedding, it is ignored; if it
    differs, the weights are not tied (transformers warns and keeps both); if only lm_head.weight
    is present, it serves as the embedding.
    """
    specs = tensor_specs(cfg)
    names = reader.files
    if not cfg.tie_embeddings or LM_HEAD_NAME not in names:
        return cfg, specs
    if EMBED_NAME not in names:
        embed_from_head = lambda s: dataclasses.replace(s, hf_name=LM_HEAD_NAME)
        specs = [embed_from_head(s) if s.path == ("embed",) else s for s in specs]
        return cfg, specs
    if reader.shape(EMBED_NAME) == reader.shape(LM_HEAD_NAME) and np.array_equal(
        reader.read(EMBED_NAME), reader.read(LM_HEAD_NAME)
    ):
        return cfg, specs
    warnings.warn(
        f"{folder / CONFIG} sets tie_word_embeddings=true but the checkpoint holds a different "
        f"{LM_HEAD_NAME}; loading it untied (as transformers does). Set "
        "tie_word_embeddings=false in config.json to silence this.",
        stacklevel=3,
    )
    cfg = cfg.replace(tie_embeddings=False)
    return cfg, tensor_specs(cfg)


def _check_names(
    specs: list[TensorSpec], cfg: ModelConfig, present: set[str], folder: Path
) -> None:
    expected = {n for s in specs for n in s.hf_names(cfg.num_layers)}
    missing = sorted(expected - present)
    if missing:
        raise ValueError(
            f"checkpoint in {folder} lacks {len(missing)} tensor(s) that its config.json needs, "
            f"e.g. {missing[:5]}; check that config.json (model_type, num_hidden_layers, "
            "attention_bias, tie_word_embeddings) belongs to these weights"
        )
    ignorable = {n for n in present if n.endswith(HARMLESS_SUFFIXES)}
    if cfg.tie_embeddings:
        ignorable.add(LM_HEAD_NAME)  # equal to the embedding: checked by _tie_as_transformers_does
    unexpected = sorted(present - expected - ignorable)
    if unexpected:
        raise ValueError(
            f"checkpoint in {folder} holds {len(unexpected)} tensor(s) that the "
            f"{cfg.model_type} architecture in its config.json does not use: {unexpected[:10]}; "
            "check that config.json belongs to these weights (e.g. attention_bias, "
            "num_hidden_layers)"
        )


def _check_shapes(specs: list[TensorSpec], cfg: ModelConfig, reader: _Reader) -> None:
    for spec in specs:
        for name in spec.hf_names(cfg.num_layers):
            found = reader.shape(name)
            if found != spec.hf_shape:
                raise ValueError(
                    f"tensor {name!r} has shape {found} in {reader.files[name].name}, but "
                    f"config.json implies {spec.hf_shape}; check hidden_size, "
                    "num_attention_heads, num_key_value_heads, head_dim, intermediate_size and "
                    "vocab_size"
                )


def _read_stacked(spec: TensorSpec, cfg: ModelConfig, reader: _Reader) -> np.ndarray:
    """One param on the host in its param dtype (L layers stacked on axis 0 when layered)."""
    np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    if not spec.layered:
        return spec.to_ours(reader.read(spec.hf_name)).astype(np_dtype)
    out = np.empty((cfg.num_layers, *spec.shape), np_dtype)
    for i, name in enumerate(spec.hf_names(cfg.num_layers)):
        out[i] = spec.to_ours(reader.read(name))
    return out


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(host)
    # Each device (on every host) copies just its own block out of the host array.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None):
    """The model folder's (or hub id's) tokenizer, via transformers.AutoTokenizer.

    Args:
      name_or_path: a local folder with tokenizer files, a .gguf file, or a hub id.
      revision: hub branch, tag or commit.

    Returns:
      A transformers tokenizer.
    """
    from transformers import AutoTokenizer

    folder = resolve_folder(name_or_path, revision)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files (none of {list(TOKENIZER_FILES)}; found: "
            f"{_listing(folder)}); copy the tokenizer of the base model into it"
        )
    return AutoTokenizer.from_pretrained(folder)
