"""The command line `python -m ttrl_jax.bench forward|sample|train ...`: the sub-commands of
forward.py, sample.py and train.py under one parser; its help is the package's docstring."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ttrl_jax import bench
from ttrl_jax.bench.forward import add_forward_command
from ttrl_jax.bench.sample import add_sample_command
from ttrl_jax.bench.train import add_train_command

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_forward_command,
    add_train_command,
    add_sample_command,
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttrl_jax.bench", description=bench.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(sub)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ValueError as e:  # a bad argument or config value: its message says the fix
        parser.exit(2, f"python -m ttrl_jax.bench {args.command}: error: {e}\n")
