"""Serve the web page and the HTTP routes from inside the node's process.

The node and the page must share one process, because the page reads the node's
in-memory status. So the WSGI server (waitress) runs in threads of the node, not as a
separate gunicorn master. Waitress speaks only plain HTTP. With a certificate, a small
TLS front end in this module accepts HTTPS connections and relays each one to waitress
over a Unix socket in a private temporary directory.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from waitress import create_server
from waitress import wasyncore

from S15qkd.status import NodeControl
from S15qkd.web.app import create_app
from S15qkd.web.auth import TokenChecker, load_token

log = logging.getLogger(__name__)

DEFAULT_PORT = 8000

#: File name of the web token inside the node's secrets directory.
TOKEN_FILE_NAME = "web_token"

# Seconds a TLS relay waits for the handshake or for a stalled peer before it gives up.
RELAY_TIMEOUT_S = 120.0


class WebServer:
    """The node's web page and HTTP API on ``host:port``, served by waitress threads.

    ``token`` protects the control routes. ``certfile``/``keyfile`` (PEM) switch the
    listener to HTTPS. ``port=0`` picks a free port, which :attr:`port` then returns.
    """

    def __init__(
        self,
        node: NodeControl,
        token: str,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        protect_status: bool = False,
        threads: int = 8,
    ):
        if (certfile is None) != (keyfile is None):
            raise ValueError("HTTPS needs both a certificate file and a key file; got only one of them")
        self.app = create_app(node, TokenChecker(token), protect_status=protect_status)
        self._host = host
        self._requested_port = port
        self._certfile = certfile
        self._keyfile = keyfile
        self._threads = threads
        self._waitress = None
        self._waitress_lock = threading.Lock()
        self._waitress_closed = False
        self._threads_started: list[threading.Thread] = []
        self._tls_listener: socket.socket | None = None
        self._socket_dir: tempfile.TemporaryDirectory | None = None
        self._stopping = threading.Event()
        self.port: int | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._certfile else "http"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def bind_description(self) -> str:
        """Where the socket accepts connections, for the start-up log.

        :attr:`url` names 127.0.0.1 for a wildcard host, which would hide that every
        network interface of the machine reaches the page.
        """
        if self._host in ("0.0.0.0", "", "::"):
            return (f"listening on every network interface, port {self.port}; "
                    "--web-host 127.0.0.1 keeps it on this machine")
        return f"listening on {self._host} only"

    def start(self) -> None:
        """Bind the listening socket and start serving; raises OSError if the port is taken."""
        if self._certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self._certfile), str(self._keyfile))
            self._socket_dir = tempfile.TemporaryDirectory(prefix="qkd-web-")
            backend_path = str(Path(self._socket_dir.name) / "waitress.sock")
            self._waitress = create_server(
                self.app.server, unix_socket=backend_path, unix_socket_perms="600",
                threads=self._threads, url_scheme="https", ident="qkdserver",
            )
            listener = socket.create_server((self._host, self._requested_port), reuse_port=False)
            self._tls_listener = listener
            self.port = listener.getsockname()[1]
            self._spawn(self._accept_tls, context, listener, backend_path, name="web-tls-accept")
        else:
            self._waitress = create_server(
                self.app.server, host=self._host, port=self._requested_port,
                threads=self._threads, ident="qkdserver",
            )
            self.port = int(self._waitress.effective_port)
        self._spawn(self._run_waitress, name="web-waitress")
        log.info("web page serving on %s (%s)", self.url, self.bind_description)

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the server threads."""
        self._stopping.set()
        if self._tls_listener is not None:
            # close() alone does not wake a thread blocked in accept() on Linux.
            try:
                self._tls_listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._tls_listener.close()
        if self._waitress is not None:
            with self._waitress_lock:
                if not self._waitress_closed:
                    self._waitress.pull_trigger()
        for thread in self._threads_started:
            thread.join(timeout=5)
        if self._socket_dir is not None:
            self._socket_dir.cleanup()
        log.info("web page on port %s stopped", self.port)

    def __enter__(self) -> "WebServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads_started.append(thread)

    def _run_waitress(self) -> None:
        # Poll in single rounds instead of waitress's run(), so that stop() only has to
        # set the flag and wake the poll. The sockets are then closed in this thread,
        # never under a select() running in another one.
        server = self._waitress
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=1.0, map=server._map, count=1)
        finally:
            # Under the lock, so that stop() never writes to the trigger's closed (and
            # possibly reused) file descriptor.
            with self._waitress_lock:
                server.task_dispatcher.shutdown()
                wasyncore.close_all(server._map)
                self._waitress_closed = True

    def _accept_tls(self, context: ssl.SSLContext, listener: socket.socket, backend_path: str) -> None:
        while not self._stopping.is_set():
            try:
                client, address = listener.accept()
            except OSError:
                if not self._stopping.is_set():
                    log.exception("TLS listener on port %s failed; HTTPS stops", self.port)
                return
            threading.Thread(target=self._relay_tls, args=(context, client, address, backend_path),
                             name="web-tls-relay", daemon=True).start()

    def _relay_tls(self, context: ssl.SSLContext, client: socket.socket, address, backend_path: str) -> None:
        """Terminate TLS for one client and copy bytes between it and waitress."""
        client.settimeout(RELAY_TIMEOUT_S)
        try:
            tls = context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.warning("TLS handshake with %s failed: %s", address[0], error)
            client.close()
            return
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        backend.settimeout(RELAY_TIMEOUT_S)
        try:
            backend.connect(backend_path)
            self._pump(tls, backend)
        except (ssl.SSLError, OSError) as error:
            log.debug("TLS relay for %s ended: %s", address[0], error)
        finally:
            backend.close()
            tls.close()

    @staticmethod
    def _pump(tls: ssl.SSLSocket, backend: socket.socket) -> None:
        # One thread serves both directions, because an SSL socket must not be read and
        # written from two threads at once. pending() covers bytes that OpenSSL has
        # already decrypted, which select() cannot see.
        while True:
            if tls.pending():
                readable = [tls]
            else:
                readable, _, _ = select.select([tls, backend], [], [], RELAY_TIMEOUT_S)
                if not readable:
                    return
            if tls in readable:
                data = tls.recv(65536)
                if not data:
                    return
                backend.sendall(data)
            if backend in readable:
                data = backend.recv(65536)
                if not data:
                    return
                tls.sendall(data)


def serve(
    node: NodeControl,
    secrets_dir: str | os.PathLike[str],
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    protect_status: bool = False,
) -> WebServer:
    """Start the web page of ``node`` with the token ``<secrets_dir>/web_token`` (created if missing)."""
    token = load_token(Path(secrets_dir) / TOKEN_FILE_NAME)
    server = WebServer(node, token, host=host, port=port, certfile=certfile, keyfile=keyfile,
                       protect_status=protect_status)
    server.start()
    return server
