"""How the mount reaches a server: credentials, a context path, error statuses and expired sessions."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from context_proxy import ContextProxy
from mounting import credentials_env, mounted, xnatfs, zip_downloads

from xnatfs.credentials import resolve_credentials
from xnatfs.transports.xnat import server_url


def scan_files(mnt: str) -> list[str]:
    """Return the DICOM files of the first scan with DICOM files in the mount."""
    for folder, dirs, names in sorted(os.walk(mnt)):
        dirs.sort()
        if folder.endswith("/resources/DICOM/files") and "/scans/" in folder:
            found = sorted(os.path.join(folder, n) for n in names if n.endswith(".dcm"))
            if found:
                return found
    raise AssertionError("no DICOM scan in the mount")


def md5_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def anonymous_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XNAT_USER", "XNAT_PASS", "NETRC")}
    env["HOME"] = "/nonexistent"  # no ~/.netrc of the machine's user
    env.update(extra)
    return env


def test_credentials_order(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(
        "machine example.org:8443 login byport password p1\nmachine example.org login byhost password p2\n"
    )
    url = "https://example.org:8443"
    env = {"NETRC": str(netrc)}
    assert resolve_credentials(url, environ=env) == ("byport", "p1")
    assert resolve_credentials("https://example.org", environ=env) == ("byhost", "p2")
    assert resolve_credentials(url, environ={**env, "XNAT_USER": "u", "XNAT_PASS": "pw"}) == ("u", "pw")
    assert resolve_credentials(url, user="me", environ={**env, "XNAT_PASS": "pw"}) == ("me", "pw")
    assert resolve_credentials("https://other.org", environ=env) == (None, None)


def test_mount_with_netrc_and_with_user_option(server, tmp_path, mnt, cache_dir):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {server.host}:{server.port} login {server.user} password {server.password}\n")
    netrc.chmod(0o600)
    with mounted(server.url, mnt, cache_dir, anonymous_env(NETRC=str(netrc))):
        assert os.listdir(mnt)
    with mounted(server.url, mnt, cache_dir, anonymous_env(XNAT_PASS=server.password), "--user", server.user):
        assert os.listdir(mnt)
    # --user without XNAT_PASS and no terminal to ask on: one clear line, no mount.
    result = xnatfs("mount", server.url, mnt, "--cache-dir", cache_dir, "--user", server.user, env=anonymous_env())
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "XNAT_PASS" in result.stderr, result.stderr
    assert not os.listdir(mnt)


def test_source_urls():
    assert server_url("xnat://xnat.example.org:8443/xnat/") == "https://xnat.example.org:8443/xnat"
    assert server_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert server_url(None, netloc="host", root="/ctx") == "https://host/ctx"


def test_server_below_a_context_path(server, mnt, cache_dir, env, tmp_path):
    with ContextProxy(server.url) as proxy:
        with mounted(proxy.url, mnt, cache_dir, env):
            files = scan_files(mnt)
            for path in files:
                with open(path, "rb") as f:
                    data = f.read()
                assert len(data) == os.stat(path).st_size > 0
            # the same bytes as straight from the server
            rel = os.path.relpath(files[0], mnt)
            with mounted(server.url, str(tmp_path / "direct"), str(tmp_path / "cache2"), env):
                assert md5_of(files[0]) == md5_of(str(tmp_path / "direct" / rel))
        project, _subject, experiment = rel.split(os.sep)[:3]
        dest = tmp_path / "dl"
        result = xnatfs("download", proxy.url, project, experiment, "--dest", str(dest), env=env)
        assert result.returncode == 0, result.stderr
        assert any(name.endswith(".dcm") for _r, _d, names in os.walk(dest) for name in names)
        assert proxy.outside == []  # every request kept the context path


@pytest.mark.parametrize(("status", "expected"), [(403, errno.EACCES), (404, errno.ENOENT), (500, errno.EIO)])
def test_server_errors_map_to_errno(server, env, mnt, cache_dir, status, expected):
    with mounted(server.url, mnt, cache_dir, env, "--timeout", "3"):
        path = scan_files(mnt)[0]  # listed while the server is well
        server.set_faults(error={"status": status, "path": r"/scans/[^/]+/resources/\d+/files$"})
        with pytest.raises(OSError) as info:
            with open(path, "rb") as f:
                f.read()
        assert info.value.errno == expected
        server.clear_faults()
        with open(path, "rb") as f:  # a failure is not remembered: the next read downloads
            assert f.read()


def test_expired_session_is_renewed_transparently(server, env, mnt, cache_dir):
    with mounted(server.url, mnt, cache_dir, env):
        files = scan_files(mnt)
        server.expire_sessions()
        server.clear_requests()
        with open(files[0], "rb") as f:
            assert len(f.read()) == os.stat(files[0]).st_size
        log = server.requests()
        # The credentials ride along with the expired session: served at once, never refused.
        assert [r["status"] for r in zip_downloads(log)] == [200]
        assert not any(r.get("status") == 401 for r in log)


def test_bad_password_after_mount_gives_eacces_not_a_hang(server_factory, mnt, cache_dir):
    own = server_factory()
    with mounted(own.url, mnt, cache_dir, credentials_env(own), "--timeout", "3"):
        path = scan_files(mnt)[0]
        own.expire_sessions()
        own.set_faults(error={"status": 401, "path": "."})  # the account was disabled meanwhile
        with pytest.raises(OSError) as info:
            with open(path, "rb") as f:
                f.read()
        assert info.value.errno == errno.EACCES
