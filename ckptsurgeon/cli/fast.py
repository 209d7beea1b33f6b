"""`inspect` and `extract` without Typer: the commands users and CI steps run most, answered in
little more than the time of Python's own start-up.

Typer (and the click it vendors) takes longer to import than `inspect` takes to read the metadata
of a 100 GB checkpoint. `parse` reads the everyday forms of these two commands: one checkpoint and
the options the table in `options` marks `fast` (their flags, kinds and keywords come from there:
nothing is declared twice), as `--opt value`, `--opt=value` or `-oVALUE`. It declines anything else
(help, --model, --unsafe, unknown options, a missing value or output, `--`, extra arguments), which
then goes to Typer, the reference parser, with its own messages. Both run the same bodies
(`actions.inspect`, `actions.extract`); tests compare their outputs argv by argv.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from .options import Kind, options_for


class _Spec(NamedTuple):
    valued: dict[str, str]  # option -> keyword
    flags: dict[str, str]
    lists: frozenset[str]  # keywords whose option repeats
    ints: frozenset[str]  # keywords whose value is a number
    required: frozenset[str]


def _spec(command: str) -> _Spec:
    """What this parser takes of `command`: the entries of the option table marked `fast`."""
    mine = [o for o in options_for(command) if o.fast and o.flags]
    return _Spec(
        valued={flag: o.dest for o in mine if o.kind is not Kind.FLAG for flag in o.flags},
        flags={flag: o.dest for o in mine if o.kind is Kind.FLAG for flag in o.flags},
        lists=frozenset(o.dest for o in mine if o.kind is Kind.TEXTS),
        ints=frozenset(o.dest for o in mine if o.kind is Kind.INT),
        required=frozenset(o.dest for o in mine if o.required),
    )


FAST_COMMANDS = ("inspect", "extract")


def parse(args: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """(command, its keyword arguments) for `args` (a whole command line after the program name),
    or None when the command line is not one this parser takes (Typer then parses it)."""
    if len(args) < 2 or args[0] not in FAST_COMMANDS or os.environ.get("CKPTSURGEON_DEBUG"):
        return None
    spec = _spec(args[0])
    opts: dict[str, Any] = {}
    positional: list[str] = []
    i = 1
    while i < len(args):
        token = args[i]
        i += 1
        if token == "-":
            return None
        if not token.startswith("-"):
            positional.append(token)
            continue
        if token.startswith("--"):  # --name or --name=value
            name, eq, attached = token.partition("=")
            has_value = bool(eq)
        else:  # -n or -nVALUE
            name, attached = token[:2], token[2:]
            has_value = bool(attached)
        if name in spec.flags and not has_value:
            opts[spec.flags[name]] = True
        elif name in spec.valued:
            if has_value:
                value = attached
            elif i < len(args):  # the next token, whatever it looks like (as click does)
                value, i = args[i], i + 1
            else:
                return None  # a missing value: Typer says so
            dest = spec.valued[name]
            if dest in spec.ints:
                if not value.isdigit():
                    return None  # Typer says what is wrong with it
                opts[dest] = int(value)
            elif dest in spec.lists:
                opts.setdefault(dest, []).append(value)
            else:
                opts[dest] = value
        else:
            return None
    if len(positional) != 1 or not spec.required <= opts.keys():
        return None
    opts["ckpt"] = positional[0]
    return args[0], opts


def run_fast(args: Sequence[str]) -> int | None:
    """Run the command of `args` if `parse` takes them and return the exit code; else None."""
    parsed = parse(args)
    if parsed is None:
        return None
    command, opts = parsed
    import gc

    from .console import exit_code_for, expect_json, notice

    expect_json(args)

    # neither command makes reference cycles, but tens of thousands of tensors would set the
    # cyclic collector off again and again over the whole graph of the checkpoint
    collecting = gc.isenabled()
    gc.disable()
    try:
        from ..safety import check_torch_version
        from . import actions

        check_torch_version()
        body = actions.extract if command == "extract" else actions.inspect
        return body(**opts)
    except KeyboardInterrupt:
        notice("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 (exit_code_for is where every error is mapped)
        return exit_code_for(exc)
    finally:
        if collecting:
            gc.enable()
