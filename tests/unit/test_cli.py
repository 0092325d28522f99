"""The command line's frame: help from the handlers' docstrings, errors, and closed clients."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from dicomflow import runtime
from dicomflow.errors import TransientError
from dicomflow.ops import cli
from dicomflow.ops.args import Command
from tests.ingest_support import make_settings


class Storage:
    """A storage client whose listing fails as an unavailable service does."""

    def list_blobs(self, *args: Any, **kwargs: Any) -> Any:
        raise TransientError("storage unavailable (503)")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"storage used: {name}")


class CountingContext(runtime.Context):
    closed = 0

    def close_clients(self) -> None:
        self.closed += 1
        super().close_clients()


@pytest.fixture
def made() -> list[CountingContext]:
    return []


def run(
    made: list[CountingContext], capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    def make() -> CountingContext:
        ctx = CountingContext(settings=make_settings("landing", "staging"), storage=Storage())
        made.append(ctx)
        return ctx

    code = cli.main(list(argv), make_ctx=make)
    return code, capsys.readouterr().err


def test_every_subcommand_takes_its_help_and_description_from_its_handler() -> None:
    parser = cli.build_parser()
    for command in cli.COMMANDS:
        assert command.help and command.help[0].islower() and not command.help.endswith(".")
        assert command.description != command.help and "\n\n" not in command.description
        *group, name = command.name.split()
        args = parser.parse_args([*group, name, *REQUIRED.get(command.name, [])])
        assert args.handler is command.handler and args.command_name == command.name
    assert parser.format_help().count("read alerts back from Pub/Sub") == 1


# The least each subcommand needs to parse.
REQUIRED = {
    "backfill": ["gs://b/"],
    "restore": ["--date", "2026-11-25", "--into", "s"],
    "resolve": ["k", "--replace"],
    "erase": ["--study", "1.2.3"],
    "batch": ["20261125T125300Z"],
    "label": ["h:k:0"],
}


def test_a_handler_without_a_docstring_is_refused() -> None:
    def cmd_bare(make_ctx: Any, args: argparse.Namespace) -> int:
        return 0

    with pytest.raises(TypeError, match="'bare' has no docstring"):
        _ = Command("bare", cmd_bare).help


def test_usage_errors_name_the_command_and_exit_2(
    made: list[CountingContext], capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.delenv("DICOMFLOW_ALERTS_SUBSCRIPTION", raising=False)
    code, err = run(made, capsys, "alerts", "tail")
    assert (code, made) == (2, [])
    assert err.startswith("dicomflow alerts tail: no subscription;")
    code, err = run(made, capsys, "backfill", "gs://elsewhere/x")
    assert code == 2 and err.startswith("dicomflow backfill: gs://elsewhere is not the landing")
    assert [ctx.closed for ctx in made] == [1]


def test_errors_are_printed_once_and_the_clients_closed(
    made: list[CountingContext], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(made, capsys, "backfill", "gs://landing/in/")
    assert code == 1
    assert err == "dicomflow backfill: storage unavailable (503)\n"
    code, err = run(made, capsys, "restore", "--date", "2026-11-25", "--into", "s")
    assert code == 1
    # (the stage bars, transient, leave a blank line on stderr)
    assert err.strip().startswith("dicomflow restore: refused: projects/p/locations/l/datasets/d/")
    assert err.count("dicomflow restore:") == 1 and "--into-live" in err
    assert [ctx.closed for ctx in made] == [1, 1]
