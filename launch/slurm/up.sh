#!/bin/bash
# A one-node SLURM cluster on this machine for tests and local trials: Debian's slurm-wlm + munge,
# daemons started by hand (no systemd), root only. Idempotent: running daemons are left alone.
#   eval "$(launch/slurm/up.sh | tail -n1)"     # exports SLURM_CONF for sbatch / squeue / scontrol
# KEYETRON_SLURM_ROOT (default ~/.cache/keyetron-slurm) holds config, state and logs;
# KEYETRON_SLURM_PORT (default 16837) is slurmctld's port, slurmd takes the next one.
# Exit codes: 0 up, 3 SLURM cannot be installed here (not root / no apt-get), 1 it failed to start.
set -euo pipefail
R=${KEYETRON_SLURM_ROOT:-$HOME/.cache/keyetron-slurm}
PORT=${KEYETRON_SLURM_PORT:-16837}
HOST=$(hostname -s)
NCPU=$(nproc)
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))

if ! dpkg -s slurm-wlm munge >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm-wlm and munge are not installed and cannot be (needs root and apt-get)" >&2; exit 3
  fi
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
  install || { apt-get update -q >/dev/null && install; } || { echo "apt-get install slurm-wlm munge failed" >&2; exit 3; }
fi
[ "$(id -u)" = 0 ] || { echo "the daemons run as root (SlurmUser=root); run as root" >&2; exit 3; }

mkdir -p "$R/state" "$R/spool" "$R/munge"
chmod 700 "$R/munge"
export SLURM_CONF=$R/slurm.conf
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
cat > "$SLURM_CONF.new" <<EOF
ClusterName=keyetron
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$R/munge/munge.sock,cred_expire=10
StateSaveLocation=$R/state
SlurmdSpoolDir=$R/spool
SlurmctldPidFile=$R/slurmctld.pid
SlurmdPidFile=$R/slurmd.pid
SlurmctldLogFile=$R/slurmctld.log
SlurmdLogFile=$R/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$R/jobcomp.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# A changed config (another machine size, another port) needs the daemons restarted.
if [ -f "$SLURM_CONF" ] && ! cmp -s "$SLURM_CONF" "$SLURM_CONF.new"; then "$(dirname "$0")/down.sh"; fi
mv "$SLURM_CONF.new" "$SLURM_CONF"

alive() { [ -f "$R/$1" ] && kill -0 "$(cat "$R/$1")" 2>/dev/null; }
[ -f "$R/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$R/munge/munge.key"; chmod 400 "$R/munge/munge.key"; }
alive munge/munged.pid || /usr/sbin/munged --force --key-file="$R/munge/munge.key" --socket="$R/munge/munge.sock" \
  --pid-file="$R/munge/munged.pid" --log-file="$R/munge/munged.log" --seed-file="$R/munge/munged.seed"
alive slurmctld.pid || /usr/sbin/slurmctld
alive slurmd.pid || /usr/sbin/slurmd

for _ in $(seq 150); do  # up to 30 s
  sinfo -h -o %t 2>/dev/null | grep -q '^idle\|^mix\|^alloc' && break
  sleep 0.2
done
sinfo -h -o %t 2>/dev/null | grep -q '^idle\|^mix\|^alloc' || {
  echo "the node did not come up; see $R/slurmctld.log and $R/slurmd.log" >&2; sinfo >&2 || true; exit 1; }
sinfo -h -o '%P %a %D %t %N' >&2
echo "export SLURM_CONF=$SLURM_CONF"
