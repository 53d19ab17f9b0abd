"""Which label-free signals track gold accuracy: a table over runs that had gold labels.

    python -m ttrl_jax.signal_report runs/apples runs/addsub runs/sum2

For every signal of signals.SIGNALS, Spearman's rho between the signal and the gold metric
(avg@k) over each run's evaluations, and pooled over all runs as changes from each run's base
model (signals.gold_correlations). A signal worth watching has the same sign on every run; the
README's "Knowing without labels" has the table for the shipped tasks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ttrl_jax.run import logbook as logbook_lib
from ttrl_jax.run import signals as signals_lib


def table(runs: dict[str, list[dict]], gold: str = "avg@") -> str:
    """A markdown table: one row per signal (most strongly pooled first), one column per run."""
    rho = signals_lib.gold_correlations(runs, gold)
    names = [n for n in runs if any(n in per for per in rho.values())]
    fmt = lambda x: "–" if x is None or math.isnan(x) else f"{x:+.2f}"
    pooled = lambda s: rho[s].get("pooled", float("nan"))
    order = sorted(rho, key=lambda s: -abs(pooled(s)) if not math.isnan(pooled(s)) else 1.0)
    lines = [
        "| signal | " + " | ".join(names) + " | pooled | bad when |",
        "|---" * (len(names) + 3) + "|",
    ]
    for s in order:
        cells = [fmt(rho[s].get(n)) for n in names] + [fmt(pooled(s))]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {signals_lib.SIGNALS[s].bad} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ttrl_jax.signal_report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", help="run directories (their metrics.jsonl)")
    parser.add_argument("--gold", default="avg@", help="the gold metric after eval/ (avg@)")
    args = parser.parse_args(argv)
    runs = {}
    for path in args.run_dirs:
        records = logbook_lib.read_records(os.path.join(path, "metrics.jsonl"))
        if not any(
            r.get("eval") and any(k.startswith(f"eval/{args.gold}") for k in r) for r in records
        ):
            print(
                f"error: {path} has no evaluation with eval/{args.gold} (no run directory, or "
                "a run without gold labels)",
                file=sys.stderr,
            )
            return 2
        runs[os.path.basename(os.path.normpath(path))] = records
    print(table(runs, args.gold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
