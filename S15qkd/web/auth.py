"""Web token of a node: loading it from the node's secrets and checking requests.

Requests that change the node's state carry the token in an ``Authorization: Bearer``
header (scripts) or in the session cookie that ``/login`` sets (browsers). The cookie
contains an HMAC of the token, never the token itself. It is ``HttpOnly`` and
``SameSite=Strict``, so other sites cannot make a browser use it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

SESSION_COOKIE = "qkd_session"

# Shorter tokens are rejected so a guessable value cannot protect the control routes.
MIN_TOKEN_LENGTH = 16


def load_token(path: str | os.PathLike[str], create: bool = True) -> str:
    """Read the web token from ``path``; create a random one there if it is missing.

    A created file has mode 0600 and is written through a temporary file and a rename,
    so a crash never leaves a partial token. Raises ``ValueError`` for a token shorter
    than ``MIN_TOKEN_LENGTH`` characters.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"web token file {path} not found; create it or let the node create one")
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        log.info("created a new web token in %s", path)
        return token
    token = path.read_text().strip()
    check_token(token, source=str(path))
    return token


def check_token(token: str, source: str = "token") -> None:
    """Raise ``ValueError`` unless ``token`` is long enough to protect the control routes."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"web token from {source} is {len(token)} characters long, expected at least "
            f"{MIN_TOKEN_LENGTH}; write a longer random token there"
        )


def session_value(token: str) -> str:
    """Derive the session cookie value from the token (an HMAC, so the cookie never reveals it)."""
    return hmac.new(token.encode(), b"qkdserver web session", hashlib.sha256).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """Extract the token of an ``Authorization: Bearer <token>`` header value, if any."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class TokenChecker:
    """Checks the credentials of a request against the node's web token."""

    def __init__(self, token: str):
        check_token(token)
        self._token = token
        self._session = session_value(token)

    @property
    def session(self) -> str:
        return self._session

    def matches_token(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._token.encode())

    def credentials(self, authorization: str | None, cookie: str | None) -> str:
        """Classify a request's credentials as ``"valid"``, ``"invalid"`` or ``"missing"``."""
        offered = bearer_token(authorization)
        if offered is not None:
            return "valid" if self.matches_token(offered) else "invalid"
        if cookie:
            return "valid" if hmac.compare_digest(cookie.encode(), self._session.encode()) else "invalid"
        return "missing"
