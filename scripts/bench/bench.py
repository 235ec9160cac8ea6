"""xnatfs benchmarks: side by side in one run, against one embedded server; prints a table of ratios.

Usage: scripts/bench/run [--big-mb 200] [--tree-files 10000] [--huge-mb 1024] [--repeat 3]

Every figure is the median of ``--repeat`` runs. The machine is shared: read ratios, not times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))

from mounting import credentials_env, daemon_pids, force_unmount, mounted  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from xnatfs.cache import Cache  # noqa: E402
from xnatfs.extract import StreamingExtractor  # noqa: E402
from xnatfs.session import XnatSession  # noqa: E402
from xnatfs.transports.xnat import XnatTransport  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, goal: str = "") -> None:
    ROWS.append((name, value, goal))
    print(f"  {name}: {value}  {goal}", flush=True)


def median_time(fn, repeat: int, setup=None) -> float:
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_ratio(slow, fast, rounds: int, setup=None) -> float:
    """Median time of ``fast`` over median time of ``slow``, the two run alternately.

    Alternating keeps a burst of load from another tenant of the machine from landing on one side only.
    """
    slow_times, fast_times = [], []
    for _ in range(rounds):
        for fn, times in ((slow, slow_times), (fast, fast_times)):
            if setup:
                setup()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(fast_times) / statistics.median(slow_times)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_tree(root: str) -> int:
    total = 0
    for folder, _dirs, names in os.walk(root):
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                while block := f.read(1 << 20):
                    total += len(block)
    return total


class PeakRss:
    """Samples VmRSS of a process every 20 ms; ``peak`` in MB."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def find_big_resource(transport: XnatTransport) -> tuple[str, list[str], int]:
    """Return (files folder path, file names, total bytes) of the largest scan resource."""
    best = ("", [], 0)
    for root, _dirs, files in transport.walk("/"):
        if root.endswith("/files") and "/scans/" in root and files:
            total = sum(transport.stat(f"{root}/{n}").size or 0 for n in files)
            if total > best[2]:
                best = (root, sorted(files), total)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--tree-files", type=int, default=10000)
    parser.add_argument("--huge-mb", type=int, default=1024, help="size of the ZIP for the RSS figure (0: skip)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="xnatfs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    data = os.path.join(work, "data")
    print(f"generating the benchmark archive in {data} ...", flush=True)
    subprocess.run([os.path.join(REPO, "scripts", "make-bench-archive"), data, "--big-mb", str(args.big_mb),
                    "--tree-files", str(args.tree_files)], check=True)  # fmt: skip
    server = ServerProcess(data=data)
    try:
        run_all(server, work, args)
        if args.huge_mb:
            huge_rss(work, args)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("\n| benchmark | figure | goal |\n|---|---|---|")
    for name, value, goal in ROWS:
        print(f"| {name} | {value} | {goal} |")
    return 0


def run_all(server: ServerProcess, work: str, args) -> None:
    env = credentials_env(server)
    opts = {"url": server.url, "user": server.user, "password": server.password}
    probe = XnatTransport(opts={**opts, "cache": Cache(os.path.join(work, "probe-cache"))})
    big_dir, big_files, big_bytes = find_big_resource(probe)
    resource = probe.stat(f"{big_dir}/{big_files[0]}").ref.resource
    probe.close()
    zip_url = f"{server.url}{resource.api_path}/files?format=zip"
    mb = big_bytes / 1e6
    print(f"big resource: {big_dir} ({len(big_files)} files, {mb:.0f} MB)", flush=True)

    # 1. curl + unzip of the ZIP vs download+extract (library) vs cold read through the mount.
    unzip_dir = os.path.join(work, "unzip")

    def curl_unzip() -> None:
        shutil.rmtree(unzip_dir, ignore_errors=True)
        os.makedirs(unzip_dir)
        zip_path = os.path.join(work, "big.zip")
        subprocess.run(["curl", "-sf", "-u", f"{server.user}:{server.password}", "-o", zip_path, zip_url], check=True)
        subprocess.run(["unzip", "-q", "-o", zip_path, "-d", unzip_dir], check=True)
        os.remove(zip_path)

    t_curl = median_time(curl_unzip, args.repeat)

    first_member: list[float] = []

    def library() -> None:
        dest = os.path.join(work, "lib")
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        start = time.perf_counter()
        seen = []

        def on_member(_name: str) -> None:
            if not seen:
                seen.append(time.perf_counter() - start)

        session = XnatSession(server.url, server.user, server.password)
        extractor = StreamingExtractor(dest, on_member=on_member)
        with session.stream(f"{resource.api_path}/files", format="zip") as chunks:
            for chunk in chunks:
                extractor.feed(chunk)
        extractor.finish()
        session.close()
        first_member.append(seen[0])

    t_lib = median_time(library, args.repeat)
    t_lib_first = statistics.median(first_member)
    row(
        "download+extract vs curl+unzip (library, time ratio)",
        f"{t_lib / t_curl:.2f}  ({mb / t_lib:.0f} vs {mb / t_curl:.0f} MB/s)",
        "<= 1.0",
    )  # noqa: E501
    row("first member available / whole download (library)", f"{t_lib_first / t_lib:.3f}", "<= 0.1")

    # 2. Through the mount.
    mnt = os.path.join(work, "mnt")
    cold_times, first_byte_times, peaks = [], [], []
    for i in range(args.repeat):
        cache_dir = os.path.join(work, f"cache-{i}")
        with mounted(server.url, mnt, cache_dir, env, timeout=60):
            (pid,) = daemon_pids(mnt)
            folder = mnt + big_dir
            os.listdir(folder)  # a user lists before reading: listings are not content
            with PeakRss(pid) as rss:
                start = time.perf_counter()
                with open(os.path.join(folder, big_files[0]), "rb") as f:
                    f.read(1)
                first_byte_times.append(time.perf_counter() - start)
                read_tree(folder)
                cold_times.append(time.perf_counter() - start)
            peaks.append(rss.peak)
        if i < args.repeat - 1:
            shutil.rmtree(cache_dir, ignore_errors=True)
    t_cold = statistics.median(cold_times)
    row(
        "cold read through the mount vs curl+unzip (time ratio)",
        f"{t_cold / t_curl:.2f}  ({mb / t_cold:.0f} vs {mb / t_curl:.0f} MB/s)",
        "<= 1.0",
    )  # noqa: E501
    row(
        "first byte of first file / whole cold read (mount)",
        f"{statistics.median(first_byte_times) / t_cold:.3f}",
        "<= 0.1",
    )
    row("daemon peak RSS during the cold read", f"{max(peaks):.0f} MB", "")

    # 3. Repeat reads and cold-kernel-cache reads vs the cache files read directly.
    cache_dir = os.path.join(work, f"cache-{args.repeat - 1}")
    cached = [os.path.join(r, n) for r, _d, names in os.walk(os.path.join(cache_dir, "v1")) for n in names
              if not n.endswith((".json", ".lock"))]  # fmt: skip
    cache_root = os.path.commonpath(cached)
    with mounted(server.url, mnt, cache_dir, env, timeout=60):
        folder = mnt + big_dir
        read_tree(folder)  # warm
        # A warm pass takes a fraction of a second, so take many rounds.
        warm = interleaved_ratio(lambda: read_tree(folder), lambda: read_tree(cache_root), max(15, 5 * args.repeat))
        row("repeat read: mount throughput / direct cache read", f"{warm:.2f}", ">= 0.9")
        if drop_caches():
            cold = interleaved_ratio(
                lambda: read_tree(folder), lambda: read_tree(cache_root), max(3, args.repeat), setup=drop_caches
            )
            row("cached file, cold kernel caches: mount / direct", f"{cold:.2f}", ">= 0.5")
        else:
            row("cached file, cold kernel caches: mount / direct", "not measured (cannot drop caches)", ">= 0.5")

    # 4. find -ls over the big tree.
    with mounted(server.url, mnt, os.path.join(work, "cache-find"), env, "--ttl", "600", timeout=60):
        server.clear_requests()
        start = time.perf_counter()
        subprocess.run(["find", mnt, "-ls"], check=True, stdout=subprocess.DEVNULL)
        t_find = time.perf_counter() - start
        requests_first = len(server.requests())
        dirs = sum(1 for _ in os.walk(mnt))
        entries = sum(len(d) + len(f) for _r, d, f in os.walk(mnt))
        server.clear_requests()
        start = time.perf_counter()
        subprocess.run(["find", mnt, "-ls"], check=True, stdout=subprocess.DEVNULL)
        t_find2 = time.perf_counter() - start
        requests_second = len(server.requests())
    row(
        f"find -ls over {entries} entries: requests / directories",
        f"{requests_first} / {dirs} ({t_find:.1f} s)",
        "requests <= directories",
    )  # noqa: E501
    row("find -ls again within the TTL: requests", f"{requests_second} ({t_find2:.2f} s)", "0")
    force_unmount(mnt)
    xattr_cost(server, work, args)


def xattr_cost(server: ServerProcess, work: str, args) -> None:
    """Warm ls -lR over the tree: extended attributes on (the default) vs --no-xattrs. ls -l asks every file
    for security.selinux, one FUSE round trip each unless the mount says it has no xattrs at all."""
    env = credentials_env(server)
    with_x, without_x = os.path.join(work, "mnt-xattrs"), os.path.join(work, "mnt-noxattrs")
    cache = os.path.join(work, "cache-xattrs")
    with mounted(server.url, with_x, cache, env, "--ttl", "600", timeout=60):
        with mounted(server.url, without_x, cache, env, "--ttl", "600", "--no-xattrs", timeout=60):

            def ls(root: str):
                return lambda: subprocess.run(["ls", "-lR", root], check=True, stdout=subprocess.DEVNULL)

            ls(with_x)()
            ls(without_x)()  # listings and kernel attributes warm on both sides
            ratio = interleaved_ratio(ls(without_x), ls(with_x), max(5, 2 * args.repeat))
    row("warm ls -lR: xattrs on / --no-xattrs (time ratio)", f"{ratio:.2f}", "informative")


def huge_rss(work: str, args) -> None:
    """Peak RSS of download+extract of a >= 1 GB ZIP (library), in a separate server and archive."""
    data = os.path.join(work, "huge")
    subprocess.run([os.path.join(REPO, "scripts", "make-bench-archive"), data, "--big-mb", str(args.huge_mb),
                    "--tree-files", "0"], check=True)  # fmt: skip
    server = ServerProcess(data=data)
    try:
        code = (
            "import sys\n"
            "from xnatfs.cache import Cache\n"
            "from xnatfs.transports.xnat import XnatTransport\n"
            "t = XnatTransport(opts={'url': sys.argv[1], 'user': sys.argv[2], 'password': sys.argv[3],"
            " 'cache': Cache(sys.argv[4]), 'timeout': 60})\n"
            "for root, dirs, files in t.walk('/'):\n"
            "    if root.endswith('/files') and '/scans/' in root and files:\n"
            "        for name in sorted(files):\n"
            "            t.fetch(root + '/' + name)\n"
            "        break\n"
        )
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, server.url, server.user, server.password,
                                 os.path.join(work, "huge-cache")])  # fmt: skip
        with PeakRss(proc.pid) as rss:
            proc.wait()
        elapsed = time.perf_counter() - start
        row(
            f"peak RSS, download+extract of a {args.huge_mb} MB ZIP", f"{rss.peak:.0f} MB ({elapsed:.1f} s)", "< 100 MB"
        )
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
