"""The run folder: what it holds, its lock, and checkpoints for exact resume."""
