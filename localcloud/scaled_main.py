"""``main.py`` with dicomflow's crash-repair delay scaled down, for chaos runs (localcloud only).

A chaos run kills the ingest function at random moments. A kill between the
import intent (``_import.json``) and the operation record (``_operation.json``)
leaves the batch waiting ``batches.IMPORT_RESTART_SECONDS`` (300 s) before it
is imported again: the designed repair, but longer than a test can wait. The
chaos harness already scales the batch window from 60 s down to 5 s; this
entry point scales the repair delay the same way, from
``LOCALCLOUD_IMPORT_RESTART_SECONDS`` (report's "unrecorded import" grace
follows it, since it is derived at import time). Nothing else changes: the
entry points are ``main.py``'s own.

Serve it with ``StackConfig(functions_source=SCALED_MAIN)``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dicomflow import batches  # noqa: E402  (before report derives its grace from it)

_restart = os.environ.get("LOCALCLOUD_IMPORT_RESTART_SECONDS", "").strip()
if _restart:
    batches.IMPORT_RESTART_SECONDS = int(_restart)

from main import export, ingest, report  # noqa: E402

__all__ = ["export", "ingest", "report"]
