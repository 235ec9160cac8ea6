"""Our ZIP stream parser (xnatfs.extract) vs uktrade's stream-unzip, on the bytes `xnatfs serve` sends.

Usage: .venv/bin/pip install stream-unzip && .venv/bin/python scripts/bench/stream_unzip_eval.py [--repeat 5]

Both get the same ZIP (399 files, 210 MB of 12-bit pixel-like data; STORED, then DEFLATE with data
descriptors) in the same 256 KiB pieces, and write every member the same safe way (name check, O_EXCL
temporary file, link to the final name) into tmpfs, so the figures are parsing, checking and copying only.
Contenders run in turn; medians. Kept to re-check the verdict of issue 11 (stream-unzip not adopted).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import zlib

import numpy as np

import xnatfs.extract as extract
from xnatfs.extract import writer
from xnatfs.server.archive import FileEntry
from xnatfs.server.zipstream import ZipMember, stream_zip

PIECE = 256 << 10


def make_members(folder: str) -> list[ZipMember]:
    rng = np.random.default_rng(1)
    members = []
    for i in range(399):
        path = os.path.join(folder, f"{i:05d}.dcm")
        with open(path, "wb") as f:
            f.write(rng.integers(0, 4096, size=262_830, dtype=np.uint16).tobytes())
        info = os.stat(path)
        entry = FileEntry(f"{i:05d}.dcm", path, info.st_size, info.st_mtime, info.st_mtime_ns)
        members.append(ZipMember(f"E1/scans/1-BIG/resources/DICOM/files/{i:05d}.dcm", entry))
    return members


def crc_of(entry: FileEntry) -> int:
    with open(entry.abspath, "rb") as f:
        return zlib.crc32(f.read())


def ours(pieces: list[bytes], dest: str) -> None:
    extractor = extract.StreamingExtractor(dest)
    for piece in pieces:
        extractor.feed(piece)
    extractor.finish()


def ours_plain_zlib(pieces: list[bytes], dest: str) -> None:
    fast, writer.zlib = writer.zlib, zlib
    try:
        ours(pieces, dest)
    finally:
        writer.zlib = fast


def theirs(pieces: list[bytes], dest: str, chunk_size: int) -> None:
    from stream_unzip import stream_unzip

    prefix = secrets.token_hex(4)
    for number, (name, _size, body) in enumerate(stream_unzip(pieces, chunk_size=chunk_size)):
        relpath = extract.check_member_name(name.decode())
        parent, _, base = relpath.rpartition("/")
        os.makedirs(os.path.join(dest, parent), exist_ok=True)
        dir_fd = os.open(os.path.join(dest, parent), os.O_RDONLY | os.O_DIRECTORY)
        temp = f".{prefix}-{number}.part"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        for chunk in body:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.close(fd)
        os.link(temp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.unlink(temp, dir_fd=dir_fd)
        os.close(dir_fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="xnatfs-unzip-eval-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        source = os.path.join(root, "src")
        os.makedirs(source)
        members = make_members(source)
        megabytes = sum(m.entry.size for m in members) / 1e6
        contenders = {
            "xnatfs.extract": ours,
            "xnatfs.extract, plain zlib": ours_plain_zlib,
            "stream-unzip, chunk 64 KiB": lambda p, d: theirs(p, d, 64 << 10),
            "stream-unzip, chunk 1 MiB": lambda p, d: theirs(p, d, 1 << 20),
        }
        print("| ZIP | parser | median | MB/s | time / ours |\n|---|---|---|---|---|")
        for level, label in ((0, "STORED"), (1, "DEFLATE + descriptors")):
            data = b"".join(stream_zip(members, crc_of, level))
            pieces = [data[i : i + PIECE] for i in range(0, len(data), PIECE)]
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for round_number in range(args.repeat):
                for name, run in contenders.items():
                    dest = os.path.join(root, f"out-{round_number}-{len(times[name])}-{name[:6]}")
                    os.makedirs(dest)
                    start = time.perf_counter()
                    run(pieces, dest)
                    times[name].append(time.perf_counter() - start)
                    shutil.rmtree(dest)
            base = statistics.median(times["xnatfs.extract"])
            for name, values in times.items():
                median = statistics.median(values)
                print(f"| {label} | {name} | {median:.3f} s | {megabytes / median:.0f} | {median / base:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
