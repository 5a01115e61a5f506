# QKDServer node image: S15qkd and the qkd_core extension, installed from wheels only.
#
# Build with `make build`, which first fills build/docker/wheels (docker/build-wheels.sh)
# and, where the base image cannot be pulled, builds it offline (docker/build-base-image.sh).
# Nothing is compiled here and no network is used: pip installs from the wheel folder.
#
# BASE_IMAGE: any glibc-based image with python3 (>= 3.9) and its venv module, e.g. the
# official python:3.11-slim-bookworm or the offline qkdserver-base:bookworm.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
# docker/build-image.sh removes this stage's images by this label after the build.
# --no-compile: compiling Dash's and plotly's thousands of modules to bytecode at build
# time costs about a minute here and 40 MB; Python compiles what the node imports at start.
LABEL org.qkdserver.stage=install
COPY build/docker/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/qkdserver \
 && /opt/qkdserver/bin/pip install --no-cache-dir --no-compile --no-index --find-links /tmp/wheels 'qkdserver[web]' \
 && /opt/qkdserver/bin/python -c 'import qkd_core, S15qkd.web' \
 && /opt/qkdserver/bin/python -m pip uninstall --yes --quiet pip

# The final stage copies only the virtual environment (without pip, which nothing in the
# image needs), so neither the wheels nor pip's files end up in a layer. The classic
# builder runs a container for every instruction, so metadata instructions are few.
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="QKDServer" \
      org.opencontainers.image.description="Node software of a BBM92 quantum key distribution link" \
      org.opencontainers.image.licenses="GPL-2.0-or-later"
ENV PATH=/opt/qkdserver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    QKD_CONFIG=/etc/qkdserver/qkd_engine_config.yaml
COPY --from=install /opt/qkdserver /opt/qkdserver
COPY entrypoint.sh /root/entrypoint.sh

# Configuration, secrets, final keys and the node's working folder (data_root: epoch
# files, channel state, watchdog log) live outside the container, so a new container
# (after `make restart` or an image update) keeps them. The paths are the defaults of
# the node's configuration and the reference deployment's.
VOLUME ["/etc/qkdserver", "/root/keys/authd", "/epoch_files", "/tmp/cryptostuff"]
# 8000: web page and HTTP API; 4853: classical channel to the peer node.
EXPOSE 8000 4853
ENTRYPOINT ["/root/entrypoint.sh"]
