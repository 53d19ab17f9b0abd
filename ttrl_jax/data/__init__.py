"""Benchmarks and prompts: items from the hub, local files or built in; chat prompts; order."""
