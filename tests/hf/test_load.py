"""hf/load.py with hf/export.py: export ⇄ transformers, round trips, sharded files and placement,
tied-embedding handling, and the error messages for bad inputs."""

import json
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ttrl_jax import sharding
from ttrl_jax.hf import export as hf_export
from ttrl_jax.hf import layout as hf_layout
from ttrl_jax.hf import load as weights
from ttrl_jax.model import config as model_config
from ttrl_jax.model import decoder as model
from ttrl_jax.model.config import ModelConfig

_forward = jax.jit(model.forward, static_argnums=0)

CFGS = {
    "qwen2_tied": ModelConfig.tiny("qwen2", tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama_rope_scaling": ModelConfig.tiny(
        "llama",
        rope_theta=10000.0,
        rope_scaling=model_config.RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8,
        ),
        eos_token_id=(2, 3),
    ),
    "qwen3": ModelConfig.tiny("qwen3", num_heads=4, num_kv_heads=2, head_dim=16),
}


def _random_params(cfg, seed):
    """Random values for every param (norms near 1), made without compiling init."""
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * noise if is_norm else 0.05 * noise)

    return jax.tree.map_with_path(draw, shapes)


def _tokens(cfg, B=2, T=9, seed=0):
    tokens_BT = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return tokens_BT, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))


def _our_logits(cfg, params, tokens_BT, positions_BT):
    return np.asarray(_forward(cfg, params, tokens_BT, positions_BT)[0])


def _hf_logits(folder, tokens_BT):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        return hf_model(torch.tensor(tokens_BT, dtype=torch.long)).logits.numpy()


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _word_tokenizer(n_tokens):
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, n_tokens)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (cfg, params, folder written by save_hf), for each config in CFGS."""
    out = {}
    for i, (name, cfg) in enumerate(CFGS.items()):
        params = _random_params(cfg, seed=i)
        out[name] = (cfg, params, hf_export.save_hf(params, cfg, tmp_path_factory.mktemp(name)))
    return out


# ----------------------------------------------------------------------------- export / load


@pytest.mark.parametrize("name", sorted(CFGS))
def test_export_loads_in_transformers_with_identical_logits(exported, name):
    cfg, params, folder = exported[name]
    tokens_BT, positions_BT = _tokens(cfg)
    diff = np.abs(_hf_logits(folder, tokens_BT) - _our_logits(cfg, params, tokens_BT, positions_BT))
    assert diff.max() <= 1e-4, diff.max()


@pytest.mark.parametrize("name", sorted(CFGS))
def test_export_then_load_gives_same_config_and_params(exported, name):
    cfg, params, folder = exported[name]
    cfg2, params2 = weights.load_hf(folder)
    assert cfg2 == cfg
    _assert_trees_equal(params2, params)


def test_exported_folder_contents(exported):
    _, _, folder = exported["llama_rope_scaling"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    hf = json.loads((folder / "config.json").read_text())
    assert hf["rope_scaling"]["rope_type"] == "llama3"
    assert hf["dtype"] == hf["torch_dtype"] == "float32"
    assert json.loads((folder / "generation_config.json").read_text()) == {"eos_token_id": [2, 3]}
    _, _, tied_folder = exported["qwen2_tied"]
    with safe_open(tied_folder / "model.safetensors", framework="numpy") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert f.metadata() == {"format": "pt"}
    leftovers = [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    assert not leftovers  # the temporary build folder was renamed into place


def test_hf_checkpoint_load_export_load_is_bit_exact(tmp_path):
    hf_cfg = transformers.Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_()
    hf_model.save_pretrained(tmp_path / "hf")
    cfg, params = weights.load_hf(tmp_path / "hf")
    hf_export.save_hf(params, cfg, tmp_path / "ours")
    cfg2, params2 = weights.load_hf(tmp_path / "ours")
    assert cfg2 == cfg
    _assert_trees_equal(params2, params)
    original = load_file(tmp_path / "hf" / "model.safetensors")
    written = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


def test_sharded_index_export_loads_in_transformers_and_ours(exported, tmp_path):
    cfg, params, _ = exported["qwen3"]
    max_bytes = 20_000
    folder = hf_export.save_hf(params, cfg, tmp_path / "sharded", max_shard_bytes=max_bytes)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 3
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert not (folder / "model.safetensors").exists()
    total = 0
    for shard in shards:
        tensors = load_file(shard)
        nbytes = sum(t.nbytes for t in tensors.values())
        total += nbytes
        assert nbytes <= max_bytes or len(tensors) == 1, shard.name
    assert index["metadata"]["total_size"] == total
    _, params2 = weights.load_hf(folder)
    _assert_trees_equal(params2, params)
    tokens_BT, positions_BT = _tokens(cfg)
    diff = np.abs(_hf_logits(folder, tokens_BT) - _our_logits(cfg, params, tokens_BT, positions_BT))
    assert diff.max() <= 1e-4, diff.max()


def test_bfloat16_export_and_load(exported, tmp_path):
    cfg, params, _ = exported["qwen2_tied"]
    folder = hf_export.save_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    cfg32, params32 = weights.load_hf(folder)  # float32 params by default
    assert cfg32.param_dtype == "float32"
    _assert_trees_equal(params32, rounded)
    cfg16, params16 = weights.load_hf(folder, param_dtype="bfloat16", dtype="bfloat16")
    assert (cfg16.param_dtype, cfg16.dtype) == ("bfloat16", "bfloat16")
    _assert_trees_equal(params16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


@pytest.mark.parametrize("rules_name", ["TRAIN_RULES", "SAMPLE_RULES"])
def test_load_onto_mesh_gives_expected_shardings(exported, rules_name, tmp_path):
    cfg, params, folder = exported["qwen3"]
    mesh = sharding.make_mesh("2x4", jax.devices()[:8])
    rules = getattr(sharding, rules_name)
    cfg2, placed = weights.load_hf(folder, mesh=mesh, rules=rules)
    expected = model.param_shardings(cfg2, mesh, rules)
    for path, leaf in jax.tree.flatten_with_path(placed)[0]:
        want = expected
        for key in path:
            want = want[key.key]
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), jax.tree_util.keystr(path)
    lm_head = placed["params"]["lm_head"]
    assert lm_head.sharding.spec[1] == "model" and len(lm_head.addressable_shards) == 8
    _assert_trees_equal(placed, params)
    # Saving gathers the sharded params back into the same files.
    out = hf_export.save_hf(placed, cfg2, tmp_path / "from_mesh")
    original = load_file(folder / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)


# ----------------------------------------------------------------------------- tied embeddings


def _rewrite(folder, edit):
    """Applies `edit(tensors) -> tensors` to a folder's model.safetensors."""
    path = folder / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


@pytest.fixture
def tied_copy(exported, tmp_path):
    cfg, params, folder = exported["qwen2_tied"]
    shutil.copytree(folder, tmp_path / "tied")
    return cfg, params, tmp_path / "tied"


def test_tied_checkpoint_with_equal_lm_head_stays_tied(tied_copy):
    cfg, params, folder = tied_copy
    _rewrite(folder, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    cfg2, params2 = weights.load_hf(folder)
    assert cfg2.tie_embeddings
    _assert_trees_equal(params2, params)


def test_tied_checkpoint_with_different_lm_head_loads_untied(tied_copy):
    cfg, params, folder = tied_copy
    head_VD = np.full((cfg.vocab_size, cfg.embed_dim), 0.5, np.float32)
    _rewrite(folder, lambda t: {**t, "lm_head.weight": head_VD})
    with pytest.warns(UserWarning, match="tie_word_embeddings=true but the checkpoint holds"):
        cfg2, params2 = weights.load_hf(folder)
    assert not cfg2.tie_embeddings
    np.testing.assert_array_equal(params2["params"]["lm_head"], head_VD.T)
    tokens_BT, positions_BT = _tokens(cfg2)
    ours_BTV = _our_logits(cfg2, params2, tokens_BT, positions_BT)
    diff = np.abs(_hf_logits(folder, tokens_BT) - ours_BTV)
    assert diff.max() <= 1e-4, diff.max()


def test_tied_checkpoint_with_only_lm_head_uses_it_as_embedding(tied_copy):
    cfg, params, folder = tied_copy

    def move(t):
        t = dict(t)
        t["lm_head.weight"] = t.pop("model.embed_tokens.weight")
        return t

    _rewrite(folder, move)
    cfg2, params2 = weights.load_hf(folder)
    assert cfg2.tie_embeddings
    _assert_trees_equal(params2, params)


def test_rotary_inv_freq_buffers_are_ignored(tied_copy):
    _, params, folder = tied_copy
    inv_freq = np.ones(4, np.float32)
    _rewrite(folder, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq})
    _assert_trees_equal(weights.load_hf(folder)[1], params)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_saved_with_model_and_reloaded(exported, tmp_path):
    cfg, params, _ = exported["qwen3"]
    tokenizer = _word_tokenizer(cfg.vocab_size - 8)  # smaller than the vocab is fine (Qwen pads)
    folder = hf_export.save_hf(params, cfg, tmp_path / "with_tok", tokenizer=tokenizer)
    reloaded = weights.load_tokenizer(folder)
    hf_layout.check_tokenizer(reloaded, cfg)
    assert len(reloaded) == len(tokenizer)
    assert reloaded("w1 w7 w3")["input_ids"] == tokenizer("w1 w7 w3")["input_ids"] == [1, 7, 3]


def test_tokenizer_larger_than_vocab_is_an_error(exported, tmp_path):
    cfg, params, _ = exported["qwen3"]
    tokenizer = _word_tokenizer(300)
    message = r"tokenizer has 300 tokens but the model's vocab_size is 128"
    with pytest.raises(ValueError, match=message):
        hf_layout.check_tokenizer(tokenizer, cfg)
    with pytest.raises(ValueError, match=r"tokenizer has 300 tokens"):
        hf_export.save_hf(params, cfg, tmp_path / "bad", tokenizer=tokenizer)
    assert not (tmp_path / "bad").exists()


def test_load_tokenizer_without_tokenizer_files(exported):
    _, _, folder = exported["qwen3"]
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files .*found: config.json"):
        weights.load_tokenizer(folder)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def good_copy(exported, tmp_path):
    """A writable copy of the exported qwen3 folder."""
    _, _, folder = exported["qwen3"]
    return shutil.copytree(folder, tmp_path / "model")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*no_such_model does not exist"):
        weights.load_hf(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        weights.load_hf(str(tmp_path / "no_such_model"))


def test_unreachable_hub_id_names_the_id_and_the_remedies(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError) as info:
        weights.load_hf("ttrl-jax-tests/no-such-model")
    message = str(info.value)
    assert "'ttrl-jax-tests/no-such-model' is not a local folder" in message
    for remedy in ("local folder with config.json", "HF_HUB_OFFLINE=1", "hf auth login"):
        assert remedy in message


def test_missing_config_json(good_copy):
    (good_copy / "config.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"has no config.json \(found: model.safetensors\); pass the folder"
    ):
        weights.load_hf(good_copy)


def test_unsupported_model_type(good_copy):
    hf = json.loads((good_copy / "config.json").read_text())
    (good_copy / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'gpt2'.*supports"):
        weights.load_hf(good_copy)


def test_missing_tensor(good_copy):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(good_copy, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=rf"lacks 1 tensor\(s\).*\['{name}'\]"):
        weights.load_hf(good_copy)


def test_unexpected_tensor(good_copy):
    name = "model.layers.0.self_attn.q_proj.bias"  # config says attention_bias=false
    _rewrite(good_copy, lambda t: {**t, name: np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=rf"holds 1 tensor\(s\) .* does not use: \['{name}'\]"):
        weights.load_hf(good_copy)


def test_shape_mismatch(good_copy):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(good_copy, lambda t: {**t, name: np.zeros((16, 32), np.float32)})
    with pytest.raises(
        ValueError, match=rf"tensor '{name}' has shape \(16, 32\) .*config.json implies \(32, 32\)"
    ):
        weights.load_hf(good_copy)


def test_pickle_only_checkpoint_is_refused(good_copy):
    (good_copy / "model.safetensors").unlink()
    (good_copy / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"):
        weights.load_hf(good_copy)


def test_no_weights_at_all(good_copy):
    (good_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has neither model.safetensors nor"):
        weights.load_hf(good_copy)


def test_index_naming_a_missing_shard(exported, tmp_path):
    cfg, params, _ = exported["qwen3"]
    folder = hf_export.save_hf(params, cfg, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    (folder / second).unlink()
    with pytest.raises(FileNotFoundError, match=rf"not in the folder: \['{second}'\]"):
        weights.load_hf(folder)


def test_save_refuses_nonempty_folder_and_bad_dtype(exported, tmp_path):
    cfg, params, folder = exported["qwen3"]
    with pytest.raises(FileExistsError, match=r"exists and is not empty; pass overwrite=True"):
        hf_export.save_hf(params, cfg, folder)
    with pytest.raises(ValueError, match=r"save dtype 'int8' is not one of"):
        hf_export.save_hf(params, cfg, tmp_path / "x", dtype="int8")
    wrong = cfg.replace(num_layers=3)
    message = r"param layers/attn/q has shape \(2, 32, 4, 16\), the config implies \(3, 32, 4, 16\)"
    with pytest.raises(ValueError, match=message):
        hf_export.save_hf(params, wrong, tmp_path / "y")


def test_save_overwrite_replaces_folder(exported, tmp_path):
    cfg, params, _ = exported["qwen3"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    hf_export.save_hf(params, cfg, out, overwrite=True, dtype="bfloat16")
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
