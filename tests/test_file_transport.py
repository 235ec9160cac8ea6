"""FileTransport: root checks, confinement to the root (``..``, symlinks), write modes, walk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xnatfs.transports import RootIsNotDirectory, get_transport
from xnatfs.transports.file import FileTransport


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Return a root folder with nested folders and files, next to a secret outside it."""
    (tmp_path / "secret.txt").write_bytes(b"outside")
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_bytes(b"top")
    (root / "a" / "one.bin").write_bytes(b"\x00\x01\x02")
    (root / "a" / "b" / "deep.txt").write_bytes(b"deep" * 100)
    (root / ".hidden").write_bytes(b"dot")
    return root


def transport(root: Path | str, mode: str = "r", **kwargs: object) -> FileTransport:
    return FileTransport(root=str(root), mode=mode, **kwargs)  # type: ignore[arg-type]


def test_root_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        transport(tmp_path / "nope")


def test_root_relative_is_refused() -> None:
    with pytest.raises(ValueError):
        FileTransport(root="relative/path")


def test_root_file_with_read_directory_only(tmp_path: Path) -> None:
    file = tmp_path / "f.txt"
    file.write_bytes(b"x")
    with pytest.raises(RootIsNotDirectory):
        transport(file, read_directory_only=True)
    with pytest.raises(NotADirectoryError):  # RootIsNotDirectory is one
        transport(file, read_directory_only=True)


def test_root_file_without_read_directory_only(tmp_path: Path) -> None:
    file = tmp_path / "f.txt"
    file.write_bytes(b"single")
    (tmp_path / "other.txt").write_bytes(b"other")
    t = transport(file)
    assert [e.name for e in t.listdir("/")] == ["f.txt"]
    assert t.open("/f.txt").read() == b"single"
    assert not t.exists("/other.txt")
    with pytest.raises(FileNotFoundError):
        t.open("/other.txt")


def test_read_and_stat(tree: Path) -> None:
    t = transport(tree)
    assert t.open("/a/b/deep.txt").read() == b"deep" * 100
    assert t.fetch("/top.txt") == os.path.realpath(tree / "top.txt")  # the real file, no copy
    entry = t.stat("/a/one.bin")
    assert (entry.is_dir, entry.size) == (False, 3)
    st = os.stat(tree / "a" / "one.bin")
    assert entry.key == f"{st.st_dev}:{st.st_ino}"
    assert entry.mtime == st.st_mtime
    assert t.isdir("/a") and t.isfile("/a/one.bin") and not t.exists("/a/missing")
    assert t.isfile("/.hidden")  # real dot-files are not probe names to hide
    sizes = {e.name: e.size for e in t.listdir("/a")}
    assert sizes == {"b": 0, "one.bin": 3}
    with pytest.raises(IsADirectoryError):
        t.open("/a")
    with pytest.raises(FileNotFoundError):
        t.open("/a/missing")
    assert "one.bin: file, 3 bytes" in t.info("/a/one.bin")


def test_walk_equals_os_walk(tree: Path) -> None:
    (tree / "a" / "b" / "c").mkdir()
    t = transport(tree)
    ours = {root: (sorted(dirs), sorted(files)) for root, dirs, files in t.walk("/")}
    theirs = {
        "/" + os.path.relpath(root, tree).replace(os.sep, "/").removeprefix(".").lstrip("/"): (
            sorted(dirs),
            sorted(files),
        )
        for root, dirs, files in os.walk(tree)
    }
    assert ours == theirs


def test_dotdot_does_not_escape(tree: Path) -> None:
    t = transport(tree, mode="w")
    # A tree path cannot go above its root: ".." at the top stays at the top.
    assert not t.exists("/../secret.txt")
    assert not t.exists("../../secret.txt")
    with pytest.raises(FileNotFoundError):
        t.open("/../secret.txt")
    with t.open("../secret.txt", "w") as f:
        f.write(b"inside")
    assert (tree / "secret.txt").read_bytes() == b"inside"
    assert (tree.parent / "secret.txt").read_bytes() == b"outside"
    assert t.real_path("/a/../../..") == os.path.realpath(tree)


def test_symlinks_outside_are_refused(tree: Path) -> None:
    outside = tree.parent
    os.symlink(outside / "secret.txt", tree / "link-file")
    os.symlink(outside, tree / "link-dir")
    os.symlink(outside / "not-there.txt", tree / "link-dangling")
    os.symlink("../../secret.txt", tree / "a" / "relative-link")
    t = transport(tree, mode="w")
    names = {e.name for e in t.listdir("/")} | {e.name for e in t.listdir("/a")}
    assert not names & {"link-file", "link-dir", "link-dangling", "relative-link"}
    for path in ("/link-file", "/link-dir/secret.txt", "/a/relative-link"):
        with pytest.raises(PermissionError):
            t.open(path)
        with pytest.raises(PermissionError):
            t.stat(path)
        assert not t.exists(path)
    for path in ("/link-file", "/link-dir/new.txt", "/link-dangling", "/a/relative-link"):
        for mode in "wxa":
            with pytest.raises(PermissionError):
                t.open(path, mode)
    with pytest.raises(PermissionError):
        t.listdir("/link-dir")
    assert (outside / "secret.txt").read_bytes() == b"outside"
    assert not (outside / "new.txt").exists() and not (outside / "not-there.txt").exists()


def test_symlinks_inside_are_followed(tree: Path) -> None:
    os.symlink("a/b/deep.txt", tree / "to-deep")
    os.symlink(tree / "a", tree / "to-a")
    os.symlink("..", tree / "a" / "b" / "loop")  # a link to a folder above it: left out
    t = transport(tree, mode="w")
    assert t.open("/to-deep").read() == b"deep" * 100
    assert t.isdir("/to-a") and t.open("/to-a/one.bin").read() == b"\x00\x01\x02"
    assert "loop" not in {e.name for e in t.listdir("/a/b")}
    walked = [root for root, _dirs, _files in t.walk("/")]
    assert "/to-a/b" in walked and len(walked) < 20
    with t.open("/to-a/written.txt", "w") as f:
        f.write(b"via link")
    assert (tree / "a" / "written.txt").read_bytes() == b"via link"


def test_write_modes(tree: Path) -> None:
    t = transport(tree, mode="w")
    with t.open("/new.txt", "w") as f:
        f.write(b"hello")
    assert (tree / "new.txt").read_bytes() == b"hello"
    assert t.stat("/new.txt").size == 5  # the listing cache is refreshed after a write
    with t.open("/new.txt", "a") as f:
        f.write(b" world")
    assert t.open("/new.txt").read() == b"hello world"
    with t.open("/new.txt", "wb") as f:
        f.write(b"again")
    assert (tree / "new.txt").read_bytes() == b"again"
    with pytest.raises(FileExistsError):
        t.open("/new.txt", "x")
    with t.open("/fresh.txt", "x") as f:
        f.write(b"x")
    assert (tree / "fresh.txt").read_bytes() == b"x"
    with pytest.raises(FileNotFoundError):
        t.open("/no-such-folder/f.txt", "w")
    with pytest.raises(IsADirectoryError):
        t.open("/a", "w")
    with pytest.raises(ValueError):
        t.open("/new.txt", "r+")


def test_read_only_mode_refuses_writes(tree: Path) -> None:
    t = transport(tree, mode="r")
    for mode in "wxa":
        with pytest.raises(PermissionError):
            t.open("/top.txt", mode)
    assert (tree / "top.txt").read_bytes() == b"top"


def test_listing_skips_special_files(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    t = transport(tree)
    assert "fifo" not in {e.name for e in t.listdir("/")}
    assert not t.exists("/fifo")


def test_get_transport(tree: Path) -> None:
    t = get_transport(f"file://{tree}")
    assert isinstance(t, FileTransport)
    assert t.open("/top.txt").read() == b"top"
    assert FileTransport.schemes == ["file"]
    for attribute in ("name", "description", "authors", "version", "url"):
        assert getattr(FileTransport, attribute)
    spaced = tree / "with space"
    spaced.mkdir()
    (spaced / "f").write_bytes(b"s")
    assert get_transport(f"file://{str(spaced).replace(' ', '%20')}").open("/f").read() == b"s"
    with pytest.raises(FileNotFoundError):
        get_transport(f"file://{tree}/missing")
    w = get_transport(f"file://{tree}", mode="w")
    with w.open("/via-registry.txt", "w") as f:
        f.write(b"ok")
    assert (tree / "via-registry.txt").read_bytes() == b"ok"
