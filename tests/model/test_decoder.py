"""model/decoder.py: logits against transformers (Llama, Qwen2, Qwen3), cached decode, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec

from ttrl_jax import sharding
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder as model
from ttrl_jax.model.config import ModelConfig

_forward = jax.jit(model.forward, static_argnums=0)


_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


# name -> (HF config class, fields). Together they cover GQA, MHA, tied embeddings, q/k/v bias,
# Llama-3 rope scaling, Qwen3 q/k norm and a head_dim that is not hidden_size / num_heads.
HF_CASES = {
    "llama_gqa_llama3_rope": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            # original_max_position_embeddings=16 puts the scaling band inside head_dim=16's
            # wavelengths (6 .. 2e4), so every non-zero position sees bent frequencies.
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2_tied_mha": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "qwen3_qk_norm": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    ),
}


def _randomize(module, seed):
    """Non-trivial values everywhere (HF inits biases to 0 and norms to 1, hiding mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def hf_case(request, tmp_path_factory):
    """(HF model, our config, our params) for one tiny random checkpoint."""
    config_cls, fields = HF_CASES[request.param]
    torch.manual_seed(0)
    hf_cfg = config_cls(**_COMMON, **fields, attn_implementation="eager", dtype="float32")
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    _randomize(hf_model, seed=1)
    hf_model.eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder)
    cfg, params = weights.load_hf(folder)
    return request.param, hf_model, cfg, params


def _left_padded_batch(vocab, lengths, T, seed=0):
    rng = np.random.default_rng(seed)
    tokens_BT = rng.integers(0, vocab, (len(lengths), T)).astype(np.int32)
    mask_BT = np.arange(T)[None, :] >= (T - np.asarray(lengths))[:, None]
    return tokens_BT, mask_BT


def test_case_flags_reach_our_config(hf_case):
    name, _, cfg, params = hf_case
    expected = {
        "llama_gqa_llama3_rope": dict(qkv_bias=False, qk_norm=False, tie_embeddings=False),
        "qwen2_tied_mha": dict(qkv_bias=True, qk_norm=False, tie_embeddings=True),
        "qwen3_qk_norm": dict(qkv_bias=False, qk_norm=True, tie_embeddings=False),
    }[name]
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert ("lm_head" in params["params"]) == (not cfg.tie_embeddings)
    if name == "llama_gqa_llama3_rope":
        scaled = model.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        plain = model.rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)
        assert cfg.rope_scaling is not None
        assert not np.allclose(scaled, plain)
    if name == "qwen3_qk_norm":
        assert cfg.head_dim * cfg.num_heads != cfg.embed_dim


def test_logits_match_transformers_with_left_padding(hf_case, hf_logits):
    _, hf_model, cfg, params = hf_case
    tokens_BT, mask_BT = _left_padded_batch(cfg.vocab_size, lengths=(12, 9, 5), T=12)
    ref_BTV = hf_logits(hf_model, tokens_BT, mask_BT)
    ours_BTV, _ = _forward(cfg, params, tokens_BT, model.left_pad_positions(mask_BT), mask_BT)
    diff = np.abs(np.asarray(ours_BTV) - ref_BTV)[mask_BT]
    assert diff.max() <= 1e-4, diff.max()


def test_cached_decoding_matches_full_forward(hf_case, hf_logits):
    _, hf_model, cfg, params = hf_case
    T, prefill = 12, 7
    tokens_BT, mask_BT = _left_padded_batch(cfg.vocab_size, lengths=(12, 10, 8), T=T, seed=1)
    ref_BTV = hf_logits(hf_model, tokens_BT, mask_BT)
    positions_BT = np.asarray(model.left_pad_positions(mask_BT))
    cache = model.init_cache(cfg, batch=len(tokens_BT), max_len=T)
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]
    logits = []
    for start, stop in chunks:
        cols = slice(start, stop)
        out_BTV, cache = _forward(
            cfg, params, tokens_BT[:, cols], positions_BT[:, cols], mask_BT[:, cols], cache
        )
        logits.append(np.asarray(out_BTV))
    assert int(cache.index) == T
    diff = np.abs(np.concatenate(logits, axis=1) - ref_BTV)[mask_BT]
    assert diff.max() <= 1e-4, diff.max()


# Every param kind: q/k/v bias and q/k norm together, untied head; heads divide 4.
SHARD_CFG = ModelConfig.tiny(
    "qwen3",
    qkv_bias=True,
    vocab_size=256,
    embed_dim=64,
    num_heads=8,
    num_kv_heads=4,
    head_dim=8,
    mlp_dim=128,
)


def _mesh(spec):
    d, m = sharding.parse_mesh_shape(spec)
    return sharding.make_mesh(spec, jax.devices()[: d * m])


def _random_params(cfg, seed):
    """Random values for every param, norms and biases included (no init compile: fast)."""
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        is_norm = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(1 + 0.1 * noise if is_norm else 0.05 * noise)

    return jax.tree.map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def shard_inputs():
    params = _random_params(SHARD_CFG, seed=3)
    tokens_BT, mask_BT = _left_padded_batch(SHARD_CFG.vocab_size, lengths=(16, 11, 7, 16), T=16)
    positions_BT = np.asarray(model.left_pad_positions(mask_BT))
    ref_BTV, _ = _forward(SHARD_CFG, params, tokens_BT, positions_BT, mask_BT)
    return params, tokens_BT, positions_BT, mask_BT, np.asarray(ref_BTV)


@pytest.mark.parametrize("rules_name", ["TRAIN_RULES", "SAMPLE_RULES"])
@pytest.mark.parametrize("mesh_spec", ["2x4", "4x4"])
def test_sharded_forward_equals_unsharded(shard_inputs, mesh_spec, rules_name):
    params, tokens_BT, positions_BT, mask_BT, ref_BTV = shard_inputs
    mesh, rules = _mesh(mesh_spec), getattr(sharding, rules_name)
    params = jax.device_put(params, model.param_shardings(SHARD_CFG, mesh, rules))
    batch = sharding.batch_sharding(mesh, 2, rules)
    inputs = [jax.device_put(x, batch) for x in (tokens_BT, positions_BT, mask_BT)]
    logits = lambda p, t, pos, m: model.forward(SHARD_CFG, p, t, pos, m)[0]
    fn = jax.jit(sharding.with_rules(logits, mesh, rules))
    out_BTV = fn(params, *inputs)
    assert out_BTV.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec("data", None, "model")), 3
    )
    np.testing.assert_allclose(np.asarray(out_BTV), ref_BTV, atol=1e-5, rtol=0)


# kv_heads=2 over model=4 shows the replicate-if-indivisible fallback for kv heads.
SNAPSHOT_CFG = SHARD_CFG.replace(num_kv_heads=2)


TRAIN_SNAPSHOT_2x4 = {
    "params/embed": "('model', 'data')",
    "params/final_norm/scale": "('data',)",
    "params/layers/attn/k": "(None, 'data', None, None)",
    "params/layers/attn/k_bias": "(None, None, None)",
    "params/layers/attn/k_norm/scale": "(None, None)",
    "params/layers/attn/o": "(None, 'model', None, 'data')",
    "params/layers/attn/q": "(None, 'data', 'model', None)",
    "params/layers/attn/q_bias": "(None, 'model', None)",
    "params/layers/attn/q_norm/scale": "(None, None)",
    "params/layers/attn/v": "(None, 'data', None, None)",
    "params/layers/attn/v_bias": "(None, None, None)",
    "params/layers/attn_norm/scale": "(None, 'data')",
    "params/layers/mlp/down": "(None, 'model', 'data')",
    "params/layers/mlp/gate": "(None, 'data', 'model')",
    "params/layers/mlp/up": "(None, 'data', 'model')",
    "params/layers/mlp_norm/scale": "(None, 'data')",
    "params/lm_head": "('data', 'model')",
}


SAMPLE_SNAPSHOT_2x4 = {
    "params/embed": "('model', None)",
    "params/final_norm/scale": "(None,)",
    "params/layers/attn/k": "(None, None, None, None)",
    "params/layers/attn/k_bias": "(None, None, None)",
    "params/layers/attn/k_norm/scale": "(None, None)",
    "params/layers/attn/o": "(None, 'model', None, None)",
    "params/layers/attn/q": "(None, None, 'model', None)",
    "params/layers/attn/q_bias": "(None, 'model', None)",
    "params/layers/attn/q_norm/scale": "(None, None)",
    "params/layers/attn/v": "(None, None, None, None)",
    "params/layers/attn/v_bias": "(None, None, None)",
    "params/layers/attn_norm/scale": "(None, None)",
    "params/layers/mlp/down": "(None, 'model', None)",
    "params/layers/mlp/gate": "(None, None, 'model')",
    "params/layers/mlp/up": "(None, None, 'model')",
    "params/layers/mlp_norm/scale": "(None, None)",
    "params/lm_head": "(None, 'model')",
}


@pytest.mark.parametrize(
    "rules_name,expected",
    [("TRAIN_RULES", TRAIN_SNAPSHOT_2x4), ("SAMPLE_RULES", SAMPLE_SNAPSHOT_2x4)],
)
def test_param_sharding_snapshot(rules_name, expected):
    shardings = model.param_shardings(SNAPSHOT_CFG, _mesh("2x4"), getattr(sharding, rules_name))
    assert sharding.spec_snapshot(shardings) == expected


def test_heads_not_dividing_model_axis_error():
    cfg = SHARD_CFG.replace(num_heads=6, num_kv_heads=2)
    with pytest.raises(
        ValueError,
        match=r"params .*\['attn'\]\['o'\] with shape \(2, 6, 8, 64\): dimension 1 \(heads=6\) "
        r"does not divide over mesh axis 'model' of size 4",
    ):
        model.param_shardings(cfg, _mesh("2x4"), sharding.SAMPLE_RULES)


def test_kv_cache_follows_batch_sharding():
    mesh = _mesh("2x4")
    shapes = jax.eval_shape(lambda: model.init_cache(SHARD_CFG, batch=4, max_len=8))
    cache_shardings = model.cache_shardings(shapes, mesh, sharding.SAMPLE_RULES)
    assert cache_shardings.k_LBSKH.spec == PartitionSpec(None, "data", None, "model", None)
    assert cache_shardings.valid_BS.spec == PartitionSpec("data", None)
    assert jnp.dtype(shapes.k_LBSKH.dtype) == jnp.float32
