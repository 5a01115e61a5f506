"""Dash application of a node: three pages over one ``NodeControl``.

Pages keep the reference's paths: ``/apps/QKD_status`` (and every unknown path),
``/apps/QKD_settings`` and ``/apps/detector_settings``. One ``dcc.Interval`` ticks every
second and each page's callback redraws from a fresh status snapshot, so the browser
never reloads.
"""

from __future__ import annotations

from pathlib import Path

import dash
import flask
from dash import Input, Output, dcc, html

from S15qkd.status import NodeControl
from S15qkd.web import detectors_page, settings_page, status_page
from S15qkd.web.auth import SESSION_COOKIE, TokenChecker
from S15qkd.web.routes import register_routes

ASSETS = Path(__file__).with_name("assets")

STATUS_PATH = "/apps/QKD_status"
SETTINGS_PATH = "/apps/QKD_settings"
DETECTORS_PATH = "/apps/detector_settings"

REFRESH_MS = 1000


def request_is_authorized(checker: TokenChecker) -> bool:
    """Check the credentials of the Flask request that runs the current Dash callback."""
    verdict = checker.credentials(
        flask.request.headers.get("Authorization"), flask.request.cookies.get(SESSION_COOKIE)
    )
    return verdict == "valid"


def navbar() -> html.Nav:
    return html.Nav(className="navbar", children=[
        html.Span("S15 QKD", className="brand"),
        dcc.Link("Status", href=STATUS_PATH, id="nav-status"),
        dcc.Link("QKD Engine Settings", href=SETTINGS_PATH, id="nav-settings"),
        dcc.Link("Detectors", href=DETECTORS_PATH, id="nav-detectors"),
        html.Span(id="nav-identity", className="identity"),
        html.Span(id="nav-login", className="login-link"),
    ])


def create_app(node: NodeControl, checker: TokenChecker, protect_status: bool = False) -> dash.Dash:
    """Build the Dash app and its Flask server with the HTTP routes of the node."""
    server = flask.Flask("S15qkd.web")
    app = dash.Dash(
        "S15qkd.web",
        server=server,
        title="S15 QKD",
        update_title=None,
        assets_folder=str(ASSETS),
        suppress_callback_exceptions=True,
        serve_locally=True,
    )
    register_routes(server, node, checker, protect_status=protect_status)

    app.layout = html.Div([
        dcc.Location(id="url"),
        dcc.Interval(id="tick", interval=REFRESH_MS),
        navbar(),
        html.Main(id="page"),
    ])

    @app.callback(Output("page", "children"), Input("url", "pathname"))
    def render_page(pathname: str | None):
        authorized = request_is_authorized(checker)
        if protect_status and not authorized:
            return html.Div(className="card", children=[
                html.P("This node shows its status only to logged-in operators."),
                html.A("Log in", href="/login"),
            ])
        if pathname == SETTINGS_PATH:
            return settings_page.layout(node, authorized)
        if pathname == DETECTORS_PATH:
            return detectors_page.layout()
        return status_page.layout()

    @app.callback(
        Output("nav-identity", "children"),
        Output("nav-login", "children"),
        Input("url", "pathname"),
    )
    def render_navbar_state(_pathname: str | None):
        authorized = request_is_authorized(checker)
        link = html.A("Log out", href="/logout") if authorized else html.A("Log in", href="/login")
        identity = node.status().identity if (authorized or not protect_status) else ""
        return identity, link

    def authorize() -> bool:
        return request_is_authorized(checker)

    def can_read() -> bool:
        return not protect_status or authorize()

    status_page.register_callbacks(app, node, authorize, can_read)
    settings_page.register_callbacks(app, node, authorize)
    detectors_page.register_callbacks(app, node, can_read)
    return app
