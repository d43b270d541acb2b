#!/bin/bash
# Stop the one-node cluster that up.sh started, by pid file only: jobs first, munge last.
R=${KEYETRON_SLURM_ROOT:-$HOME/.cache/keyetron-slurm}
export SLURM_CONF=$R/slurm.conf
alive() { [ -f "$R/$1" ] && kill -0 "$(cat "$R/$1")" 2>/dev/null; }
if alive slurmctld.pid; then
  scancel --full --partition debug 2>/dev/null
  for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop() {
  alive "$1" || return 0
  local p; p=$(cat "$R/$1"); kill "$p" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null
}
stop slurmd.pid; stop slurmctld.pid; stop munge/munged.pid
exit 0
