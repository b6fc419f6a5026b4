#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for tests and laptops.
#
#   scripts/slurm/local_cluster.sh up       install (Debian/apt, root) and start munge + slurm
#   scripts/slurm/local_cluster.sh down     stop the daemons this script started (by PID)
#   scripts/slurm/local_cluster.sh status   print the node state; exit 0 if the node is usable
#   scripts/slurm/local_cluster.sh env      print `export SLURM_CONF=...` for clients
#
# Everything the daemons write (config, spool, state, logs, PID files) lives in one private
# directory, $FLEX_SLURM_DIR (default /tmp/flex_surgery_slurm), so `down` removes the whole
# cluster without touching a system SLURM. The node advertises CPUs=8 whatever the machine has
# (SlurmdParameters=config_overrides), so a 4-task job fits on a 2-core CI runner.
#
# Exit codes: 0 ok; 1 status: not running; 3 SLURM cannot be installed here (not root, no apt,
# install failed) -- callers skip SLURM tests with the reason written to $FLEX_SLURM_DIR/unavailable;
# 4 the daemons did not come up (see the logs in $FLEX_SLURM_DIR/log).
set -euo pipefail

STATE_DIR="${FLEX_SLURM_DIR:-/tmp/flex_surgery_slurm}"
CONF="$STATE_DIR/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# written by flex_surgery scripts/slurm/local_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
EXIT_UNAVAILABLE=3
EXIT_START_FAILED=4
export SLURM_CONF="$CONF"

log() { echo "[local_cluster] $*" >&2; }

unavailable() {
    mkdir -p "$STATE_DIR"
    echo "$*" >"$STATE_DIR/unavailable"
    log "unavailable: $*"
    exit "$EXIT_UNAVAILABLE"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || unavailable "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || unavailable "SLURM is not installed and there is no apt-get"
    log "installing ${PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$STATE_DIR/apt.log" 2>&1
    then
        apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$STATE_DIR/apt.log" 2>&1 \
            || unavailable "apt-get install ${PACKAGES[*]} failed (see $STATE_DIR/apt.log)"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving (ours from an earlier `up`, or the system's)
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # munged runs as user munge and writes its PID file where that user may write; copy it
    # into our state directory so that `down` stops exactly this daemon.
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid \
        || { log "munged failed to start"; exit "$EXIT_START_FAILED"; }
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/munged.pid "$STATE_DIR/pid/munged.pid"
            return 0
        fi
        sleep 0.1
    done
    log "munged does not answer"
    exit "$EXIT_START_FAILED"
}

write_config() {
    local host
    host="$(hostname -s)"
    mkdir -p "$STATE_DIR"/{spool/ctld,spool/d,log,pid}
    cat >"$CONF" <<CONF
$MARKER
ClusterName=flexlocal
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdParameters=config_overrides
KillOnBadExit=1
MinJobAge=60
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldPidFile=$STATE_DIR/pid/slurmctld.pid
SlurmdPidFile=$STATE_DIR/pid/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
DefMemPerCPU=1000
NodeName=${host} NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
    # Clients (sbatch, srun inside jobs, submitit) read /etc/slurm/slurm.conf unless SLURM_CONF
    # says otherwise: point it at ours, but never replace a configuration we did not write.
    mkdir -p /etc/slurm
    if [[ ! -e "$SYSTEM_CONF" ]] || grep -qF "$MARKER" "$SYSTEM_CONF" 2>/dev/null; then
        ln -sfn "$CONF" "$SYSTEM_CONF"
    fi
}

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n1; }

wait_for_node() {
    local state=""
    for i in $(seq 150); do
        state="$(node_state)"
        case "$state" in
            idle|mix|alloc|comp) return 0 ;;
            down*|drain*|unk*)
                if (( i % 10 == 0 )); then
                    scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
                fi ;;
        esac
        sleep 0.2
    done
    log "node state is '${state:-none}' after 30 s"
    return 1
}

up() {
    mkdir -p "$STATE_DIR/pid"
    rm -f "$STATE_DIR/unavailable"
    if pid_alive "$STATE_DIR/pid/slurmctld.pid" && pid_alive "$STATE_DIR/pid/slurmd.pid" \
        && wait_for_node; then
        log "already up ($(node_state))"
        return 0
    fi
    install_packages
    write_config
    start_munge
    pid_alive "$STATE_DIR/pid/slurmctld.pid" || slurmctld -f "$CONF" \
        || { log "slurmctld failed (see $STATE_DIR/log)"; exit "$EXIT_START_FAILED"; }
    pid_alive "$STATE_DIR/pid/slurmd.pid" || slurmd -f "$CONF" \
        || { log "slurmd failed (see $STATE_DIR/log)"; exit "$EXIT_START_FAILED"; }
    wait_for_node || { tail -n 20 "$STATE_DIR"/log/*.log >&2 || true; exit "$EXIT_START_FAILED"; }
    log "up: node $(hostname -s) $(node_state), SLURM_CONF=$CONF"
}

stop_pidfile() {
    local file="$1" pid
    [[ -f "$file" ]] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    if pid_alive "$STATE_DIR/pid/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$STATE_DIR/pid/slurmd.pid"
    stop_pidfile "$STATE_DIR/pid/slurmctld.pid"
    stop_pidfile "$STATE_DIR/pid/munged.pid"
    if [[ -L "$SYSTEM_CONF" && "$(readlink "$SYSTEM_CONF")" == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
    log "down"
}

status() {
    if [[ -f "$STATE_DIR/unavailable" ]]; then
        echo "unavailable: $(cat "$STATE_DIR/unavailable")"
        return 1
    fi
    local state
    state="$(node_state)"
    echo "node: ${state:-not running}"
    [[ "$state" =~ ^(idle|mix|alloc|comp) ]]
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
