"""The integration tier's emulators, one of each for the session, and one pipeline factory.

Storage (fake-gcs-server behind the storage front), the Healthcare API emulator and
Pub/Sub start once. Pub/Sub comes in two back-ends: ``pubsub`` is the gcloud SDK's
emulator where it is installed and the built-in fallback elsewhere (``kind="auto"``);
``pubsub_servers`` hands out either kind, started on first use, for the tests that
cover both. ``pipeline`` builds what one test needs on them (``tests.integration.sites``):
its own buckets, DICOM store, alerts topic and subscription, settings, a settable clock
and a ``Context``, all closed after the test, so that tests share the servers and
nothing else. ``burst``, the one expensive scenario, runs once and is read by the
ingest and the report tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import functions_framework
import pytest

from localcloud.healthcare import HealthcareServer, start_healthcare
from localcloud.pubsub import PubSubServer
from localcloud.storage import StorageServer, start_storage
from tests.integration.burst import Burst, run_burst
from tests.integration.sites import PipelineFactory, PubSubServers

MAIN = str(Path(__file__).resolve().parents[2] / "main.py")
FUNCTIONS = ("ingest", "report", "export")


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[StorageServer]:
    """One in-memory fake-gcs-server (and its front) for the session, on a free port."""
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


@pytest.fixture(scope="session")
def pubsub_servers() -> Iterator[PubSubServers]:
    """Both Pub/Sub back-ends for the session, so that the JVM starts at most once."""
    servers = PubSubServers()
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def pubsub(pubsub_servers: PubSubServers) -> PubSubServer:
    """The Pub/Sub a deployment test would use: the emulator when installed, else the fallback."""
    return pubsub_servers.get("auto")


@pytest.fixture(scope="session")
def pubsub_fallback(pubsub_servers: PubSubServers) -> PubSubServer:
    """The built-in fallback Pub/Sub, whatever is installed."""
    return pubsub_servers.get("fallback")


@pytest.fixture(scope="session")
def apps() -> dict[str, Any]:
    """The functions of ``main.py`` under functions-framework, as Cloud Functions runs them."""
    return {name: functions_framework.create_app(name, MAIN, "cloudevent") for name in FUNCTIONS}


@pytest.fixture
def pipeline(
    gcs_server: StorageServer,
    healthcare_server: HealthcareServer,
    pubsub_servers: PubSubServers,
    apps: dict[str, Any],
) -> Iterator[PipelineFactory]:
    """``pipeline(cls=Site, *, clock=None, counted=False, pubsub="auto", settings=None)``: a
    test's own buckets, store, topic and context on the session's emulators (see
    ``PipelineFactory.__call__``); everything it made is closed after the test."""
    factory = PipelineFactory(gcs_server, healthcare_server, pubsub_servers, apps)
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def burst(
    gcs_server: StorageServer,
    healthcare_server: HealthcareServer,
    pubsub_servers: PubSubServers,
    apps: dict[str, Any],
) -> Iterator[Burst]:
    """The 2,000-file burst (``tests.integration.burst``), run on first use; its pipeline
    stays up for the session, for the ingest and the report tests to read."""
    factory = PipelineFactory(gcs_server, healthcare_server, pubsub_servers, apps)
    try:
        yield run_burst(factory)
    finally:
        factory.close()
