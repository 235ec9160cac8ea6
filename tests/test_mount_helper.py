"""``mount.xnatfs``: the mount(8) helper, run directly, through ``mount -t xnatfs`` and from an fstab line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
from mounting import force_unmount, is_mounted, xnatfs

from xnatfs.mounthelper import split_options, xnatfs_argv

HELPER = os.path.join(os.path.dirname(sys.executable), "mount.xnatfs")
PASSWORD = "pw-never-in-argv-or-logs"


def credentials_file(path, user: str, password: str, mode: int = 0o600) -> str:
    path.write_text(f"username={user}\npassword={password}\n")
    path.chmod(mode)
    return str(path)


def test_helper_mounts_with_options_and_a_credentials_file(server_factory, tmp_path):
    own = server_factory(password=PASSWORD)
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    os.makedirs(mnt)
    creds = credentials_file(tmp_path / "creds", own.user, PASSWORD)
    env = {k: v for k, v in os.environ.items() if k not in ("XNAT_USER", "XNAT_PASS")}
    options = f"noauto,x-systemd.automount,_netdev,cache_dir={cache},cache_size=1G,timeout=7,ttl=5,credentials={creds}"
    options += ",noxattrs,listing_jobs=2"  # every option of xnatfs mount has an fstab name
    result = subprocess.run(
        [HELPER, own.url, mnt, "-o", options + ",default_permissions"], capture_output=True, text=True, env=env
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt) and sorted(os.listdir(mnt)) == ["DEMO", "PHANTOM"]
        status = json.loads(xnatfs("status", mnt, "--json").stdout)
        assert status["cache_dir"] == cache and status["cache_max"] == 1 << 30
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if f" {mnt} " in line)
        assert "default_permissions" in line  # FUSE options pass through
        argv = " ".join(open(f"/proc/{status['pid']}/cmdline").read().split("\0"))
        assert "--timeout 7 " in argv and "--ttl 5 " in argv and PASSWORD not in argv  # the user's own arguments
        assert "--no-xattrs" in argv and "--listing-jobs 2 " in argv
        with pytest.raises(OSError) as no_xattrs:
            os.listxattr(os.path.join(mnt, "DEMO"))
        assert no_xattrs.value.errno == errno.EOPNOTSUPP
    finally:
        assert xnatfs("umount", mnt).returncode == 0
        force_unmount(mnt)
    assert PASSWORD not in open(os.path.join(cache, "xnatfs.log")).read()

    # a credentials file others can read is refused, in one line, and nothing is mounted
    loose = credentials_file(tmp_path / "loose", own.user, PASSWORD, mode=0o644)
    result = subprocess.run([HELPER, own.url, mnt, "-o", f"credentials={loose}"], capture_output=True, text=True)
    assert result.returncode == 1 and not is_mounted(mnt)
    assert (
        result.stderr.strip()
        == f"mount.xnatfs: error: credentials file {loose} is readable by others (chmod 600 {loose})"
    )


def test_the_login_stays_with_the_helper():
    """user= and credentials= are read by the helper (the daemon gets them in its environment): neither
    reaches the daemon's arguments, where --user would override the credentials file's user."""
    options, fuse = split_options("user=alice,credentials=/etc/creds,ttl=5,allow_other", "https://xnat.example")
    argv = xnatfs_argv("https://xnat.example", "/mnt/x", options, fuse)
    assert argv == ["mount", "https://xnat.example", "/mnt/x", "--ttl", "5", "-o", "allow_other"]


def test_mount_t_xnatfs_and_an_fstab_line(server, tmp_path):
    """mount(8) looks for helpers in /sbin only (not PATH): in a private mount namespace, a read-only
    overlay adds a test-made folder holding the helper to /sbin, so nothing of the machine changes
    (and the namespace ends with the test)."""
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    os.symlink(HELPER, sbin / "mount.xnatfs")
    mnt, cache = str(tmp_path / "mnt"), str(tmp_path / "cache")
    os.makedirs(mnt)
    creds = credentials_file(tmp_path / "creds", server.user, server.password)
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{server.url} {mnt} xnatfs noauto,x-systemd.automount,cache_dir={cache},credentials={creds} 0 0\n"
    )
    xnatfs_cmd = f"{sys.executable} -m xnatfs"
    script = f"""
        set -e
        mount -t overlay overlay -o lowerdir={sbin}:{os.path.realpath("/sbin")} {os.path.realpath("/sbin")}
        mount -t xnatfs -o cache_dir={cache},credentials={creds},timeout=9 {server.url} {mnt}
        ls {mnt} > {tmp_path}/ls-t
        {xnatfs_cmd} status --json {mnt} > {tmp_path}/status-t
        {xnatfs_cmd} umount {mnt}
        mount -T {fstab} {mnt}
        ls {mnt} > {tmp_path}/ls-fstab
        fusermount3 -u {mnt}
    """
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
    finally:
        force_unmount(mnt)
    assert (tmp_path / "ls-t").read_text().split() == ["DEMO", "PHANTOM"]
    assert (tmp_path / "ls-fstab").read_text().split() == ["DEMO", "PHANTOM"]
    status = json.loads((tmp_path / "status-t").read_text())
    assert status["source"] == server.url and status["cache_dir"] == cache and status["online"]
    assert not is_mounted(mnt) and not os.path.exists("/sbin/mount.xnatfs")  # the machine's /sbin is untouched
