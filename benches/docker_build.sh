#!/usr/bin/env bash
# Measure the Docker image build from a clean Docker cache, with the base image present.
#
# Prints the time of each step of `make build` with `docker build --no-cache`, the time
# of a one-instruction image built on the same base in the same run (the baseline: what
# the Docker daemon costs for any build on this machine), and the image size.
#
# Usage: benches/docker_build.sh [BASE_IMAGE]   (default: the offline base qkdserver-base:bookworm)
# The image is tagged qkdserver-bench:latest and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

base="${1:-qkdserver-base:bookworm}"
image=qkdserver-bench:latest
baseline_image=qkdserver-bench-baseline:latest

if ! docker image inspect "$base" >/dev/null 2>&1; then
    echo "base image $base not found; build it with 'make base-image' or pass a present base image" >&2
    exit 1
fi
if ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi

seconds() {
    local start=$SECONDS
    "$@" >/dev/null 2>&1
    echo $((SECONDS - start))
}

load=$(cut -d' ' -f1-3 /proc/loadavg)
wheels=$(seconds docker/build-wheels.sh "$base")
image_build=$(seconds docker build --no-cache --build-arg "BASE_IMAGE=$base" --tag "$image" .)

baseline_context=$(mktemp -d)
printf 'FROM %s\nCOPY entrypoint.sh /root/entrypoint.sh\n' "$base" > "$baseline_context/Dockerfile"
cp entrypoint.sh "$baseline_context/"
baseline=$(seconds docker build --no-cache --tag "$baseline_image" "$baseline_context")
rm -rf "$baseline_context"

size=$(docker image inspect --format '{{.Size}}' "$image")
base_size=$(docker image inspect --format '{{.Size}}' "$base")
docker image rm "$image" "$baseline_image" >/dev/null
docker image prune --force --filter label=org.qkdserver.stage=install >/dev/null

echo "load average before the run: $load"
echo "wheels (maturin + pip download): $wheels s"
echo "docker build --no-cache:         $image_build s"
echo "total:                           $((wheels + image_build)) s"
echo "baseline (FROM base + one COPY): $baseline s"
echo "image size:                      $((size / 1000000)) MB (base image $((base_size / 1000000)) MB)"
