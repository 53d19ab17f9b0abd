"""One TTRL run: set-up, rollouts, the loop, evaluation, checkpoints and records."""
