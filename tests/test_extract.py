"""Tests of xnatfs.extract: hostile archives, limits, streaming, waiting for members, and properties."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import stat
import tempfile
import threading
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import zips
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from zips import DEFLATED, STORED, Entry

from xnatfs.exceptions import IncompleteDownloadError, UnsafeArchiveError
from xnatfs.extract import (
    ExtractLimits,
    StreamingExtractor,
    check_member_name,
    extract_stream,
    extract_zip,
)

# -- helpers ---------------------------------------------------------------------------------------------


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Everything below ``root`` (except ``skip``): relative path -> (type, content digest or link target)."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if skip is not None and (path == skip or skip in path.parents):
                continue
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                result[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                result[str(path.relative_to(root))] = ("dir",)
            else:
                result[str(path.relative_to(root))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return result


def files_in(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def symlinks_in(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_symlink()]


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def unseekable_zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """An archive as zipfile writes it to a pipe: data descriptors, no sizes in local headers."""

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.data += b
            return len(b)

    pipe = Pipe()
    with zipfile.ZipFile(pipe, "w", compression=method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return bytes(pipe.data)


def seekable_zip(files: dict[str, bytes], method: int = zipfile.ZIP_STORED, **kwargs) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as zf:
        for name, data in files.items():
            if name.endswith("/"):
                zf.mkdir(name.rstrip("/"))
            else:
                zf.writestr(name, data, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A temporary folder with things outside the destination that an attack would like to reach."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("do not touch")
    (tmp_path / "work").mkdir()
    return tmp_path


# -- names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "/", "./", "/etc/passwd", "C:evil", "c:/evil", "../evil", "a/../../evil", "a/..", "..",
     "a\\b", "..\\evil", "a\x00b", "a\x07b", "a\nb", "a\x7fb", "a\x85b", "a/" + "b" * 256, "x/" * 600],
)  # fmt: skip
def test_check_member_name_rejects(name: str) -> None:
    with pytest.raises(UnsafeArchiveError):
        check_member_name(name)


@pytest.mark.parametrize(
    "name, expected",
    [("a", "a"), ("a/b/", "a/b"), ("./a//b/./c", "a/b/c"), ("e/scans/1-T1 w/x..y", "e/scans/1-T1 w/x..y"),
     ("...", "..."), ("é/ü", "é/ü"), ("ab:c", "ab:c")],
)  # fmt: skip
def test_check_member_name_normalizes(name: str, expected: str) -> None:
    assert check_member_name(name) == expected


@given(st.text(max_size=40))
@settings(max_examples=100, deadline=None)
def test_check_member_name_never_escapes(name: str) -> None:
    try:
        path = check_member_name(name)
    except UnsafeArchiveError:
        return
    root = "/dest"
    assert os.path.normpath(os.path.join(root, path)).startswith(root + "/")
    assert ".." not in path.split("/") and "\\" not in path and "\x00" not in path
    assert path == check_member_name(path)


# -- the hostile corpus ----------------------------------------------------------------------------------

UNSAFE, SHORT = UnsafeArchiveError, IncompleteDownloadError
# name -> (archive, error from extract_zip, error from extract_stream); None: extracted without error.
CORPUS = {
    "zip slip": (lambda: zips.single("../evil"), UNSAFE, UNSAFE),
    "deep zip slip": (lambda: zips.single("a/b/../../../outside/secret"), UNSAFE, UNSAFE),
    "absolute path": (lambda: zips.single("/tmp/evil"), UNSAFE, UNSAFE),
    "drive letter": (lambda: zips.single("C:evil"), UNSAFE, UNSAFE),
    "drive letter root": (lambda: zips.single("C:/evil"), UNSAFE, UNSAFE),
    "backslash": (lambda: zips.single("..\\evil"), UNSAFE, UNSAFE),
    "NUL": (lambda: zips.single(b"evil\x00.txt"), UNSAFE, UNSAFE),
    "control character": (lambda: zips.single("a\x1b[2Jb"), UNSAFE, UNSAFE),
    "empty name": (lambda: zips.single(""), UNSAFE, UNSAFE),
    "name too long": (lambda: zips.single("a/" + "b" * 300), UNSAFE, UNSAFE),
    "invalid UTF-8": (lambda: zips.single(b"\xff\xfe"), UNSAFE, UNSAFE),
    "symlink entry": (zips.symlink, UNSAFE, UNSAFE),
    "device entry": (zips.device, UNSAFE, UNSAFE),
    "FIFO entry": (zips.fifo, UNSAFE, UNSAFE),
    "bomb (ratio)": (zips.bomb, UNSAFE, UNSAFE),
    "bomb (declared small)": (lambda: zips.bomb(declared=1000), UNSAFE, UNSAFE),
    "bomb (declared 1 MiB)": (lambda: zips.bomb(declared=1 << 20), UNSAFE, UNSAFE),
    "duplicate names": (zips.duplicates, UNSAFE, UNSAFE),
    "duplicate after normalization": (lambda: zips.duplicates("a/x", "./a//x"), UNSAFE, UNSAFE),
    "file, then file below it": (lambda: zips.duplicates("a", "a/b"), UNSAFE, UNSAFE),
    "file below, then file": (lambda: zips.duplicates("a/b", "a"), UNSAFE, UNSAFE),
    "directory and file": (lambda: zips.build([Entry("a/"), Entry("a", b"x")]), UNSAFE, UNSAFE),
    "overlapping entries": (zips.overlapping, UNSAFE, UNSAFE),
    "quoted overlap": (zips.quoted_overlap, UNSAFE, UNSAFE),
    "bad CRC": (zips.bad_crc, UNSAFE, UNSAFE),
    "stored sizes lie": (lambda: zips.single("s", b"abc", size=10), UNSAFE, UNSAFE),
    "directory with data": (lambda: zips.single("d/", b"data"), UNSAFE, UNSAFE),
    "encrypted": (lambda: zips.single("e", b"x", flags=zips.FLAG_ENCRYPTED), UNSAFE, UNSAFE),
    "bzip2": (lambda: zips.single("b", b"x", method=zips.BZIP2), UNSAFE, UNSAFE),
    "truncated archive": (lambda: zips.single("a", b"x" * 100)[:-30], UNSAFE, SHORT),
    "truncated end record": (lambda: zips.single("a", b"x" * 100)[:-10], UNSAFE, SHORT),
    "truncated inside an entry": (lambda: zips.single("big", b"x" * 5000)[:2000], UNSAFE, SHORT),
    "no central directory": (lambda: zips.local_entry(Entry("a", b"x")), UNSAFE, SHORT),
    "central name differs": (lambda: zips.build([Entry("a", b"x", central={"name": "b"})]), UNSAFE, UNSAFE),
    "central CRC differs": (lambda: zips.build([Entry("a", b"x", central={"crc": 5})]), UNSAFE, UNSAFE),
    "central size differs": (lambda: zips.build([Entry("a", b"xy", central={"size": 1})]), UNSAFE, UNSAFE),
    "phantom central entry": (
        lambda: zips.build([Entry("a", b"x" * 100)], extra_central=[(Entry("ghost", b"x" * 10), 40)]),
        UNSAFE,
        UNSAFE,
    ),
    # Bytes the central directory does not list: invisible to unzip, and to extract_zip.
    "entry hidden from the central directory": (
        lambda: zips.build([Entry("a", b"x"), Entry("hidden", b"y", listed=False)]),
        None,
        UNSAFE,
    ),
    "garbage": (lambda: b"GIF89a" + bytes(100), UNSAFE, UNSAFE),
}


@functools.cache
def corpus_bytes(case: str) -> bytes:
    return CORPUS[case][0]()


def assert_nothing_partial(area: Path, before: dict, dest: Path) -> None:
    assert not dest.exists()
    assert snapshot(area) == before, "something was left or changed outside the destination"


@pytest.mark.parametrize("case", CORPUS)
def test_extract_zip_hostile(area: Path, case: str) -> None:
    archive = area / "in.zip"
    archive.write_bytes(corpus_bytes(case))
    dest = area / "work" / "dest"
    before = snapshot(area)
    error = CORPUS[case][1]
    if error is None:
        extract_zip(str(archive), str(dest))
        assert snapshot(area, skip=dest) == before
        return
    with pytest.raises(error) as caught:
        extract_zip(str(archive), str(dest))
    assert_nothing_partial(area, before, dest)
    if case.startswith("truncated"):
        assert isinstance(caught.value.__cause__, zipfile.BadZipFile)


@pytest.mark.parametrize("chunk", [7, 4096])
@pytest.mark.parametrize("case", CORPUS)
def test_extract_stream_hostile(area: Path, case: str, chunk: int) -> None:
    dest = area / "work" / "dest"
    before = snapshot(area)
    error = CORPUS[case][2]
    with pytest.raises(error):
        extract_stream(chunked(corpus_bytes(case), chunk), str(dest))
    assert_nothing_partial(area, before, dest)


@pytest.mark.parametrize("case", CORPUS)
def test_streaming_extractor_hostile_leaves_only_complete_members(area: Path, case: str) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    before = snapshot(area, skip=dest)
    extractor = StreamingExtractor(str(dest))
    with pytest.raises((UnsafeArchiveError, IncompleteDownloadError)):
        for piece in chunked(corpus_bytes(case), 1000):
            extractor.feed(piece)
        extractor.finish()
    assert not symlinks_in(dest)
    # Only verified members remain, under their names; no temporary file.
    assert sorted(files_in(dest)) == sorted(m for m in extractor.members if (dest / m).is_file())
    assert snapshot(area, skip=dest) == before
    with pytest.raises((UnsafeArchiveError, IncompleteDownloadError)):
        extractor.wait_for("ok.txt", timeout=1)


def test_bomb_declared_small_never_writes_more_than_declared(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    with pytest.raises(UnsafeArchiveError, match="more data than declared"):
        extractor.feed(corpus_bytes("bomb (declared small)"))
    assert files_in(dest) == {}


def test_symlink_entry_in_stream_is_written_as_plain_file_then_rejected(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    extractor.feed(zips.symlink("/etc/passwd"))
    assert (dest / "link").is_file() and not (dest / "link").is_symlink()
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        extractor.finish()


# -- limits ----------------------------------------------------------------------------------------------

FOUR = zips.build([Entry(f"d/{i}", bytes([i]) * 200) for i in range(4)])


@pytest.mark.parametrize(
    "limits, archive",
    [
        (ExtractLimits(max_entries=3), FOUR),
        (ExtractLimits(max_entry_size=199), FOUR),
        (ExtractLimits(max_total_size=799), FOUR),
        (ExtractLimits(max_ratio=10), zips.build([Entry("z", bytes(2 << 20), method=DEFLATED)])),
    ],
    ids=["entries", "entry size", "total size", "ratio"],
)
def test_limits(area: Path, limits: ExtractLimits, archive: bytes) -> None:
    (area / "in.zip").write_bytes(archive)
    before = snapshot(area)
    with pytest.raises(UnsafeArchiveError):
        extract_zip(str(area / "in.zip"), str(area / "work" / "a"), limits)
    with pytest.raises(UnsafeArchiveError):
        extract_stream(chunked(archive, 999), str(area / "work" / "b"), limits)
    assert snapshot(area) == before


def test_limits_just_enough_and_small_files_exempt_from_ratio(area: Path) -> None:
    exact = ExtractLimits(max_entries=4, max_entry_size=200, max_total_size=800)
    assert len(extract_stream([FOUR], str(area / "work" / "a"), exact)) == 4
    zeros = zips.build([Entry("z", bytes(1 << 20), method=DEFLATED)])  # ratio ~1000, but only 1 MiB
    assert extract_stream([zeros], str(area / "work" / "b"), ExtractLimits(max_ratio=10)) == ["z"]


def test_ratio_is_judged_on_the_whole_entry(area: Path) -> None:
    # 8 MiB of zeros then 1 MiB of noise: the start alone compresses 1000:1, the whole entry about 9:1.
    data = bytes(8 << 20) + os.urandom(1 << 20)
    archive = zips.build([Entry("scan.dcm", data, method=DEFLATED)])
    assert extract_stream(chunked(archive, 65536), str(area / "work" / "a"), ExtractLimits(max_ratio=10))
    assert (area / "work" / "a" / "scan.dcm").read_bytes() == data


# -- destination -----------------------------------------------------------------------------------------


def test_existing_destination_is_refused(area: Path) -> None:
    archive = seekable_zip({"a": b"1"})
    (area / "in.zip").write_bytes(archive)
    dest = area / "work" / "dest"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        extract_zip(str(area / "in.zip"), str(dest))
    with pytest.raises(FileExistsError):
        extract_stream([archive], str(dest))
    assert list(dest.iterdir()) == [] and sorted(os.listdir(area / "work")) == ["dest"]


def test_missing_archive_and_failing_producer(area: Path) -> None:
    with pytest.raises(FileNotFoundError):
        extract_zip(str(area / "nope.zip"), str(area / "work" / "dest"))

    def dropped_connection():
        yield seekable_zip({"a": b"x" * 1000})[:500]
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        extract_stream(dropped_connection(), str(area / "work" / "dest"))
    assert os.listdir(area / "work") == []


def test_planted_symlink_directory_is_not_followed(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    (dest / "exp").symlink_to(area / "outside")
    before = snapshot(area / "outside")
    extractor = StreamingExtractor(str(dest))
    with pytest.raises(UnsafeArchiveError, match="not a directory"):
        extractor.feed(zips.build([Entry("exp/evil", b"x")]))
    assert snapshot(area / "outside") == before


@pytest.mark.parametrize("planted", ["symlink", "file", "dangling symlink"])
def test_existing_target_is_refused(area: Path, planted: str) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    target = dest / "a"
    if planted == "file":
        target.write_text("mine")
    elif planted == "symlink":
        target.symlink_to(area / "outside" / "secret")
    else:
        target.symlink_to(area / "outside" / "new")
    before = snapshot(area)
    extractor = StreamingExtractor(str(dest))
    with pytest.raises(UnsafeArchiveError, match="already exists"):
        extractor.feed(zips.build([Entry("a", b"overwritten?")]))
    assert snapshot(area) == before


def test_map_name_renames_and_skips(area: Path) -> None:
    files = {"e/scans/1-T1/resources/DICOM/files/a.dcm": b"A", "e/scans/2-T2/resources/SNAP/files/b.png": b"B"}
    archive = seekable_zip(files)
    (area / "in.zip").write_bytes(archive)

    def only_dicom(name: str) -> str | None:
        parts = name.split("/")
        return "/".join(parts[2:3] + parts[6:]) if "DICOM" in parts else None

    assert extract_zip(str(area / "in.zip"), str(area / "work" / "a"), map_name=only_dicom) == ["1-T1/a.dcm"]
    assert extract_stream([archive], str(area / "work" / "b"), map_name=only_dicom) == ["1-T1/a.dcm"]
    for dest in ("a", "b"):
        assert files_in(area / "work" / dest) == {"1-T1/a.dcm": b"A"}
    with pytest.raises(UnsafeArchiveError):
        extract_zip(str(area / "in.zip"), str(area / "work" / "c"), map_name=lambda name: "../" + name)
    assert not (area / "work" / "c").exists()


def test_modes(area: Path) -> None:
    archive = seekable_zip({"d/": b"", "d/f": b"x"})
    extract_stream([archive], str(area / "work" / "dest"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((area / "work" / "dest" / "d").stat().st_mode) == 0o755 & ~umask
    assert stat.S_IMODE((area / "work" / "dest" / "d" / "f").stat().st_mode) == 0o644 & ~umask


# -- streaming -------------------------------------------------------------------------------------------


def test_member_available_before_the_stream_ends(area: Path) -> None:
    first, second = os.urandom(300_000), os.urandom(300_000)
    archive = seekable_zip({"e/1.dcm": first, "e/2.dcm": second})
    dest = area / "work" / "dest"
    dest.mkdir()
    seen = []
    extractor = StreamingExtractor(str(dest), on_member=seen.append)
    extractor.feed(archive[: len(archive) // 2])
    assert Path(extractor.wait_for("e/1.dcm", timeout=1)).read_bytes() == first
    assert extractor.members == seen == ["e/1.dcm"]
    with pytest.raises(TimeoutError):
        extractor.wait_for("e/2.dcm", timeout=0.05)
    assert not (dest / "e" / "2.dcm").exists()  # being written, under a temporary name
    extractor.feed(archive[len(archive) // 2 :])
    assert extractor.finish() == ["e/1.dcm", "e/2.dcm"]
    assert files_in(dest) == {"e/1.dcm": first, "e/2.dcm": second}


def test_waiter_in_another_thread_is_woken_while_the_download_runs(area: Path) -> None:
    first = os.urandom(100_000)
    archive = seekable_zip({"a/1": first, "a/2": os.urandom(100_000)}, zipfile.ZIP_DEFLATED)
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    release = threading.Event()

    def download() -> None:
        extractor.feed(archive[:120_000])
        release.wait(10)
        extractor.feed(archive[120_000:])
        extractor.finish()

    producer = threading.Thread(target=download)
    producer.start()
    try:
        assert Path(extractor.wait_for("a/1", timeout=10)).read_bytes() == first
        assert not release.is_set()  # served while the rest is still "downloading"
    finally:
        release.set()
        producer.join()
    assert extractor.wait_for("a/2", timeout=1)


def test_wait_for_a_missing_member(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(_catch(extractor.wait_for, "nope")))
    waiter.start()
    extractor.feed(seekable_zip({"a": b"1"}))
    extractor.finish()
    waiter.join(5)
    assert isinstance(outcome[0], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        extractor.wait_for("nope")
    with pytest.raises(FileNotFoundError):
        extractor.wait_for("../a")
    assert extractor.wait_for("./a") == str(dest / "a")


def test_fail_wakes_waiters_and_removes_the_partial_member(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    archive = seekable_zip({"a": b"1", "b": b"2" * 100_000})
    extractor = StreamingExtractor(str(dest))
    outcome = []
    waiters = [
        threading.Thread(target=lambda name=name: outcome.append(_catch(extractor.wait_for, name)))
        for name in ("b", "b", "c")
    ]
    for waiter in waiters:
        waiter.start()
    extractor.feed(archive[:50_000])
    dropped = ConnectionError("connection dropped")
    extractor.fail(dropped)
    for waiter in waiters:
        waiter.join(5)
    assert outcome == [dropped] * 3
    assert os.listdir(dest) == ["a"]  # the half-written "b" is gone
    with pytest.raises(ConnectionError):
        extractor.feed(archive[50_000:])
    with pytest.raises(ConnectionError):
        extractor.wait_for("a")


def _catch(function, *args) -> object:
    try:
        return function(*args)
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
        return exc


def test_error_mid_stream_keeps_verified_members_only(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    with pytest.raises(UnsafeArchiveError, match="bad CRC"):
        extractor.feed(zips.bad_crc())
    assert os.listdir(dest) == ["ok.txt"]
    with pytest.raises(UnsafeArchiveError):
        extractor.finish()


@pytest.mark.parametrize(
    "archive, message",
    [(b"", "before the central directory"),
     (zips.single("big", b"x" * 5000)[:2000], "inside the entry"),
     (zips.single("big", b"x" * 5000)[:-10], "end of the central directory"),
     (zips.descriptor_entries({"a": bytes(range(256)) * 20}, STORED)[:-200], "end of the central directory"),
     (zips.descriptor_entries({"a": bytes(range(256)) * 20})[:-200], "inside the entry")],
)  # fmt: skip
def test_stream_ending_early(area: Path, archive: bytes, message: str) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    extractor.feed(archive)
    with pytest.raises(IncompleteDownloadError, match=message):
        extractor.finish()
    assert all(not name.startswith(".") for name in os.listdir(dest))


def test_fallback_for_stored_entries_with_data_descriptors(area: Path) -> None:
    followed = [
        Entry("e/1", os.urandom(10_000)),
        Entry("e/2", b"two" * 1000),
        Entry("e/3", b"three" * 5000, method=DEFLATED, descriptor=True),  # a deflate stream ends by itself
    ]
    spooled = [
        Entry("e/4", os.urandom(5000), method=STORED, descriptor=True),  # nothing says where it ends
        Entry("e/5", b"after the fallback"),
    ]
    archive = zips.build(followed + spooled)
    dest = area / "work" / "dest"
    dest.mkdir()
    announced = []
    extractor = StreamingExtractor(str(dest), on_member=announced.append, spool_dir=str(area / "work"))
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(extractor.wait_for("e/4", timeout=10)))
    waiter.start()
    for piece in chunked(archive, 3000):
        extractor.feed(piece)
    assert extractor.members == ["e/1", "e/2", "e/3"]
    assert extractor.finish() == announced == ["e/1", "e/2", "e/3", "e/4", "e/5"]
    waiter.join(5)
    assert waiter_result == [str(dest / "e" / "4")]
    assert files_in(dest) == {entry.name: entry.data for entry in followed + spooled}
    assert sorted(os.listdir(area / "work")) == ["dest"]  # the spool is gone


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zipfile_written_to_a_pipe(area: Path, method: int) -> None:
    files = {"a/x": os.urandom(70_000), "a/y": b"y" * 70_000, "b/": b""}
    archive = unseekable_zip(files, method)
    written = extract_stream(chunked(archive, 4096), str(area / "work" / "dest"))
    assert written == ["a/x", "a/y", "b"]
    assert files_in(area / "work" / "dest") == {"a/x": files["a/x"], "a/y": files["a/y"]}


def test_deflate_with_sizes_and_zip64_headers_are_streamed(area: Path) -> None:
    files = {"a": os.urandom(50_000), "b": b"b" * 500_000}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            with zf.open(name, "w", force_zip64=True) as member:
                member.write(data)
    archive = buffer.getvalue()
    assert b"\x01\x00\x10\x00" in archive  # a ZIP64 extra field in a local header
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    extractor.feed(archive[:-100])
    assert extractor.members == ["a", "b"]  # before the central directory has arrived
    extractor.feed(archive[-100:])
    assert extractor.finish() == ["a", "b"]
    assert files_in(dest) == files


def test_empty_archive(area: Path) -> None:
    archive = seekable_zip({})
    assert extract_stream([archive], str(area / "work" / "a")) == []
    (area / "in.zip").write_bytes(archive)
    assert extract_zip(str(area / "in.zip"), str(area / "work" / "b")) == []


def test_memory_does_not_grow_with_the_archive(area: Path) -> None:
    dest = area / "work" / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    tracemalloc.start()
    try:
        for piece in zips.stored_chunks(files=64, file_size=1 << 20):  # 64 MiB
            extractor.feed(piece)
        extractor.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(extractor.members) == 64
    assert peak < 2 << 20, f"peak {peak} bytes"


# -- properties ------------------------------------------------------------------------------------------

# Safe choices are repeated so that about half of the archives are extracted, not all rejected.
COMPONENTS = ["a", "b", "sub", "é"] * 4 + ["..", ".", "", "C:", "c:x", "\\", "x\\y", "x\x00", "\x07", "b" * 256]
MODES = [None, stat.S_IFREG | 0o644] * 3 + [stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, stat.S_IFCHR, stat.S_IFIFO]

hostile_entries = st.lists(
    st.builds(
        Entry,
        name=st.builds(
            lambda absolute, parts: ("/" if absolute else "") + "/".join(parts),
            st.sampled_from([False] * 9 + [True]),
            st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4),
        ),
        data=st.binary(max_size=300),
        method=st.sampled_from([STORED, DEFLATED]),
        mode=st.sampled_from(MODES),
        descriptor=st.booleans(),
        crc=st.sampled_from([None] * 9 + [0]),
    ),
    max_size=5,
)


def _plant(root: Path) -> Path:
    """A destination's parent with bait around it: secrets, and a symlink pointing outside."""
    (root / "outside").mkdir()
    (root / "outside" / "secret").write_text("secret")
    (root / "work").mkdir()
    (root / "work" / "a").symlink_to(root / "outside")
    return root / "work" / "dest"


@given(entries=hostile_entries, chunk=st.integers(1, 700))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_hostile_archives_stay_inside(entries: list[Entry], chunk: int) -> None:
    archive = zips.build(entries)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dest = _plant(root)
        (root / "in.zip").write_bytes(archive)
        before = snapshot(root)
        for run in (
            lambda: extract_zip(str(root / "in.zip"), str(dest)),
            lambda: extract_stream(chunked(archive, chunk), str(dest)),
        ):
            try:
                written = run()
            except (UnsafeArchiveError, IncompleteDownloadError) as exc:
                event(f"rejected: {str(exc)[:20]}")
                assert snapshot(root) == before  # no partial output, no staging, no spool
                continue
            event(f"extracted {len(written)} entries")
            assert snapshot(root, skip=dest) == before
            assert not symlinks_in(dest)
            for relpath in written:
                assert (dest / relpath).resolve().is_relative_to(dest)
            by_name = {check_member_name(e.name): e.data for e in entries if not e.name.endswith("/")}
            assert files_in(dest) == {name: by_name[name] for name in written if name in by_name}
            shutil.rmtree(dest)


def _tree_names(paths: list[tuple[str, ...]]) -> list[str]:
    """Keep the paths that do not clash (no path is a prefix of another), joined with '/'."""
    kept: list[tuple[str, ...]] = []
    for path in paths:
        if all(path[: len(k)] != k and k[: len(path)] != path for k in kept):
            kept.append(path)
    return ["/".join(p) for p in kept]


@st.composite
def valid_archives(draw: st.DrawFn) -> dict[str, bytes]:
    """Files (name -> data) in a tree without clashes, sometimes with an empty directory entry."""
    component = st.sampled_from(["a", "b", "scans", "1-T1", "x.dcm"])
    paths = draw(st.lists(st.lists(component, min_size=1, max_size=4).map(tuple), max_size=8))
    files = {name: draw(st.binary(max_size=3000)) for name in _tree_names(paths)}
    if draw(st.booleans()):
        files["empty-dir/"] = b""
    return files


@given(files=valid_archives(), method=st.sampled_from([STORED, DEFLATED]), pipe=st.booleans(),
       chunks=st.lists(st.integers(1, 5000), min_size=1, max_size=5))  # fmt: skip
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_valid_archives_round_trip(files: dict, method: int, pipe: bool, chunks: list[int]) -> None:
    if pipe:
        archive = unseekable_zip({n: d for n, d in files.items() if not n.endswith("/")}, method)
        files = {n: d for n, d in files.items() if not n.endswith("/")}
    else:
        archive = seekable_zip(files, method)
    pieces, position = [], 0
    while position < len(archive):
        size = chunks[len(pieces) % len(chunks)]
        pieces.append(archive[position : position + size])
        position += size
    expected = {name: data for name, data in files.items() if not name.endswith("/")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in.zip").write_bytes(archive)
        written = extract_zip(str(root / "in.zip"), str(root / "batch"))
        event(f"{len(written)} entries, {'pipe' if pipe else 'seekable'}")
        assert written == [name.rstrip("/") for name in files]
        assert files_in(root / "batch") == expected
        assert extract_stream(pieces, str(root / "stream")) == written
        assert files_in(root / "stream") == expected
        assert sorted(os.listdir(root)) == ["batch", "in.zip", "stream"]
