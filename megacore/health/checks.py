"""Each step's verdict, computed on the device with no host sync: a non-finite loss or gradient norm, and
a spike (either above mean + k * std of a window of accepted steps).

The verdict decides on the device whether the optimizer applies the step (`skip`, fed to the fused
AdamW as `found_inf`: parameters, moments and step counts stay unchanged); the host reads verdicts only
when it must decide (rerun, rollback, stop) or report (at logging steps). The window is a ring of the
last `spike_window` accepted steps' loss and gradient norm, updated on the device from the verdict, and
checkpointed: a resumed run makes exactly the decisions of an uninterrupted one. Its size is fixed
(health.spike_window), whatever the run's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megacore.config import HealthConfig

# The verdict's fields, in the order of its one float64 vector.
FIELDS = ("nonfinite", "spike", "skip", "loss", "grad_norm", "loss_limit", "grad_norm_limit")
VERDICT_SKIP = FIELDS.index("skip")


@dataclass(frozen=True)
class Verdict:
    """A step's verdict, read on the host."""

    step: int
    nonfinite: bool
    spike: bool
    skip: bool  # the update was not applied
    loss: float
    grad_norm: float
    loss_limit: float  # mean + k * std of the window (nan before spike_min_history accepted steps)
    grad_norm_limit: float

    @classmethod
    def read(cls, step: int, values: list[float]) -> Verdict:
        v = dict(zip(FIELDS, values))
        return cls(step, bool(v["nonfinite"]), bool(v["spike"]), bool(v["skip"]), v["loss"], v["grad_norm"],
                   v["loss_limit"], v["grad_norm_limit"])

    @property
    def bad(self) -> bool:
        return self.nonfinite or self.spike


class StepCheck:
    """The device side of run health: the spike window and each step's verdict vector."""

    def __init__(self, cfg: HealthConfig, withhold_spikes: bool, device: torch.device):
        # A non-finite step is never applied; a spike is, unless its policy acts on it (all but `log`).
        self.sigma, self.min_history, self.withhold_spikes = cfg.spike_sigma, cfg.spike_min_history, withhold_spikes
        self.window = torch.zeros(2, cfg.spike_window, dtype=torch.float64, device=device)  # loss, grad norm
        self.accepted = torch.zeros((), dtype=torch.int64, device=device)  # accepted steps so far
        self._slots = torch.arange(cfg.spike_window, device=device)

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor, forced_skip: bool = False) -> torch.Tensor:
        """The step's verdict vector (FIELDS) from its mean loss and gradient norm (device scalars, equal on
        every rank); accepted steps enter the window. Element 2 (skip) is the optimizer's found_inf."""
        x = torch.stack([loss.detach().double(), grad_norm.detach().double()])
        nonfinite = ~torch.isfinite(x).all()
        size = self.window.shape[1]
        n = torch.clamp(self.accepted, max=size)
        held = (self._slots < n).double()
        mean = (self.window * held).sum(1) / n.clamp(min=1)
        var = ((self.window - mean[:, None]) ** 2 * held).sum(1) / (n - 1).clamp(min=1)
        limit = torch.where(n >= self.min_history, mean + self.sigma * var.sqrt(), torch.full_like(mean, float("nan")))
        spike = (x > limit).any() & ~nonfinite  # (a comparison with nan is false: no spike before the history)
        skip = nonfinite | (spike & self.withhold_spikes) | forced_skip
        accept = ~skip
        into = (self._slots == self.accepted % size) & accept  # (a mask, not an index: no host read)
        self.window.copy_(torch.where(into, x[:, None], self.window))
        self.accepted += accept.long()
        return torch.stack([nonfinite.double(), spike.double(), skip.double(), *x, *limit])

    def state_dict(self) -> dict:
        """The window as plain lists (a checkpoint's meta.json), oldest accepted step first."""
        n, size = int(self.accepted), self.window.shape[1]
        order = [(n - min(n, size) + i) % size for i in range(min(n, size))]
        values = self.window.cpu().tolist()
        return {"accepted": n, "loss": [values[0][i] for i in order], "grad_norm": [values[1][i] for i in order]}

    def load_state_dict(self, state: dict) -> None:
        n, size = state["accepted"], self.window.shape[1]
        self.window.zero_()
        self.accepted.fill_(n)
        for j, (loss, norm) in enumerate(zip(state["loss"][-size:], state["grad_norm"][-size:])):
            slot = (n - min(len(state["loss"]), size) + j) % size
            self.window[0, slot], self.window[1, slot] = loss, norm
