"""`python -m ttrl_jax.evaluate --model PATH_OR_ID --data NAME_OR_PATH`: a checkpoint's avg@k
(the paper's pass@1), maj@k, pass@k and greedy accuracy on a benchmark, printed as JSON.

The evaluation itself is ttrl_jax/run/evaluate.py; this module loads the checkpoint, the
benchmark and the prompts, and parses the command line.
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

from ttrl_jax import sharding as sharding_lib
from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Dtype, TTRLSection
from ttrl_jax.data import benchmarks as data_lib
from ttrl_jax.data import prompts as prompts_lib
from ttrl_jax.grading.answers import AnswerMode
from ttrl_jax.hf import layout as hf_layout
from ttrl_jax.hf import load as weights
from ttrl_jax.run import baseline as baseline_lib
from ttrl_jax.run import evaluate as evaluate_lib
from ttrl_jax.run import from_config
from ttrl_jax.run import logbook as logbook_lib
from ttrl_jax.run import rollout as rollout_lib
from ttrl_jax.sampling import sampler as sampler_lib


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
        "--prompt-template",
        default="{question}",
        help="the user turn; '{question}' is replaced by the question (as data.prompt_template)",
    )
    ap.add_argument(
        "--last-number",
        action="store_true",
        help="a response without a boxed or stated answer answers with its last number",
    )
    ap.add_argument("--answer-mode", default="math", choices=typing.get_args(AnswerMode))
    ap.add_argument(
        "--timeout",
        type=at_least(0.001, float),
        default=None,
        help="math-verify seconds per answer (default: as a run's ttrl.answer_timeout_s)",
    )
    ap.add_argument("--mesh", default="auto", help="DxM device mesh")
    ap.add_argument("--dtype", default="float32", choices=typing.get_args(Dtype))
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument(
        "--halvings",
        type=at_least(0),
        default=sampler_lib.HALVINGS,
        help="times a prompt's decoded rows may halve as they stop (as sample.halvings; "
        "0 = every row runs to the last)",
    )
    ap.add_argument("--limit", type=at_least(1), default=None, help="the first LIMIT items")
    ap.add_argument(
        "--match-tokens",
        type=at_least(1),
        default=None,
        help="instead: the model's majority vote over as many responses per prompt as spend "
        "this many sampled tokens (maj@N, the token-matched baseline of a TTRL run)",
    )
    ap.add_argument(
        "--match-run",
        default=None,
        help="instead: the token-matched baseline of the TTRL run in this folder (its sampled "
        "tokens from metrics.jsonl), printed with the run's kept evaluation",
    )
    return ap.parse_args(argv)


def _evaluate_checkpoint(args: argparse.Namespace) -> dict[str, float]:
    mesh = sharding_lib.make_mesh(args.mesh)
    folder = weights.resolve_folder(config_lib.resolve_model_path(args.model))
    cfg, params = weights.load_hf(
        folder, mesh=mesh, rules=sharding_lib.SAMPLE_RULES, dtype=args.dtype
    )
    tokenizer = weights.load_tokenizer(folder)
    hf_layout.check_tokenizer(tokenizer, cfg)
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
        cfg,
        tokenizer,
        from_config.stop_ids(cfg, tokenizer=tokenizer, model_dir=folder),
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        buckets,
        mesh,
        halvings=args.halvings,
    )
    timeout = args.timeout or TTRLSection().answer_timeout_s
    golds, key = [it["answer"] for it in items], jax.random.key(args.seed)
    settings = dict(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max_new,
        batch_prompts=min(args.batch_prompts, len(prompt_ids)),
        answer_mode=args.answer_mode,
        timeout_s=timeout,
        last_number_fallback=args.last_number,
    )
    if args.match_tokens or args.match_run:
        return _matched(args, generator, params, prompt_ids, golds, key, settings)
    return evaluate_lib.evaluate(
        generator, params, prompt_ids, golds, key, k=args.k, greedy=not args.no_greedy, **settings
    )


def _matched(args, generator, params, prompt_ids, golds, key, settings) -> dict[str, Any]:
    """The token-matched base vote (baseline.py): the tokens given, or a run's."""
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
