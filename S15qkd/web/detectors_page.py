"""Detectors page: count rates per detector and node, skews, coincidence histogram, basis QBER."""

from __future__ import annotations

from typing import Any, Callable

from dash import Dash, Input, Output, dcc, html
from dash.exceptions import PreventUpdate

from S15qkd.status import EPOCH_SECONDS, StatusSnapshot
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


def counts_table(snapshot: StatusSnapshot) -> html.Table:
    counts = snapshot.detectors.counts
    width = max((len(node.counts_per_epoch) for node in counts), default=0)
    header = html.Tr([html.Th("Node"), html.Th("Epoch")]
                     + [html.Th(f"D{i + 1}", title=f"detector {i + 1}, counts per second") for i in range(width)]
                     + [html.Th("Total")])
    rows = []
    for node in counts:
        rates = [f"{count / EPOCH_SECONDS:,.0f}" for count in node.counts_per_epoch]
        epoch = "" if node.epoch is None else f"{node.epoch:08x}"
        rows.append(html.Tr([html.Td(node.node), html.Td(epoch)] + [html.Td(rate) for rate in rates]
                            + [html.Td(f"{node.total / EPOCH_SECONDS:,.0f}")]))
    table = html.Table(className="values counts", id="counts-values", children=[html.Thead(header), html.Tbody(rows)])
    return html.Div(className="scroll", children=[table, html.P("Count rates in counts per second.", className="note")])


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
    layout = figure_layout("Time difference minus tracked offset (ns)", "Pairs")
    if histogram is None:
        layout["xaxis"]["range"] = [-5, 5]
        layout["annotations"] = [{"text": "No histogram yet", "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}]
        return {"data": [], "layout": layout}, "The histogram appears once the node tracks coincidences."
    centres = [(start + histogram.bin_width_ticks / 2) / TICKS_PER_NS for start in histogram.bin_starts_ticks()]
    data = [{"x": centres, "y": list(histogram.counts), "type": "bar", "name": "pairs",
             "marker": {"color": "#8e44ad"}}]
    caption = (f"Tracked offset {histogram.tracked_offset_ticks} ticks "
               f"({histogram.tracked_offset_ticks / TICKS_PER_NS:.1f} ns); "
               f"bin width {histogram.bin_width_ticks / TICKS_PER_NS:g} ns.")
    return {"data": data, "layout": layout}, caption


def skew_rows(snapshot: StatusSnapshot) -> list[tuple[str, str]]:
    return [
        (f"Detector {i + 1}", f"{ticks} ticks ({ticks / TICKS_PER_NS:g} ns)")
        for i, ticks in enumerate(snapshot.detectors.skew_corrections_ticks)
    ]


def basis_rows(snapshot: StatusSnapshot) -> list[tuple[str, str]]:
    if not snapshot.detectors.basis_qber:
        return [("", "Filled while the link runs in service mode.")]
    return [(basis, f"{100 * qber:.2f} %") for basis, qber in sorted(snapshot.detectors.basis_qber.items())]


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
