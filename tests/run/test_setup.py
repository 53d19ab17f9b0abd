"""run/setup.py: what a run builds from its config: the built-in default (configs/toy.yaml), with
and without LoRA."""

import chex
import jax
import numpy as np

from ttrl_jax.config.load import default_config_path, load_config
from ttrl_jax.model import lora
from ttrl_jax.model.config import LoraConfig
from ttrl_jax.run import from_config, setup


def test_the_job_holds_the_task_its_schedule_and_the_base_model(tmp_path):
    overrides = [f"run.out_dir={tmp_path}", "run.max_steps=3", "data.batch_prompts=16"]
    job = setup.build(load_config(default_config_path(), [*overrides, "mesh.shape=16x1"]))
    assert job.total_steps == 3 and job.has_gold
    assert len(job.task.prompt_ids) == len(job.task.golds) == 64
    assert [len(job.schedule.batch_indices(s)) for s in range(3)] == [16, 16, 16]
    assert int(job.state.step) == 0 and job.eval_batch_prompts(job.task) == 16
    # The base model the baseline samples: the KL reference, in the sampler's layout.
    base, now = job.base_params(), job.sample_params()
    assert jax.tree.structure(base) == jax.tree.structure(now)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(now)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_lora_job_trains_adapters_on_the_base_it_holds_once(tmp_path):
    """model.lora.rank > 0: the state is the adapters (float32), the base the only copy of the
    model (the KL reference, kept though the KL term is off), and the policy starts as it."""
    overrides = [
        f"run.out_dir={tmp_path}", "run.max_steps=2", "data.batch_prompts=16", "mesh.shape=16x1",
        "model.lora.rank=4", "model.lora.targets=[q,v,down]", "optim.kl_coef=0",
    ]  # fmt: skip
    cfg = load_config(default_config_path(), overrides)
    assert from_config.lora_config(cfg.model.lora) == LoraConfig(4, 16.0, 0.0, ("q", "v", "down"))
    job = setup.build(cfg)
    assert job.lora and job.model_cfg.lora == LoraConfig(4, targets=("q", "v", "down"))
    assert jax.tree.structure(job.state.params) == jax.tree.structure(
        lora.adapter_shapes(job.model_cfg)
    )
    assert {x.dtype for x in jax.tree.leaves(job.state.params)} == {np.dtype("float32")}
    assert job.ref_params is not None and len(job.base_fingerprint) == 16
    # Fresh adapters: the sampler's merged weights, the export's and the base are one model.
    base, now = job.base_params(), job.sample_params()
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(now)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(job.trained_params()) == jax.tree.structure(job.ref_params)
    # Training the adapters leaves the base as it was.
    before = jax.device_get(job.ref_params)
    moved = jax.tree.map(lambda x: x + 0.1, job.state.params)
    job.state = job.state.replace(params=moved)
    merged = job.sample_params()
    assert not np.array_equal(
        np.asarray(merged["params"]["layers"]["attn"]["q"]),
        np.asarray(base["params"]["layers"]["attn"]["q"]),
    )
    np.testing.assert_array_equal(
        np.asarray(merged["params"]["layers"]["attn"]["k"]),
        np.asarray(base["params"]["layers"]["attn"]["k"]),
    )
    chex.assert_trees_all_equal(jax.device_get(job.ref_params), before)


def test_bfloat16_base_under_float32_compute(tmp_path):
    overrides = [
        f"run.out_dir={tmp_path}", "data.batch_prompts=16", "mesh.shape=16x1",
        "model.lora.rank=2", "model.lora.base_dtype=bfloat16",
    ]  # fmt: skip
    job = setup.build(load_config(default_config_path(), overrides))
    assert {x.dtype for x in jax.tree.leaves(job.ref_params)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(job.sample_params())} == {np.dtype("float32")}
