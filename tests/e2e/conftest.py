"""The demo's local cloud, run once for the e2e tests and kept for their inspection.

``demo_run`` is package-scoped: the stack stops when the e2e tests are done, not at the
end of the session, so it does not run on beside the other tiers. The tests that read it
run last among the e2e tests, after those that start local clouds of their own.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.cloud import storage
from rich.console import Console

from localcloud.demo import demo_config, run_flow
from localcloud.stack import Stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the e2e tests that read ``demo_run`` behind the other e2e tests (keeping each
    group's order), so that no other local cloud runs beside the idle demo stack."""
    here = Path(__file__).parent
    places = [i for i, item in enumerate(items) if here in item.path.parents]
    ours = [items[i] for i in places]
    reads = [isinstance(t, pytest.Function) and "demo_run" in t.fixturenames for t in ours]
    ordered = [t for t, r in zip(ours, reads, strict=True) if not r] + [
        t for t, r in zip(ours, reads, strict=True) if r
    ]
    for place, item in zip(places, ordered, strict=True):
        items[place] = item


@dataclass
class DemoRun:
    """The running stack after the demo flow, and the summary the demo printed."""

    stack: Stack
    summary: dict[str, Any]
    output: str
    gcs: storage.Client

    @property
    def env(self) -> dict[str, str]:
        return self.stack.env()


@pytest.fixture(scope="package")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """``make demo``'s flow on a fresh local cloud (the demo's own settings and corpus)."""
    home: Path = tmp_path_factory.mktemp("demo-home")
    stack = Stack(demo_config(home))
    out = io.StringIO()
    try:
        stack.start()
        summary = run_flow(stack, Console(file=out, width=120))
        gcs = stack.storage_client()
        try:
            yield DemoRun(stack, summary, out.getvalue(), gcs)
        finally:
            gcs.close()
    finally:
        stack.stop()
