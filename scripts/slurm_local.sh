#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (slurmctld + slurmd on localhost, munge auth), for the sweep
# integration test and for trying `hydra/launcher=slurm` without a cluster.
#
#   sudo scripts/slurm_local.sh install    # apt-get install slurm-wlm munge (Debian)
#   sudo scripts/slurm_local.sh start      # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd
#   scripts/slurm_local.sh status          # sinfo
#   sudo scripts/slurm_local.sh stop       # stops the daemons by their pid files
#
# State, spool, logs and pid files live under $SLURM_LOCAL_DIR (default /tmp/diffguide-slurm). Needs root: the
# daemons run as root (SlurmUser=root) and munge's key must belong to the munge user.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/diffguide-slurm}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_local.sh $1: needs root" >&2; exit 2; }; }

install() {
    need_root install
    apt-get install -y -q slurm-wlm munge >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start() {
    need_root start
    command -v slurmctld >/dev/null || { echo "slurm_local.sh: slurmctld not installed (run: $0 install)" >&2; exit 3; }
    mkdir -p "$DIR"/{state,spool,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    chmod 700 /etc/munge
    if ! pgrep -x munged >/dev/null; then
        su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force
    fi
    cat > "$CONF" <<EOF
ClusterName=diffguide
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SchedulerType=sched/backfill
MpiDefault=none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || slurmctld
    [ -f "$DIR/slurmd.pid" ] && kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null || slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo
            return 0
        fi
        sleep 0.5
    done
    echo "slurm_local.sh: the node did not come up; see $DIR/log" >&2
    exit 4
}

stop() {
    for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
