"""A run directory: its lock, records, checkpoints, curves, model card and Hub push."""
