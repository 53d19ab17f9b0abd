"""Benchmarks against PyTorch: `python -m ttrl_jax.bench forward|sample|train ...`.

- machine.py: the machine's measured matmul peak and memory bandwidth, a load probe, timers.
- models.py: `--model` (a preset's shapes with random weights, or a checkpoint) on both sides.
- profile.py: where the time goes, from XLA:CPU's per-op trace and torch.profiler.
- forward.py, sample.py, train.py: the sub-commands, each against transformers' PyTorch model
  on the same weights, ratios measured in one process with the two run in turn.
- torch_peer.py: upstream TTRL's train step (verl) in PyTorch, the train step's peer here and
  its parity oracle in the tests.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ttrl_jax.bench.forward import add_forward_command
from ttrl_jax.bench.sample import add_sample_command
from ttrl_jax.bench.train import add_train_command

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_forward_command,
    add_train_command,
    add_sample_command,
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttrl_jax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # a bad argument or config value: its message says the fix
        parser.exit(2, f"python -m ttrl_jax.bench {args.command}: error: {e}\n")
