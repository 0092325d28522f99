"""Fixtures for every tier: a clean environment and logging per test, API client factories.

The integration tier's emulators are in ``tests/integration/conftest.py``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build

from tests import alert_contract
from tests.http_recorder import Recorder


def pytest_configure(config: pytest.Config) -> None:
    alert_contract.install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Fail a test whose fixtures built or read back an alert the schema refuses."""
    alert_contract.CHECKER.take()  # what earlier tests left behind is theirs
    yield
    _fail_on_invalid_alerts()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a test that built or read back an alert the schema refuses."""
    yield
    _fail_on_invalid_alerts()


def _fail_on_invalid_alerts() -> None:
    problems = alert_contract.CHECKER.take()
    if problems:
        pytest.fail("alerts not matching dicomflow/alert.schema.json:\n" + "\n".join(problems))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    checker = alert_contract.CHECKER
    if checker.checked:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(checker.kinds.items()))
        terminalreporter.write_line(
            f"alert schema: {checker.checked} alerts checked; built by the pipeline: {kinds}"
        )


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


def _google_api(service: str, version: str, url: str) -> Any:
    """A googleapiclient client for ``url``: the bundled discovery document, no credentials."""
    return build(
        service,
        version,
        static_discovery=True,
        cache_discovery=False,
        client_options={"api_endpoint": url},
        credentials=AnonymousCredentials(),
    )


@pytest.fixture
def http_session() -> Iterator[requests.Session]:
    """A requests session, closed after the test: hand it to a DICOMweb client and reuse it
    for the raw requests the client has no method for."""
    with requests.Session() as session:
        yield session


@pytest.fixture
def healthcare_client() -> Iterator[Callable[..., Any]]:
    """A factory of googleapiclient Healthcare clients: ``make(url, version="v1")``.

    Offline: the bundled discovery document and anonymous credentials. Every
    client is closed after the test, so no socket outlives it.
    """
    made: list[Any] = []

    def make(url: str, version: str = "v1") -> Any:
        made.append(_google_api("healthcare", version, url))
        return made[-1]

    yield make
    for api in made:
        api.close()


@pytest.fixture
def pubsub_client() -> Iterator[Callable[[str], Any]]:
    """A factory of Pub/Sub v1 clients, ``make(url)``, closed after the test."""
    made: list[Any] = []

    def make(url: str) -> Any:
        made.append(_google_api("pubsub", "v1", url + "/"))
        return made[-1]

    yield make
    for api in made:
        api.close()


@pytest.fixture
def recorder_factory() -> Iterator[Callable[[list[int]], Recorder]]:
    """A factory of loopback HTTP endpoints (``Recorder``), stopped after the test."""
    made: list[Recorder] = []

    def make(statuses: list[int]) -> Recorder:
        made.append(Recorder(statuses))
        return made[-1]

    yield make
    for recorder in made:
        recorder.stop()
