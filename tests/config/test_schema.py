"""config/schema.py: the sections' defaults (the paper's), their checks and messages."""

import dataclasses

import pytest

from ttrl_jax.config.load import load_config
from ttrl_jax.config.schema import ConfigError


def test_defaults_are_the_papers_settings():
    cfg = load_config()
    assert (cfg.sample.n_vote, cfg.sample.n_train, cfg.sample.max_new_tokens) == (64, 32, 3072)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.schedule) == (5e-7, 0.03, "cosine")
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay) == (0.9, 0.999, 0.01)
    assert (cfg.optim.clip_low, cfg.optim.clip_high, cfg.optim.dual_clip) == (0.2, 0.2, 3.0)
    assert (cfg.optim.kl_coef, cfg.optim.grad_clip, cfg.optim.mini_batch_prompts) == (
        0.001,
        1.0,
        1,
    )
    assert (cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p) == (16, 0.6, 0.95)
    assert cfg.mesh.shape == "auto"
    assert cfg.ttrl.reward == "majority" and cfg.ttrl.select == "random"


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sample.n_vote = 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["sample.n_train=65"], "sample.n_train=65"),
        (["sample.top_p=0"], "sample.top_p=0"),
        (["sample.top_p=1.5"], "sample.top_p=1.5"),
        (["sample.temperature=-0.1"], "sample.temperature=-0.1"),
        (["eval.temperature=-1"], "eval.temperature=-1"),
        (["sample.top_k=-1"], "sample.top_k=-1"),
        (["sample.prompt_buckets=[256,128]"], "sample.prompt_buckets"),
        (["sample.prompt_chunk=-1"], "sample.prompt_chunk=-1"),
        (["sample.halvings=-1"], "sample.halvings=-1 must be at least 0"),
        (["sample.prompt_chunk=3"], "sample.prompt_chunk=3 must divide data.batch_prompts=8"),
        (["sample.prompt_chunk=2", "mesh.shape=4x1"], "sampling pass (sample.prompt_chunk) = 2"),
        (["data.max_prompt_tokens=2048"], "data.max_prompt_tokens (2048)"),
        (["optim.mini_batch_prompts=3"], "optim.mini_batch_prompts=3 must divide"),
        (["optim.micro_batch_size=5"], "optim.micro_batch_size=5"),
        (["optim.dual_clip=0.5"], "optim.dual_clip=0.5"),
        (["optim.schedule=step"], "optim.schedule='step'"),
        (["ttrl.reward=oracle"], "ttrl.reward='oracle'"),
        (["ttrl.select=best"], "ttrl.select='best'"),
        (["ttrl.min_majority_ratio=1.5"], "ttrl.min_majority_ratio=1.5"),
        (["model.dtype=float16"], "model.dtype='float16'"),
        (["mesh.shape=4by4"], "mesh.shape='4by4'"),
        (["mesh.shape=2x0"], "mesh.shape='2x0'"),
        (["data.name=aime25"], "data.name='aime25' is not a known benchmark"),
        (["data.last_batch=keep"], "data.last_batch='keep'"),
        (["data.episodes=0"], "data.episodes=0"),
        (["eval.k=0"], "eval.k=0"),
        (["run.keep_checkpoints=0"], "run.keep_checkpoints"),
        (["run.max_echo_rise=1.5"], "run.max_echo_rise=1.5"),
        (["optim.old_logp=vllm"], "optim.old_logp="),
        (["sample.n_vote_min=16"], "sample.n_vote_min=16 must be between sample.n_train=32"),
        (["sample.n_vote_min=65"], "sample.n_vote_min=65"),
        (["sample.n_vote_step=0"], "sample.n_vote_step=0"),
        (["ttrl.vote_rule=sprt"], "ttrl.vote_rule='sprt'"),
        (["ttrl.vote_error=0"], "ttrl.vote_error=0"),
        (["mesh.shape=16x1"], "prompts of a step (data.batch_prompts)"),
        (["model.lora.rank=-1"], "model.lora.rank=-1 must be at least 0 (0 = off)"),
        (["model.lora.alpha=0"], "model.lora.alpha=0.0 must be > 0"),
        (["model.lora.dropout=1"], "model.lora.dropout=1.0 must be in [0, 1)"),
        (["model.lora.targets=[q,qkv]"], "model.lora.targets=['q', 'qkv'] must be distinct"),
        (["model.lora.targets=[]"], "model.lora.targets=[] must be distinct"),
        (["model.lora.base_dtype=int4"], "model.lora.base_dtype='int4' is not one of"),
        (["run.export_peft=true"], "run.export_peft writes LoRA adapters: it needs model.lora"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_lora_is_off_by_default_and_a_nested_section():
    assert load_config().model.lora.rank == 0
    cfg = load_config(
        None, ["model.lora.rank=8", "model.lora.targets=[v,q]", "run.export_peft=true"]
    )
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets) == (
        8,
        16.0,
        ("v", "q"),
    )
    with pytest.raises(
        ConfigError, match=r"unknown key 'model.lora.rnak'. Did you mean 'model.lora.rank'"
    ):
        load_config(None, ["model.lora.rnak=8"])


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sample.top_p=0", "eval.k=0", "ttrl.reward=x"])
    msg = str(err.value)
    assert "sample.top_p" in msg and "eval.k" in msg and "ttrl.reward" in msg


def test_prompt_template_needs_the_question_once():
    with pytest.raises(ConfigError, match="data.prompt_template='Solve it' must hold"):
        load_config(None, ["data.prompt_template=Solve it"])
    cfg = load_config(None, ["data.prompt_template={question} Answer with a number."])
    assert cfg.data.prompt_template == "{question} Answer with a number."
