"""run/setup.py: what a run builds from its config: the built-in default (configs/toy.yaml)."""

import jax
import numpy as np

from ttrl_jax.config.load import default_config_path, load_config
from ttrl_jax.run import setup


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
