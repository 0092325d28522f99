"""The one type for decoded JSON: documents read from or written to Storage and the APIs."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]
