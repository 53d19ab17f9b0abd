"""Params → an HF model folder that transformers and vLLM load: sharded safetensors, config.json,
generation_config.json and the tokenizer, written beside the destination and renamed into place.
LoRA adapters → a PEFT adapter folder that PEFT loads onto the HF base model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ttrl_jax.hf.layout import (
    CONFIG,
    GENERATION_CONFIG,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    SAVE_DTYPES,
    TensorSpec,
    check_tokenizer,
    get_path,
    tensor_specs,
)
from ttrl_jax.model import lora as lora_lib
from ttrl_jax.model.config import ModelConfig

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's path to the wrapped model


def save_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 4 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Writes an HF model folder that transformers (and vLLM) load as the same model.

    Every process must call this (gathering sharded params is collective); process 0 writes.
    The folder is built beside `out_dir` and renamed into place, so readers never see a partial
    export.

    Args:
      params: {'params': {...}} as made by `model.init_params` or `load_hf` (leaves: jax
        arrays, or host arrays that np.asarray reads, gathered one at a time).
      cfg: the model config.
      out_dir: destination folder.
      tokenizer: a transformers tokenizer to save alongside (checked against the vocab size).
      dtype: dtype of the saved tensors: 'float32', 'bfloat16' or 'float16'.
      max_shard_bytes: above this total size, write model-0000k-of-0000n.safetensors files and
        model.safetensors.index.json.
      overwrite: replace an existing non-empty `out_dir`.

    Returns:
      The path of the written folder.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype {dtype!r} is not one of {SAVE_DTYPES}")
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace")
    specs = tensor_specs(cfg)
    leaves = [_leaf(params, spec, cfg) for spec in specs]
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    shard_of, n_shards, total = _plan_shards(specs, cfg, np_dtype.itemsize, max_shard_bytes)
    is_writer = jax.process_index() == 0
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_writer:
        tmp.mkdir(parents=True)
    try:
        weight_map = _write_shards(specs, leaves, cfg, np_dtype, shard_of, n_shards, tmp, is_writer)
        if is_writer:
            _write_metadata(tmp, cfg, dtype, tokenizer, weight_map, total, n_shards)
            _swap_into_place(tmp, out_dir)
    finally:
        if is_writer and tmp.exists():
            shutil.rmtree(tmp)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_hf {out_dir}")
    return out_dir


def save_peft(
    adapters: dict,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    base_model: str = "",
    overwrite: bool = False,
) -> Path:
    """Writes LoRA adapters as a PEFT folder that `peft.PeftModel.from_pretrained(base, out_dir)`
    loads onto the HF base model, giving the same model as `lora.merge`.

    Every process must call this (collective, as `save_hf`); process 0 writes, beside `out_dir`
    first.

    Args:
      adapters: {'lora': {...}} as made by `lora.init_adapters` (cfg.lora's targets).
      cfg: the model config, with its `lora` settings.
      out_dir: destination folder: adapter_config.json and adapter_model.safetensors (float32;
        PEFT's names, lora_A [rank, in] and lora_B [out, rank] per projection and layer).
      base_model: recorded as base_model_name_or_path.
      overwrite: replace an existing non-empty `out_dir`.

    Returns:
      The path of the written folder.
    """
    lora = lora_lib.require(cfg)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace")
    specs = {spec.path: spec for spec in tensor_specs(cfg)}
    found = adapters[lora_lib.COLLECTION]["layers"]
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for name, t in lora_lib.targets(cfg).items():
        spec = specs[("layers", t.module, name)]  # the base weight the adapter sits on
        a_name, b_name = lora_lib.names(name)
        a = _gather(found[t.module][a_name]).astype(np.float32)  # [L, in..., J]
        b = _gather(found[t.module][b_name]).astype(np.float32)  # [L, J, out...]
        for i, weight in enumerate(spec.hf_names(cfg.num_layers)):
            module = PEFT_PREFIX + weight.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)
        modules.append(spec.hf_name.split(".")[-2])  # q_proj, gate_proj, ...
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # the scale is alpha / rank, as ours
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    is_writer = jax.process_index() == 0
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_writer:
        tmp.mkdir(parents=True)
        try:
            save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
            _write_json(tmp / PEFT_CONFIG, config)
            _swap_into_place(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_peft {out_dir}")
    return out_dir


def _leaf(params: dict, spec: TensorSpec, cfg: ModelConfig) -> Any:
    try:
        leaf = get_path(params["params"], spec.path)
    except KeyError:
        raise ValueError(
            f"params lack {'/'.join(spec.path)}, which the config needs; are params and cfg "
            "from the same model (e.g. tie_embeddings, qkv_bias, qk_norm)?"
        ) from None
    want = ((cfg.num_layers,) if spec.layered else ()) + spec.shape
    if tuple(leaf.shape) != want:
        raise ValueError(
            f"param {'/'.join(spec.path)} has shape {tuple(leaf.shape)}, the config implies {want}"
        )
    return leaf


def _plan_shards(
    specs: list[TensorSpec], cfg: ModelConfig, itemsize: int, max_shard_bytes: int
) -> tuple[dict[str, int], int, int]:
    """Greedy packing of tensors (in save order) into shards of at most `max_shard_bytes`."""
    shard_of: dict[str, int] = {}
    shard, used, total = 0, 0, 0
    for spec in specs:
        nbytes = int(np.prod(spec.hf_shape)) * itemsize
        for name in spec.hf_names(cfg.num_layers):
            if used and used + nbytes > max_shard_bytes:
                shard, used = shard + 1, 0
            shard_of[name] = shard
            used += nbytes
            total += nbytes
    return shard_of, shard + 1, total


def _shard_file(shard: int, n_shards: int) -> str:
    return SAFETENSORS if n_shards == 1 else f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"


def _write_shards(specs, leaves, cfg, np_dtype, shard_of, n_shards, tmp, is_writer):
    """Gathers one param at a time and writes each shard once its tensors are complete."""
    weight_map: dict[str, str] = {}
    pending: dict[str, np.ndarray] = {}
    current = 0

    def flush():
        if is_writer and pending:
            save_file(pending, tmp / _shard_file(current, n_shards), metadata={"format": "pt"})
        pending.clear()

    for spec, leaf in zip(specs, leaves):
        host = _gather(leaf).astype(np_dtype)
        stacked = host if spec.layered else host[None]
        for name, layer in zip(spec.hf_names(cfg.num_layers), stacked):
            if shard_of[name] != current:
                flush()
                current = shard_of[name]
            pending[name] = spec.to_hf(layer)
            weight_map[name] = _shard_file(current, n_shards)
        del host, stacked
    flush()
    return weight_map


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _write_metadata(tmp, cfg, dtype, tokenizer, weight_map, total, n_shards):
    hf = cfg.to_hf()
    # transformers 5 reads 'dtype'; older transformers and vLLM read 'torch_dtype'.
    hf["torch_dtype"] = hf["dtype"] = dtype
    _write_json(tmp / CONFIG, hf)
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(tmp / SAFETENSORS_INDEX, index)
    generation = {
        k: v
        for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", hf.get("eos_token_id")))
        if v is not None
    }
    if generation:
        _write_json(tmp / GENERATION_CONFIG, generation)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)
