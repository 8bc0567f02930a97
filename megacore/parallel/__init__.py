"""Parallelism applied from outside the model: the layout (`layout.py`, plain arithmetic: the CLI and the
launcher plan with it without importing torch), and `parallelize.py` with each parallelism's module."""

from megacore.parallel.layout import Layout

__all__ = ["Layout"]
