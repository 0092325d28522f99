"""Starting a service on a picked port, again on another one when the port was taken."""

from __future__ import annotations

import pytest

from localcloud.ports import START_ATTEMPTS, PortTaken, start_on_free_port


def test_each_start_gets_a_new_port_and_the_last_port_taken_is_raised() -> None:
    tried: list[int] = []

    def start(port: int) -> str:
        tried.append(port)
        raise PortTaken(f"port {port} taken")

    with pytest.raises(PortTaken) as info:
        start_on_free_port(start)
    assert str(info.value) == f"port {tried[-1]} taken"
    assert len(tried) == START_ATTEMPTS
    assert len(set(tried)) == START_ATTEMPTS and all(p > 0 for p in tried)


def test_other_errors_are_not_retried() -> None:
    tried: list[int] = []

    def start(port: int) -> str:
        tried.append(port)
        raise ValueError("bad knob")

    with pytest.raises(ValueError, match="bad knob"):
        start_on_free_port(start)
    assert len(tried) == 1
