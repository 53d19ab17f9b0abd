"""Run records: metrics.jsonl, TensorBoard, optional Weights & Biases, the curves PNG and summary.

Only process 0 writes. Every record carries `step` = optimizer rollout steps completed, so
evaluations (step 0 = before training) and train steps share one axis.

Shape suffixes: ttrl_jax/__init__.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ttrl_jax.rl import vote
from ttrl_jax.run import signals as signals_lib

# Every vote's answers, per prompt (Logbook.answers).
ANSWERS_FILE = "answers.jsonl"

# Panels of the curves figure: (title, metric keys plotted in it; a key ending in "@" is a
# prefix). Train-step keys are bare, evaluation keys start with "eval/".
PANELS = (
    ("accuracy (gold, measured only)", ("eval/avg@", "eval/maj@", "eval/pass@", "eval/greedy")),
    ("label-free, each evaluation", (
        "eval/score", "eval/majority_ratio", "eval/vote_margin", "eval/base_agreement",
        "eval/label_churn", "eval/answered", "eval/echo",
    )),
    ("answer diversity, each evaluation", ("eval/distinct_answers", "eval/answer_entropy")),
    ("pseudo-labels, each step", (
        "label_accuracy", "reward_accuracy", "majority_ratio", "vote_margin", "label_churn",
    )),
    ("rollouts (gold)", ("rollout_accuracy", "pass_at_n_vote")),
    ("token entropy", ("entropy", "eval/response_entropy")),
    ("response length", ("response_length", "eval/response_length")),
    ("length drift", ("length_drift", "eval/length_drift")),
    ("update", ("kl", "clip_frac", "grad_norm")),
)  # fmt: skip


def _plotted(key: str, names: Sequence[str]) -> bool:
    return any(key == n or (n.endswith("@") and key.startswith(n)) for n in names)


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

    def has_kind(self, kind: str) -> bool:
        """Whether metrics.jsonl holds a record of `kind` (every process reads the shared file)."""
        return any(r.get(kind) for r in read_records(self.path))

    def answers(self, step: int, kind: str, votes: signals_lib.Votes) -> None:
        """Every prompt's answers of one vote, to answers.jsonl: the canonical answer of each
        cluster ("labels") and each response's cluster ("ids": -1 no answer; slots not drawn by
        an adaptive vote left out)."""
        if not self.active:
            return
        prompts = [
            {"index": int(i), "labels": labels, "ids": [int(a) for a in ids if a != vote.NOT_DRAWN]}
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
    """One panel per group of metrics (see PANELS), against steps completed; a dashed line
    marks the kept step when the run kept another than its last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = next((r for r in reversed(records) if r.get("result")), {})
    last = max((r["step"] for r in records), default=0)
    kept = result.get("kept_step")
    fig, axes = plt.subplots(3, 3, figsize=(16, 11), constrained_layout=True)
    for ax, (panel, names) in zip(axes.flat, PANELS):
        keys = sorted({k for r in records for k in r if _plotted(k, names)})
        for key in keys:
            points = [
                (r["step"], r[key])
                for r in records
                if isinstance(r.get(key), (int, float)) and (r.get("train") or r.get("eval"))
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=key)
        if kept is not None and kept != last:
            ax.axvline(kept, color="k", linestyle="--", linewidth=1)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title + (f" (kept step {kept})" if kept is not None else ""))
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def majority_labels(answers_record: dict[str, Any]) -> dict[int, str | None]:
    """Each prompt's majority answer in one answers.jsonl record (`vote.majority_vote`)."""
    prompts = answers_record["prompts"]
    n = max([len(p["ids"]) for p in prompts] + [1])
    answer_id_PN = np.full((len(prompts), n), vote.NOT_DRAWN, np.int32)
    for row, prompt in zip(answer_id_PN, prompts):
        row[: len(prompt["ids"])] = prompt["ids"]
    majority_P = np.asarray(vote.majority_vote(answer_id_PN)[0])
    return {p["index"]: p["labels"][m] if m >= 0 else None for p, m in zip(prompts, majority_P)}


# The label-free rows of the summary (signals.SIGNALS, in a reading order) and the gold rows.
_LABEL_FREE_ROWS = (
    "score", "majority_ratio", "vote_margin", "answer_entropy", "distinct_answers", "answered",
    "response_entropy", "label_churn", "base_agreement", "echo", "length_drift", "response_length",
)  # fmt: skip
_GOLD_ROWS = ("avg@", "maj@", "pass@", "greedy")


def summary(
    records: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]] = ()
) -> tuple[dict[str, Any], str]:
    """The run's result as a dict and as markdown: the base model, the kept and the last
    evaluation and the token-matched base vote side by side, label-free rows first, then the
    rows that need gold labels (measured only, never read by the run).

    Args:
      records: metrics.jsonl's records.
      answers: answers.jsonl's records (for the kept policy's agreement with the base vote).
    """
    evals = {r["step"]: r for r in records if r.get("eval")}
    trains = [r for r in records if r.get("train")]
    result = next((r for r in reversed(records) if r.get("result")), {})
    base = next((r for r in reversed(records) if r.get("baseline")), None)
    out: dict[str, Any] = {"steps": trains[-1]["step"] if trains else 0}
    if trains:
        out["last_train"] = trains[-1]
    lines = []
    if evals:
        first, last = evals[min(evals)], evals[max(evals)]
        kept = evals.get(result.get("kept_step", max(evals)), last)
        out["eval_before"] = _eval_part(first)
        out["eval_after"] = _eval_part(last)
        out["eval_kept"] = _eval_part(kept)
        out["kept_step"] = kept["step"]
        cols = [("base model", first), (f"kept (step {kept['step']})", kept)]
        if kept is not last:
            cols.append((f"last (step {last['step']})", last))
        header = [name for name, _ in cols]
        if base is not None:
            header.append(f"base maj@{base['base_maj@N/n_votes']} (same tokens)")
        lines += ["| | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for row in _LABEL_FREE_ROWS:
            key = f"eval/{row}"
            if any(key in r for _, r in cols):
                extra = [_fmt(base.get(f"base_maj@N/{row}"))] if base is not None else []
                lines.append(
                    f"| {row} | " + " | ".join([_fmt(r.get(key)) for _, r in cols] + extra) + " |"
                )
        gold_keys = sorted(
            k for k in first if k.startswith("eval/") and k[5:].startswith(_GOLD_ROWS)
        )
        for key in gold_keys:
            extra = []
            if base is not None and key[5:].startswith("maj@"):
                extra = [_fmt(base.get("base_maj@N/accuracy"))]
            elif base is not None:
                extra = [""]
            lines.append(
                f"| {key[5:]} (gold) | "
                + " | ".join([_fmt(r.get(key)) for _, r in cols] + extra)
                + " |"
            )
        lines.append("")
        if result.get("kept_why"):
            lines.append(f"Kept: {result['kept_why']}.")
        if result.get("stopped"):
            lines.append(f"Stopped after step {out['steps']}: {result['stopped']}.")
        avg = next((k for k in gold_keys if k.startswith("eval/avg@")), None)
        if avg is not None:
            best = max(evals.values(), key=lambda r: (r.get(avg, -1.0), -r["step"]))
            out["gold_best_step"] = best["step"]
            lines.append(
                f"Gold-best evaluation (measured only, never read by the run): step "
                f"{best['step']}, {avg[5:]} {best[avg]:.3f}."
            )
    if base is not None:
        out["baseline"] = {k: v for k, v in base.items() if k.startswith(("base_maj@N/", "run_"))}
        agree = _agreement(answers, out.get("kept_step"))
        if agree is not None:
            out["baseline"]["kept_agreement"] = agree
        lines.append(
            f"Token-matched baseline: the base model's majority over N = "
            f"{base['base_maj@N/n_votes']} responses per prompt spends "
            f"{base['base_maj@N/tokens']:,} sampled tokens against the run's "
            f"{base['run_tokens']:,} (training and evaluation)"
            + (
                f"; the kept policy's majority answer agrees with it on {agree:.0%} of prompts."
                if agree is not None
                else "."
            )
        )
    if trains:
        lines += ["", "| train (first / last step) | first | last |", "|---|---|---|"]
        for k in (
            "label_accuracy",
            "reward_accuracy",
            "majority_ratio",
            "rollout_accuracy",
            "votes_drawn",
        ):
            if k in trains[0]:
                lines.append(f"| {k} | {trains[0][k]:.3f} | {trains[-1][k]:.3f} |")
    return out, "\n".join(lines)


def _eval_part(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k.startswith("eval/")}


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def _agreement(answers: Sequence[dict[str, Any]], kept_step: int | None) -> float | None:
    """Share of prompts whose kept-evaluation majority is the token-matched base vote's."""
    kept = next((a for a in answers if a["kind"] == "eval" and a["step"] == kept_step), None)
    base = next((a for a in reversed(answers) if a["kind"] == "baseline"), None)
    if kept is None or base is None:
        return None
    ours, theirs = majority_labels(kept), majority_labels(base)
    pairs = [(ours[i], theirs[i]) for i in ours if theirs.get(i) is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None
