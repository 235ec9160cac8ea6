"""Users, sessions (JSESSIONID) and alias tokens of the embedded server. Thread-safe."""

from __future__ import annotations

import base64
import hmac
import secrets
import threading
import time
import uuid

TOKEN_LIFETIME_SECONDS = 2 * 24 * 3600


class Auth:
    """One user with a password, the sessions they opened and the alias tokens issued to them."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self._password = password
        self._lock = threading.Lock()
        self._sessions: dict[str, str] = {}  # session id -> user
        self._tokens: dict[str, tuple[str, str]] = {}  # alias -> (secret, user)

    def check_password(self, user: str, password: str) -> str | None:
        """Return the user name these credentials (a password or an alias token) log in as, or None."""
        if hmac.compare_digest(user.encode(), self.user.encode()) and hmac.compare_digest(
            password.encode(), self._password.encode()
        ):
            return self.user
        with self._lock:
            token = self._tokens.get(user)
        if token and hmac.compare_digest(password.encode(), token[0].encode()):
            return token[1]
        return None

    def check_basic(self, header: str | None) -> str | None:
        """Return the user logged in by an `Authorization: Basic ...` header, or None."""
        if not header or not header.lower().startswith("basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return self.check_password(user, password) if sep else None

    def new_session(self, user: str) -> str:
        """Open a session for `user`; returns its id (32 hex digits, like Tomcat's)."""
        session_id = secrets.token_hex(16).upper()
        with self._lock:
            self._sessions[session_id] = user
        return session_id

    def session_user(self, session_id: str | None) -> str | None:
        """Return the user of an open session, or None."""
        if not session_id:
            return None
        with self._lock:
            return self._sessions.get(session_id)

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def expire_all_sessions(self) -> None:
        """Invalidate every session (a test hook: clients must log in again)."""
        with self._lock:
            self._sessions.clear()

    def issue_token(self, user: str) -> dict:
        """Create an alias token for `user`; returns it in XNAT's JSON shape (alias and secret)."""
        alias, secret = str(uuid.uuid4()), secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[alias] = (secret, user)
        now_ms = int(time.time() * 1000)
        return {
            "alias": alias,
            "secret": secret,
            "xdatUserId": user,
            "singleUse": False,
            "enabled": True,
            "timestamp": now_ms,
            "estimatedExpirationTime": now_ms + TOKEN_LIFETIME_SECONDS * 1000,
        }
