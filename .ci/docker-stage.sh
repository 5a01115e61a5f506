#!/usr/bin/env bash
# CI stage for the container: build the image and run the container tests.
#
# No container registry is reachable on CI machines, so the base image is built with
# debootstrap from Debian's packages (docker/build-base-image.sh) unless it is already
# present from an earlier run. Every other input is rebuilt from the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
    echo "error: the container stage needs a running Docker engine" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
fi

make test-docker
