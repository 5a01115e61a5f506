"""Building blocks shared by the pages: cards, label/value tables, graph layouts."""

from __future__ import annotations

from typing import Any

from dash import html


def card(title: str, *children: Any, card_id: str | None = None) -> html.Section:
    properties = {"id": card_id} if card_id else {}
    return html.Section(className="card", children=[html.H2(title), *children], **properties)


def value_table(rows: list[tuple[str, str]], prefix: str) -> html.Table:
    """Render label/value rows; each value cell gets the id ``<prefix>-<row index>``."""
    return html.Table(className="values", children=[
        html.Tbody([
            html.Tr([html.Th(label), html.Td(value, id=f"{prefix}-{index}")])
            for index, (label, value) in enumerate(rows)
        ])
    ])


def figure_layout(x_title: str, y_title: str) -> dict[str, Any]:
    """Return a compact plotly layout; ``uirevision`` keeps the user's zoom across redraws."""
    return {
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "margin": {"l": 60, "r": 60, "t": 10, "b": 50},
        "height": 300,
        "legend": {"orientation": "h", "y": 1.12},
        "uirevision": "keep",
    }
