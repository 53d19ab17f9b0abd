"""ttrl_jax: Test-Time Reinforcement Learning (TTRL) in JAX/Flax, from a laptop CPU to TPU pods."""

import os

# transformers is used for tokenizers and chat templates only; its advice that PyTorch is
# missing (it is not needed here) would be the first line every run prints.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
