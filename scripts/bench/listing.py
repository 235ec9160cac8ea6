"""Listing benchmark: ``find -ls`` over a mount of the benchmark tree, and the same walk by xnatpy.

Usage: scripts/bench/run --listing [--tree-files 2000] [--latency 0,0.05] [--repeat 1]
   or: .venv/bin/python scripts/bench/listing.py [same options]

The tree is project TREE of ``scripts/make-bench-archive`` (10 subjects x 2 sessions x 5 scans,
--tree-files small files), served by ``xnatfs serve --test-hooks`` with each request delayed by the
latency fault. For every latency: a fresh mount on an empty cache (time, requests, rounds = time /
latency), a remount on the same cache and the same walk (requests, time), and xnatpy walking
``project.subjects[...].experiments[...].scans[...].resources[...].files`` (time, requests). Figures are
medians of --repeat runs; the machine is shared, so compare ratios and request counts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))

from mounting import credentials_env, mounted  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from xnatfs.server.bench import make_bench_archive  # noqa: E402


def listing_requests(server: ServerProcess) -> list[dict]:
    """Return the server's logged requests that list something (JSON listings)."""
    return [r for r in server.requests() if "format=json" in (r.get("query") or "")]


def find_walk(mountpoint: str) -> float:
    """Run ``find MOUNTPOINT -ls`` (output discarded); return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(["find", mountpoint, "-ls"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def mount_walk(server: ServerProcess, work: str, options: list[str]) -> dict[str, float]:
    """Mount on a fresh cache, walk, unmount, remount on the same cache, walk again; return figures."""
    cache = tempfile.mkdtemp(prefix="cache-", dir=work)
    mnt = os.path.join(work, "mnt")
    env = credentials_env(server)
    figures: dict[str, float] = {}
    server.clear_requests()
    with mounted(server.url, mnt, cache, env, "--ttl", "600", *options, timeout=30):
        figures["walk"] = find_walk(mnt)
    figures["requests"] = len(server.requests())
    figures["listings"] = len(listing_requests(server))
    server.clear_requests()
    with mounted(server.url, mnt, cache, env, "--ttl", "600", *options, timeout=30):
        figures["rewalk"] = find_walk(mnt)
    figures["rerequests"] = len(server.requests())
    shutil.rmtree(cache, ignore_errors=True)
    return figures


def xnatpy_walk(server: ServerProcess) -> dict[str, float]:
    """Walk every file listing of project TREE with xnatpy; return time (after connecting) and requests."""
    import xnat

    with xnat.connect(server.url, user=server.user, password=server.password) as session:
        server.clear_requests()
        start = time.perf_counter()
        count = 0
        project = session.projects["TREE"]
        for subject in project.subjects.values():
            for experiment in subject.experiments.values():
                for scan in experiment.scans.values():
                    for resource in scan.resources.values():
                        count += len(resource.files)
        elapsed = time.perf_counter() - start
        requests = len(server.requests())
    return {"walk": elapsed, "requests": requests, "files": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree-files", type=int, default=2000)
    parser.add_argument("--latency", default="0,0.05", help="comma-separated server latencies in seconds")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-xnatpy", action="store_true", help="skip the xnatpy walk")
    parser.add_argument("--mount-option", action="append", default=[], help="extra option for xnatfs mount")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="xnatfs-bench-listing-")
    try:
        data = make_bench_archive(os.path.join(work, "data"), big_mb=0, tree_files=args.tree_files)
        with ServerProcess(data=data) as server:
            rows = []
            for latency in (float(x) for x in args.latency.split(",")):
                server.clear_faults()
                if latency:
                    server.set_faults(latency=latency)
                runs = [mount_walk(server, work, args.mount_option) for _ in range(args.repeat)]
                fig = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                xp = None
                if not args.no_xnatpy:
                    xruns = [xnatpy_walk(server) for _ in range(args.repeat)]
                    xp = {k: statistics.median(r[k] for r in xruns) for k in xruns[0]}
                rows.append((latency, fig, xp))
                server.clear_faults()
        print(f"find -ls over {args.tree_files} files (20 experiments, 100 scans), medians of {args.repeat}:")
        print(
            "| latency | fresh: time | requests (listings) | rounds | remount: time | requests "
            "| xnatpy: time | requests |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for latency, fig, xp in rows:
            rounds = f"{fig['walk'] / latency:.0f}" if latency else "-"
            xcols = f"{xp['walk']:.2f} s | {xp['requests']:.0f}" if xp else "- | -"
            print(
                f"| {latency * 1000:.0f} ms | {fig['walk']:.2f} s | {fig['requests']:.0f} ({fig['listings']:.0f}) "
                f"| {rounds} | {fig['rewalk']:.2f} s | {fig['rerequests']:.0f} | {xcols} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
