"""TLS 1.3 contexts with the peer pinned to one certificate, and node certificates.

Each node has a private key and a self-signed certificate (``qkdserver certs`` makes a
pair) and holds a copy of the peer's certificate. The peer certificate is the only
trust anchor of both contexts, so the handshake fails for anyone else; host names are
not checked because the pinned certificate already identifies the peer.
"""

from __future__ import annotations

import contextvars
import datetime
import hashlib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError

# Maximum certificate validity that `qkdserver certs` accepts: 100 years.
MAX_CERTIFICATE_DAYS = 36500

# OpenSSL reasons of a TLS alert by which the peer rejects the certificate this node sent.
PEER_REJECTED_REASONS = frozenset({
    "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_DECRYPT_ERROR",
})


# TLS record content type of handshake messages, and the handshake message type of a
# Certificate message (RFC 8446, sections 5.1 and 4).
_HANDSHAKE = 22
_CERTIFICATE = 11


@dataclass
class HandshakeRecord:
    """The peer's certificate in DER as one TLS handshake received it, if the peer sent one."""

    peer_der: Optional[bytes] = None


# The record of the handshake that the current asyncio task runs. asyncio runs the
# socket callbacks of a connection in a copy of the context of the task that opened it,
# so the message callback below finds the record of its own connection.
_handshake_record: contextvars.ContextVar[Optional[HandshakeRecord]] = contextvars.ContextVar(
    "handshake_record", default=None)


def start_handshake_record() -> HandshakeRecord:
    """Create the record for the next handshake of the current task."""
    record = HandshakeRecord()
    _handshake_record.set(record)
    return record


def record_peer_certificates(context: ssl.SSLContext) -> None:
    """Make the context store the peer's certificate in the current handshake record.

    The ssl module shows no certificate of a failed handshake, so the certificate that a
    node rejected is taken from the TLS message callback. That hook is private
    (``SSLContext._msg_callback``, checked on CPython 3.11), so it may change. Without
    it, messages only lack the subject and fingerprint.
    """
    if hasattr(context, "_msg_callback"):
        context._msg_callback = _on_tls_message


def _on_tls_message(connection, direction, version, content_type, message_type, data) -> None:
    if direction != "read" or content_type != _HANDSHAKE or message_type != _CERTIFICATE:
        return
    record = _handshake_record.get()
    if record is not None:
        record.peer_der = _first_certificate(bytes(data))


def _first_certificate(message: bytes) -> Optional[bytes]:
    """Return the DER of the first certificate in a TLS 1.3 Certificate message, or None.

    Layout (RFC 8446, section 4.4.2): u8 message type, u24 length, u8 length of the
    request context and the context, u24 length of the list, then per certificate a u24
    length, the DER bytes and its extensions.
    """
    if len(message) < 5:
        return None
    start = 5 + message[4] + 3
    length = int.from_bytes(message[start:start + 3], "big")
    der = message[start + 3:start + 3 + length]
    return der if length and len(der) == length else None


def describe_certificate(der: bytes) -> str:
    """Return the subject and SHA-256 fingerprint of a certificate, for log lines.

    The fingerprint has the form of ``openssl x509 -noout -fingerprint -sha256``, so the
    operator can compare it with the certificate files.
    """
    from cryptography import x509

    digest = hashlib.sha256(der).hexdigest().upper()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    try:
        subject = repr(x509.load_der_x509_certificate(der).subject.rfc4514_string())
    except ValueError:
        subject = "unreadable"
    return f"subject {subject}, SHA-256 fingerprint {fingerprint}"


def peer_rejected_ours(local_cert: str, certain: bool = True) -> str:
    """Return the advice for a peer that rejected (or may have rejected) this node's certificate."""
    verb = "rejected" if certain else "may have rejected"
    return (f"the peer {verb} this node's certificate (local_cert {local_cert}); check that "
            "remote_cert on the peer is a copy of that file")


def we_rejected_peer(remote_cert: str, peer_der: Optional[bytes] = None) -> str:
    """Return the advice for a peer certificate that this node rejected."""
    advice = (f"this node rejected the peer's certificate because it is not remote_cert "
              f"({remote_cert}); check that remote_cert is a copy of the peer's local_cert")
    if peer_der:
        advice += f". The peer presented a certificate with {describe_certificate(peer_der)}"
    return advice


def describe_handshake_error(error: BaseException, local_cert: str, remote_cert: str,
                             peer_der: Optional[bytes] = None) -> str:
    """Return why a TLS handshake failed, naming the side that rejected which certificate.

    asyncio closes a failed connection without sending the TLS alert, so a peer running
    this software shows up as a closed connection. Only other TLS stacks send the alert
    that makes the cause certain.
    """
    reason = getattr(error, "reason", None) or ""
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return we_rejected_peer(remote_cert, peer_der)
    if reason in PEER_REJECTED_REASONS:
        return peer_rejected_ours(local_cert)
    closed = isinstance(error, (ConnectionResetError, ssl.SSLEOFError, EOFError))
    if closed or reason == "UNEXPECTED_EOF_WHILE_READING":
        return ("the peer closed the connection during the TLS handshake, so "
                + peer_rejected_ours(local_cert, certain=False))
    return str(error) or type(error).__name__


def load_pinned_certificate(path: str) -> bytes:
    """Return the DER bytes of the PEM certificate at ``path``."""
    try:
        pem = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read remote_cert {path!r}: {error}") from None
    try:
        return ssl.PEM_cert_to_DER_cert(pem.strip() + "\n")
    except ValueError:
        raise ConfigError(f"invalid remote_cert {path!r}: expected one PEM certificate") from None


def make_context(server_side: bool, local_cert: str, local_key: str, remote_cert: str) -> ssl.SSLContext:
    """Build a mutual-TLS 1.3 context presenting local_cert and trusting only remote_cert."""
    purpose = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    _require_pem("local_cert", local_cert, "CERTIFICATE")
    _require_pem("local_key", local_key, "PRIVATE KEY")
    _require_pem("remote_cert", remote_cert, "CERTIFICATE")
    try:
        context.load_cert_chain(local_cert, local_key)
    except (OSError, ssl.SSLError) as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"invalid value for 'local_key': {local_key!r} is not the private "
                              f"key of local_cert {local_cert!r}; give the .key file that "
                              "`qkdserver certs` wrote with that certificate") from None
        raise ConfigError(f"cannot load local_cert {local_cert!r} with local_key {local_key!r}: "
                          f"{error}") from None
    try:
        context.load_verify_locations(cafile=remote_cert)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load remote_cert {remote_cert!r}: {error}") from None
    return context


def _require_pem(key: str, path: str, label: str) -> None:
    """Raise ConfigError unless the file at path contains a PEM block whose label ends in label.

    OpenSSL reports an empty or foreign file only as "PEM lib", which names neither.
    """
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {key} {path!r}: {error.strerror}") from None
    fix = ("create a pair with `qkdserver certs`, and copy the peer's .crt as remote_cert"
           if label == "CERTIFICATE" else "give the .key file that `qkdserver certs` wrote")
    if not text.strip():
        raise ConfigError(f"invalid value for {key!r}: {path!r} is empty; {fix}")
    if re.search(rb"-----BEGIN [A-Z0-9 ]*" + label.encode() + rb"-----", text) is None:
        kind = "certificate" if label == "CERTIFICATE" else "private key"
        raise ConfigError(f"invalid value for {key!r}: {path!r} is not a PEM {kind} (no "
                          f"'-----BEGIN ...{label}-----' line); {fix}")


#: Host names and addresses a certificate names when the caller gives none, so that
#: `curl --cacert NAME.crt https://127.0.0.1:8000` passes the host name check.
DEFAULT_CERTIFICATE_HOSTS = ("localhost", "127.0.0.1")

# A DNS name of letters, digits, hyphens and dots (RFC 1123), as the subjectAltName needs.
_DNS_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")


def subject_alt_names(name: str, hosts: Sequence[str]) -> list:
    """Return the subjectAltName entries: the node name if it is a DNS name, then hosts.

    Each host is an IP address or a DNS name; anything else raises ValueError.
    """
    from cryptography import x509

    entries: list = []
    if _DNS_NAME.fullmatch(name):
        entries.append(x509.DNSName(name))
    for host in hosts:
        try:
            entry = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ValueError(f"invalid --host {host!r}: expected a host name such as "
                                 "qkd-a.example.org or an IP address such as 192.0.2.7") from None
            entry = x509.DNSName(host)
        if entry not in entries:
            entries.append(entry)
    return entries


def create_node_certificate(folder: str | Path, name: str, days: int = 3650,
                            hosts: Sequence[str] = DEFAULT_CERTIFICATE_HOSTS) -> tuple[Path, Path]:
    """Write ``<name>.key`` (EC P-256, mode 0600) and a self-signed ``<name>.crt`` into folder.

    The certificate's subjectAltName lists the name (when it is a valid DNS name) and
    ``hosts``, so HTTPS clients that check the host name accept it for those. The
    classical channel pins the whole certificate and ignores these names. Returns
    (certificate path, key path). Existing files are not overwritten.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    # The name becomes a file name: a separator or ".." would write outside folder.
    if not name or name in (".", "..") or "/" in name or "\0" in name or (
            os.altsep and os.altsep in name):
        raise ValueError(f"invalid node name {name!r}: use a plain file name such as "
                         "'high' or 'low', without path separators")
    # Validity beyond 100 years overflows the date arithmetic; below 1 day is expired.
    if not 1 <= days <= MAX_CERTIFICATE_DAYS:
        raise ValueError(f"invalid validity of {days} days: expected 1 to "
                         f"{MAX_CERTIFICATE_DAYS}")
    alt_names = subject_alt_names(name, hosts)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; give a folder for the key and "
                                 "certificate (qkdserver certs --folder)")
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; remove it or choose another name")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "QKDServer node")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        # A self-signed certificate that is also its own trust anchor must be marked as
        # a CA, otherwise OpenSSL rejects it as issuer of itself.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    # Both files or neither: a full disk must not leave a key without its certificate.
    written: list[Path] = []
    try:
        for path, content, mode in ((key_path, key_bytes, 0o600),
                                    (cert_path, certificate.public_bytes(serialization.Encoding.PEM),
                                     0o644)):
            _write_new_file(path, content, mode)
            written.append(path)
    except OSError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return cert_path, key_path


def _write_new_file(path: Path, content: bytes, mode: int) -> None:
    """Write content to a file that must not exist yet, removing it again on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        path.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}; free space in "
                                   "the folder or choose another --folder") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
