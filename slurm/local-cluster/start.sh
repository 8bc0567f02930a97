#!/usr/bin/env bash
# Start a real Slurm cluster on this machine (root; `apt-get install slurmctld slurmd slurm-client
# munge`): one node, or MEGACORE_SLURM_NODES=N nodes each in its own network namespace. Everything
# lives under STATE_DIR; prints the SLURM_CONF to export.
#
#   slurm/local-cluster/start.sh STATE_DIR        -> prints "export SLURM_CONF=STATE_DIR/slurm.conf"
#   slurm/local-cluster/stop.sh STATE_DIR
#
# Ports: MEGACORE_SLURMCTLD_PORT (default 6817) and MEGACORE_SLURMD_PORT (6818). CPUs per node:
# MEGACORE_SLURM_CPUS (default: this machine's; more lets test jobs run side by side).
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

cpus=${MEGACORE_SLURM_CPUS:-$(nproc)}
nodes=${MEGACORE_SLURM_NODES:-1}
port_ctld=${MEGACORE_SLURMCTLD_PORT:-6817}
port_slurmd=${MEGACORE_SLURMD_PORT:-6818}
conf="$state/slurm.conf"
render_conf() {  # CTLD_HOST CTLD_ADDR NODE_LINES
  sed -e "s|@STATE_DIR@|$state|g" -e "s|@CTLD_HOST@|$1|g" -e "s|@CTLD_ADDR@|$2|g" \
      -e "s|@CTLD_PORT@|$port_ctld|g" -e "s|@SLURMD_PORT@|$port_slurmd|g" -e "s|@NODES@|$3|" \
      "$here/slurm.conf.in" > "$conf"
}
export SLURM_CONF="$conf"

if [ "$nodes" = 1 ]; then
  host=$(hostname -s)
  render_conf "$host" 127.0.0.1 "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN"
  slurmctld -f "$conf"
  slurmd -f "$conf" -N "$host"
  client=""
else
  # One network namespace per node, each with its own address (10.77.0.1I/24 on a bridge that lives in
  # a namespace of its own), hostname and /etc/hosts: jobs see N real hosts. Nothing changes outside
  # these namespaces. Client commands run inside node1's: nsenter --net=/run/netns/<prefix>n1 sbatch ...
  prefix="mc$(printf '%s' "$state" | md5sum | cut -c1-6)"
  echo "$prefix" > "$state/netns-prefix"
  printf '127.0.0.1 localhost\n' > "$state/hosts"
  lines=""
  ip netns add "${prefix}br"
  ip -n "${prefix}br" link add br0 type bridge
  ip -n "${prefix}br" link set br0 up
  for i in $(seq 1 "$nodes"); do
    ns="${prefix}n$i"; addr="10.77.0.$((10 + i))"
    ip netns add "$ns"
    ip link add "${prefix}v$i" netns "${prefix}br" type veth peer name eth0 netns "$ns"
    ip -n "${prefix}br" link set "${prefix}v$i" master br0 up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    printf '%s node%s\n' "$addr" "$i" >> "$state/hosts"
    lines="${lines}NodeName=node$i NodeAddr=$addr CPUs=$cpus RealMemory=1000 State=UNKNOWN\n"
  done
  render_conf node1 10.77.0.11 "$lines"
  for i in $(seq 1 "$nodes"); do
    daemons="slurmd -f '$conf' -N node$i"
    [ "$i" = 1 ] && daemons="slurmctld -f '$conf'; $daemons"
    # nsenter + unshare rather than `ip netns exec`, which remounts /sys (slurmd then fails on cgroups).
    nsenter --net="/run/netns/${prefix}n$i" unshare --uts --mount sh -c \
      "hostname node$i; mount --bind '$state/hosts' /etc/hosts; $daemons"
  done
  client="nsenter --net=/run/netns/${prefix}n1"
fi

# Ready when every node accepts jobs.
for _ in $(seq 1 60); do
  if [ "$($client sinfo -h -N -o "%T" 2>/dev/null | grep -cE "^(idle|mixed|allocated)")" = "$nodes" ]; then
    echo "export SLURM_CONF=$conf"
    [ -n "$client" ] && echo "# client commands: $client <command>"
    exit 0
  fi
  sleep 0.5
done
echo "start.sh: the nodes did not come up; see $state/log/" >&2
exit 1
