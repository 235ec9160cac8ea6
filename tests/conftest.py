"""Shared fixtures: embedded XNAT servers (see server_process.py)."""

from __future__ import annotations

import os

import pytest
from mounting import credentials_env, force_unmount
from server_process import ServerProcess


@pytest.fixture(scope="session")
def xnat_server():
    """One demo-archive server with test hooks for the whole run; prefer the `server` fixture."""
    with ServerProcess() as server:
        yield server


@pytest.fixture
def server(xnat_server):
    """The shared demo server with an empty request log and no faults."""
    yield from xnat_server.fresh()


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


@pytest.fixture
def env(server):
    """An environment with the shared server's credentials (XNAT_USER / XNAT_PASS)."""
    return credentials_env(server)


@pytest.fixture
def mnt(tmp_path):
    """An empty mount point, force-unmounted at teardown whatever the test left."""
    path = str(tmp_path / "mnt")
    os.makedirs(path)
    yield path
    force_unmount(path)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")
