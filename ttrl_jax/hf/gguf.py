"""GGUF checkpoints (llama.cpp's single-file format) → Hugging Face model folders.

A GGUF file holds quantised tensors in llama.cpp's layout, the architecture as metadata, and the
tokenizer (vocabulary, merges, special tokens, chat template) as metadata too. `convert` turns one
into an ordinary HF folder through `hf_export.save_hf`: every tensor dequantised to float32 by the
`gguf` library, llama.cpp's q/k row permutation undone, config.json and generation_config.json from
the metadata, and a byte-level BPE tokenizer (tokenizer.json, chat template inside) rebuilt from
it. A `.gguf` path given as `model.name_or_path` is converted once into a cache folder keyed by
the file's content (`cached_folder`); from then on the whole pipeline reads a normal folder, which
transformers loads as well.

The command `python -m ttrl_jax.gguf FILE.gguf OUT_DIR` (ttrl_jax/gguf.py) runs `convert`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from flax import traverse_util
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from ttrl_jax.hf import export as hf_export
from ttrl_jax.hf import layout as hf_layout
from ttrl_jax.model import config as model_config
from ttrl_jax.model.config import ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = model_config.SUPPORTED_MODEL_TYPES  # llama.cpp names these as HF's model_type
CACHE_ENV = "TTRL_JAX_CACHE"  # root of ttrl_jax's caches; default ~/.cache/ttrl_jax
# Part of the cache key: bump it when the converted folder changes, so stale caches are not used.
CONVERSION_VERSION = 1
# The text splits of Llama 3's and Qwen2's own tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# llama.cpp's name for how text is split before BPE ('tokenizer.ggml.pre') → the pre-tokenizer of
# the model's original tokenizer.json.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(  # every digit alone, then GPT-2's split
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}
NFC_PRE_TOKENIZERS = ("qwen2",)  # Qwen2's tokenizer.json normalises to NFC first


# ----------------------------------------------------------------------------- reading


class GGUFFile:
    """An opened GGUF file: metadata values and tensors by name (memory-mapped, read lazily)."""

    def __init__(self, path: str | os.PathLike):
        self.path = _check_path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # bad magic, truncated file, unknown version: all mean "not GGUF"
            raise ValueError(
                f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err}); pass a "
                "complete .gguf file as written by llama.cpp"
            ) from err
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.require("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path} lacks the metadata key {key!r}; the file is incomplete")
        return value

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in torch layout ([out, in] for a linear weight)."""
        t = self.tensors[name]
        try:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise ValueError(
                f"tensor {name!r} in {self.path.name} is stored as {t.tensor_type.name}, which the "
                f"gguf library ({version('gguf')}) cannot dequantise; upgrade it "
                "(`pip install -U gguf`) or use a file quantised as Q8_0, Q4_K_M, Q4_0 or F16"
            ) from None


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"GGUF file {path} {what}; pass the path of a .gguf file (e.g. "
            "SmolLM2-135M-Instruct.Q4_1.gguf)"
        )
    return path.absolute()


# ----------------------------------------------------------------------------- config


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """The config.json dict of the model in `f`, from llama.cpp's metadata keys."""
    arch = f.arch
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{f.path.name} holds a {arch!r} model; ttrl_jax supports the GGUF architectures "
            f"{SUPPORTED_ARCHS} (e.g. SmolLM2, Qwen2.5, Qwen3)"
        )
    if f.get(f"{arch}.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in f.tensors:
        raise ValueError(
            f"{f.path.name} uses rope scaling (Llama 3.1+ files store it as rope_freqs), which "
            "GGUF import does not read; load the original HF checkpoint (safetensors) instead"
        )
    heads = int(f.require(f"{arch}.attention.head_count"))
    width = int(f.require(f"{arch}.embedding_length"))
    head_dim = int(f.get(f"{arch}.attention.key_length", width // heads))
    if int(f.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{f.path.name} rotates part of each head (partial RoPE): not supported")
    tokens = f.require("tokenizer.ggml.tokens")
    hf = {
        "model_type": arch,
        "vocab_size": int(f.get(f"{arch}.vocab_size", len(tokens))),
        "num_hidden_layers": int(f.require(f"{arch}.block_count")),
        "hidden_size": width,
        "intermediate_size": int(f.require(f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": _published(f.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(f.require(f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
    }
    for key in ("bos", "eos"):
        token_id = f.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            hf[f"{key}_token_id"] = int(token_id)
    return hf


def _published(x: float) -> float:
    """A float32 metadata value as the config had it: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(x)))


def model_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata alone (no tensor is read)."""
    return ModelConfig.from_hf(hf_config(GGUFFile(path)), **overrides)


# ----------------------------------------------------------------------------- weights


class _LazyParam:
    """A param dequantised only when `np.asarray` reads it, so save_hf holds one at a time."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._read = shape, np.dtype(np.float32), read

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self._read()
        return x if dtype is None else x.astype(dtype)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order (rotary pairs adjacent) to HF's (pairs a half apart)."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def lazy_params(f: GGUFFile, cfg: ModelConfig) -> dict:
    """{'params': ...} in ttrl_jax's layout, each leaf read from `f` when first converted."""
    arch_id = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[f.arch]
    names = gguf.get_tensor_name_map(arch_id, cfg.num_layers)
    # llama.cpp reorders llama's q/k rows for its interleaved RoPE; Qwen files keep HF's order.
    permuted = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads} if f.arch == "llama" else {}
    used: set[str] = set()

    def read_one(hf_name: str, hf_shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in f.tensors:
            raise ValueError(
                f"{f.path.name} lacks the tensor {name!r} ({hf_name}) that its metadata implies; "
                "the file is incomplete or not a plain decoder"
            )
        found = tuple(int(d) for d in reversed(f.tensors[name].shape))
        if found != hf_shape:
            raise ValueError(
                f"tensor {name!r} in {f.path.name} has shape {found}, the metadata implies "
                f"{hf_shape}; the file's metadata does not match its tensors"
            )
        used.add(name)
        heads = next((n for proj, n in permuted.items() if f".{proj}." in hf_name), None)

        def read() -> np.ndarray:
            w = f.dequantize(name).reshape(hf_shape)
            return _unpermute(w, heads) if heads else w

        return read

    flat: dict[tuple[str, ...], _LazyParam] = {}
    for spec in hf_layout.tensor_specs(cfg):
        readers = [read_one(n, spec.hf_shape) for n in spec.hf_names(cfg.num_layers)]
        if spec.layered:
            shape = (cfg.num_layers, *spec.shape)
            read = lambda spec=spec, rs=readers: np.stack([spec.to_ours(r()) for r in rs])
        else:
            shape, read = spec.shape, lambda spec=spec, r=readers[0]: spec.to_ours(r())
        flat[spec.path] = _LazyParam(shape, read)
    unused = sorted(set(f.tensors) - used)
    if unused:
        raise ValueError(
            f"{f.path.name} holds {len(unused)} tensor(s) the {f.arch} decoder does not use: "
            f"{unused[:5]}; this architecture variant is not supported"
        )
    return {"params": traverse_util.unflatten_dict(flat)}


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(f: GGUFFile):
    """The file's byte-level BPE tokenizer as a transformers tokenizer, chat template included."""
    from transformers import PreTrainedTokenizerFast

    kind, split = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise ValueError(
            f"{f.path.name} has a {kind!r} tokenizer; GGUF import reads byte-level BPE ('gpt2') "
            "vocabularies only (Llama 3, Qwen, SmolLM): convert the original HF checkpoint instead"
        )
    if split not in PRE_TOKENIZERS:
        raise ValueError(
            f"{f.path.name} splits text as {split!r} (tokenizer.ggml.pre), which GGUF import "
            f"does not know; known: {sorted(PRE_TOKENIZERS)}. Convert the original HF "
            "checkpoint instead"
        )
    tokens = f.require("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in f.require("tokenizer.ggml.merges")]
    types = f.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[split]()
    if split in NFC_PRE_TOKENIZERS:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|> ...) are special, never split nor decoded by skip_special_tokens;
    # user-defined ones (<think> ...) are kept whole but are ordinary text.
    typed = lambda kind, special: [
        AddedToken(t, special=special, normalized=False) for t, k in zip(tokens, types) if k == kind
    ]
    backend.add_special_tokens(typed(gguf.TokenType.CONTROL, True))
    backend.add_tokens(typed(gguf.TokenType.USER_DEFINED, False))
    ids = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = f.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            ids[role] = int(token_id)
    # llama.cpp's add_bos/add_eos flags, as tokenizer.json's post-processor says them.
    ends = [r for r in ("bos", "eos") if r in ids and f.get(f"tokenizer.ggml.add_{r}_token")]
    if ends:
        single = " ".join(
            [f"{tokens[ids['bos']]}:0"] * ("bos" in ends)
            + ["$A:0"]
            + [f"{tokens[ids['eos']]}:0"] * ("eos" in ends)
        )
        backend.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(tokens[ids[r]], ids[r]) for r in ends]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=f.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,  # would turn "3 ." into "3." on decode
        model_max_length=int(f.get(f"{f.arch}.context_length", 2**30)),
        **{f"{role}_token": tokens[i] for role, i in ids.items()},
    )


# ----------------------------------------------------------------------------- conversion


def convert(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Writes the GGUF file at `path` as an HF model folder (transformers loads it too).

    Args:
      path: a .gguf file of a llama, qwen2 or qwen3 model with a byte-level BPE vocabulary.
      out_dir: destination folder (config.json, generation_config.json, model.safetensors,
        tokenizer.json and tokenizer_config.json with the chat template).
      dtype: dtype of the saved tensors; float32 holds every dequantised value exactly.
      overwrite: replace an existing non-empty `out_dir`.

    Returns:
      The path of the written folder.
    """
    f = GGUFFile(path)
    hf = hf_config(f)
    try:
        cfg = ModelConfig.from_hf(hf)
    except ValueError as err:
        raise ValueError(f"{f.path.name}: {err}") from err
    tokenizer = build_tokenizer(f)
    params = lazy_params(f, cfg)  # checks every tensor's name and shape before writing anything
    return hf_export.save_hf(params, cfg, out_dir, tokenizer, dtype=dtype, overwrite=overwrite)


def cache_root() -> Path:
    """Where ttrl_jax caches downloads and conversions: $TTRL_JAX_CACHE or ~/.cache/ttrl_jax."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/ttrl_jax").expanduser()


@functools.lru_cache(maxsize=16)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(f"ttrl_jax gguf conversion {CONVERSION_VERSION}\n".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def cached_folder(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF folder converted from a GGUF file, converting it on first use.

    The folder is `<cache_dir>/<file stem>-<content hash>` (default cache_dir: cache_root()/gguf),
    built under a temporary name and renamed into place, so concurrent runs never see a partial
    conversion and an edited file gets a new folder.
    """
    import jax

    path = _check_path(path)
    stat = path.stat()
    digest = _digest(path, stat.st_size, stat.st_mtime_ns)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "gguf"
    folder = root / f"{path.stem}-{digest[:16]}"
    if (folder / "config.json").is_file():
        return folder
    if jax.process_count() > 1:  # save_hf writes on process 0 only: other hosts would miss it
        raise ValueError(
            f"GGUF files are converted on one host: run `python -m ttrl_jax.gguf {path} OUT_DIR` "
            "once, with OUT_DIR on storage every host reads, and pass OUT_DIR as the model"
        )
    log.info("converting %s into %s (once)", path, folder)
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        convert(path, partial)
        try:
            os.rename(partial, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # else another process finished first
                raise OSError(
                    f"{folder} exists but holds no complete conversion; delete it and retry"
                ) from None
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return folder
