"""hf/gguf.py and python -m ttrl_jax.gguf, on tiny GGUF files written here the way llama.cpp's
converter writes them (quantised, llama's q/k rows reordered): tensors against the quantisation
codec applied to the original weights and against transformers' GGUF loader, logits, tokenizers
against the original tokenizer and transformers', the conversion cache, the command line and bad
inputs."""

import json
import os

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX,
)

from ttrl_jax import gguf as gguf_command
from ttrl_jax.config import load as config_lib
from ttrl_jax.hf import gguf as gguf_lib
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder as model
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.plan import search as plan

_forward = jax.jit(model.forward, static_argnums=0)
Q = gguf.GGMLQuantizationType
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
USER_DEFINED = "<think>"  # an added token that is not special: kept whole, decoded as text
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is 7 + 8? The answer is 15. Tom has 12 apples and buys 345 more apples.",
    "Hello world, hello there! Don't you think it's 2024 already? Numbers: 1,234.56 and 99.",
    "The quick brown fox jumps over the lazy dog.\n\nNew lines\tand tabs, café naïve.",
]
# The split of Meta Llama 3's tokenizer.json.
LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "What is 12 + 345? The answer is 357.",
    "hello  there,\n\nthe lazy fox's 2024 café",
    "<|im_start|>user\nDon't 99 apples<|im_end|>\n<think>the fox",
]

# name -> (arch, pre-tokenizer, weight quantisation, embedding quantisation, HF config, add_bos)
CASES = {
    "llama_q4_1": (
        "llama", "smollm", Q.Q4_1, Q.Q8_0, dict(num_key_value_heads=2, tie_word_embeddings=True),
        False,
    ),
    "qwen2_f16": ("qwen2", "qwen2", Q.F16, Q.F16, dict(tie_word_embeddings=False), False),
    # head_dim 32 != 64 / 4: only `attention.key_length` says so (transformers ignores it).
    "qwen3_bf16": (
        "qwen3", "llama-bpe", Q.BF16, Q.BF16, dict(head_dim=32, tie_word_embeddings=False), True,
    ),
}  # fmt: skip
HF_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
TRANSFORMERS_READS = ("llama_q4_1", "qwen2_f16")  # its GGUF loader takes head_dim = D / Q


def _original_tokenizer(pre: str) -> Tokenizer:
    """A byte-level BPE trained with the split llama.cpp calls `pre`, as the model's own
    tokenizer.json has it: the reference the GGUF vocabulary is rebuilt against."""
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    splits = {
        "smollm": [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ],
        "qwen2": [pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), "isolated"), to_bytes],
        "llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), "isolated"), to_bytes],
    }
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits[pre])
    tok.decoder = decoders.ByteLevel()
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([USER_DEFINED])
    return tok


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotary halves interleaved into adjacent pairs."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _roundtrip(x: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)


def _write_gguf(path, arch, hf_model, tok, pre, qtype, embed_qtype, add_bos):
    """Writes `hf_model` and `tok` as llama.cpp's converter does (metadata, names, layout)."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(int(qtype))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    kinds = {
        **dict.fromkeys(SPECIAL, gguf.TokenType.CONTROL),
        USER_DEFINED: gguf.TokenType.USER_DEFINED,
    }
    types = [kinds.get(t, gguf.TokenType.NORMAL) for t in tokens]
    w.add_token_types(types)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    arch_id = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, c.num_hidden_layers)
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = t.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            x = _llama_cpp_permute(x, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf_name:
            x = _llama_cpp_permute(x, c.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        kind = embed_qtype if "embed_tokens" in hf_name else qtype
        if x.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (gguf path, original HF state dict, original tokenizer, converted folder)."""
    out = {}
    for i, (name, (arch, pre, qtype, embed_qtype, fields, add_bos)) in enumerate(CASES.items()):
        tok = _original_tokenizer(pre)
        hf_cfg = HF_CONFIGS[arch](
            vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=50000.0, **{"num_key_value_heads": 2, **fields},
        )  # fmt: skip
        torch.manual_seed(i)
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        with torch.no_grad():
            for p in hf_model.parameters():
                p.normal_(0.0, 0.05)
        folder = tmp_path_factory.mktemp(name)
        path = folder / f"{name}.gguf"
        _write_gguf(path, arch, hf_model, tok, pre, qtype, embed_qtype, add_bos)
        converted = gguf_lib.convert(path, folder / "hf")
        state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
        out[name] = (path, state, tok, converted)
    return out


def _hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


# ----------------------------------------------------------------------------- weights, config


@pytest.mark.parametrize("name", sorted(CASES))
def test_tensors_are_the_dequantised_originals_in_hf_order(written, name):
    path, state, _, folder = written[name]
    _, _, qtype, embed_qtype, fields, _ = CASES[name]
    ours = load_file(folder / "model.safetensors")
    expected_names = set(state) - ({"lm_head.weight"} if fields["tie_word_embeddings"] else set())
    assert set(ours) == expected_names
    for key, x in state.items():
        if key in ours:
            kind = embed_qtype if "embed_tokens" in key else qtype
            want = _roundtrip(x, kind) if x.ndim == 2 else x
            np.testing.assert_array_equal(ours[key], want, err_msg=key)


@pytest.mark.parametrize("name", TRANSFORMERS_READS)
def test_tensors_config_and_logits_equal_transformers_gguf_loading(written, name):
    path, _, _, folder = written[name]
    hf_model = _hf_from_gguf(path)
    ours = load_file(folder / "model.safetensors")
    theirs = {k: v.numpy() for k, v in hf_model.state_dict().items() if k in ours}
    assert set(theirs) == set(ours)
    for key, x in theirs.items():
        np.testing.assert_array_equal(ours[key], x, err_msg=key)
    cfg, params = weights.load_hf(folder)
    theirs_cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    assert theirs_cfg.norm_eps == pytest.approx(cfg.norm_eps, rel=1e-7)  # float32 in the file
    assert cfg == theirs_cfg.replace(
        norm_eps=cfg.norm_eps, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id
    )
    tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    positions_BT = np.broadcast_to(np.arange(11, dtype=np.int32), (2, 11))
    with torch.no_grad():
        ref_BTV = hf_model(torch.tensor(tokens_BT, dtype=torch.long)).logits.numpy()
    ours_BTV = np.asarray(_forward(cfg, params, tokens_BT, positions_BT)[0])
    assert np.abs(ours_BTV - ref_BTV).max() <= 1e-4 * np.abs(ref_BTV).max()


def test_config_from_metadata(written):
    path, _, tok, folder = written["qwen3_bf16"]
    cfg = gguf_lib.model_config(path)
    assert (cfg.model_type, cfg.head_dim, cfg.qk_norm) == ("qwen3", 32, True)
    assert not cfg.tie_embeddings
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_position_embeddings) == (50000.0, 1e-5, 256)
    assert cfg.eos_token_id == tok.token_to_id("<|im_end|>")
    assert weights.load_hf(folder)[0] == cfg
    llama = gguf_lib.model_config(written["llama_q4_1"][0])
    assert (llama.tie_embeddings, llama.num_kv_heads, llama.qkv_bias) == (True, 2, False)
    assert gguf_lib.model_config(written["qwen2_f16"][0]).qkv_bias
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    run_cfg = config_lib.load_config(None, [f"model.name_or_path={path}", "model.dtype=bfloat16"])
    assert plan.model_config(run_cfg) == cfg.replace(dtype="bfloat16")


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokenizer_equals_the_original_and_transformers_gguf_loading(written, name):
    path, _, original, folder = written[name]
    add_bos = CASES[name][5]
    ours = weights.load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    bos = [original.token_to_id("<|im_start|>")] if add_bos else []
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == bos + original.encode(text).ids, text
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=True) == original.decode(ids)
    messages = [{"role": "user", "content": "What is 7 + 8?"}]
    chat = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n"
    assert (ours.eos_token, ours.pad_token, ours.bos_token) == ("<|im_end|>", *SPECIAL[:2])


# ----------------------------------------------------------------------------- cache, CLI


def test_gguf_path_loads_through_a_conversion_cache(written, tmp_path, monkeypatch):
    path, _, _, folder = written["qwen2_f16"]
    convert = gguf_lib.convert
    monkeypatch.setenv(gguf_lib.CACHE_ENV, str(tmp_path / "cache"))
    cfg, params = weights.load_hf(path)
    ref_cfg, ref_params = weights.load_hf(folder)
    assert cfg == ref_cfg
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    assert cached.name.startswith("qwen2_f16-") and weights.resolve_folder(str(path)) == cached
    assert (
        weights.load_tokenizer(path)("hello there")["input_ids"]
        == (weights.load_tokenizer(folder)("hello there")["input_ids"])
    )

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    # Keyed by content: a copy elsewhere is the same folder, converted once.
    copy = tmp_path / "copy" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(gguf_lib, "convert", no_second_conversion)
    assert weights.resolve_folder(path) == weights.resolve_folder(copy) == cached
    monkeypatch.setattr(gguf_lib, "convert", convert)
    with open(copy, "r+b") as f:  # same name and size, other content: never the stale folder
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    edited = weights.resolve_folder(copy)
    assert edited != cached and edited.name.startswith("qwen2_f16-")
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2
    assert not [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".")]


def test_command_line_writes_an_hf_folder(written, tmp_path, capsys):
    path, _, _, folder = written["llama_q4_1"]
    out = gguf_command.main([str(path), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    cfg, params = weights.load_hf(out)
    ref = weights.load_hf(folder)[1]
    rounded = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16), np.float32), ref)
    jax.tree.map(np.testing.assert_array_equal, params, rounded)
    with pytest.raises(SystemExit) as exit_info:
        gguf_command.main([str(path), str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists and is not empty; pass overwrite=True" in err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- bad inputs


def _copy_gguf(src, dst, replace_tensor=None, **changes):
    """Copies the GGUF file `src` to `dst` with metadata values replaced (a dotted key is
    written with `__` for each dot) and tensors replaced by `replace_tensor(tensor)`."""
    reader = gguf.GGUFReader(src)
    changes = {k.replace("__", "."): v for k, v in changes.items()}
    arch = changes.pop("general.architecture", reader.get_field("general.architecture").contents())
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, changes.get(key, field.contents()), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data, kind = (replace_tensor and replace_tensor(t)) or (t.data, t.tensor_type)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nothing.gguf does not exist; pass"):
        weights.load_hf(tmp_path / "nothing.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(FileNotFoundError, match=r"dir.gguf is a folder, not a file"):
        gguf_lib.convert(tmp_path / "dir.gguf", tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf at all" * 10)
    with pytest.raises(ValueError, match=r"fake.gguf is not a readable GGUF file \(.*\); pass"):
        weights.load_hf(tmp_path / "fake.gguf")


def test_unsupported_architecture(written, tmp_path):
    path = written["qwen2_f16"][0]
    bad = _copy_gguf(path, tmp_path / "phi.gguf", general__architecture="phi3")
    with pytest.raises(ValueError, match=r"holds a 'phi3' model; ttrl_jax supports .*'llama'"):
        gguf_lib.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "tokenizer__ggml__model",
            "llama",
            r"has a 'llama' tokenizer; GGUF import reads byte-level",
        ),
        (
            "tokenizer__ggml__pre",
            "falcon",
            r"splits text as 'falcon' .*known: \['gpt2', 'llama-bpe'",
        ),
    ],
)
def test_unsupported_tokenizer(written, tmp_path, key, value, message):
    bad = _copy_gguf(written["qwen2_f16"][0], tmp_path / "bad.gguf", **{key: value})
    with pytest.raises(ValueError, match=message):
        gguf_lib.convert(bad, tmp_path / "out")


def test_quantisation_the_library_cannot_dequantise(written, tmp_path):
    def as_q8_1(t):  # a block type the gguf library has no dequantiser for
        if t.name != "blk.1.ffn_up.weight":
            return None
        rows, cols = (int(d) for d in reversed(t.shape))
        block, nbytes = gguf.GGML_QUANT_SIZES[Q.Q8_1]
        return np.zeros((rows, cols // block * nbytes), np.uint8), Q.Q8_1

    bad = _copy_gguf(written["qwen2_f16"][0], tmp_path / "q8_1.gguf", as_q8_1)
    message = r"'blk.1.ffn_up.weight' .* stored as Q8_1, which the gguf library .* cannot"
    with pytest.raises(ValueError, match=message):
        gguf_lib.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
