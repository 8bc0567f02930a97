#!/usr/bin/env bash
# Stop the local Slurm cluster of STATE_DIR: cancel jobs, stop the daemons, then kill any job step
# left behind by PID (a leftover slurmstepd drains the next cluster's node).
set -uo pipefail
state=${1:?usage: stop.sh STATE_DIR}
[ -f "$state/slurm.conf" ] || exit 0
export SLURM_CONF="$state/slurm.conf"
scancel --quiet --user=root 2>/dev/null
for _ in $(seq 1 20); do
  [ -z "$(squeue -h -t running,completing 2>/dev/null)" ] && break
  sleep 0.5
done
for pidfile in "$state"/run/slurmd-*.pid "$state/run/slurmctld.pid" "$state/munge/munged.pid"; do
  [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
done
sleep 1
# Job steps of this cluster: slurmstepd processes started by our slurmd (they inherit its SLURM_CONF).
for pid in $(pgrep slurmstepd || true); do
  if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
    kill -9 "$pid" 2>/dev/null
  fi
done
for pidfile in "$state"/run/slurmd-*.pid "$state/run/slurmctld.pid" "$state/munge/munged.pid"; do
  [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null
  rm -f "$pidfile"
done
exit 0
