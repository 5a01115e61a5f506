"""Classical channel: mutual TLS on loopback, acknowledged delivery, resume, bad peers."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from linkproxy import LinkProxy
from S15qkd.channel import (FrameTooLargeError, FrameType, Link, LinkSettings, LinkState,
                            create_node_certificate, make_context)
from S15qkd.channel.frames import (HEADER, MAGIC, VERSION, Frame, FrameError, encode_file, encode_json,
                                   parse_header)
from S15qkd.channel.link import _retrieve_exception


def wait_until(condition, timeout: float = 20.0) -> bool:
    """Polls ``condition`` until it holds; the limit only matters on a very slow machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    return {name: create_node_certificate(folder, name) for name in ("high", "low", "intruder")}


class Inbox:
    """Collects delivered frames and lets a test wait for a count."""

    def __init__(self):
        self.frames: list[tuple[FrameType, bytes]] = []
        self._condition = threading.Condition()

    def __call__(self, frame_type, payload):
        with self._condition:
            self.frames.append((frame_type, payload))
            self._condition.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: len(self.frames) >= count, timeout)


def make_link(certs, role, port, inbox, *, local=None, remote=None, resets=None, oversized=None,
              **extra):
    local = local or role
    remote = remote or ("low" if role == "high" else "high")
    cert, key = certs[local]
    remote_cert = str(certs[remote][0])
    context = make_context(role == "high", str(cert), str(key), remote_cert)
    settings = LinkSettings(role=role, host="127.0.0.1", port=port,
                            server_context=context if role == "high" else None,
                            client_context=context if role == "low" else None,
                            remote_cert=remote_cert, local_cert=str(cert), identity=role,
                            reconnect_min_s=0.05, reconnect_max_s=0.5, **extra)
    reset_log = resets if resets is not None else []
    return Link(settings, inbox, on_link_reset=reset_log.append, on_oversized=oversized)


@pytest.fixture
def pair(certs):
    port = free_port()
    inboxes = {"high": Inbox(), "low": Inbox()}
    links = {role: make_link(certs, role, port, inboxes[role]) for role in ("high", "low")}
    for link in links.values():
        link.start()
    assert links["low"].wait_connected(10)
    assert links["high"].wait_connected(10)
    yield links, inboxes, port
    for link in links.values():
        link.stop()


def test_frames_both_ways_and_acknowledged(pair):
    links, inboxes, _ = pair
    acked = threading.Event()
    links["low"].send(FrameType.FILE, b"\x02\x00\x00\x00\x87\x4f\x00\x00" + b"t2", on_acked=acked.set)
    links["high"].send(FrameType.CONTROL, b'{"msg":"st2"}')
    assert inboxes["high"].wait_for(1)
    assert inboxes["low"].wait_for(1)
    assert acked.wait(5)
    assert inboxes["high"].frames[0][0] is FrameType.FILE
    assert inboxes["low"].frames[0] == (FrameType.CONTROL, b'{"msg":"st2"}')


def test_both_sides_disable_nagle(pair):
    # Nagle's algorithm on either socket delays each small frame until the peer's
    # delayed ACK, which makes a reconciliation round trip up to 40 ms longer.
    links, _, _ = pair
    for role in ("high", "low"):
        writer = links[role]._current_writer
        assert writer is not None, f"{role} has no connection"
        sock = writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, role


def test_ack_travels_with_reply(certs):
    # A side that replies to each frame sends the ACK of the request in the same write as
    # its reply. The long delay keeps a slow machine from sending the ACKs alone.
    port = free_port()
    inboxes = {"high": Inbox(), "low": Inbox()}
    links = {role: make_link(certs, role, port, inboxes[role], ack_delay_s=5.0)
             for role in ("high", "low")}
    for link in links.values():
        link.start()
    try:
        assert links["low"].wait_connected(10)
        assert links["high"].wait_connected(10)
        writes_before = links["high"].stats.writes
        exchanges = 50
        for index in range(exchanges):
            links["low"].send(FrameType.RECONCILE, b"request %d" % index)
            assert inboxes["high"].wait_for(index + 1)
            links["high"].send(FrameType.RECONCILE, b"reply %d" % index)
            assert inboxes["low"].wait_for(index + 1)
        # One write per reply and none for an ACK alone, give or take the ACK of the
        # connection's start.
        assert links["high"].stats.writes - writes_before <= exchanges + 1
    finally:
        for link in links.values():
            link.stop()


def test_ack_goes_alone_without_reply(pair):
    links, inboxes, _ = pair
    acked = threading.Event()
    links["low"].send(FrameType.RECONCILE, b"no reply", on_acked=acked.set)
    assert inboxes["high"].wait_for(1)
    assert acked.wait(5)


def test_stop_retrieves_errors_of_ending_tasks(certs, caplog):
    """A connection task that fails while the link stops leaves no traceback in the log.

    A reader cancelled at the moment its connection closes can end with the read error
    instead of the cancellation, in the same event loop iteration in which the link's
    main coroutine returns. Its done callback, which retrieves the error, is then still
    queued when the loop stops.
    """
    link = make_link(certs, "low", free_port(), Inbox())

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionResetError("connection closed while cancelled") from None

    async def main() -> None:
        reader = asyncio.ensure_future(fails_when_cancelled())
        reader.add_done_callback(_retrieve_exception)
        await asyncio.sleep(0)
        reader.cancel()

    link._main = main
    caplog.set_level("ERROR", logger="asyncio")
    link._thread_main()
    gc.collect()
    unretrieved = [record.getMessage() for record in caplog.records
                   if "exception was never retrieved" in record.getMessage()]
    assert not unretrieved


def test_resume_after_drop_loses_and_repeats_nothing(pair):
    links, inboxes, _ = pair
    for index in range(300):
        links["high"].send(FrameType.RECONCILE, index.to_bytes(4, "little") * 256)
        if index == 150:
            links["low"].drop_connection("test drop")
    assert inboxes["low"].wait_for(300, timeout=20)
    assert wait_until(lambda: links["high"].queued_frames == 0)
    time.sleep(0.3)  # room for a repeated frame to show up
    received = [int.from_bytes(payload[:4], "little") for _, payload in inboxes["low"].frames]
    assert received == list(range(300))
    assert links["low"].stats.connections >= 2
    assert links["high"].queued_frames == 0


def test_peer_restart_starts_new_session(certs, pair):
    links, inboxes, port = pair
    discarded = threading.Event()
    links["low"].stop()
    links["high"].send(FrameType.CONTROL, b'{"msg":"old"}', on_discarded=discarded.set)
    resets: list[str] = []
    restarted = make_link(certs, "low", port, Inbox(), resets=resets)
    restarted.start()
    try:
        assert restarted.wait_connected(10)
        assert discarded.wait(5)
        assert resets == ["first connection to the peer"]
        assert links["high"].stats.resets == 2
    finally:
        restarted.stop()


def fingerprint(cert_path) -> str:
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()


def test_wrong_certificate_is_rejected(certs, caplog):
    port = free_port()
    high = make_link(certs, "high", port, Inbox())
    intruder = make_link(certs, "low", port, Inbox(), local="intruder")
    caplog.set_level(logging.ERROR, logger="S15qkd.channel.link")
    high.start()
    intruder.start()
    try:
        assert wait_until(lambda: "TLS handshake" in high.stats.last_error), high.stats.last_error
        assert high.state is LinkState.DISCONNECTED
        assert intruder.state is not LinkState.CONNECTED
        assert "TLS handshake" in high.stats.last_error
        assert "certificate" in high.stats.last_error.lower()
        # The operator can tell which certificate arrived.
        assert "subject 'O=QKDServer node,CN=intruder'" in high.stats.last_error
        assert f"SHA-256 fingerprint {fingerprint(certs['intruder'][0])}" in high.stats.last_error
    finally:
        intruder.stop()
        high.stop()


def test_client_rejects_server_with_other_certificate(certs):
    port = free_port()
    # The listening node presents the intruder's certificate to a client that pins "high".
    high = make_link(certs, "high", port, Inbox(), local="intruder")
    low = make_link(certs, "low", port, Inbox())
    high.start()
    low.start()
    try:
        assert wait_until(lambda: "this node rejected the peer's certificate" in low.stats.last_error), \
            low.stats.last_error
        assert f"not remote_cert ({certs['high'][0]})" in low.stats.last_error
        assert "subject 'O=QKDServer node,CN=intruder'" in low.stats.last_error
        assert f"SHA-256 fingerprint {fingerprint(certs['intruder'][0])}" in low.stats.last_error
        assert low.state is not LinkState.CONNECTED
    finally:
        low.stop()
        high.stop()


def raw_tls_client(certs, port):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_cert_chain(str(certs["low"][0]), str(certs["low"][1]))
    context.load_verify_locations(str(certs["high"][0]))
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(sock)


@pytest.mark.parametrize("frame, reason", [
    (b"XX" + bytes(14), "invalid frame magic"),
    (HEADER.pack(MAGIC, VERSION, 1, 0, 1 << 30), "oversized frame"),
    (HEADER.pack(MAGIC, VERSION, 99, 0, 0), "unknown frame type 99"),
    (HEADER.pack(MAGIC, 7, 1, 0, 0), "unsupported channel protocol version 7"),
])
def test_malformed_frame_closes_connection(certs, frame, reason):
    port = free_port()
    high = make_link(certs, "high", port, Inbox())
    high.start()
    try:
        with raw_tls_client(certs, port) as client:
            client.sendall(frame)
            client.settimeout(5)
            data = b""
            while True:
                chunk = client.recv(4096)
                if not chunk:
                    break
                data += chunk
        # The high-count side sends its HELLO only after a valid one, so it sends nothing here.
        assert data == b""
        assert reason in high.stats.last_error
        assert high.state is LinkState.DISCONNECTED
    finally:
        high.stop()


@pytest.fixture
def proxied_pair(certs):
    """High and low link connected through a LinkProxy."""
    port = free_port()
    proxy = LinkProxy(port)
    inboxes = {"high": Inbox(), "low": Inbox()}
    high = make_link(certs, "high", port, inboxes["high"])
    low = make_link(certs, "low", proxy.port, inboxes["low"])
    high.start()
    low.start()
    yield high, low, inboxes, proxy
    low.stop()
    high.stop()
    proxy.close()


def test_corrupted_byte_reconnects_and_resumes(proxied_pair):
    high, low, inboxes, proxy = proxied_pair
    assert low.wait_connected(10)
    for index in range(40):
        low.send(FrameType.RECONCILE, index.to_bytes(4, "little") * 1000)
        if index == 10:
            proxy.corrupt_after(2000)
    assert inboxes["high"].wait_for(40, timeout=20)
    received = [int.from_bytes(p[:4], "little") for _, p in inboxes["high"].frames]
    assert received == list(range(40))
    assert proxy.connections >= 2
    assert "lost" in high.stats.last_error or "closed" in high.stats.last_error


def test_cut_channel_resumes(proxied_pair):
    high, low, inboxes, proxy = proxied_pair
    assert low.wait_connected(10)
    proxy.cut()
    for index in range(20):
        high.send(FrameType.CONTROL, str(index).encode())
    assert wait_until(lambda: low.state is not LinkState.CONNECTED)
    proxy.restore()
    assert inboxes["low"].wait_for(20, timeout=15)
    assert [int(p) for _, p in inboxes["low"].frames] == list(range(20))


def test_parse_header_checks():
    frame = Frame(FrameType.CONTROL, 5, b"abc").encode()
    assert parse_header(frame[:16], 100) == (FrameType.CONTROL, 5, 3)
    with pytest.raises(FrameError, match="invalid sequence number 0 for a CONTROL frame"):
        parse_header(Frame(FrameType.CONTROL, 0, b"").encode()[:16], 100)


def test_certs_command_writes_pair(tmp_path):
    from S15qkd.cli.main import main

    assert main(["certs", "alice", "--folder", str(tmp_path)]) == 0
    assert (tmp_path / "alice.key").stat().st_mode & 0o777 == 0o600
    context = make_context(True, str(tmp_path / "alice.crt"), str(tmp_path / "alice.key"),
                           str(tmp_path / "alice.crt"))
    assert context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert main(["certs", "alice", "--folder", str(tmp_path)]) == 1


def hello_frame(role: str) -> bytes:
    """A first-connection HELLO as a node of this role sends it."""
    hello = {"session": "0123456789abcdef", "peer_session": "", "recv_next": 1,
             "role": role, "identity": f"raw {role}"}
    return Frame(FrameType.HELLO, 0, json.dumps(hello).encode()).encode()


class BufferedTlsClient:
    """A TLS client on a blocking socket whose records leave only on :meth:`flush`.

    Several records (a frame and the close_notify alert) then reach the peer in one TCP
    segment, so the peer's TLS layer reads the data and the close at once.
    """

    def __init__(self, certs, port: int):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_cert_chain(str(certs["low"][0]), str(certs["low"][1]))
        context.load_verify_locations(str(certs["high"][0]))
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        self._retry(self.tls.do_handshake)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the peer closed the TCP connection")
        self.incoming.write(data)

    def _retry(self, operation):
        while True:
            try:
                return operation()
            except ssl.SSLWantReadError:
                self.flush()
                self._receive()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def write(self, data: bytes) -> None:
        self.tls.write(data)

    def read_frame(self) -> tuple[FrameType, int, bytes]:
        header = self._read_exactly(HEADER.size)
        frame_type, seq, length = parse_header(header, 1 << 20)
        return frame_type, seq, self._read_exactly(length)

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            data += self._retry(lambda: self.tls.read(count - len(data)))
        return data

    def close_with(self, data: bytes) -> None:
        """Send data and the close_notify alert in one segment, then close the socket.

        The socket is read to its end first: closing it with unread data would send a
        TCP reset instead of a FIN.
        """
        self.tls.write(data)
        try:
            self.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            # The alert is written before OpenSSL reads what the peer sent since (an ACK
            # or a ticket); the peer's own alert is not awaited.
            pass
        self.flush()
        self.sock.shutdown(socket.SHUT_WR)
        while self.sock.recv(65536):
            pass
        self.sock.close()


def test_peer_close_logged_as_warning(certs, caplog):
    # The peer's last frame wakes this side's writer for its ACK while the TLS layer
    # closes the transport on the peer's close_notify. Both the writer and the reader
    # then end in the same event loop iteration, and only the reader knows the cause.
    # Which of the two a set of tasks yields first varies with the tasks' addresses, so
    # the test closes 16 connections.
    port = free_port()
    inbox = Inbox()
    high = make_link(certs, "high", port, inbox, ack_delay_s=0.0)
    caplog.set_level(logging.INFO, logger="S15qkd.channel.link")
    high.start()
    try:
        for attempt in range(16):
            caplog.clear()
            connections = high.stats.connections
            client = BufferedTlsClient(certs, port)
            client.write(hello_frame("low"))
            client.flush()
            assert client.read_frame()[0] is FrameType.HELLO
            assert wait_until(lambda: high.stats.connections > connections)
            client.close_with(Frame(FrameType.CONTROL, 1, b'{"msg":"last"}').encode())
            assert inbox.wait_for(attempt + 1)
            assert wait_until(lambda: high.state is LinkState.DISCONNECTED)
            closed = [record for record in caplog.records
                      if "closed the connection" in record.getMessage()]
            assert [record.levelname for record in closed] == ["WARNING"], caplog.text
            errors = [record.getMessage() for record in caplog.records
                      if record.levelno >= logging.ERROR]
            assert errors == []
            assert "closed the connection" in high.stats.last_error
    finally:
        high.stop()


def test_own_drop_logged_as_info(pair, caplog):
    # A frame queued right after the drop wakes the writer while the transport closes,
    # before the peer's close_notify reaches the reader.
    links, _, _ = pair
    caplog.set_level(logging.INFO, logger="S15qkd.channel.link")
    links["low"].drop_connection("test drop")
    links["low"].send(FrameType.CONTROL, b'{"msg":"after drop"}')
    assert wait_until(lambda: links["low"].stats.connections >= 2)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    closed = [record for record in caplog.records
              if "closed by this node: test drop" in record.getMessage()]
    assert [record.levelname for record in closed] == ["INFO"], caplog.text


def test_peer_reset_logged_as_error(certs, caplog):
    port = free_port()
    high = make_link(certs, "high", port, Inbox())
    caplog.set_level(logging.INFO, logger="S15qkd.channel.link")
    high.start()
    try:
        client = BufferedTlsClient(certs, port)
        client.write(hello_frame("low"))
        client.flush()
        assert client.read_frame()[0] is FrameType.HELLO
        assert wait_until(lambda: high.stats.connections == 1)
        # With a linger time of zero, close() sends a TCP reset instead of a FIN.
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sock.close()
        assert wait_until(lambda: high.state is LinkState.DISCONNECTED)
        errors = [record.getMessage() for record in caplog.records
                  if record.levelno >= logging.ERROR]
        assert len(errors) == 1, caplog.text
        assert "lost: [Errno 104] Connection reset by peer" in errors[0]
    finally:
        high.stop()


def raw_hello(session: str, recv_next: int = 1, role: str = "low", **fields) -> bytes:
    payload = encode_json({"session": session, "peer_session": "", "recv_next": recv_next,
                           "role": role, "identity": "raw", **fields})
    return Frame(FrameType.HELLO, 0, payload).encode()


def read_frame(client) -> tuple[int, bytes]:
    """Read one frame from a blocking TLS socket; return (type code, payload)."""
    data = b""
    while len(data) < HEADER.size:
        chunk = client.recv(HEADER.size - len(data))
        assert chunk, "connection closed before a frame arrived"
        data += chunk
    _, _, type_code, _, length = HEADER.unpack(data)
    payload = b""
    while len(payload) < length:
        chunk = client.recv(length - len(payload))
        assert chunk, "connection closed inside a frame"
        payload += chunk
    return type_code, payload


def test_silent_newcomer_keeps_live_link(certs, pair):
    # A TLS connection with the peer's certificate that sends no HELLO must not cost
    # the working connection anything.
    links, inboxes, port = pair
    with raw_tls_client(certs, port):
        time.sleep(1.0)
        links["low"].send(FrameType.CONTROL, b"after the newcomer")
        assert inboxes["high"].wait_for(1)
    assert links["low"].stats.connections == 1
    assert links["high"].stats.connections == 1
    assert links["high"].state is LinkState.CONNECTED


def test_second_node_same_certificate_rejected(certs, pair, caplog):
    links, inboxes, port = pair
    caplog.set_level(logging.WARNING, logger="S15qkd.channel.link")
    twin = make_link(certs, "low", port, Inbox())
    twin.start()
    try:
        assert wait_until(lambda: "same certificate" in twin.stats.last_error), \
            twin.stats.last_error
        time.sleep(1.0)  # room for the twin to retry and for the link to flap
        links["low"].send(FrameType.CONTROL, b"still the first node")
        assert inboxes["high"].wait_for(1)
        assert "the peer rejected this connection" in twin.stats.last_error
        assert twin.state is not LinkState.CONNECTED
        assert twin.stats.connections == 0
        assert links["low"].stats.connections == 1
        assert links["high"].stats.resets == 1
    finally:
        twin.stop()
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and "same certificate" in record.getMessage()]
    assert warnings, "no warning about two nodes with the same certificate"
    first_address = links["high"].stats.peer_address
    assert f"while the connection from {first_address} is alive" in warnings[0]
    assert "rejected a second connection from 127.0.0.1:" in warnings[0]


def test_silent_old_connection_taken_over(certs):
    # A peer whose old connection went silent without closing (a cut, or a machine
    # that restarted) reconnects with a new session: the new connection wins at once.
    port = free_port()
    high = make_link(certs, "high", port, Inbox(), ping_interval_s=0.25)
    high.start()
    low = make_link(certs, "low", port, Inbox())
    try:
        with raw_tls_client(certs, port) as stale:
            stale.sendall(raw_hello("stale-session"))
            assert read_frame(stale)[0] == FrameType.HELLO
            assert wait_until(lambda: high.state is LinkState.CONNECTED)
            time.sleep(0.6)  # beyond two ping intervals of the high-count side
            started = time.monotonic()
            low.start()
            assert low.wait_connected(10)
            assert time.monotonic() - started < 2.0
            assert high.stats.resets == 2
            assert high.stats.peer_address == f"127.0.0.1:{low._current_writer.get_extra_info('sockname')[1]}"
    finally:
        low.stop()
        high.stop()


def test_repeated_session_switches_warned(certs, pair, caplog):
    links, _, port = pair
    caplog.set_level(logging.INFO, logger="S15qkd.channel.link")
    links["low"].stop()
    for _ in range(2):
        restarted = make_link(certs, "low", port, Inbox())
        restarted.start()
        try:
            assert restarted.wait_connected(10)
        finally:
            restarted.stop()
    assert links["high"].stats.resets == 3
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and "new link sessions" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2 new link sessions in the last 60 s" in warnings[0]


def test_frame_above_peer_limit_not_sent(certs):
    # The high-count side accepts less than the low-count side: a type-2 file of 1.5e5
    # pairs/s is about 76 kB. The sender learns the limit from the HELLO.
    port = free_port()
    inbox = Inbox()
    high = make_link(certs, "high", port, inbox, max_frame_bytes=65536)
    low = make_link(certs, "low", port, Inbox())
    high.start()
    low.start()
    try:
        assert low.wait_connected(10)
        with pytest.raises(FrameTooLargeError) as raised:
            low.send(FrameType.FILE, encode_file(2, 0x50CC, 7, bytes(76512)))
        message = str(raised.value)
        assert "type-2 file of epoch 000050cc not sent" in message
        assert "payload of 76524 bytes" in message
        assert "max_frame_bytes of the peer (high), 65536" in message
        assert "set max_frame_bytes on the peer (high) to at least 76524" in message
        low.send(FrameType.CONTROL, b"small")
        assert inbox.wait_for(1)
        assert inbox.frames == [(FrameType.CONTROL, b"small")]
        assert low.stats.connections == 1
        assert high.stats.connections == 1
    finally:
        low.stop()
        high.stop()


def test_queued_frame_above_peer_limit_dropped(certs):
    # Queued before the first HELLO, when the peer's limit was not known yet.
    port = free_port()
    inbox = Inbox()
    errors: list[FrameTooLargeError] = []
    discarded = threading.Event()
    high = make_link(certs, "high", port, inbox, max_frame_bytes=65536)
    low = make_link(certs, "low", port, Inbox(), oversized=errors.append)
    low.send(FrameType.RECONCILE, bytes(70000), on_discarded=discarded.set)
    low.send(FrameType.CONTROL, b"behind it")
    high.start()
    low.start()
    try:
        assert inbox.wait_for(1)
        assert discarded.wait(5)
        assert inbox.frames == [(FrameType.CONTROL, b"behind it")]
        assert len(errors) == 1
        assert "RECONCILE frame not sent" in str(errors[0])
        assert "at least 70000" in str(errors[0])
        assert low.stats.connections == 1
    finally:
        low.stop()
        high.stop()


def test_peer_without_limit_in_hello_uses_own(certs):
    # A peer that predates the announcement: this node assumes its own limit.
    port = free_port()
    high = make_link(certs, "high", port, Inbox())
    high.start()
    low = make_link(certs, "low", port, Inbox(), max_frame_bytes=65536)
    try:
        with raw_tls_client(certs, port) as client:
            client.sendall(raw_hello("old-peer"))
            type_code, payload = read_frame(client)
            assert type_code == FrameType.HELLO
            assert b'"max_frame_bytes":16777216' in payload
        low.start()
        assert low.wait_connected(10)
        low._peer_max_frame = None  # as after the HELLO of an older node
        with pytest.raises(FrameTooLargeError, match="set max_frame_bytes on both nodes to at least 65537"):
            low.send(FrameType.CONTROL, bytes(65537))
    finally:
        low.stop()
        high.stop()


def test_repeated_oversized_frame_counted(certs, caplog):
    # An older sender that ignores the limit: the connection closes each time the frame
    # arrives, and the receiver logs the error once with a count, not once per attempt.
    port = free_port()
    high = make_link(certs, "high", port, Inbox(), max_frame_bytes=65536)
    caplog.set_level(logging.ERROR, logger="S15qkd.channel.link")
    high.start()
    try:
        for attempt in range(5):
            with raw_tls_client(certs, port) as client:
                client.sendall(raw_hello(f"old-peer-{attempt}"))
                read_frame(client)
                client.sendall(HEADER.pack(MAGIC, VERSION, int(FrameType.FILE), 1, 76524))
                client.settimeout(5)
                try:
                    while client.recv(4096):  # until the node closes the connection
                        pass
                except OSError:
                    pass
            assert wait_until(lambda: high.state is LinkState.DISCONNECTED)
        assert "set max_frame_bytes on this node to at least 76524" in high.stats.last_error
    finally:
        high.stop()
    lines = [record.getMessage() for record in caplog.records if "oversized frame" in record.getMessage()]
    # The first in full, then the 2nd, 3rd and 5th with their count.
    assert len(lines) == 4, lines
    assert lines[-1].endswith("(5 times so far)")


@pytest.mark.parametrize("fields, reason", [
    ({"recv_next": 2**70}, "recv_next 1180591620717411303424, expected an integer from 1 to "
                           "18446744073709551615 (the 64-bit sequence number field)"),
    ({"recv_next": 0}, "recv_next 0, expected an integer from 1"),
    ({"recv_next": True}, "recv_next True, expected an integer from 1"),
    ({"session": ""}, "session '', expected a non-empty string"),
    ({"role": "middle"}, "role 'middle', expected 'high' or 'low'"),
    ({"max_frame_bytes": 2**32}, "max_frame_bytes 4294967296, expected an integer from 1 to "
                                 "4294967295"),
])
def test_invalid_hello_field_named(certs, fields, reason):
    port = free_port()
    high = make_link(certs, "high", port, Inbox())
    high.start()
    try:
        with raw_tls_client(certs, port) as client:
            values = {"session": "raw-session", "recv_next": 1, "role": "low",
                      "identity": "marker-of-the-whole-message", **fields}
            client.sendall(raw_hello(**values))
            client.settimeout(5)
            try:
                while client.recv(4096):  # until the node closes the connection
                    pass
            except OSError:
                pass
        assert wait_until(lambda: "HELLO" in high.stats.last_error), high.stats.last_error
        assert "invalid HELLO from 127.0.0.1:" in high.stats.last_error
        assert reason in high.stats.last_error
        assert "marker-of-the-whole-message" not in high.stats.last_error
        assert high.stats.connections == 0
    finally:
        high.stop()
