"""The `health:` section: what a run does about a bad step, a hung rank and a slow one (megacore/health/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megacore.errors import ConfigError

# What DeepSpeed's engine can do with a bad step: its optimizer step cannot be withheld on the device.
DEEPSPEED_POLICIES = ("stop", "log")


@dataclass
class HealthConfig:
    # A step whose loss or gradient norm is not finite is never trained on. skip: its update is not
    # applied (weights, optimizer moments and step counts unchanged; the step number, schedule and data
    # move on); rerun: the same batch again with the same random state, kept if it comes out finite and
    # different (a transient fault), else skipped; rollback: back to the newest healthy checkpoint and
    # replay, skipping the step if it recurs; stop: checkpoint nothing more and exit (status 3).
    # auto: skip on backend=torch, stop on deepspeed (its engine cannot withhold an update).
    nonfinite: Literal["auto", "skip", "rerun", "rollback", "stop"] = "auto"
    # false: no step verdicts at all (a non-finite step is then trained on, as before run health existed);
    # for benchmarks (bench/train_step.py measures what the checks cost).
    checks: bool = True
    # A spike: the loss or the gradient norm above mean + spike_sigma * std of the last spike_window
    # accepted steps (after spike_min_history of them). log: report it and train on it.
    spike: Literal["log", "skip", "rerun", "rollback", "stop"] = "log"
    spike_sigma: float = 6.0
    spike_window: int = 128
    spike_min_history: int = 64  # (OLMo-core: half its window of 128)
    # After this many skipped steps in a row: roll back to the newest healthy checkpoint (once per
    # checkpoint), else stop.
    max_consecutive_skips: int = 5
    # Steps whose update is never applied (their batches are consumed): what a rollback skipped, for a
    # fresh run to do the same.
    skip_steps: list[int] = field(default_factory=list)
    # Hang watchdog: a rank whose step (after the first `warmup_steps`) takes longer than hang_timeout_s, or
    # start-up, compilation, evaluation or a checkpoint save longer than its own limit, is a hang: every
    # live rank writes its stacks to RUN_DIR/health/, the ranks that stopped making progress are named,
    # and the ranks exit (status 4) for torchrun or Slurm to restart them from the last checkpoint.
    # 0 disables the watchdog.
    hang_timeout_s: float = 600.0
    warmup_steps: int = 2
    startup_timeout_s: float = 1800.0
    eval_timeout_s: float = 1800.0
    save_timeout_s: float = 1800.0
    heartbeat_s: float = 5.0
    # Collectives time out after this once the first step is done (torch's default: 30 min on gloo, 10 on
    # NCCL); 0: the default throughout.
    collective_timeout_s: float = 900.0
    # Restarts in a row that resume from the same step (no progress) before the run refuses to start.
    max_restarts_without_progress: int = 3
    # A rank whose own time per step (not counting waits for the others) exceeds the median's by this
    # ratio is reported as a straggler; after straggler_windows logging windows in a row, as persistent.
    straggler_ratio: float = 1.5
    straggler_windows: int = 3

    def validate(self) -> None:
        if not self.spike_sigma > 0:
            raise ConfigError(f"health.spike_sigma must be > 0, got {self.spike_sigma}")
        for name in ("spike_window", "max_consecutive_skips", "heartbeat_s", "straggler_windows"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"health.{name} must be > 0, got {getattr(self, name)}")
        if not 2 <= self.spike_min_history <= self.spike_window:
            raise ConfigError(f"health.spike_min_history must be in [2, health.spike_window={self.spike_window}], "
                              f"got {self.spike_min_history}")
        for name in ("hang_timeout_s", "startup_timeout_s", "eval_timeout_s", "save_timeout_s",
                     "collective_timeout_s", "warmup_steps", "max_restarts_without_progress"):
            if getattr(self, name) < 0:
                raise ConfigError(f"health.{name} must be >= 0, got {getattr(self, name)}")
        if not self.straggler_ratio > 1:
            raise ConfigError(f"health.straggler_ratio must be > 1, got {self.straggler_ratio}")
        if any(s < 1 for s in self.skip_steps):
            raise ConfigError(f"health.skip_steps holds steps >= 1, got {self.skip_steps}")

    def check_backend(self, backend: str) -> None:
        """DeepSpeed's engine steps its own optimizer: only stop and log apply there; the rest is refused."""
        if backend != "deepspeed":
            return
        for name in ("nonfinite", "spike"):
            value = getattr(self, name)
            if value not in ("auto", *DEEPSPEED_POLICIES):
                raise ConfigError(f"health.{name}={value} with parallel.backend=deepspeed: DeepSpeed's engine cannot "
                                  f"withhold an update; use health.{name}=stop (or log, for spikes), or backend=torch")
        if self.skip_steps:
            raise ConfigError("health.skip_steps with parallel.backend=deepspeed: DeepSpeed's engine cannot withhold an "
                              "update; use backend=torch")

    def policy(self, kind: str, backend: str) -> str:
        """The policy for `kind` (nonfinite or spike), auto resolved for the backend."""
        value = getattr(self, kind)
        return ("stop" if backend == "deepspeed" else "skip") if value == "auto" else value
