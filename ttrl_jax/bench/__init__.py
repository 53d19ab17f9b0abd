"""Benchmarks against PyTorch: `python -m ttrl_jax.bench forward|sample|train ...`.

- machine.py: the machine's measured matmul peak and memory bandwidth, a load probe, timers.
- models.py: `--model` (a preset's shapes with random weights, or a checkpoint) on both sides.
- profile.py: where the time goes, from XLA:CPU's per-op trace and torch.profiler.
- forward.py, sample.py, train.py: the sub-commands, each against transformers' PyTorch model
  on the same weights, ratios measured in one process with the two run in turn.
- commands.py: the command line that gathers them.
- torch_peer.py: upstream TTRL's train step (verl) in PyTorch, the train step's peer here and
  its parity oracle in the tests.
"""
