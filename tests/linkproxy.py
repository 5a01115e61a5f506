"""A TCP relay between two nodes that can cut or pause the link or flip a byte, for fault tests."""

from __future__ import annotations

import socket
import threading


class LinkProxy:
    """Relay 127.0.0.1:<port> to an upstream port.

    ``cut()`` drops and refuses connections; ``pause()`` keeps them open but forwards
    nothing, like a peer that stops responding, until ``resume()``.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._cut = False
        self._flip_at: int | None = None   # byte offset (client to server) to corrupt
        self._forwarded = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self.connections = 0
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def pause(self) -> None:
        """Hold every byte in both directions; the connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward the held bytes and everything after them."""
        self._flowing.set()

    def corrupt_after(self, count: int) -> None:
        """Flip one bit of the client-to-server stream ``count`` bytes from now."""
        with self._lock:
            self._flip_at = self._forwarded + count

    def close(self) -> None:
        self.cut()
        self.resume()
        _close(self._listener)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, client_to_server: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                _close(source)
                _close(target)
                return
            self._flowing.wait()
            if client_to_server:
                data = self._maybe_corrupt(data)
            try:
                target.sendall(data)
            except OSError:
                _close(source)
                _close(target)
                return

    def _maybe_corrupt(self, data: bytes) -> bytes:
        with self._lock:
            start = self._forwarded
            self._forwarded += len(data)
            flip_at = self._flip_at
            if flip_at is None or not start <= flip_at < self._forwarded:
                return data
            self._flip_at = None
        buffer = bytearray(data)
        buffer[flip_at - start] ^= 0x01
        return bytes(buffer)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
