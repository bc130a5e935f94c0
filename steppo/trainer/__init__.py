"""The trainer: updates, warm start, checkpoints, run records."""
