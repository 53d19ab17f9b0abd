"""sampling/decode.py inside the sampler: its loop buffers in the compute dtype, sized to the
prompt and the response, and tensor-parallel weights read out of the layer stack."""

import chex
import jax
import jax.extend.core
import jax.numpy as jnp

from ttrl_jax.model import config as model_config
from ttrl_jax.model import decoder as model
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.sampling import decode, sampler, token_draw

P, T, N, R = 4, 8, 2, 7
PAD = 0


# q/k/v bias, Qwen3 q/k norm, tied embeddings, GQA (4 query heads over 2 kv heads).
QWEN3_CFG = ModelConfig.tiny("qwen3", qkv_bias=True, tie_embeddings=True)


# The sharded test's model: untied head, Llama-3 rope scaling bending the frequencies at these
# positions, K=2 kv heads that do not divide a model axis of 4 (replicated).
LLAMA_CFG = ModelConfig.tiny(
    "llama",
    qkv_bias=True,
    rope_scaling=model_config.RopeScaling(8.0, 1.0, 4.0, original_max_position_embeddings=4),
)


def _decode_loop_buffers(jaxpr) -> set:
    """(shape, dtype) of the 4-d float operands of the decode loop (the while loop with most)."""

    def loops(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "while":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from loops(sub)

    def buffers(eqn):
        avals = [v.aval for v in eqn.invars]
        return {
            (a.shape, str(a.dtype))
            for a in avals
            if a.ndim == 4 and jnp.issubdtype(a.dtype, jnp.floating)
        }

    return max((buffers(e) for e in loops(jaxpr.jaxpr)), key=len)


def test_caches_are_in_the_compute_dtype_and_sized_to_the_prompt_and_response():
    # bfloat16 compute, float32 params; two passes of 2 prompts: the decode loop holds one pass's
    # prompt caches (T slots) and response caches (R - 1 slots: the last token is never fed),
    # all in bfloat16, and nothing larger.
    cfg = QWEN3_CFG.replace(dtype="bfloat16")
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    fn = sampler.compiled_sampler(cfg, N, R, (), PAD, prompt_chunk=2)
    prompts = jax.ShapeDtypeStruct((P, T), jnp.int32)
    jaxpr = jax.make_jaxpr(fn)(
        params, prompts, prompts.update(dtype=bool), jax.random.key(0),
        token_draw.SamplingParams.make(),
    )  # fmt: skip
    K, H, S, rows = cfg.num_kv_heads, cfg.head_dim, R - 1, 2 * N
    assert _decode_loop_buffers(jaxpr) == {
        ((2, K, H, T), "bfloat16"),
        ((2, K, T, H), "bfloat16"),
        ((rows, K, H, S), "bfloat16"),
        ((rows, K, S, H), "bfloat16"),
    }


def test_decode_reads_tensor_parallel_weights_out_of_the_stack():
    # With weights split over model and already in the compute dtype (the TPU layout), the
    # decode step slices each layer out of the stacked weights inside the loop: per-layer
    # buffers made before the loop were a second copy of the weights (3.1 GiB per device for
    # Qwen2.5-Math-7B on v5e-16, by XLA:TPU's buffer report). Other layouts keep their buffers.
    cfg = LLAMA_CFG.replace(dtype="float32")
    params = model.init_params(cfg, jax.random.key(0))
    stacked = decode.decode_params(cfg, params, fuse=False)
    assert "layers" not in stacked and "stacked_layers" in stacked
    per_layer = decode.decode_params(cfg.replace(dtype="bfloat16"), params, fuse=False)
    assert "stacked_layers" not in per_layer and len(per_layer["layers"]) == cfg.num_layers
    slot = jnp.int32(3)
    for i in range(cfg.num_layers):
        want = jax.tree.map(lambda x, i=i: x[i], params["params"]["layers"])
        chex.assert_trees_all_equal(decode.layer_params(stacked, i, slot), want)
