"""Run `python -m xnatfs.server` as a child process for tests, and drive its test hooks.

    with ServerProcess(data=some_dir) as server:
        xnat.connect(server.url, user=server.user, password=server.password)
        server.set_faults(latency=0.5)
        assert server.requests()[-1]["status"] == 200

Only the password's environment variable reaches the child, never its command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LISTENING = re.compile(r"^xnatfs serve: listening on (http://([^:/]+):(\d+)) \(data: (.*)\)$", re.MULTILINE)


class ServerProcess:
    """A running embedded server (demo archive unless `data` is given); stop it with .stop() or `with`.

    Attributes: url, host, port, user, password, pid, data_dir (the folder served), log_path (its stderr).
    """

    def __init__(
        self,
        data: str | os.PathLike | None = None,
        user: str = "admin",
        password: str = "admin",
        test_hooks: bool = True,
        extra_args: list[str] | None = None,
    ) -> None:
        self.user = user
        self.password = password
        self._own_data = data is None  # the server generates the demo archive in a folder of its own
        self._logdir = tempfile.TemporaryDirectory(prefix="xnatfs-server-")
        self.log_path = Path(self._logdir.name) / "stderr.log"
        stdout_path = Path(self._logdir.name) / "stdout.log"
        command = [sys.executable, "-m", "xnatfs.server", "--port", "0", "--user", user]
        command += ["--test-hooks"] if test_hooks else []
        command += ["--data", str(data)] if data is not None else []
        command += extra_args or []
        env = dict(os.environ, XNATFS_SERVE_PASSWORD=password)
        with open(stdout_path, "wb") as stdout, open(self.log_path, "wb") as stderr:
            self._process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        self.pid = self._process.pid
        match = self._wait_for_listening(stdout_path)
        self.url, self.host, self.port, self.data_dir = match[1], match[2], int(match[3]), Path(match[4])
        self._http = requests.Session()

    def _wait_for_listening(self, stdout_path: Path) -> re.Match:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = LISTENING.search(stdout_path.read_text())
            if match:
                return match
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"xnatfs server did not start; its log:\n{self.log_text()}")

    def log_text(self) -> str:
        """Return what the server wrote to stderr so far (one line per request)."""
        return self.log_path.read_text(errors="replace")

    # -- test hooks --------------------------------------------------------------------------------

    def _hook(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self._http.request(method, f"{self.url}/_test/{path}", timeout=10, **kwargs)
        response.raise_for_status()
        return response

    def requests(self) -> list[dict]:
        """Return the server's request log: dicts with method, path, query, status, bytes, user."""
        return self._hook("GET", "requests").json()

    def clear_requests(self) -> None:
        self._hook("DELETE", "requests")

    def set_faults(self, **faults) -> None:
        """Inject faults: latency, drop_after_bytes, error={status, path, count}, refuse, stall, throttle."""
        self._hook("PUT", "faults", json=faults)

    def clear_faults(self) -> None:
        self._hook("DELETE", "faults")

    def fresh(self) -> Iterator[ServerProcess]:
        """The body of a per-test fixture on a shared server: yield it with no faults and an empty request
        log, then clear the faults a test left."""
        self.clear_faults()
        self.clear_requests()
        yield self
        self.clear_faults()

    def expire_sessions(self) -> None:
        """Invalidate every JSESSIONID (Basic auth keeps working)."""
        self._hook("POST", "expire-sessions")

    def set_password(self, password: str) -> None:
        """Change the user's password on the server (the old one stops working)."""
        self._hook("PUT", "password", data=password.encode())

    def unlock(self) -> None:
        """Lift a lockout after failed logins."""
        self._hook("POST", "unlock")

    # -- life cycle --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after STOP_TIMEOUT seconds)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()  # reaps nothing more; removes what a killed server left
        self._http.close()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        # A killed server cannot remove the demo archive it generated.
        if self._own_data and getattr(self, "data_dir", None) is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
