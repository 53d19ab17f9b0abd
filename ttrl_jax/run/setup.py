"""A TTRL run's pieces, built from its Config: mesh, model, tokenizer, tasks, compiled step, state.

`build` does all the set-up `run.run` needs before its first step, in the order that surfaces a
user's mistake (a bad mesh, a too-long prompt, a missing model) before anything slow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.data import schedule as schedule_lib
from ttrl_jax.hf import layout as hf_layout
from ttrl_jax.hf import load as weights
from ttrl_jax.model import decoder
from ttrl_jax.model import lora as lora_lib
from ttrl_jax.model.config import ModelConfig
from ttrl_jax.rl import train as train_lib
from ttrl_jax.run import checkpoint as checkpoint_lib
from ttrl_jax.run import from_config
from ttrl_jax.run import rollout as rollout_lib

# Folded into the run's seed for the adapters' initial values (run/step.py's streams are 1-4).
ADAPTER_INIT = 5


@dataclasses.dataclass
class Job:
    """Everything a run's loop uses; `state` is the only part that changes."""

    cfg: Config
    mesh: Mesh
    model_cfg: ModelConfig
    tokenizer: Any
    generator: rollout_lib.Generator
    task: prompts_lib.Task  # the unlabeled prompts trained on (and evaluated first)
    eval_tasks: list[prompts_lib.Task]  # `task` and the extra eval benchmarks
    schedule: schedule_lib.PromptSchedule
    total_steps: int
    parts: from_config.TrainParts
    step_fn: Any  # the jitted train step
    state: train_lib.TrainState  # with LoRA: the adapters and their optimizer state
    ref_params: Any  # the initial policy for the KL term, None without KL; with LoRA the base
    sample_shardings: Any  # params in the sampler's layout
    model_dir: str  # the checkpoint folder the run started from
    base_fingerprint: str | None = None  # with LoRA: names the base in checkpoints

    @property
    def lora(self) -> bool:
        return self.model_cfg.lora is not None

    @property
    def has_gold(self) -> bool:
        """Whether any training prompt has a gold answer (evaluation needs one)."""
        return any(g is not None for g in self.task.golds)

    def eval_batch_prompts(self, task: prompts_lib.Task) -> int:
        return min(self.cfg.data.batch_prompts, len(task.prompt_ids))

    def base_params(self) -> Any:
        """The base model (the run's starting point) in the sampler's layout: the KL reference
        when the run holds one, else read again from its folder."""
        if self.ref_params is not None:
            return sharding_lib.reshard(self.ref_params, self.sample_shardings)
        _, params = weights.load_hf(
            self.model_dir,
            mesh=self.mesh,
            rules=sharding_lib.SAMPLE_RULES,
            dtype=self.model_cfg.dtype,
            param_dtype=self.model_cfg.dtype,
        )
        return params

    def sample_params(self) -> Any:
        """The current policy in the sampler's layout and compute dtype (the sampler computes in
        it anyway, so a copy in the parameter dtype would only take more memory); with LoRA the
        base and adapters merged, so decoding costs what the base model's does."""
        if self.lora:
            return self._merge_for_sampling(self.ref_params, self.state.params)
        dtype = self.model_cfg.dtype
        params = jax.tree.map(lambda x: x.astype(dtype), self.state.params)
        return sharding_lib.reshard(params, self.sample_shardings)

    def trained_params(self) -> Any:
        """The current policy as full params in float32 (with LoRA, merged): what run.export_hf
        writes."""
        if not self.lora:
            return self.state.params
        merge = lambda base, adapters: lora_lib.merge(self.model_cfg, base, adapters, "float32")
        return jax.jit(merge)(self.ref_params, self.state.params)

    @functools.cached_property
    def _merge_for_sampling(self):
        cfg = self.model_cfg
        merge = lambda base, adapters: lora_lib.merge(cfg, base, adapters, cfg.dtype)
        return jax.jit(merge, out_shardings=self.sample_shardings)


def build(cfg: Config) -> Job:
    """Loads the model and data of `cfg` onto its mesh and compiles nothing yet."""
    mesh = sharding_lib.make_mesh(cfg.mesh.shape)
    config_lib.validate_config(cfg, data_axis_size=sharding_lib.data_size(mesh))
    sharding_lib.process_rows(mesh, cfg.data.batch_prompts)  # a multi-host layout error, early

    # Model and tokenizer, params straight into the train layout (with LoRA, the frozen base
    # straight into its storage dtype: it never exists in float32 unless that is its dtype).
    folder = weights.resolve_folder(
        config_lib.resolve_model_path(cfg.model.name_or_path), cfg.model.revision
    )
    lora = from_config.lora_config(cfg.model.lora)
    model_cfg, params = weights.load_hf(
        folder,
        mesh=mesh,
        rules=sharding_lib.TRAIN_RULES,
        param_dtype=cfg.model.param_dtype if lora is None else from_config.base_dtype(cfg),
        dtype=cfg.model.dtype,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        lora=lora,
    )
    config_lib.check_context_length(cfg, model_cfg.max_position_embeddings)
    tokenizer = weights.load_tokenizer(folder)
    hf_layout.check_tokenizer(tokenizer, model_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop_ids = from_config.stop_ids(model_cfg, cfg.sample.stop_token_ids, tokenizer, folder)
    generator = rollout_lib.Generator(
        model_cfg,
        tokenizer,
        stop_ids,
        pad_id,
        tuple(cfg.sample.prompt_buckets),
        mesh,
        prompt_chunk=cfg.sample.prompt_chunk,
        halvings=cfg.sample.halvings,
    )

    # Data: the unlabeled prompts, in a seeded order per episode.
    task = prompts_lib.load_task(cfg.data.path or cfg.data.name, tokenizer, cfg.data)
    eval_tasks = [task] + [
        prompts_lib.load_task(b, tokenizer, cfg.data) for b in cfg.eval.benchmarks
    ]
    schedule = schedule_lib.PromptSchedule(
        len(task.items),
        cfg.data.batch_prompts,
        cfg.data.episodes,
        cfg.run.seed,
        cfg.data.shuffle,
        cfg.data.last_batch,
    )
    total_steps = min(schedule.total_steps, cfg.run.max_steps or schedule.total_steps)
    for t in eval_tasks:
        sharding_lib.process_rows(mesh, min(cfg.data.batch_prompts, len(t.prompt_ids)))

    # Optimizer, state and the step.
    parts = from_config.train_parts(cfg, total_steps)
    state_sh = train_lib.state_shardings(model_cfg, parts.tx, mesh)
    use_kl = parts.step_cfg.use_kl
    fingerprint = None
    if lora is None:
        # The reference is only ever read in the compute dtype: store it so (the same log-probs).
        cast = lambda x: jnp.array(x, model_cfg.dtype)
        ref_params = jax.tree.map(cast, params) if use_kl else None
        trained = params
    else:
        # The frozen base is the policy's weights under the adapters and, alone, the KL reference.
        ref_params, fingerprint = params, checkpoint_lib.base_fingerprint(model_cfg, params)
        key = jax.random.fold_in(jax.random.key(cfg.run.seed), ADAPTER_INIT)
        trained = lora_lib.sharded_init_adapters(model_cfg, mesh, sharding_lib.TRAIN_RULES, key)
    state = jax.jit(lambda p: train_lib.init_state(p, parts.tx), out_shardings=state_sh)(trained)
    train_sh = decoder.param_shardings(model_cfg, mesh, sharding_lib.TRAIN_RULES)
    step_fn = train_lib.build_train_step(
        model_cfg, parts.step_cfg, parts.tx, parts.lr_fn, mesh, state_sh,
        None if ref_params is None else train_sh,
    )  # fmt: skip
    return Job(
        cfg=cfg, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer, generator=generator,
        task=task, eval_tasks=eval_tasks, schedule=schedule, total_steps=total_steps,
        parts=parts, step_fn=step_fn, state=state, ref_params=ref_params,
        sample_shardings=decoder.param_shardings(model_cfg, mesh, sharding_lib.SAMPLE_RULES),
        model_dir=str(folder), base_fingerprint=fingerprint,
    )  # fmt: skip


def export_dir(cfg: Config) -> str:
    """Where `run.export_hf` writes the trained policy as an HF folder."""
    return os.path.join(cfg.run.out_dir, "hf")


def peft_dir(cfg: Config) -> str:
    """Where `run.export_peft` writes the LoRA adapters as a PEFT folder."""
    return os.path.join(cfg.run.out_dir, "peft")
