"""Fidelity knobs: modelled latency, a concurrency quota and injected faults.

All are off by default. ``knobs_from_env`` reads the ``LOCALCLOUD_HC_*`` variables,
``python -m localcloud.healthcare`` takes them as flags, and ``POST /_emulator/knobs``
changes them at run time (``Knobs``); ``parse_faults`` and ``parse_latency`` read the
``METHOD=RATE:HTTP_STATUS`` and ``METHOD=SECONDS`` forms.

See docs/emulator.md#knobs
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

METHODS = (
    "datasets.create",
    "datasets.get",
    "datasets.list",
    "datasets.delete",
    "datasets.patch",
    "datasets.getIamPolicy",
    "datasets.setIamPolicy",
    "datasets.testIamPermissions",
    "dicomStores.create",
    "dicomStores.get",
    "dicomStores.list",
    "dicomStores.patch",
    "dicomStores.delete",
    "dicomStores.getIamPolicy",
    "dicomStores.setIamPolicy",
    "dicomStores.testIamPermissions",
    "import",
    "export",
    "operations.get",
    "operations.list",
    "operations.cancel",
    "dicomWeb.search",
    "dicomWeb.retrieve",
    "dicomWeb.store",
    "dicomWeb.delete",
)
ENV_OPERATION_LATENCY = "LOCALCLOUD_HC_OPERATION_LATENCY"
ENV_MAX_CONCURRENT_OPS = "LOCALCLOUD_HC_MAX_CONCURRENT_OPS"
ENV_FAULTS = "LOCALCLOUD_HC_FAULTS"
ENV_LATENCY = "LOCALCLOUD_HC_LATENCY"


@dataclass(frozen=True)
class Fault:
    """Fail ``rate`` of the calls with HTTP ``status``."""

    rate: float
    status: int


def _method(name: str) -> str:
    name = name.strip()
    if name != "*" and name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use '*' or one of: {', '.join(METHODS)}")
    return name


def parse_faults(text: str) -> dict[str, Fault]:
    """Parse ``METHOD=RATE:STATUS,...``.

    Raises:
        ValueError: with the offending part and the expected form.
    """
    faults: dict[str, Fault] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        method, eq, spec = part.partition("=")
        rate_text, colon, status_text = spec.partition(":")
        try:
            if not eq or not colon:
                raise ValueError
            rate, status = float(rate_text), int(status_text)
        except ValueError:
            raise ValueError(
                f"bad fault {part!r}: expected METHOD=RATE:HTTP_STATUS, e.g. import=0.1:503"
            ) from None
        if not 0.0 <= rate <= 1.0 or not 400 <= status <= 599:
            raise ValueError(f"bad fault {part!r}: rate must be 0..1 and the status 400..599")
        faults[_method(method)] = Fault(rate, status)
    return faults


def parse_latency(text: str) -> dict[str, float]:
    """Parse ``METHOD=SECONDS,...``.

    Raises:
        ValueError: with the offending part and the expected form.
    """
    latency: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        method, eq, seconds = part.partition("=")
        try:
            if not eq:
                raise ValueError
            value = float(seconds)
        except ValueError:
            raise ValueError(
                f"bad latency {part!r}: expected METHOD=SECONDS, e.g. import=0.5"
            ) from None
        if value < 0:
            raise ValueError(f"bad latency {part!r}: seconds must not be negative")
        latency[_method(method)] = value
    return latency


@dataclass
class Knobs:
    """The current knob values; thread-safe to read and update."""

    operation_latency: float = 0.0
    max_concurrent_ops: int = 0
    faults: dict[str, Fault] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def fault_for(self, method: str) -> int | None:
        """The HTTP status to fail this call with, or None to serve it."""
        with self._lock:
            fault = self.faults.get(method) or self.faults.get("*")
            if fault is None or fault.rate <= 0:
                return None
            return fault.status if self._random.random() < fault.rate else None

    def latency_for(self, method: str) -> float:
        """Seconds to wait before answering ``method``."""
        with self._lock:
            return self.latency.get(method, self.latency.get("*", 0.0))

    def update(self, values: Mapping[str, object]) -> None:
        """Apply a JSON update (see docs/emulator.md#knobs).

        Raises:
            ValueError: an unknown key or a bad value; nothing is changed then.
        """
        unknown = set(values) - {"operation_latency", "max_concurrent_ops", "faults", "latency"}
        if unknown:
            raise ValueError(f"unknown knobs: {', '.join(sorted(unknown))}")
        op_latency = self.operation_latency
        max_ops = self.max_concurrent_ops
        faults, latency = dict(self.faults), dict(self.latency)
        if "operation_latency" in values:
            op_latency = _number(values["operation_latency"], "operation_latency")
        if "max_concurrent_ops" in values:
            max_ops = int(_number(values["max_concurrent_ops"], "max_concurrent_ops"))
        if "faults" in values:
            faults = _faults_value(values["faults"])
        if "latency" in values:
            latency = _latency_value(values["latency"])
        with self._lock:
            self.operation_latency, self.max_concurrent_ops = op_latency, max_ops
            self.faults, self.latency = faults, latency

    def as_json(self) -> dict[str, object]:
        """The knobs as JSON, the shape ``update`` accepts."""
        with self._lock:
            return {
                "operation_latency": self.operation_latency,
                "max_concurrent_ops": self.max_concurrent_ops,
                "faults": {m: {"rate": f.rate, "status": f.status} for m, f in self.faults.items()},
                "latency": dict(self.latency),
            }


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    return float(value)


def _faults_value(value: object) -> dict[str, Fault]:
    if isinstance(value, str):
        return parse_faults(value)
    if not isinstance(value, dict):
        raise ValueError("faults must be a string or an object")
    faults: dict[str, Fault] = {}
    for method, spec in value.items():
        if isinstance(spec, Fault):
            faults[_method(method)] = spec
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"faults.{method} must be {{'rate': R, 'status': S}}")
        rate, status = spec.get("rate"), spec.get("status")
        text = f"{method}={rate}:{status}"
        faults.update(parse_faults(text))
    return faults


def _latency_value(value: object) -> dict[str, float]:
    if isinstance(value, str):
        return parse_latency(value)
    if not isinstance(value, dict):
        raise ValueError("latency must be a string or an object")
    return parse_latency(",".join(f"{m}={s}" for m, s in value.items()))


def knobs_from_env(env: Mapping[str, str]) -> dict[str, object]:
    """Knob keyword arguments from the LOCALCLOUD_HC_* variables that are set.

    Raises:
        ValueError: naming the variable with a bad value.
    """
    found: dict[str, object] = {}
    try:
        if env.get(ENV_OPERATION_LATENCY, "").strip():
            found["operation_latency"] = float(env[ENV_OPERATION_LATENCY])
        if env.get(ENV_MAX_CONCURRENT_OPS, "").strip():
            found["max_concurrent_ops"] = int(env[ENV_MAX_CONCURRENT_OPS])
    except ValueError as exc:
        raise ValueError(f"{ENV_OPERATION_LATENCY}/{ENV_MAX_CONCURRENT_OPS}: {exc}") from None
    for name, key, parse in (
        (ENV_FAULTS, "faults", parse_faults),
        (ENV_LATENCY, "latency", parse_latency),
    ):
        if env.get(name, "").strip():
            try:
                found[key] = parse(env[name])
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    return found


def post(url: str, values: Mapping[str, object]) -> int:
    """Set knobs of the running emulator at ``url`` (``POST /_emulator/knobs``); its status."""
    request = urllib.request.Request(
        f"{url}/_emulator/knobs",
        data=json.dumps(values).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
        return int(response.status)
