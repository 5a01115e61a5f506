"""One mutual-TLS connection to the peer node, with acknowledged, resumable delivery.

The high-count side listens and the low-count side connects. Both present their own
certificate and accept only the peer certificate named in their configuration: it is the
only trust anchor of the TLS context, and after the handshake the peer's certificate
must also be byte for byte the configured one (pinning), so a certificate merely signed
by the same key is refused too. TLS 1.3 only.

Delivery. :meth:`Link.send` queues a frame; frames are numbered per link session and
kept until the peer acknowledges them, then ``on_acked`` runs (the sender of an epoch
file deletes the file there). After a lost connection both sides exchange HELLO frames
that carry their session id, the peer session they know and the next sequence number
they expect, and the sender retransmits from there: nothing is lost and the receiver
drops what it already processed, so nothing is delivered twice.

The low-count side sends its HELLO first, and the high-count side sends its own only
after reading it. A new connection with the peer's certificate replaces the current one only
when it resumes the current session or the current connection has been silent for
longer than ``ALIVE_PING_INTERVALS`` ping intervals. Otherwise the high-count side
rejects it: two nodes then appear to use the same certificate, and taking turns would
restart the link over and over.

When either node restarted (its session id changed) the old numbering means nothing to
the other side: the link starts a new session, every queued frame of the old session is
handed to its ``on_discarded`` callback, and ``on_link_reset`` tells the node, which
restarts key generation from a clean state.

Each side announces its ``max_frame_bytes`` in its HELLO, and a frame above the peer's
limit is never sent: :meth:`Link.send` raises :class:`FrameTooLargeError`, and a frame
queued before the limit was known goes to ``on_oversized``. A peer that announces no
limit is assumed to have this node's.

A frame that breaks the format (bad magic or version, unknown type, payload above
``max_frame_bytes``, a gap in the numbering) closes the connection with a logged error;
the client side reconnects with exponential backoff. A connection silent for longer
than ``idle_timeout_s`` is considered dead; PING frames keep an idle link alive.

Everything on the wire runs in one asyncio event loop in a thread of its own, so TLS
reads and writes never run concurrently on one SSL object.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..log_limits import RateLimitedWarning
from .frames import (HEADER_SIZE, SEQUENCED, Frame, FrameError, FrameType, decode_json,
                     describe_payload, encode_json, parse_header)
from .tls import (describe_certificate, describe_handshake_error, load_pinned_certificate,
                  peer_rejected_ours, record_peer_certificates, start_handshake_record)

log = logging.getLogger(__name__)


class LinkState(enum.Enum):
    STOPPED = "stopped"
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"


class ChannelError(Exception):
    """A connection that must be closed: failed handshake, pinning or protocol error."""


class _TransportClosing(ConnectionError):
    """The write loop found the TLS transport closing.

    The TLS layer closes the transport when the peer's close_notify or a fatal error
    arrives, or when this node closes the connection. The reader receives the cause with
    the end of the stream, so this error is only a symptom.
    """


#: Seconds the connection waits for the reader to report why the transport closed, after
#: the writer found it closing. A peer that closed has already delivered its end of stream.
#: After a close by this node, a dead peer never sends its own close_notify.
READER_END_WAIT_S = 1.0

#: A connection that delivered a frame within this many ping intervals is alive: the peer
#: sends a PING after one interval without other frames, so a healthy connection is never
#: silent for much longer than one interval. Two leave room for a loaded machine.
ALIVE_PING_INTERVALS = 2.0

#: Largest sequence number that the 64-bit field of the frame header can carry.
MAX_SEQUENCE = 2**64 - 1

#: Largest payload length that the 32-bit field of the frame header can carry.
MAX_PAYLOAD = 2**32 - 1

#: Seconds without a channel error after which the same error is logged again in full
#: instead of being counted as a repeat.
ERROR_QUIET_S = 60.0

#: A port number after an address. The peer's port changes with every connection, so
#: repeated errors are compared without it.
_PORT = re.compile(r":\d{1,5}\b")

#: Seconds over which repeated new link sessions, or rejected second connections, are
#: counted into one warning.
REPEAT_WARNING_WINDOW_S = 60.0

Handler = Callable[[FrameType, bytes], None]


class FrameTooLargeError(ValueError):
    """A numbered frame above the receiving node's max_frame_bytes, which is not sent."""

    def __init__(self, what: str, size: int, limit: int, announced: bool, peer: str = ""):
        self.what = what
        self.size = size          # payload bytes
        self.limit = limit        # payload bytes the peer accepts
        if announced:
            on_peer = f"the peer ({peer})" if peer else "the peer"
            advice = (f"above the max_frame_bytes of {on_peer}, {limit}; set max_frame_bytes "
                      f"on {on_peer} to at least {size}")
        else:
            advice = (f"above max_frame_bytes, {limit}, which the peer did not announce and "
                      f"is assumed to share; set max_frame_bytes on both nodes to at least {size}")
        super().__init__(f"{what} not sent: its payload of {size} bytes is {advice}")


@dataclass
class Outgoing:
    type: FrameType
    payload: bytes
    on_acked: Optional[Callable[[], None]] = None
    on_discarded: Optional[Callable[[], None]] = None
    seq: int = 0


@dataclass
class LinkStats:
    frames_sent: int = 0
    writes: int = 0                 # write calls to the TLS stream, each one or more frames
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    resets: int = 0
    retransmitted: int = 0
    duplicates_dropped: int = 0
    malformed_dropped: int = 0
    last_error: str = ""
    connected_since: float = 0.0
    peer_address: str = ""
    peer_identity: str = ""


@dataclass
class LinkSettings:
    role: str                       # "high" listens, "low" connects
    host: str                       # listen address (high) or peer host (low)
    port: int
    server_context: Optional[ssl.SSLContext] = None
    client_context: Optional[ssl.SSLContext] = None
    remote_cert: str = ""
    local_cert: str = ""            # path named in messages about a rejected certificate
    identity: str = ""
    max_frame_bytes: int = 16 << 20
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 10.0
    handshake_timeout_s: float = 10.0
    ping_interval_s: float = 2.0
    ack_delay_s: float = 0.005       # maximum seconds an ACK waits for an outgoing frame to join
    idle_timeout_s: float = 15.0
    extra_hello: dict = field(default_factory=dict)


class Link:
    """The channel to the peer: start it, send frames, receive them through ``handler``."""

    def __init__(self, settings: LinkSettings, handler: Handler,
                 on_link_reset: Callable[[str], None] = lambda reason: None,
                 on_state: Callable[[LinkState], None] = lambda state: None,
                 on_oversized: Optional[Callable[[FrameTooLargeError], None]] = None):
        self.settings = settings
        self._handler = handler
        self._on_link_reset = on_link_reset
        self._on_state = on_state
        # Receives a frame that was queued before the peer announced a smaller limit.
        self._on_oversized = on_oversized
        self._pinned_der = load_pinned_certificate(settings.remote_cert)
        for context in (settings.server_context, settings.client_context):
            if context is not None:
                record_peer_certificates(context)
        self.session = secrets.token_hex(8)
        self.stats = LinkStats()
        self.state = LinkState.STOPPED

        # Shared with threads calling send(); guarded by _lock.
        self._lock = threading.Lock()
        self._pending: list[Outgoing] = []      # queued before a link session existed
        self._outbox: deque[Outgoing] = deque()  # numbered, not yet acknowledged
        self._send_next = 1
        self._peer_session: Optional[str] = None
        self._recv_next = 1
        self._peer_max_frame: Optional[int] = None   # announced in the peer's HELLO

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._wakeup: Optional[asyncio.Event] = None
        self._stopping: Optional[asyncio.Event] = None
        self._current_writer: Optional[asyncio.StreamWriter] = None
        # Why this node closed a connection that has not ended yet, by its writer.
        self._close_reasons: dict[asyncio.StreamWriter, str] = {}
        self._current_reader: Optional[asyncio.StreamReader] = None
        self._current_address = ""
        self._last_frame_at = 0.0      # time.monotonic() of the current connection's last frame
        self._listener: Optional[socket.socket] = None
        self._ack_due = False        # an ACK of _recv_next - 1 is owed to the peer
        self._resend_from = 1        # first frame to transmit on the current connection
        self._listen_error = ""      # why the high-count side could not listen, if it could not
        self._last_logged_error = ""     # the last logged error, without port numbers
        self._last_error_at = 0.0        # time.monotonic() of the last recorded error
        self._error_repeats = 0
        self._session_warnings = RateLimitedWarning(log, REPEAT_WARNING_WINDOW_S)
        self._session_switches: deque[float] = deque()   # time.monotonic() of each
        self._rejection_warnings = RateLimitedWarning(log, REPEAT_WARNING_WINDOW_S)

    # ---- public API, callable from any thread -------------------------------------------

    def start(self) -> None:
        """Start the channel thread; raise ChannelError if the high-count side cannot listen."""
        self._thread = threading.Thread(target=self._thread_main, name=f"link-{self.settings.role}",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._listen_error:
            self._thread.join()
            self._set_state(LinkState.STOPPED)
            raise ChannelError(self._listen_error)

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._request_stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._set_state(LinkState.STOPPED)

    def send(self, frame_type: FrameType, payload: bytes, *,
             on_acked: Optional[Callable[[], None]] = None,
             on_discarded: Optional[Callable[[], None]] = None) -> None:
        """Queue a CONTROL, FILE or RECONCILE frame for acknowledged delivery.

        Raises FrameTooLargeError for a payload above the peer's max_frame_bytes, which
        the peer would reject by closing the connection each time the frame arrives.
        """
        if frame_type not in SEQUENCED:
            raise ValueError(f"frame type {frame_type.name} is not sent through send()")
        item = Outgoing(frame_type, payload, on_acked, on_discarded)
        with self._lock:
            error = self._check_size(item)
            if error is not None:
                raise error
            if self._peer_session is None:
                self._pending.append(item)
            else:
                item.seq = self._send_next
                self._send_next += 1
                self._outbox.append(item)
        self._wake_writer()

    def _check_size(self, item: Outgoing) -> Optional[FrameTooLargeError]:
        """Return the error for a payload above the peer's limit, else None; needs _lock."""
        announced = self._peer_max_frame is not None
        limit = self._peer_max_frame if announced else self.settings.max_frame_bytes
        if len(item.payload) <= limit:
            return None
        return FrameTooLargeError(describe_payload(item.type, item.payload), len(item.payload),
                                  limit, announced, self.stats.peer_identity)

    def drop_connection(self, reason: str) -> None:
        """Close the current connection; it is re-established and resumes where it was."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._close_current, reason)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state is LinkState.CONNECTED:
                return True
            time.sleep(0.02)
        return self.state is LinkState.CONNECTED

    @property
    def queued_frames(self) -> int:
        with self._lock:
            return len(self._outbox) + len(self._pending)

    # ---- event loop side ----------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            remaining = asyncio.all_tasks(loop)
            for task in remaining:
                task.cancel()
            if remaining:
                loop.run_until_complete(asyncio.gather(*remaining, return_exceptions=True))
            # A task that ended in the loop's last iteration, such as a reader whose
            # connection closed as it was cancelled, still has its done callback queued.
            # That callback retrieves the task's error, which asyncio would otherwise log
            # with a traceback, so one more pass runs it.
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _main(self) -> None:
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._set_state(LinkState.DISCONNECTED)
        try:
            if self.settings.role == "high":
                await self._serve()
            else:
                self._started.set()
                await self._dial()
        except Exception as error:  # a bug here would otherwise end the thread silently
            log.exception("classical channel stopped by an unexpected error: %s", error)
            self.stats.last_error = f"internal error: {error}"
        finally:
            self._started.set()

    def _request_stop(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        self._close_current("link stopped")

    def _close_current(self, reason: str) -> None:
        writer = self._current_writer
        if writer is not None:
            log.info("closing channel connection: %s", reason)
            self._close_reasons[writer] = reason
            writer.close()

    def _wake_writer(self) -> None:
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def _set_state(self, state: LinkState) -> None:
        if state is not self.state:
            self.state = state
            try:
                self._on_state(state)
            except Exception:
                log.exception("link state callback failed for state %s", state.value)

    async def _serve(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        try:
            listener = socket.create_server((settings.host, settings.port), reuse_port=False)
        except OSError as error:
            self._listen_error = _describe_listen_error(error, settings.host, settings.port)
            self.stats.last_error = self._listen_error
            self._started.set()
            return
        listener.setblocking(False)
        self._listener = listener
        log.info("classical channel listening on %s:%d", settings.host, settings.port)
        self._started.set()
        tasks: set[asyncio.Task] = set()
        assert self._stopping is not None
        stop_task = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                accept_task = asyncio.ensure_future(loop.sock_accept(listener))
                await asyncio.wait({accept_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                if stop_task.done():
                    accept_task.cancel()
                    break
                connection, peer = accept_task.result()
                task = asyncio.ensure_future(self._accept(connection, f"{peer[0]}:{peer[1]}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            listener.close()
            stop_task.cancel()
            for task in tasks:
                task.cancel()

    async def _accept(self, connection: socket.socket, address: str) -> None:
        # The TLS handshake runs on the accepted socket before any stream reads from it,
        # and its errors (such as a wrong client certificate) reach this code for logging.
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        handshake = start_handshake_record()
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, connection, ssl=self.settings.server_context,
                ssl_handshake_timeout=self.settings.handshake_timeout_s)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as error:
            # The peer's port number changes with every attempt; the host alone lets
            # repeated failures be counted as one message.
            host = address.rsplit(":", 1)[0]
            self._record_error(f"TLS handshake with {host} failed: "
                               f"{self._describe_tls(error, handshake.peer_der)}")
            connection.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        # A current connection stays until this one has sent a valid HELLO: see _admit.
        await self._run_connection(reader, writer, address)

    async def _dial(self) -> None:
        settings = self.settings
        assert self._stopping is not None
        delay = settings.reconnect_min_s
        address = f"{settings.host}:{settings.port}"
        log.info("classical channel connecting to %s", address)
        while not self._stopping.is_set():
            connected = False
            established = self.stats.connections
            handshake = start_handshake_record()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(settings.host, settings.port,
                                            ssl=settings.client_context, server_hostname=None),
                    settings.handshake_timeout_s)
                connected = True
                await self._run_connection(reader, writer, address)
            except (ssl.SSLError, OSError, asyncio.TimeoutError) as error:
                if not connected:
                    self._record_error(f"cannot connect to {address}: "
                                       f"{self._describe_tls(error, handshake.peer_der)}")
            # Only a connection that got past the HELLO exchange resets the backoff. A
            # peer that rejects this node's certificate completes the TLS handshake and
            # closes the connection afterwards, so it must not be retried at full rate.
            if self.stats.connections > established:
                delay = settings.reconnect_min_s
            if self._stopping.is_set():
                break
            # At the longest delay a peer that stays away would add a line every few
            # seconds for hours; its errors are still logged by _record_error.
            level = logging.INFO if delay < settings.reconnect_max_s else logging.DEBUG
            log.log(level, "reconnecting to %s in %.2f s", address, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(delay * 2, settings.reconnect_max_s)

    def _record_error(self, message: str) -> None:
        """Store and log a channel error; repeats of the same message are logged as a count.

        Messages that differ only in port numbers are the same error. An error that
        follows ERROR_QUIET_S without any is logged in full again.
        """
        self.stats.last_error = message
        key = _PORT.sub(":*", message)
        now = time.monotonic()
        quiet = now - self._last_error_at > ERROR_QUIET_S
        self._last_error_at = now
        if key != self._last_logged_error or quiet:
            self._last_logged_error = key
            self._error_repeats = 0
            log.error("classical channel: %s", message)
            return
        self._error_repeats += 1
        # Powers of two keep a peer that fails every attempt to a few lines per hour.
        if self._error_repeats & (self._error_repeats - 1) == 0:
            log.error("classical channel: %s (%d times so far)", message, self._error_repeats + 1)

    def _describe_tls(self, error: BaseException, peer_der: Optional[bytes] = None) -> str:
        if isinstance(error, asyncio.TimeoutError):
            return "timed out"
        return describe_handshake_error(error, self.settings.local_cert, self.settings.remote_cert,
                                        peer_der)

    async def _run_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              address: str) -> None:
        writer_task = read_task = None
        hello_done = False
        try:
            _disable_nagle(writer)
            self._check_pinned(writer, address)
            if not await self._exchange_hello(reader, writer, address):
                return
            hello_done = True
            self._current_writer = writer
            self._current_reader = reader
            self._current_address = address
            self._last_frame_at = time.monotonic()
            self.stats.connections += 1
            self.stats.connected_since = time.time()
            self.stats.peer_address = address
            self._set_state(LinkState.CONNECTED)
            log.info("classical channel connected to %s (%s)", address,
                     self.stats.peer_identity or "peer")
            writer_task = asyncio.ensure_future(self._write_loop(writer))
            read_task = asyncio.ensure_future(self._read_loop(reader))
            await self._wait_connection_end(writer_task, read_task)
        except (FrameError, ChannelError) as error:
            self._record_error(f"connection to {address} closed: {error}")
        except (asyncio.IncompleteReadError, ssl.SSLError, OSError, asyncio.TimeoutError) as error:
            if self._stopping is not None and self._stopping.is_set():
                log.debug("classical channel to %s closed while stopping: %s", address, error)
            elif not hello_done:
                # In TLS 1.3 the server checks the client's certificate after the client
                # has finished its handshake, so a rejected client sees the connection
                # close before the peer's HELLO arrives.
                self._record_error(f"connection to {address} closed before the peer's HELLO: "
                                   f"{self._describe_closed_before_hello(error)}")
            elif writer in self._close_reasons:
                # This node closed the connection, so the end of stream is no news of the peer.
                reason = self._close_reasons[writer]
                log.info("classical channel: connection to %s closed by this node: %s",
                         address, reason)
                self.stats.last_error = f"connection closed by this node: {reason}"
            elif isinstance(error, asyncio.IncompleteReadError):
                log.warning("classical channel: peer %s closed the connection", address)
                self.stats.last_error = f"peer {address} closed the connection"
            else:
                self._record_error(f"connection to {address} lost: {_describe(error)}")
        finally:
            self._close_reasons.pop(writer, None)
            for task in (writer_task, read_task):
                if task is None:
                    continue
                # The error that ended the connection is logged above; retrieving it
                # stops asyncio from logging it again as never retrieved.
                task.add_done_callback(_retrieve_exception)
                if not task.done():
                    task.cancel()
            if self._current_writer is writer:
                self._current_writer = None
                self._set_state(LinkState.DISCONNECTED)
            writer.close()

    @staticmethod
    async def _wait_connection_end(writer_task: asyncio.Task, read_task: asyncio.Task) -> None:
        """Wait until the connection ends and raise the error that explains why.

        The reader's error comes first: when the transport closes, the writer may end in
        the same event loop iteration with only the symptom (_TransportClosing).
        """
        done, _ = await asyncio.wait({writer_task, read_task},
                                     return_when=asyncio.FIRST_COMPLETED)
        if read_task not in done and isinstance(writer_task.exception(), _TransportClosing):
            await asyncio.wait({read_task}, timeout=READER_END_WAIT_S)
        if read_task.done():
            read_task.result()
        writer_task.result()

    def _describe_closed_before_hello(self, error: BaseException) -> str:
        if isinstance(error, asyncio.TimeoutError):
            return "timed out"
        if isinstance(error, (asyncio.IncompleteReadError, ConnectionResetError)):
            if self.settings.role == "low":
                return peer_rejected_ours(self.settings.local_cert, certain=False)
            return "the peer closed the connection"
        return self._describe_tls(error)

    def _check_pinned(self, writer: asyncio.StreamWriter, address: str) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if peer_der != self._pinned_der:
            presented = f" ({describe_certificate(peer_der)})" if peer_der else ""
            raise ChannelError(f"peer {address} presented a certificate{presented} other than "
                               f"remote_cert ({self.settings.remote_cert}); check that "
                               "remote_cert is a copy of the peer's local_cert")

    async def _exchange_hello(self, reader, writer, address: str) -> bool:
        """Exchange HELLO frames and resume or reset the link session.

        Returns False when this node rejected the connection, after logging the
        rejection and sending its reason to the peer. The low-count side speaks first, so the high-count side can decide on a
        second connection before it sends anything about its session.
        """
        if self.settings.role == "high":
            hello = await self._read_hello(reader, address)
            rejection = self._admit(address, hello)
            if rejection is not None:
                writer.write(Frame(FrameType.HELLO, 0, encode_json({"rejected": rejection})).encode())
                await writer.drain()
                return False
            await self._send_hello(writer)
        else:
            await self._send_hello(writer)
            hello = await self._read_hello(reader, address)
        self.stats.peer_identity = hello.identity
        with self._lock:
            self._peer_max_frame = hello.max_frame_bytes
        self._resume_or_reset(hello.session, hello.peer_session, hello.recv_next)
        return True

    async def _send_hello(self, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            mine = {"session": self.session, "peer_session": self._peer_session or "",
                    "recv_next": self._recv_next, "role": self.settings.role,
                    "identity": self.settings.identity,
                    "max_frame_bytes": self.settings.max_frame_bytes,
                    **self.settings.extra_hello}
        writer.write(Frame(FrameType.HELLO, 0, encode_json(mine)).encode())
        await writer.drain()

    async def _read_hello(self, reader: asyncio.StreamReader, address: str) -> "_Hello":
        frame_type, _, payload = await asyncio.wait_for(
            self._read_frame(reader), self.settings.handshake_timeout_s)
        if frame_type is not FrameType.HELLO:
            raise ChannelError(f"expected HELLO from {address}, got {frame_type.name}")
        return self._parse_hello(decode_json(payload, "HELLO"), address)

    def _parse_hello(self, hello: dict, address: str) -> "_Hello":
        """Check the peer's HELLO; raise ChannelError naming the first invalid field."""
        if "rejected" in hello:
            raise ChannelError(f"the peer rejected this connection: "
                               f"{_shorten(str(hello['rejected']), 400)}")

        def invalid(name: str, expected: str) -> ChannelError:
            shown = _shorten(repr(hello.get(name)))
            return ChannelError(f"invalid HELLO from {address}: {name} {shown}, expected "
                                f"{expected}; the peer runs an incompatible or faulty "
                                "channel, or is not a QKDServer node")

        session = hello.get("session")
        if not isinstance(session, str) or not session:
            raise invalid("session", "a non-empty string")
        peer_session = hello.get("peer_session", "")
        if not isinstance(peer_session, str):
            raise invalid("peer_session", "a string")
        recv_next = hello.get("recv_next")
        if not _is_int(recv_next) or not 1 <= recv_next <= MAX_SEQUENCE:
            raise invalid("recv_next", f"an integer from 1 to {MAX_SEQUENCE} (the 64-bit "
                                       "sequence number field)")
        role = hello.get("role")
        if role not in ("high", "low"):
            raise invalid("role", "'high' or 'low'")
        if role == self.settings.role:
            raise ChannelError(f"both nodes are configured as the {self.settings.role}-count "
                               "side; set role to 'high' on one node and 'low' on the other")
        identity = hello.get("identity", "")
        if not isinstance(identity, str):
            raise invalid("identity", "a string")
        # Absent from the HELLO of a node that predates the announcement.
        max_frame = hello.get("max_frame_bytes")
        if max_frame is not None and (not _is_int(max_frame) or not 1 <= max_frame <= MAX_PAYLOAD):
            raise invalid("max_frame_bytes", f"an integer from 1 to {MAX_PAYLOAD} (the 32-bit "
                                             "payload length field)")
        return _Hello(session, peer_session, recv_next, identity, max_frame)

    def _admit(self, address: str, hello: "_Hello") -> Optional[str]:
        """Decide whether a new connection replaces the current one.

        Returns None when it may proceed (after closing the current connection if there
        is one), or the reason for rejecting it. A connection that resumes the current
        session comes from the same peer process, which gave up its old connection. Any
        other newcomer is rejected while the current connection is alive, because a node
        that restarted closed its old connection or has been silent for a while.
        """
        if self._current_writer is None:
            return None
        current = self._current_address
        silent_s = time.monotonic() - self._last_frame_at
        alive_s = ALIVE_PING_INTERVALS * self.settings.ping_interval_s
        if hello.session != self._peer_session and silent_s <= alive_s:
            reason = (f"another connection with this node's certificate, from {current}, is "
                      "alive; two nodes appear to use the same certificate: stop one of "
                      "them or give each node its own certificate (qkdserver certs)")
            self._rejection_warnings(
                "classical channel: rejected a second connection from %s while the "
                "connection from %s is alive (last frame %.1f s ago); two nodes appear to "
                "use the same certificate: stop one of them or give each node its own "
                "certificate (qkdserver certs)", address, current, silent_s)
            self.stats.last_error = f"rejected a second connection from {address}: {reason}"
            return reason
        if hello.session == self._peer_session:
            cause = "the peer resumed its session on it"
        else:
            cause = f"the connection from {current} was silent for {silent_s:.1f} s"
        self._close_current(f"peer {address} opened a new connection and {cause}")
        # The old connection's reader delivers nothing more (see _read_loop), so its
        # frames cannot mix with the numbering of the session that follows.
        self._current_writer = None
        self._current_reader = None
        self._set_state(LinkState.DISCONNECTED)
        return None

    def _resume_or_reset(self, peer_session: str, peer_knows: str, peer_recv_next: int) -> None:
        discarded: list[Outgoing] = []
        acked: list[Outgoing] = []
        oversized: list[tuple[Outgoing, FrameTooLargeError]] = []
        first_session = False
        with self._lock:
            resumable = peer_session == self._peer_session and peer_knows == self.session
            if resumable:
                while self._outbox and self._outbox[0].seq < peer_recv_next:
                    acked.append(self._outbox.popleft())
                self.stats.retransmitted += len(self._outbox)
                reason = ""
            else:
                first_session = self._peer_session is None
                if first_session:
                    reason = "first connection to the peer"
                elif peer_session != self._peer_session:
                    reason = "the peer restarted"
                else:
                    reason = "the peer lost this node's session"
                discarded = list(self._outbox)
                self._outbox.clear()
                self._peer_session = peer_session
                self._recv_next = 1
                self._send_next = 1
                for item in self._pending:
                    # Queued before the peer announced its limit.
                    error = self._check_size(item)
                    if error is not None:
                        oversized.append((item, error))
                        continue
                    item.seq = self._send_next
                    self._send_next += 1
                    self._outbox.append(item)
                self._pending.clear()
            self._resend_from = self._outbox[0].seq if self._outbox else self._send_next
        for item in acked:
            _run_callback(item.on_acked, "acknowledgement")
        for item in discarded:
            _run_callback(item.on_discarded, "discard")
        for item, error in oversized:
            _run_callback(item.on_discarded, "discard")
            self._report_oversized(error)
        if not resumable:
            self.stats.resets += 1
            log.info("classical channel: new link session (%s), %d queued frames discarded",
                     reason, len(discarded))
            if not first_session:
                self._count_session_switch(reason)
            try:
                self._on_link_reset(reason)
            except Exception:
                log.exception("link reset callback failed")
        else:
            log.info("classical channel resumed; retransmitting from frame %d", self._resend_from)

    def _report_oversized(self, error: FrameTooLargeError) -> None:
        if self._on_oversized is None:
            log.error("classical channel: %s", error)
            return
        try:
            self._on_oversized(error)
        except Exception:
            log.exception("oversized frame callback failed")

    def _count_session_switch(self, reason: str) -> None:
        """Warn when the link switches sessions repeatedly.

        Every new session discards the queued frames and restarts key generation, so a
        link that keeps switching produces no key. One switch is a peer restart.
        """
        now = time.monotonic()
        switches = self._session_switches
        switches.append(now)
        while now - switches[0] > REPEAT_WARNING_WINDOW_S:
            switches.popleft()
        if len(switches) >= 2:
            self._session_warnings(
                "classical channel: %d new link sessions in the last %.0f s (latest: %s); "
                "each discards the queued frames and restarts key generation, so no key is "
                "made. Check whether the peer keeps restarting, or whether two nodes use "
                "its certificate", len(switches), REPEAT_WARNING_WINDOW_S, reason)

    async def _read_frame(self, reader: asyncio.StreamReader) -> tuple[FrameType, int, bytes]:
        header = await reader.readexactly(HEADER_SIZE)
        frame_type, seq, length = parse_header(header, self.settings.max_frame_bytes)
        payload = await reader.readexactly(length) if length else b""
        self.stats.frames_received += 1
        self.stats.bytes_received += HEADER_SIZE + length
        return frame_type, seq, payload

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            frame_type, seq, payload = await asyncio.wait_for(
                self._read_frame(reader), self.settings.idle_timeout_s)
            if reader is not self._current_reader:
                # A newer connection replaced this one (see _admit) and may have started
                # a new session: a frame of the old one must not be delivered into it.
                raise ConnectionResetError("connection replaced by a newer one")
            self._last_frame_at = time.monotonic()
            if frame_type is FrameType.ACK:
                self._acknowledge(seq)
            elif frame_type is FrameType.PING:
                continue
            elif frame_type is FrameType.HELLO:
                raise FrameError("unexpected HELLO frame on an established connection")
            else:
                self._deliver(frame_type, seq, payload)

    def _deliver(self, frame_type: FrameType, seq: int, payload: bytes) -> None:
        if seq < self._recv_next:
            self.stats.duplicates_dropped += 1
            self._ack_due = True
            self._wake_writer()
            return
        if seq > self._recv_next:
            raise FrameError(f"frame {seq} arrived while {self._recv_next} was expected")
        # A handler error leaves the frame unacknowledged: the connection closes and the
        # peer sends the frame again after reconnecting. A malformed payload (FrameError)
        # is dropped and acknowledged instead, because sending it again cannot repair it
        # and would close every new connection before the frames queued behind it.
        try:
            self._handler(frame_type, payload)
        except FrameError as error:
            self.stats.malformed_dropped += 1
            self._record_error(f"{frame_type.name} frame {seq} dropped: {error}")
        except Exception as error:
            log.exception("handling %s frame %d failed", frame_type.name, seq)
            raise ChannelError(f"handling {frame_type.name} frame {seq} failed: {error}") from error
        with self._lock:
            self._recv_next = seq + 1
        self._ack_due = True
        self._wake_writer()

    def _acknowledge(self, seq: int) -> None:
        acked: list[Outgoing] = []
        with self._lock:
            if seq >= self._send_next:
                raise FrameError(f"acknowledgement of frame {seq}, which was never sent")
            while self._outbox and self._outbox[0].seq <= seq:
                acked.append(self._outbox.popleft())
        for item in acked:
            _run_callback(item.on_acked, "acknowledgement")

    async def _write_loop(self, writer: asyncio.StreamWriter) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        cursor = self._resend_from
        self._ack_due = True
        ack_deadline: Optional[float] = None   # loop time when an owed ACK goes out alone
        while True:
            chunks: list[bytes] = []
            with self._lock:
                for item in self._outbox:
                    if item.seq >= cursor:
                        chunks.append(Frame(item.type, item.seq, item.payload).encode())
                        cursor = item.seq + 1
                        if len(chunks) >= 64:
                            break
            if self._ack_due:
                # An ACK waits up to ack_delay_s for a frame to travel with. A request
                # and its reply then cost one TLS write and one read on each side,
                # instead of two.
                now = loop.time()
                if ack_deadline is None:
                    ack_deadline = now + self.settings.ack_delay_s
                if chunks or now >= ack_deadline:
                    self._ack_due = False
                    ack_deadline = None
                    chunks.insert(0, Frame(FrameType.ACK, self._recv_next - 1, b"").encode())
            if not chunks:
                self._wakeup.clear()
                timeout = (self.settings.ping_interval_s if ack_deadline is None
                           else max(ack_deadline - loop.time(), 0.0))
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                    continue
                except asyncio.TimeoutError:
                    if ack_deadline is not None:
                        continue
                    chunks.append(Frame(FrameType.PING, 0, b"").encode())
            if writer.is_closing():
                raise _TransportClosing("TLS transport closing")
            # One call, so that the TLS records of all chunks leave in one send.
            writer.writelines(chunks)
            self.stats.writes += 1
            self.stats.frames_sent += len(chunks)
            self.stats.bytes_sent += sum(len(chunk) for chunk in chunks)
            await writer.drain()


@dataclass(frozen=True)
class _Hello:
    """The checked fields of the peer's HELLO frame."""

    session: str
    peer_session: str
    recv_next: int
    identity: str
    max_frame_bytes: Optional[int]     # None from a node that does not announce it


def _is_int(value: object) -> bool:
    # JSON true and false decode to bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _disable_nagle(writer: asyncio.StreamWriter) -> None:
    """Send small frames at once instead of delaying them until the peer's TCP ACK.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP (CPython
    3.11 ``base_events._set_nodelay``). A socket accepted from ``socket.create_server``
    has ``proto`` 0, so the listening side kept Nagle's algorithm on. Each
    reconciliation message of the high-count side then waited for the peer's delayed
    ACK (up to 40 ms on Linux), which made a block of 1e6 bits take about 20 s
    instead of about 3 s.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _retrieve_exception(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _run_callback(callback: Optional[Callable[[], None]], what: str) -> None:
    if callback is None:
        return
    try:
        callback()
    except Exception:
        log.exception("channel %s callback failed", what)


def _describe_listen_error(error: OSError, host: str, port: int) -> str:
    """Return why the channel cannot listen on host:port and which setting to change."""
    where = f"cannot listen on {host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return (f"{where}: another process uses the port; stop it, or set port_authd "
                "on both nodes to a free port")
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return (f"{where}: {error.strerror}; set listen_address to an address of this "
                "machine, or 0.0.0.0 for all of them")
    if error.errno == errno.EACCES:
        return f"{where}: {error.strerror}; ports below 1024 need root, so set port_authd above 1023"
    return f"{where}: {error.strerror or error}"


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "timed out"
    text = str(error) or type(error).__name__
    return text
