"""Grading on the host: final answers in response text, their equivalence, answer ids."""
