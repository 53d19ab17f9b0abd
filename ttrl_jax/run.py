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
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax

from ttrl_jax import checkpoint as checkpoint_lib
from ttrl_jax import config as config_lib
from ttrl_jax import evaluate as evaluate_lib
from ttrl_jax import job as job_lib
from ttrl_jax import logbook as logbook_lib
from ttrl_jax import rollout as rollout_lib
from ttrl_jax import sampler as sampler_lib
from ttrl_jax import weights

# Streams of the root key: each purpose folds its own constant, then the step.
_SAMPLE, _SELECT, _EVAL = 1, 2, 3


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
    job = job_lib.build(cfg)
    if jax.process_index() == 0:
        config_lib.save_config(cfg, os.path.join(out_dir, "config.yaml"))
    steps_done = 0
    if cfg.run.resume and ckpt.latest_step() is not None:
        job.state, _, steps_done = ckpt.restore(checkpoint_lib.abstract_like(job.state))
        print(f"resumed from {out_dir} at step {steps_done}", flush=True)
    s, total = cfg.sample, job.total_steps
    root = jax.random.key(cfg.run.seed)
    logbook = logbook_lib.Logbook(
        out_dir, keep_upto=steps_done if cfg.run.resume else None,
        tensorboard=cfg.run.tensorboard,
        wandb_project=cfg.run.wandb_project if cfg.run.wandb else None,
        config=config_lib.config_to_dict(cfg),
    )  # fmt: skip

    def run_eval(done: int) -> dict[str, float]:
        result = evaluate_lib.evaluate_tasks(
            job.generator, job.sample_params(), job.eval_tasks, jax.random.fold_in(root, _EVAL),
            cfg.eval, cfg.ttrl, cfg.data.batch_prompts,
        )  # fmt: skip
        logbook.log(done, result, kind="eval")
        return result

    last_eval: dict[str, float] = {}
    if job.has_gold and cfg.eval.before_training and steps_done == 0:
        last_eval = run_eval(0)
    progress = _progress(total, steps_done)
    for step in range(steps_done, total):
        t0 = time.perf_counter()
        # Sample n_vote responses per prompt with the current policy.
        idx = job.schedule.batch_indices(step)
        gen = job.generator(
            job.sample_params(), [job.task.prompt_ids[i] for i in idx],
            _stream(root, _SAMPLE, step), job.parts.sampling, s.n_vote, s.max_new_tokens,
        )  # fmt: skip
        t_sample = time.perf_counter()
        # Their final answers as ids, on the host (each process scores its own prompts).
        answer_id_PN, gold_id_P = rollout_lib.answer_ids(
            gen, [job.task.golds[i] for i in idx], mode=cfg.ttrl.answer_mode,
            timeout_s=cfg.ttrl.answer_timeout_s,
        )  # fmt: skip
        t_reward = time.perf_counter()
        # Vote, rewards, advantages and the GRPO updates: one compiled step.
        batch = gen.train_batch(answer_id_PN, gold_id_P, s.max_new_tokens, job.mesh)
        job.state, metrics = job.step_fn(
            job.state, job.ref_params, batch, _stream(root, _SELECT, step), job.parts.hyper
        )
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t_end = time.perf_counter()
        metrics.update(
            episode=job.schedule.position(step)[0], time_sample=t_sample - t0,
            time_reward=t_reward - t_sample, time_train=t_end - t_reward,
            sample_tokens_per_s=int(gen.length_PN.sum()) / (t_sample - t0),
            truncated=float((gen.finish_PN == sampler_lib.FINISH_LENGTH).mean()),
        )  # fmt: skip
        done = step + 1
        logbook.log(done, metrics)
        if job.has_gold and (done == total or _every(done, cfg.eval.every_steps)):
            last_eval = run_eval(done)
        if done == total or _every(done, cfg.run.checkpoint_every):
            ckpt.save(done, job.state, {"steps_done": done, "seed": cfg.run.seed})
        _advance(progress, metrics, last_eval, cfg.eval.k)
    ckpt.close()
    if progress is not None:
        progress.close()
    if cfg.run.export_hf:
        weights.save_hf(
            job.state.params, job.model_cfg, job_lib.export_dir(cfg), job.tokenizer,
            overwrite=True,
        )  # fmt: skip
    logbook.close()
    return _summarize(logbook, out_dir, job.task.name)


def _stream(root: jax.Array, purpose: int, step: int) -> jax.Array:
    """The key of one purpose at one step: independent of every other (purpose, step)."""
    return jax.random.fold_in(jax.random.fold_in(root, purpose), step)


def _every(done: int, period: int) -> bool:
    return bool(period) and done % period == 0


def _summarize(logbook: logbook_lib.Logbook, out_dir: str, title: str) -> dict[str, Any]:
    """Curves, summary.md and the printed table, from the records of the whole run."""
    if jax.process_count() > 1:
        # Process 0 wrote the records; the others read them from the shared run.out_dir.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ttrl logs written")
    records = logbook_lib.read_records(logbook.path)
    result, table = logbook_lib.summary(records)
    if jax.process_index() == 0:
        logbook_lib.plot_curves(
            records, os.path.join(out_dir, "curves.png"), title=f"TTRL: {title}"
        )
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(table + "\n")
        print(table, flush=True)
        print(f"outputs in {out_dir}: metrics.jsonl, curves.png, summary.md", flush=True)
    return result


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
