"""Web page (Dash) and HTTP API of a node.

``serve(node, secrets_dir)`` starts both inside the node's process on port 8000; the
node passes any object that implements ``S15qkd.status.NodeControl``.
"""

from S15qkd.web.server import DEFAULT_PORT, TOKEN_FILE_NAME, WebServer, serve

__all__ = ["DEFAULT_PORT", "TOKEN_FILE_NAME", "WebServer", "serve"]
