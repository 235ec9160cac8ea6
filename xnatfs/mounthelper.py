"""``mount.xnatfs``: the helper mount(8) runs for ``mount -t xnatfs`` and fstab lines of type xnatfs.

    mount.xnatfs SOURCE MOUNTPOINT [-o k=v,...] [-s] [-f] [-n] [-v] [-t xnatfs]

Options of xnatfs: every option of ``xnatfs mount`` for the source, by the name of its value
(``--cache-dir DIR`` is ``cache_dir=DIR``, ``--no-xattrs`` is ``no_xattrs`` or ``noxattrs``, a dicom://
source's ``--calling-aet`` is ``calling_aet``), plus ``user`` and ``credentials`` (a file with the password,
see :func:`read_credentials_file`), which the helper reads itself so that no password reaches argv. Options
that only mean something to mount(8) or systemd (``noauto``, ``nofail``, ``_netdev``, ``defaults``, ``x-*``,
...) are dropped; every other option goes to FUSE. Returns once the mount is live (``xnatfs mount`` in the
background), or exits non-zero with one line.
"""

from __future__ import annotations

import argparse
import functools
import netrc
import os
import stat
import sys
from urllib.parse import urlsplit

from xnatfs.exceptions import XnatfsError

HELPER_OPTIONS = ("user", "credentials")  # read here: the password goes to the daemon's environment
ALIASES = {"noxattrs": "no_xattrs"}
# Options of `xnatfs mount` that an fstab line does not set.
NOT_OPTIONS = {"help", "source", "mountpoint", "foreground", "fuse_options", "ready_fd"}
# Meaningful to mount(8), systemd or the kernel's generic layer, not to xnatfs or FUSE.
DROPPED = {"defaults", "noauto", "auto", "nofail", "_netdev", "users", "owner", "group", "nouser", "rw", "ro"}
DROPPED_PREFIXES = ("x-", "comment=", "helper=")


class HelperError(XnatfsError):
    """Bad options or credentials for mount.xnatfs."""


@functools.lru_cache(maxsize=8)
def mount_options(source: str) -> dict[str, argparse.Action]:
    """Return the options ``xnatfs mount SOURCE`` takes (its transport's included), by their fstab name.
    Built once per source (splitting the options and writing the daemon's argv both ask)."""
    from xnatfs.cli.mount import add_parsers

    commands = argparse.ArgumentParser().add_subparsers()
    add_parsers(commands, ["mount", source])
    return {action.dest: action for action in commands.choices["mount"]._actions if action.dest not in NOT_OPTIONS}


def split_options(text: str, source: str) -> tuple[dict[str, str], list[str]]:
    """Return ``(xnatfs options, FUSE options)`` from a mount(8) option string ``a=b,c,...``."""
    known = mount_options(source)
    mine: dict[str, str] = {}
    fuse: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = ALIASES.get(key, key)
        action = known.get(key)
        if key in HELPER_OPTIONS or (action is not None and action.nargs != 0):
            if not sep:
                raise HelperError(f"option {key} needs a value ({key}=...)")
            mine[key] = value
        elif action is not None and not sep:
            mine[key] = ""
        elif item in DROPPED or item.startswith(DROPPED_PREFIXES):
            continue
        else:
            fuse.append(item)
    return mine, fuse


def read_credentials_file(path: str, source: str) -> tuple[str, str]:
    """Return ``(user, password)`` from a credentials file: netrc format (the entry for the
    source's ``host:port`` or ``host``) or ``username=...`` / ``password=...`` lines.

    The file must not be readable by group or others. Raises HelperError.
    """
    try:
        st = os.stat(path)
    except OSError as error:
        raise HelperError(f"credentials file {path}: {error.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise HelperError(f"credentials file {path} is readable by others (chmod 600 {path})")
    with open(path) as f:
        text = f.read()
    words = text.split()
    if words and words[0] in ("machine", "default"):
        parts = urlsplit(source)
        host = parts.hostname or ""
        try:
            entries = netrc.netrc(path)
        except netrc.NetrcParseError as error:
            raise HelperError(f"credentials file {path}: {error.msg}") from None
        for machine in ([f"{host}:{parts.port}"] if parts.port else []) + [host]:
            auth = entries.authenticators(machine)
            if auth is not None:
                return auth[0], auth[2] or ""
        raise HelperError(f"credentials file {path} has no entry for {host}")
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            values[key.strip().lower()] = value.strip()
    user = values.get("username") or values.get("user")
    if not user or "password" not in values:
        raise HelperError(f"credentials file {path}: needs username=... and password=... lines (or netrc format)")
    return user, values["password"]


def xnatfs_argv(source: str, mountpoint: str, options: dict[str, str], fuse: list[str]) -> list[str]:
    """Return the ``xnatfs mount`` arguments for a helper call (never a password)."""
    known = mount_options(source)
    argv = ["mount", source, mountpoint]
    for key, value in options.items():
        if key in known and key not in HELPER_OPTIONS:  # the login is the helper's: XNAT_USER/XNAT_PASS
            flag = known[key].option_strings[-1]
            argv += [flag, value] if known[key].nargs != 0 else [flag]
    if fuse:
        argv += ["-o", ",".join(fuse)]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run ``mount.xnatfs``; return the exit status (0 once the mount is live)."""
    parser = argparse.ArgumentParser(prog="mount.xnatfs", description="mount(8) helper for xnatfs")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    for flag in ("-s", "-f", "-n", "-v"):  # sloppy, fake, no mtab, verbose: what mount(8) may pass
        parser.add_argument(flag, action="store_true")
    parser.add_argument("-t", dest="type", default="xnatfs")
    args = parser.parse_args(argv)
    try:
        options, fuse = split_options(",".join(args.options), args.source)
        if args.f:
            return 0  # mount -f: pretend
        if "credentials" in options:
            user, password = read_credentials_file(options["credentials"], args.source)
            os.environ["XNAT_USER"], os.environ["XNAT_PASS"] = user, password
        elif "user" in options:
            os.environ["XNAT_USER"] = options["user"]
            if "XNAT_PASS" not in os.environ:
                from xnatfs.credentials import netrc_credentials

                found = netrc_credentials(args.source)
                if found is None or found[0] != options["user"]:
                    raise HelperError(f"no password for {options['user']!r}: use credentials=FILE or a netrc entry")
                os.environ["XNAT_PASS"] = found[1]
    except (HelperError, OSError) as error:
        print(f"mount.xnatfs: error: {error}", file=sys.stderr)
        return 1
    from xnatfs.cli import main as xnatfs_main

    return xnatfs_main(xnatfs_argv(args.source, args.mountpoint, options, fuse))


if __name__ == "__main__":
    sys.exit(main())
