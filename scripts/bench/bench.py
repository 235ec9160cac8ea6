"""xnatfs benchmarks: side by side in one run, against embedded servers; prints a table of ratios.

Usage: scripts/bench/run [--big-mb 200] [--big-files 399] [--tree-files 10000] [--huge-mb 1024] [--repeat 3]
                         [--only cold,warm,find,rss,experiment] [--profile DIR] [--link-mbit 1000]

Every figure is the median of ``--repeat`` runs, the contenders run alternately (round-robin) so a burst of load
from another tenant of the machine lands on all of them. The machine is shared: read ratios, not times. Two servers
serve the same archive: one as XNAT by default (STORED entries, sizes in the local headers) and one that sends
DEFLATE with data descriptors whatever the client asks (its figures are quoted separately: the cost there is
inflation). The STORED cold reads run again with the server paced to ``--link-mbit`` (default 1000: a cluster's
link), where the network, not the machine's memory and cores, sets the pace. ``--profile DIR`` samples the daemon
during three extra cold reads with py-spy and writes ``DIR/daemon.txt`` (py-spy's collapsed stacks, every thread)
and prints the top entries.
"""

from __future__ import annotations

import argparse
import glob
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

from folios import large_folio_share  # noqa: E402
from mounting import credentials_env, daemon_pids, force_unmount, mounted  # noqa: E402
from server_process import ServerProcess  # noqa: E402

from xnatfs.cache import Cache  # noqa: E402
from xnatfs.transports.xnat import XnatTransport  # noqa: E402

ROWS: list[tuple[str, str, str]] = []
DEFLATE_ARGS = ["--zip-compression", "1", "--ignore-compression-param"]


def row(name: str, value: str, goal: str = "") -> None:
    ROWS.append((name, value, goal))
    print(f"  {name}: {value}  {goal}", flush=True)


def interleaved(contenders: dict, rounds: int, settle=None) -> dict[str, list[float]]:
    """Run every contender once per round, in turn; return their times (seconds) by name.

    A contender is a callable returning None (its time is measured here) or a dict of named times of its
    own (e.g. the time to a first byte), which are recorded as ``name:key``. ``settle`` runs untimed
    before each contender.
    """
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn in contenders.items():
            if settle:
                settle()
            start = time.perf_counter()
            extra = fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
            for key, value in (extra or {}).items():
                times.setdefault(f"{name}:{key}", []).append(value)
    return times


def med(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name])


def spread(times: dict[str, list[float]], name: str) -> str:
    values = times[name]
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def interleaved_ratio(slow, fast, rounds: int, setup=None) -> float:
    """Median time of ``fast`` over median time of ``slow``, the two run alternately."""
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


def cat_all(folder: str, names: list[str]) -> None:
    """``cat`` every file of ``folder`` to /dev/null, as a user would."""
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *names], cwd=folder, stdout=null, check=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def make_archive(folder: str, big_mb: int, big_files: int, tree_files: int) -> None:
    subprocess.run([os.path.join(REPO, "scripts", "make-bench-archive"), folder, "--big-mb", str(big_mb),
                    "--big-files", str(big_files), "--tree-files", str(tree_files)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--big-files", type=int, default=399)
    parser.add_argument("--tree-files", type=int, default=10000)
    parser.add_argument("--huge-mb", type=int, default=1024, help="size of the resource for the RSS figure (0: skip)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="cold,warm,find,rss,experiment", help="which parts to run (comma-separated)")
    parser.add_argument("--profile", metavar="DIR", help="sample the daemon with py-spy during extra cold reads")
    parser.add_argument("--link-mbit", type=lambda text: max(int(text), 0), default=1000,
                        help="also run the STORED cold reads with the server sending at most this many Mbit/s, as "
                             "over a cluster's link (0: skip)")  # fmt: skip
    args = parser.parse_args()
    parts = set(args.only.split(","))

    work = tempfile.mkdtemp(prefix="xnatfs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    data = os.path.join(work, "data")
    print(f"generating the benchmark archive in {data} ...", flush=True)
    tree_files = args.tree_files if parts & {"find", "experiment"} else 0
    make_archive(data, args.big_mb, args.big_files, tree_files)
    server = ServerProcess(data=data, test_hooks=True)
    deflating = ServerProcess(data=data, test_hooks=False, extra_args=DEFLATE_ARGS)
    try:
        target = Target(server, work)
        if "cold" in parts:
            cold_reads(target, "STORED", work, args, page_cache=True)
            cold_reads(Target(deflating, work), "DEFLATE", work, args)
            if args.link_mbit:
                # The server's own pacing (test hooks): bodies go out no faster than the link.
                server.set_faults(throttle=args.link_mbit * 1_000_000 // 8)
                try:
                    cold_reads(target, f"STORED@{args.link_mbit}Mbit", work, args)
                finally:
                    server.clear_faults()
        if args.profile:
            profile_daemon(target, work, args.profile)
        if "warm" in parts:
            warm_reads(target, work, args)
        if "find" in parts:
            find_ls(server, work, args)
        if "experiment" in parts and tree_files:
            experiment_copy(server, work, args)
        if "rss" in parts and args.huge_mb:
            huge_rss(work, args)
    finally:
        server.stop()
        deflating.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("\n| benchmark | figure | goal |\n|---|---|---|")
    for name, value, goal in ROWS:
        print(f"| {name} | {value} | {goal} |")
    return 0


class Target:
    """The big resource of a server: where it shows in a mount, its ZIP URL, its xnatpy path."""

    def __init__(self, server: ServerProcess, work: str) -> None:
        self.server = server
        self.env = credentials_env(server)
        opts = {"url": server.url, "user": server.user, "password": server.password}
        probe = XnatTransport(opts={**opts, "cache": Cache(os.path.join(work, "probe-cache"))})
        self.folder, self.files, self.bytes = find_big_resource(probe)
        self.resource = probe.stat(f"{self.folder}/{self.files[0]}").ref.resource
        probe.close()
        self.zip_url = f"{server.url}{self.resource.api_path}/files?format=zip"
        self.mb = self.bytes / 1e6


def cold_reads(target: Target, kind: str, work: str, args, page_cache: bool = False) -> None:
    """curl -o, cold cat through a fresh mount, xnatfs download, xnatpy download_dir: one after the other.
    With ``page_cache``, also the time to write as many bytes to a new file (no network)."""
    server = target.server
    print(f"[{kind}] big resource: {target.folder} ({len(target.files)} files, {target.mb:.0f} MB)", flush=True)
    mnt = os.path.join(work, "mnt")
    zip_path = os.path.join(work, f"big-{kind}.zip")
    counter = iter(range(10**6))

    # Nothing is deleted until the end: ext4 skips recently freed inodes when it allocates new ones, which
    # makes creating files after a mass delete several times slower (in every contender's next round).
    def curl() -> None:
        path = f"{zip_path}.{next(counter)}"
        subprocess.run(["curl", "-sf", "-u", f"{server.user}:{server.password}", "-o", path, target.zip_url],
                       check=True)  # fmt: skip

    def mount_cold() -> dict[str, float]:
        cache_dir = os.path.join(work, f"cache-{kind}-{next(counter)}")
        with mounted(server.url, mnt, cache_dir, target.env, timeout=60):
            (pid,) = daemon_pids(mnt)
            folder = mnt + target.folder
            os.listdir(folder)  # a user lists before reading: listings are not content
            cpu = cpu_seconds(pid)
            start = time.perf_counter()
            with open(os.path.join(folder, target.files[0]), "rb") as f:
                f.read(1)
            first = time.perf_counter() - start
            cat_all(folder, target.files)
            whole = time.perf_counter() - start
            cpu = cpu_seconds(pid) - cpu
        return {"first": first, "whole": whole, "cpu": cpu}

    def xnatfs_download() -> None:
        dest = os.path.join(work, f"dl-{kind}-{next(counter)}")
        parts = target.folder.strip("/").split("/")
        subprocess.run([sys.executable, "-m", "xnatfs", "download", server.url, parts[0], parts[2], "--resource",
                        target.resource.label, "--dest", dest], check=True, env=target.env,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    def xnatpy() -> dict[str, float]:
        import xnat

        dest = os.path.join(work, f"xnatpy-{kind}-{next(counter)}")
        os.makedirs(dest)
        parts = target.folder.strip("/").split("/")
        with xnat.connect(server.url, user=server.user, password=server.password, loglevel="ERROR") as session:
            experiment = session.projects[parts[0]].subjects[parts[1]].experiments[parts[2]]
            resource = experiment.scans[target.resource.scan_id].resources[target.resource.label]
            start = time.perf_counter()
            resource.download_dir(dest, verbose=False)
            took = time.perf_counter() - start
        return {"download_dir": took}

    def write_new_file() -> None:
        """Write as many bytes to a new file, 1 MiB at a time: what filling the page cache costs here (on a
        VM whose host takes back freed memory, the same write takes 0.05 s one time and 0.5 s the next)."""
        piece = memoryview(os.urandom(1 << 20))
        # Kept to the end like the others' files: memory freed now would be handed, still warm, to the next.
        with open(os.path.join(work, f"bytes-{kind}-{next(counter)}"), "wb", buffering=0) as f:
            for _ in range(-(-target.bytes // len(piece))):
                f.write(piece)

    # Each contender starts with no dirty pages of the one before: else it pays for the other's writeback.
    contenders = {"curl": curl, "mount": mount_cold, "download": xnatfs_download, "xnatpy": xnatpy}
    if page_cache:
        contenders["page_cache"] = write_new_file
    times = interleaved(contenders, args.repeat, settle=os.sync)
    t_curl, t_cold = med(times, "curl"), med(times, "mount:whole")
    print(f"  [{kind}] times: curl -o {spread(times, 'curl')}; mount cold cat {spread(times, 'mount:whole')}; "
          f"xnatfs download {spread(times, 'download')}; xnatpy download_dir {spread(times, 'xnatpy:download_dir')}",
          flush=True)  # fmt: skip
    if "page_cache" in times:
        # The mount fills two page caches (its cache files', the mount's own), curl and downloads one.
        print(f"  [{kind}] writing {target.mb:.0f} MB to a new file (no network): {spread(times, 'page_cache')}",
              flush=True)  # fmt: skip
    row(
        f"[{kind}] cold cat of {len(target.files)} files via a fresh mount / curl -o of the ZIP",
        f"{t_cold / t_curl:.2f}  ({target.mb / t_cold:.0f} vs {target.mb / t_curl:.0f} MB/s)",
        "<= 1.5",
    )
    row(
        f"[{kind}] xnatpy download_dir / mount cold read",
        f"{med(times, 'xnatpy:download_dir') / t_cold:.2f}",
        ">= 2",
    )
    row(f"[{kind}] xnatfs download / curl -o", f"{med(times, 'download') / t_curl:.2f}", "<= 1.3")
    # CPU time does not depend on what the other tenants of the machine do: compare it across versions.
    row(f"[{kind}] daemon CPU for the cold cat (s, user+system)", f"{med(times, 'mount:cpu'):.2f}", "")
    row(
        f"[{kind}] first byte of the first file / whole cold read",
        f"{med(times, 'mount:first') / t_cold:.3f}",
        "<= 0.05",
    )


def profile_daemon(target: Target, work: str, out_dir: str) -> None:
    """Cold reads with the mount's daemon sampled by py-spy (every thread, native code included).

    Writes ``DIR/daemon.txt`` (collapsed stacks) and prints the top functions by own and by total samples.
    """
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(os.path.abspath(out_dir), "daemon.txt")
    mnt = os.path.join(work, "mnt-profile")
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    for i in range(3):  # three cold reads (fresh caches) in one recording: enough samples to rank
        cache_dir = os.path.join(work, f"cache-profile-{i}")
        with mounted(target.server.url, mnt, cache_dir, target.env, timeout=60):
            (pid,) = daemon_pids(mnt)
            folder = mnt + target.folder
            os.listdir(folder)
            part = f"{out}.{i}"
            spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw",
                                    "--output", part, "--threads"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
            cat_all(folder, target.files)
            spy.send_signal(2)
            spy.wait(30)
        shutil.rmtree(cache_dir, ignore_errors=True)
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    with open(out, "w") as merged:
        for i in range(3):
            with open(f"{out}.{i}") as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    merged.write(line)
                    frames = [_frame(f) for f in stack.split(";")[1:]]  # the first frame names the thread
                    if not frames or frames[-1].startswith(_WAITING):
                        continue
                    own[frames[-1]] = own.get(frames[-1], 0) + int(count)
                    for frame in set(frames):
                        total[frame] = total.get(frame, 0) + int(count)
            os.remove(f"{out}.{i}")
    busy = sum(own.values())
    print(f"  py-spy: {busy} busy samples (1 kHz, all threads); top by own samples:")
    for name, count in sorted(own.items(), key=lambda item: -item[1])[:20]:
        print(f"    {100 * count / busy:5.1f} %  {name}")
    print("  top by total samples (a frame on the stack):")
    for name, count in sorted(total.items(), key=lambda item: -item[1])[:25]:
        print(f"    {100 * count / busy:5.1f} %  {name}")


# Leaf frames of threads that wait in C (py-spy cannot tell them from busy ones): libfuse's loop in the main
# thread, queue and selector waits of the daemon's helper threads.
_WAITING = ("idle", "wait", "select", "FUSE.__init__", "KernelInvalidator._work", "ListingCache._work",
            "_PollLikeSelector.select", "Condition.wait", "Event.wait")  # fmt: skip


def _frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({os.path.basename(where.rstrip(')').rpartition(':')[0] or where.rstrip(')'))})"


def warm_reads(target: Target, work: str, args) -> None:
    """Repeat reads and cold-kernel-cache reads vs the cache files read directly."""
    server = target.server
    mnt = os.path.join(work, "mnt")
    cache_dir = os.path.join(work, "cache-warm")
    with mounted(server.url, mnt, cache_dir, target.env, timeout=60):
        folder = mnt + target.folder
        read_tree(folder)  # fills the cache
    cached = [p for p in glob.glob(os.path.join(cache_dir, "v1", "*", "*", "**"), recursive=True) if os.path.isfile(p)]
    cache_root = os.path.commonpath(cached)
    big_one = os.path.join(work, "one-big")
    with mounted(server.url, mnt, cache_dir, target.env, timeout=60):
        folder = mnt + target.folder
        read_tree(folder)  # warm
        # A warm pass takes a fraction of a second, so take many rounds.
        warm = interleaved_ratio(lambda: read_tree(folder), lambda: read_tree(cache_root), max(15, 5 * args.repeat))
        row(f"repeat read of the {len(target.files)}-file series: mount / direct cache read (throughput)",
            f"{warm:.2f}", ">= 0.8")  # fmt: skip
        # The row above reads in 1 MiB blocks, where the per-folio cost of the copy weighs most; cat (128 KiB
        # reads, one process for all files) is what users run, read the same way on both sides.
        warm_cat = interleaved_ratio(lambda: cat_all(folder, target.files), lambda: cat_all(cache_root, cached),
                                     max(15, 5 * args.repeat))  # fmt: skip
        row("repeat cat of the series: mount / direct cache read (throughput)", f"{warm_cat:.2f}", "informative")
        if drop_caches():
            cold = interleaved_ratio(
                lambda: read_tree(folder), lambda: read_tree(cache_root), max(3, args.repeat), setup=drop_caches
            )
            row("cached files, cold kernel caches: mount / direct", f"{cold:.2f}", ">= 0.5")
    # One big file (~ the whole resource in one): a server data folder with that single file.
    one = os.path.join(big_one, "BENCH", "ONE_01", "ONE_01_MR1", "scans", "1", "resources", "NIFTI")
    os.makedirs(one)
    source = os.path.join(server.data_dir, "BENCH", "BIG_01", "BIG_01_MR1", "scans", "1", "resources", "DICOM")
    with open(os.path.join(one, "big.nii"), "wb") as out:
        for name in target.files:
            with open(os.path.join(source, name), "rb") as f:
                shutil.copyfileobj(f, out)
    with ServerProcess(data=big_one, test_hooks=False) as single:
        env = credentials_env(single)
        cache_one = os.path.join(work, "cache-one")
        path = "/BENCH/ONE_01/ONE_01_MR1/scans/1/resources/NIFTI/files/big.nii"
        with mounted(single.url, mnt, cache_one, env, timeout=60):
            read_tree(os.path.dirname(mnt + path))
            (direct,) = [p for p in glob.glob(os.path.join(cache_one, "v1", "**", "big.nii"), recursive=True)]
            warm = interleaved_ratio(lambda: read_tree(os.path.dirname(mnt + path)),
                                     lambda: read_tree(os.path.dirname(direct)), max(15, 5 * args.repeat))  # fmt: skip
            row(f"repeat read of one {target.mb:.0f} MB file: mount / direct cache read (throughput)",
                f"{warm:.2f}", ">= 0.9")  # fmt: skip
            warm_cat = interleaved_ratio(lambda: cat_all(os.path.dirname(mnt + path), ["big.nii"]),
                                         lambda: cat_all(os.path.dirname(direct), ["big.nii"]),
                                         max(15, 5 * args.repeat))  # fmt: skip
            row("repeat cat of that file: mount / direct cache read (throughput)", f"{warm_cat:.2f}", "informative")
            # What bounds the warm rows: the kernel copies a cached file to the reader folio by
            # folio, and the FUSE page cache has 4 KiB folios only (up to Linux 6.18 at least), while ext4
            # holds the cache file in folios of up to 2 MB.
            shares = [large_folio_share(p) for p in (mnt + path, direct)]
            if None not in shares:
                row("page cache of that file in large folios: mount / cache file",
                    " / ".join(f"{100 * s:.0f} %" for s in shares), "informative")  # fmt: skip
    shutil.rmtree(big_one, ignore_errors=True)
    force_unmount(mnt)


def find_ls(server: ServerProcess, work: str, args) -> None:
    env = credentials_env(server)
    mnt = os.path.join(work, "mnt")
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
    row(f"find -ls over {entries} entries: requests / directories", f"{requests_first} / {dirs} ({t_find:.1f} s)",
        "requests <= directories")  # fmt: skip
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


def experiment_copy(server: ServerProcess, work: str, args) -> None:
    """``cp -r`` of one experiment of the TREE project (5 scan resources) through a fresh mount, vs ``curl -o``
    of its resources' ZIPs one after another, at 0 and 50 ms of server latency."""
    env = credentials_env(server)
    opts = {"url": server.url, "user": server.user, "password": server.password}
    probe = XnatTransport(opts={**opts, "cache": Cache(os.path.join(work, "probe-cache-tree"))})
    experiment = "/TREE/TREE_01/TREE_01_MR1"
    urls = []
    for root, _dirs, files in probe.walk(experiment):
        if root.endswith("/files") and files:
            urls.append(f"{server.url}{probe.stat(f'{root}/{files[0]}').ref.resource.api_path}/files?format=zip")
    probe.close()
    mnt = os.path.join(work, "mnt")
    counter = iter(range(10**6))
    for latency in (0.0, 0.05):
        server.set_faults(latency=latency)

        def curls() -> None:
            for url in urls:
                path = os.path.join(work, f"tree-{next(counter)}.zip")
                subprocess.run(["curl", "-sf", "-u", f"{server.user}:{server.password}", "-o", path, url], check=True)

        def copy() -> dict[str, float]:
            number = next(counter)
            with mounted(server.url, mnt, os.path.join(work, f"cache-tree-{number}"), env, timeout=60):
                start = time.perf_counter()
                subprocess.run(["cp", "-r", mnt + experiment, os.path.join(work, f"copy-{number}")], check=True)
                return {"cp": time.perf_counter() - start}

        times = interleaved({"curl": curls, "mount": copy}, args.repeat)
        row(f"cp -r of an experiment ({len(urls)} resources) via a fresh mount / sequential curl -o of its ZIPs,"
            f" {latency * 1000:.0f} ms latency", f"{med(times, 'mount:cp') / med(times, 'curl'):.2f}  "
            f"({med(times, 'mount:cp'):.2f} vs {med(times, 'curl'):.2f} s)", "")  # fmt: skip
    server.clear_faults()
    force_unmount(mnt)


def huge_rss(work: str, args) -> None:
    """Daemon peak RSS while ``cat`` reads a resource of --huge-mb through a fresh mount (both servers)."""
    data = os.path.join(work, "huge")
    make_archive(data, args.huge_mb, args.huge_mb, 0)
    mnt = os.path.join(work, "mnt")
    for kind, extra in (("STORED", []), ("DEFLATE", DEFLATE_ARGS)):
        with ServerProcess(data=data, test_hooks=False, extra_args=extra) as server:
            target = Target(server, work)
            cache_dir = os.path.join(work, f"huge-cache-{kind}")
            with mounted(server.url, mnt, cache_dir, target.env, timeout=60):
                (pid,) = daemon_pids(mnt)
                folder = mnt + target.folder
                os.listdir(folder)
                start = time.perf_counter()
                with PeakRss(pid) as rss:
                    cat_all(folder, target.files)
                elapsed = time.perf_counter() - start
            shutil.rmtree(cache_dir, ignore_errors=True)
            row(f"[{kind}] daemon peak RSS, cold cat of a {args.huge_mb} MB resource",
                f"{rss.peak:.0f} MB ({target.mb / elapsed:.0f} MB/s)", "<= 100 MB")  # fmt: skip
    shutil.rmtree(data, ignore_errors=True)
    force_unmount(mnt)


if __name__ == "__main__":
    sys.exit(main())
