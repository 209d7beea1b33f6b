"""The ckptsurgeon command line (the only part of the package that imports typer and rich).

`main` answers the everyday `inspect` and `extract` calls through `fast` (no Typer import: the
whole process is then little more than Python's own start-up and the work itself) and hands
everything else to Typer (`commands`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import EXIT_INTERNAL

__all__ = ["app", "entrypoint", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return the exit code; never raises SystemExit.

    SIGINT and SIGTERM are handled from the first moment (before torch or Typer is imported):
    the command then ends with 130 / 143, its output untouched (see `ckptsurgeon.interrupts`).
    """
    from .. import interrupts
    from .console import error, expect_json, warnings_as_notices

    args = list(sys.argv[1:] if argv is None else argv)
    expect_json(args)
    with interrupts.handling_signals():
        rc: int | None = None
        try:
            try:
                with warnings_as_notices():
                    rc = _dispatch(args)
            finally:
                interrupts.hold()  # the command is over: a signal now is only recorded
        except interrupts.Interrupted:
            pass
        signum = interrupts.pending()
        if signum is not None:
            said = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
            return error(said, kind="interrupted", exit_code=128 + signum, prefix="")
        return rc if rc is not None else EXIT_INTERNAL


def _dispatch(args: list[str]) -> int:
    from .fast import run_fast

    rc = run_fast(args)
    if rc is not None:
        return rc
    from .commands import run

    return run(args)


def entrypoint() -> None:
    """The console script: `sys.exit(main())`."""
    sys.exit(main())


def __getattr__(name: str) -> Any:
    if name == "app":  # the Typer app, for typer.testing.CliRunner and embedding
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
