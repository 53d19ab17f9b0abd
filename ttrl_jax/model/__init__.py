"""The decoder: its architecture (config.py), attention by backend, the scanned model."""
