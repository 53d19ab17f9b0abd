"""run/loop.py with LoRA end to end: a toy run trains adapters, checkpoints them with its base's
fingerprint, exports the merged model and a PEFT folder that agree, and refuses to resume onto
another base."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from ttrl_jax.hf import export as hf_export
from ttrl_jax.model import decoder as model_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.run import checkpoint as checkpoint_lib
from ttrl_jax.toy import tokenizer as toy_tokenizer

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "run.export_peft=true", "optim.lr=1e-2")


@pytest.fixture(scope="module")
def lora_run(toy_run, tiny_hf_model, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = toy_run.start(toy_run.args(tiny_hf_model, data_file, out, *LORA))
    log, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, log
    return out


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


def logits(model, tokens_BT):
    with torch.no_grad():
        return model(torch.tensor(tokens_BT)).logits.numpy()


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_and_exports_both_folders(lora_run, tiny_hf_model):
    out = lora_run
    ckpt = checkpoint_lib.Checkpointer(str(out / "checkpoints"))
    step = ckpt.latest_step()
    files = [p for p in (out / "checkpoints" / str(step) / "record").iterdir() if p.is_file()]
    record = json.loads(next(p.read_text() for p in files if "steps_done" in p.read_text()))
    assert len(record["base_fingerprint"]) == 16
    ckpt.close()
    tokens_BT = np.random.default_rng(0).integers(0, 128, (2, 11))
    merged = logits(load(out / "hf"), tokens_BT)
    base = logits(load(tiny_hf_model), tokens_BT)
    assert np.abs(merged - base).max() > 1e-3  # the adapters were trained
    config = json.loads((out / "peft" / hf_export.PEFT_CONFIG).read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == tiny_hf_model
    peft = pytest.importorskip("peft")
    adapted = peft.PeftModel.from_pretrained(load(tiny_hf_model), out / "peft").eval()
    np.testing.assert_allclose(logits(adapted, tokens_BT), merged, atol=1e-4)


@pytest.mark.slow
def test_resume_onto_another_base_is_refused(
    lora_run, toy_run, data_file, tmp_path_factory, tiny_hf_model
):
    other = tmp_path_factory.mktemp("other") / "hf"
    cfg = ModelConfig.from_hf(json.loads((Path(tiny_hf_model) / "config.json").read_text()))
    params = model_lib.init_params(cfg, jax.random.key(1))
    hf_export.save_hf(params, cfg, other, toy_tokenizer.build_tokenizer())
    extra = ("run.resume=true", "run.accept_config_change=true", "run.max_steps=6")
    proc = toy_run.start(toy_run.args(str(other), data_file, lora_run, *LORA, *extra))
    log, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 1, log
    error = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "holds LoRA adapters trained on another base model" in error[0]
