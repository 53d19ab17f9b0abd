"""The ahead-of-time plan: whether a config fits a TPU slice, and how long a step takes."""
