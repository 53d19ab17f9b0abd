"""The TTRL job: `python -m ttrl_jax.run [--config X.yaml] [--mesh DxM] [--resume] [key=value ...]`.

With no arguments it runs the built-in CPU default (configs/toy.yaml: the tiny model shipped in
ttrl_jax/toy/model on the synthetic unlabeled test split). Each step samples n_vote responses
per prompt (or, with ttrl.vote_rule lead | posterior, samples in rounds until each prompt's vote
is settled), turns their final answers into ids on the host, and runs the compiled TTRL step;
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
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config, ConfigError
from ttrl_jax.hf import export as hf_export
from ttrl_jax.run import baseline as baseline_lib
from ttrl_jax.run import checkpoint as checkpoint_lib
from ttrl_jax.run import evaluate as evaluate_lib
from ttrl_jax.run import judge as judge_lib
from ttrl_jax.run import logbook as logbook_lib
from ttrl_jax.run import preemption, setup
from ttrl_jax.run import rundir as rundir_lib
from ttrl_jax.run import signals as signals_lib
from ttrl_jax.run import step as step_lib


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


def run(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) a TTRL job and returns its summary.

    Args:
      cfg: the resolved configuration (see ttrl_jax/config/schema.py and configs/).

    Returns:
      dict with the evaluation before and after training and the last train metrics.

    Raises:
      preemption.Stopped: SIGTERM or SIGINT stopped the run after saving a checkpoint.
      TrainingDiverged: a loss, gradient or parameter became non-finite (nothing of it saved).
      checkpoint.CheckpointError: the final checkpoint could not be written.
    """
    out_dir = cfg.run.out_dir
    with rundir_lib.lock(out_dir), preemption.StopRequests() as stop:
        judge_box: list[judge_lib.Judge] = []  # the judge names the kept step to the manager
        ckpt = checkpoint_lib.Checkpointer(
            os.path.join(out_dir, "checkpoints"),
            keep=cfg.run.keep_checkpoints,
            kept=lambda: _kept_steps(cfg, judge_box),
        )
        try:
            resume = _check_start(cfg, ckpt)
            job = setup.build(cfg)
            steps_done, record = _restore(job, ckpt, out_dir) if resume else (0, {})
            rundir_lib.save_config(cfg)  # once the checkpoint is accepted (e.g. its base)
            loop = _Loop(job, ckpt, stop, steps_done, record)
            judge_box.append(loop.judge)
            loop.train()
        except BaseException:
            ckpt.close(quiet=True)  # the error in flight is the one to report
            raise
        ckpt.close()
        loop.finish()
        return _summarize(loop.logbook, out_dir, job.task.name)


class _Loop:
    """A run's loop from `steps_done` on: train steps, evaluations and their label-free
    judgement, checkpoints; then the kept policy, its export and the token-matched baseline."""

    def __init__(self, job: setup.Job, ckpt, stop, steps_done: int, record: dict):
        cfg = job.cfg
        self.job, self.cfg, self.ckpt, self.stop = job, cfg, ckpt, stop
        self.steps_done, self.root = steps_done, jax.random.key(cfg.run.seed)
        self.eval_pending = bool(record.get("eval_pending", False))
        numbers = {
            i: signals_lib.question_numbers(it["prompt"]) for i, it in enumerate(job.task.items)
        }
        self.tracker = signals_lib.Tracker(record.get("tracker"), numbers)
        r = cfg.run
        self.judge = judge_lib.Judge(
            r.stop_rule, r.stop_patience, r.min_score_gain, r.max_echo_rise,
            state=record.get("judge"),
        )  # fmt: skip
        self.guard = judge_lib.CollapseGuard(
            r.collapse_guard, r.collapse_entropy, state=record.get("guard")
        )
        self._set_lr_scale()
        self.tokens = int(record.get("tokens", 0))  # sampled so far, training and evaluation
        self.total = steps_done if self.judge.stopped else job.total_steps
        self.logbook = logbook_lib.Logbook(
            cfg.run.out_dir,
            keep_upto=steps_done or None,
            tensorboard=cfg.run.tensorboard,
            wandb_project=cfg.run.wandb_project if cfg.run.wandb else None,
            config=config_lib.config_to_dict(cfg),
        )
        self.last_eval: dict[str, float] = {}
        self.progress = None

    def train(self) -> None:
        cfg, job = self.cfg, self.job
        if self.judge.stopped:
            print(f"the run ended at step {self.steps_done}: {self.judge.stopped}", flush=True)
            return
        if cfg.eval.before_training and self.steps_done == 0:
            self.evaluate(0)
        if self.eval_pending:  # a signal stopped the run before the eval due at its last step
            self.evaluate(self.steps_done)
        cadence = checkpoint_lib.Cadence(
            cfg.run.checkpoint_every, cfg.run.checkpoint_minutes, self.total
        )
        self.progress = _progress(self.total, self.steps_done)
        for step in range(self.steps_done, self.total):
            metrics, votes = step_lib.ttrl_step(job, self.root, step)
            done = step + 1
            self.tokens += int(metrics["sample_tokens"])
            metrics.update(self.tracker.observe(votes, "train"))
            self.logbook.log(done, metrics)
            self.logbook.answers(done, "train", votes)
            _check_finite(metrics, done, self.ckpt)
            signum = self.stop.requested()
            eval_due = done == self.total or _every(done, cfg.eval.every_steps)
            # A signal saves before the eval due at this step (the resumed run runs it); one
            # that comes during the eval stops the run after it, not after another step.
            evaluated = eval_due and not signum
            verdict = self.evaluate(done) if evaluated else None
            if evaluated:
                signum = self.stop.requested()
            ended = verdict is not None and verdict.stop
            if signum or ended or cadence.due(done) or self._newly_kept(verdict):
                final = done == self.total or bool(signum) or ended
                self.save(done, final, eval_pending=eval_due and not evaluated)
                cadence.saved()
            _advance(self.progress, metrics, self.last_eval, cfg.eval.k)
            if signum:
                raise preemption.Stopped(signum, _stop_message(signum, done, self.ckpt))
            if ended:
                print(f"stopped after step {done} by run.stop_rule: {verdict.reason}", flush=True)
                self.total = done
                break
        if self.progress is not None:
            self.progress.close()

    def evaluate(self, done: int) -> judge_lib.Verdict | None:
        """Evaluates the current policy; the judge scores it from its label-free signals (when
        the base model was evaluated: without it there is no score, and config/load.py refuses the
        rules that need one)."""
        cfg, job = self.cfg, self.job
        key = jax.random.fold_in(self.root, step_lib.EVAL)
        result, votes = evaluate_lib.evaluate_tasks(
            job.generator, job.sample_params(), job.eval_tasks, key, cfg.eval, cfg.ttrl,
            cfg.data.batch_prompts,
        )  # fmt: skip
        found = self.tracker.observe(votes, "eval", is_base=done == 0)
        result.update({f"eval/{k}": v for k, v in found.items()})
        verdict = self.judge.observe(done, found) if judge_lib.SCORE in found else None
        if verdict is not None:
            result.update({"eval/score": verdict.score, "eval/best_step": verdict.best_step})
        action = self.guard.observe(done, found)
        if action and verdict is not None:
            self._guard(done, action, verdict.best_step)
            result.update(
                {"guard/lr_scale": self.guard.lr_scale, "guard/rollback": action == "rollback"}
            )
        self.tokens += int(result["eval/sample_tokens"])  # the trained task's (not extra ones)
        self.logbook.log(done, result, kind="eval")
        self.logbook.answers(done, "eval", votes)
        self.last_eval = result
        if done == 0 and self.cfg.run.keep == "best":
            self.save(0, final=False, eval_pending=False)  # the base model may be the one kept
        return verdict

    def _set_lr_scale(self) -> None:
        parts = self.job.parts
        hyper = parts.hyper.replace(lr_scale=jnp.asarray(self.guard.lr_scale, jnp.float32))
        self.job.parts = dataclasses.replace(parts, hyper=hyper)

    def _guard(self, done: int, action: str, best: int) -> None:
        """The collapse guard's action after the evaluation of step `done`."""
        what = f"learning rate x{self.guard.lr_scale:g}"
        if action == "rollback" and best != done:
            self.job.state, _ = self.ckpt.restore_step(
                best, checkpoint_lib.abstract_like(self.job.state)
            )
            what = f"policy back to step {best}, " + what
        self._set_lr_scale()
        print(f"step {done}: the answers have collapsed (run.collapse_guard): {what}", flush=True)

    def _newly_kept(self, verdict: judge_lib.Verdict | None) -> bool:
        best = self.cfg.run.keep == "best"
        return verdict is not None and best and verdict.best_step == verdict.step

    def save(self, done: int, final: bool, eval_pending: bool) -> None:
        """Checkpoints step `done`; a failed periodic save warns and training goes on."""
        record = {
            "steps_done": done,
            "seed": self.cfg.run.seed,
            "eval_pending": eval_pending,
            "tracker": self.tracker.state(),
            "judge": self.judge.state(),
            "tokens": self.tokens,
            "guard": self.guard.state(),
        }
        if self.job.base_fingerprint is not None:  # LoRA: the base the adapters belong to
            record["base_fingerprint"] = self.job.base_fingerprint
        try:
            self.ckpt.save(done, self.job.state, record)
            if final:
                self.ckpt.wait()
        except checkpoint_lib.CheckpointError as e:
            if final:
                raise
            print(f"warning: {e}; training goes on, the next save retries", flush=True)

    def finish(self) -> None:
        """The kept policy into the job's state, its HF export, the token-matched baseline."""
        cfg = self.cfg
        kept = _kept_steps(cfg, [self.judge])
        step = kept[0] if kept else self.total
        why = self._why_kept(step) if kept else ""
        if step != self.total:
            self.job.state, _ = self.ckpt.restore_step(
                step, checkpoint_lib.abstract_like(self.job.state)
            )
            print(f"kept step {step} (run.keep=best): {why}", flush=True)
        result = {"kept_step": step, "kept_why": why, "stopped": self.judge.stopped or ""}
        self.logbook.log(self.total, result, kind="result")
        if cfg.run.export_hf or cfg.run.export_peft:
            _export(self.job, cfg, self.ckpt)
        if cfg.run.baseline and not self.logbook.has_kind("baseline"):
            self.baseline()
        self.logbook.close()

    def _why_kept(self, step: int) -> str:
        scores = dict(self.judge.scores)
        last = max(scores)
        what = "the base model" if step == 0 else f"step {step}"
        excluded = self.judge.excluded
        why = ""
        if excluded:
            first = min(excluded)
            why = f"; {len(excluded)} evaluations excluded from step {first}: {excluded[first]}"
        return (
            f"{what} has the highest label-free score, {scores[step]:.3f} "
            f"(last evaluation, step {last}: {scores[last]:.3f}){why}"
        )

    def baseline(self) -> None:
        """The base model's majority vote at the run's sampled tokens (baseline.py)."""
        cfg, job = self.cfg, self.job
        e = cfg.eval
        base = baseline_lib.matched_vote(
            job.generator, job.base_params(), job.task.prompt_ids, job.task.golds,
            jax.random.fold_in(self.root, step_lib.BASELINE), self.tokens, round_votes=e.k,
            temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
            batch_prompts=min(cfg.data.batch_prompts, len(job.task.prompt_ids)),
            answer_mode=cfg.ttrl.answer_mode, timeout_s=cfg.ttrl.answer_timeout_s,
            last_number_fallback=cfg.ttrl.last_number_fallback,
        )  # fmt: skip
        metrics = dict(base.metrics, **{"base_maj@N/n_votes": base.n_votes})
        metrics.update({"base_maj@N/tokens": base.tokens, "run_tokens": self.tokens})
        self.logbook.log(self.total, metrics, kind="baseline")
        self.logbook.answers(self.total, "baseline", base.votes)


def _kept_steps(cfg: Config, judges: list[judge_lib.Judge]) -> list[int]:
    """The step a run keeps besides its newest checkpoints: the judge's best (run.keep=best)."""
    if cfg.run.keep != "best" or not judges or judges[0].best_step is None:
        return []
    return [judges[0].best_step]


class TrainingDiverged(RuntimeError):
    """A loss, gradient or parameter became non-finite."""


def _check_start(cfg: Config, ckpt: checkpoint_lib.Checkpointer) -> bool:
    """Whether the run resumes; refuses to overwrite a run, or to resume it changed."""
    steps = ckpt.all_steps()
    if steps and not cfg.run.resume:
        raise FileExistsError(
            f"{cfg.run.out_dir} already holds a run (checkpoint step {steps[-1]}); pass "
            "--resume to continue it, or choose another run.out_dir"
        )
    if cfg.run.resume and not steps:
        print(f"nothing to resume in {cfg.run.out_dir} (no checkpoint): starting at step 0")
    if cfg.run.resume and steps:
        rundir_lib.check_resume_config(cfg)
    return bool(cfg.run.resume and steps)


def _restore(job: setup.Job, ckpt: checkpoint_lib.Checkpointer, out_dir: str) -> tuple[int, dict]:
    """Loads the newest intact checkpoint into the job; the steps it had done (0 if none), and
    its record (whether the eval due at its last step is still to run, the signals' memory)."""
    found = ckpt.restore_latest(checkpoint_lib.abstract_like(job.state))
    if found is None:
        print(f"no intact checkpoint in {out_dir}: starting at step 0", flush=True)
        return 0, {}
    state, record, steps_done = found
    checkpoint_lib.check_base(record, job.base_fingerprint, steps_done)
    job.state = state
    print(f"resumed from {out_dir} at step {steps_done}", flush=True)
    return steps_done, record


def _check_finite(metrics: dict[str, float], done: int, ckpt) -> None:
    bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(metrics[k])]
    if bad:
        newest = ckpt.latest_step()
        kept = f"checkpoint step {newest} is kept" if newest else "no checkpoint was saved"
        raise TrainingDiverged(
            f"step {done}: {', '.join(f'{k}={metrics[k]}' for k in bad)} is not finite; nothing "
            f"of this step was saved ({kept}). Lower optim.lr, or check the model's weights"
        )


def _stop_message(signum: int, done: int, ckpt) -> str:
    name = signal.Signals(signum).name
    return (
        f"stopped by {name} after step {done}: checkpoint saved in {ckpt.directory}; "
        "continue with --resume"
    )


def _export(job: setup.Job, cfg: Config, ckpt) -> None:
    """run.export_hf: the policy as an HF folder (with LoRA, merged); run.export_peft: the
    adapters as a PEFT folder."""
    path = setup.export_dir(cfg)
    try:
        if cfg.run.export_hf:
            hf_export.save_hf(job.trained_params(), job.model_cfg, path, job.tokenizer,
                              overwrite=True)  # fmt: skip
        if cfg.run.export_peft:
            path = setup.peft_dir(cfg)
            hf_export.save_peft(job.state.params, job.model_cfg, path,
                                base_model=cfg.model.name_or_path, overwrite=True)  # fmt: skip
    except Exception as e:
        raise OSError(
            f"HF export to {path} failed ({checkpoint_lib._reason(e)}); the trained state is in "
            f"checkpoint step {ckpt.latest_step()}: free space, then rerun with --resume to export"
        ) from None


def _every(done: int, period: int) -> bool:
    return bool(period) and done % period == 0


def _summarize(logbook: logbook_lib.Logbook, out_dir: str, title: str) -> dict[str, Any]:
    """Curves, summary.md and the printed table, from the records of the whole run."""
    if jax.process_count() > 1:
        # Process 0 wrote the records; the others read them from the shared run.out_dir.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ttrl logs written")
    records = logbook_lib.read_records(logbook.path)
    result, table = logbook_lib.summary(records, logbook_lib.read_records(logbook.answers_path))
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
    }
    if "label_accuracy" in metrics:
        post["label_acc"] = f"{metrics['label_accuracy']:.2f}"
    if f"eval/avg@{k}" in last_eval:
        post["pass@1"] = f"{last_eval[f'eval/avg@{k}']:.3f}"
    progress.set_postfix(post, refresh=False)
    progress.update(1)


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        prog="python -m ttrl_jax.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Main options (as key=value; see configs/ and ttrl_jax/config/schema.py for all):\n"
            "  model.name_or_path=Qwen/Qwen2.5-Math-1.5B   HF hub id, local folder or 'toy'\n"
            "  data.name=aime24 | amc | math500 | toy       or data.path=FILE_OR_FOLDER\n"
            "  sample.n_vote=64 sample.n_train=32 sample.temperature=1.0\n"
            "  sample.max_new_tokens=3072 optim.lr=5e-7 optim.kl_coef=0.001\n"
            "  data.batch_prompts=8 data.episodes=80 eval.every_steps=10 eval.k=16\n"
            "  ttrl.reward=majority | soft_frequency | self_certainty | evol_novelty\n"
            "  run.out_dir=runs/x run.seed=0 run.max_steps=N run.export_hf=true\n"
            "  model.lora.rank=16 model.lora.alpha=32   LoRA adapters on a frozen base\n"
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
    cfg = config_lib.load_config(
        args.config or config_lib.default_config_path(), overrides, jax.device_count()
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> None:
    maybe_initialize_distributed()
    try:
        cfg, _ = parse_args(argv)
        run(cfg)
    except preemption.Stopped as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (TrainingDiverged, checkpoint_lib.CheckpointError, rundir_lib.RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
