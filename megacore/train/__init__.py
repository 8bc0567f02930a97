"""Training: the Trainer and its step (trainer.py), its hooks (hooks.py), the loss, the optimizer and
schedule (optim.py), the training data (data.py) and stop requests (preemption.py)."""
