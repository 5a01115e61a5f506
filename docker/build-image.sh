#!/usr/bin/env bash
# Build the QKDServer image: pick the base image, fill the wheel folder, run docker build.
#
# The base image is $BASE_IMAGE if it is present or can be pulled; otherwise the offline
# base $OFFLINE_BASE_IMAGE, which docker/build-base-image.sh builds with debootstrap when
# it is not present yet. `make build` calls this script.
#
# Environment (defaults in brackets):
#   IMAGE               tag of the image to build [s-fifteen/qkdserver:qkd]
#   BASE_IMAGE          base image to pull [python:3.11-slim-bookworm]
#   OFFLINE_BASE_IMAGE  base image built offline when the pull fails [qkdserver-base:bookworm]
#   DOCKER_BUILD_ARGS   extra options for docker build, e.g. --no-cache
set -euo pipefail
cd "$(dirname "$0")/.."

image="${IMAGE:-s-fifteen/qkdserver:qkd}"
base="${BASE_IMAGE:-python:3.11-slim-bookworm}"
offline_base="${OFFLINE_BASE_IMAGE:-qkdserver-base:bookworm}"

if ! command -v docker >/dev/null; then
    echo "error: docker not found; install Docker Engine (Debian: apt-get install docker.io)" >&2
    exit 1
fi
if ! docker info >/dev/null 2>&1; then
    echo "error: the Docker daemon does not answer; start it (systemctl start docker) or check DOCKER_HOST" >&2
    exit 1
fi

if docker image inspect "$base" >/dev/null 2>&1; then
    echo "base image $base is present"
elif docker pull "$base"; then
    echo "pulled base image $base"
else
    echo "cannot pull $base; using the offline base image $offline_base"
    base="$offline_base"
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        docker/build-base-image.sh "$base"
    fi
fi

docker/build-wheels.sh "$base"

# Docker 23+ clients build with BuildKit, which needs the buildx plug-in; without it,
# the classic builder builds this Dockerfile just as well.
if ! docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=0
fi
previous_id=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
# shellcheck disable=SC2086  # DOCKER_BUILD_ARGS may contain several options
docker build ${DOCKER_BUILD_ARGS:-} --build-arg "BASE_IMAGE=$base" \
    --label "org.opencontainers.image.base.name=$base" --tag "$image" .

# The classic builder keeps the install stage and the image the tag pointed to before
# as untagged images of about 250 MB each; remove them. Images still in use stay.
docker image prune --force --filter label=org.qkdserver.stage=install >/dev/null
current_id=$(docker image inspect --format '{{.Id}}' "$image")
if [[ -n "$previous_id" && "$previous_id" != "$current_id" ]]; then
    docker image rm "$previous_id" >/dev/null 2>&1 || true
fi

docker image ls "$image"
