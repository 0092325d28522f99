"""What the subcommands share: how one is declared, argument types, the time window, output.

A subcommand is a ``Command``: its handler takes the context factory and the parsed
arguments and returns the exit status (0 ok, 1 the work failed or was refused, 2 usage).
The handler's docstring is the subcommand's help (first line) and description (the rest).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TypeVar

from rich.console import Console, RenderableType
from rich.progress import Progress, TaskID

from dicomflow.runtime import Context

ContextFactory = Callable[[], Context]
Handler = Callable[[ContextFactory, argparse.Namespace], int]
T = TypeVar("T")


class UsageError(Exception):
    """The command line asks for something that cannot be done as written (exit status 2)."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    """A subcommand: ``name`` (``"alerts tail"`` for one inside a group), its handler and
    the function that adds its arguments."""

    name: str
    handler: Handler
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments

    @property
    def help(self) -> str:
        """The docstring's first line, as argparse words its own: lower case, no full stop."""
        summary = self._doc()[0]
        return summary[:1].lower() + summary[1:]

    @property
    def description(self) -> str:
        summary, details = self._doc()
        return details or summary

    def _doc(self) -> tuple[str, str]:
        doc = inspect.getdoc(self.handler)
        if not doc:
            raise TypeError(f"the handler of {self.name!r} has no docstring to show as its help")
        summary, _, details = doc.partition("\n\n")
        return summary.rstrip("."), details


# ---- argument types --------------------------------------------------------------------------


def _argument_type(parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def day(text: str) -> date:
    """``--date``: a backup's date, ``YYYY-MM-DD``."""
    from dicomflow import backup

    return _argument_type(backup.parse_day, text)


def mime_type(text: str) -> str:
    """``--mime-type``: an export format the Healthcare API takes."""
    from dicomflow.config import parse_mime_type

    _argument_type(parse_mime_type, text)
    return text


def since_time(text: str) -> datetime:
    """``--since``: an ISO time (UTC when it names no zone)."""
    from dicomflow.clock import parse_time

    moment = parse_time(text)
    if moment is None:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}")
    return moment


def window_arguments(parser: argparse.ArgumentParser) -> None:
    """``--since`` or ``--hours``: the time window that ``window`` returns."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--since", type=since_time, help="start of the window, ISO time (UTC)")
    group.add_argument("--hours", type=float, default=24.0, help="window length (default 24)")


def window(ctx: Context, args: argparse.Namespace) -> tuple[datetime, datetime]:
    """(now, start of the window) from ``--since`` or ``--hours``."""
    now = ctx.clock()
    return now, args.since or now - timedelta(hours=args.hours)


# ---- output ----------------------------------------------------------------------------------


def stderr_console() -> Console:
    return Console(file=sys.stderr)


def show(renderable: RenderableType) -> None:
    """Print a table or other rich renderable on stdout, at least 120 columns wide."""
    Console(width=max(120, Console().width)).print(renderable)


def emit(args: argparse.Namespace, result: object, human: RenderableType) -> None:
    """Print ``result`` as JSON with ``--json``, else ``human`` (plain text, or a table)."""
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif isinstance(human, str):
        print(human)
    else:
        show(human)


class Bars:
    """Transient progress bars on stderr, one a label, for ``progress(label, done, total)``."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.progress = Progress(console=stderr_console(), transient=True)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(f"{self.prefix}{label}", total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)
