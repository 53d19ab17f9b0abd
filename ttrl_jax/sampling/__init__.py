"""Sampling on device: the sampling head, the decode step, grouped rollouts, rounds."""
