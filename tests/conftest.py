"""Test set-up: 16 fake CPU devices, float32 matmuls; must run before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu takes a machine-wide lock when loaded; the suite only compiles for abstract TPU devices,
# so several processes (xdist workers, a run alongside) may hold it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """A random tiny qwen2 checkpoint with the toy tokenizer, as an HF folder."""
    from ttrl_jax import model as model_lib
    from ttrl_jax import weights
    from ttrl_jax.toy import tokenizer as toy_tokenizer

    cfg = model_lib.ModelConfig.tiny(
        "qwen2", vocab_size=128, eos_token_id=127, max_position_embeddings=512
    )
    folder = tmp_path_factory.mktemp("tiny_model") / "hf"
    params = model_lib.init_params(cfg, jax.random.key(0))
    weights.save_hf(params, cfg, folder, toy_tokenizer.build_tokenizer())
    return str(folder)


@pytest.fixture(scope="session")
def v5e_devices():
    """Abstract devices of a v5e 2x2 slice for XLA:TPU compiles (needs libtpu, no TPU)."""
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(
            platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1), num_slices=1,
        )  # fmt: skip
    except Exception as err:  # no libtpu: jax raises its own error types for this
        pytest.skip(f"the TPU compiler is not available (pip install -e '.[tpu]'): {err}")
    return list(topo.devices)
