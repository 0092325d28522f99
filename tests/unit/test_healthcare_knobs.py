"""Knob parsing of the Healthcare emulator: env syntax, JSON updates, fault draws."""

from __future__ import annotations

import pytest

from localcloud.healthcare.knobs import (
    Fault,
    Knobs,
    knobs_from_env,
    parse_faults,
    parse_latency,
)


def test_fault_syntax() -> None:
    assert parse_faults("import=0.1:503, export=1.0:500,dicomWeb.search=0.05:429") == {
        "import": Fault(0.1, 503),
        "export": Fault(1.0, 500),
        "dicomWeb.search": Fault(0.05, 429),
    }
    assert parse_faults("") == {}


@pytest.mark.parametrize(
    "text",
    [
        "import=0.1",
        "import:0.1:503",
        "import=x:503",
        "import=2:503",
        "import=0.5:200",
        "nope=1:500",
    ],
)
def test_bad_faults_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match=r"fault|method"):
        parse_faults(text)


def test_latency_syntax() -> None:
    assert parse_latency("import=2.5,*=0.01") == {"import": 2.5, "*": 0.01}
    with pytest.raises(ValueError, match="METHOD=SECONDS"):
        parse_latency("import")
    with pytest.raises(ValueError, match="negative"):
        parse_latency("import=-1")


def test_env_and_draws() -> None:
    found = knobs_from_env(
        {
            "LOCALCLOUD_HC_OPERATION_LATENCY": "0.25",
            "LOCALCLOUD_HC_MAX_CONCURRENT_OPS": "3",
            "LOCALCLOUD_HC_FAULTS": "*=1.0:503",
            "LOCALCLOUD_HC_LATENCY": "export=0.5",
        }
    )
    knobs = Knobs()
    knobs.update(found)
    assert knobs.operation_latency == 0.25 and knobs.max_concurrent_ops == 3
    assert knobs.fault_for("import") == 503
    assert knobs.latency_for("export") == 0.5 and knobs.latency_for("import") == 0.0
    knobs.update({"faults": {"import": {"rate": 0.0, "status": 500}}})
    assert knobs.fault_for("import") is None and knobs.fault_for("export") is None
    with pytest.raises(ValueError, match="LOCALCLOUD_HC_FAULTS"):
        knobs_from_env({"LOCALCLOUD_HC_FAULTS": "import"})


def test_update_is_all_or_nothing() -> None:
    knobs = Knobs()
    with pytest.raises(ValueError, match="unknown knobs"):
        knobs.update({"operation_latency": 1.0, "speed": 2})
    with pytest.raises(ValueError):
        knobs.update({"operation_latency": 1.0, "faults": "bad"})
    assert knobs.operation_latency == 0.0 and knobs.faults == {}
    knobs.update({"operation_latency": 1, "max_concurrent_ops": 2})
    assert knobs.as_json()["max_concurrent_ops"] == 2
