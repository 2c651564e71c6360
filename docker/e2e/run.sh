#!/usr/bin/env bash
# `make docker-e2e`: build the images and run docker/compose.yml for real on this machine, then check it
# end to end (docker/e2e/e2e.py). Phases (each timed, see bench/results/docker_e2e.md):
#   engine      a running engine, else a private dockerd (docker/e2e/engine.sh), stopped at exit
#   wheelhouse  requirements.lock as wheels on the host (pip download, CPU torch), cached in $CACHE
#   base        python:3.11-slim-bookworm if it can be pulled, else a debootstrap bookworm + python3.11
#               (docker/e2e/base.sh, tarball cached in $CACHE) imported as softserve-e2e/python:3.11-bookworm
#   redis/nginx redis:7 / nginxinc/nginx-unprivileged:1.27 if they can be pulled, else docker/e2e/Dockerfile.redis/.nginx
#   image       docker/Dockerfile with BASE_IMAGE and the wheelhouse (pip --no-index)
#   stack       docker/e2e/e2e.py (compose up/restart/down/up, uploads, load, trainer)
# Env: SOFTSERVE_E2E_CACHE (default /var/cache/softserve-e2e), E2E_PORT_BASE (default 18100: nginx on it,
# the replicas on +1/+2, Redis on +279; all on 127.0.0.1), E2E_KEEP=1 keeps the stack's volumes,
# E2E_DATA_ROOT=DIR keeps the private engine's images and build cache in DIR between runs (faster reruns).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
CACHE=${SOFTSERVE_E2E_CACHE:-/var/cache/softserve-e2e}
PORT_BASE=${E2E_PORT_BASE:-18100}
PROJECT=softserve-e2e
WORK=$(mktemp -d /tmp/softserve-e2e-run.XXXXXX)
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin needed, --network host for apt
mkdir -p "$CACHE"
: >"$WORK/phases.tsv"

# shellcheck source=docker/e2e/engine.sh
source docker/e2e/engine.sh

COMPOSE=(docker-compose -p "$PROJECT" --env-file "$WORK/e2e.env" -f docker/compose.yml -f docker/e2e/compose.e2e.yml)
STATUS=fail

PHASE=""
PHASE_START=0
phase_end() {  # phase_end ok|FAILED: record the current phase's duration
    local ms secs
    ms=$(( ($(date +%s%N) - PHASE_START) / 1000000 ))
    secs=$((ms / 1000)).$(( (ms % 1000) / 100 ))
    printf '%s\t%.1f\t%s\n' "$PHASE" "$secs" "$1" >>"$WORK/phases.tsv"
    printf '==== %s: %s in %.1f s\n' "$PHASE" "$1" "$secs"
    PHASE=""
}
phase() {  # phase NAME COMMAND...: run it under set -e (a failure exits; cleanup records it FAILED)
    PHASE=$1
    PHASE_START=$(date +%s%N)
    shift
    echo "==== $PHASE"
    "$@"
    phase_end ok
}

info() { printf '%s\t%s\n' "$1" "$2" >>"$WORK/info.tsv"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [[ -z $PHASE ]] || phase_end FAILED
    if [[ -n ${DOCKER_HOST:-} ]] || docker info >/dev/null 2>&1; then
        if [[ $rc != 0 ]]; then
            echo "==== logs (last 40 lines per service)"
            "${COMPOSE[@]}" logs --no-color --tail 40 2>/dev/null | tail -200
        fi
        docker image ls --format '{{.Repository}}:{{.Tag}}' 2>/dev/null | grep -E '^(softserve|redis|nginx|python)' \
            | while read -r tag; do
                printf '%s\t%s\n' "$tag" "$(docker image inspect -f '{{.Size}}' "$tag")"
            done >"$WORK/images.tsv"
        echo "==== image sizes"
        awk -F'\t' '{printf "  %-45s %6.0f MB\n", $1, $2 / 1e6}' "$WORK/images.tsv"
        if [[ -f $WORK/e2e.env ]]; then
            "${COMPOSE[@]}" --profile trainer down --remove-orphans $([[ ${E2E_KEEP:-} == 1 ]] || echo -v) \
                >/dev/null 2>&1
        fi
        # A kept data root: drop what this run left unreferenced (the previous softserve:e2e and its
        # layers), so it holds one set of images however many runs use it.
        [[ -z ${E2E_DATA_ROOT:-} ]] || docker image prune -f >/dev/null 2>&1
    fi
    engine_stop
    find docker/wheelhouse \( -name '*.whl' -o -name extra-requirements.txt \) -delete 2>/dev/null
    [[ $rc == 0 ]] && STATUS=pass
    "$PY" docker/e2e/report.py --work "$WORK" --status "$STATUS"
    echo "==== make docker-e2e: $STATUS"
    awk -F'\t' '{printf "  %-12s %-7s %7.1f s\n", $1, $3, $2}' "$WORK/phases.tsv"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wheelhouse() {
    local stamp lock_sum
    lock_sum=$(sha256sum requirements.lock | cut -c1-16)
    stamp=$CACHE/wheelhouse/.lock-$lock_sum
    if [[ ! -f $stamp ]]; then
        rm -rf "$CACHE/wheelhouse" && mkdir -p "$CACHE/wheelhouse"
        # The host's pip configuration (find-links, indexes) answers torch==2.13.0 with its +cpu wheel.
        nice -n 10 "$PY" -m pip download --quiet --no-deps --only-binary=:all: -r requirements.lock \
            -d "$CACHE/wheelhouse" 2> >(grep -v 'is ignored: it is neither' >&2)
        ls "$CACHE"/wheelhouse/torch-*+cpu-*.whl >/dev/null || { echo "wheelhouse: no CPU torch wheel" >&2; return 1; }
        touch "$stamp"
    fi
    find docker/wheelhouse \( -name '*.whl' -o -name extra-requirements.txt \) -delete
    cp -l "$CACHE"/wheelhouse/*.whl docker/wheelhouse/ 2>/dev/null || cp "$CACHE"/wheelhouse/*.whl docker/wheelhouse/
    info wheelhouse "$(find docker/wheelhouse -name '*.whl' | wc -l) wheels, $(du -shL docker/wheelhouse | cut -f1)"
}

pull() { timeout 90 docker pull -q "$1" >/dev/null 2>&1; }

base_image() {
    if pull python:3.11-slim-bookworm; then
        BASE_IMAGE=python:3.11-slim-bookworm
    else
        local tar=$CACHE/base-bookworm-py311.tar.gz
        [[ -f $tar ]] || docker/e2e/base.sh "$tar"
        BASE_IMAGE=softserve-e2e/python:3.11-bookworm
        # (Imported once per data root: a new import is a new image id, which would void the build cache.)
        docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
            || docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' "$tar" "$BASE_IMAGE" >/dev/null
        # Debian's python is 3.11.2: redis-py needs async-timeout below 3.11.3 (a marker the lock, made on a
        # newer 3.11, leaves out). The Dockerfile installs docker/wheelhouse/extra-requirements.txt too.
        mkdir -p "$CACHE/extra"
        ls "$CACHE"/extra/async_timeout-*.whl >/dev/null 2>&1 \
            || "$PY" -m pip download --quiet --no-deps --only-binary=:all: async-timeout -d "$CACHE/extra" \
                2> >(grep -v 'is ignored: it is neither' >&2)
        cp "$CACHE"/extra/async_timeout-*.whl docker/wheelhouse/
        basename "$CACHE"/extra/async_timeout-*.whl | sed -E 's/^async_timeout-([^-]+)-.*/async-timeout==\1/' \
            >docker/wheelhouse/extra-requirements.txt
    fi
    info base_image "$BASE_IMAGE"
}

service_images() {
    local name tag
    for name in redis nginx; do
        tag=$([[ $name == redis ]] && echo redis:7 || echo nginxinc/nginx-unprivileged:1.27)
        if ! pull "$tag"; then
            tag=softserve-e2e/$name:bookworm
            nice -n 10 docker build -q --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
                -f "docker/e2e/Dockerfile.$name" -t "$tag" docker/e2e >/dev/null
        fi
        info "${name}_image" "$tag"
        printf 'E2E_%s_IMAGE=%s\n' "${name^^}" "$tag" >>"$WORK/e2e.env"
    done
}

softserve_image() {
    nice -n 10 docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -f docker/Dockerfile -t softserve:e2e . >"$WORK/build.log" 2>&1 \
        || { cp "$WORK/build.log" "$CACHE/last-build.log"; tail -40 "$WORK/build.log"; return 1; }
    info softserve_image softserve:e2e
}

stack() {
    "$PY" docker/e2e/e2e.py --env-file "$WORK/e2e.env" --steps "$WORK/steps.jsonl" --project "$PROJECT"
}

# The nginx config the e2e stack mounts: docker/nginx.conf with loopback listen/upstream addresses.
sed -e "s/listen 8080;/listen 127.0.0.1:$PORT_BASE;/" \
    -e "s/server server-1:8000/server 127.0.0.1:$((PORT_BASE + 1))/" \
    -e "s/server server-2:8000/server 127.0.0.1:$((PORT_BASE + 2))/" docker/nginx.conf >"$WORK/nginx.conf"
grep -q "listen 127.0.0.1:$PORT_BASE;" "$WORK/nginx.conf" && grep -q "127.0.0.1:$((PORT_BASE + 2))" "$WORK/nginx.conf" \
    || { echo "docker/nginx.conf: listen or upstream lines changed" >&2; exit 1; }
cat >"$WORK/e2e.env" <<ENV
SOFTSERVE_ADMIN_KEY=e2e-admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
SOFTSERVE_IMAGE=softserve:e2e
SOFTSERVE_MAX_BODY_BYTES=67108864
SOFTSERVE_STORE_POLL_INTERVAL=1.0
HF_HUB_OFFLINE=1
REDIS_MAXMEMORY=0
TRAIN_METHOD=prompt_tuning
TRAIN_TASK_ID=sentiment
TRAIN_STEPS=${E2E_TRAIN_STEPS:-3}
HTTP_PORT=$PORT_BASE
E2E_NGINX_PORT=$PORT_BASE
E2E_SERVER_1_PORT=$((PORT_BASE + 1))
E2E_SERVER_2_PORT=$((PORT_BASE + 2))
E2E_REDIS_PORT=$((PORT_BASE + 279))
E2E_NGINX_CONF=$WORK/nginx.conf
ENV

info load_average_at_start "$(cut -d' ' -f1-3 /proc/loadavg)"
info engine_data_root "${E2E_DATA_ROOT:-temporary (cold build)}"
phase engine engine_start
phase wheelhouse wheelhouse
phase base base_image
phase redis/nginx service_images
phase image softserve_image
phase stack stack
