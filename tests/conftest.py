"""Fixtures for every tier: a clean environment and logging per test, emulators per session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.storage import StorageServer, start_storage


@pytest.fixture(autouse=True)
def _restore_env_and_logging() -> Iterator[None]:
    """Each test gets the environment and root logging state it started with."""
    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    os.environ.clear()
    os.environ.update(env)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[StorageServer]:
    """One in-memory fake-gcs-server for the session, on a free loopback port."""
    server = start_storage()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def healthcare_server(gcs_server: StorageServer) -> Iterator[HealthcareServer]:
    """One in-process Cloud Healthcare API emulator for the session, reading gcs_server.

    Tests create their own datasets and stores with unique ids. Knobs are off;
    a test that turns one on via POST /_emulator/knobs must turn it off again.
    """
    server = start_healthcare(storage_endpoint=gcs_server.url)
    yield server
    server.stop()
