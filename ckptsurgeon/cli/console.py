"""Where the CLI's output goes, and the one place an exception becomes a message and an exit code.

stdout carries data only (tables, JSON, result lines); everything else is one line on stderr.
Nothing here imports typer, and rich only when a terminal is drawn on: `inspect --json` or a
piped table never loads it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..errors import EXIT_INTERNAL, EXIT_OK, CheckpointError
from . import text


def _console(stream: Any, *, soft_wrap: bool) -> Any:
    from rich.console import Console

    # Piped output is not wrapped at 80 columns: scripts read it line by line.
    return Console(file=stream, highlight=False, soft_wrap=soft_wrap, width=None if stream.isatty() else 400)


class _Consoles:
    """Rich consoles for stdout and stderr, made on first use and bound to the sys.stdout/stderr
    of the current call (test runners swap them per call)."""

    def __init__(self) -> None:
        self._streams: tuple[Any, Any] | None = None
        self._pair: tuple[Any, Any] | None = None

    def _get(self) -> tuple[Any, Any]:
        streams = (sys.stdout, sys.stderr)
        if self._pair is None or self._streams != streams:
            self._pair = (_console(sys.stdout, soft_wrap=False), _console(sys.stderr, soft_wrap=True))
            self._streams = streams
        return self._pair

    @property
    def out(self) -> Any:
        return self._get()[0]

    @property
    def err(self) -> Any:
        return self._get()[1]


consoles = _Consoles()


class _Rank:
    """Under torchrun, a rank other than 0 that runs a command with rank 0 (a sharded writer) says
    nothing but its errors: rank 0 speaks for the run."""

    quiet = False


def quiet_rank() -> None:
    """From now on, this process writes its errors only (no notices, nothing on stdout)."""
    _Rank.quiet = True
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)


def notice(message: str, style: str = "") -> None:
    """One line on stderr (styled on a terminal)."""
    if _Rank.quiet:
        return
    _line(message, style)


def _line(message: str, style: str = "") -> None:
    if sys.stderr.isatty():
        consoles.err.print(text.safe(message), markup=False, style=style or None)
    else:  # plain lines for logs and pipes (and no rich import for a quiet --json run)
        sys.stderr.write(text.safe(message) + "\n")
        sys.stderr.flush()


RICH_ROWS_MAX = 2000  # rich takes ~1 ms a row: longer tables are plain text even on a terminal


def show(table: text.TableData) -> None:
    """A table on stdout: drawn by rich on a terminal, plain aligned columns when piped."""
    if sys.stdout.isatty() and len(table.rows) <= RICH_ROWS_MAX:
        from .render import to_rich

        consoles.out.print(to_rich(table))
    else:
        sys.stdout.write(text.plain(table))


def say(line: text.Line) -> None:
    """A line of data on stdout (styled on a terminal)."""
    if sys.stdout.isatty():
        consoles.out.print(line.text, style=line.style or None, markup=False, highlight=False)
    else:
        sys.stdout.write(line.text + "\n")


class _JsonState:
    """Whether this command was asked for `--json`, and whether its document was printed."""

    wanted = False
    printed = False


def expect_json(args: Iterable[str]) -> None:
    """Note whether the command line `args` asks for `--json` (before any `--`), for a new command."""
    wanted = False
    for arg in args:
        if arg == "--":
            break
        wanted = wanted or arg == "--json"
    _JsonState.wanted, _JsonState.printed = wanted, False


def print_json(data: Mapping[str, Any]) -> None:
    sys.stdout.write(text.to_json(data, pretty=sys.stdout.isatty()) + "\n")
    sys.stdout.flush()
    _JsonState.printed = True


def error(message: str, *, kind: str, exit_code: int, prefix: str = "error: ") -> int:
    """A failure, said once: `error: MESSAGE` (`prefix` + MESSAGE) on stderr and, when the command was run with
    `--json` and printed no document yet, `{"schema_version", "error": {"exit_code", "kind",
    "message"}}` on stdout, so a step that pipes into `jq` never parses an empty stdout.
    Returns `exit_code`."""
    _line(f"{prefix}{message}", style="red")
    return _error_document(message, kind=kind, exit_code=exit_code)


def _error_document(message: str, *, kind: str, exit_code: int) -> int:
    if _JsonState.wanted and not _JsonState.printed:
        from ..summary import SCHEMA_VERSION

        body = {"exit_code": exit_code, "kind": kind, "message": message}
        print_json({"schema_version": SCHEMA_VERSION, "error": body})
    return exit_code


@contextlib.contextmanager
def warnings_as_notices() -> Iterator[None]:
    """Python warnings while a command runs (torch's, mostly): the known noise of reading a file
    (`tensors.TORCH_NOISE_WARNINGS`) silenced, any other one a `warning: ...` notice line, never a
    raw `UserWarning` with a file name and a source line."""
    import warnings

    from ..tensors import TORCH_NOISE_WARNINGS

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        said = str(message).strip().splitlines()
        notice(f"warning: {said[0] if said else category.__name__}", style="yellow")

    with warnings.catch_warnings():
        for pattern in TORCH_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.showwarning = show
        yield


PROGRESS_MIN_BYTES = 256 << 20


@contextlib.contextmanager
def progress(description: str, total_bytes: int) -> Iterator[Callable[[int], None] | None]:
    """A byte-counting progress callback drawn on stderr, for big jobs on a terminal only."""
    if total_bytes < PROGRESS_MIN_BYTES or not sys.stderr.isatty() or _Rank.quiet:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=consoles.err, transient=True) as bar:
        task = bar.add_task(description, total=total_bytes)
        yield lambda n: bar.advance(task, n)


def exit_code_for(exc: Exception) -> int:
    """Report `exc` on stderr and return the exit code it maps to (the one place this happens):
    a CheckpointError is its one-line cause and its code; a closed stdout pipe is a quiet success;
    anything else is a bug (exit 3, with the traceback). After a SIGINT or SIGTERM, whatever
    failed is its consequence (e.g. an import it cut short): its exit code, said by `main`."""
    from ..interrupts import pending

    signum = pending()
    if signum is not None:
        return 128 + signum
    if isinstance(exc, CheckpointError):
        return error(str(exc), kind=exc.kind, exit_code=exc.exit_code)
    if isinstance(exc, BrokenPipeError):
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    import traceback

    consoles.err.print("internal error (a bug in ckptsurgeon; please report it with this traceback):", markup=False)
    traceback.print_exception(exc, file=sys.stderr)
    return _error_document(f"{type(exc).__name__}: {exc}", kind="internal", exit_code=EXIT_INTERNAL)
