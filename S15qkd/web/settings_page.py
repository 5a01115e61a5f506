"""Engine settings page: edit the configuration, check it, save it into the running node.

The form shows every scalar leaf of the node's configuration, so it follows whatever
keys the configuration has. Known keys get a readable label with their unit. Saving
sends the whole configuration to ``NodeControl.save_config``, which validates it, writes
it and applies it, and the page shows which keys took effect at once and which wait for
a restart of key generation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from S15qkd.status import ConfigRejected, NodeControl, flatten_config, set_config_path
from S15qkd.web.format import card

log = logging.getLogger(__name__)

# Labels with units for the keys operators change most; other keys show their path.
LABELS = {
    "identity": "Identity",
    "target_hostname": "Peer host name",
    "port_authd": "Channel port (TCP)",
    "remote_coincidence_window": "Coincidence window (1/8 ns)",
    "tracking_window": "Tracking window (1/8 ns)",
    "track_filter_time_constant": "Tracking filter time constant",
    "FFT_buffer_order": "FFT buffer order (log2 of bins)",
    "pfind_epochs": "Epochs for the time offset search",
    "qcrypto.pfind.frequency_search": "Frequency offset search and correction",
    "source.drift": "Simulated clock rate offset (relative)",
    "error_correction": "Error correction",
    "privacy_amplification": "Privacy amplification",
    "minimal_block_size": "Minimal block size (raw bits)",
    "maximal_block_size": "Maximal block size (raw bits)",
    "max_blocks_in_flight": "Blocks reconciled at once",
    "QBER_limit": "QBER limit (fraction)",
    "QBER_threshold": "Service QBER threshold (fraction)",
    "default_QBER": "Initial QBER estimate (fraction)",
    "servo_blocks": "Blocks in the QBER average",
}

GENERAL_SECTION = "General"

# Sections of the page for top-level keys, like the reference's cards; nested keys are
# grouped by their first component, and other top-level keys go to GENERAL_SECTION.
SECTIONS = {
    "Network connection": (
        "identity", "target_hostname", "port_authd", "listen_address", "local_connection_id",
        "remote_connection_id", "local_cert", "local_key", "remote_cert", "reconnect_min_s",
        "reconnect_max_s", "reply_timeout_s", "max_frame_bytes",
    ),
    "Peak finding and tracking": (
        "FFT_buffer_order", "pfind_epochs", "remote_coincidence_window", "tracking_window",
        "track_filter_time_constant", "max_event_diff", "service_epochs",
    ),
    "Error correction": (
        "error_correction", "privacy_amplification", "minimal_block_size",
        "maximal_block_size", "max_blocks_in_flight", "QBER_limit", "QBER_threshold",
        "default_QBER", "servo_blocks",
    ),
    "Folders": ("data_root", "final_key_folder"),
}
SECTION_OF_KEY = {key: section for section, keys in SECTIONS.items() for key in keys}

# Card titles for nested sections; the others show the key itself.
SECTION_TITLES = {"source": "Event source", "local_detector_skew_correction": "Detector skew corrections"}


def field_kind(value: Any) -> str | None:
    """Return the input kind for a configuration value, or None for values the form skips."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "optional"
    return None


def setting_input(path: str, value: Any, kind: str) -> Any:
    component_id = {"type": "setting", "key": path, "kind": kind}
    if kind == "bool":
        return dcc.Checklist(id=component_id, options=[{"label": " enabled", "value": "on"}],
                             value=["on"] if value else [], className="switch")
    if kind in ("int", "float"):
        return dcc.Input(id=component_id, name=path, type="number", value=value, step="any", debounce=True)
    return dcc.Input(id=component_id, name=path, type="text", value="" if value is None else value, debounce=True)


def layout(node: NodeControl, authorized: bool) -> html.Div:
    if not authorized:
        return html.Div(className="settings-page", children=[
            card("Engine settings", html.P([
                "The configuration is shown to logged-in operators only. ",
                html.A("Log in", href="/login"), " with the node's web token.",
            ])),
        ])
    sections: dict[str, list[Any]] = defaultdict(list)
    for path, value in sorted(flatten_config(node.get_config()).items()):
        kind = field_kind(value)
        if kind is None:
            continue
        if "." in path:
            section = path.split(".")[0]
        else:
            section = SECTION_OF_KEY.get(path, GENERAL_SECTION)
        sections[section].append(html.Div(className="setting", children=[
            html.Label(LABELS.get(path, path.partition(".")[2] or path), title=path),
            setting_input(path, value, kind),
        ]))
    named = list(SECTIONS) + [GENERAL_SECTION]
    ordered = named + sorted(s for s in sections if s not in named)
    return html.Div(className="settings-page", children=[
        html.Div(className="controls", children=[
            html.Button("Check", id="check-settings", className="button"),
            html.Button("Save", id="save-settings", className="button start"),
            html.Div(id="settings-message", className="message"),
        ]),
        html.Div(className="cards", children=[
            card(SECTION_TITLES.get(name, name), html.Div(className="settings-grid", children=sections[name]))
            for name in ordered if sections.get(name)
        ]),
    ])


def convert_value(kind: str, value: Any) -> Any:
    """Convert a form value back to the configuration's type; numbers stay as typed."""
    if kind == "bool":
        return bool(value) and "on" in value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "str":
        return "" if value is None else str(value)
    if kind == "optional":
        # An unset value (None) stays unset unless the operator typed something.
        return None if value in (None, "") else str(value)
    return value


def candidate_config(node: NodeControl, ids: list[dict[str, str]], values: list[Any]) -> dict[str, Any]:
    """Merge the form's values into the node's current configuration."""
    config = node.get_config()
    for component_id, value in zip(ids, values):
        set_config_path(config, component_id["key"], convert_value(component_id["kind"], value))
    return config


def problem_list(problems) -> html.Ul:
    return html.Ul(className="problems", children=[
        html.Li([html.Code(problem.key), f": {problem.message}"]) for problem in problems
    ])


def register_callbacks(app: Dash, node: NodeControl, authorize: Callable[[], bool]) -> None:
    @app.callback(
        Output("settings-message", "children"),
        Input("check-settings", "n_clicks"),
        Input("save-settings", "n_clicks"),
        State({"type": "setting", "key": ALL, "kind": ALL}, "value"),
        State({"type": "setting", "key": ALL, "kind": ALL}, "id"),
        prevent_initial_call=True,
    )
    def check_or_save(_check, _save, values, ids):
        if ctx.triggered_id not in ("check-settings", "save-settings"):
            return no_update
        if not authorize():
            return html.Span("Log in to change the configuration.", className="error")
        config = candidate_config(node, ids, values)
        if ctx.triggered_id == "check-settings":
            problems = node.validate_config(config)
            if problems:
                return html.Div([html.Span("Invalid values, nothing saved:", className="error"),
                                 problem_list(problems)])
            return html.Span("All values are valid.", className="ok")
        try:
            result = node.save_config(config)
        except ConfigRejected as error:
            log.warning("configuration from the web page rejected: %s", error)
            return html.Div([html.Span("Invalid values, nothing saved:", className="error"),
                             problem_list(error.problems)])
        log.info("configuration saved from the web page; changed %s", ", ".join(result.changed_keys))
        if not result.changed_keys:
            return html.Span("Saved; no value changed.", className="ok")
        lines = [html.Span("Saved.", className="ok")]
        if result.applied_keys:
            lines.append(html.P(["Applied to the running engine: ", ", ".join(result.applied_keys), "."],
                                id="settings-applied"))
        if result.restart_needed_keys:
            lines.append(html.P(["Takes effect after key generation restarts: ",
                                 ", ".join(result.restart_needed_keys), "."], id="settings-restart-needed"))
        if result.note:
            lines.append(html.P(result.note, className="note"))
        return html.Div(lines)
