"""The atheris harnesses run a bounded number of inputs and find nothing.

A longer run is by hand (see each harness's docstring). Where atheris has no wheel
(it ships Linux x86_64 wheels only) these tests skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(("harness", "runs"), [("fuzz_header.py", 3000), ("fuzz_events.py", 20000)])
def test_harness_runs_clean(harness: str, runs: int, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / harness),
            f"-runs={runs}",
            "-seed=1",  # the same inputs on every run
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    tail = "\n".join(done.stderr.splitlines()[-30:])
    assert done.returncode == 0, tail
    assert f"Done {runs} runs" in done.stderr, tail
    assert not list(tmp_path.glob("crash-*"))
