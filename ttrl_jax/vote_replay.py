"""What an adaptive vote would have drawn on a fixed-budget run: its recorded votes replayed.

    python -m ttrl_jax.vote_replay runs/apples runs/sum2 --error 0.05 0.02 0.01

A fixed-budget run records every response's answer at every step (answers.jsonl). An adaptive
vote on the same step draws some of those very responses (slot n is sample n whichever round
draws it), in the order the step draws them (the update's responses first, chosen from the
run's seed), so replaying the rounds (rl/vote_budget.py) on the recorded answers gives the
votes per prompt and the labels the adaptive vote would have had there, without sampling and
without gold labels. It measures the rule on the run's own draws; where every label agrees, the
adaptive run is this run with fewer tokens (README, "An adaptive vote budget").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from ttrl_jax.config import load as config_lib
from ttrl_jax.config.schema import Config, ConfigError
from ttrl_jax.rl import advantages
from ttrl_jax.rl import vote_budget as vote_budget_lib
from ttrl_jax.rl.vote import NOT_DRAWN, majority_vote
from ttrl_jax.run import from_config
from ttrl_jax.run import logbook as logbook_lib
from ttrl_jax.run import step as step_lib


class ReplayError(ValueError):
    """A run that cannot be replayed; the message names the problem and the fix."""


def renumber(answer_id_PN: np.ndarray) -> np.ndarray:
    """Ids of the drawn slots renumbered by first appearance in slot order (as clustering the
    drawn answers gives); NO_ANSWER and NOT_DRAWN kept."""
    out = np.array(answer_id_PN, np.int32)
    for row in out:
        seen: dict[int, int] = {}
        for i, a in enumerate(row):
            if a >= 0:
                row[i] = seen.setdefault(int(a), len(seen))
    return out


def replay_step(
    full_id_PN: np.ndarray,
    order_PN: np.ndarray,
    budget: vote_budget_lib.VoteBudget,
    shards: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The adaptive vote's rounds over one step's full draw.

    Returns:
      (votes_P: responses each prompt draws, agree_P: whether its label is the full draw's).
    """
    full = np.asarray(full_id_PN)
    drawn = np.zeros(full.shape, bool)
    plan = vote_budget_lib.first_round(order_PN, budget.n_min)
    while plan is not None:
        g, j = np.nonzero(plan.live_UN)
        drawn[plan.group_prompt_U[g], plan.sample_index_UN[g, j]] = True
        ids = renumber(np.where(drawn, full, NOT_DRAWN))
        plan = vote_budget_lib.next_round(
            vote_budget_lib.votes_drawn(ids),
            vote_budget_lib.settled(ids, budget),
            budget.n_max,
            budget.n_step,
            shards,
            order_PN,
        )
    adaptive = np.asarray(majority_vote(ids)[0])
    agree = vote_budget_lib.label_agreement(ids, full, adaptive, np.asarray(majority_vote(full)[0]))
    return drawn.sum(-1), agree


def replay_run(run_dir: str, overrides: list[str], shards: int = 1) -> tuple[Config, list[dict]]:
    """Every train step of a fixed-budget run replayed under its config plus `overrides`
    (e.g. ttrl.vote_rule=posterior ttrl.vote_error=0.02). Returns the config and, per step,
    {"step", "votes", "agree"}."""
    config_path = os.path.join(run_dir, "config.yaml")
    answers_path = os.path.join(run_dir, logbook_lib.ANSWERS_FILE)
    for path in (config_path, answers_path):
        if not os.path.exists(path):
            raise ReplayError(f"{path} not found: give the output folder of a run")
    run_cfg = config_lib.load_config(config_path)
    if run_cfg.ttrl.vote_rule != "fixed":
        raise ReplayError(
            f"{run_dir} ran ttrl.vote_rule={run_cfg.ttrl.vote_rule}: replay needs a fixed-budget "
            "run (all sample.n_vote responses recorded)"
        )
    cfg = config_lib.load_config(config_path, overrides)
    s, budget = cfg.sample, from_config.vote_budget(cfg)
    root = jax.random.key(cfg.run.seed)
    out = []
    with open(answers_path) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] != "train":
                continue
            rows = [p["ids"] for p in record["prompts"]]
            if any(len(r) != s.n_vote for r in rows):
                raise ReplayError(
                    f"{answers_path}: step {record['step']} has prompts without all "
                    f"sample.n_vote={s.n_vote} answers; replay needs the run's own n_vote"
                )
            full = renumber(np.array(rows, np.int32))
            # Records number steps from 1; the step's keys from 0 (run/loop.py).
            key = step_lib.stream(root, step_lib.SELECT, record["step"] - 1)
            train = advantages.select_responses(
                key, len(rows), s.n_vote, s.n_train, cfg.ttrl.select == "random"
            )
            order = vote_budget_lib.draw_order(np.asarray(train), s.n_vote)
            votes, agree = replay_step(full, order, budget, shards)
            out.append({"step": record["step"], "votes": votes.tolist(), "agree": agree.tolist()})
    return cfg, out


def row(name: str, cfg: Config, steps: list[dict]) -> str:
    votes = np.concatenate([s["votes"] for s in steps])
    agree = np.concatenate([s["agree"] for s in steps])
    rule, n = cfg.ttrl.vote_rule, cfg.sample.n_vote
    error = f"{cfg.ttrl.vote_error:g}" if rule == "posterior" else "–"
    return (
        f"| {name} | {rule} | {error} | {votes.mean():.2f} | {1 - votes.mean() / n:.1%} | "
        f"{int(agree.sum())} of {len(agree)} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ttrl_jax.vote_replay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", help="output folders of fixed-budget runs")
    parser.add_argument("--rule", default="posterior", choices=["lead", "posterior"])
    parser.add_argument("--error", type=float, nargs="+", default=[0.02], help="ttrl.vote_error")
    parser.add_argument("--n-vote-min", type=int, help="sample.n_vote_min (default: the run's)")
    parser.add_argument("--n-vote-step", type=int, help="sample.n_vote_step (default: the run's)")
    parser.add_argument("--data-shards", type=int, default=1, help="the mesh's data axis size")
    args = parser.parse_args(argv)
    print("| run | rule | error | votes per prompt | votes saved | label = full budget's |")
    print("|---|---|---:|---:|---:|---:|")
    for run_dir in args.run_dirs:
        for error in args.error if args.rule == "posterior" else [None]:
            overrides = [f"ttrl.vote_rule={args.rule}"]
            overrides += [] if error is None else [f"ttrl.vote_error={error}"]
            if args.n_vote_min is not None:
                overrides.append(f"sample.n_vote_min={args.n_vote_min}")
            if args.n_vote_step is not None:
                overrides.append(f"sample.n_vote_step={args.n_vote_step}")
            try:
                cfg, steps = replay_run(run_dir, overrides, args.data_shards)
            except (ReplayError, ConfigError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(row(os.path.basename(os.path.normpath(run_dir)), cfg, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
