"""Time one series retrieve through DicomTransport vs dcmtk's getscu, against the same real PACS.

Starts Orthanc and/or dcmqrscp on loopback (tests/pacs.py), stores a generated MR series, then
retrieves it ``--runs`` times each way into a fresh folder (a fresh cache for the transport) and
prints the median of each and their ratio. Usage::

    .venv/bin/python scripts/bench/dicom_retrieve.py [--pacs orthanc dcmqrscp] [--count 50] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from pacs import Pacs, available, dcmqrscp, make_series, orthanc  # noqa: E402

from xnatfs.transports.dicom import DicomTransport  # noqa: E402

SERVERS = {"orthanc": orthanc, "dcmqrscp": dcmqrscp}


def time_transport(pacs: Pacs, series_dir: str, workdir: str, run: int) -> float:
    """Return the seconds one fresh transport (fresh cache) takes to fetch every instance of a series.

    The listing is made before the clock starts: only the retrieve is timed.
    """
    transport = DicomTransport(
        netloc=f"{pacs.aet}@{pacs.host}:{pacs.port}", opts={"cache_dir": os.path.join(workdir, f"cache-{run}")}
    )
    paths = [f"{series_dir}/{e.name}" for e in transport.listdir(series_dir)]
    start = time.perf_counter()
    for path in paths:
        transport.fetch(path)
    elapsed = time.perf_counter() - start
    assert transport.retrieve_count == 1
    return elapsed


def time_getscu(pacs: Pacs, study_uid: str, series_uid: str, workdir: str, run: int, count: int) -> float:
    """Return the seconds ``getscu`` takes to retrieve the series into a fresh folder."""
    out = os.path.join(workdir, f"getscu-{run}")
    os.makedirs(out)
    command = ["getscu", "-S", "-aet", "XNATFS", "-aec", pacs.aet, "-od", out]
    command += ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}"]
    command += ["-k", f"SeriesInstanceUID={series_uid}", pacs.host, str(pacs.port)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert len(os.listdir(out)) == count, "getscu did not receive the whole series"
    return elapsed


def bench(kind: str, count: int, size: int, runs: int) -> None:
    """Run the comparison against PACS ``kind`` and print the result."""
    datasets = make_series(count=count, size=size)
    with tempfile.TemporaryDirectory(prefix="xnatfs-bench-") as workdir, SERVERS[kind]() as pacs:
        loader = DicomTransport(
            netloc=f"{pacs.aet}@{pacs.host}:{pacs.port}", opts={"cache_dir": os.path.join(workdir, "load")}
        )
        for ds in datasets:
            loader.store(ds)
        ((series_dir, _dirs, _files),) = [w for w in loader.walk("/") if w[2]]
        ours = [time_transport(pacs, series_dir, workdir, run) for run in range(runs)]
        theirs = [
            time_getscu(pacs, datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, workdir, run, count)
            for run in range(runs)
        ]
    mb = sum(len(ds.PixelData) for ds in datasets) / 1e6
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    print(
        f"{kind}: series of {count} instances {size}x{size} ({mb:.1f} MB pixel data), median of {runs}: "
        f"transport {ours_median:.3f} s, getscu {theirs_median:.3f} s, "
        f"ratio transport/getscu {ours_median / theirs_median:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pacs", nargs="+", choices=sorted(SERVERS), default=sorted(SERVERS, reverse=True))
    parser.add_argument("--count", type=int, default=50, help="instances in the series")
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for kind in args.pacs:
        if not available(kind):
            print(f"{kind}: not installed, skipped")
            continue
        bench(kind, args.count, args.size, args.runs)


if __name__ == "__main__":
    main()
