"""`python -m ttrl_jax.bench`: benchmarks against PyTorch (ttrl_jax/bench/commands.py)."""

from ttrl_jax.bench.commands import main

main()
