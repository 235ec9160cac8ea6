"""The persistent cache: one fill per entry across threads and processes, nothing partial, LRU eviction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from xnatfs.cache import Cache

KEY = ("test", "server", "P", "E", "1", "DICOM")


def writer(names: list[str], delay: float = 0.0, calls: list | None = None, fail_after: int | None = None):
    """Return a fill function that writes ``names`` one by one, publishing each."""

    def fill(filler) -> None:
        if calls is not None:
            calls.append(1)
        for i, name in enumerate(names):
            if fail_after is not None and i == fail_after:
                raise ConnectionError("server went away")
            tmp = os.path.join(filler.staging, f".tmp-{name}")
            with open(tmp, "wb") as f:
                f.write(name.encode() * 1000)
            os.rename(tmp, os.path.join(filler.staging, name))
            filler.publish(name)
            time.sleep(delay)

    return fill


def complete(entry) -> bool:
    """Wait (bounded) for a fill that served its last member to publish the entry."""
    for _ in range(200):
        if entry.is_complete():
            return True
        time.sleep(0.05)
    return False


def test_threads_share_one_fill_and_get_members_early(tmp_path):
    cache = Cache(str(tmp_path))
    entry = cache.entry(KEY, "v1")
    names = [f"f{i}" for i in range(8)]
    calls: list = []
    got = {}
    first_at = []

    def get(name: str) -> None:
        path = entry.get(name, writer(names, 0.1, calls))
        got[name] = open(path, "rb").read()
        if name == "f0":
            first_at.append(path)

    threads = [threading.Thread(target=get, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    assert got == {n: n.encode() * 1000 for n in names}
    # The first member was served from the staging folder, before the other seven had arrived.
    assert first_at[0].startswith(entry.staging + "/")
    assert complete(entry)
    with pytest.raises(FileNotFoundError):
        entry.get("missing", writer(names))


def test_failed_fill_leaves_nothing_and_the_next_get_retries(tmp_path):
    cache = Cache(str(tmp_path))
    entry = cache.entry(KEY, "v1")
    with pytest.raises(ConnectionError):
        entry.get("f3", writer(["f0", "f1", "f2", "f3"], fail_after=2))
    assert not entry.is_complete() and not os.path.exists(entry.staging)
    assert open(entry.get("f3", writer(["f0", "f1", "f2", "f3"])), "rb").read() == b"f3" * 1000


FILL_IN_CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_cache import KEY, writer
from xnatfs.cache import Cache
entry = Cache({cache!r}).entry(KEY, "v1")
path = entry.get(sys.argv[1], writer(["a", "b", "c"], delay=float(sys.argv[2])))
print(open(path, "rb").read()[:1].decode(), flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_processes_share_one_fill_and_a_killed_filler_is_recovered(tmp_path):
    cache_dir = str(tmp_path / "cache")
    code = FILL_IN_CHILD.format(tests=os.path.dirname(__file__), cache=cache_dir)
    # A filler killed mid-fill leaves a staging folder and no published entry.
    slow = subprocess.Popen([sys.executable, "-c", code, "a", "5", "0"], stdout=subprocess.PIPE, text=True)
    assert slow.stdout.readline().strip() == "a"
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait()
    entry = Cache(cache_dir).entry(KEY, "v1")
    assert not entry.is_complete()
    # A waiter in another process sees the member appear in the other process's fill.
    first = subprocess.Popen([sys.executable, "-c", code, "c", "0.3", "2"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.2)
    second = subprocess.run([sys.executable, "-c", code, "b", "0", "0"], capture_output=True, text=True, timeout=30)
    assert second.stdout.strip() == "b"
    assert first.stdout.readline().strip() == "c"
    first.wait(30)
    assert entry.is_complete()
    assert sorted(os.listdir(entry.path)) == ["a", "b", "c"]


def test_new_version_replaces_old_and_eviction_keeps_recent(tmp_path):
    cache = Cache(str(tmp_path))
    old = cache.entry(KEY, "v1")
    old.get("a", writer(["a"]))
    assert complete(old)
    past = time.time() - 3600
    os.utime(old.meta_path, (past, past))  # not used for an hour: the new version may replace it
    new = cache.entry(KEY, "v2")
    new.get("a", writer(["a"]))
    assert complete(new)
    for _ in range(100):
        if not old.is_complete():
            break
        time.sleep(0.05)
    assert not old.is_complete()
    other = cache.entry(("test", "server", "P", "E", "2", "DICOM"), "v1")
    other.get("b", writer(["b"]))
    assert complete(other)
    time.sleep(0.2)  # after_fill of the last fill runs just after publishing
    assert cache.size() == 2000
    # Both were used just now: the grace period protects them.
    assert cache.evict(0) == 0
    os.utime(new.meta_path, (past, past))
    assert cache.evict(1000) == 1000
    assert not new.is_complete() and other.is_complete()
