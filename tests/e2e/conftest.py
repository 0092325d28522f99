"""The demo's local cloud, run once per session and kept for inspection by the e2e tests."""

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


@pytest.fixture(scope="session")
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
