"""One TTRL step on the host: sample (at once, or in rounds until each vote is settled), grade
the answers, run the compiled update (rl/train.py), and gather the step's metrics and vote.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.rl import advantages, vote
from ttrl_jax.rl import train as train_lib
from ttrl_jax.rl import vote_budget as vote_budget_lib
from ttrl_jax.run import from_config, setup
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.run import signals as signals_lib
from ttrl_jax.sampling import sampler as sampler_lib

# Streams of the root key: each purpose folds its own constant, then the step.
SAMPLE, SELECT, EVAL, BASELINE = 1, 2, 3, 4


def stream(root: jax.Array, purpose: int, step: int) -> jax.Array:
    """The key of one purpose at one step: independent of every other (purpose, step)."""
    return jax.random.fold_in(jax.random.fold_in(root, purpose), step)


def ttrl_step(
    job: setup.Job, root: jax.Array, step: int
) -> tuple[dict[str, float], signals_lib.Votes]:
    """One TTRL step on the job's state: sample, score, update; returns its metrics and vote."""
    cfg, s, t = job.cfg, job.cfg.sample, job.cfg.ttrl
    budget = from_config.vote_budget(cfg)
    idx = job.schedule.batch_indices(step)
    prompts, golds = [job.task.prompt_ids[i] for i in idx], [job.task.golds[i] for i in idx]
    key, params = stream(root, SAMPLE, step), job.sample_params()
    answers = dict(
        mode=t.answer_mode,
        timeout_s=t.answer_timeout_s,
        last_number_fallback=t.last_number_fallback,
    )
    t0 = time.perf_counter()
    select_key = stream(root, SELECT, step)
    if budget.adaptive:
        # Sample in rounds, scoring each round's answers, until every prompt's vote is settled.
        # The responses the update will train on are drawn first: the ones the fixed budget
        # trains on (the step's own selection, from the same key).
        train_index_PM = np.asarray(
            advantages.select_responses(
                select_key, len(idx), s.n_vote, s.n_train, t.select == "random"
            )
        )
        voted = job.generator.vote_in_rounds(
            params, prompts, key, job.parts.sampling, budget, s.max_new_tokens, golds,
            order_PN=vote_budget_lib.draw_order(train_index_PM, s.n_vote), **answers,
        )  # fmt: skip
        gen, answer_id_PN, gold_id_P = voted.gen, voted.answer_id_PN, voted.gold_id_P
        t_reward = time.perf_counter()
        t_sample = t_reward - voted.time_reward
        groups = voted.round_groups
    else:
        # Sample n_vote responses per prompt with the current policy.
        gen = job.generator(params, prompts, key, job.parts.sampling, s.n_vote, s.max_new_tokens)
        t_sample = time.perf_counter()
        # Their final answers as ids, on the host (each process scores its own prompts).
        answer_id_PN, gold_id_P = rollout_lib.grade(gen, golds, **answers)
        t_reward = time.perf_counter()
        groups = [len(idx)]
    audit = _audit(job, gen, answer_id_PN, gold_id_P, params, prompts, golds, key, answers)
    t_audit = time.perf_counter()
    # Vote, rewards, advantages and the GRPO updates: one compiled step.
    batch = gen.train_batch(answer_id_PN, gold_id_P, s.max_new_tokens, job.mesh)
    packed_len = train_lib.packed_length(
        job.model_cfg, job.parts.step_cfg, batch, select_key, cfg.optim.pack_multiple
    )
    job.state, metrics = job.step_fn(
        job.state, job.ref_params, batch, select_key, job.parts.hyper, packed_len
    )
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if metrics.pop("packed_overflow", 0):
        raise RuntimeError(f"packed rows of {packed_len} positions overflowed (a bug: report it)")
    if not (gold_id_P >= 0).any():  # no gold label in this batch: nothing to measure against
        metrics = {k: v for k, v in metrics.items() if k not in train_lib.GOLD_METRICS}
    t_end = time.perf_counter()
    drawn_PN = vote.drawn(answer_id_PN)
    tokens = int(gen.length_PN.sum())
    metrics.update(
        episode=job.schedule.position(step)[0],
        time_sample=t_sample - t0,
        time_reward=t_reward - t_sample,
        time_train=t_end - t_audit,
        sample_tokens_per_s=tokens / (t_sample - t0),
        truncated=float((gen.finish_PN == sampler_lib.FINISH_LENGTH)[drawn_PN].mean()),
        sample_tokens=tokens,
        sample_row_steps=int(gen.rollout.row_steps),  # rounds: summed (idle rows too)
        vote_rounds=len(groups),
        vote_round_groups=groups,
        votes_saved=1.0 - float(drawn_PN.mean()),
        votes_per_prompt=vote_budget_lib.votes_drawn(answer_id_PN).tolist(),
        **audit,
    )
    if packed_len is not None:  # positions of a prompt's row in the update (T + M·R unpacked)
        metrics["packed_row_length"] = packed_len
    if audit:
        metrics["time_audit"] = t_audit - t_reward
    votes = rollout_lib.votes(
        gen, answer_id_PN, idx, mode=t.answer_mode, last_number_fallback=t.last_number_fallback
    )
    return metrics, votes


def _audit(job, gen, answer_id_PN, gold_id_P, params, prompts, golds, key, answers) -> dict:
    """With ttrl.vote_audit: the full budget drawn too (the same key, so the adaptive responses
    are its responses in the same slots), its fixed-budget vote against the adaptive one. Not
    trained on."""
    s = job.cfg.sample
    if not job.cfg.ttrl.vote_audit:
        return {}
    full = job.generator(params, prompts, key, job.parts.sampling, s.n_vote, s.max_new_tokens)
    full_id_PN, full_gold_P = rollout_lib.grade(full, golds, **answers)
    drawn_PN = vote.drawn(answer_id_PN)[gen.prompts]
    same_PN = (gen.rollout.tokens_PNR == full.rollout.tokens_PNR).all(-1) | ~drawn_PN
    out = vote_budget_lib.audit_metrics(
        answer_id_PN, gold_id_P, full_id_PN, full_gold_P, sharding_lib.gather_rows(same_PN)
    )
    full_tokens = int(full.length_PN.sum())
    out["audit/sample_tokens_full"] = full_tokens
    out["audit/tokens_saved"] = 1.0 - int(gen.length_PN.sum()) / max(full_tokens, 1)
    return out
