"""Transports behind the same mount: a local folder, and a third-party plug-in found by entry point."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time

import pytest
from mounting import mounted

from xnatfs.transports import UnknownSchemeError, get_transport

PLUGIN = '''
"""A third-party transport: a fixed in-memory tree, its content filled into the shared cache."""
from xnatfs.transports import AbstractTransport, Entry, Unit

TREE = {"/": ["greetings"], "/greetings": ["hello.txt", "big.bin"]}
CONTENT = {"/greetings/hello.txt": b"hello from a plug-in\\n", "/greetings/big.bin": bytes(range(256)) * 4096}


class MemoryTransport(AbstractTransport):
    name = "memory"
    description = "An in-memory tree, for tests"
    authors = "tests"
    version = "1.0"
    url = "https://example.invalid"
    schemes = ["memory"]

    def _list(self, path):
        if path not in TREE:
            raise FileNotFoundError(path)
        entries = []
        for name in TREE[path]:
            full = path.rstrip("/") + "/" + name
            data = CONTENT.get(full)
            entries.append(Entry(name, data is None, size=len(data or b""), mtime=1e9, key="memory:" + full))
        return entries

    def _unit(self, path, entry):  # one unit holds every file
        return Unit(key=("memory", "all"), version="1", member=path.strip("/"), id="all", folder="/")

    def _fill(self, unit, filler):
        for path, data in CONTENT.items():
            filler.write(path.strip("/"), data)
'''


@pytest.fixture
def plugin_path(tmp_path):
    """A folder with the plug-in module and its distribution metadata (entry point), for PYTHONPATH."""
    site = tmp_path / "site"
    (site / "xnatfs_memory_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "xnatfs_memory_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "xnatfs_memory_plugin-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xnatfs-memory-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[xnatfs.transports]\nmemory = xnatfs_memory_plugin:MemoryTransport\n")
    return str(site)


def test_third_party_transport_mounts_and_reads(plugin_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=plugin_path)
    mnt = str(tmp_path / "mnt")
    with mounted("memory://", mnt, str(tmp_path / "cache"), env):
        assert os.listdir(mnt) == ["greetings"]
        assert sorted(os.listdir(f"{mnt}/greetings")) == ["big.bin", "hello.txt"]
        assert os.stat(f"{mnt}/greetings/big.bin").st_size == 1 << 20
        with open(f"{mnt}/greetings/hello.txt", "rb") as f:
            assert f.read() == b"hello from a plug-in\n"
        with open(f"{mnt}/greetings/big.bin", "rb") as f:
            assert f.read() == bytes(range(256)) * 4096
        assert not os.path.exists(f"{mnt}/greetings/nope")


def test_unknown_scheme_names_the_known_ones(plugin_path):
    with pytest.raises(UnknownSchemeError) as info:
        get_transport("gopher://x")
    assert "file://" in str(info.value) and "dicom://" in str(info.value) and "http://" in str(info.value)
    # The plug-in's scheme is known to a process that can import it.
    code = "from xnatfs.transports import get_transport; print(type(get_transport('memory://')).__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=plugin_path)
    )
    assert out.stdout.strip() == "MemoryTransport", out.stderr


def test_local_folder_mount(tmp_path):
    data = tmp_path / "data"
    (data / "study" / "series").mkdir(parents=True)
    (data / "study" / "series" / "a.dcm").write_bytes(b"A" * 5000)
    (data / "notes.txt").write_text("hi")
    os.symlink("/etc/passwd", data / "escape")
    mnt = str(tmp_path / "mnt")
    with mounted(f"file://{data}", mnt, str(tmp_path / "cache"), dict(os.environ)):
        assert sorted(os.listdir(mnt)) == ["notes.txt", "study"]
        with open(f"{mnt}/study/series/a.dcm", "rb") as f:
            assert f.read() == b"A" * 5000
        assert os.stat(f"{mnt}/notes.txt").st_size == 2
        with pytest.raises(OSError) as info:
            open(f"{mnt}/new.txt", "wb")
        assert info.value.errno == errno.EROFS


CHANGING_PLUGIN = '''
"""A transport whose listings give stale sizes, as a server's listing can: the content it fetches, or
a file that changes later, has another size. The base class corrects sizes learned from content; a
change found outside a read the transport reports by changed(path), as transports should."""
import os
import threading
import time
from xnatfs.transports import AbstractTransport, Entry, Unit

DATA = os.environ["CHANGING_PLUGIN_DATA"]  # grow.txt, shrink.txt and later.txt live here
LISTED = {"grow.txt": 5, "shrink.txt": 50}  # what the listing says before a fetch


class ChangingTransport(AbstractTransport):
    name = "changing"
    schemes = ["changing"]

    def _setup(self):
        self.sizes = dict(LISTED, **{"later.txt": os.path.getsize(os.path.join(DATA, "later.txt"))})
        threading.Thread(target=self._watch, daemon=True).start()

    def _list(self, path):
        if path != "/":
            raise FileNotFoundError(path)
        return [Entry(name, False, size=size, mtime=1e9, key=name) for name, size in self.sizes.items()]

    def _unit(self, path, entry):
        name = path.strip("/")
        return Unit(("changing", name), str(os.path.getsize(os.path.join(DATA, name))), name, name, "/")

    def _fill(self, unit, filler):
        with open(os.path.join(DATA, unit.member), "rb") as f:
            filler.write(unit.member, f.read())

    def _watch(self):
        """later.txt changes outside any read: tell the mount, then leave an acknowledgement."""
        later = os.path.join(DATA, "later.txt")
        while True:
            time.sleep(0.02)
            size = os.path.getsize(later)
            if size != self.sizes["later.txt"]:
                self.sizes["later.txt"] = size
                self.invalidate("/")
                self.changed("/later.txt")
                open(os.path.join(DATA, "ack"), "w").close()
'''


def test_changed_sizes_reach_the_kernel_at_once(tmp_path):
    """A transport that finds a listed size wrong calls changed(path): reads are neither truncated nor padded,
    and stat shows the new size at once (the kernel would otherwise keep the old one for --ttl seconds)."""
    site, data = tmp_path / "site", tmp_path / "data"
    info = site / "xnatfs_changing_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    data.mkdir()
    (site / "xnatfs_changing_plugin.py").write_text(textwrap.dedent(CHANGING_PLUGIN))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xnatfs-changing-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[xnatfs.transports]\nchanging = xnatfs_changing_plugin:ChangingTransport\n")
    grown, shrunk = b"0123456789" * 2, b"abcdefghij" * 2
    (data / "grow.txt").write_bytes(grown)
    (data / "shrink.txt").write_bytes(shrunk)
    (data / "later.txt").write_bytes(b"old\n")
    env = dict(os.environ, PYTHONPATH=str(site), CHANGING_PLUGIN_DATA=str(data))
    mnt = str(tmp_path / "mnt")
    with mounted("changing://", mnt, str(tmp_path / "cache"), env, "--ttl", "60"):
        assert os.stat(f"{mnt}/grow.txt").st_size == 5  # the listing's (stale) size
        assert os.stat(f"{mnt}/shrink.txt").st_size == 50
        # The first read finds the true size while the kernel believes the listed one.
        cat = subprocess.run(["cat", f"{mnt}/grow.txt"], capture_output=True, timeout=30)
        assert (cat.stdout, cat.stderr) == (grown, b"")
        assert os.stat(f"{mnt}/grow.txt").st_size == len(grown)
        cat = subprocess.run(["cat", f"{mnt}/shrink.txt"], capture_output=True, timeout=30)
        assert (cat.stdout, cat.stderr) == (shrunk, b"")
        assert os.stat(f"{mnt}/shrink.txt").st_size == len(shrunk)
        for name, content in (("grow.txt", grown), ("shrink.txt", shrunk)):
            with open(f"{mnt}/{name}", "rb") as f:
                assert f.read() == content
        # A change found outside any read: visible as soon as the transport has said so.
        with open(f"{mnt}/later.txt", "rb") as f:
            assert f.read() == b"old\n"
        (data / "later.txt").write_bytes(b"new and longer\n")
        deadline = time.monotonic() + 10
        while not (data / "ack").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (data / "ack").exists()
        assert os.stat(f"{mnt}/later.txt").st_size == len(b"new and longer\n")
        with open(f"{mnt}/later.txt", "rb") as f:
            assert f.read() == b"new and longer\n"
