"""`python -m ttrl_jax.run`: the TTRL job (ttrl_jax/run/loop.py)."""

from ttrl_jax.run.loop import main

main()
