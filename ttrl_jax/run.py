"""The TTRL job: `python -m ttrl_jax.run [--config X.yaml] [--mesh DxM] [--resume] [key=value ...]`.

With no arguments it runs the built-in CPU default (configs/toy.yaml: the tiny model shipped in
ttrl_jax/toy/model on the synthetic unlabeled test split). Each step samples n_vote responses
per prompt, turns their final answers into ids on the host, and runs the compiled TTRL step;
gold labels are used only for metrics.

Multi-host (a TPU pod slice, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
set): every process runs this same program on its own devices of one global mesh. It owns the
prompt groups whose rows live on its devices, decodes and scores only those (rollout.py), and
the train step takes global arrays built from each process's rows. Checkpoints and the HF
export are collective; only process 0 writes logs, curves and the summary. run.out_dir must be
one folder that every process sees (as orbax needs for the checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttrl_jax import checkpoint as checkpoint_lib
from ttrl_jax import config as config_lib
from ttrl_jax import data as data_lib
from ttrl_jax import evaluate as evaluate_lib
from ttrl_jax import logbook as logbook_lib
from ttrl_jax import rollout as rollout_lib
from ttrl_jax import sampler as sampler_lib
from ttrl_jax import sharding as sharding_lib
from ttrl_jax import train as train_lib
from ttrl_jax import weights

# Streams of the root key: each purpose folds its own constant, then the step.
_SAMPLE, _SELECT, _EVAL = 1, 2, 3


def response_bucket(longest: int, max_new_tokens: int) -> int:
    """Train-step response length: the smallest quarter of max_new_tokens that holds `longest`.

    Rollouts are trimmed to it so short responses do not pay for the full budget, at the cost
    of at most four compiled train steps.
    """
    quarter = -(-max_new_tokens // 4)
    return min(max_new_tokens, max(1, -(-longest // quarter)) * quarter)


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one (TPU pod or explicit)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # Cloud TPU pod slice: discovered from the TPU metadata


@dataclasses.dataclass
class Task:
    """The prompts of one benchmark, tokenized."""

    name: str
    items: list[dict[str, Any]]
    prompt_ids: list[list[int]]

    @property
    def golds(self) -> list[str | None]:
        return [it.get("answer") for it in self.items]


def load_task(name_or_path: str, tokenizer, cfg: config_lib.Config) -> Task:
    items = data_lib.load_benchmark(name_or_path, cfg.data.split)
    prompt_ids, items, _ = data_lib.build_prompts(
        items, tokenizer, cfg.data.system_prompt, cfg.data.max_prompt_tokens,
        cfg.data.skip_long_prompts, cfg.data.enable_thinking,
    )  # fmt: skip
    if not items:
        raise ValueError(f"{name_or_path}: no prompt fits data.max_prompt_tokens")
    return Task(name_or_path, items, prompt_ids)


def run(cfg: config_lib.Config) -> dict[str, Any]:
    """Runs (or resumes) a TTRL job and returns its summary.

    Args:
      cfg: the resolved configuration (see ttrl_jax/config.py and configs/).

    Returns:
      dict with the evaluation before and after training and the last train metrics.
    """
    out_dir = cfg.run.out_dir
    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(out_dir, "checkpoints"), keep=cfg.run.keep_checkpoints
    )
    if ckpt.latest_step() is not None and not cfg.run.resume:
        raise FileExistsError(
            f"{out_dir} already holds a run (checkpoint step {ckpt.latest_step()}); pass "
            "--resume to continue it, or choose another run.out_dir"
        )
    mesh = sharding_lib.make_mesh(cfg.mesh.shape)
    config_lib.validate_config(cfg, data_axis_size=mesh.shape["data"])
    rollout_lib.process_rows(mesh, cfg.data.batch_prompts)  # a multi-host layout error, early
    if jax.process_index() == 0:
        config_lib.save_config(cfg, os.path.join(out_dir, "config.yaml"))

    # Model and tokenizer, params straight into the train layout.
    folder = weights.resolve_folder(
        config_lib.resolve_model_path(cfg.model.name_or_path), cfg.model.revision
    )
    model_cfg, params = weights.load_hf(
        folder, mesh=mesh, rules=sharding_lib.TRAIN_RULES,
        param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat,
    )  # fmt: skip
    config_lib.check_context_length(cfg, model_cfg.max_position_embeddings)
    tokenizer = weights.load_tokenizer(folder)
    weights.check_tokenizer(tokenizer, model_cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = rollout_lib.Generator(
        model_cfg, tokenizer,
        rollout_lib.stop_token_ids(tokenizer, model_cfg, str(folder), cfg.sample.stop_token_ids),
        pad_id, tuple(cfg.sample.prompt_buckets), mesh,
    )  # fmt: skip

    # Data: the unlabeled prompts, in a seeded order per episode.
    task = load_task(cfg.data.path or cfg.data.name, tokenizer, cfg)
    eval_tasks = [task] + [load_task(b, tokenizer, cfg) for b in cfg.eval.benchmarks]
    for t in eval_tasks:
        rollout_lib.process_rows(mesh, _eval_batch_prompts(cfg, t))
    schedule = data_lib.PromptSchedule(
        len(task.items), cfg.data.batch_prompts, cfg.data.episodes, cfg.run.seed,
        cfg.data.shuffle, cfg.data.last_batch,
    )  # fmt: skip
    total_steps = min(schedule.total_steps, cfg.run.max_steps or schedule.total_steps)

    # Optimizer, state, the compiled step.
    o = cfg.optim
    n_mini = cfg.data.batch_prompts // o.mini_batch_prompts
    tx, lr_fn = train_lib.make_optimizer(
        o.lr, total_steps * n_mini, o.warmup_ratio, o.min_lr_ratio, o.b1, o.b2, o.eps,
        o.weight_decay, o.grad_clip, o.schedule,
    )  # fmt: skip
    state_sh = train_lib.state_shardings(model_cfg, tx, mesh)
    param_sh = sharding_lib.param_shardings(model_cfg, mesh, sharding_lib.TRAIN_RULES)
    sample_sh = sharding_lib.param_shardings(model_cfg, mesh, sharding_lib.SAMPLE_RULES)
    use_kl = o.kl_coef > 0
    ref_params = jax.tree.map(jnp.copy, params) if use_kl else None
    state = jax.jit(lambda p: train_lib.init_state(p, tx), out_shardings=state_sh)(params)
    del params
    steps_done = 0
    if cfg.run.resume and ckpt.latest_step() is not None:
        state, record, steps_done = ckpt.restore(checkpoint_lib.abstract_like(state))
        print(f"resumed from {out_dir} at step {steps_done}", flush=True)
    step_cfg = train_lib.StepConfig(
        n_train=cfg.sample.n_train, mini_batch_prompts=o.mini_batch_prompts,
        micro_batch_rows=o.micro_batch_size or 0, reward=cfg.ttrl.reward,
        random_select=cfg.ttrl.select == "random", use_kl=use_kl,
        use_entropy_bonus=o.entropy_coef != 0, dual_clip=o.dual_clip,
        ettrl=cfg.ttrl.ettrl_alpha != 0,
    )  # fmt: skip
    step_fn = train_lib.build_train_step(
        model_cfg, step_cfg, tx, lr_fn, mesh, state_sh, param_sh if use_kl else None
    )
    hyper = train_lib.StepHyper.make(
        temperature=cfg.sample.temperature, clip_low=o.clip_low, clip_high=o.clip_high,
        kl_coef=o.kl_coef, entropy_coef=o.entropy_coef,
        min_majority_ratio=cfg.ttrl.min_majority_ratio, ettrl_alpha=cfg.ttrl.ettrl_alpha,
    )  # fmt: skip
    s = cfg.sample
    sampling = sampler_lib.SamplingParams.make(s.temperature, s.top_p, s.top_k, s.min_p)

    root = jax.random.key(cfg.run.seed)
    logbook = logbook_lib.Logbook(
        out_dir, keep_upto=steps_done if cfg.run.resume else None,
        tensorboard=cfg.run.tensorboard,
        wandb_project=cfg.run.wandb_project if cfg.run.wandb else None,
        config=config_lib.config_to_dict(cfg),
    )  # fmt: skip

    def run_eval(done: int) -> dict[str, float]:
        sample_params = sharding_lib.reshard(state.params, sample_sh)
        result = {}
        for t in eval_tasks:
            m = evaluate_lib.evaluate(
                generator, sample_params, t.prompt_ids, t.golds,
                jax.random.fold_in(root, _EVAL), k=cfg.eval.k,
                temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                max_new_tokens=cfg.eval.max_new_tokens, greedy=cfg.eval.greedy,
                batch_prompts=_eval_batch_prompts(cfg, t),
                answer_mode=cfg.ttrl.answer_mode, timeout_s=cfg.ttrl.answer_timeout_s,
            )  # fmt: skip
            prefix = "eval/" if t is task else f"eval_{os.path.basename(t.name)}/"
            result.update({prefix + k: v for k, v in m.items()})
        logbook.log(done, result, kind="eval")
        return result

    has_gold = any(g is not None for g in task.golds)
    last_eval: dict[str, float] = {}
    if has_gold and cfg.eval.before_training and steps_done == 0:
        last_eval = run_eval(0)
    progress = _progress(total_steps, steps_done)
    for step in range(steps_done, total_steps):
        t0 = time.perf_counter()
        idx = schedule.batch_indices(step)
        gen = generator(
            sharding_lib.reshard(state.params, sample_sh), [task.prompt_ids[i] for i in idx],
            jax.random.fold_in(jax.random.fold_in(root, _SAMPLE), step), sampling,
            s.n_vote, s.max_new_tokens,
        )  # fmt: skip
        t_sample = time.perf_counter()
        # Each process scores its own prompts; the ids (and lengths) of all come back to all.
        answer_id_PN, gold_id_P = rollout_lib.answer_ids(
            gen, [task.golds[i] for i in idx], mode=cfg.ttrl.answer_mode,
            timeout_s=cfg.ttrl.answer_timeout_s,
        )  # fmt: skip
        length_PN = rollout_lib.gather_rows(gen.rollout.length_PN)
        finish_PN = rollout_lib.gather_rows(gen.rollout.finish_PN)
        t_reward = time.perf_counter()
        R = response_bucket(int(length_PN.max()), s.max_new_tokens)
        batch = _step_batch(gen, answer_id_PN[gen.prompts], gold_id_P[gen.prompts], R)
        if jax.process_count() > 1:
            batch = rollout_lib.global_rows(batch, mesh)
        key = jax.random.fold_in(jax.random.fold_in(root, _SELECT), step)
        state, metrics = step_fn(state, ref_params, batch, key, hyper)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t_end = time.perf_counter()
        metrics.update(
            episode=schedule.position(step)[0], time_sample=t_sample - t0,
            time_reward=t_reward - t_sample, time_train=t_end - t_reward,
            sample_tokens_per_s=int(length_PN.sum()) / (t_sample - t0),
            truncated=float((finish_PN == sampler_lib.FINISH_LENGTH).mean()),
        )  # fmt: skip
        done = step + 1
        logbook.log(done, metrics)
        if has_gold and (
            done == total_steps or (cfg.eval.every_steps and done % cfg.eval.every_steps == 0)
        ):
            last_eval = run_eval(done)
        if done == total_steps or (
            cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0
        ):
            ckpt.save(done, state, {"steps_done": done, "seed": cfg.run.seed})
        _advance(progress, metrics, last_eval, cfg.eval.k)
    ckpt.close()
    if progress is not None:
        progress.close()

    if cfg.run.export_hf:
        weights.save_hf(
            state.params, model_cfg, os.path.join(out_dir, "hf"), tokenizer, overwrite=True
        )
    logbook.close()
    if jax.process_count() > 1:
        # Process 0 wrote the records; the others read them from the shared run.out_dir.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ttrl logs written")
    records = logbook_lib.read_records(logbook.path)
    result, table = logbook_lib.summary(records)
    if jax.process_index() == 0:
        logbook_lib.plot_curves(
            records, os.path.join(out_dir, "curves.png"), title=f"TTRL: {task.name}"
        )
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(table + "\n")
        print(table, flush=True)
        print(f"outputs in {out_dir}: metrics.jsonl, curves.png, summary.md", flush=True)
    return result


def _eval_batch_prompts(cfg: config_lib.Config, t: Task) -> int:
    return min(cfg.data.batch_prompts, len(t.prompt_ids))


def _step_batch(gen: rollout_lib.Generation, answer_id_PN, gold_id_P, R: int):
    """Host arrays for the train step (this process's prompts), responses trimmed to R tokens."""
    r = gen.rollout
    return train_lib.StepBatch(
        prompt_PT=gen.prompt_PT, prompt_mask_PT=gen.prompt_mask_PT,
        response_PNR=np.asarray(r.tokens_PNR)[..., :R],
        response_mask_PNR=np.asarray(r.mask_PNR)[..., :R],
        logp_PNR=np.asarray(r.logp_PNR)[..., :R],
        entropy_PNR=np.asarray(r.entropy_PNR)[..., :R],
        answer_id_PN=answer_id_PN.astype(np.int32), gold_id_P=gold_id_P.astype(np.int32),
    )  # fmt: skip


def _progress(total: int, done: int):
    if jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="TTRL", unit="step", dynamic_ncols=True)


def _advance(progress, metrics: dict, last_eval: dict, k: int) -> None:
    if progress is None:
        return
    post = {
        "reward": f"{metrics['reward_mean']:.2f}",
        "maj_ratio": f"{metrics['majority_ratio']:.2f}",
        "label_acc": f"{metrics['label_accuracy']:.2f}",
    }
    if f"eval/avg@{k}" in last_eval:
        post["pass@1"] = f"{last_eval[f'eval/avg@{k}']:.3f}"
    progress.set_postfix(post, refresh=False)
    progress.update(1)


def parse_args(argv: Sequence[str] | None) -> tuple[config_lib.Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        prog="python -m ttrl_jax.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Main options (as key=value; see configs/ and ttrl_jax/config.py for all):\n"
            "  model.name_or_path=Qwen/Qwen2.5-Math-1.5B   HF hub id, local folder or 'toy'\n"
            "  data.name=aime24 | amc | math500 | toy       or data.path=FILE_OR_FOLDER\n"
            "  sample.n_vote=64 sample.n_train=32 sample.temperature=1.0\n"
            "  sample.max_new_tokens=3072 optim.lr=5e-7 optim.kl_coef=0.001\n"
            "  data.batch_prompts=8 data.episodes=80 eval.every_steps=10 eval.k=16\n"
            "  ttrl.reward=majority | soft_frequency | self_certainty | evol_novelty\n"
            "  run.out_dir=runs/x run.seed=0 run.max_steps=N run.export_hf=true\n"
        ),
    )
    ap.add_argument("--config", default=None, help="YAML file (default: configs/toy.yaml)")
    ap.add_argument("--mesh", default=None, help="device mesh DxM (data x model) or 'auto'")
    ap.add_argument("--resume", action="store_true", help="continue the run in run.out_dir")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.mesh is not None:
        overrides.append(f"mesh.shape={args.mesh}")
    if args.resume:
        overrides.append("run.resume=true")
    cfg = config_lib.load_config(args.config or config_lib.default_config_path(), overrides)
    return cfg, args


def main(argv: Sequence[str] | None = None) -> None:
    maybe_initialize_distributed()
    try:
        cfg, _ = parse_args(argv)
        run(cfg)
    except (config_lib.ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
