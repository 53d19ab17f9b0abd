"""`python -m ttrl_jax.plan`: plans configs on TPU slices (ttrl_jax/plan/report.py)."""

from ttrl_jax.plan.report import main

main()
