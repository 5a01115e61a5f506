"""HTTP routes of a node, with the reference server's paths, status codes and bodies.

Status routes (``/status_keygen``, ``/status_qkd``, ``/status_data``, ``/api/status``)
are open unless the server is started with ``protect_status``. Control routes accept
GET and HEAD like the reference (its Makefile calls them with ``curl -I``) and POST, and
require the node's web token. docs/http-api.md lists every route with examples.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from flask import Flask, Response, jsonify, redirect, request

from S15qkd.status import (
    ConfigRejected,
    ControlError,
    EngineState,
    NodeControl,
    Role,
    StatusSnapshot,
    UnknownConnectionError,
)
from S15qkd.log_limits import RateLimitedWarning
from S15qkd.web.auth import SESSION_COOKIE, TokenChecker

log = logging.getLogger(__name__)

STATUS_METHODS = ["GET", "HEAD"]
CONTROL_METHODS = ["GET", "HEAD", "POST"]

# Process names of the reference's "process_state" map, in its order.
REFERENCE_WORKERS = ("transferd", "readevents", "chopper", "chopper2", "costream", "splicer", "error_correction")

# Keys of the reference's "local_counts" map, in detector order 1 to 4.
REFERENCE_DETECTOR_KEYS = ("v", "-", "h", "+")


def epoch_name(epoch: int | None) -> str:
    """Format an epoch as the 8 hex digits of its file name, or '' when unknown."""
    return "" if epoch is None else f"{epoch:08x}"


def reference_status_data(snapshot: StatusSnapshot) -> dict[str, Any]:
    """Build the ``/status_data`` JSON body with the reference server's field names."""
    raw = snapshot.raw_key
    ec = snapshot.error_correction
    last = ec.last_block

    if snapshot.connected:
        connection_status = 1
    elif snapshot.engine_state is EngineState.OFF:
        connection_status = 0
    else:
        connection_status = 2

    local = next((c for c in snapshot.detectors.counts if c.node == snapshot.identity), None)
    if local is None and snapshot.detectors.counts:
        local = snapshot.detectors.counts[0]
    local_counts: dict[str, int] = {"total": local.total if local else 0}
    for index, key in enumerate(REFERENCE_DETECTOR_KEYS):
        counts = local.counts_per_epoch if local else ()
        local_counts[key] = counts[index] if index < len(counts) else 0

    return {
        "time": snapshot.time,
        "process_state": {name: snapshot.is_running(name) for name in REFERENCE_WORKERS},
        "status_info": {
            "connection_status": connection_status,
            "state": snapshot.engine_state.value,
            "last_received_epoch": epoch_name(raw.last_received_epoch),
            "init_time_diff": raw.initial_time_offset_ticks,
            "sig_long": raw.offset_search_snr,
            "sig_short": raw.offset_search_snr_fine,
            "tracked_time_diff": raw.tracked_time_offset_ticks,
            "symmetry": raw.role is Role.LOW_COUNT,
            "coincidences": raw.coincidences_per_epoch,
            "accidentals": raw.accidentals_per_epoch,
            "protocol": int(raw.protocol),
            "last_qber": raw.service_qber,
            "pol_dev_info": 0,
            "freq_diff_info": raw.frequency_offset if raw.frequency_offset is not None else 0,
            "local_counts": local_counts,
        },
        "errc_info": {
            "first_epoch": epoch_name(last.first_epoch) if last else "",
            "undigested_epochs": ec.undigested_epochs,
            "ec_raw_bits": last.raw_bits if last else 0,
            "ec_final_bits": last.final_bits if last else 0,
            "ec_key_gen_rate": round(last.key_rate_bps, 1) if last else None,
            "ec_err_fraction": last.qber if last else None,
            "key_file_name": epoch_name(last.first_epoch) if last else "",
            "total_ec_key_bits": ec.total_final_bits,
            "init_QBER": ec.servoed_qber,
        },
    }


def register_routes(server: Flask, node: NodeControl, checker: TokenChecker, protect_status: bool = False) -> None:
    """Add the status, control, configuration and login routes to the Flask server."""

    warn_rejected = RateLimitedWarning(log)
    # Its own limit, so that rejected tokens of a script do not hide a failed login.
    warn_failed_login = RateLimitedWarning(log)

    def authentication_failure() -> Response | None:
        """Return the 401/403 response for a request without valid credentials, else None."""
        verdict = checker.credentials(request.headers.get("Authorization"), request.cookies.get(SESSION_COOKIE))
        if verdict == "valid":
            return None
        warn_rejected("rejected %s %s from %s: %s web token", request.method, request.path, request.remote_addr,
                      verdict)
        if verdict == "missing":
            response = Response("web token required: send 'Authorization: Bearer <token>'\n", status=401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="qkdserver"'
            return response
        return Response("invalid web token\n", status=403)

    def status_guard() -> Response | None:
        return authentication_failure() if protect_status else None

    def control(name: str, action: Callable[[], None]) -> Response:
        denied = authentication_failure()
        if denied is not None:
            return denied
        log.info("%s requested by %s", name, request.remote_addr)
        try:
            action()
        except ControlError as error:
            log.warning("%s failed: %s", name, error)
            return Response(f"{error}\n", status=409)
        return Response(status=204)

    @server.route("/status_keygen", methods=STATUS_METHODS)
    def status_keygen():
        denied = status_guard()
        if denied is not None:
            return denied
        snapshot = node.status()
        if not snapshot.is_running("error_correction"):
            return Response(status=404)
        last = snapshot.error_correction.last_block
        body = f"{last.key_rate_bps:.1f}" if last else ""
        return Response(body, status=200, mimetype="text/plain")

    @server.route("/status_qkd", methods=STATUS_METHODS)
    def status_qkd():
        denied = status_guard()
        if denied is not None:
            return denied
        snapshot = node.status()
        running = snapshot.is_running("costream") or snapshot.is_running("splicer")
        return Response(status=200 if running else 404)

    @server.route("/status_data", methods=STATUS_METHODS)
    def status_data():
        denied = status_guard()
        if denied is not None:
            return denied
        return jsonify(reference_status_data(node.status()))

    @server.route("/api/status", methods=STATUS_METHODS)
    def api_status():
        denied = status_guard()
        if denied is not None:
            return denied
        return jsonify(node.status().to_dict())

    def control_view(name: str) -> Callable[[], Response]:
        def view() -> Response:
            return control(name, getattr(node, name))
        return view

    for name in ("start_keygen", "stop_keygen", "restart_transferd", "restart_connection"):
        server.add_url_rule(f"/{name}", endpoint=name, view_func=control_view(name), methods=CONTROL_METHODS)

    @server.route("/set_conn/<conn_id>", methods=CONTROL_METHODS)
    def set_conn(conn_id: str):
        try:
            return control(f"set_conn {conn_id}", lambda: node.set_conn(conn_id))
        except UnknownConnectionError as error:
            log.warning("set_conn rejected: %s", error)
            return Response(f"{error}\n", status=404)

    @server.route("/api/config", methods=["GET", "HEAD", "PUT"])
    def api_config():
        denied = authentication_failure()
        if denied is not None:
            return denied
        if request.method != "PUT":
            return jsonify(node.get_config())
        # The content type is not checked: curl --data @config.json labels a JSON body
        # as a form. RecursionError: JSON nested deeper than the interpreter's stack.
        try:
            candidate = json.loads(request.get_data())
        except (ValueError, RecursionError):
            candidate = None
        if not isinstance(candidate, dict):
            return Response("invalid request body: expected a JSON object with the whole "
                            "configuration, as GET /api/config returns it\n", status=400)
        dry_run = request.args.get("validate_only") in ("1", "true")
        try:
            if dry_run:
                problems = node.validate_config(candidate)
                if problems:
                    raise ConfigRejected(problems)
                return jsonify({"valid": True})
            result = node.save_config(candidate)
        except ConfigRejected as error:
            log.warning("configuration from %s rejected: %s", request.remote_addr, error)
            problems = [{"key": p.key, "message": p.message} for p in error.problems]
            return jsonify({"valid": False, "problems": problems}), 422
        log.info("configuration saved by %s; changed %s", request.remote_addr, ", ".join(result.changed_keys))
        return jsonify({
            "valid": True,
            "changed_keys": list(result.changed_keys),
            "applied_keys": list(result.applied_keys),
            "restart_needed_keys": list(result.restart_needed_keys),
            "note": result.note,
        })

    @server.route("/login", methods=["GET", "POST"])
    def login():
        if request.method == "GET":
            return Response(LOGIN_FORM.format(message=""), mimetype="text/html")
        if not checker.matches_token(request.form.get("token")):
            warn_failed_login("failed login from %s: invalid web token", request.remote_addr)
            return Response(LOGIN_FORM.format(message="<p class='error'>Invalid token.</p>"), status=403,
                            mimetype="text/html")
        log.info("browser login from %s", request.remote_addr)
        response = redirect("/apps/QKD_status", code=303)
        response.set_cookie(SESSION_COOKIE, checker.session, httponly=True, samesite="Strict",
                            secure=request.is_secure)
        return response

    @server.route("/logout", methods=["GET", "POST"])
    def logout():
        response = redirect("/apps/QKD_status", code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response


LOGIN_FORM = """<!DOCTYPE html>
<html><head><title>S15 QKD login</title><link rel="stylesheet" href="/assets/style.css"></head>
<body><main class="login"><h1>Log in to control this node</h1>
<p>Enter the web token from the node's secrets directory (file <code>web_token</code>).</p>
{message}
<form method="post" action="/login">
<input type="password" name="token" id="token" autocomplete="current-password" autofocus>
<button type="submit" id="login-button">Log in</button></form>
<p><a href="/apps/QKD_status">Back to the status page</a></p></main></body></html>
"""
