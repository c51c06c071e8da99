#!/usr/bin/env bash
# A SLURM cluster of one or several nodes on 127.0.0.1, for trying the launchers and for their tests (needs root).
#
#   bash scripts/local_slurm.sh up [--nodes N]   install slurm-wlm + munge (Debian/Ubuntu) if missing, start
#                                                munged, slurmctld and one slurmd per node, wait until every
#                                                node is idle (N: default 1)
#   bash scripts/local_slurm.sh down             stop them and remove the configuration this script wrote
#
# One node is named after this machine and offers every CPU and most of its memory. Several nodes are
# node0, node1, ...: one `slurmd -N nodeI` each, on a port of its own, each offering an equal share of the
# CPUs and of the memory, but at least 2 CPUs and 12 GB where the machine has them, so the one-node launcher
# tests fit one node of a small machine (the nodes then overlap). Their names do not resolve: as on clusters
# whose node names are not host names, a job finds a node's address in `scontrol show node` (NodeAddr, here
# 127.0.0.1). Every node has ADALA_SLURM_GPUS (default 2) stand-in GPUs: a generic resource without device
# files, so `--gpus-per-node` requests schedule on a CPU-only machine; the jobs themselves then run on CPU.
# Files live in ADALA_SLURM_DIR (default /tmp/adala-slurm).
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

# The node names for N nodes: this machine's name for one, node0 ... node{N-1} for several.
node_names() {
    if (( $1 == 1 )); then hostname -s; else seq -f 'node%g' 0 $(($1 - 1)); fi
}

write_config() {
    local nodes=$1 host cpus all_mem mem names i name
    host=$(hostname -s)
    cpus=$(( $(nproc) / nodes ))
    (( nodes == 1 || cpus >= 2 )) || cpus=2
    all_mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    mem=$(( all_mem / nodes ))
    (( mem >= 12288 )) || mem=$(( all_mem < 12288 ? all_mem : 12288 ))
    names=$(node_names "$nodes" | paste -sd,)
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
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
# Each slurmd reads a copy of this file that adds its own spool directory, pid file and log (see below).
DebugFlags=NO_CONF_HASH
ReturnToService=2
MinJobAge=600
KillWait=60
JobRequeue=1
CONF
    # Each node's slurmd listens on a port of its own; all of them run on this machine.
    echo "$MARK" > "$CONF_DIR/gres.conf"
    i=0
    for name in $(node_names "$nodes"); do
        echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((6818 + i)) CPUs=$cpus" \
             "RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN" >> "$CONF_DIR/slurm.conf"
        # Stand-ins for GPU device files: slurmd counts the files a gres.conf line names.
        mkdir -p "$STATE/dev/$name" "$STATE/d/$name"
        for ((g = 0; g < GPUS; g++)); do touch "$STATE/dev/$name/gpu$g"; done
        echo "NodeName=$name Name=gpu File=$STATE/dev/$name/gpu[0-$((GPUS - 1))]" >> "$CONF_DIR/gres.conf"
        i=$((i + 1))
    done
    echo "PartitionName=local Nodes=$names Default=YES MaxTime=INFINITE State=UP" >> "$CONF_DIR/slurm.conf"
    # Several slurmd on one machine must not share a pid file (a new one kills the old) or a spool directory.
    for name in $(node_names "$nodes"); do
        mkdir -p "$STATE/conf/$name"
        cp "$CONF_DIR/gres.conf" "$STATE/conf/$name/gres.conf"
        { cat "$CONF_DIR/slurm.conf"
          echo "SlurmdSpoolDir=$STATE/d/$name"
          echo "SlurmdPidFile=$STATE/slurmd-$name.pid"
          echo "SlurmdLogFile=$STATE/log/slurmd-$name.log"; } > "$STATE/conf/$name/slurm.conf"
    done
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
    local nodes=1 name
    while (( $# )); do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) die "unknown option $1; usage: bash scripts/local_slurm.sh up [--nodes N]" ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes $nodes: give a whole number of nodes, at least 1"
    [[ $(id -u) == 0 ]] || die "run as root (the daemons of this local cluster run as root)"
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
        die "SLURM daemons are already running; stop them first (bash scripts/local_slurm.sh down)"
    fi
    install_packages
    write_config "$nodes"
    start_munge
    slurmctld
    for name in $(node_names "$nodes"); do slurmd -f "$STATE/conf/$name/slurm.conf" -N "$name"; done
    for _ in $(seq 60); do
        if (( $(sinfo -h -N -o %t 2>/dev/null | grep -cx idle) == nodes )); then
            sinfo -N
            return
        fi
        sleep 1
    done
    tail -n 20 "$STATE"/log/*.log >&2 || true
    die "the nodes did not become idle in 60 s"
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
    up) shift; up "$@" ;;
    down) down ;;
    *) die "usage: bash scripts/local_slurm.sh up [--nodes N] | down" ;;
esac
