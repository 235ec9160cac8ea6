"""Generate benchmark archives for the embedded server: one big scan and a wide tree of small files.

Usage: scripts/make-bench-archive DIR [--big-mb 200] [--big-files 399] [--tree-files 10000]

Project BENCH holds one session whose scan 1 has --big-mb MiB in --big-files files (random 12-bit values in
16-bit words, like CT pixel data: DEFLATE shrinks them to ~87 %, no file system shrinks them). Project
TREE spreads --tree-files small files over 10 subjects x 2 sessions x 5 scans, so walking a mount of it
visits hundreds of folders.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from .archive import write_json

MIB = 1024 * 1024
TREE_SUBJECTS, TREE_SESSIONS, TREE_SCANS = 10, 2, 5
SMALL_FILE_BYTES = 512


def make_bench_archive(root: str | Path, big_mb: int = 200, tree_files: int = 10000, big_files: int = 399) -> Path:
    """Write the benchmark archive into `root` (created if needed); returns it.

    The big scan is BENCH/BIG_01/BIG_01_MR1/scans/1/resources/DICOM; the tree is project TREE.
    """
    root = Path(root)
    rng = np.random.default_rng(20240101)
    if big_mb > 0:
        session = root / "BENCH" / "BIG_01" / "BIG_01_MR1"
        scan = session / "scans" / "1"
        files = scan / "resources" / "DICOM"
        files.mkdir(parents=True, exist_ok=True)
        write_json(session / "experiment.json", {"date": "2024-01-01", "xsiType": "xnat:mrSessionData"})
        write_json(scan / "scan.json", {"type": "BIG", "series_description": "BIG"})
        count = max(1, big_files)
        total = big_mb * MIB
        for number in range(1, count + 1):
            size = total // count + (1 if number <= total % count else 0)
            words = rng.integers(0, 4096, size=(size + 1) // 2, dtype=np.uint16)
            (files / f"{number:05d}.dcm").write_bytes(words.tobytes()[:size])
    if tree_files > 0:
        per_scan = math.ceil(tree_files / (TREE_SUBJECTS * TREE_SESSIONS * TREE_SCANS))
        for subject_number in range(1, TREE_SUBJECTS + 1):
            subject = f"TREE_{subject_number:02d}"
            for session_number in range(1, TREE_SESSIONS + 1):
                session = root / "TREE" / subject / f"{subject}_MR{session_number}"
                for scan_number in range(1, TREE_SCANS + 1):
                    files = session / "scans" / str(scan_number) / "resources" / "DICOM"
                    files.mkdir(parents=True, exist_ok=True)
                    for number in range(1, per_scan + 1):
                        (files / f"{number:05d}.dcm").write_bytes(rng.bytes(SMALL_FILE_BYTES))
    return root


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (scripts/make-bench-archive); returns the exit status."""
    parser = argparse.ArgumentParser(prog="make-bench-archive", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="data folder to create or add to")
    parser.add_argument("--big-mb", type=int, default=200, help="size of the big scan in MiB (default 200)")
    parser.add_argument("--big-files", type=int, default=399, help="number of files of the big scan (default 399)")
    parser.add_argument("--tree-files", type=int, default=10000, help="number of small files (default 10000)")
    args = parser.parse_args(argv)
    root = make_bench_archive(args.directory, args.big_mb, args.tree_files, args.big_files)
    print(f"benchmark archive written to {root}; serve it with: xnatfs serve --data {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
