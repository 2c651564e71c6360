# Sourced by docker/e2e/run.sh. engine_start: use the engine DOCKER_HOST (or /var/run/docker.sock) answers
# on, else start a private containerd + dockerd whose every path (data, exec root, sockets, pid files) lies
# under one temp dir, with no bridge and no iptables rules (builds and containers use the host network).
# engine_stop stops only those two processes, by the PIDs this shell started; another engine is never
# touched (not even the system containerd socket: this dockerd gets its own containerd).

E2E_ENGINE_DIR=""
E2E_DOCKERD_PID=""
E2E_CONTAINERD_PID=""

engine_start() {
    if docker info >/dev/null 2>&1; then
        echo "engine: using the running engine at ${DOCKER_HOST:-unix:///var/run/docker.sock}"
        return 0
    fi
    command -v dockerd >/dev/null && command -v containerd >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq docker.io; }
    # Short path: unix socket paths are limited to 108 bytes.
    E2E_ENGINE_DIR=$(mktemp -d /tmp/sse2e.XXXXXX)
    local d=$E2E_ENGINE_DIR
    # E2E_DATA_ROOT: keep images and build cache there between runs (default: under the temp dir, removed).
    local data=${E2E_DATA_ROOT:-$d/data}
    mkdir -p "$d/containerd-root" "$d/containerd-state" "$data" "$d/exec"
    containerd --address "$d/containerd.sock" --root "$d/containerd-root" --state "$d/containerd-state" \
        >"$d/containerd.log" 2>&1 &
    E2E_CONTAINERD_PID=$!
    local i
    for i in $(seq 100); do [[ -S $d/containerd.sock ]] && break; sleep 0.1; done
    [[ -S $d/containerd.sock ]] || { tail -20 "$d/containerd.log"; return 1; }
    dockerd --data-root "$data" --exec-root "$d/exec" --host "unix://$d/docker.sock" \
        --pidfile "$d/dockerd.pid" --containerd "$d/containerd.sock" \
        --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
        >"$d/dockerd.log" 2>&1 &
    E2E_DOCKERD_PID=$!
    export DOCKER_HOST="unix://$d/docker.sock"
    for i in $(seq 300); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    docker info >/dev/null 2>&1 || { tail -30 "$d/dockerd.log"; return 1; }
    echo "engine: private dockerd pid $E2E_DOCKERD_PID (containerd $E2E_CONTAINERD_PID) at $DOCKER_HOST," \
        "storage $(docker info --format '{{.Driver}}')"
}

# Stop (TERM, then KILL after $1 s) one PID this shell started, and wait for it.
_stop_pid() {
    local pid=$1 wait_s=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq $((wait_s * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

engine_stop() {
    [[ -n $E2E_ENGINE_DIR ]] || return 0
    # Containers first (their shims would keep mounts under the data root busy).
    local ids
    ids=$(docker ps -q 2>/dev/null || true)
    [[ -z $ids ]] || docker kill $ids >/dev/null 2>&1 || true
    _stop_pid "$E2E_DOCKERD_PID" 30
    _stop_pid "$E2E_CONTAINERD_PID" 15
    # Leftover mounts under our own dir only (overlay layers, netns, shm), deepest first.
    local root
    for root in "$E2E_ENGINE_DIR" ${E2E_DATA_ROOT:+"$E2E_DATA_ROOT"}; do
        awk -v d="$root/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r \
            | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    done
    rm -rf "$E2E_ENGINE_DIR"
    echo "engine: private dockerd stopped, $E2E_ENGINE_DIR removed"
    E2E_ENGINE_DIR=""
}
