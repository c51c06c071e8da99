#!/usr/bin/env bash
# A one-node SLURM cluster on 127.0.0.1, for trying the launchers and for their tests (needs root).
#
#   bash scripts/local_slurm.sh up      install slurm-wlm + munge (Debian/Ubuntu) if missing, start munged,
#                                       slurmctld and slurmd, wait until the node is idle
#   bash scripts/local_slurm.sh down    stop them and remove the configuration this script wrote
#
# The node offers every CPU and most of the memory of this machine, and ADALA_SLURM_GPUS (default 2) GPUs
# as a generic resource without device files, so `--gpus-per-node` requests schedule on a CPU-only machine;
# the jobs themselves then run on CPU. Files live in ADALA_SLURM_DIR (default /tmp/adala-slurm).
set -euo pipefail

STATE=${ADALA_SLURM_DIR:-/tmp/adala-slurm}
GPUS=${ADALA_SLURM_GPUS:-2}
CONF_DIR=/etc/slurm
MARK="# written by adala scripts/local_slurm.sh"

die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and apt-get is not available; install them"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script; not touching a real cluster's configuration"
    fi
    mkdir -p "$CONF_DIR" "$STATE"/{ctld,d,log}
    cat > "$CONF_DIR/slurm.conf" <<CONF
$MARK
ClusterName=adala-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire seconds after its requeue (default 120).
AuthInfo=cred_expire=10
# Look for startable jobs every 2 s (default 60): requeued jobs and dependents start promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
EnforcePartLimits=ALL
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ReturnToService=2
MinJobAge=600
KillWait=60
JobRequeue=1
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    # Stand-ins for GPU device files: slurmd counts the files a gres.conf line names.
    mkdir -p "$STATE/dev"
    for ((i = 0; i < GPUS; i++)); do touch "$STATE/dev/gpu$i"; done
    echo "$MARK" > "$CONF_DIR/gres.conf"
    echo "NodeName=$host Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]" >> "$CONF_DIR/gres.conf"
}

start_munge() {
    pgrep -x munged >/dev/null && return
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        head -c 1024 /dev/urandom > /etc/munge/munge.key
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 400 /etc/munge/munge.key
    su -s /bin/sh munge -c /usr/sbin/munged
}

up() {
    [[ $(id -u) == 0 ]] || die "run as root (the daemons run as root on this one-node cluster)"
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            sinfo
            return
        fi
        sleep 1
    done
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "the node did not become idle in 60 s"
}

down() {
    scancel --user=root 2>/dev/null || true
    for daemon in slurmd slurmctld; do
        pkill -x "$daemon" 2>/dev/null || true
    done
    for _ in $(seq 30); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 1; done
    for file in slurm.conf gres.conf; do
        if [[ -f $CONF_DIR/$file ]] && grep -qF "$MARK" "$CONF_DIR/$file"; then rm -f "$CONF_DIR/$file"; fi
    done
    rm -rf "$STATE"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) die "usage: bash scripts/local_slurm.sh up|down" ;;
esac
