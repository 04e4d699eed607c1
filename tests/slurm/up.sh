#!/usr/bin/env bash
# tests/slurm/up.sh: bring up a real one-node SLURM cluster on this machine, for
# the batch-job tests (dask-jobqueue's SLURMCluster, SLURMRunner under srun/sbatch).
#
# Run as root (from .ci/run, or by hand):   bash tests/slurm/up.sh
#
# What it does, each step skipped when already done (so a second run is harmless
# and takes well under a second when SLURM is up):
#   1. apt-get installs slurmctld, slurmd, slurm-client and munge if missing;
#   2. creates /etc/munge/munge.key (munge:munge, 0400) if none, starts munged;
#   3. writes /etc/slurm/slurm.conf for this host (`hostname -s`): one node that
#      declares SLURM_UP_CPUS CPUs (default 8, more than the machine has, so a
#      driver job plus a few single-core worker jobs, or `srun -n 3`, fit on a
#      2-core box; slurmd accepts it through SlurmdParameters=config_overrides),
#      CPUs are the only consumable (CR_CPU): `--mem` up to RealMemory never
#      blocks a job, and memory is not enforced (no cgroups in a container);
#      partitions `debug` (the default) and `long`;
#   4. starts slurmctld and slurmd directly (no systemd here), restarting them if
#      the configuration changed, and waits (bounded) until the node is idle,
#      resuming it if it came up down/drained.
# It prints `slurm up: <host>, partitions debug,long` at the end, or exits non-zero
# with the tails of the daemon logs.
#
# Knobs (environment): SLURM_UP_CPUS (8), SLURM_UP_MEM_MB (MemTotal less 512 MiB),
# SLURM_UP_TIMEOUT (seconds to wait for the node, 60).
# Logs: /var/log/slurm/slurmctld.log, /var/log/slurm/slurmd.log, /var/log/munge/munged.log.
# Stop it all: `scontrol shutdown` (slurmctld and slurmd), then the munged pid in /run/munge.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
RUN_DIR=/run/slurm
TIMEOUT="${SLURM_UP_TIMEOUT:-60}"
HOST="$(hostname -s)"
PARTITIONS="debug,long"

log() { echo "slurm-up: $*" >&2; }

die() {
  log "FAILED: $*"
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    if [ -f "$f" ]; then
      echo "----- tail $f -----" >&2
      tail -n 30 "$f" >&2
    fi
  done
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-up: must run as root" >&2
  exit 1
fi

# ---------------------------------------------------------------- 1. packages
if ! command -v sbatch >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
  || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(slurmctld slurmd slurm-client munge)
  # Keep the packages' init scripts from starting daemons during the install (with
  # no slurm.conf yet, and pid files elsewhere): the Debian policy-rc.d mechanism,
  # put in place only for the install when the image has none.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=1
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # Try with the package lists as they are first; update them only if that fails
  # (a clean CI image has none).
  if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/tmp/slurm-up-apt.log 2>&1; then
    apt-get update -qq >>/tmp/slurm-up-apt.log 2>&1 || true
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>/tmp/slurm-up-apt.log 2>&1 \
      || { tail -n 30 /tmp/slurm-up-apt.log >&2; die "apt-get install ${pkgs[*]}"; }
  fi
  if [ "$own_policy" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# ---------------------------------------------------------------- 2. munge
# The package creates the munge user; the key must be owned by it and unreadable by others.
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
munged_alive() { # the pid in munged's pid file is a live munged
  local pid
  pid="$(cat /run/munge/munged.pid 2>/dev/null || true)"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = munged ]
}
if ! munge_ok; then
  if munged_alive; then
    # Running but not answering yet (just started): give it a moment, never a second one.
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.1; done
  else
    # No live munged. A dead one leaves a socket and lock behind that make a new one
    # refuse to start; --force takes them over. (--force would also start a second
    # munged beside a live one, which then breaks both: hence the check above.)
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force >/dev/null 2>&1 || die "munged did not start"
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.1; done
  fi
  munge_ok || die "munge -n | unmunge fails"
fi

# ---------------------------------------------------------------- 3. slurm.conf
CPUS="${SLURM_UP_CPUS:-8}"
if [ -n "${SLURM_UP_MEM_MB:-}" ]; then
  MEM_MB="$SLURM_UP_MEM_MB"
else
  MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  [ "$MEM_MB" -ge 1024 ] || MEM_MB=1024
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR" "$RUN_DIR"
chmod 0755 "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR" "$RUN_DIR"

new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by tests/slurm/up.sh: a one-node cluster for tests. Edits are overwritten.
ClusterName=testcluster
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
# CPUs are the only consumable resource: --mem is checked against RealMemory, never held.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Let slurmd use the node line below (more CPUs than the hardware has).
SlurmdParameters=config_overrides
# Reject at submit time a job that can never run here (e.g. -c 9 on the 8 CPUs)
# instead of leaving it pending forever.
EnforcePartLimits=ALL
# A node that was down comes back by itself when its slurmd registers.
ReturnToService=2
# Fast start and cancel: schedule on every event, short kill grace, short timeouts.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000,batch_sched_delay=0
KillWait=5
UnkillableStepTimeout=30
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
MinJobAge=120
CompleteWait=0
# Files.
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# The node and partitions.
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=long Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF

conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
  log "writing $CONF (node $HOST, CPUs=$CPUS, RealMemory=$MEM_MB)"
  install -m 0644 "$new_conf" "$CONF"
  conf_changed=1
fi

# ---------------------------------------------------------------- 4. daemons
# A daemon is running when the pid in its pid file is alive and is that program.
running() { # running <name>
  local pidfile="$RUN_DIR/$1.pid" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ]
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1; }

if [ "$conf_changed" -eq 1 ] && { running slurmctld || running slurmd; }; then
  # Node definitions change only on restart (scontrol reconfigure is not enough).
  log "configuration changed: restarting slurmctld and slurmd"
  scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 1 100); do
    running slurmctld || running slurmd || break
    sleep 0.2
  done
  if running slurmctld || running slurmd; then die "slurm daemons did not stop after scontrol shutdown"; fi
fi

if ! running slurmctld; then
  log "starting slurmctld"
  slurmctld -f "$CONF" || die "slurmctld did not start"
fi
if ! running slurmd; then
  log "starting slurmd"
  slurmd -f "$CONF" || die "slurmd did not start"
fi

# Wait until the node is idle (or busy with jobs: mixed/allocated on a second run).
deadline=$(( $(date +%s) + TIMEOUT ))
resumed=0
while :; do
  state="$(node_state || true)"
  case "$state" in
    idle | mixed | allocated | completing) break ;;
    down* | drain* | drained*)
      # Down (e.g. "Node unexpectedly rebooted") or drained from an earlier run.
      if [ "$resumed" -eq 0 ]; then
        log "node $HOST is $state: resuming it"
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        resumed=1
      fi
      ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    scontrol show node "$HOST" >&2 2>/dev/null || true
    die "node $HOST not idle after ${TIMEOUT}s (state: '${state:-none}')"
  fi
  sleep 0.5
done

echo "slurm up: $HOST, partitions $PARTITIONS"
