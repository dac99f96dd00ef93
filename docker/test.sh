#!/usr/bin/env bash
# Builds the CPU image from a local Debian base (no registry), runs it and checks what a
# user relies on: health, the seed API and a streamed chat on the demo model, the drain on
# SIGTERM, no process left behind, the compose CPU profile; then the vLLM variant
# (ENGINE=vllm) serving the demo model with `engine: vllm`. Runs its own dockerd on its
# own sockets and directories and leaves the host's networking alone.
#
#   sudo docker/test.sh            (as root: it installs packages and starts dockerd)
#
# LLMGW_DOCKER_CACHE (default /var/cache/llmgw-docker) keeps the base image's rootfs and
# the engine's layers between runs; with an empty directory everything builds from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${LLMGW_DOCKER_CACHE:-/var/cache/llmgw-docker}
EXEC=/run/llmgw-docker.$$
SOCK=$EXEC/docker.sock
DOCKER=/usr/bin/docker          # Debian's 20.10 client: BuildKit secrets without buildx
IMAGE=llm-gateway:cpu
NAME=llmgw-test-$$
VOLUME=llmgw-test-$$
PORT=${LLMGW_DOCKER_PORT:-16006}
WORK=$(mktemp -d /tmp/llmgw-docker.XXXX)
START=$SECONDS
step() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - START))"; }
fail() { echo "docker/test.sh: FAIL: $*" >&2; exit 1; }

step "packages"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
[ -x "$DOCKER" ] || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

DOCKERD_PID=
cleanup() {
    set +e
    if [ -n "$DOCKERD_PID" ]; then
        $DOCKER rm -f "$NAME" "$NAME-vllm" "$NAME-ray" >/dev/null 2>&1
        [ -f docker/.compose.test.yaml ] && docker-compose -p "llmgw$$" \
            -f docker/.compose.test.yaml --profile cpu down -v >/dev/null 2>&1
        $DOCKER volume rm "$VOLUME" >/dev/null 2>&1
        kill "$DOCKERD_PID"
        for _ in $(seq 50); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
    fi
    # dockerd leaves its network namespace mounted under its exec-root.
    grep -o " $EXEC[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l
    rm -rf "$EXEC" "$WORK" docker/.compose.test.yaml
}
trap cleanup EXIT

step "dockerd"
mkdir -p "$CACHE/engine" "$EXEC"
dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=overlay2 \
    --data-root "$CACHE/engine" --exec-root "$EXEC" -H "unix://$SOCK" \
    --pidfile "$EXEC/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=1
for _ in $(seq 100); do $DOCKER info >/dev/null 2>&1 && break; sleep 0.3; done
$DOCKER info >/dev/null || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not start"; }

step "base image local/debian:bookworm"
if ! $DOCKER image inspect local/debian:bookworm >/dev/null 2>&1; then
    if [ ! -s "$CACHE/debian-bookworm.tar" ]; then
        # The configured Debian mirror (one-line or deb822 sources), not a security one.
        mirror=$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true) \
            | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
            | grep -oE 'https?://[^ ]+' | head -1 || true)
        rootfs=$WORK/rootfs
        debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" \
            >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail debootstrap; }
        tar -C "$rootfs" -c . >"$CACHE/debian-bookworm.tar.part"
        mv "$CACHE/debian-bookworm.tar.part" "$CACHE/debian-bookworm.tar"
        rm -rf "$rootfs"
    fi
    $DOCKER import - local/debian:bookworm <"$CACHE/debian-bookworm.tar" >/dev/null
fi

step "torch wheel"
# pip's local wheel directories (the host's pip config); the CPU wheel goes into the build.
mkdir -p docker/wheels
wheel=$(find ${PIP_FIND_LINKS:-} /opt/wheels -maxdepth 1 -name 'torch-2.13.0+cpu-*.whl' \
    2>/dev/null | head -1 || true)
torch_index=
if [ -n "$wheel" ]; then
    cp -u "$wheel" docker/wheels/
else
    torch_index=https://download.pytorch.org/whl/cpu
fi

step "build $IMAGE"
build_start=$SECONDS
secret=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && secret=(--secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt)
$DOCKER build --network host --progress plain "${secret[@]}" -f docker/Dockerfile \
    --build-arg BASE=local/debian:bookworm --build-arg TORCH_INDEX="$torch_index" \
    -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "build"; }
echo "built in $((SECONDS - build_start))s; size $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | numfmt --to=iec)"
$DOCKER history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | head -12 | cut -c1-110
# The CA bundle was a build secret: it must not be in any layer.
$DOCKER run --rm --network none --entrypoint sh "$IMAGE" -c \
    '! grep -rlq "BEGIN CERTIFICATE" /run/secrets 2>/dev/null' || fail "a secret is in the image"
[ "$($DOCKER run --rm --network none --entrypoint id "$IMAGE" -u)" != 0 ] || fail "runs as root"

step "run"
# A registry for the test on a free port: the demo model, and an untrained tiny model
# that writes to its token limit (a request long enough to be in flight on SIGTERM).
cat >"$WORK/models.yaml" <<YAML
gateway: {port: $PORT, default_model: demo, cache_dir: /data/cache, envs_dir: /data/envs,
          drain_timeout_s: 60}
models:
  demo: {source: /opt/llm-gateway/demo-model, adapter: chat_template, dtype: float32,
         generation: {max_new_tokens: 64}}
  long: {source: /data/untrained, dtype: float32, generation: {max_new_tokens: 800}}
YAML
chmod 644 "$WORK/models.yaml"
$DOCKER volume create "$VOLUME" >/dev/null
$DOCKER run --rm --network none -v "$VOLUME:/data" --entrypoint python "$IMAGE" \
    -m gateway.worker.tiny /data/untrained >/dev/null
run_start=$SECONDS
$DOCKER run -d --name "$NAME" --network host -v "$VOLUME:/data" --stop-timeout 60 \
    -v "$WORK/models.yaml:/etc/llm-gateway/models.yaml:ro" \
    -e LLMGW_HEALTH_URL="http://127.0.0.1:$PORT/health" "$IMAGE" >/dev/null
for _ in $(seq 120); do
    health=$($DOCKER inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = healthy ] && break
    [ "$($DOCKER inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 1
done
[ "$health" = healthy ] || { $DOCKER logs "$NAME" | tail -30; fail "not healthy: $health"; }
echo "healthy after $((SECONDS - run_start))s"

step "requests"
python3 docker/client.py "http://127.0.0.1:$PORT" requests || { $DOCKER logs "$NAME" | tail -30; fail requests; }
$DOCKER top "$NAME" -o pid,args >"$WORK/top.txt"; cat "$WORK/top.txt"
grep -q "gateway.worker" "$WORK/top.txt" || fail "no worker process in the container"
pids=$(awk 'NR > 1 {print $1}' "$WORK/top.txt")

step "SIGTERM during a request"
python3 docker/client.py "http://127.0.0.1:$PORT" drain "$DOCKER kill -s TERM $NAME" \
    || { $DOCKER logs "$NAME" | tail -30; fail drain; }
code=$($DOCKER wait "$NAME")
# Into a file first: `grep -q` on a pipe would end `docker logs` early (SIGPIPE, pipefail).
$DOCKER logs "$NAME" >"$WORK/gateway.log" 2>&1
tail -5 "$WORK/gateway.log"
[ "$code" = 0 ] || fail "the container exited with $code"
grep -q "drain complete" "$WORK/gateway.log" || fail "no complete drain in the log"
grep -q "every worker has exited" "$WORK/gateway.log" || fail "workers not stopped"
for pid in $pids; do ! kill -0 "$pid" 2>/dev/null || fail "process $pid outlived the container"; done
echo "no process of the container is left (${pids//$'\n'/ })"
$DOCKER rm "$NAME" >/dev/null

step "environments built into the image (ENV_MODELS)"
build_start=$SECONDS
$DOCKER build --network host --progress plain "${secret[@]}" -f docker/Dockerfile \
    --build-arg BASE=local/debian:bookworm --build-arg TORCH_INDEX="$torch_index" \
    --build-arg ENV_MODELS=test-envs.yaml -t llm-gateway:cpu-envs . >"$WORK/build-envs.log" 2>&1 \
    || { tail -40 "$WORK/build-envs.log"; fail "build with ENV_MODELS"; }
echo "built in $((SECONDS - build_start))s"
# A new named volume starts with the image's /data. No network and auto_build_envs off:
# the model serves only if its environment came built with the image.
$DOCKER run --rm --network none -v "llmgw-envs-$$:/data" \
    -v "$ROOT/docker/test-envs.yaml:/etc/llm-gateway/models.yaml:ro" \
    -v "$ROOT/docker/client.py:/tmp/client.py:ro" --entrypoint sh llm-gateway:cpu-envs -c '
    llm-gateway serve --config /etc/llm-gateway/models.yaml >/tmp/gateway.log 2>&1 &
    python /tmp/client.py http://127.0.0.1:6006 wait && python /tmp/client.py http://127.0.0.1:6006 seed
    code=$?; grep -h "runs in its own\|environment" /tmp/gateway.log; kill $!; wait; exit $code' \
    || fail "the model did not serve from the environment built into the image"
$DOCKER volume rm "llmgw-envs-$$" >/dev/null

step "Ray image (EXTRAS=worker,hubs,cluster)"
build_start=$SECONDS
$DOCKER build --network host --progress plain "${secret[@]}" -f docker/Dockerfile \
    --build-arg BASE=local/debian:bookworm --build-arg TORCH_INDEX="$torch_index" \
    --build-arg EXTRAS=worker,hubs,cluster -t llm-gateway:cpu-ray . >"$WORK/build-ray.log" 2>&1 \
    || { tail -40 "$WORK/build-ray.log"; fail "build with EXTRAS=...cluster"; }
echo "built in $((SECONDS - build_start))s; size $($DOCKER image inspect -f '{{.Size}}' llm-gateway:cpu-ray | numfmt --to=iec)"
run_start=$SECONDS
# The image's own registry on a Ray of the container's own; Ray's object store wants /dev/shm.
$DOCKER run -d --name "$NAME-ray" --network host --stop-timeout 60 --shm-size 1g \
    llm-gateway:cpu-ray serve --config /etc/llm-gateway/models.yaml --host 127.0.0.1 \
    --port "$PORT" --cluster ray >/dev/null
ray_log() { $DOCKER logs "$NAME-ray" 2>&1 | tail -40 | cut -c1-400; }
python3 docker/client.py "http://127.0.0.1:$PORT" wait || { ray_log; fail "the Ray image: no health"; }
python3 docker/client.py "http://127.0.0.1:$PORT" cluster || { ray_log; fail "the Ray image: no reply"; }
echo "a reply from a Ray Serve replica $((SECONDS - run_start))s after the container started"
$DOCKER top "$NAME-ray" -o pid,args >"$WORK/top-ray.txt"
grep -q "raylet" "$WORK/top-ray.txt" || fail "no raylet in the Ray container"
pids=$(awk 'NR > 1 {print $1}' "$WORK/top-ray.txt")
$DOCKER stop "$NAME-ray" >/dev/null
code=$($DOCKER wait "$NAME-ray")
[ "$code" = 0 ] || { ray_log; fail "the Ray container exited with $code"; }
for pid in $pids; do ! kill -0 "$pid" 2>/dev/null || fail "process $pid outlived the container"; done
echo "stopped with 0 and no Ray process left ($(wc -l <"$WORK/top-ray.txt") processes ran); the Ray step took $((SECONDS - build_start))s"
$DOCKER rm "$NAME-ray" >/dev/null

step "vLLM image (ENGINE=vllm)"
build_start=$SECONDS
$DOCKER build --network host --progress plain "${secret[@]}" -f docker/Dockerfile \
    --build-arg BASE=local/debian:bookworm --build-arg TORCH_INDEX="$torch_index" \
    --build-arg ENGINE=vllm -t llm-gateway:vllm-cpu . >"$WORK/build-vllm.log" 2>&1 \
    || { tail -40 "$WORK/build-vllm.log"; fail "build with ENGINE=vllm"; }
echo "built in $((SECONDS - build_start))s; size $($DOCKER image inspect -f '{{.Size}}' llm-gateway:vllm-cpu | numfmt --to=iec)"
# The demo model (head_dim 32, which vLLM's CPU attention accepts) served by vLLM.
cat >"$WORK/models.vllm.yaml" <<YAML
gateway: {port: $PORT, default_model: demo-vllm, load_timeout_s: 400, drain_timeout_s: 30}
models:
  demo-vllm: {source: /opt/llm-gateway/demo-model, engine: vllm, dtype: float32,
              python_env: {python: /opt/vllm/bin/python}, env: {VLLM_CPU_KVCACHE_SPACE: "1"},
              limits: {context_length: 512}, engine_args: {enforce-eager: true}}
YAML
chmod 644 "$WORK/models.vllm.yaml"
run_start=$SECONDS
# --shm-size: vLLM's engine allocates a 160 MiB ring buffer in /dev/shm (Docker gives 64 MB).
$DOCKER run -d --name "$NAME-vllm" --network host --stop-timeout 60 --shm-size 1g \
    -v "$WORK/models.vllm.yaml:/etc/llm-gateway/models.yaml:ro" llm-gateway:vllm-cpu \
    serve --config /etc/llm-gateway/models.yaml --host 127.0.0.1 >/dev/null
vllm_log() {  # vLLM's root cause is far above its last lines: the errors, then the end
    $DOCKER logs "$NAME-vllm" >"$WORK/vllm.log" 2>&1
    grep -E "(Error|Exception)(:| )" "$WORK/vllm.log" | grep -v '\^\^\^' | cut -c1-400 | tail -40
    echo "--- the end of the log:"; tail -40 "$WORK/vllm.log" | cut -c1-400
}
python3 docker/client.py "http://127.0.0.1:$PORT" wait || { vllm_log; fail "the vLLM image: no health"; }
python3 docker/client.py "http://127.0.0.1:$PORT" vllm || { vllm_log; fail "the vLLM image: no chat"; }
echo "a chat completion from vLLM $((SECONDS - run_start))s after the container started"
$DOCKER top "$NAME-vllm" -o pid,args >"$WORK/top-vllm.txt"; cut -c1-150 "$WORK/top-vllm.txt"
grep -q "vllm.entrypoints.openai.api_server" "$WORK/top-vllm.txt" || fail "no vLLM process"
pids=$(awk 'NR > 1 {print $1}' "$WORK/top-vllm.txt")
$DOCKER stop "$NAME-vllm" >/dev/null
code=$($DOCKER wait "$NAME-vllm")
[ "$code" = 0 ] || { vllm_log; fail "the vLLM container exited with $code"; }
for pid in $pids; do ! kill -0 "$pid" 2>/dev/null || fail "process $pid outlived the container"; done
echo "stopped with 0; no process of its tree is left; the vLLM step took $((SECONDS - build_start))s"
$DOCKER rm "$NAME-vllm" >/dev/null

step "compose: the CPU profile"
compose_start=$SECONDS
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python   # has PyYAML after `make test`
docker-compose -f docker/compose.yaml config >"$WORK/compose.full.yaml" || fail "compose config"
$py docker/client.py host-network "$PORT" <"$WORK/compose.full.yaml" >docker/.compose.test.yaml
compose=(docker-compose -p "llmgw$$" -f docker/.compose.test.yaml)
"${compose[@]}" --profile cpu up -d --no-build gateway-cpu || fail "compose up"
for _ in $(seq 120); do
    python3 docker/client.py "http://127.0.0.1:$PORT" health 2>/dev/null && break
    sleep 1
done
python3 docker/client.py "http://127.0.0.1:$PORT" seed || fail "compose: the demo model"
"${compose[@]}" ps
"${compose[@]}" --profile cpu down -v || fail "compose down"
[ -z "$($DOCKER ps -aq --filter "label=com.docker.compose.project=llmgw$$")" ] \
    || fail "compose down left containers"
echo "compose up, request, down in $((SECONDS - compose_start))s"

step "the GPU service's configuration"
grep -A12 'devices:' "$WORK/compose.full.yaml" >"$WORK/devices.yaml" || true
grep -q 'driver: nvidia' "$WORK/devices.yaml" || fail "the GPU service reserves no nvidia device"
grep -A3 device_ids "$WORK/devices.yaml"
grep -q 'ipc: host' "$WORK/compose.full.yaml" || fail "the vLLM service does not share the host's IPC"
step "docker/test.sh: OK in $((SECONDS - START))s"
