"""Shared fixtures: embedded XNAT servers (see server_process.py)."""

from __future__ import annotations

import pytest
from server_process import ServerProcess


@pytest.fixture(scope="session")
def xnat_server():
    """One demo-archive server with test hooks for the whole run; prefer the `server` fixture."""
    with ServerProcess() as server:
        yield server


@pytest.fixture
def server(xnat_server):
    """The shared demo server with an empty request log and no faults."""
    xnat_server.clear_faults()
    xnat_server.clear_requests()
    yield xnat_server
    xnat_server.clear_faults()


@pytest.fixture
def server_factory():
    """Start extra servers, e.g. `server_factory(data=tmp_path)`; all are stopped at teardown."""
    started = []

    def start(**kwargs) -> ServerProcess:
        started.append(ServerProcess(**kwargs))
        return started[-1]

    yield start
    for process in started:
        process.stop()
