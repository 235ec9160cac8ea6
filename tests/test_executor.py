"""The bounded executor that runs a transport's background work (listing read-ahead, download-ahead)."""

from __future__ import annotations

import threading
import time

from xnatfs.transports import executor
from xnatfs.transports.executor import BoundedExecutor


def test_bounded_threads_one_job_per_key_and_idle_threads_end(monkeypatch):
    monkeypatch.setattr(executor, "IDLE_SECONDS", 0.2)
    pool = BoundedExecutor(3, "test-pool")
    lock, release = threading.Lock(), threading.Event()
    running, peak, done = [0], [0], []

    def job(n: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
            done.append(n)

    before = threading.active_count()
    assert all(pool.submit(n, job, n) for n in range(20))
    assert not pool.submit(5, job, 5)  # queued already
    time.sleep(0.2)
    assert threading.active_count() - before == 3  # never a thread per job
    release.set()
    deadline = time.monotonic() + 10
    while len(done) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == list(range(20)) and peak[0] == 3
    assert pool.submit(5, job, 5)  # done: may be queued again
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before  # idle threads end
    pool.shutdown()
    assert not pool.submit(99, job, 99)
