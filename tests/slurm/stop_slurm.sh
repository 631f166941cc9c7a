#!/bin/bash
# Undo start_slurm.sh: cancel every job, shut slurmctld and slurmd down, then stop munged.
# Safe to run when nothing is up.
export PATH="$PATH:/usr/sbin:/sbin"
alive() { grep -qs '^State:[[:space:]]*[^Z]' "/proc/$1/status"; }   # a zombie is gone
daemons=$(cat /run/slurmd.pid /run/slurmctld.pid 2>/dev/null)
if scontrol ping >/dev/null 2>&1; then
  squeue -h -o %A | xargs -r scancel
  for _ in $(seq 40); do [ -z "$(squeue -h -o %A)" ] && break; sleep 0.25; done
  scontrol shutdown
fi
for pid in $daemons $(cat /run/munge/munged.pid 2>/dev/null); do   # munged after SLURM
  alive "$pid" && kill "$pid"
  for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
done
exit 0
