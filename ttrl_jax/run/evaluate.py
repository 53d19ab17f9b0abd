"""Evaluation: avg@k (the paper's pass@1), maj@k, pass@k and greedy accuracy on a benchmark.

Also a program: `python -m ttrl_jax.evaluate --model PATH_OR_ID --data NAME_OR_PATH`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ttrl_jax.config import load as config_lib
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.grading import clustering as rewards
from ttrl_jax.rl import grpo
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.run import signals as signals_lib
from ttrl_jax.sampling import sampler as sampler_lib


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
    majority_P, ratio_P = (np.asarray(x) for x in grpo.majority_vote(a_PN))
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
    timeout_s: float = rewards.DEFAULT_TIMEOUT_S,
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
    timeout_s: float = rewards.DEFAULT_TIMEOUT_S,
    last_number_fallback: bool = False,
    progress: bool = True,
) -> tuple[dict[str, float], signals_lib.Votes]:
    """`evaluate`, also returning the k samples' vote of every prompt (for the signals that
    compare evaluations: signals.Tracker)."""
    sampling = sampler_lib.SamplingParams.make(temperature=temperature, top_p=top_p)
    greedy_sampling = sampler_lib.SamplingParams.make(temperature=0.0)
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
        answer_PN, gold_id_P = rollout_lib.answer_ids(gen, chunk_golds, real=real, **answers)
        found.append(rollout_lib.votes(
            gen, answer_PN, range(start, start + real), mode=answer_mode,
            last_number_fallback=last_number_fallback,
        ))  # fmt: skip
        gold_P.append(gold_id_P)
        tokens += int(gen.length_PN[:real].sum())
        if greedy:
            g = generator(params, chunk, key, greedy_sampling, 1, max_new_tokens)
            # Greedy answers join the gold's id space through one clustering call per prompt.
            g_ids, g_gold = rollout_lib.answer_ids(g, chunk_golds, real=real, **answers)
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
    ev: config_lib.EvalSection,
    ttrl: config_lib.TTRLSection,
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


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Command line: evaluate a checkpoint on a benchmark and print the metrics as JSON."""
    args = _parse_args(argv)
    try:
        metrics = _evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    json.dump(metrics, sys.stdout, indent=1)
    print()
    return metrics


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def at_least(low: float, kind=int):
        def check(text: str):
            try:
                value = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
            if value < low:
                raise argparse.ArgumentTypeError(f"{text} must be >= {low}")
            return value

        return check

    def probability(text: str) -> float:
        value = at_least(0.0, float)(text)
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
        return value

    ap = argparse.ArgumentParser(prog="python -m ttrl_jax.evaluate", description=__doc__)
    ap.add_argument("--model", default="toy", help="HF folder, hub id, or 'toy' (built-in)")
    ap.add_argument("--data", default="toy", help="benchmark name or local file/folder")
    ap.add_argument("--k", type=at_least(1), default=16, help="samples per prompt")
    ap.add_argument("--temperature", type=at_least(0.0, float), default=0.6)
    ap.add_argument("--top-p", type=probability, default=0.95)
    ap.add_argument(
        "--max-new-tokens", type=at_least(1), default=None, help="default: model context"
    )
    ap.add_argument("--max-prompt-tokens", type=at_least(1), default=1024)
    ap.add_argument("--batch-prompts", type=at_least(1), default=8)
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--system-prompt", default=None)
    ap.add_argument(
        "--prompt-template", default="{question}",
        help="the user turn; '{question}' is replaced by the question (as data.prompt_template)",
    )  # fmt: skip
    ap.add_argument(
        "--last-number", action="store_true",
        help="a response without a boxed or stated answer answers with its last number",
    )  # fmt: skip
    ap.add_argument("--answer-mode", default="math", choices=typing.get_args(config_lib.AnswerMode))
    ap.add_argument(
        "--timeout", type=at_least(0.001, float), default=None,
        help="math-verify seconds per answer (default: as a run's ttrl.answer_timeout_s)",
    )  # fmt: skip
    ap.add_argument("--mesh", default="auto", help="DxM device mesh")
    ap.add_argument("--dtype", default="float32", choices=typing.get_args(config_lib.Dtype))
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument("--limit", type=at_least(1), default=None, help="the first LIMIT items")
    ap.add_argument(
        "--match-tokens", type=at_least(1), default=None,
        help="instead: the model's majority vote over as many responses per prompt as spend "
        "this many sampled tokens (maj@N, the token-matched baseline of a TTRL run)",
    )  # fmt: skip
    ap.add_argument(
        "--match-run", default=None,
        help="instead: the token-matched baseline of the TTRL run in this folder (its sampled "
        "tokens from metrics.jsonl), printed with the run's kept evaluation",
    )  # fmt: skip
    return ap.parse_args(argv)


def _evaluate_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    from ttrl_jax import sharding as sharding_lib
    from ttrl_jax.data import benchmarks as data_lib
    from ttrl_jax.hf import load as weights
    from ttrl_jax.run import from_config as parts_lib

    mesh = sharding_lib.make_mesh(args.mesh)
    folder = weights.resolve_folder(config_lib.resolve_model_path(args.model))
    cfg, params = weights.load_hf(
        folder, mesh=mesh, rules=sharding_lib.SAMPLE_RULES, dtype=args.dtype
    )
    tokenizer = weights.load_tokenizer(folder)
    weights.check_tokenizer(tokenizer, cfg)
    if args.prompt_template.count("{question}") != 1:
        raise ValueError(
            f"--prompt-template {args.prompt_template!r} must hold '{{question}}' exactly once"
        )
    items = data_lib.load_benchmark(args.data)[: args.limit]
    prompt_ids, items, _ = prompts_lib.build_prompts(
        items, tokenizer, args.system_prompt, args.max_prompt_tokens, skip_long=False,
        template=args.prompt_template, limit_name="--max-prompt-tokens",
        fix="raise --max-prompt-tokens",
    )  # fmt: skip
    longest = max(len(p) for p in prompt_ids)
    max_new = args.max_new_tokens or cfg.max_position_embeddings - longest
    if longest + max_new > cfg.max_position_embeddings:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + --max-new-tokens ({max_new}) exceeds the "
            f"model's context of {cfg.max_position_embeddings}; lower --max-new-tokens"
        )
    buckets = (2 ** math.ceil(math.log2(longest)),)
    generator = rollout_lib.Generator(
        cfg, tokenizer, parts_lib.stop_ids(cfg, tokenizer=tokenizer, model_dir=folder),
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        buckets, mesh,
    )  # fmt: skip
    timeout = args.timeout or config_lib.TTRLSection().answer_timeout_s
    golds, key = [it["answer"] for it in items], jax.random.key(args.seed)
    settings = dict(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=max_new,
        batch_prompts=min(args.batch_prompts, len(prompt_ids)), answer_mode=args.answer_mode,
        timeout_s=timeout, last_number_fallback=args.last_number,
    )  # fmt: skip
    if args.match_tokens or args.match_run:
        return _matched(args, generator, params, prompt_ids, golds, key, settings)
    return evaluate(
        generator, params, prompt_ids, golds, key, k=args.k, greedy=not args.no_greedy, **settings
    )


def _matched(args, generator, params, prompt_ids, golds, key, settings) -> dict[str, Any]:
    """The token-matched base vote (baseline.py): the tokens given, or a run's."""
    from ttrl_jax.run import baseline as baseline_lib
    from ttrl_jax.run import logbook as logbook_lib

    tokens, run = args.match_tokens, {}
    if args.match_run:
        records = logbook_lib.read_records(os.path.join(args.match_run, "metrics.jsonl"))
        if not records:
            raise FileNotFoundError(f"--match-run {args.match_run} holds no metrics.jsonl records")
        tokens = run_tokens(records)
        result, _ = logbook_lib.summary(records)
        run = {"run_tokens": tokens, "kept_step": result.get("kept_step")}
        run.update({f"kept/{k[5:]}": v for k, v in result.get("eval_kept", {}).items()})
    base = baseline_lib.matched_vote(
        generator, params, prompt_ids, golds, key, tokens, round_votes=args.k, **settings
    )
    return {"n_votes": base.n_votes, "tokens": base.tokens, **base.metrics, **run}


def run_tokens(records: Sequence[dict[str, Any]]) -> int:
    """A run's sampled tokens from its metrics.jsonl records: every train step's and every
    evaluation's on the trained task."""
    train = sum(r.get("sample_tokens", 0) for r in records if r.get("train"))
    return int(train + sum(r.get("eval/sample_tokens", 0) for r in records if r.get("eval")))


if __name__ == "__main__":
    main()
