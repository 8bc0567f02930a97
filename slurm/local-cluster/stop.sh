#!/usr/bin/env bash
# Stop the local Slurm cluster of STATE_DIR: cancel jobs, stop the daemons, kill any job step left
# behind (a leftover slurmstepd drains the next cluster's node), and delete its network namespaces.
set -uo pipefail
state=${1:?usage: stop.sh STATE_DIR}
[ -f "$state/slurm.conf" ] || exit 0
export SLURM_CONF="$state/slurm.conf"
prefix=""
[ -f "$state/netns-prefix" ] && prefix=$(cat "$state/netns-prefix")
client=""
[ -n "$prefix" ] && client="nsenter --net=/run/netns/${prefix}n1"
$client scancel --quiet --user=root 2>/dev/null
for _ in $(seq 1 20); do
  [ -z "$($client squeue -h -t running,completing 2>/dev/null)" ] && break
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
if [ -n "$prefix" ]; then
  for ns in $(ip netns list | awk '{print $1}' | grep "^${prefix}"); do ip netns delete "$ns"; done
  rm -f "$state/netns-prefix"
fi
exit 0
