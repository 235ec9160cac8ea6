"""ZIPs as XNAT's writer (Java's ZipOutputStream) makes them: DEFLATE with data descriptors, streamed; ZIP64
past 4 GiB and past 65,535 entries. Through the real extractor, the server's ZIP writer and `xnatfs serve`."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import tempfile
import zipfile
import zlib
from pathlib import Path

import pytest
import zips
from mounting import credentials_env, mounted, xnatfs
from zips import DEFLATED, Entry

from xnatfs.exceptions import UnsafeArchiveError
from xnatfs.extract import ExtractLimits, StreamingExtractor, extract_stream
from xnatfs.server.archive import FileEntry
from xnatfs.server.zipstream import ZipMember, stream_zip

GIB4 = 1 << 32
BIG_SIZE = GIB4 + 1  # one byte past what 32-bit fields hold
BIG_CRC = 0x41D912FF  # zlib.crc32 of BIG_SIZE zero bytes
MANY = 65_536  # one more than a classic end record counts


def files_in(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.fixture
def fast_dir(tmp_path):
    """A folder on tmpfs when there is one: tens of thousands of files are created there."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="xnatfs-test-") as folder:
            yield Path(folder)
    else:
        yield tmp_path


def file_entry(path: Path, name: str) -> FileEntry:
    info = path.stat()
    return FileEntry(name, str(path), info.st_size, info.st_mtime, info.st_mtime_ns)


def zeros_entry(name: str) -> FileEntry:
    """A file of BIG_SIZE zeros for the server's ZIP writer, read from /dev/zero (a sparse file costs more)."""
    return FileEntry(name, "/dev/zero", BIG_SIZE, 0.0, 0)


# -- DEFLATE with data descriptors ------------------------------------------------------------------------


@pytest.mark.parametrize("signature, piece", [(True, 1000), (False, 1000), (True, 1 << 22)])
def test_deflate_entries_with_data_descriptors_are_streamed(tmp_path: Path, signature: bool, piece: int) -> None:
    # Past 1 MiB of output each, so inflation stops for room with input left over (and ends in mid-piece).
    files = {f"e/{i}.dcm": os.urandom(20_000) + bytes(1_300_000) + b"end" for i in range(3)}
    entries = [Entry(n, d, method=DEFLATED, descriptor=True, descriptor_signature=signature) for n, d in files.items()]
    archive = zips.build(entries)
    directory = archive.index(b"PK\x01\x02")
    dest = tmp_path / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    for part in chunked(archive[:directory], piece):
        extractor.feed(part)
    assert extractor.members == list(files)  # all of them before the central directory arrived
    assert not [name for name in os.listdir(tmp_path) if name != "dest"]  # nothing spooled
    extractor.feed(archive[directory:])
    assert extractor.finish() == list(files)
    assert files_in(dest) == files


def test_data_descriptor_that_disagrees_with_the_data_is_refused(tmp_path: Path) -> None:
    for lie in ({"size": 4999}, {"crc": 1234}):
        archive = zips.build([Entry("a", b"x" * 5000, method=DEFLATED, descriptor=True, **lie)])
        with pytest.raises(UnsafeArchiveError, match="disagrees|bad CRC"):
            extract_stream([archive], str(tmp_path / "dest"))
        assert not (tmp_path / "dest").exists()


def test_skipped_entry_with_a_data_descriptor_is_stepped_over(tmp_path: Path) -> None:
    archive = zips.build([Entry("skip/a", os.urandom(5000), method=DEFLATED, descriptor=True),
                          Entry("keep/b", b"b" * 100, method=DEFLATED, descriptor=True)])  # fmt: skip
    written = extract_stream([archive], str(tmp_path / "dest"), map_name=lambda n: None if "skip" in n else n)
    assert written == ["keep/b"]
    assert files_in(tmp_path / "dest") == {"keep/b": b"b" * 100}


def test_mount_serves_the_first_file_before_a_deflated_zip_has_arrived(server_factory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = data / "P1" / "S1" / "E1" / "scans" / "1" / "resources" / "DICOM"
    folder.mkdir(parents=True)
    content = {f"{i:03d}.dcm": os.urandom(100_000) for i in range(20)}
    for name, body in content.items():
        (folder / name).write_bytes(body)
    server = server_factory(data=data, extra_args=["--zip-compression", "6", "--ignore-compression-param"])
    mnt, cache = str(tmp_path / "mnt"), tmp_path / "cache"
    files = "/P1/S1/E1/scans/1/resources/DICOM/files"
    with mounted(server.url, mnt, str(cache), credentials_env(server), timeout=30):
        assert sorted(os.listdir(mnt + files)) == sorted(content)
        server.set_faults(throttle=200_000)  # the whole ZIP takes ~10 s
        first = subprocess.run(["cat", f"{mnt}{files}/000.dcm"], capture_output=True, timeout=30).stdout
        assert first == content["000.dcm"]
        # The first file was served while the ZIP was still arriving: it was not spooled whole first.
        assert list(cache.rglob("*.staging")), "the download should still be running"
        server.clear_faults()
        last = subprocess.run(["cat", f"{mnt}{files}/019.dcm"], capture_output=True, timeout=30).stdout
        assert last == content["019.dcm"]
    zips_sent = [r for r in server.requests() if "format=zip" in (r.get("query") or "")]
    assert len(zips_sent) == 1


# -- ZIP64 ------------------------------------------------------------------------------------------------


def test_stored_entry_over_4_gib_streams_through_the_extractor(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_bytes(b"after the big one")
    members = [ZipMember("E1/scans/1/resources/NIFTI/files/big.nii", zeros_entry("big.nii")),
               ZipMember("E1/scans/1/resources/NIFTI/files/small.txt", file_entry(small, "small.txt"))]  # fmt: skip
    crcs = {"/dev/zero": BIG_CRC, str(small): zlib.crc32(small.read_bytes())}
    stream = stream_zip(members, lambda entry: crcs[entry.abspath], level=0)
    dest = tmp_path / "dest"
    dest.mkdir()
    extractor = StreamingExtractor(str(dest))
    head = next(stream)
    # Java's layout: sizes 0xFFFFFFFF in the local header and a ZIP64 extra field with the real ones.
    _, _, _, _, _, _, _, compressed, size, name_length, extra_length = struct.unpack_from("<4sHHHHHIIIHH", head)
    assert (compressed, size, extra_length) == (0xFFFFFFFF, 0xFFFFFFFF, 20)
    assert struct.unpack_from("<HHQQ", head, 30 + name_length) == (1, 16, BIG_SIZE, BIG_SIZE)
    extractor.feed(head)
    tail = bytearray()
    for chunk in stream:
        extractor.feed(chunk)
        if len(chunk) < 1 << 20:
            tail += chunk
    assert extractor.finish() == [
        "E1/scans/1/resources/NIFTI/files/big.nii",
        "E1/scans/1/resources/NIFTI/files/small.txt",
    ]
    assert b"PK\x06\x06" in tail  # the second entry starts past 4 GiB: a ZIP64 end record
    out = dest / "E1/scans/1/resources/NIFTI/files"
    assert (out / "big.nii").stat().st_size == BIG_SIZE
    assert (out / "big.nii").stat().st_blocks * 512 < 1 << 20  # zeros written as a hole
    with open(out / "big.nii", "rb") as f:
        f.seek(BIG_SIZE - 4096)
        assert f.read() == bytes(4096)
    assert (out / "small.txt").read_bytes() == b"after the big one"


def test_deflate_entry_over_4_gib_has_a_64_bit_descriptor_and_streams(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_bytes(b"after the big one")
    members = [ZipMember("E1/files/big.nii", zeros_entry("big.nii")),
               ZipMember("E1/files/small.txt", file_entry(small, "small.txt"))]  # fmt: skip
    archive = b"".join(stream_zip(members, lambda entry: 0, level=1))  # zeros deflate ~1000:1: a few MB
    # Java's quirk, checked byte by byte: no ZIP64 extra in the local header, 64-bit sizes after the data.
    _, _, flags, method, _, _, _, _, _, name_length, extra_length = struct.unpack_from("<4sHHHHHIIIHH", archive)
    assert (flags & 0x8, method, extra_length) == (0x8, 8, 0)
    listing = zipfile.ZipFile(io.BytesIO(archive))
    info = listing.getinfo("E1/files/big.nii")
    assert (info.file_size, info.CRC) == (BIG_SIZE, BIG_CRC)
    descriptor = 30 + name_length + info.compress_size
    assert struct.unpack_from("<4sIQQ", archive, descriptor) == (b"PK\x07\x08", BIG_CRC, info.compress_size, BIG_SIZE)
    dest = tmp_path / "dest"
    dest.mkdir()
    # Zeros deflate ~1000:1, past the default bomb ratio (which refuses the entry, see test_extract).
    extractor = StreamingExtractor(str(dest), ExtractLimits(max_ratio=5000), spool_dir=str(tmp_path))
    for piece in chunked(archive[: listing.start_dir], 1 << 20):
        extractor.feed(piece)
    assert extractor.members == ["E1/files/big.nii", "E1/files/small.txt"]  # streamed, not spooled
    extractor.feed(archive[listing.start_dir :])
    assert extractor.finish() == ["E1/files/big.nii", "E1/files/small.txt"]
    assert (dest / "E1/files/big.nii").stat().st_size == BIG_SIZE
    assert (dest / "E1/files/small.txt").read_bytes() == b"after the big one"


def test_more_than_65535_entries_zip64_end_record(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_bytes(b"x")
    entry = file_entry(one, "one.txt")
    members = [ZipMember(f"E1/files/{i:06d}.txt", entry) for i in range(MANY)]
    archive = b"".join(stream_zip(members, lambda _entry: zlib.crc32(b"x"), level=0))
    end = archive[-22:]
    assert end[:4] == b"PK\x05\x06" and struct.unpack_from("<HH", end, 8) == (0xFFFF, 0xFFFF)
    assert archive[-22 - 20 - 56 : -22 - 20][:4] == b"PK\x06\x06"  # ZIP64 end record, then its locator
    assert len(zipfile.ZipFile(io.BytesIO(archive)).infolist()) == MANY
    # The real extractor: every entry parsed and counted, the directory (ZIP64) checked; two written.
    keep = {"E1/files/000000.txt", "E1/files/065535.txt"}
    written = extract_stream(
        chunked(archive, 1 << 16), str(tmp_path / "dest"), map_name=lambda n: n if n in keep else None
    )
    assert written == sorted(keep)


def test_download_of_more_than_65535_files_through_the_server(server_factory, fast_dir: Path) -> None:
    folder = fast_dir / "data" / "P1" / "S1" / "E1" / "scans" / "1" / "resources" / "MANY"
    folder.mkdir(parents=True)
    for i in range(MANY):
        (folder / f"{i:06d}.txt").write_bytes(b"%d" % i)
    server = server_factory(data=fast_dir / "data")
    dest = fast_dir / "dl"
    result = xnatfs("download", server.url, "P1", "E1", "--resource", "MANY", "--dest", str(dest),
                    env=credentials_env(server))  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = Path(result.stdout.strip()) / "scans" / "1" / "resources" / "MANY" / "files"
    names = sorted(os.listdir(out))
    assert len(names) == MANY
    for i in (0, 1, 65_534, 65_535):
        assert (out / f"{i:06d}.txt").read_bytes() == b"%d" % i


# -- many resources at once -------------------------------------------------------------------------------


def test_cp_r_of_an_experiment_downloads_its_resources_concurrently(server_factory, tmp_path: Path) -> None:
    session = tmp_path / "data" / "P1" / "S1" / "E1"
    content = {}
    for scan in range(1, 11):
        folder = session / "scans" / str(scan) / "resources" / "DICOM"
        folder.mkdir(parents=True)
        for name in ("a.dcm", "b.dcm"):
            content[f"scans/{scan}/resources/DICOM/files/{name}"] = os.urandom(50_000)
            (folder / name).write_bytes(content[f"scans/{scan}/resources/DICOM/files/{name}"])
    server = server_factory(data=tmp_path / "data")
    mnt, copy = str(tmp_path / "mnt"), tmp_path / "copy"
    with mounted(server.url, mnt, str(tmp_path / "cache"), credentials_env(server), timeout=30):
        server.set_faults(throttle=100_000)  # each resource's ZIP (~100 kB) takes ~1 s
        subprocess.run(["cp", "-r", f"{mnt}/P1/S1/E1", str(copy)], check=True, timeout=60)
        server.clear_faults()
    copied = {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert copied == content
    zips_sent = [r for r in server.requests() if "format=zip" in (r.get("query") or "")]
    assert len(zips_sent) == 10  # each resource once, whoever asked first
    # The server's log says when each ZIP was being sent: some must have been sent at the same time, and
    # not all ten at once (the reader's own plus parallel_downloads (4) reading ahead; the server may still
    # be sending a ZIP's last bytes when the client has what it needs and starts the next).
    spans = [(r["started"], r["finished"]) for r in zips_sent]
    in_flight = max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)
    assert 2 <= in_flight <= 7, f"{in_flight} ZIPs in flight at most: resources were not downloaded concurrently"
