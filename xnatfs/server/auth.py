"""Users, sessions (JSESSIONID) and alias tokens of the embedded server. Thread-safe."""

from __future__ import annotations

import base64
import hmac
import secrets
import threading
import time
import uuid
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from .http import MAX_DRAIN_BYTES

TOKEN_LIFETIME_SECONDS = 2 * 24 * 3600
# XNAT's defaults: 20 failed logins (form or Basic, counted alike) lock the account for an hour.
MAX_FAILED_LOGINS = 20
LOCKOUT_SECONDS = 3600.0
GUEST = "guest"
REALM = 'Basic realm="XNAT Protected Area"'
SESSION_COOKIE = "JSESSIONID"


def parse_basic(header: str | None) -> tuple[str | None, str | None]:
    """Return (user, password) of an `Authorization: Basic ...` header, (None, None) without one."""
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None, None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else (None, None)


class Auth:
    """One user with a password, the sessions they opened and the alias tokens issued to them."""

    def __init__(
        self,
        user: str,
        password: str,
        max_failed_logins: int = MAX_FAILED_LOGINS,
        lockout_seconds: float = LOCKOUT_SECONDS,
    ) -> None:
        self.user = user
        self._password = password
        self.max_failed_logins = max_failed_logins
        self.lockout_seconds = lockout_seconds
        self._lock = threading.Lock()
        self._sessions: dict[str, str] = {}  # session id -> user
        self._tokens: dict[str, tuple[str, str]] = {}  # alias -> (secret, user)
        self._failures = 0  # consecutive failed logins of self.user
        self._locked_until = 0.0

    def check_password(self, user: str, password: str) -> str | None:
        """Return the user name these credentials (a password or an alias token) log in as, or None.

        Like XNAT, failed logins of the user are counted; after `max_failed_logins` in a row the
        account is locked for `lockout_seconds` (the right password is refused meanwhile). A
        successful login resets the count.
        """
        if hmac.compare_digest(user.encode(), self.user.encode()):
            right = hmac.compare_digest(password.encode(), self._password.encode())
            with self._lock:
                if time.monotonic() < self._locked_until:
                    return None
                if right:
                    self._failures = 0
                    return self.user
                self._failures += 1
                if self._failures >= self.max_failed_logins:
                    self._failures = 0
                    self._locked_until = time.monotonic() + self.lockout_seconds
            return None
        with self._lock:
            token = self._tokens.get(user)
        if token and hmac.compare_digest(password.encode(), token[0].encode()):
            return token[1]
        return None

    def set_password(self, password: str) -> None:
        """Change the user's password (a test hook: the mount's password stops working)."""
        with self._lock:
            self._password = password

    def unlock(self) -> None:
        """Lift a lockout and forget failed logins (a test hook, as an admin would)."""
        with self._lock:
            self._failures = 0
            self._locked_until = 0.0

    def check_basic(self, header: str | None, session_user: str | None = None) -> str | None:
        """Return the user logged in by an `Authorization: Basic ...` header, or None.

        Like XNAT, credentials for the user the session already holds are not checked again.
        """
        user, password = parse_basic(header)
        if user is None:
            return None
        if session_user is not None and session_user == user:
            return session_user
        return self.check_password(user, password or "")

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


class Authentication:
    """The request handler's side of logging in: session cookie or Basic auth, the login form, 401."""

    server: Any  # has `auth` (Auth) and `require_login`

    def _unauthorized(self) -> None:
        self._send(401, b"Authentication required", "text/plain;charset=UTF-8", {"WWW-Authenticate": REALM})

    def _cookie_session(self) -> str | None:
        cookies = SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie", ""))
        except Exception:  # a malformed Cookie header counts as no cookie
            return None
        morsel = cookies.get(SESSION_COOKIE)
        return morsel.value if morsel else None

    def _authenticate(self) -> str | None:
        """Return the user of this request (session cookie or Basic auth), or None.

        Like XNAT: Basic credentials for the user the session holds are not checked again; other
        Basic credentials are, and open a new session (cookie). Without credentials and without a
        live session, a site with requireLogin=false answers as the guest user.
        """
        auth = self.server.auth
        session_user = auth.session_user(self._cookie_session())
        header = self.headers.get("Authorization")
        if parse_basic(header)[0] is not None:
            user = auth.check_basic(header, session_user)
            if user is not None and user != session_user:
                self._set_session_cookie(auth.new_session(user))
        elif session_user is not None:
            user = session_user
        elif not self.server.require_login:
            user = GUEST
        else:
            user = None
        self._user = user or ""
        return user

    def _set_session_cookie(self, session_id: str) -> None:
        self._new_cookies.append(f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly")

    def _login(self) -> None:
        """PUT/POST /data/services/auth with a form body username=..&password=.. -> the session id."""
        form = {k: v[0] for k, v in parse_qs(self._read_body(MAX_DRAIN_BYTES).decode("utf-8", "replace")).items()}
        user = self.server.auth.check_password(form.get("username", ""), form.get("password", ""))
        if user is None:
            self._send_text("Authentication failed.", 401)
            return
        session_id = self.server.auth.new_session(user)
        self._user = user
        self._set_session_cookie(session_id)
        self._send_text(session_id)
