"""A test-only fault seam: faults injected at a chosen step on a chosen rank, so that the suite can show
run health at work on real multi-process runs. Off unless MEGACORE_FAULTS names some; never set by
megacore itself.

    MEGACORE_FAULTS='[{"kind": "nan", "step": 5, "rank": 0, "times": 1}]'

kinds:
    nan     the rank's loss and gradients become NaN after its backward (`times` attempts of that step:
            1 is a transient fault that a rerun does not see, 0 every attempt: persistent)
    spike   the rank's loss and gradients are multiplied by `factor` (default 1000)
    hang    the rank loops in Python (time.sleep) before the step's forward, forever
    stop    the rank SIGSTOPs itself before the step's forward (a frozen process)

A fault fires only in the first life of the job (torchrun's and Slurm's restart counts 0) unless
"restarts": true.
"""

from __future__ import annotations

import json
import os
import signal
import time

import torch

ENV = "MEGACORE_FAULTS"


class Faults:
    def __init__(self, rank: int):
        specs = json.loads(os.environ.get(ENV, "[]"))
        restarted = any(int(os.environ.get(v, 0)) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
        self.faults = [f for f in specs if f.get("rank", 0) == rank and (f.get("restarts") or not restarted)]
        self._fired: dict[int, int] = {}

    def _due(self, step: int, kinds: tuple[str, ...]) -> dict | None:
        for i, f in enumerate(self.faults):
            if f["kind"] in kinds and f["step"] == step and (not f.get("times") or self._fired.get(i, 0) < f["times"]):
                self._fired[i] = self._fired.get(i, 0) + 1
                return f
        return None

    def before_forward(self, step: int) -> None:
        f = self._due(step, ("hang", "stop"))
        if f is None:
            return
        if f["kind"] == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        while True:  # a Python-level hang: the interpreter runs, the step never ends
            time.sleep(0.1)

    def after_backward(self, step: int, local_loss: torch.Tensor, parts) -> torch.Tensor:
        f = self._due(step, ("nan", "spike"))
        if f is None:
            return local_loss
        factor = float("nan") if f["kind"] == "nan" else f.get("factor", 1000.0)
        with torch.no_grad():
            for part in parts:
                for p in part.parameters():
                    if p.grad is not None:
                        p.grad.mul_(factor)
        return local_loss * factor
