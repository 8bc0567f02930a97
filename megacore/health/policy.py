"""What to do about a bad step: the host side of run health, a small state machine over verdicts.

Each step's verdict (megacore/health/checks.py) was computed on the device, and a non-finite step (or a
spike whose policy is not `log`) was already withheld from the optimizer there. Here the host, reading
the verdict, decides what follows, by the policy of its kind (health.nonfinite, health.spike):

    log       report the spike; it was trained on
    skip      record the step as skipped (its batch is consumed, its update never applied)
    rerun     the same batch again with the same random state (once); the rerun's own verdict decides
    rollback  back to the newest healthy checkpoint before the step, and replay; if the step is bad
              again it recurs: then it is skipped
    stop      the run stops (exit status 3), nothing more is checkpointed

After `max_consecutive_skips` skips in a row the run escalates: a rollback to the newest healthy
checkpoint before the streak (once per checkpoint), else a stop. Everything here is plain data that
goes into each checkpoint, so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megacore.health.checks import Verdict


@dataclass(frozen=True)
class Decision:
    action: str  # "continue", "rerun", "rollback" or "stop"
    reason: str  # what happened, for the event and the console
    before_step: int = 0  # rollback: to the newest healthy checkpoint before this step
    escalation: bool = False  # a rollback after max_consecutive_skips skips (once per checkpoint)


@dataclass
class PolicyState:
    """What the policy remembers; saved in every checkpoint's meta.json."""

    skipped: list[int] = field(default_factory=list)  # steps whose update was not applied
    consecutive: int = 0  # skips in a row up to now
    rolled_back_for: list[int] = field(default_factory=list)  # bad steps a rollback replayed
    rollback_targets: list[int] = field(default_factory=list)  # checkpoints rolled back to on escalation


class HealthPolicy:
    def __init__(self, nonfinite: str, spike: str, max_consecutive_skips: int, skip_steps: list[int]):
        self.nonfinite, self.spike, self.max_consecutive = nonfinite, spike, max_consecutive_skips
        self.skip_steps = set(skip_steps)
        self.state = PolicyState()

    @property
    def reads_every_step(self) -> bool:
        """Whether the host must read each step's verdict as it comes (one small read per step): rerun,
        rollback and stop act before the next step; skip and log are read at logging steps only."""
        return any(p in ("rerun", "rollback", "stop") for p in (self.nonfinite, self.spike))

    def forced_skip(self, step: int) -> bool:
        return step in self.skip_steps

    def decide(self, v: Verdict, rerun_of: Verdict | None = None) -> Decision:
        """The action after step `v.step`; `rerun_of` is the first attempt's verdict when `v` is a rerun's."""
        if not v.skip:
            self.state.consecutive = 0
            if v.spike:  # trained on (policy log)
                return Decision("continue", f"spike at step {v.step}: {_values(v)}, trained on (health.spike=log)")
            if rerun_of is not None:
                return Decision("continue", f"step {v.step} was bad ({_what(rerun_of)}) and its rerun is "
                                            f"{_values(v)}: a transient fault, the rerun is kept")
            return Decision("continue", "")
        if not v.bad:  # skipped by health.skip_steps
            return self._skip(v, f"step {v.step} skipped (health.skip_steps)")
        policy = self.nonfinite if v.nonfinite else self.spike
        if rerun_of is not None:
            same = (v.loss, v.grad_norm) == (rerun_of.loss, rerun_of.grad_norm) or (v.nonfinite and rerun_of.nonfinite)
            return self._skip(v, f"step {v.step}: {_what(v)}, and its rerun {'the same' if same else 'bad again'}: "
                                 f"persistent, skipped")
        if policy == "stop":
            return Decision("stop", f"step {v.step}: {_what(v)}: stopping (health.{self._key(v)}=stop)")
        if policy == "rerun":
            return Decision("rerun", f"step {v.step}: {_what(v)}: running its batch again (health.{self._key(v)}=rerun)")
        if policy == "rollback" and v.step not in self.state.rolled_back_for:
            self.state.rolled_back_for.append(v.step)
            return Decision("rollback", f"step {v.step}: {_what(v)}: rolling back (health.{self._key(v)}=rollback)",
                            before_step=v.step)
        why = (f"it recurred after a rollback; a fresh run does the same with health.skip_steps=[{v.step}]"
               if policy == "rollback" else f"health.{self._key(v)}=skip")
        return self._skip(v, f"step {v.step}: {_what(v)}: skipped ({why})")

    def _skip(self, v: Verdict, reason: str) -> Decision:
        self.state.skipped.append(v.step)
        self.state.consecutive += 1
        if self.state.consecutive < self.max_consecutive:
            return Decision("continue", reason)
        start = v.step - self.state.consecutive + 1
        streak = f"{reason}; {self.state.consecutive} steps skipped in a row (steps {start}-{v.step})"
        self.state.consecutive = 0
        return Decision("rollback", f"{streak}: rolling back", before_step=start, escalation=True)

    def escalation_target_used(self, target_step: int) -> bool:
        """A rollback on escalation goes to each checkpoint once; a second streak after it stops the run."""
        if target_step in self.state.rollback_targets:
            return True
        self.state.rollback_targets.append(target_step)
        return False

    @staticmethod
    def _key(v: Verdict) -> str:
        return "nonfinite" if v.nonfinite else "spike"

    def state_dict(self) -> dict:
        return {"skipped": list(self.state.skipped), "consecutive": self.state.consecutive,
                "rolled_back_for": list(self.state.rolled_back_for),
                "rollback_targets": list(self.state.rollback_targets)}

    def load_state_dict(self, state: dict, keep_rollbacks: bool = False) -> None:
        """A checkpoint's state; on a rollback (keep_rollbacks) what this run learned since is kept: which
        steps were already rolled back for, and to which checkpoints."""
        learned = (self.state.rolled_back_for, self.state.rollback_targets) if keep_rollbacks else ([], [])
        self.state = PolicyState(list(state.get("skipped", [])), state.get("consecutive", 0),
                                 sorted(set(state.get("rolled_back_for", [])) | set(learned[0])),
                                 sorted(set(state.get("rollback_targets", [])) | set(learned[1])))


def _what(v: Verdict) -> str:
    return f"{'not finite' if v.nonfinite else 'a spike'} ({_values(v)})"


def _values(v: Verdict) -> str:
    limits = "" if v.loss_limit != v.loss_limit else f" (limits {v.loss_limit:.4g} and {v.grad_norm_limit:.4g})"
    return f"loss {v.loss:.6g}, grad norm {v.grad_norm:.6g}{limits}"
