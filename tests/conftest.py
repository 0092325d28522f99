"""Fixtures for every tier: a clean environment and logging per test, API client factories.

The integration tier's emulators are in ``tests/integration/conftest.py``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build

from tests import alert_contract
from tests.http_recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]


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


# `make test` runs the suite in two processes (pytest-xdist, `--dist loadscope`). A unit of
# work runs in one process: each test module is one, so its module fixtures are built once,
# and the modules that use one of these expensive shared fixtures are one together, so the
# fixture is built once too. The collection checks that the table is complete.
SHARED_FIXTURES = {
    "burst": ("tests/integration/test_ingest_pipeline.py", "tests/integration/test_report.py"),
    "demo_run": ("tests/e2e/test_demo.py", "tests/e2e/test_operator_cli.py"),
}
UNIT_OF = {module: name for name, modules in SHARED_FIXTURES.items() for module in modules}


# Units handed out first, longest first, so that no process is left with a long one at the end.
FIRST = (*SHARED_FIXTURES, "tests/e2e/test_chaos.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.relative_to(ROOT).as_posix()
        for name in getattr(item, "fixturenames", ()):
            if name in SHARED_FIXTURES and UNIT_OF.get(module) != name:
                raise pytest.UsageError(
                    f"{module} uses the fixture {name}: add it to SHARED_FIXTURES in "
                    "tests/conftest.py, so that the fixture is built in one process"
                )

    def rank(item: pytest.Item) -> int:
        module = item.path.relative_to(ROOT).as_posix()
        unit = UNIT_OF.get(module, module)
        return FIRST.index(unit) if unit in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: each unit keeps its order


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped here
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return UNIT_OF.get(module, module)

    return ByModule(config, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a worker process: hand the alert counts to the controlling process."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["alerts"] = [alert_contract.CHECKER.checked, dict(alert_contract.CHECKER.kinds)]


def pytest_testnodedown(node: Any, error: object) -> None:
    """In the controlling process: add up the alert counts of a worker that finished."""
    checked, kinds = getattr(node, "workeroutput", {}).get("alerts", (0, {}))
    alert_contract.CHECKER.checked += checked
    alert_contract.CHECKER.kinds.update(kinds)


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
