"""XLA:TPU compiles of the tiny model on a 2x2 v5e topology (abstract devices: no TPU needed),
so a TPU-only failure (a kernel, a sharding, a dtype) shows up here, not on a rented slice."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import LoraConfig, ModelConfig
from ttrl_jax.rl import train
from ttrl_jax.rl.batch import StepBatch

# bfloat16 compute over float32 master params, as on TPU; heads and kv heads split over model=2.
CFG = ModelConfig.tiny("qwen2", num_heads=4, num_kv_heads=2, dtype="bfloat16")
P, N, T, R = 4, 4, 16, 8


@pytest.fixture(scope="module")
def mesh(v5e_devices):
    return sharding_lib.make_mesh((2, 2), v5e_devices)


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying their shardings: the inputs of an ahead-of-time compile."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def compile_for_tpu(jitted, *args):
    # The suite sets "highest" matmul precision for CPU parity; TPU runs keep the default.
    with jax.default_matmul_precision("default"):
        return jitted.lower(*args).compile()


def assert_uses_the_kernel(compiled):
    assert "tpu_custom_call" in compiled.as_text()  # Pallas splash attention, not XLA's
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert compiled.cost_analysis()["flops"] > 0


def compile_train_step(mesh, cfg=CFG, T=T, R=R, packed_len=None):
    """The train step for P prompts x N responses of T + R tokens, compiled by XLA:TPU; with
    `packed_len`, each prompt's row shared and packed at real lengths."""
    # One row per response: the layout the splash kernel takes (shared prompts run plain).
    step_cfg = train.StepConfig(
        n_train=2, mini_batch_prompts=2, micro_batch_rows=2 if packed_len is None else 4,
        share_prompts=packed_len is not None,
    )  # fmt: skip
    tx, lr_fn = train.make_optimizer(1e-3, total_updates=10)
    state_sh = train.state_shardings(cfg, tx, mesh)
    param_sh = model_lib.param_shardings(cfg, mesh, sharding_lib.TRAIN_RULES)
    step = train.build_train_step(cfg, step_cfg, tx, lr_fn, mesh, state_sh, param_sh)

    params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
    # What the step trains: the params, or with LoRA the adapters (the params are then the base).
    state = jax.eval_shape(lambda p: train.init_state(p, tx), train.trained_shapes(cfg))
    rows = lambda *shape: sharding_lib.batch_sharding(mesh, len(shape), sharding_lib.TRAIN_RULES)
    spec = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=rows(*shape))
    batch = StepBatch(
        prompt_PT=spec(jnp.int32, P, T), prompt_mask_PT=spec(bool, P, T),
        response_PNR=spec(jnp.int32, P, N, R), response_mask_PNR=spec(bool, P, N, R),
        logp_PNR=spec(jnp.float32, P, N, R), entropy_PNR=spec(jnp.float32, P, N, R),
        answer_id_PN=spec(jnp.int32, P, N), gold_id_P=spec(jnp.int32, P),
    )  # fmt: skip
    rep = sharding_lib.replicated(mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    hyper = jax.eval_shape(train.StepHyper.make)
    return compile_for_tpu(
        step,
        abstract(state, state_sh),
        abstract(params, param_sh),
        batch,
        abstract(key, rep),
        abstract(hyper, jax.tree.map(lambda _: rep, hyper)),
        packed_len,
    )


def test_train_step_compiles_for_v5e(mesh):
    compiled = compile_train_step(mesh)
    assert_uses_the_kernel(compiled)
    # The donated state is updated in place.
    assert compiled.memory_analysis().alias_size_in_bytes > 0


def test_packed_shared_rows_compile_for_v5e(mesh):
    """A prompt's row with its responses at real lengths (within one attention chunk, where
    TPU shares prompts): no kernel, a program of its own."""
    compiled = compile_train_step(mesh, packed_len=24)
    assert "tpu_custom_call" not in compiled.as_text()
    assert compiled.cost_analysis()["flops"] > 0
    assert compiled.memory_analysis().alias_size_in_bytes > 0


def test_lora_train_step_compiles_for_v5e(mesh):
    """Adapters (with dropout) beside the frozen base, sharded as their projections."""
    lora_cfg = dataclasses.replace(CFG, lora=LoraConfig(rank=4, dropout=0.1))
    compiled = compile_train_step(mesh, lora_cfg)
    assert_uses_the_kernel(compiled)
    assert compiled.memory_analysis().alias_size_in_bytes > 0


def test_remat_keeps_the_residual_stream_split_over_model(mesh, monkeypatch):
    """With full remat, what the backward pass keeps is each layer's input, the residual stream;
    training splits its tokens over 'model' (sharding.TRAIN_RULES), so that part of the train
    step's memory halves on model=2. Kept whole, the same step needs more."""
    cfg = dataclasses.replace(CFG, num_layers=32, embed_dim=512, mlp_dim=512, remat="block")
    split = compile_train_step(mesh, cfg, T=512, R=512).memory_analysis().temp_size_in_bytes
    whole_rules = [(a, None if a == "residual_seq" else m) for a, m in sharding_lib.TRAIN_RULES]
    monkeypatch.setattr(sharding_lib, "TRAIN_RULES", tuple(whole_rules))
    whole = compile_train_step(mesh, cfg, T=512, R=512).memory_analysis().temp_size_in_bytes
    # Kept: 32 layers x a row per device x 1024 tokens x 512 x 2 bytes = 32 MiB whole, 16 MiB
    # split (measured: 83.0 and 69.3 MiB of temporaries in all).
    assert whole - split >= 8 * 2**20, (split, whole)


def test_prefill_compiles_for_v5e(mesh):
    """model.forward filling its cache (the sampler's prefill) under the sample rules."""
    rules = sharding_lib.SAMPLE_RULES
    params = jax.eval_shape(lambda: model_lib.init_params(CFG, jax.random.key(0)))
    cache = jax.eval_shape(lambda: model_lib.init_cache(CFG, batch=P, max_len=T))
    cache_sh = model_lib.cache_shardings(cache, mesh, rules)
    rows = sharding_lib.batch_sharding(mesh, 2, rules)
    tokens = jax.ShapeDtypeStruct((P, T), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((P, T), bool, sharding=rows)

    def prefill(params, tokens_BT, mask_BT, cache):
        positions_BT = model_lib.left_pad_positions(mask_BT)
        return model_lib.forward(CFG, params, tokens_BT, positions_BT, mask_BT, cache)

    fn = jax.jit(sharding_lib.with_rules(prefill, mesh, rules), out_shardings=(None, cache_sh))
    compiled = compile_for_tpu(
        fn,
        abstract(params, model_lib.param_shardings(CFG, mesh, rules)),
        tokens,
        mask,
        abstract(cache, cache_sh),
    )
    assert_uses_the_kernel(compiled)
