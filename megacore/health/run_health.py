"""What the trainer holds of run health (megacore/health/): one object, called at a few points of the
loop, that keeps the device checks, the policy, the events and the straggler report (the watchdog
lives beside it from the process's start: megacore/health/watchdog.py).

    verdict(step, loss, norm)  on the device, each step; its `skip` element is the optimizer's found_inf
    read()                     the verdicts not yet read, decided in order (each step when the policy needs
                               it, else at logging steps and before saves): the decisions to act on
    state_dict()               the window and the policy's memory, for the checkpoint's meta.json
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megacore.config import Config
from megacore.health.checks import StepCheck, Verdict
from megacore.health.events import STOPPED, HealthEvents
from megacore.health.faults import Faults
from megacore.health.policy import Decision, HealthPolicy
from megacore.health.stragglers import Stragglers


class RunHealth:
    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device, wandb=None, echo=print):
        health, backend = cfg.health, cfg.parallel.backend
        self.policy = HealthPolicy(health.policy("nonfinite", backend), health.policy("spike", backend),
                                   health.max_consecutive_skips, health.skip_steps)
        self.check = StepCheck(health, withhold_spikes=self.policy.spike != "log", device=device)
        self.events = HealthEvents(cfg.train.run_dir, rank, wandb, echo, record=rank == 0)
        self.stragglers = Stragglers(health.straggler_ratio, health.straggler_windows, rank, world_size)
        self.faults = Faults(rank)
        self.rank, self.enabled = rank, health.checks
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._rng = None  # the random streams at the start of the current step (rerun)

    # -- each step --

    def begin_step(self, step: int) -> None:
        if self.policy.reads_every_step:
            self._rng = _capture_rng()
        self.faults.before_forward(step)

    def verdict(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        v = self.check.verdict(loss, grad_norm, self.policy.forced_skip(step))
        self._pending.append((step, v))
        return v

    def read(self, rerun_of: Verdict | None = None) -> list[tuple[Verdict, Decision]]:
        """Read the pending verdicts (one copy to the host for all of them) and decide each, reporting
        every decision; returns (verdict, decision) of each that needs the trainer's action or a report."""
        if not self._pending:
            return []
        values = torch.stack([v for _, v in self._pending]).cpu().tolist()
        verdicts = [Verdict.read(step, row) for (step, _), row in zip(self._pending, values)]
        self._pending.clear()
        out = []
        for v in verdicts:
            decision = self.policy.decide(v, rerun_of)
            if decision.reason:
                kind = {"continue": "skip" if v.skip else ("rerun" if rerun_of else "spike"),
                        "rerun": "rerun", "rollback": "rollback", "stop": "stop"}[decision.action]
                self.events.emit(kind, decision.reason, v.step, loss=v.loss, grad_norm=v.grad_norm,
                                 loss_limit=v.loss_limit, grad_norm_limit=v.grad_norm_limit)
            out.append((v, decision))
        return out

    def restore_rng(self) -> None:
        """The random streams of the step's start, for its rerun."""
        _restore_rng(self._rng)

    def stop(self, step: int, reason: str) -> None:
        """A fatal stop: reported, and marked so that no launcher restarts or requeues the run."""
        self.events.emit("stop", reason, step)
        if self.rank == 0:
            self.events.mark(STOPPED, step, reason)

    # -- checkpoints --

    def state_dict(self, healthy: bool) -> dict:
        return {"healthy": healthy, "policy": self.policy.state_dict(), "window": self.check.state_dict()}

    def load_state_dict(self, state: dict, rollback: bool = False) -> None:
        if not state:  # a checkpoint from before run health
            return
        self.policy.load_state_dict(state.get("policy", {}), keep_rollbacks=rollback)
        if "window" in state:
            self.check.load_state_dict(state["window"])
        self._pending.clear()

    @property
    def in_skip_streak(self) -> bool:
        return self.policy.state.consecutive > 0


class HealthStop(Exception):
    """Raised on every rank when the run must not start (a restart loop); already reported and marked."""


def weights_finite(parts) -> torch.Tensor:
    """1 where every local weight of this rank's parts is finite (a device scalar; the caller reduces)."""
    def local(p: torch.Tensor) -> torch.Tensor:  # an FSDP/TP shard, or a ZeRO-3 partition
        return p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)

    flags = [torch.isfinite(local(p)).all() for part in parts for p in part.parameters()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def _capture_rng():
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _restore_rng(state) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
