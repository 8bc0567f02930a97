"""Using a model: evaluation on prepared splits or raw text (evaluate.py), sampling and chat (generate.py)."""
