#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (root; `apt-get install slurmctld slurmd
# slurm-client munge`). Everything lives under STATE_DIR; print the SLURM_CONF to export.
#
#   slurm/local-cluster/start.sh STATE_DIR        -> prints "export SLURM_CONF=STATE_DIR/slurm.conf"
#   slurm/local-cluster/stop.sh STATE_DIR
#
# Ports: MEGACORE_SLURMCTLD_PORT (default 6817) and MEGACORE_SLURMD_PORT (6818); CPUs: MEGACORE_SLURM_CPUS.
set -euo pipefail
state=${1:?usage: start.sh STATE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
for tool in slurmctld slurmd munged sbatch; do
  command -v "$tool" >/dev/null || { echo "start.sh: $tool not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "start.sh: must run as root (slurmd runs jobs as their users)" >&2; exit 2; }

"$here/stop.sh" "$state" >/dev/null 2>&1 || true
mkdir -p "$state"/{munge,state,spool,run,log}
state=$(cd "$state" && pwd)
chmod 755 "$state" "$state/munge"  # munged checks its socket directory's permissions

# munge: a fresh key, socket and pid under the state directory.
dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
  --pid-file="$state/munge/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed"

host=$(hostname -s)
# MEGACORE_SLURM_CPUS may declare more CPUs than the machine has, so that test jobs run side by side.
cpus=${MEGACORE_SLURM_CPUS:-$(nproc)}
sed -e "s|@STATE_DIR@|$state|g" -e "s|@CTLD_HOST@|$host|g" -e "s|@CTLD_ADDR@|127.0.0.1|g" \
    -e "s|@CTLD_PORT@|${MEGACORE_SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${MEGACORE_SLURMD_PORT:-6818}|g" \
    -e "s|@NODES@|NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN|" \
    "$here/slurm.conf.in" > "$state/slurm.conf"
export SLURM_CONF="$state/slurm.conf"

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N "$host"

# Ready when the node accepts jobs.
for _ in $(seq 1 60); do
  if sinfo -h -N -o "%T" 2>/dev/null | grep -qE "^(idle|mixed|allocated)"; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "start.sh: the node did not come up; see $state/log/" >&2
exit 1
