#!/usr/bin/env bash
# Fill the wheel folder that the Dockerfile installs from: the qkdserver wheel (S15qkd
# and the qkd_core extension, built by maturin) and every dependency as a binary wheel
# from PyPI, chosen for the Python version and glibc of the base image.
#
# The image itself never compiles anything and needs no network: it installs from this
# folder with `pip install --no-index`.
#
# Usage: docker/build-wheels.sh BASE_IMAGE [WHEEL_DIR]   (default WHEEL_DIR: build/docker/wheels)
# Environment: PYTHON (default python3) runs maturin and pip on the host;
#              WHEEL_ZIG=1 links the extension with zig (pip install ziglang) for a
#              manylinux2014 wheel, needed when the base image's glibc is older than the host's.
set -euo pipefail
cd "$(dirname "$0")/.."

base_image="${1:?usage: $0 BASE_IMAGE [WHEEL_DIR]}"
wheel_dir="${2:-build/docker/wheels}"
python="${PYTHON:-python3}"

if ! "$python" -m maturin --version >/dev/null 2>&1; then
    echo "error: maturin not found for $python; run 'make install' or: $python -m pip install 'maturin>=1.7,<2'" >&2
    exit 1
fi

# Ask the base image which Python and glibc it has, so the wheels fit it exactly.
read -r py_version glibc_version < <(docker run --rm --entrypoint python3 "$base_image" -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1])')
if [[ -z "$glibc_version" ]]; then
    echo "error: base image $base_image has no glibc (musl?); use a glibc base such as python:3.11-slim-bookworm" >&2
    exit 1
fi
glibc_minor="${glibc_version#2.}"
arch="$(uname -m)"
echo "base image $base_image: Python $py_version, glibc $glibc_version, $arch"

rm -rf "$wheel_dir"
mkdir -p "$wheel_dir"

# The extension is abi3 (one wheel for every CPython >= 3.9). maturin checks that the
# library uses no glibc symbol newer than the tag it is given.
if [[ "${WHEEL_ZIG:-0}" == 1 ]]; then
    "$python" -m maturin build --release --strip --zig --compatibility manylinux2014 --out "$wheel_dir"
else
    if ! "$python" -m maturin build --release --strip --compatibility "manylinux_2_${glibc_minor}" --out "$wheel_dir"; then
        echo "error: the extension built on this host needs a newer glibc than $glibc_version in $base_image;" \
             "rerun with WHEEL_ZIG=1 (after: pip install ziglang) or use a newer base image" >&2
        exit 1
    fi
fi

# Dependencies, with the web page's (the extra "web"): binary wheels only, for the base image's interpreter and any manylinux
# tag its glibc accepts (pip matches --platform values literally, so list them all).
platforms=(--platform "manylinux2014_$arch")
for ((minor = 17; minor <= glibc_minor; minor++)); do
    platforms+=(--platform "manylinux_2_${minor}_$arch")
done
"$python" -m pip download --quiet --dest "$wheel_dir" --only-binary=:all: \
    --implementation cp --python-version "$py_version" "${platforms[@]}" \
    "$(echo "$wheel_dir"/qkdserver-*.whl)[web]"

ls -1 "$wheel_dir"
