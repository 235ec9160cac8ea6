"""Folders listed with attributes (READDIRPLUS, xnatfs.readdirplus): the kernel learns each entry's inode
and size from the listing, so what it tells afterwards (stat, ls -l, reads up to the size) must be exactly
what a lookup would have said, in folders bigger than one READDIRPLUS answer as well."""

from __future__ import annotations

import os
import stat
import time
from types import SimpleNamespace

from mounting import mounted

from xnatfs.fuse import mfusepy
from xnatfs.readdirplus import FUSE_FILL_DIR_PLUS, FUSE_READDIR_PLUS, readdir_plus_methods


def test_entries_with_sizes_go_out_with_attributes_and_a_listing_resumes_where_it_stopped():
    file_attrs = {"st_mode": stat.S_IFREG | 0o444, "st_ino": 11, "st_size": 1234, "st_mtime": 5 * 10**9}
    listing = [
        (".", {"st_mode": stat.S_IFDIR | 0o555, "st_ino": 7}, 0),
        ("..", {"st_mode": stat.S_IFDIR | 0o555, "st_ino": 1}, 0),
        ("a.dcm", file_attrs, 0),
        ("unsized.dcm", {"st_mode": stat.S_IFREG | 0o444, "st_ino": 12}, 0),  # size not known yet
        ("b.dcm", {**file_attrs, "st_ino": 13, "st_size": 99}, 0),
    ]
    calls = []
    operations = SimpleNamespace(readdir=lambda path, fh: calls.append(path) or listing, ttl=0)
    fuse = SimpleNamespace(operations=operations, encoding="utf-8", errors="surrogateescape", use_ns=True)
    fuse._readdir = lambda *args: mfusepy.FUSE._readdir(fuse, *args)  # mfusepy's names-only answer
    fip = SimpleNamespace(contents=SimpleNamespace(fh=1))
    methods = readdir_plus_methods(mfusepy, mfusepy.FUSE)
    assert methods is not None
    readdir = methods["readdir_fuse_3"]
    sent = []

    def filler(buf, name, st, offset, flags, room):
        if len(sent) >= room:
            return 1  # the answer is full: this entry did not fit
        sent.append((name.decode(), offset, flags, st.st_ino, st.st_size, st.st_mode))
        return 0

    assert readdir(fuse, b"/P/files", None, lambda *a: filler(*a, room=3), 0, fip, FUSE_READDIR_PLUS) == 0
    # The kernel asks again from the offset of the last entry it got: the rest, from the listing kept.
    assert readdir(fuse, b"/P/files", None, lambda *a: filler(*a, room=10), 3, fip, FUSE_READDIR_PLUS) == 0
    assert calls == ["/P/files"]
    assert [(name, offset, flags) for name, offset, flags, *_ in sent] == [
        (".", 1, 0),
        ("..", 2, 0),
        ("a.dcm", 3, FUSE_FILL_DIR_PLUS),
        ("unsized.dcm", 4, 0),
        ("b.dcm", 5, FUSE_FILL_DIR_PLUS),
    ]
    assert sent[2][3:] == (11, 1234, stat.S_IFREG | 0o444)
    assert sent[3][3:5] == (12, 0)  # name, mode and inode only: the kernel looks it up
    assert sent[4][3:5] == (13, 99)
    # The kernel's last request of the listing (from past its end) and a plain READDIR of the same handle
    # are answered from the listing the handle started: one snapshot, built once.
    assert readdir(fuse, b"/P/files", None, lambda *a: filler(*a, room=100), 5, fip, FUSE_READDIR_PLUS) == 0
    assert readdir(fuse, b"/P/files", None, lambda *a: filler(*a, room=100), 4, fip, 0) == 0
    assert calls == ["/P/files"]
    assert [(name, offset, flags) for name, offset, flags, *_ in sent[5:]] == [("b.dcm", 5, 0)]  # names only
    del sent[5:]
    # A new listing (offset 0) is built anew.
    assert readdir(fuse, b"/P/files", None, lambda *a: filler(*a, room=100), 0, fip, FUSE_READDIR_PLUS) == 0
    assert calls == ["/P/files", "/P/files"]
    with_attributes = [0, 0, FUSE_FILL_DIR_PLUS, 0, FUSE_FILL_DIR_PLUS]
    assert [flags for _name, _offset, flags, *_ in sent[5:]] == with_attributes
    # Within the TTL of a listing handed out whole, the kernel holds the attributes: names alone go out.
    operations.ttl = 60
    assert readdir(fuse, b"/P/files", None, lambda *a: filler(*a, room=100), 0, fip, FUSE_READDIR_PLUS) == 0
    assert [(offset, flags) for _name, offset, flags, *_ in sent[10:]] == [(0, 0)] * 5
    assert readdir(fuse, b"/Q/files", None, lambda *a: filler(*a, room=100), 0, fip, FUSE_READDIR_PLUS) == 0
    assert [flags for _name, _offset, flags, *_ in sent[15:]] == with_attributes  # another folder: not told yet


def test_a_listed_folder_tells_the_sizes_and_inodes_a_lookup_would(tmp_path):
    source = tmp_path / "source" / "series"
    source.mkdir(parents=True)
    sizes = {f"{i:04d}-{'x' * 40}.dcm": 1 + (i * 7919) % 5000 for i in range(700)}  # > one READDIRPLUS answer
    for name, size in sizes.items():
        (source / name).write_bytes(bytes([len(name) % 251]) * size)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with mounted(f"file://{source.parent}", str(mnt), str(cache), dict(os.environ)):
        folder = mnt / "series"
        listed = {entry.name: (entry.inode(), entry.stat().st_size) for entry in os.scandir(folder)}
        assert sorted(listed) == sorted(sizes)  # every entry once, across the answers
        for name, size in sizes.items():
            assert listed[name] == (os.stat(folder / name).st_ino, size), name
        for name in list(sizes)[::100]:
            assert (folder / name).read_bytes() == (source / name).read_bytes()


def test_one_directory_read_is_one_snapshot_while_the_folder_changes(tmp_path):
    """A listing read in parts (a reader that takes a few names, then the rest later) gets the folder as it
    was when the read began, even after the TTL ran out and the folder changed: no name twice, none lost."""
    source = tmp_path / "source" / "series"
    source.mkdir(parents=True)
    names = {f"n{i:04d}-{'y' * 30}" for i in range(1000)}  # many READDIRPLUS answers
    for name in names:
        (source / name).write_bytes(b"x")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with mounted(f"file://{source.parent}", str(mnt), str(cache), dict(os.environ), "--ttl", "1"):
        with os.scandir(mnt / "series") as listing:
            seen = [next(listing).name for _ in range(50)]
            for i in range(300):  # names that sort first: a new listing would shift every offset
                (source / f"a{i:04d}").write_bytes(b"x")
            time.sleep(1.5)  # the listing's TTL runs out: a new one would show them
            seen += [entry.name for entry in listing]
        assert len(seen) == len(set(seen)) == 1000 and set(seen) == names
        assert len(os.listdir(mnt / "series")) == 1300  # a new read sees the change


def test_sizes_told_forget_the_least_recently_told_first():
    """A walk over more files than the table holds must not forget the file being read (a listing or a
    lookup told its size just before): shrinking it is then told by a short read, never by zeros."""
    from xnatfs.fuse_ops import ToldSizes

    told = ToldSizes(3)
    told.tell([("/a", 1), ("/b", 2), ("/c", 3)])
    told.tell([("/a", 10)])  # told again: now the most recent
    told.tell([("/d", 4)])
    assert [told.get(p) for p in ("/a", "/b", "/c", "/d")] == [10, None, 3, 4]
