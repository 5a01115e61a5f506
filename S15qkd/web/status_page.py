"""Status page: controls, engine state, worker badges, QBER and key graphs, cards."""

from __future__ import annotations

import logging
from typing import Any, Callable

from dash import Dash, Input, Output, ctx, html, no_update
from dash import dcc
from dash.exceptions import PreventUpdate

from S15qkd.status import ControlError, KeyProtocol, NodeControl, Role, StatusSnapshot, WorkerState
from S15qkd.web.format import card, figure_layout, value_table

log = logging.getLogger(__name__)

BADGE_CLASSES = {
    WorkerState.RUNNING: "badge running",
    WorkerState.RESTARTING: "badge restarting",
    WorkerState.FAILED: "badge failed",
    WorkerState.STOPPED: "badge stopped",
}

ROLE_LABELS = {Role.HIGH_COUNT: "High count side", Role.LOW_COUNT: "Low count side", Role.UNDECIDED: ""}
PROTOCOL_LABELS = {KeyProtocol.SERVICE: "Service mode", KeyProtocol.BBM92: "BBM92 mode"}

GRAPH_CONFIG = {"displayModeBar": False}


def layout() -> html.Div:
    return html.Div(className="status-page", children=[
        html.Div(id="blinded-banner", className="blinded", children="Detector blinded!", hidden=True),
        html.Div(className="controls", children=[
            html.Button("Start key generation", id="start-keygen", className="button start"),
            html.Button("Restart connection", id="restart-connection", className="button danger"),
            html.Button("Stop key generation", id="stop-keygen", className="button danger"),
            html.Span(id="control-message", className="message"),
        ]),
        html.Div(className="state-line", children=[
            html.Span("Engine state: "),
            html.Span(id="engine-state", className="engine-state"),
            html.Span(id="config-note", className="note"),
        ]),
        card("Workers", html.Div(id="worker-badges", className="badges")),
        html.Div(className="graphs", children=[
            card("QBER history", dcc.Graph(id="qber-graph", config=GRAPH_CONFIG)),
            card("Final key history", dcc.Graph(id="key-graph", config=GRAPH_CONFIG)),
        ]),
        html.Div(className="cards", children=[
            card("Raw key generation", html.Div(id="raw-key-card")),
            card("Error correction", html.Div(id="error-correction-card")),
        ]),
    ])


def _number(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.2f} %"


def _epoch(epoch: int | None) -> str:
    return "" if epoch is None else f"{epoch:08x}"


def worker_badges(snapshot: StatusSnapshot) -> list[html.Span]:
    badges = []
    for badge in snapshot.workers:
        title = f"{badge.state.value}; restarts: {badge.restarts}"
        if badge.last_error:
            title += f"; last error: {badge.last_error}"
        badges.append(html.Span(
            f"{badge.name}: {badge.state.value}",
            className=BADGE_CLASSES[badge.state],
            title=title,
            id=f"badge-{badge.name}",
        ))
    return badges


EMPTY_X_RANGE = [0, 10]


def mark_empty(layout: dict[str, Any]) -> None:
    """Give a graph without blocks a whole-number axis and a note, instead of a bare 0-1 axis."""
    layout["xaxis"]["range"] = EMPTY_X_RANGE
    layout["annotations"] = [{"text": "No error-corrected block yet", "showarrow": False,
                              "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]


def qber_figure(snapshot: StatusSnapshot) -> dict[str, Any]:
    ec = snapshot.error_correction
    first_number = ec.blocks - len(ec.recent_blocks) + 1
    numbers = list(range(first_number, ec.blocks + 1))
    qber = [100 * block.qber for block in ec.recent_blocks]
    limit_x = numbers if numbers else EMPTY_X_RANGE
    layout = figure_layout("Error-corrected block", "QBER (%)")
    if not numbers:
        mark_empty(layout)
    return {
        "data": [
            {"x": numbers, "y": qber, "type": "scatter", "mode": "lines+markers", "name": "QBER"},
            {"x": limit_x, "y": [100 * ec.qber_limit] * len(limit_x), "type": "scatter", "mode": "lines",
             "name": "QBER limit", "line": {"dash": "dash", "color": "#c0392b"}},
        ],
        "layout": layout,
    }


def key_figure(snapshot: StatusSnapshot) -> dict[str, Any]:
    ec = snapshot.error_correction
    first_number = ec.blocks - len(ec.recent_blocks) + 1
    numbers = list(range(first_number, ec.blocks + 1))
    layout = figure_layout("Error-corrected block", "Final key length (bits)")
    layout["yaxis2"] = {"title": {"text": "Key rate (bit/s)"}, "overlaying": "y", "side": "right",
                        "rangemode": "tozero"}
    if not numbers:
        mark_empty(layout)
    return {
        "data": [
            {"x": numbers, "y": [block.final_bits for block in ec.recent_blocks], "type": "bar",
             "name": "Final key length", "marker": {"color": "#2e86c1"}},
            {"x": numbers, "y": [block.key_rate_bps for block in ec.recent_blocks], "type": "scatter",
             "mode": "lines+markers", "name": "Key rate", "yaxis": "y2", "line": {"color": "#27ae60"}},
        ],
        "layout": layout,
    }


def raw_key_rows(snapshot: StatusSnapshot) -> list[tuple[str, str]]:
    raw = snapshot.raw_key
    rows = [
        ("Peer", raw.peer if snapshot.connected else ""),
        ("Role", ROLE_LABELS[raw.role]),
        ("Protocol", PROTOCOL_LABELS[raw.protocol]),
        ("Initial time offset (1/8 ns)", _number(raw.initial_time_offset_ticks)),
        ("Tracked time offset (1/8 ns)", _number(raw.tracked_time_offset_ticks)),
        ("Offset search signal/noise", _number(raw.offset_search_snr, 1)),
        ("Offset search signal/noise (fine)", _number(raw.offset_search_snr_fine, 1)),
        ("Coincidences per epoch", _number(raw.coincidences_per_epoch)),
        ("Accidentals per epoch", _number(raw.accidentals_per_epoch)),
        ("Last received epoch", _epoch(raw.last_received_epoch)),
        ("Skipped epochs (type-2 invalid or missing)", _number(raw.skipped_epochs)),
    ]
    if raw.frequency_offset is not None:
        # 1 ppm of relative frequency is 1 µs of drift per second.
        rows.append(("Frequency offset (corrected)",
                     f"{raw.frequency_offset:.4e} ({raw.frequency_offset * 1e6:.4f} ppm)"))
    if raw.service_qber is not None:
        rows.append(("Service QBER", _percent(raw.service_qber)))
    return rows


def error_correction_rows(snapshot: StatusSnapshot) -> list[tuple[str, str]]:
    ec = snapshot.error_correction
    last = ec.last_block
    rows = [
        ("Blocks", str(ec.blocks)),
        ("Total final key bits", str(ec.total_final_bits)),
        ("Undigested raw bits", str(ec.undigested_raw_bits)),
        ("Blocks in flight", str(ec.blocks_in_flight)),
        ("Servoed QBER", _percent(ec.servoed_qber)),
        ("QBER limit", _percent(ec.qber_limit)),
    ]
    if last is not None:
        rows += [
            ("Last block: first epoch", _epoch(last.first_epoch)),
            ("Last block: epochs", str(last.num_epochs)),
            ("Last block: raw bits", str(last.raw_bits)),
            ("Last block: QBER", _percent(last.qber)),
            ("Last block: leaked bits", str(last.leaked_bits)),
            ("Last block: efficiency", f"{last.efficiency:.3f}"),
            ("Last block: final bits", str(last.final_bits)),
            ("Key rate (bit/s)", f"{last.key_rate_bps:.1f}"),
        ]
    return rows


def register_callbacks(app: Dash, node: NodeControl, authorize: Callable[[], bool],
                       can_read: Callable[[], bool] = lambda: True) -> None:
    @app.callback(
        Output("engine-state", "children"),
        Output("engine-state", "className"),
        Output("config-note", "children"),
        Output("blinded-banner", "hidden"),
        Output("worker-badges", "children"),
        Output("qber-graph", "figure"),
        Output("key-graph", "figure"),
        Output("raw-key-card", "children"),
        Output("error-correction-card", "children"),
        Input("tick", "n_intervals"),
    )
    def refresh_status(_ticks):
        if not can_read():
            raise PreventUpdate
        snapshot = node.status()
        state = snapshot.engine_state.value
        return (
            state,
            f"engine-state state-{state.lower()}",
            snapshot.config_note,
            not snapshot.blinded,
            worker_badges(snapshot),
            qber_figure(snapshot),
            key_figure(snapshot),
            value_table(raw_key_rows(snapshot), "raw-key"),
            value_table(error_correction_rows(snapshot), "error-correction"),
        )

    actions = {
        "start-keygen": ("start key generation", node.start_keygen),
        "restart-connection": ("restart the connection", node.restart_connection),
        "stop-keygen": ("stop key generation", node.stop_keygen),
    }

    @app.callback(
        Output("control-message", "children"),
        Input("start-keygen", "n_clicks"),
        Input("restart-connection", "n_clicks"),
        Input("stop-keygen", "n_clicks"),
        prevent_initial_call=True,
    )
    def run_control(_start, _restart, _stop):
        if ctx.triggered_id not in actions:
            return no_update
        label, action = actions[ctx.triggered_id]
        if not authorize():
            return html.Span(["Log in to ", label, ": ", html.A("log in", href="/login")], className="error")
        log.info("web page requested: %s", label)
        try:
            action()
        except ControlError as error:
            log.warning("web page request to %s failed: %s", label, error)
            return html.Span(f"Could not {label}: {error}", className="error")
        return html.Span(f"Requested: {label}.", className="ok")
