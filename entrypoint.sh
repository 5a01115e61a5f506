#!/bin/bash
# Start a QKDServer node inside the container.
#
# With no arguments: run `qkdserver node` on the configuration file $QKD_CONFIG, with the
# web page and HTTP API on $QKD_WEB_HOST:$QKD_WEB_PORT, over HTTPS when the certificate
# $QKD_WEB_CERT and its key $QKD_WEB_KEY are mounted. With arguments: run them instead
# (for example `qkdserver simulate`, or `bash` for a shell), after the same set-up.
#
# Environment (defaults in brackets):
#   TZ              time zone of logs and file times, e.g. Europe/Berlin [UTC]
#   QKD_CONFIG      site configuration file, YAML or JSON [/etc/qkdserver/qkd_engine_config.yaml]
#   QKD_WEB_HOST, QKD_WEB_PORT   address of the web page [0.0.0.0, 8000]
#   QKD_WEB_CERT    PEM certificate of the web page [/root/keys/authd/certs/cert.crt]
#   QKD_WEB_KEY     PEM private key of that certificate [/root/keys/authd/certs/cert.key]
#   QKD_NODE_ARGS   extra options for `qkdserver node`, split on white space, e.g. --start
#   QKD_VERBOSITY   log level option of qkdserver: -v for info, -vv for debug [-v]
#   QKD_SOURCE      folder whose S15qkd package replaces the installed one, for
#                   development with a mounted source tree [/root/code/QKDServer]
#
# The node runs as this script's process (exec), so the SIGTERM of `docker stop` reaches
# it directly. The node then stops its workers and exits. Final keys are written under a
# temporary name and renamed, so no partial key file remains.
set -euo pipefail

log() { echo "entrypoint: $*" >&2; }

set_time_zone() {
    local zone="${TZ:-}"
    if [[ -z "$zone" ]]; then
        return
    fi
    if [[ ! -f "/usr/share/zoneinfo/$zone" ]]; then
        log "time zone TZ=$zone not found in /usr/share/zoneinfo; keeping UTC (use a name such as Europe/Berlin)"
        unset TZ
        return
    fi
    # Programs that read /etc/localtime instead of TZ see the same zone. The root file
    # system is read-only under `docker run --read-only`; TZ alone then still works.
    if ln -sf "/usr/share/zoneinfo/$zone" /etc/localtime 2>/dev/null; then
        echo "$zone" > /etc/timezone
    fi
    log "time zone $zone"
}

use_mounted_source() {
    local source="${QKD_SOURCE:-/root/code/QKDServer}"
    if [[ -f "$source/S15qkd/__init__.py" ]]; then
        export PYTHONPATH="$source${PYTHONPATH:+:$PYTHONPATH}"
        log "using the S15qkd source mounted at $source/S15qkd instead of the installed one"
    fi
}

run_node() {
    local config="${QKD_CONFIG:-/etc/qkdserver/qkd_engine_config.yaml}"
    local web_host="${QKD_WEB_HOST:-0.0.0.0}"
    local web_port="${QKD_WEB_PORT:-8000}"
    local cert="${QKD_WEB_CERT:-/root/keys/authd/certs/cert.crt}"
    local key="${QKD_WEB_KEY:-/root/keys/authd/certs/cert.key}"
    local verbosity="${QKD_VERBOSITY--v}"
    local args=()
    if [[ -n "$verbosity" ]]; then
        args+=("$verbosity")
    fi
    args+=(node --config "$config" --web-host "$web_host" --web-port "$web_port")

    if [[ ! -f "$config" ]]; then
        log "configuration file $config not found: mount the folder that contains it," \
            "e.g. docker run -v \$PWD/config:/etc/qkdserver ..., or set QKD_CONFIG"
        exit 2
    fi
    if [[ -f "$cert" && -f "$key" ]]; then
        args+=(--web-cert "$cert" --web-key "$key")
        log "HTTPS with the certificate $cert"
    elif [[ -f "$cert" || -f "$key" ]]; then
        # Falling back to plain HTTP would send the web token unencrypted, so stop here.
        log "only one of $cert and $key exists: mount both for HTTPS, or neither for HTTP"
        exit 2
    fi
    # Word splitting of QKD_NODE_ARGS is intended because it may contain several options.
    # shellcheck disable=SC2206
    args+=(${QKD_NODE_ARGS:-})
    log "qkdserver ${args[*]}"
    exec qkdserver "${args[@]}"
}

set_time_zone
use_mounted_source
if [[ $# -gt 0 ]]; then
    exec "$@"
fi
run_node
