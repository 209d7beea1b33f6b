"""The Typer command line: the commands built from the option table, each body (in `actions`) parse ->
one core job -> render; errors become exit codes here."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from typer.core import TyperGroup

from .. import _version
from ..errors import EXIT_BAD_INPUT, EXIT_OK
from . import actions
from .console import error, exit_code_for, expect_json, notice, warnings_as_notices
from .options import COMMANDS, Kind, Opt, options_for

# Typer vendors click and exports only BadParameter of its exceptions; its base is UsageError.
ClickUsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _is_no_args_help(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoArgsIsHelpError"


class _SurgeonGroup(TyperGroup):
    """Runs every command inside `_errors_to_exit_codes`: the one place errors become exit codes."""

    def invoke(self, ctx: Any) -> Any:
        expect_json([*getattr(ctx, "_protected_args", ()), *ctx.args])
        with _errors_to_exit_codes(), warnings_as_notices():
            from ..safety import check_torch_version

            check_torch_version()
            rv = super().invoke(ctx)
        if isinstance(rv, int) and rv != EXIT_OK:
            raise typer.Exit(rv)
        return rv


@contextlib.contextmanager
def _errors_to_exit_codes() -> Iterator[None]:
    """Around every command: a usage error -> its message and exit 2; anything else goes to
    `console.exit_code_for`, the one place exceptions become exit codes."""
    try:
        yield
    except ClickUsageError as exc:
        if _is_no_args_help(exc):
            raise
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx else "ckptsurgeon"
        error(f"{exc.format_message()} (see '{command} --help')", kind="usage", exit_code=EXIT_BAD_INPUT)  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise typer.Exit(exit_code_for(exc)) from None


app = typer.Typer(
    name="ckptsurgeon",
    cls=_SurgeonGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Safe, scriptable surgery on PyTorch checkpoints: inspect, extract, merge, rename, diff.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"ckptsurgeon {_version.__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Safe, scriptable surgery on PyTorch checkpoints."""


# ------------------------------------------------------ the commands, built from the option table


def _annotation(opt: Opt) -> Any:
    """`Annotated[type, typer.Argument/Option(...)]` for one entry of the option table."""
    python_type: Any
    if opt.kind is Kind.CHOICE:
        assert opt.choices is not None
        module, _, name = opt.choices.partition(":")
        python_type = getattr(importlib.import_module(module), name)
    else:
        python_type = {
            Kind.FLAG: bool,
            Kind.TEXT: str | None,
            Kind.TEXTS: list[str] | None,
            Kind.PATH: Path if opt.required else Path | None,
            Kind.PATHS: list[Path],
            Kind.LOCATION: str if opt.required else str | None,
            Kind.LOCATIONS: list[str],
            Kind.FLOAT: float,
            Kind.INT: int | None,
        }[opt.kind]
    if not opt.flags:
        return Annotated[python_type, typer.Argument(help=opt.help, metavar=opt.metavar, show_default=False)]
    show_default = opt.kind in (Kind.FLOAT, Kind.CHOICE)
    info = typer.Option(*opt.flags, help=opt.help, metavar=opt.metavar or None, show_default=show_default)
    return Annotated[python_type, info]


def _add_command(name: str, body: Callable[..., int]) -> None:
    """Register `body` as command `name`, its parameters those of the option table."""
    params = []
    for opt in options_for(name):
        default: Any = Parameter.empty if opt.required else opt.default
        if opt.kind is Kind.CHOICE and default is not None:
            default = get_args(_annotation(opt))[0](default)
        params.append(Parameter(opt.dest, Parameter.KEYWORD_ONLY, default=default, annotation=_annotation(opt)))

    def command(**options: Any) -> int:
        return body(**options)

    command.__signature__ = Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = body.__doc__
    app.command(name)(command)


for _name in COMMANDS:  # the bodies (parse -> one core job -> render) are in `actions`, shared with `fast`
    _add_command(_name, getattr(actions, _name))


# --------------------------------------------------------------------------- entry points


def run(args: Sequence[str]) -> int:
    """Run the Typer CLI on `args` and return the exit code; never raises SystemExit."""
    if os.environ.get("CKPTSURGEON_DEBUG"):
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    try:
        rv = app(args=list(args), prog_name="ckptsurgeon", standalone_mode=False)
    except ClickUsageError as exc:  # top-level options, unknown command, no arguments at all
        ctx = getattr(exc, "ctx", None)
        if _is_no_args_help(exc) and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")
        else:
            error(f"{exc.format_message()} (see 'ckptsurgeon --help')", kind="usage", exit_code=EXIT_BAD_INPUT)  # type: ignore[attr-defined]
        return EXIT_BAD_INPUT
    except (typer.Abort, KeyboardInterrupt):
        notice("interrupted")
        return 130
    return int(rv) if isinstance(rv, int) else EXIT_OK
