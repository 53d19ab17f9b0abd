"""The token-matched baseline: the base model's own majority vote at the TTRL run's compute.

TTRL spends sampled tokens (its training rollouts and its evaluations) to lift one response's
accuracy. The alternative a user always has is to spend the same tokens on voting with the
base model: maj@N with N chosen so that the base model's sampled tokens equal the run's. A run
that does not beat that vote bought nothing with its updates. `matched_vote` draws it, in
rounds of k responses per prompt until the run's tokens are spent (the last round sized to
land on them), and clusters each prompt's N answers together.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.grading import clustering, verifier
from ttrl_jax.grading.answers import extract_answer
from ttrl_jax.run import evaluate as evaluate_lib
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.run import signals as signals_lib
from ttrl_jax.sampling import token_draw


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The base model's vote over N responses per prompt."""

    n_votes: int  # N
    tokens: int  # sampled by the baseline
    metrics: dict[str, float]  # label-free signals; maj@N / avg@N / pass@N where gold exists
    votes: signals_lib.Votes


def matched_vote(
    generator: rollout_lib.Generator,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    golds: Sequence[str | None],
    key: jax.Array,
    run_tokens: int,
    *,
    round_votes: int = 16,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 3072,
    batch_prompts: int = 8,
    answer_mode: str = "math",
    timeout_s: float = verifier.DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
    progress: bool = True,
) -> Baseline:
    """The base model's maj@N on `prompt_ids`, its sampled tokens matched to `run_tokens`.

    Args:
      generator, params: the sampler and the base model's params (sampling layout).
      prompt_ids, golds: the task's prompts; golds (None where unknown) only for the metrics.
      key: PRNG key of the baseline's stream.
      run_tokens: the TTRL run's sampled tokens (training and evaluation).
      round_votes: responses per prompt per round (the last round may draw fewer).
      temperature, top_p, max_new_tokens: the run's evaluation sampling.
      batch_prompts: prompts per sampler call (the last call is padded, as in evaluation).
      answer_mode, timeout_s, last_number_fallback: answer extraction settings.
      progress: a bar over the tokens to spend (process 0).

    Returns:
      Baseline with N, the tokens sampled and the vote's metrics.
    """
    sampling = token_draw.SamplingParams.make(temperature=temperature, top_p=top_p)
    P = len(prompt_ids)
    answers_P: list[list[str | None]] = [[] for _ in range(P)]
    length_P: list[list[int]] = [[] for _ in range(P)]
    entropy_P: list[list[float]] = [[] for _ in range(P)]
    tokens, n, round_index = 0, round_votes, 0
    bar = _bar(run_tokens, progress)
    while n > 0:
        for b, start in enumerate(range(0, P, batch_prompts)):
            chunk = list(prompt_ids[start : start + batch_prompts])
            real = len(chunk)
            chunk += [chunk[0]] * (batch_prompts - real)
            call_key = jax.random.fold_in(jax.random.fold_in(key, round_index), b)
            gen = generator(params, chunk, call_key, sampling, n, max_new_tokens)
            answers = _all_answers(gen, answer_mode, last_number_fallback)
            mask_PNR = np.asarray(gen.rollout.mask_PNR)
            entropy_PN = sharding_lib.gather_rows(
                (np.asarray(gen.rollout.entropy_PNR) * mask_PNR).sum(-1)
                / np.maximum(mask_PNR.sum(-1), 1)
            )
            for p in range(real):
                answers_P[start + p] += answers[p]
                length_P[start + p] += gen.length_PN[p].tolist()
                entropy_P[start + p] += entropy_PN[p].tolist()
            drawn = int(gen.length_PN[:real].sum())
            tokens += drawn
            if bar is not None:
                bar.update(min(drawn, max(0, run_tokens - bar.n)))
        round_index += 1
        # The next round: k more each, or what lands on the run's tokens at the current length.
        per_response = tokens / (P * len(answers_P[0]))
        n = min(round_votes, math.ceil(max(0, run_tokens - tokens) / (P * per_response)))
    if bar is not None:
        bar.close()
    answer_id_PN, gold_id_P, labels_P = _cluster(answers_P, golds, answer_mode, timeout_s)
    votes = signals_lib.Votes(
        np.arange(P), answer_id_PN, labels_P, np.asarray(length_P), np.asarray(entropy_P)
    )
    N = answer_id_PN.shape[1]
    metrics = {f"base_maj@N/{k}": v for k, v in signals_lib.summarize(votes).items()}
    if (gold_id_P >= 0).any():
        scored = evaluate_lib.score(answer_id_PN, gold_id_P)
        metrics["base_maj@N/accuracy"] = scored[f"maj@{N}"]
        metrics["base_maj@N/avg"] = scored[f"avg@{N}"]
        metrics["base_maj@N/pass"] = scored[f"pass@{N}"]
    return Baseline(N, tokens, metrics, votes)


def _all_answers(gen: rollout_lib.Generation, mode: str, last_number: bool) -> list[list]:
    """Every prompt's extracted answers (each process extracts its own prompts')."""
    local = [
        json.dumps([extract_answer(t, mode, last_number) for t in texts]) for texts in gen.texts_PN
    ]
    return [json.loads(s) for s in sharding_lib.gather_strings(local)]


def _cluster(
    answers_P: list[list[str | None]], golds: Sequence[str | None], mode: str, timeout_s: float
) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Each prompt's N answers clustered together: ids, the gold's id, the clusters' names."""
    P, N = len(answers_P), len(answers_P[0])
    answer_id_PN = np.full((P, N), -1, np.int32)
    gold_id_P = np.full((P,), -1, np.int32)
    labels_P = []
    for p, answers in enumerate(answers_P):
        ids, gold_id_P[p] = clustering.cluster_answers(
            answers, golds[p], mode=mode, timeout_s=timeout_s
        )
        answer_id_PN[p] = ids
        labels_P.append(clustering.cluster_labels(answers, ids, mode))
    return answer_id_PN, gold_id_P, labels_P


def _bar(total: int, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="token-matched base vote", unit="tok", dynamic_ncols=True)
