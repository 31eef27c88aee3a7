#!/usr/bin/env bash
# End-to-end check of the images and the compose stack, on a real Docker engine:
#
#   make docker-test                      # or: bash docker/docker-test.sh
#   DOCKER_TEST_REQUIRED=1 make docker-test   # fail, instead of skipping, where Docker cannot run
#
# 1. Builds the images: the local Python 3.11 base from Debian's packages when it is missing
#    (docker/make-base-image.sh; no public registry needed), Redis from Debian's package
#    (docker/Dockerfile.redis) and the CPU image (docker/Dockerfile, torch from the local wheel
#    of TORCH_WHEEL_DIR copied into docker/wheels/), and checks that the CPU image runs as
#    uid 10001 and carries no dataset, no recbole, no compiler and no test tools.
# 2. Brings the stack of docker/compose.yaml up with a Compose implementation found here
#    (Debian's docker-compose 1.29, else `docker compose`), plus docker/compose.test.yaml (one
#    training epoch): prepare-data -> train -> build-index + features-push -> api, each job
#    in its own container, Redis and the API on the stack's own network, the API published on
#    127.0.0.1 only. The recbole wheel (MovieLens-100K's source) is mounted read-only.
# 3. Queries /v1/info and /v1/retrieve with the API key (and is refused without it), runs the
#    index job again and sees the running API serve the new version, with the same container
#    (id, start time, no restart).
# 4. Stops everything (`down -v`) and checks that no container, network or volume of the
#    stack is left. The trap does the same on any failure or interrupt; it also removes the
#    copied wheel and certificates, the temporary directory and a dockerd it started.
#    The images stay (later runs reuse them and the build cache): remove them with
#    `docker rmi two-tower-retrieval:cpu two-tower-retrieval/redis:7-bookworm
#    two-tower-retrieval/python:3.11-bookworm` and `docker image prune` (build stages).
#
# The measurements (image sizes, build times, compose up to ready, the API container's RSS,
# the index swap, the total time, and the machine: a Python speed probe, nproc, memory) are
# printed and written as JSON to bench/results/docker_test.json.
#
# Skips (prints `SKIP: <reason>`, exits 0; with DOCKER_TEST_REQUIRED=1 exits 1) when there is
# no docker binary, no engine answers and none can be started (dockerd is started when it is
# installed and this runs as root), no Compose implementation is installed, or the base image
# is missing and cannot be built (needs root and debootstrap).
#
# The secrets (Redis password, API key) are made for each run and reach Compose only through
# an env file (mode 600, in the temporary directory), the HTTP client through its
# environment: never on a command line. No traffic leaves this host except the builds'
# downloads (Debian mirror, PyPI, the PyTorch index when there is no local torch wheel).
#
# Settings (environment):
#   DOCKER_TEST_REQUIRED=1           fail instead of skipping
#   DOCKER_TEST_INSTALL=0            never apt-get install what is missing (docker.io,
#                                    docker-compose, debootstrap; done by default as root)
#   DOCKER_TEST_NO_CACHE=1           build the Redis and CPU images with --no-cache (cold)
#   DOCKER_TEST_PYTHON_IMAGE=IMAGE   base image (default: the local one of make-base-image.sh)
#   DOCKER_TEST_API_PORT=18000       host port of the API (on 127.0.0.1)
#   DOCKER_TEST_COMPOSE="docker-compose"  the Compose command
#   DOCKER_TEST_BUILD_NETWORK=host   network of the builds (host: they resolve names as the
#                                    host does)
#   DOCKER_TEST_GPU=1                also try to build docker/Dockerfile.gpu (needs its registries)
#   DOCKER_TEST_RESULTS=PATH         where the JSON goes (default bench/results/docker_test.json)
#   TORCH_WHEEL_DIR=/opt/wheels      where a torch CPU wheel is looked for
#   DOCKER_TEST_CA_CERTS="FILES"     extra CA certificates for the builds (default: the host's
#                                    /usr/local/share/ca-certificates/*.crt)
#   RECBOLE_WHEEL=PATH               the recbole wheel (default: found in the venvs, else
#                                    downloaded with pip)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

# --------------------------------------------------------------------------- settings
REQUIRED=${DOCKER_TEST_REQUIRED:-0}
NO_CACHE=${DOCKER_TEST_NO_CACHE:-0}
LOCAL_BASE=two-tower-retrieval/python:3.11-bookworm
BASE_IMAGE=${DOCKER_TEST_PYTHON_IMAGE:-$LOCAL_BASE}
CPU_IMAGE=two-tower-retrieval:cpu
REDIS_IMAGE_TAG=two-tower-retrieval/redis:7-bookworm
GPU_IMAGE_TAG=two-tower-retrieval:gpu
TEST_API_PORT=${DOCKER_TEST_API_PORT:-18000}
BUILD_NETWORK=${DOCKER_TEST_BUILD_NETWORK:-host}
WANT_GPU=${DOCKER_TEST_GPU:-0}
RESULTS=${DOCKER_TEST_RESULTS:-bench/results/docker_test.json}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
CA_CERTS=${DOCKER_TEST_CA_CERTS:-$(echo /usr/local/share/ca-certificates/*.crt)}
PROJECT=ttr-docker-test
RECBOLE_VERSION=$(sed -n 's/^RECBOLE_VERSION ?= *//p' Makefile)
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile)
# Variables of compose.yaml: the env file sets them; the caller's environment must not win.
unset REDIS_PASSWORD RETRIEVAL_API_KEY IMAGE GPU_IMAGE REDIS_IMAGE PYTHON_IMAGE API_BIND \
    API_PORT RECBOLE_WHEEL_DIR REDIS_MAXMEMORY COMPOSE_PROJECT_NAME COMPOSE_FILE

START_NS=$(date +%s%N)
elapsed() { # seconds since START_NS, or since $1 (a `date +%s%N`), with one decimal
    local from=${1:-$START_NS}
    awk -v a="$from" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'
}
log() { printf '[docker-test %6ss] %s\n' "$(elapsed)" "$*"; }
fail() {
    printf '[docker-test %6ss] FAIL: %s\n' "$(elapsed)" "$*" >&2
    exit 1
}
skip() {
    if [ "$REQUIRED" = 1 ]; then
        fail "cannot run (DOCKER_TEST_REQUIRED=1): $*"
    fi
    echo "SKIP: $*"
    exit 0
}

# --------------------------------------------------------------------------- can Docker run?
# On a fresh Debian machine, as root: the engine, Compose 1.29 and debootstrap from Debian's
# packages (DOCKER_TEST_INSTALL=0: never install, skip instead).
missing=()
command -v docker > /dev/null || missing+=(docker.io)
command -v docker-compose > /dev/null || docker compose version > /dev/null 2>&1 ||
    missing+=(docker-compose)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ] && [ "${DOCKER_TEST_INSTALL:-1}" = 1 ] && [ "$(id -u)" = 0 ] &&
    command -v apt-get > /dev/null; then
    log "installing ${missing[*]} from Debian's packages"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "${missing[@]}"; } > "${TMPDIR:-/tmp}/docker-test-apt.log" 2>&1; then
        tail -n 5 "${TMPDIR:-/tmp}/docker-test-apt.log" >&2 || true
        skip "could not install ${missing[*]} with apt-get (log above)"
    fi
fi
command -v docker > /dev/null || skip "no docker binary on PATH (apt-get install docker.io)"
command -v python3 > /dev/null || skip "no python3 on PATH (the HTTP client and the JSON need it)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/docker-test.XXXXXX")
STARTED_DOCKERD_PID=
COPIED=()         # files this run put into docker/wheels and docker/certs
COMPOSE=()        # the Compose command, set below
RESULT_LINES="$WORK/results.tsv"
: > "$RESULT_LINES"
record() { printf '%s\t%s\n' "$1" "$2" >> "$RESULT_LINES"; } # KEY VALUE, for the JSON

leftovers() { # containers, networks and volumes of the test's Compose project
    {
        docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
        docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"
        docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"
    } 2> /dev/null | wc -l
}

remove_stack() { # everything of the project, whether or not Compose still can
    if [ ${#COMPOSE[@]} -gt 0 ] && [ -f "$WORK/stack.env" ]; then
        compose down --volumes --remove-orphans --timeout 30 > "$WORK/down.log" 2>&1 || true
    fi
    local label="label=com.docker.compose.project=$PROJECT" ids
    mapfile -t ids < <(docker ps -aq --filter "$label" 2> /dev/null || true)
    [ ${#ids[@]} -eq 0 ] || docker rm -f "${ids[@]}" > /dev/null 2>&1 || true
    mapfile -t ids < <(docker network ls -q --filter "$label" 2> /dev/null || true)
    [ ${#ids[@]} -eq 0 ] || docker network rm "${ids[@]}" > /dev/null 2>&1 || true
    mapfile -t ids < <(docker volume ls -q --filter "$label" 2> /dev/null || true)
    [ ${#ids[@]} -eq 0 ] || docker volume rm -f "${ids[@]}" > /dev/null 2>&1 || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if docker info > /dev/null 2>&1; then
        remove_stack
        local left
        left=$(leftovers)
        if [ "$left" != 0 ]; then
            echo "[docker-test] cleanup: $left containers/networks/volumes of $PROJECT are left" >&2
            [ "$status" != 0 ] || status=1
        fi
    fi
    for file in "${COPIED[@]}"; do rm -f "$file"; done
    if [ -n "$STARTED_DOCKERD_PID" ]; then
        kill "$STARTED_DOCKERD_PID" 2> /dev/null || true
        wait "$STARTED_DOCKERD_PID" 2> /dev/null || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! docker info > /dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        skip "no Docker engine answers and this is not root, so dockerd cannot be started here"
    fi
    command -v dockerd > /dev/null ||
        skip "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
    log "no Docker engine answers: starting dockerd (log $WORK/dockerd.log)"
    # In its own session: a Ctrl-C of this script must not stop it before the cleanup ran.
    setsid dockerd > "$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info > /dev/null 2>&1 && break
        kill -0 "$STARTED_DOCKERD_PID" 2> /dev/null || break
        sleep 1
    done
    if ! docker info > /dev/null 2>&1; then
        tail -n 20 "$WORK/dockerd.log" >&2 || true
        skip "dockerd did not start (its log is above)"
    fi
fi

if [ -n "${DOCKER_TEST_COMPOSE:-}" ]; then
    read -ra COMPOSE <<< "$DOCKER_TEST_COMPOSE"
elif command -v docker-compose > /dev/null; then
    COMPOSE=(docker-compose)
elif docker compose version > /dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    skip "no Compose implementation (apt-get install docker-compose, or the compose plugin)"
fi
compose() {
    "${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/stack.env" \
        -f docker/compose.yaml -f docker/compose.test.yaml "$@"
}

if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || skip "the base image $BASE_IMAGE is missing and building it needs root"
    command -v debootstrap > /dev/null ||
        skip "the base image $BASE_IMAGE is missing and debootstrap is not installed"
fi

log "Docker $(docker version -f '{{.Server.Version}}'), $("${COMPOSE[@]}" version 2>&1 | head -n 1)"
record docker_server_version "$(docker version -f '{{.Server.Version}}')"
record docker_storage_driver "$(docker info -f '{{.Driver}}')"
record docker_cgroup "$(docker info -f '{{.CgroupDriver}} v{{.CgroupVersion}}' 2> /dev/null || echo unknown)"
record compose_command "${COMPOSE[*]}"
record compose_version "$("${COMPOSE[@]}" version 2>&1 | head -n 1)"
# A run that was killed before its cleanup may have left its stack behind.
remove_stack

# --------------------------------------------------------------------------- machine
log "machine speed probe"
python3 - > "$WORK/probe.tsv" << 'PY'
import os, time

def best(function, rounds=3):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)

def loop():
    total = 0
    for i in range(10**7):
        total += i

with open("/proc/meminfo") as handle:
    memory_kib = int(next(line for line in handle if line.startswith("MemTotal")).split()[1])
print(f"machine_python_loop_1e7_additions_s\t{best(loop):.3f}")
print(f"machine_python_sum_range_1e7_s\t{best(lambda: sum(range(10**7))):.3f}")
print(f"machine_nproc\t{os.cpu_count()}")
print(f"machine_memory_gib\t{memory_kib / 2**20:.1f}")
PY
cat "$WORK/probe.tsv" >> "$RESULT_LINES"
sed 's/^/    /' "$WORK/probe.tsv"

# --------------------------------------------------------------------------- images
image_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{ printf "%.0f", $1 / 1e6 }'; }

build() { # NAME LOG_NAME docker-build-arguments...: timed; the log is printed on failure
    local name=$1 logfile="$WORK/$2" started
    shift 2
    started=$(date +%s%N)
    local no_cache=()
    [ "$NO_CACHE" != 1 ] || no_cache=(--no-cache)
    if ! docker build --network "$BUILD_NETWORK" "${no_cache[@]}" "$@" . > "$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        fail "building $name failed (the end of its log is above)"
    fi
    local seconds steps cached
    seconds=$(elapsed "$started")
    steps=$(grep -c '^Step ' "$logfile" || true)
    cached=$(grep -c 'Using cache' "$logfile" || true)
    log "built $name in ${seconds}s ($cached of $steps steps from the cache)"
    record "build_${name}_s" "$seconds"
    record "build_${name}_cached_steps" "$cached/$steps"
}

if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    log "building the base image $BASE_IMAGE from Debian's packages (docker/make-base-image.sh)"
    started=$(date +%s%N)
    docker/make-base-image.sh "$BASE_IMAGE" > "$WORK/base.log" 2>&1 ||
        { tail -n 40 "$WORK/base.log" >&2; fail "docker/make-base-image.sh failed"; }
    record build_base_s "$(elapsed "$started")"
    log "built $BASE_IMAGE in $(elapsed "$started")s"
else
    record build_base_s "not built (present)"
fi

# The build inputs: the torch CPU wheel and the extra CA certificates, copied for this run.
shopt -s nullglob
present=(docker/wheels/torch-"$TORCH_VERSION"+cpu-*.whl)
if [ ${#present[@]} -eq 0 ]; then
    for wheel in "$TORCH_WHEEL_DIR"/torch-"$TORCH_VERSION"+cpu-*.whl; do
        target="docker/wheels/$(basename "$wheel")"
        ln "$wheel" "$target" 2> /dev/null || cp "$wheel" "$target"
        COPIED+=("$target")
    done
fi
for cert in $CA_CERTS; do
    [ -f "$cert" ] || continue
    target="docker/certs/$(basename "$cert")"
    [ -e "$target" ] && continue
    cp "$cert" "$target"
    COPIED+=("$target")
done
present=(docker/wheels/torch-"$TORCH_VERSION"+cpu-*.whl)
shopt -u nullglob
if [ ${#present[@]} -gt 0 ]; then
    log "torch $TORCH_VERSION from ${present[0]}"
    record torch_source "local wheel"
else
    log "no torch $TORCH_VERSION CPU wheel in $TORCH_WHEEL_DIR: the build uses the PyTorch CPU index"
    record torch_source "PyTorch CPU index"
fi

log "building $REDIS_IMAGE_TAG (docker/Dockerfile.redis)"
build redis redis-build.log --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f docker/Dockerfile.redis -t "$REDIS_IMAGE_TAG"
log "building $CPU_IMAGE (docker/Dockerfile)"
build cpu cpu-build.log --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -f docker/Dockerfile -t "$CPU_IMAGE"
record build_no_cache "$NO_CACHE"
record image_base "$BASE_IMAGE"
record image_base_mb "$(image_mb "$BASE_IMAGE")"
record image_redis_mb "$(image_mb "$REDIS_IMAGE_TAG")"
record image_cpu_mb "$(image_mb "$CPU_IMAGE")"
log "image sizes: base $(image_mb "$BASE_IMAGE") MB, redis $(image_mb "$REDIS_IMAGE_TAG") MB, cpu $(image_mb "$CPU_IMAGE") MB"

if [ "$WANT_GPU" = 1 ]; then
    log "building $GPU_IMAGE_TAG (docker/Dockerfile.gpu; needs nvidia/cuda and ghcr.io/astral-sh/uv)"
    if docker build --network "$BUILD_NETWORK" -f docker/Dockerfile.gpu -t "$GPU_IMAGE_TAG" . \
        > "$WORK/gpu-build.log" 2>&1; then
        record image_gpu_mb "$(image_mb "$GPU_IMAGE_TAG")"
    else
        reason=$(grep -m 1 -i -E 'error|denied|failed' "$WORK/gpu-build.log" || tail -n 1 "$WORK/gpu-build.log")
        log "GPU image not built: $reason"
        record image_gpu_mb "not built: $reason"
    fi
else
    record image_gpu_mb "not attempted (DOCKER_TEST_GPU=1): its bases nvidia/cuda and ghcr.io/astral-sh/uv need a registry"
fi

log "checking the CPU image: user, no dataset, no recbole, no compiler, no test tools"
docker run --rm --network none --entrypoint sh "$CPU_IMAGE" -c '
    set -e
    test "$(id -u):$(id -g)" = 10001:10001 || { echo "runs as $(id -u):$(id -g)"; exit 1; }
    found=$(find / -xdev \( -iname "*ml-100k*" -o -iname "recbole*" -o -name "u.data" \
        -o -name "*.inter" -o -name "*.parquet" \) -print 2> /dev/null | head -n 5)
    test -z "$found" || { echo "dataset files in the image: $found"; exit 1; }
    for tool in gcc cc g++ c++ clang make pytest; do
        if command -v "$tool" > /dev/null; then echo "$tool is in the image"; exit 1; fi
    done
    python -c "
import importlib.util as u
for name in (\"recbole\", \"pytest\", \"hypothesis\", \"ruff\", \"mypy\", \"faiss\", \"torch\"):
    present = u.find_spec(name) is not None
    assert present == (name in (\"faiss\", \"torch\")), (name, present)
import torch, faiss
assert torch.__version__.endswith(\"+cpu\"), torch.__version__
"
' || fail "the CPU image is not what it should be (see above)"

# --------------------------------------------------------------------------- the stack
RECBOLE_DIR="$WORK/recbole"
mkdir -m 755 "$RECBOLE_DIR"
wheel_name="recbole-$RECBOLE_VERSION-py3-none-any.whl"
wheel=${RECBOLE_WHEEL:-}
if [ -z "$wheel" ]; then
    for candidate in .venv/share/two-tower-retrieval .venv-floors/share/two-tower-retrieval; do
        if [ -f "$candidate/$wheel_name" ]; then wheel="$candidate/$wheel_name" && break; fi
    done
fi
if [ -n "$wheel" ]; then
    cp "$wheel" "$RECBOLE_DIR/$wheel_name"
else
    log "downloading $wheel_name (pip download --no-deps)"
    pip=python3
    [ ! -x .venv/bin/python ] || pip=.venv/bin/python
    "$pip" -m pip download --quiet --no-deps --dest "$RECBOLE_DIR" "recbole==$RECBOLE_VERSION" ||
        fail "could not download $wheel_name (set RECBOLE_WHEEL=PATH)"
fi
chmod 644 "$RECBOLE_DIR/$wheel_name"
grep -q "/recbole/$wheel_name" docker/compose.yaml ||
    fail "docker/compose.yaml does not read /recbole/$wheel_name (RECBOLE_VERSION of the Makefile)"

# The secrets of this run: in variables and the env file only.
REDIS_PASSWORD_VALUE=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
API_KEY_VALUE=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
(
    umask 077
    {
        echo "COMPOSE_PROJECT_NAME=$PROJECT"
        echo "REDIS_PASSWORD=$REDIS_PASSWORD_VALUE"
        echo "RETRIEVAL_API_KEY=$API_KEY_VALUE"
        echo "IMAGE=$CPU_IMAGE"
        echo "REDIS_IMAGE=$REDIS_IMAGE_TAG"
        echo "PYTHON_IMAGE=$BASE_IMAGE"
        echo "API_BIND=127.0.0.1"
        echo "API_PORT=$TEST_API_PORT"
        echo "RECBOLE_WHEEL_DIR=$RECBOLE_DIR"
        echo "REDIS_MAXMEMORY=256mb"
    } > "$WORK/stack.env"
)

# The HTTP client: python3 with the key in its environment (DT_API_KEY), never in argv.
cat > "$WORK/client.py" << 'PY'
"""request METHOD URL [BODY] | wait URL TIMEOUT | wait-swap URL OLD TIMEOUT"""
import json, os, sys, time, urllib.error, urllib.request

def request(method, url, body=None, key=True):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = os.environ["DT_API_KEY"]
    data = body.encode() if body else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()

command, url = sys.argv[1], sys.argv[2]
started = time.monotonic()
if command == "request":
    status, text = request(sys.argv[3] if len(sys.argv) > 3 else "GET", url,
                           sys.argv[4] if len(sys.argv) > 4 else None,
                           key=os.environ.get("DT_NO_KEY") != "1")
    print(json.dumps({"status": status, "body": text}))
elif command == "wait":
    deadline = started + float(sys.argv[3])
    while True:
        try:
            if request("GET", url, key=False)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not answer 200 within {sys.argv[3]} s")
        time.sleep(0.2)
    print(f"{time.monotonic() - started:.1f}")
elif command == "wait-swap":
    old, deadline = sys.argv[3], started + float(sys.argv[4])
    while True:
        status, text = request("GET", url)
        version = json.loads(text)["index"]["version"] if status == 200 else None
        if version not in (None, old):
            break
        if time.monotonic() > deadline:
            sys.exit(f"the API still serves index version {old} after {sys.argv[4]} s")
        time.sleep(0.2)
    print(f"{version}\t{time.monotonic() - started:.1f}")
PY
client() { DT_API_KEY="$API_KEY_VALUE" python3 "$WORK/client.py" "$@"; }
API="http://127.0.0.1:$TEST_API_PORT"
json_field() { python3 -c 'import json, sys; v = json.load(sys.stdin)
for k in sys.argv[1].split("."): v = v[int(k)] if isinstance(v, list) else v[k]
print(v)' "$1"; }

show_logs() { compose logs --no-color --tail 40 "$@" >&2 2> /dev/null || true; }

log "compose up (the whole chain: prepare-data, train, build-index, features-push, api)"
up_started=$(date +%s%N)
if ! timeout 1500 "${COMPOSE[@]}" -p "$PROJECT" --env-file "$WORK/stack.env" \
    -f docker/compose.yaml -f docker/compose.test.yaml up -d --no-build > "$WORK/up.log" 2>&1; then
    cat "$WORK/up.log" >&2
    show_logs
    fail "compose up failed (its output and the services' logs are above)"
fi
up_returned=$(date +%s%N)
log "compose up returned after $(elapsed "$up_started")s; waiting for the API's /readyz"
api_ready_s=$(python3 "$WORK/client.py" wait "$API/readyz" 300) ||
    { show_logs api; fail "the API did not become ready"; }
record compose_up_to_ready_s "$(elapsed "$up_started")"
record compose_up_returned_s "$(awk -v a="$up_started" -v b="$up_returned" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
record api_start_to_ready_s "$api_ready_s"
log "API ready: $(elapsed "$up_started")s after compose up (${api_ready_s}s after up returned)"

for job in prepare-data train build-index features-push; do
    cid=$(compose ps -a -q "$job")
    [ -n "$cid" ] || fail "no container of the job $job"
    read -r code started finished <<< "$(docker inspect -f '{{.State.ExitCode}} {{.State.StartedAt}} {{.State.FinishedAt}}' "$cid")"
    [ "$code" = 0 ] || { show_logs "$job"; fail "the job $job exited $code"; }
    seconds=$(python3 -c 'import sys
from datetime import datetime
def t(s): return datetime.fromisoformat(s[:26].rstrip("Z") if "." in s else s.rstrip("Z"))
print(f"{(t(sys.argv[2]) - t(sys.argv[1])).total_seconds():.1f}")' "$started" "$finished")
    record "job_${job//-/_}_s" "$seconds"
    log "job $job: exit 0 in ${seconds}s (container $(echo "$cid" | cut -c1-12))"
done

# --------------------------------------------------------------------------- the queries
api_id=$(compose ps -q api)
api_started=$(docker inspect -f '{{.State.StartedAt}}' "$api_id")
info=$(client request "$API/v1/info")
[ "$(json_field status <<< "$info")" = 200 ] || fail "/v1/info: $info"
first_version=$(json_field body <<< "$info" | json_field index.version)
model_version=$(json_field body <<< "$info" | json_field model.version)
tower_mode=$(json_field body <<< "$info" | json_field model.query_tower_mode)
record api_query_tower_mode "$tower_mode"
log "/v1/info: model $model_version, index $first_version, query tower $tower_mode"

answer=$(client request "$API/v1/retrieve" POST '{"user_id": "196", "k": 10}')
[ "$(json_field status <<< "$answer")" = 200 ] || fail "/v1/retrieve: $answer"
body=$(json_field body <<< "$answer")
python3 -c 'import json, sys
answer = json.loads(sys.argv[1])
assert len(answer["ids"]) == 10 and len(answer["scores"]) == 10, answer
assert answer["scores"] == sorted(answer["scores"], reverse=True), answer["scores"]
assert answer["index_version"] == sys.argv[2], (answer["index_version"], sys.argv[2])' \
    "$body" "$first_version" || fail "/v1/retrieve answered $body"
log "/v1/retrieve user 196: 10 ids, index $first_version: $(json_field ids <<< "$body")"

refused=$(DT_NO_KEY=1 client request "$API/v1/retrieve" POST '{"user_id": "196", "k": 10}')
[ "$(json_field status <<< "$refused")" = 401 ] || fail "/v1/retrieve without the key: $refused"
log "/v1/retrieve without the API key: 401"

rss_mib() { # the summed RSS of the API container's processes, and the cgroup's usage
    local rss usage
    rss=$(docker top "$api_id" -o pid,rss | awk 'NR > 1 { sum += $2 } END { printf "%.0f", sum / 1024 }')
    usage=$(docker stats --no-stream --format '{{.MemUsage}}' "$api_id" | awk '{ print $1 }')
    echo "$rss $usage"
}
read -r rss usage <<< "$(rss_mib)"
record api_rss_mib "$rss"
record api_cgroup_memory "$usage"
log "API container: RSS ${rss} MiB (processes), ${usage} (docker stats)"

# --------------------------------------------------------------------------- a second version
log "running the index job again (compose run --rm --no-deps build-index)"
started=$(date +%s%N)
compose run --rm --no-deps -T build-index > "$WORK/reindex.log" 2>&1 ||
    { tail -n 40 "$WORK/reindex.log" >&2; fail "the second build-index failed"; }
record job_build_index_again_s "$(elapsed "$started")"
swap=$(client wait-swap "$API/v1/info" "$first_version" 60) ||
    { show_logs api; fail "the API did not swap to the new index version"; }
read -r second_version swap_s <<< "$swap"
record index_swap_after_job_s "$swap_s"
answer=$(client request "$API/v1/retrieve" POST '{"user_id": "196", "k": 10}')
served=$(json_field body <<< "$answer" | json_field index_version)
[ "$served" = "$second_version" ] || fail "/v1/retrieve answers from $served, not $second_version"
read -r same_id same_started restarts <<< "$(docker inspect -f '{{.Id}} {{.State.StartedAt}} {{.RestartCount}}' "$api_id")"
if [ "$same_id" != "$api_id" ] || [ "$same_started" != "$api_started" ] || [ "$restarts" != 0 ]; then
    fail "the API container restarted ($api_started -> $same_started, restarts $restarts)"
fi
log "index $first_version -> $second_version ${swap_s}s after the job; same container, started $api_started, 0 restarts"
record index_versions "$first_version -> $second_version"
read -r rss usage <<< "$(rss_mib)"
record api_rss_after_swap_mib "$rss"
log "API container after the swap: RSS ${rss} MiB, ${usage}"

# --------------------------------------------------------------------------- stop
log "compose down --volumes"
started=$(date +%s%N)
compose down --volumes --remove-orphans --timeout 30 > "$WORK/down.log" 2>&1 ||
    { cat "$WORK/down.log" >&2; fail "compose down failed"; }
record compose_down_s "$(elapsed "$started")"
left=$(leftovers)
[ "$left" = 0 ] || fail "$left containers/networks/volumes of $PROJECT are left after down"
log "stopped in $(elapsed "$started")s; no container, network or volume of $PROJECT is left"

record total_s "$(elapsed)"
mkdir -p "$(dirname "$RESULTS")"
python3 - "$RESULT_LINES" "$RESULTS" << 'PY'
import datetime, json, sys

results = {"date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
with open(sys.argv[1]) as handle:
    for line in handle:
        key, _, value = line.rstrip("\n").partition("\t")
        try:
            results[key] = int(value)
        except ValueError:
            try:
                results[key] = float(value)
            except ValueError:
                results[key] = value
with open(sys.argv[2], "w") as handle:
    json.dump(results, handle, indent=2)
    handle.write("\n")
print(json.dumps(results, indent=2))
PY
log "PASS (results in $RESULTS)"
