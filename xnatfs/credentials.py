"""Where credentials come from: an option, the environment, or ~/.netrc. Never argv."""

from __future__ import annotations

import getpass
import netrc
import os
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

from xnatfs.exceptions import XnatfsError


class CredentialsError(XnatfsError):
    """No usable credentials could be found."""


def resolve_credentials(
    url: str, user: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """Return ``(user, password)`` for the server at ``url``, first found of:

    1. ``user`` given (``--user``): password from env ``XNAT_PASS``, else a prompt on the terminal;
    2. env ``XNAT_USER`` and ``XNAT_PASS``;
    3. the netrc entry for ``host:port``, else ``host`` (file: env ``NETRC``, else ``~/.netrc``);
    4. ``(None, None)``: anonymous.

    Raises CredentialsError when a password is needed but cannot be asked for.
    """
    env = os.environ if environ is None else environ
    if user:
        password = env.get("XNAT_PASS")
        if password is None:
            if not sys.stdin.isatty():
                raise CredentialsError(f"no password for {user!r}: set XNAT_PASS or run on a terminal")
            password = getpass.getpass(f"Password for {user} at {url}: ")
        return user, password
    if env.get("XNAT_USER") and env.get("XNAT_PASS") is not None:
        return env["XNAT_USER"], env["XNAT_PASS"]
    found = netrc_credentials(url, env)
    if found is not None:
        return found
    return None, None


def netrc_credentials(url: str, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Return ``(login, password)`` from the netrc entry for ``host:port`` or ``host``, or None."""
    env = os.environ if environ is None else environ
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return None
    try:
        entries = netrc.netrc(path)
    except (netrc.NetrcParseError, OSError) as error:
        raise CredentialsError(f"{path}: cannot be read: {error}") from None
    parts = urlsplit(url)
    host = parts.hostname or ""
    candidates = [f"{host}:{parts.port}", host] if parts.port else [host]
    for machine in candidates:
        auth = entries.authenticators(machine)
        if auth is not None:
            login, _account, password = auth
            return login, password or ""
    return None
