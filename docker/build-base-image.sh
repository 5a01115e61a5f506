#!/usr/bin/env bash
# Build the base image qkdserver-base:bookworm without pulling from any container registry.
#
# debootstrap installs a minimal Debian bookworm (glibc 2.36, Python 3.11) from a Debian
# mirror into a folder, and `docker import` turns that folder into an image. The image
# has python3 with venv (the Dockerfile installs the wheels into a venv) and tzdata (the
# entrypoint sets the time zone from TZ). Air-gapped sites run this where a Debian mirror
# is reachable, or point DEBIAN_MIRROR at a local mirror, and move the image with
# `docker save` / `docker load`.
#
# Usage: docker/build-base-image.sh [TAG]      (default TAG: qkdserver-base:bookworm)
# Environment: DEBIAN_MIRROR (default: the bookworm mirror in /etc/apt/sources.list*,
#              else http://deb.debian.org/debian), DEBIAN_SUITE (default: bookworm).
set -euo pipefail

tag="${1:-qkdserver-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"

find_mirror() {
    # The first non-security Debian URI that the host's apt sources use (one-line or deb822).
    local uri
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" && $2 !~ /security/ && $2 ~ /debian/ { print $2; exit }')
    if [[ -z "$uri" ]]; then
        uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
            | awk '$1 == "URIs:" && $2 !~ /security/ && $2 ~ /debian/ { print $2; exit }')
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

mirror="${DEBIAN_MIRROR:-$(find_mirror)}"

if [[ $EUID -ne 0 ]]; then
    echo "error: debootstrap must run as root (it creates device nodes and chroots); run: sudo $0 $*" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    echo "error: debootstrap not found; install it with: apt-get install debootstrap" >&2
    exit 1
fi
if ! command -v docker >/dev/null; then
    echo "error: docker not found; install Docker Engine first" >&2
    exit 1
fi

rootfs=$(mktemp -d /var/tmp/qkdserver-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $suite from $mirror into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,tzdata,ca-certificates \
    "$suite" "$rootfs" "$mirror"

# What a container never needs: package lists and caches (apt-get update refetches them),
# documentation, manual pages and translations.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/*
# debootstrap copies the host's resolver settings; Docker mounts its own at run time.
: > "$rootfs"/etc/resolv.conf
: > "$rootfs"/etc/hostname

tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $suite $mirror" \
    - "$tag"

docker run --rm "$tag" python3 -c 'import sys, venv; print("base image python", sys.version.split()[0])'
echo "built $tag"
