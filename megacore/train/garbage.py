"""Python's garbage collector at fixed steps on every rank.

A generation-2 collection can take hundreds of milliseconds in a process holding millions of Python
objects; left to Python it lands at a random point on each rank, and every collective then waits for
the slowest rank. As torchtitan does: automatic collection off, a young-generation collection every
train.gc_every steps on every rank (the same step everywhere), a full one at the end.
"""

from __future__ import annotations

import gc

from megacore.train.hooks import Hook


class GarbageCollection(Hook):
    def __init__(self, every: int):
        self.every = every
        if every > 0:
            gc.disable()
            gc.collect(1)

    def after_step(self, trainer, step: int, result) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        """At the end of training: automatic collection back on, and one full collection now, so that
        cyclic garbage (engines, process-group handles) is freed before the process group is destroyed,
        not during interpreter shutdown."""
        if self.every > 0:
            gc.enable()
            gc.collect()
