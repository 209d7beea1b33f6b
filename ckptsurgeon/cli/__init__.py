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
    import os

    if os.environ.get("WORLD_SIZE", "1") != "1" and not _joins_the_ranks(args):
        return 0  # under torchrun, rank 0 alone runs this command
    from .fast import run_fast

    rc = run_fast(args)
    if rc is not None:
        return rc
    from .commands import run

    return run(args)


def _joins_the_ranks(args: list[str]) -> bool:
    """Under torchrun (`WORLD_SIZE` > 1): whether this rank runs `args`. A writer whose output is a
    directory of shards (hf, hf-bin, dcp; not a dry run) runs on every rank, rank 0 speaking for
    the run (the others say their errors only); everything else runs on rank 0 alone."""
    from ..errors import CheckpointError
    from ..ranks import world
    from .console import quiet_rank

    try:
        w = world()
    except CheckpointError:  # the command runs; a sharded writer says what is wrong with the world
        return True
    if not w.distributed:
        return True
    if not _writes_shards(args):
        return w.leader
    if not w.leader:
        quiet_rank()
    return True


def _writes_shards(args: list[str]) -> bool:
    """Whether `args` is a writer (not a dry run, no --help) whose output is a directory of shards,
    as far as its options say (the option table's flags; OUT as typed)."""
    from ..errors import CheckpointError
    from .options import WRITERS, Kind, options_for

    if not args or args[0] not in WRITERS:
        return False
    mine = [o for o in options_for(args[0]) if o.flags]
    valued = {flag: o.dest for o in mine if o.kind is not Kind.FLAG for flag in o.flags}
    given: dict[str, str | None] = {}
    tokens = iter(args[1:])
    for token in tokens:
        if token == "--":
            break
        if token in ("-h", "--help", "--dry-run"):
            return False
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            attached = value if eq else None
        elif token.startswith("-"):  # short options, clustered as Click allows: `-fo OUT`, `-foOUT`
            letters = token[1:]
            at = next((i for i, c in enumerate(letters) if f"-{c}" in valued), None)
            if at is None:
                continue
            name, attached = f"-{letters[at]}", letters[at + 1 :] or None
        else:
            continue
        if name in valued:
            given[valued[name]] = attached if attached is not None else next(tokens, None)
    output = given.get("output")
    if output is None:
        return False
    from ..io import output_format

    try:
        return output_format(output, given.get("format"), given.get("max_shard_size")).is_directory
    except CheckpointError:
        return False


def entrypoint() -> None:
    """The console script: `sys.exit(main())`."""
    sys.exit(main())


def __getattr__(name: str) -> Any:
    if name == "app":  # the Typer app, for typer.testing.CliRunner and embedding
        from .commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
