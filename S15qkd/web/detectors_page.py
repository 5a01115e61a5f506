"""Detectors page: count rates per detector and node, skews, coincidence histogram, basis QBER."""

from __future__ import annotations

from typing import Any, Callable

from dash import Dash, Input, Output, dcc, html
from dash.exceptions import PreventUpdate

from S15qkd.status import EPOCH_SECONDS, Role, StatusSnapshot
from S15qkd.web.format import card, figure_layout, value_table

GRAPH_CONFIG = {"displayModeBar": False}

# A tick is 1/8 ns.
TICKS_PER_NS = 8


def layout() -> html.Div:
    return html.Div(className="detectors-page", children=[
        html.Div(className="graphs", children=[
            card("Count rates", dcc.Graph(id="counts-graph", config=GRAPH_CONFIG),
                 html.Div(id="counts-table")),
            card("Coincidence time histogram", dcc.Graph(id="histogram-graph", config=GRAPH_CONFIG),
                 html.Div(id="histogram-caption", className="note")),
        ]),
        html.Div(className="cards", children=[
            card("Detector skew corrections", html.Div(id="skew-table")),
            card("QBER per basis (service mode)", html.Div(id="basis-qber-table")),
        ]),
    ])


def counts_table(snapshot: StatusSnapshot) -> html.Div:
    """Build the count rate table with one column per node and one row per detector.

    This layout stays narrow enough for the half-width card with two nodes.
    """
    counts = snapshot.detectors.counts
    width = max((len(node.counts_per_epoch) for node in counts), default=0)
    header = html.Tr([html.Th("")] + [html.Th(node.node) for node in counts])
    rows = [html.Tr([html.Th("Epoch")]
                    + [html.Td("" if node.epoch is None else f"{node.epoch:08x}") for node in counts])]
    for detector in range(width):
        cells = [html.Td(f"{node.counts_per_epoch[detector] / EPOCH_SECONDS:,.0f}"
                         if detector < len(node.counts_per_epoch) else "") for node in counts]
        rows.append(html.Tr([html.Th(f"Detector {detector + 1}")] + cells))
    rows.append(html.Tr([html.Th("Total")] + [html.Td(f"{node.total / EPOCH_SECONDS:,.0f}")
                                              for node in counts]))
    table = html.Table(className="values counts", id="counts-values",
                       children=[html.Thead(header), html.Tbody(rows)])
    return html.Div(className="scroll", children=[
        table, html.P("Count rates in counts per second over the node's last epoch.", className="note")])


def counts_figure(snapshot: StatusSnapshot) -> dict[str, Any]:
    data = []
    for node in snapshot.detectors.counts:
        data.append({
            "x": [f"Detector {i + 1}" for i in range(len(node.counts_per_epoch))],
            "y": [count / EPOCH_SECONDS for count in node.counts_per_epoch],
            "type": "bar",
            "name": node.node,
        })
    layout = figure_layout("", "Count rate (1/s)")
    layout["barmode"] = "group"
    return {"data": data, "layout": layout}


def histogram_figure(snapshot: StatusSnapshot) -> tuple[dict[str, Any], str]:
    histogram = snapshot.detectors.histogram
    layout = figure_layout("Time difference minus tracked offset (ns)", "Pairs per epoch")
    if histogram is None:
        layout["xaxis"]["range"] = [-5, 5]
        layout["annotations"] = [{"text": "No histogram yet", "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]
        return {"data": [], "layout": layout}, empty_histogram_caption(snapshot.raw_key.role)
    centres = [(start + histogram.bin_width_ticks / 2) / TICKS_PER_NS for start in histogram.bin_starts_ticks()]
    data = [{"x": centres, "y": list(histogram.counts), "type": "bar", "name": "pairs",
             "marker": {"color": "#8e44ad"}}]
    epoch = "one epoch" if histogram.epoch is None else f"epoch {histogram.epoch:08x}"
    origin = (f"Computed by {histogram.computed_by}, where costream matches the coincidences, "
              "and sent to this node. " if histogram.computed_by else "")
    caption = (f"{origin}Pairs costream examined in {epoch}, by their time difference from the "
               f"tracked offset {histogram.tracked_offset_ticks} ticks "
               f"({histogram.tracked_offset_ticks / TICKS_PER_NS:.1f} ns); "
               f"bin width {histogram.bin_width_ticks / TICKS_PER_NS:g} ns.")
    return {"data": data, "layout": layout}, caption


def empty_histogram_caption(role: Role) -> str:
    if role is Role.LOW_COUNT:
        return ("costream runs on the high-count side; its histogram appears here once the peer "
                "sends the first one, after the time offset is found.")
    return "The histogram appears once costream has matched its first epoch."


def skew_rows(snapshot: StatusSnapshot) -> list[tuple[str, str]]:
    return [
        (f"Detector {i + 1}", f"{ticks} ticks ({ticks / TICKS_PER_NS:g} ns)")
        for i, ticks in enumerate(snapshot.detectors.skew_corrections_ticks)
    ]


def basis_rows(snapshot: StatusSnapshot) -> list[tuple[str, str]]:
    if not snapshot.detectors.basis_qber:
        return [("", "Filled while the link runs in service mode.")]
    return [(f"{basis} basis", f"{100 * qber:.2f} %")
            for basis, qber in sorted(snapshot.detectors.basis_qber.items())]


def register_callbacks(app: Dash, node, can_read: Callable[[], bool] = lambda: True) -> None:
    @app.callback(
        Output("counts-graph", "figure"),
        Output("counts-table", "children"),
        Output("histogram-graph", "figure"),
        Output("histogram-caption", "children"),
        Output("skew-table", "children"),
        Output("basis-qber-table", "children"),
        Input("tick", "n_intervals"),
    )
    def refresh_detectors(_ticks):
        if not can_read():
            raise PreventUpdate
        snapshot = node.status()
        histogram, caption = histogram_figure(snapshot)
        return (
            counts_figure(snapshot),
            counts_table(snapshot),
            histogram,
            caption,
            value_table(skew_rows(snapshot), "skew"),
            value_table(basis_rows(snapshot), "basis-qber"),
        )
