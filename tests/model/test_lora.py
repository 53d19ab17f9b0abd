"""model/lora.py with LoraConfig (config.py) and the decoder's adapters: fresh adapters are the
base model, adapters applied are the merged weights (values and gradients), their shardings
mirror the projections', their settings are checked."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model import lora
from ttrl_jax.model.config import LORA_TARGETS, LoraConfig, ModelConfig

B, T = 3, 7
forward = jax.jit(model_lib.forward, static_argnums=0)


def inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens_BT = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    mask_BT = jnp.asarray(np.arange(T)[None] >= np.array([[0], [2], [4]]))  # left-padded rows
    return tokens_BT, model_lib.left_pad_positions(mask_BT), mask_BT


def perturbed(adapters, seed=1, scale=0.1):
    """Adapters with B (and A) moved off their initial values, as after training."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def model(model_type="qwen2", **lora_kw):
    cfg = ModelConfig.tiny(model_type, lora=LoraConfig(**{"rank": 4, **lora_kw}))
    return cfg, model_lib.init_params(cfg, jax.random.key(0))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_fresh_adapters_are_the_base_model(model_type):
    """B starts at zero: the policy's logits are the base model's, to float rounding (XLA may
    block the projections' matmuls differently once adapter matmuls sit beside them)."""
    cfg, params = model(model_type)
    adapters = lora.init_adapters(cfg, jax.random.key(1))
    assert all(not np.asarray(b).any() for n, b in _leaves(adapters) if n.endswith("_b"))
    assert all(np.asarray(a).std() > 0 for n, a in _leaves(adapters) if n.endswith("_a"))
    base = forward(cfg, params, *inputs(cfg))[0]
    policy = forward(cfg, lora.with_adapters(params, adapters), *inputs(cfg))[0]
    np.testing.assert_allclose(np.asarray(policy), np.asarray(base), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "targets", [LORA_TARGETS, ("q", "v"), ("o",), ("gate", "up", "down"), ("k", "down")]
)
def test_adapters_equal_the_merged_weights(targets):
    cfg, params = model("qwen2", targets=targets, alpha=8.0)
    adapters = perturbed(lora.init_adapters(cfg, jax.random.key(1)))
    policy = forward(cfg, lora.with_adapters(params, adapters), *inputs(cfg))[0]
    merged = lora.merge(cfg, params, adapters)
    chex.assert_trees_all_close(forward(cfg, merged, *inputs(cfg))[0], policy, atol=2e-5)
    base = forward(cfg, params, *inputs(cfg))[0]
    assert float(jnp.abs(policy - base).max()) > 1e-2  # the adapters do change the model
    # Only the targeted weights change, each by scale · A B.
    layers, merged_layers = params["params"]["layers"], merged["params"]["layers"]
    for module in ("attn", "mlp"):
        for name, w in layers[module].items():
            changed = not np.array_equal(np.asarray(merged_layers[module][name]), np.asarray(w))
            assert changed == (name in targets), name


def test_gradients_equal_autodiff_through_the_merged_weights():
    """What the train step differentiates (the adapters beside frozen weights) has the
    gradients of the merged model's loss with respect to A and B."""
    cfg, params = model("qwen3", alpha=16.0)
    adapters = perturbed(lora.init_adapters(cfg, jax.random.key(1)))
    tokens_BT, positions_BT, mask_BT = inputs(cfg, seed=2)
    w_BTV = jax.random.normal(jax.random.key(3), (B, T, cfg.vocab_size))

    def loss(logits_BTV):
        return (jax.nn.log_softmax(logits_BTV) * w_BTV * mask_BT[..., None]).sum()

    def applied(a):
        variables = lora.with_adapters(params, a)
        return loss(forward(cfg, variables, tokens_BT, positions_BT, mask_BT)[0])

    def merged(a):
        variables = lora.merge(cfg, params, a)
        return loss(forward(cfg, variables, tokens_BT, positions_BT, mask_BT)[0])

    value, grads = jax.jit(jax.value_and_grad(applied))(adapters)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(merged))(adapters)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=2e-5, rtol=1e-4)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_dropout_only_with_a_dropout_rng():
    cfg, params = model("qwen2", dropout=0.5)
    variables = lora.with_adapters(params, perturbed(lora.init_adapters(cfg, jax.random.key(1))))
    apply = jax.jit(
        lambda v, key: model_lib.Transformer(cfg).apply(v, *inputs(cfg), rngs={"dropout": key})[0]
    )
    plain = np.asarray(forward(cfg, variables, *inputs(cfg))[0])
    one, again = apply(variables, jax.random.key(5)), apply(variables, jax.random.key(5))
    other = apply(variables, jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(again))
    assert np.abs(one - plain).max() > 1e-3 and np.abs(one - other).max() > 1e-3
    # The base model has no adapters to drop out: a dropout rng changes nothing.
    np.testing.assert_array_equal(
        np.asarray(apply(params, jax.random.key(5))),
        np.asarray(forward(cfg, params, *inputs(cfg))[0]),
    )


def test_adapter_shapes_count_and_dtype():
    cfg, _ = model("llama", rank=3, targets=("o", "q", "down"))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), lora.adapter_shapes(cfg))["lora"]["layers"]
    L, D, Q, H, F, r = 2, 32, 4, 8, 64, 3
    f32 = jnp.dtype("float32")
    assert shapes == {
        "attn": {
            "q_a": ((L, D, r), f32), "q_b": ((L, r, Q, H), f32),
            "o_a": ((L, Q, H, r), f32), "o_b": ((L, r, D), f32),
        },
        "mlp": {"down_a": ((L, F, r), f32), "down_b": ((L, r, D), f32)},
    }  # fmt: skip
    assert lora.count(cfg) == L * r * ((D + Q * H) * 2 + (F + D))
    # A bfloat16 model trains float32 adapters.
    bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(lora.adapter_shapes(bf16))} == {f32}


def test_adapters_shard_as_their_projections():
    """A takes its projection's input axes, B its output axes, the rank axis is whole."""
    cfg = ModelConfig.tiny("qwen2", num_heads=8, num_kv_heads=4, lora=LoraConfig(rank=4))
    mesh = sharding_lib.make_mesh("2x4", jax.devices()[:8])
    got = lora.adapter_shardings(cfg, mesh, sharding_lib.TRAIN_RULES)["lora"]["layers"]
    spec = lambda *axes: jax.sharding.PartitionSpec(*axes)
    assert got["attn"]["q_a"].spec == spec(None, "data", None)
    assert got["attn"]["q_b"].spec == spec(None, None, "model", None)
    assert got["attn"]["o_a"].spec == spec(None, "model", None, None)
    assert got["attn"]["o_b"].spec == spec(None, None, "data")
    assert got["mlp"]["down_a"].spec == spec(None, "model", None)
    assert got["mlp"]["up_b"].spec == spec(None, None, "model")
    sampled = lora.adapter_shardings(cfg, mesh, sharding_lib.SAMPLE_RULES)["lora"]["layers"]
    assert sampled["attn"]["q_a"].spec == spec(None, None, None)
    adapters = lora.sharded_init_adapters(cfg, mesh, sharding_lib.TRAIN_RULES, jax.random.key(0))
    assert adapters["lora"]["layers"]["attn"]["q_b"].sharding == got["attn"]["q_b"]
    chex.assert_trees_all_equal(
        jax.device_get(adapters), jax.device_get(lora.init_adapters(cfg, jax.random.key(0)))
    )


def test_merge_casts_and_keeps_the_untargeted_leaves():
    cfg, params = model("qwen2", targets=("v",))
    adapters = perturbed(lora.init_adapters(cfg, jax.random.key(1)))
    merged = lora.merge(cfg, params, adapters, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype("bfloat16")}
    same = lora.merge(cfg, params, adapters)
    assert same["params"]["embed"] is params["params"]["embed"]
    assert same["params"]["layers"]["attn"]["q"] is params["params"]["layers"]["attn"]["q"]
    assert params["params"]["layers"]["attn"]["v"] is not same["params"]["layers"]["attn"]["v"]


def test_a_bfloat16_base_merged_for_float32_keeps_the_adapters_precision():
    """The sampler's weights for a float32 run on a bfloat16 base: W + scale A B rounded to
    float32 once, the policy the decoder computes (W upcast, adapters beside it), not rounded
    through bfloat16 first (which would lose most of a small update)."""
    cfg, params = model("qwen2", targets=("q",), alpha=8.0)
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    adapters = perturbed(lora.init_adapters(cfg, jax.random.key(1)), scale=1e-3)
    merged = lora.merge(cfg, base, adapters, "float32")
    w = base["params"]["layers"]["attn"]["q"].astype(jnp.float32)
    a, b = (adapters[lora.COLLECTION]["layers"]["attn"][n] for n in lora.names("q"))
    expected = w + cfg.lora.scale * jnp.einsum("LDJ,LJQH->LDQH", a, b)
    np.testing.assert_allclose(merged["params"]["layers"]["attn"]["q"], expected, rtol=1e-6)
    rounded = lora.merge(cfg, base, adapters)["params"]["layers"]["attn"]["q"]
    assert rounded.dtype == jnp.bfloat16  # no dtype asked: W's own
    assert float(jnp.abs(rounded.astype(jnp.float32) - expected).max()) > 1e-4


def test_lora_config_is_static_and_canonical():
    a = LoraConfig(rank=8, targets=("v", "q"))
    assert a.targets == ("q", "v") and a == LoraConfig(rank=8, targets=["q", "v"])
    assert a.scale == 2.0
    cfg = ModelConfig.tiny("qwen2", lora=a)
    assert hash(cfg) == hash(ModelConfig.tiny("qwen2", lora=LoraConfig(8, targets=("q", "v"))))
    assert cfg.to_hf() == ModelConfig.tiny("qwen2").to_hf()  # not part of the HF architecture


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"rank": 0}, "lora rank=0 must be at least 1"),
        ({"rank": 4, "alpha": 0.0}, "lora alpha=0.0 must be > 0"),
        ({"rank": 4, "dropout": 1.0}, "lora dropout=1.0 must be in [0, 1)"),
        ({"rank": 4, "targets": ("q", "qkv")}, "lora targets=['q', 'qkv'] must be distinct"),
        ({"rank": 4, "targets": ()}, "lora targets=[] must be distinct"),
        ({"rank": 4, "targets": ("q", "q")}, "lora targets=['q', 'q'] must be distinct"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(ValueError) as err:
        LoraConfig(**kw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_lora_functions_need_lora_settings():
    cfg = ModelConfig.tiny("qwen2")
    with pytest.raises(ValueError, match=r"^the model config has no LoRA settings"):
        lora.init_adapters(cfg, jax.random.key(0))


def _leaves(adapters):
    """(variable name, array) of each adapter leaf."""
    return [(p[-1].key, x) for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0]]
