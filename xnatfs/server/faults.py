"""Test hooks of the embedded server (only active with --test-hooks): a request log and injected faults.

`PUT /_test/faults` takes a JSON object with any of these keys (see README-data.md):
  latency           seconds to wait before answering any request
  drop_after_bytes  a ZIP download closes the connection after this many body bytes
  error             {"status": 500, "path": "<regex searched in the path>", "count": K (optional)}
  refuse            true: every request is answered by closing the socket at once
  stall             true: every request hangs until the faults are cleared
  throttle          bytes per second: file and ZIP bodies are sent no faster than this
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .http import MAX_DRAIN_BYTES, HttpError

FAULT_KEYS = {"latency", "drop_after_bytes", "error", "refuse", "stall", "throttle"}


@dataclass
class ErrorRule:
    """Answer requests whose path matches `pattern` with `status`, `remaining` times (None: always)."""

    status: int
    pattern: re.Pattern
    remaining: int | None


class TestHooks:
    """Thread-safe store of the request log and of the faults currently injected."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[dict] = []
        self._cleared = threading.Event()  # set whenever no stall is active
        self._cleared.set()
        self._set_defaults()

    def _set_defaults(self) -> None:
        self.latency = 0.0
        self.drop_after_bytes: int | None = None
        self.throttle: int | None = None
        self.refuse = False
        self._error: ErrorRule | None = None

    # -- request log -------------------------------------------------------------------------------

    def record(self, entry: dict) -> None:
        """Append one handled request ({"method","path","query","status","bytes","user","started","finished"})."""
        with self._lock:
            self._requests.append(entry)

    def requests(self) -> list[dict]:
        """Return a copy of the request log."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- faults ------------------------------------------------------------------------------------

    def set_faults(self, spec: dict) -> None:
        """Add the faults described by `spec` to the active ones; raise ValueError on a bad spec."""
        unknown = set(spec) - FAULT_KEYS
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        error = None
        if "error" in spec:
            rule = spec["error"]
            if not isinstance(rule, dict) or "status" not in rule:
                raise ValueError('"error" needs at least {"status": N}')
            count = rule.get("count")
            error = ErrorRule(
                int(rule["status"]), re.compile(rule.get("path", "")), None if count is None else int(count)
            )
        with self._lock:
            if "latency" in spec:
                self.latency = float(spec["latency"])
            if "drop_after_bytes" in spec:
                self.drop_after_bytes = None if spec["drop_after_bytes"] is None else int(spec["drop_after_bytes"])
            if "throttle" in spec:
                self.throttle = int(spec["throttle"]) if spec["throttle"] else None
            if "refuse" in spec:
                self.refuse = bool(spec["refuse"])
            if error:
                self._error = error
            if spec.get("stall"):
                self._cleared.clear()
            elif "stall" in spec:
                self._cleared.set()

    def clear_faults(self) -> None:
        """Remove every fault and release stalled requests."""
        with self._lock:
            self._set_defaults()
            self._cleared.set()

    def wait_while_stalled(self) -> None:
        """Block while a stall is active (returns at once otherwise)."""
        self._cleared.wait()

    def error_for(self, path: str) -> int | None:
        """Return the status to fail this request with, or None; counts down a limited rule."""
        with self._lock:
            rule = self._error
            if rule is None or not rule.pattern.search(path):
                return None
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._error = None
            return rule.status


class FaultInjection:
    """The request handler's side of the test hooks: injected faults, throttled bodies, `/_test/...`."""

    server: Any  # has `hooks` (TestHooks or None) and `auth`

    def _inject_faults(self, hooks: TestHooks, path: str) -> bool:
        """Apply the active test faults; returns True when the request has been dealt with."""
        if hooks.refuse:
            self._abort()
            return True
        hooks.wait_while_stalled()
        if hooks.latency:
            time.sleep(hooks.latency)
        status = hooks.error_for(path)
        if status is not None:
            self._fail(status, "Injected error")
            return True
        return False

    def _paced(self, data: bytes) -> Iterator[bytes]:
        """Yield `data` whole, or in slices at the test hooks' throttle rate (re-read per slice)."""
        hooks = self.server.hooks
        while data:
            rate = hooks.throttle if hooks else None
            if not rate:
                yield data
                return
            piece, data = data[: max(1024, rate // 10)], data[max(1024, rate // 10) :]
            yield piece
            time.sleep(len(piece) / rate)

    def _test_hook(self, parts: list[str]) -> None:
        hooks = self.server.hooks
        if hooks is None:
            raise HttpError(404)
        match self.command, parts:
            case "GET", ["requests"]:
                self._send_json(hooks.requests())
            case "DELETE", ["requests"]:
                hooks.clear_requests()
                self._send_text("")
            case "PUT", ["faults"]:
                try:
                    hooks.set_faults(json.loads(self._read_body(MAX_DRAIN_BYTES) or b"{}"))
                except (ValueError, TypeError) as error:
                    raise HttpError(400, str(error)) from error
                self._send_text("")
            case "DELETE", ["faults"]:
                hooks.clear_faults()
                self._send_text("")
            case "POST", ["expire-sessions"]:
                self.server.auth.expire_all_sessions()
                self._send_text("")
            case "PUT", ["password"]:
                self.server.auth.set_password(self._read_body(MAX_DRAIN_BYTES).decode("utf-8"))
                self._send_text("")
            case "POST", ["unlock"]:
                self.server.auth.unlock()
                self._send_text("")
            case _:
                raise HttpError(404)
