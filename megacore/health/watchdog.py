"""The hang watchdog: a thread per rank that keeps a heartbeat, notices a phase that runs past its limit,
writes every live rank's Python stacks, names the ranks that stopped making progress, and ends this
rank so that torchrun (or Slurm) restarts the job from its last checkpoint.

    RUN_DIR/health/heartbeats/rank-NNNNN.json   pid, host, step, phase, when it began, the collectives this
                                                rank has issued per process group (torch's flight
                                                recorder), rewritten every health.heartbeat_s
    RUN_DIR/health/stacks/                      stacks of every thread: on a hang, on SIGUSR2, on request

A rank names the culprits from the heartbeats: one whose heartbeat stopped (a stopped or frozen
process; on this host its state tells SIGSTOP from death), else one that issued fewer collectives than
its peers on some process group (it never reached the collective they wait in: stuck in Python, or in
a kernel of its own). The first rank to claim the hang writes the event; every rank exits with status 4.

SIGUSR2 to any rank dumps its stacks at once (faulthandler, even inside a C call) and asks every other
rank's watchdog to dump its own within a heartbeat; training goes on.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

from megacore.config import HealthConfig
from megacore.health.events import EXIT_HANG, HealthEvents, health_dir
from megacore.run_dir import HANG, HEARTBEATS, STACKS

DUMP_REQUEST = "DUMP_STACKS"
FLIGHT_RECORDER_ENTRIES = "256"


def flight_recorder_env(run_dir: str | Path, cuda: bool) -> None:
    """Before the process group exists: torch's flight recorder on (it counts each rank's collectives),
    and on CUDA NCCL's dump of it into RUN_DIR/health/ when a collective times out."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
    if cuda:
        health_dir(run_dir).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(health_dir(run_dir) / "nccl_trace_rank_"))


def set_collective_timeout(seconds: float) -> None:
    """Every process group of this rank times out its collectives after `seconds` (torch's defaults: 30
    minutes on gloo, 10 on NCCL), so a hang the watchdog misses still ends."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    for group in list(_world.pg_map):
        try:
            _set_pg_timeout(timedelta(seconds=seconds), group)
        except (ValueError, AssertionError, RuntimeError):  # a group this rank is not in
            continue


def collectives_issued() -> dict[str, int]:
    """{process group id: collectives this rank has enqueued} from torch's flight recorder ({} if off)."""
    try:
        status = json.loads(torch._C._distributed_c10d._dump_fr_trace_json())["pg_status"]
        return {pg: int(s["last_enqueued_collective"]) for pg, s in status.items()}
    except Exception:  # noqa: BLE001 - a diagnosis aid: never a reason to fail
        return {}


class Watchdog:
    def __init__(self, cfg: HealthConfig, run_dir: str | Path, rank: int, world_size: int, events: HealthEvents):
        self.cfg, self.rank, self.world_size, self.events = cfg, rank, world_size, events
        self.dir = health_dir(run_dir)
        (self.dir / HEARTBEATS).mkdir(parents=True, exist_ok=True)
        (self.dir / STACKS).mkdir(parents=True, exist_ok=True)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._phase = ("start", 0, time.time())  # (phase, step, since): replaced whole by the main thread
        self._stop, self._beat_lock, self._last_beat = threading.Event(), threading.Lock(), 0.0
        self._served_request = self._request_time()
        self._stack_file = open(self.dir / STACKS / f"rank-{rank:05d}.txt", "a")  # noqa: SIM115 - kept open
        # The Python handler first; faulthandler's C handler then runs before it (chain), inside a C call too.
        self._previous_usr2 = signal.signal(signal.SIGUSR2, self._on_usr2) if _main_thread() else None
        faulthandler.register(signal.SIGUSR2, file=self._stack_file, all_threads=True, chain=True)
        self._beat("start", 0, self._phase[2], time.time())  # (a rank that stops at once is still known)
        self._thread = threading.Thread(target=self._run, name="megacore-watchdog", daemon=True)
        self._thread.start()

    # -- the main thread --

    def enter(self, phase: str, step: int) -> None:
        """The rank is now in `phase` (start, step, eval, save) of `step`: its limit starts now. (A beat
        from here too, at most one a heartbeat: a rank that stops between the thread's beats is still
        seen where it stopped.)"""
        self._phase = (phase, step, time.time())
        if self._phase[2] - self._last_beat >= self.cfg.heartbeat_s:
            self._beat(*self._phase, self._phase[2])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        faulthandler.unregister(signal.SIGUSR2)
        if self._previous_usr2 is not None:
            signal.signal(signal.SIGUSR2, self._previous_usr2)
        self._stack_file.close()

    def _on_usr2(self, signum, frame) -> None:
        # (faulthandler already wrote this rank's stacks) Ask the other ranks' watchdogs for theirs.
        self._served_request = time.time()
        (self.dir / DUMP_REQUEST).write_text(json.dumps({"time": self._served_request, "rank": self.rank}))

    # -- the watchdog thread --

    def limit(self, phase: str, step: int) -> float:
        c = self.cfg
        if phase == "step":
            return c.hang_timeout_s if step > c.warmup_steps else max(c.hang_timeout_s, c.startup_timeout_s)
        return {"start": c.startup_timeout_s, "eval": c.eval_timeout_s, "save": c.save_timeout_s}.get(phase, 0.0)

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.cfg.heartbeat_s)):
            phase, step, since = self._phase
            now = time.time()
            if now - self._last_beat >= self.cfg.heartbeat_s:
                self._beat(phase, step, since, now)
            if self._request_time() > self._served_request:
                self._served_request = self._request_time()
                self.dump_stacks("request")
            limit = self.limit(phase, step)
            if self.cfg.hang_timeout_s > 0 and limit > 0 and now - since > limit:
                self._on_hang(phase, step, now - since, limit)

    def _beat(self, phase: str, step: int, since: float, now: float) -> None:
        # Replaced by rename (a reader never sees half of one); not fsynced: a diagnosis, not state.
        path = self.dir / HEARTBEATS / f"rank-{self.rank:05d}.json"
        with self._beat_lock:
            path.with_suffix(".tmp").write_text(json.dumps(
                {"rank": self.rank, "pid": self.pid, "host": self.host, "step": step, "phase": phase, "since": since,
                 "updated": now, "collectives": collectives_issued()}))
            os.replace(path.with_suffix(".tmp"), path)
            self._last_beat = now

    def _request_time(self) -> float:
        try:
            return json.loads((self.dir / DUMP_REQUEST).read_text())["time"]
        except (OSError, ValueError, KeyError):
            return 0.0

    def dump_stacks(self, why: str) -> Path:
        self._stack_file.write(f"\n=== rank {self.rank} pid {self.pid} on {self.host}: {why} at "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._stack_file.flush()
        faulthandler.dump_traceback(self._stack_file, all_threads=True)
        self._stack_file.flush()
        return Path(self._stack_file.name)

    def _on_hang(self, phase: str, step: int, elapsed: float, limit: float) -> None:
        self._beat(phase, step, self._phase[2], time.time())
        self.dump_stacks(f"hang: {_where(phase, step)} running {elapsed:.0f}s, limit {limit:.0f}s")
        (self.dir / DUMP_REQUEST).write_text(json.dumps({"time": time.time(), "rank": self.rank}))
        time.sleep(2 * self.cfg.heartbeat_s)  # the other live ranks dump their stacks, and beat once more
        culprits = name_culprits(self.dir / HEARTBEATS, self.world_size, self.cfg.heartbeat_s, self.host)
        claim = self.dir / f"hang-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-{step}.claimed"
        try:
            with open(claim, "x") as f:
                f.write(str(self.rank))
            named = "; ".join(f"rank {c['rank']} ({c['host']}, pid {c['pid']}): {c['why']}" for c in culprits)
            message = (f"hang in {_where(phase, step)} (limit {limit:.0f}s): "
                       f"{named or 'no rank is behind the others (every live rank waits; see the stacks)'}; stacks "
                       f"in {self.dir / 'stacks'}; exiting for a restart from the last checkpoint")
            self.events.echo = print  # the hang is reported by whichever rank saw it first
            self.events.emit("hang", message, step, ranks=[c["rank"] for c in culprits],
                             culprits=culprits, phase=phase)
            self.events.mark(HANG, step, message)
        except FileExistsError:
            pass
        for c in culprits:  # a stopped process on this host is killed: the restart need not wait for it
            if c["host"] == self.host and c.get("state") == "stopped":
                try:
                    os.kill(c["pid"], signal.SIGKILL)
                except OSError:
                    pass
        self._stack_file.flush()
        os._exit(EXIT_HANG)


def request_stacks(run_dir: str | Path) -> Path:
    """What SIGUSR2 does, from outside the job: every live rank's watchdog dumps its stacks."""
    folder = health_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DUMP_REQUEST).write_text(json.dumps({"time": time.time(), "rank": None}))
    return folder / STACKS


def name_culprits(heartbeats: Path, world_size: int, heartbeat_s: float, host: str) -> list[dict]:
    """The ranks that stopped making progress, from every rank's heartbeat (see the module's doc)."""
    beats, now = {}, time.time()
    for r in range(world_size):
        try:
            beats[r] = json.loads((heartbeats / f"rank-{r:05d}.json").read_text())
        except (OSError, ValueError):
            beats[r] = None
    stale_after = max(3 * heartbeat_s, 3.0)
    out = []
    for r, b in beats.items():
        if b is None:
            out.append({"rank": r, "host": "?", "pid": None, "why": "no heartbeat ever (did not start)",
                        "state": "missing"})
        elif now - b["updated"] > stale_after:
            state = _process_state(b["pid"]) if b["host"] == host else "unknown"
            why = {"stopped": "stopped (SIGSTOP, or a debugger)", "gone": "died"}.get(
                state, f"frozen (no heartbeat for {now - b['updated']:.0f}s)") + ", last seen"
            out.append({"rank": r, "host": b["host"], "pid": b["pid"], "state": state,
                        "why": f"{why} in {_where(b['phase'], b['step'])}"})
    if out:
        return out
    live = {r: b for r, b in beats.items() if b is not None}
    groups = {pg for b in live.values() for pg in b.get("collectives", {})}
    behind: dict[int, tuple[str, int, int]] = {}
    for pg in sorted(groups):
        issued = {r: b["collectives"][pg] for r, b in live.items() if pg in b.get("collectives", {})}
        most = max(issued.values())
        for r, n in issued.items():
            if n < most and (r not in behind or most - n > behind[r][2] - behind[r][1]):
                behind[r] = (pg, n, most)
    for r, (pg, n, most) in sorted(behind.items()):
        b = live[r]
        out.append({"rank": r, "host": b["host"], "pid": b["pid"], "state": "stuck",
                    "why": f"stuck in {_where(b['phase'], b['step'])}: issued {n} collectives on process group "
                           f"{pg} where the others issued {most} (it never reached the one they wait in)"})
    return out


def _where(phase: str, step: int) -> str:
    return f"step {step}" if phase == "step" else f"{phase} (after step {step})" if step else phase


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(state, "running")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()

