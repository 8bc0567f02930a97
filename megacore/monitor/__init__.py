"""What a run reports while it trains: metrics.jsonl and the console (metrics.py), W&B (wandb_run.py),
tokens/s and MFU (throughput.py), per-rank memory (memory.py), profiles (profiling.py), charts (plot.py)."""
