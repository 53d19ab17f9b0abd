"""hf/export.py with LoRA: the merged model as an HF folder and the adapters as a PEFT folder,
each loaded by transformers (and PEFT) with the policy's logits."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from ttrl_jax.hf import export as hf_export
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model import lora
from ttrl_jax.model.config import LoraConfig, ModelConfig

forward = jax.jit(model_lib.forward, static_argnums=0)
B, T = 2, 9


def policy(model_type, targets, seed):
    """(cfg, base params, trained-looking adapters) of a tiny model."""
    cfg = ModelConfig.tiny(
        model_type, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=targets)
    )
    base = model_lib.init_params(cfg, jax.random.key(seed))
    adapters = lora.init_adapters(cfg, jax.random.key(seed + 1))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return cfg, base, treedef.unflatten(noisy)


def tokens(cfg):
    tokens_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    return tokens_BT, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))


def hf_logits(model, tokens_BT):
    with torch.no_grad():
        return model(torch.tensor(tokens_BT, dtype=torch.long)).logits.numpy()


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    )


CASES = {
    "qwen2_all": ("qwen2", ("q", "k", "v", "o", "gate", "up", "down")),
    "llama_attention": ("llama", ("q", "v", "o")),
    "qwen3_mlp": ("qwen3", ("gate", "up", "down")),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (cfg, base, adapters, base folder, merged folder, PEFT folder)."""
    out = {}
    for i, (name, (model_type, targets)) in enumerate(CASES.items()):
        cfg, base, adapters = policy(model_type, targets, seed=10 * i)
        root = tmp_path_factory.mktemp(name)
        merged = lora.merge(cfg, base, adapters, "float32")
        out[name] = (
            cfg, base, adapters,
            hf_export.save_hf(base, cfg, root / "base"),
            hf_export.save_hf(merged, cfg, root / "merged"),
            hf_export.save_peft(adapters, cfg, root / "peft", base_model=str(root / "base")),
        )  # fmt: skip
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_folder_loads_in_transformers_with_the_policys_logits(exported, name):
    cfg, base, adapters, _, merged, _ = exported[name]
    tokens_BT, positions_BT = tokens(cfg)
    ours = np.asarray(forward(cfg, lora.with_adapters(base, adapters), tokens_BT, positions_BT)[0])
    diff = np.abs(hf_logits(load_hf(merged), tokens_BT) - ours)
    assert diff.max() <= 1e-4, diff.max()


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_folder_loads_onto_the_base_with_the_policys_logits(exported, name):
    peft = pytest.importorskip("peft")
    cfg, base, adapters, base_folder, _, peft_folder = exported[name]
    model = peft.PeftModel.from_pretrained(load_hf(base_folder), peft_folder).eval()
    tokens_BT, positions_BT = tokens(cfg)
    ours = np.asarray(forward(cfg, lora.with_adapters(base, adapters), tokens_BT, positions_BT)[0])
    diff = np.abs(hf_logits(model, tokens_BT) - ours)
    assert diff.max() <= 1e-4, diff.max()
    # Loaded, not left at PEFT's own initial values (B = 0 would give the base's logits).
    base_logits = np.asarray(forward(cfg, base, tokens_BT, positions_BT)[0])
    assert np.abs(base_logits - ours).max() > 1e-2


def test_peft_folder_contents(exported):
    cfg, _, adapters, base_folder, _, folder = exported["llama_attention"]
    config = json.loads((folder / hf_export.PEFT_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    assert config["target_modules"] == ["q_proj", "v_proj", "o_proj"]
    assert config["base_model_name_or_path"] == str(base_folder)
    tensors = load_file(folder / hf_export.PEFT_WEIGHTS)
    assert len(tensors) == 2 * 3 * cfg.num_layers
    Q, H, D, r = cfg.num_heads, cfg.head_dim, cfg.embed_dim, 4
    prefix = "base_model.model.model.layers.1.self_attn."
    assert tensors[prefix + "q_proj.lora_A.weight"].shape == (r, D)
    assert tensors[prefix + "q_proj.lora_B.weight"].shape == (Q * H, r)
    assert tensors[prefix + "o_proj.lora_A.weight"].shape == (r, Q * H)
    o_b = np.asarray(adapters["lora"]["layers"]["attn"]["o_b"][1])
    np.testing.assert_array_equal(tensors[prefix + "o_proj.lora_B.weight"], o_b.T)


def test_peft_export_needs_lora_settings_and_an_empty_folder(exported, tmp_path):
    cfg, _, adapters, _, _, folder = exported["qwen3_mlp"]
    with pytest.raises(ValueError, match=r"^the model config has no LoRA settings"):
        hf_export.save_peft(adapters, cfg.replace(lora=None), tmp_path / "x")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        hf_export.save_peft(adapters, cfg, folder)
    assert hf_export.save_peft(adapters, cfg, folder, overwrite=True) == folder
