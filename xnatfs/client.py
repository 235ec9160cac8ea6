"""The HTTP client of an XNAT server: its login session, timeouts, retries and errors.

:class:`XnatClient` is the one place where xnatfs speaks HTTP to XNAT. Every request has a
connect and a read timeout; connection errors and 5xx answers are retried with backoff until the
request's deadline; 403 and 404 become :class:`~xnatfs.exceptions.AccessDeniedError` and
:class:`~xnatfs.exceptions.NotFoundError`. Messages name the path, never a credential.

Credentials go with every request (Basic auth beside the session cookie): XNAT does not check them
again while the session holds that user, and when the session has expired they log in anew on the
spot. Re-logging-in only after a 401 is not enough: a site with ``requireLogin=false`` answers an
expired session as the guest user, and private data would silently disappear. So a 401 means the
credentials themselves were refused. XNAT locks an account after 20 failed logins, so after a refusal
no request is sent for a while (15 s, doubling up to 10 min, ``XNATFS_AUTH_RETRY_SECONDS`` sets the
first wait): calls fail at once with :class:`~xnatfs.exceptions.AuthenticationError` meanwhile, and
the first request after the wait tries again, so a password that works again is picked up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from xnatfs import __version__
from xnatfs.exceptions import (
    AccessDeniedError,
    AuthenticationError,
    ConnectionFailedError,
    NotFoundError,
    ServerError,
)
from xnatfs.httpbody import CHUNK_SIZE, BodyReader, direct_body
from xnatfs.options import TIMEOUT

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = TIMEOUT
AUTH_RETRY_SECONDS = 15.0  # first wait after refused credentials; doubles per refusal
AUTH_RETRY_MAX_SECONDS = 600.0


def auth_retry_seconds() -> float:
    """Return the first wait after refused credentials (env ``XNATFS_AUTH_RETRY_SECONDS``, default 15)."""
    try:
        return max(float(os.environ.get("XNATFS_AUTH_RETRY_SECONDS", AUTH_RETRY_SECONDS)), 0.0)
    except ValueError:
        return AUTH_RETRY_SECONDS


def quote_part(part: str) -> str:
    """Return one path component URL-quoted (``/`` included)."""
    return quote(str(part), safe="")


class XnatClient:
    """An authenticated connection to one XNAT server.

    ``url`` is the server's base URL (``https://host[:port][/context]``). ``user`` and
    ``password`` may be an alias token and its secret; ``headers`` may carry ready-made
    authentication (``Authorization``, ``Cookie``) instead. ``timeout`` bounds every network wait
    (seconds): a request whose server is down or stalled fails within about that time.
    ``auth_retry`` is the first wait (seconds) after refused credentials (default: see
    :func:`auth_retry_seconds`). Thread-safe: the mount shares one client between all its threads.
    """

    def __init__(
        self,
        url: str,
        user: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        verify: bool | str = True,
        headers: dict[str, str] | None = None,
        auth_retry: float | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self._password = password
        self.timeout = float(timeout)
        self._http = requests.Session()
        self._http.verify = verify
        self._http.headers["User-Agent"] = f"xnatfs/{__version__}"
        # Ready-made auth headers (a caller's Authorization or Cookie) replace a login.
        self._http.headers.update(headers or {})
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)
        if user is not None:
            self._http.auth = (user, password or "")  # Basic on every request, see the module doc
        self._login_lock = threading.Lock()
        self._logged_in = False
        self._auth_retry = auth_retry_seconds() if auth_retry is None else float(auth_retry)
        self._refusals = 0  # refusals of the credentials in a row
        self._refused_until = 0.0  # monotonic time before which no request is sent
        self._refusal_lock = threading.Lock()
        self._probe_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"XnatClient({self.url!r}, user={self.user!r})"

    # -- authentication -------------------------------------------------------------------

    def login(self, within: float | None = None) -> None:
        """Open a session (JSESSIONID cookie) with the credentials.

        ``within``: give up trying to reach the server after about that many seconds (default: the
        client's ``timeout``); a server that took the request still has ``timeout`` to answer it.
        Raises AuthenticationError when they are refused, ConnectionFailedError when the server
        cannot be reached.
        """
        with self._login_lock:
            self._login(within)

    def _login(self, within: float | None = None) -> None:
        self._http.cookies.clear()
        self._logged_in = False
        if self.user is None:
            return  # anonymous access, where the server allows it
        self._check_not_refused()
        # GET /data/JSESSION with Basic auth works for users and alias tokens alike.
        response = self._send("GET", "/data/JSESSION", login=True, within=within)
        if response.status_code == 401:
            response.close()
            self._refused()
            raise AuthenticationError(f"{self.url}: login refused for user {self.user!r} (bad user or password)")
        self._raise_for_status(response, "/data/JSESSION")
        self._accepted()
        session_id = response.text.strip()
        if session_id and "<" not in session_id:
            self._http.cookies.set("JSESSIONID", session_id)
        self._logged_in = True

    def _check_not_refused(self) -> None:
        """Raise AuthenticationError while the wait after refused credentials lasts."""
        left = self._refused_until - time.monotonic()
        if left > 0:
            raise AuthenticationError(
                f"{self.url}: the credentials for {self.user!r} were refused; not trying again for {left:.0f} s "
                "(XNAT locks accounts after repeated failed logins)"
            )

    def _refused(self) -> None:
        """Count a refusal of the credentials and start the wait before the next try."""
        with self._refusal_lock:
            self._refusals += 1
            wait = min(self._auth_retry * 2 ** (self._refusals - 1), AUTH_RETRY_MAX_SECONDS)
            self._refused_until = time.monotonic() + wait
        log.warning("%s: credentials for %r refused; next try in %.0f s", self.url, self.user, wait)

    def _accepted(self) -> None:
        with self._refusal_lock:
            if self._refusals:
                log.info("%s: credentials for %r accepted again", self.url, self.user)
            self._refusals = 0
            self._refused_until = 0.0

    def close(self) -> None:
        """End the session on the server (best effort) and close connections."""
        if self._logged_in:
            with contextlib.suppress(Exception):
                self._http.delete(self.url + "/data/JSESSION", timeout=min(self.timeout, 5))
        self._http.close()

    # -- requests -------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send a request to ``path`` (below the base URL) and return the successful response.

        Retries connection errors and 5xx until the deadline (``timeout`` seconds). Raises
        NotFoundError (404), AccessDeniedError (403), AuthenticationError (401: the credentials
        were refused, or were recently and the wait before trying again lasts), ServerError (other
        errors), ConnectionFailedError (server unreachable or not answering in time).
        """
        if self.user is None:
            response = self._send(method, path, **kwargs)
        else:
            self._check_not_refused()
            if not self._logged_in:
                with self._login_lock:
                    if not self._logged_in:
                        self._login()
            # After a refusal, one request at a time tries the credentials again; the others fail.
            probe = self._refusals > 0
            if probe and not self._probe_lock.acquire(blocking=False):
                raise AuthenticationError(f"{self.url}: the credentials for {self.user!r} are being tried again")
            try:
                response = self._send(method, path, **kwargs)
                if response.status_code == 401:
                    response.close()
                    self._refused()
                    raise AuthenticationError(f"{self._where(path)}: credentials for {self.user!r} refused (HTTP 401)")
                if response.status_code < 400 and self._refusals:
                    self._accepted()
            finally:
                if probe:
                    self._probe_lock.release()
        self._raise_for_status(response, path)
        return response

    def get_json(self, path: str, **params: str) -> Any:
        """Return the JSON document at ``path`` (``format=json`` added). Raises as :meth:`request`."""
        response = self.request("GET", path, params={"format": "json", **params})
        text = response.text
        if text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
            raise ServerError(f"{path}: the server answered with an HTML page instead of JSON")
        try:
            return response.json()
        except ValueError as error:
            raise ServerError(f"{path}: the server's answer is not valid JSON ({error})") from None

    def get_rows(self, path: str, columns: str | None = None) -> list[dict[str, str]]:
        """Return the rows of an XNAT ResultSet listing at ``path``."""
        params = {"columns": columns} if columns else {}
        document = self.get_json(path, **params)
        try:
            rows = document["ResultSet"]["Result"]
        except (KeyError, TypeError):
            raise ServerError(f"{path}: not an XNAT listing (no ResultSet)") from None
        if not isinstance(rows, list):
            raise ServerError(f"{path}: not an XNAT listing (Result is not a list)")
        return [row for row in rows if isinstance(row, dict)]

    @contextlib.contextmanager
    def stream(self, path: str, **params: str) -> Iterator[Iterator[bytes]]:
        """Yield an iterator over the body of ``path`` in chunks, streamed (never all in memory).

        The body is read into one buffer used again and again (:mod:`xnatfs.httpbody`): a chunk
        (bytes-like) is valid until the next one is asked for.

        Only the start of the request is retried; a connection that breaks or stalls for
        ``timeout`` seconds during the body raises ConnectionFailedError from the iterator.
        """
        response = self.request("GET", path, params=params or None, stream=True)
        try:
            yield self._iter_body(response, direct_body(response), path)
        finally:
            response.close()

    def _iter_body(self, response: requests.Response, body: BodyReader | None, path: str) -> Iterator[bytes]:
        try:
            yield from body if body is not None else response.raw.stream(CHUNK_SIZE, decode_content=True)
        except Exception as error:  # requests', the socket's and urllib3's own (ProtocolError, ReadTimeoutError)
            raise ConnectionFailedError(f"{path}: the download broke off: {_describe(error)}") from None

    # -- internals ------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, login: bool = False, within: float | None = None, **kwargs: Any
    ) -> requests.Response:
        """Send one request with retries on connection errors and 5xx until the deadline (``within``
        seconds, default ``timeout``); an answer being read may take ``timeout``."""
        url = self.url + path
        deadline = time.monotonic() + (self.timeout if within is None else within)
        kwargs.setdefault("allow_redirects", True)
        delay = 0.25
        idempotent = method in ("GET", "HEAD", "DELETE", "OPTIONS") or login
        while True:
            remaining = max(deadline - time.monotonic(), 0.5)
            timeout = (min(remaining, 10.0), self.timeout)  # connecting is bounded by the deadline, not reading
            try:
                response = self._http.request(method, url, timeout=timeout, **kwargs)
            except requests.RequestException as error:
                if not idempotent or time.monotonic() + delay >= deadline:
                    raise ConnectionFailedError(f"{self._where(path)}: {_describe(error)}") from None
                log.debug("%s: %s; retrying", path, _describe(error))
            else:
                if response.status_code < 500 or not idempotent:
                    return response
                if time.monotonic() + delay >= deadline:
                    return response
                log.debug("%s: HTTP %d; retrying", path, response.status_code)
                response.close()
            time.sleep(delay)
            delay = min(delay * 2, 4.0)

    def _raise_for_status(self, response: requests.Response, path: str) -> None:
        status = response.status_code
        if status < 400:
            return
        response.close()
        where = self._where(path)
        if status == 404:
            raise NotFoundError(f"{where}: not found on the server (HTTP 404)")
        if status == 403:
            raise AccessDeniedError(f"{where}: access denied (HTTP 403)")
        if status == 401:
            raise AuthenticationError(f"{where}: authentication required (HTTP 401)")
        raise ServerError(f"{where}: the server answered HTTP {status} {response.reason or ''}".rstrip(), status)

    def _where(self, path: str) -> str:
        return self.url + path.split("?", 1)[0]


def _describe(error: BaseException) -> str:
    """Return a short description of a network error (no URL credentials, no stack of causes)."""
    text = str(error)
    if isinstance(error, requests.ConnectTimeout) or "ConnectTimeout" in text:
        return "connection timed out"
    if isinstance(error, requests.ReadTimeout) or "Read timed out" in text:
        return "the server stopped answering (read timed out)"
    if "Connection refused" in text:
        return "connection refused (is the server running?)"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    if "RemoteDisconnected" in text or "Connection aborted" in text or "IncompleteRead" in text:
        return "the server closed the connection"
    return text.split(" (Caused by", 1)[0][:200]
