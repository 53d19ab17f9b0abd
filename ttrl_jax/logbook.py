"""Run records: metrics.jsonl, TensorBoard, optional Weights & Biases, the curves PNG and summary.

Only process 0 writes. Every record carries `step` = optimizer rollout steps completed, so
evaluations (step 0 = before training) and train steps share one axis.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ttrl_jax import grpo
from ttrl_jax import signals as signals_lib

# Every vote's answers, per prompt (Logbook.answers).
ANSWERS_FILE = "answers.jsonl"

# Panels of the curves figure: (title, metric keys plotted in it).
PANELS = (
    ("pass@1 (avg@k) and maj@k", ("eval/avg@", "eval/maj@", "eval/greedy")),
    ("pseudo-label quality", ("label_accuracy", "reward_accuracy", "majority_ratio")),
    ("rollouts", ("rollout_accuracy", "pass_at_n_vote")),
    ("entropy", ("entropy",)),
    ("response length", ("response_length",)),
    ("update", ("kl", "clip_frac", "grad_norm")),
)


class Logbook:
    """Appends records to metrics.jsonl (and TensorBoard / W&B); process 0 only."""

    def __init__(
        self,
        out_dir: str,
        keep_upto: int | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.active = jax.process_index() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.answers_path = os.path.join(out_dir, ANSWERS_FILE)
        self.tb = self.wandb = None
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        for path in (self.path, self.answers_path):
            if keep_upto is not None:
                # A resumed run drops what was logged after its checkpoint: it is redone.
                kept = [r for r in read_records(path) if r["step"] <= keep_upto]
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
                os.replace(tmp, path)
            elif os.path.exists(path):
                os.remove(path)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ImportError(
                    "run.wandb=true but wandb is not installed: pip install wandb "
                    "(or pip install 'ttrl_jax[wandb]'), or set run.wandb=false"
                ) from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=out_dir)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.active:
            return
        record = {"step": int(step), kind: True, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            for k, v in record.items():  # per-prompt lists, e.g. votes_per_prompt
                if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    self.tb.add_histogram(k, np.asarray(v), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def answers(self, step: int, kind: str, votes: signals_lib.Votes) -> None:
        """Every prompt's answers of one vote, to answers.jsonl: the canonical answer of each
        cluster ("labels") and each response's cluster ("ids": -1 no answer; slots not drawn by
        an adaptive vote left out)."""
        if not self.active:
            return
        prompts = [
            {"index": int(i), "labels": labels, "ids": [int(a) for a in ids if a != grpo.NOT_DRAWN]}
            for i, labels, ids in zip(votes.prompt_index_P, votes.labels_P, votes.answer_id_PN)
        ]
        with open(self.answers_path, "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, "prompts": prompts}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (a run killed mid-write) is dropped.

    Raises:
      ValueError: a line before the last is not a JSON record, naming the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a 'step'")
        except ValueError as e:
            if k == len(lines) - 1 and not line.endswith("\n"):
                print(f"warning: {path}: dropped a torn last line {i} (a stopped run)")
                break
            raise ValueError(
                f"{path} line {i} is not a metrics record ({e}); remove or repair that line"
            ) from None
        records.append(record)
    return records


def plot_curves(records: Sequence[dict[str, Any]], png_path: str, title: str = "") -> None:
    """One panel per group of metrics (see PANELS), against steps completed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (panel, prefixes) in zip(axes.flat, PANELS):
        keys = sorted({k for r in records for k in r if k.startswith(prefixes)})
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=key)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def summary(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Before/after evaluation and the last train step, as a dict and a markdown table."""
    evals = [r for r in records if r.get("eval")]
    trains = [r for r in records if r.get("train")]
    out: dict[str, Any] = {}
    lines = ["| metric | before | after |", "|---|---|---|"]
    if evals:
        first, last = evals[0], evals[-1]
        out["eval_before"] = {k: v for k, v in first.items() if k.startswith("eval/")}
        out["eval_after"] = {k: v for k, v in last.items() if k.startswith("eval/")}
        for k in sorted(out["eval_before"]):
            lines.append(f"| {k[5:]} | {first[k]:.3f} | {last.get(k, float('nan')):.3f} |")
    if trains:
        out["last_train"] = trains[-1]
        for k in (
            "label_accuracy", "reward_accuracy", "majority_ratio", "rollout_accuracy",
            "votes_drawn",
        ):  # fmt: skip
            if k in trains[0]:
                lines.append(f"| train {k} | {trains[0][k]:.3f} | {trains[-1][k]:.3f} |")
    out["steps"] = trains[-1]["step"] if trains else 0
    return out, "\n".join(lines)
