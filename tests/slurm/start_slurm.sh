#!/bin/bash
# Bring up a one-node SLURM cluster on this machine (Debian, root, no systemd) for the launcher
# tests: installs the daemons if needed, writes a slurm.conf for this host only, starts munged,
# slurmctld and slurmd, and returns once the node is idle. Safe to run again while it is up.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

if ! type -P sbatch srun slurmctld slurmd munged tini >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-client slurmctld slurmd munge tini
fi

alive() { grep -qs '^State:[[:space:]]*[^Z]' "/proc/$1/status"; }   # a zombie is not alive
alive_from() { [ -s "$1" ] && alive "$(cat "$1")"; }

# munge authenticates every SLURM message: one key, one daemon running as user munge.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
fi
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- munged --force </dev/null >/dev/null 2>&1
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
fi

# One partition with this host, its CPUs and memory as slurmd sees them. Addresses are pinned to
# 127.0.0.1 so nothing depends on DNS. proctrack/pgid: a job's background children end with it.
# MinJobAge=5 keeps `sbatch -W` polling every 2 s instead of backing off. A job credential lives
# cred_expire seconds, and a requeued job waits that long before it starts again (default 120);
# then a scheduler starts it, every sched_interval (default 60) or bf_interval (30) seconds.
host=$(hostname -s)
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=psana-ipc-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
MinJobAge=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$(slurmd -C | head -n 1) NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# A controller already up (started by an older copy of this script) takes this configuration.
if alive_from /run/slurmctld.pid; then scontrol reconfigure; else
  slurmctld -c </dev/null >/dev/null 2>&1   # -c: no saved state
fi
# PID 1 here reaps orphans late, which holds every job end for seconds: slurmd runs under a
# subreaper (tini -s) that reaps at once.
alive_from /run/slurmd.pid || { setsid tini -s -- slurmd -D </dev/null >/dev/null 2>&1 & }

for _ in $(seq 120); do
  if [ "$(sinfo -h -N -n "$host" -o %t 2>/dev/null)" = idle ]; then sinfo; exit 0; fi
  sleep 0.25
done
echo "start_slurm.sh: node $host is not idle after 30 s" >&2
sinfo -N -l >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
