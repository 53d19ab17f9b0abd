"""Evaluation: avg@k (the paper's pass@1), maj@k, pass@k and greedy accuracy on a benchmark.

The command `python -m ttrl_jax.evaluate` (ttrl_jax/evaluate.py) runs it on a checkpoint.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ttrl_jax.config.schema import EvalSection, TTRLSection
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.grading import verifier
from ttrl_jax.rl import vote
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.run import signals as signals_lib
from ttrl_jax.sampling import token_draw


def score(answer_id_PN: np.ndarray, gold_id_P: np.ndarray) -> dict[str, float]:
    """Benchmark metrics from answer ids; only prompts with a gold answer (id >= 0) count.

    avg@k: mean correctness of the k samples (the paper's pass@1, "avg@16").
    maj@k: the majority answer (ties to the first-seen, as the TTRL vote) is correct.
    pass@k: any of the k samples is correct.
    """
    answer_id_PN, gold_id_P = np.asarray(answer_id_PN), np.asarray(gold_id_P)
    has_gold_P = gold_id_P >= 0
    if not has_gold_P.any():
        raise ValueError("no prompt has a gold answer: nothing to evaluate against")
    a_PN, g_P = answer_id_PN[has_gold_P], gold_id_P[has_gold_P]
    correct_PN = a_PN == g_P[:, None]
    majority_P, ratio_P = (np.asarray(x) for x in vote.majority_vote(a_PN))
    k = a_PN.shape[1]
    return {
        f"avg@{k}": float(correct_PN.mean()),
        f"maj@{k}": float((majority_P == g_P).mean()),
        f"pass@{k}": float(correct_PN.any(1).mean()),
        "majority_ratio": float(ratio_P.mean()),
        "answered": float((a_PN >= 0).mean()),
    }


def evaluate(
    generator: rollout_lib.Generator,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    golds: Sequence[str | None],
    key: jax.Array,
    *,
    k: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 3072,
    greedy: bool = True,
    batch_prompts: int = 8,
    answer_mode: str = "math",
    timeout_s: float = verifier.DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
) -> dict[str, float]:
    """Samples k responses per prompt (and one greedy) and scores them against the golds.

    Args:
      generator: sampler + tokenizer glue (its static settings: stop ids, buckets, mesh).
      params: policy params in the sampling layout.
      prompt_ids: token ids of each prompt (chat template applied).
      golds: gold answers (None where unknown: such prompts count for the label-free signals
        only; with no gold at all there are no accuracy metrics).
      key: PRNG key (fixed across evaluations of a run, so curves compare like with like).
      k, temperature, top_p, max_new_tokens: sampling settings (paper: 16, 0.6, 0.95).
      greedy: also decode one greedy response per prompt.
      batch_prompts: prompts per sampler call; the last batch is padded with repeats of its
        first prompt (discarded) so every call has the same shape.
      answer_mode, timeout_s, last_number_fallback: answer extraction settings.

    Returns:
      The label-free signals of the k samples (signals.SIGNALS: majority_ratio, vote_margin,
      answer_entropy, distinct_answers, answered, response_length, response_entropy), the
      tokens sampled (sample_tokens, greedy included) and, over the prompts with a gold
      answer, avg@k, maj@k, pass@k and greedy accuracy when asked for.
    """
    return evaluate_votes(
        generator, params, prompt_ids, golds, key, k=k, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, greedy=greedy, batch_prompts=batch_prompts,
        answer_mode=answer_mode, timeout_s=timeout_s, last_number_fallback=last_number_fallback,
    )[0]  # fmt: skip


def evaluate_votes(
    generator: rollout_lib.Generator,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    golds: Sequence[str | None],
    key: jax.Array,
    *,
    k: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 3072,
    greedy: bool = True,
    batch_prompts: int = 8,
    answer_mode: str = "math",
    timeout_s: float = verifier.DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
    progress: bool = True,
) -> tuple[dict[str, float], signals_lib.Votes]:
    """`evaluate`, also returning the k samples' vote of every prompt (for the signals that
    compare evaluations: signals.Tracker)."""
    sampling = token_draw.SamplingParams.make(temperature=temperature, top_p=top_p)
    greedy_sampling = token_draw.SamplingParams.make(temperature=0.0)
    answers = dict(mode=answer_mode, timeout_s=timeout_s, last_number_fallback=last_number_fallback)
    found, gold_P, greedy_ok, tokens = [], [], [], 0
    n = len(prompt_ids)
    starts = range(0, n, batch_prompts)
    bar = _bar(len(starts), progress)
    for b, start in enumerate(starts):
        chunk = list(prompt_ids[start : start + batch_prompts])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_prompts - real)
        chunk_golds = list(golds[start : start + real])
        gen = generator(params, chunk, jax.random.fold_in(key, b), sampling, k, max_new_tokens)
        # With several processes each scores its own prompts; all get every prompt's ids.
        answer_PN, gold_id_P = rollout_lib.grade(gen, chunk_golds, real=real, **answers)
        found.append(rollout_lib.votes(
            gen, answer_PN, range(start, start + real), mode=answer_mode,
            last_number_fallback=last_number_fallback,
        ))  # fmt: skip
        gold_P.append(gold_id_P)
        tokens += int(gen.length_PN[:real].sum())
        if greedy:
            g = generator(params, chunk, key, greedy_sampling, 1, max_new_tokens)
            # Greedy answers join the gold's id space through one clustering call per prompt.
            g_ids, g_gold = rollout_lib.grade(g, chunk_golds, real=real, **answers)
            greedy_ok.append(np.where(g_gold >= 0, g_ids[:, 0] == g_gold, False)[g_gold >= 0])
            tokens += int(g.length_PN[:real].sum())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    votes = signals_lib.Votes.concatenate(found)
    metrics = signals_lib.summarize(votes)
    metrics["sample_tokens"] = tokens
    gold_id_P = np.concatenate(gold_P)
    if (gold_id_P >= 0).any():
        gold_metrics = score(votes.answer_id_PN, gold_id_P)
        metrics.update({m: v for m, v in gold_metrics.items() if "@" in m})
        if greedy:
            metrics["greedy"] = float(np.concatenate(greedy_ok).mean())
    return metrics, votes


def _bar(total: int, enabled: bool):
    """A progress bar over the evaluation's sampler calls (process 0 only)."""
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)


def evaluate_tasks(
    generator: rollout_lib.Generator,
    params: Any,
    tasks: Sequence[prompts_lib.Task],
    key: jax.Array,
    ev: EvalSection,
    ttrl: TTRLSection,
    batch_prompts: int,
) -> tuple[dict[str, float], signals_lib.Votes]:
    """`evaluate` on each task with a run's eval settings; keys "eval/..." for the first task
    (the one trained on), "eval_<name>/..." for the others. Also returns the first task's vote."""
    result, first = {}, None
    for i, task in enumerate(tasks):
        m, votes = evaluate_votes(
            generator, params, task.prompt_ids, task.golds, key, k=ev.k,
            temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
            greedy=ev.greedy, batch_prompts=min(batch_prompts, len(task.prompt_ids)),
            answer_mode=ttrl.answer_mode, timeout_s=ttrl.answer_timeout_s,
            last_number_fallback=ttrl.last_number_fallback,
        )  # fmt: skip
        first = first or votes
        prefix = "eval/" if i == 0 else f"eval_{os.path.basename(task.name)}/"
        result.update({prefix + k: v for k, v in m.items()})
    return result, first
