"""What a run builds from its Config, in one place: optimizer, step settings, sampling, stop ids.

`run`, `evaluate`, `plan` and `bench` all take their parts from here, so one config means one
program wherever it is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import optax

from ttrl_jax.config.schema import Config, EvalSection, LoraSection, OptimSection, SampleSection
from ttrl_jax.model.config import LoraConfig, ModelConfig
from ttrl_jax.rl import train as train_lib
from ttrl_jax.rl import vote_budget as vote_budget_lib
from ttrl_jax.sampling import token_draw


@dataclasses.dataclass(frozen=True)
class TrainParts:
    """The train step's pieces for a run config."""

    tx: optax.GradientTransformation
    lr_fn: optax.Schedule
    step_cfg: train_lib.StepConfig  # static: changing it recompiles
    hyper: train_lib.StepHyper  # traced scalars
    sampling: token_draw.SamplingParams  # the rollout's (traced)
    eval_sampling: token_draw.SamplingParams


def lora_config(section: LoraSection) -> LoraConfig | None:
    """The model's LoRA settings (static, in ModelConfig.lora); None when model.lora.rank is 0."""
    if section.rank == 0:
        return None
    return LoraConfig(section.rank, section.alpha, section.dropout, tuple(section.targets))


def base_dtype(cfg: Config) -> str:
    """The dtype a LoRA run stores its frozen base in (model.lora.base_dtype)."""
    stored = cfg.model.lora.base_dtype
    return cfg.model.dtype if stored == "compute" else stored


def updates_per_step(cfg: Config) -> int:
    """Optimizer updates in one TTRL step: one per mini-batch of prompts."""
    return cfg.data.batch_prompts // cfg.optim.mini_batch_prompts


def train_parts(cfg: Config, total_steps: int, micro_batch_rows: int | None = None) -> TrainParts:
    """Everything the compiled step needs from `cfg`, for a run of `total_steps` steps.

    Args:
      cfg: the run config.
      total_steps: TTRL steps the run will take (sets the lr schedule's length only).
      micro_batch_rows: overrides optim.micro_batch_size (the plan's search); None = config.
    """
    tx, lr_fn = optimizer(cfg.optim, total_steps * updates_per_step(cfg))
    return TrainParts(
        tx=tx,
        lr_fn=lr_fn,
        step_cfg=step_config(cfg, micro_batch_rows),
        hyper=step_hyper(cfg),
        sampling=sampling_params(cfg.sample),
        eval_sampling=sampling_params(cfg.eval),
    )


def optimizer(
    o: OptimSection, total_updates: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with clipping and the lr schedule of an optim section."""
    return train_lib.make_optimizer(
        lr=o.lr,
        total_updates=total_updates,
        warmup_ratio=o.warmup_ratio,
        min_lr_ratio=o.min_lr_ratio,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        grad_clip=o.grad_clip,
        schedule=o.schedule,
    )


def step_config(cfg: Config, micro_batch_rows: int | None = None) -> train_lib.StepConfig:
    """The train step's static settings."""
    t, o = cfg.ttrl, cfg.optim
    rows = o.micro_batch_size if micro_batch_rows is None else micro_batch_rows
    return train_lib.StepConfig(
        n_train=cfg.sample.n_train,
        mini_batch_prompts=o.mini_batch_prompts,
        micro_batch_rows=rows or 0,
        reward=t.reward,
        random_select=t.select == "random",
        use_kl=o.kl_coef > 0,
        use_entropy_bonus=o.entropy_coef != 0,
        dual_clip=o.dual_clip,
        ettrl=t.ettrl_alpha != 0,
        recompute_old_logp=recomputes_old_logp(cfg),
        share_prompts=o.share_prompts,
    )


def recomputes_old_logp(cfg: Config) -> bool:
    """Whether the train step recomputes the rollout policy's log-probs (optim.old_logp)."""
    choice = cfg.optim.old_logp
    if choice != "auto":
        return choice == "recompute"
    # Top-p/top-k/min-p do not matter: the sampler reports the unfiltered distribution's
    # log-prob, as the recomputation does (sampling/sampler.py). Greedy sampling has none.
    return not (cfg.model.dtype == "float32" and cfg.sample.temperature > 0)


def step_hyper(cfg: Config) -> train_lib.StepHyper:
    """The train step's traced scalars (changing one never recompiles)."""
    o = cfg.optim
    return train_lib.StepHyper.make(
        temperature=cfg.sample.temperature,
        clip_low=o.clip_low,
        clip_high=o.clip_high,
        kl_coef=o.kl_coef,
        entropy_coef=o.entropy_coef,
        min_majority_ratio=cfg.ttrl.min_majority_ratio,
        ettrl_alpha=cfg.ttrl.ettrl_alpha,
    )


def vote_budget(cfg: Config) -> vote_budget_lib.VoteBudget:
    """The rollout vote's budget: rule, first round, later rounds' groups, error level."""
    s, t = cfg.sample, cfg.ttrl
    n_min = s.n_vote_min or s.n_train
    return vote_budget_lib.VoteBudget(
        rule=t.vote_rule,
        n_max=s.n_vote,
        n_min=n_min,
        n_step=s.n_vote_step or max(1, n_min // 2),
        error=t.vote_error,
        audit=t.vote_audit,
    )


def sampling_params(
    section: SampleSection | EvalSection,
) -> token_draw.SamplingParams:
    """Sampling settings of the rollout (sample) or evaluation (eval) section."""
    return token_draw.SamplingParams.make(
        temperature=section.temperature,
        top_p=section.top_p,
        top_k=getattr(section, "top_k", 0),
        min_p=getattr(section, "min_p", 0.0),
    )


def stop_ids(
    model_cfg: ModelConfig,
    extra: Sequence[int] = (),
    tokenizer: Any = None,
    model_dir: str | os.PathLike | None = None,
) -> tuple[int, ...]:
    """Every id that ends a response: the model's, the tokenizer's and generation config's EOS.

    Args:
      model_cfg: its `eos_token_id` (from config.json).
      extra: more ids (sample.stop_token_ids).
      tokenizer: adds its `eos_token_id` when given.
      model_dir: adds generation_config.json's `eos_token_id` when the folder has one.

    Raises:
      ValueError: no source names a stop id.
    """
    ids: set[int] = {int(i) for i in extra}
    sources = [model_cfg.eos_token_id]
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.isfile(path):
        with open(path) as f:
            sources.append(json.load(f).get("eos_token_id"))
    for eos in sources:
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if not ids:
        raise ValueError(
            "no stop token: the tokenizer, config.json and generation_config.json name no EOS "
            "id; set sample.stop_token_ids"
        )
    return tuple(sorted(ids))
