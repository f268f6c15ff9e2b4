#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine, for the workflow's Slurm
# test (tests/test_workflow.py::test_slurm_profile_runs_tiny_workflow).
#
# What it does, as ../shared/reference/platform.md records it works here:
# Debian's slurm-wlm + munge (installed if missing, needs root), a munge key,
# munged running as the munge user, /etc/slurm/slurm.conf with one node named
# after `hostname -s` (CPUs from nproc, memory from /proc/meminfo),
# select/cons_tres, proctrack/linuxproc, task/none and no accounting (so job
# status comes from squeue: the profile sets `slurm-status-command: squeue`),
# state/spool/log files under $MANIDP_SLURM_DIR. Then slurmctld and slurmd,
# and it waits until `sinfo` shows the node idle.
#
# Idempotent: a cluster that already answers is left alone; daemons that died
# are restarted. The config must sit at /etc/slurm/slurm.conf: with only
# SLURM_CONF set, `srun` inside jobs does not find it.
set -euo pipefail

SLURM_DIR=${MANIDP_SLURM_DIR:-/var/tmp/manidp-slurm}
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf

log() { echo "start_slurm: $*" >&2; }

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

if command -v sinfo >/dev/null && [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; then
    log "node $NODE is $(node_state): cluster already running"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "needs root to install and start Slurm (run: sudo $0)"
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: one key, the daemon as its own user.
install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force
    sleep 1
fi

# slurm.conf: one node with this machine's CPUs and memory, no accounting.
mkdir -p "$SLURM_DIR"/{state,spool,log} /etc/slurm
CPUS=$(nproc)
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$CONF.new" <<EOF
# Written by .ci/start_slurm.sh: a one-node test cluster.
ClusterName=manidp
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Keep finished jobs visible to squeue for 5 minutes: without accounting,
# squeue is how the executor learns that a job finished.
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
    mv "$CONF.new" "$CONF"
    # A changed config needs fresh daemons.
    for pidfile in "$SLURM_DIR"/slurmctld.pid "$SLURM_DIR"/slurmd.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 1
else
    rm -f "$CONF.new"
fi

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running "$SLURM_DIR/slurmctld.pid"; then
    log "starting slurmctld"
    slurmctld
fi
if ! running "$SLURM_DIR/slurmd.pid"; then
    log "starting slurmd"
    slurmd
fi

for _ in $(seq 60); do
    state=$(node_state)
    if [[ $state == idle ]]; then
        log "node $NODE idle ($CPUS CPUs, $MEM_MB MB); logs in $SLURM_DIR/log"
        exit 0
    fi
    if [[ $state =~ ^(down|drained|draining|fail)$ ]]; then
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    fi
    sleep 1
done
log "node $NODE did not become idle (state: '$(node_state)'); see $SLURM_DIR/log"
exit 1
