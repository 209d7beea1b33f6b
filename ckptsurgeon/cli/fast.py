"""`inspect` without Typer: the command users and CI steps run most, answered in the time of
Python's own start-up.

Typer (and the click it vendors) takes longer to import than `inspect` takes to read the metadata
of a 100 GB checkpoint. `parse_inspect` reads the everyday forms of `ckptsurgeon inspect` (one
checkpoint; --include/-i, --exclude/-x, --regex, --key, --json, --verify; `--opt=value`, `-iVALUE`)
and declines anything else (help, --model, --unsafe, unknown options, a missing value, `--`, extra
arguments), which then goes to Typer, the reference parser, with its own messages. Both run the
same body (`actions.inspect`); tests compare their outputs argv by argv.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

_VALUED = {"--include": "include", "-i": "include", "--exclude": "exclude", "-x": "exclude", "--key": "key"}
_FLAGS = {"--json": "as_json", "--regex": "regex", "--verify": "verify"}
_LISTS = frozenset({"include", "exclude"})


def parse_inspect(args: Sequence[str]) -> Optional[dict[str, Any]]:
    """`inspect`'s keyword arguments for `args` (a whole command line after the program name), or
    None when the command line is not one this parser takes (Typer then parses it)."""
    if len(args) < 2 or args[0] != "inspect" or os.environ.get("CKPTSURGEON_DEBUG"):
        return None
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
        if name in _FLAGS and not has_value:
            opts[_FLAGS[name]] = True
        elif name in _VALUED:
            if has_value:
                value = attached
            elif i < len(args):  # the next token, whatever it looks like (as click does)
                value, i = args[i], i + 1
            else:
                return None  # a missing value: Typer says so
            dest = _VALUED[name]
            if dest in _LISTS:
                opts.setdefault(dest, []).append(value)
            else:
                opts[dest] = value
        else:
            return None
    if len(positional) != 1:
        return None
    opts["ckpt"] = positional[0]
    return opts


def run_fast(args: Sequence[str]) -> Optional[int]:
    """Run `inspect` for `args` if `parse_inspect` takes them and return the exit code; else None."""
    opts = parse_inspect(args)
    if opts is None:
        return None
    import gc
    from pathlib import Path

    from .console import exit_code_for, notice

    # inspect makes no reference cycles, but its tens of thousands of rows would set the cyclic
    # collector off again and again over the whole graph of the checkpoint
    collecting = gc.isenabled()
    gc.disable()
    try:
        from ..safety import check_torch_version
        from .actions import inspect

        check_torch_version()
        return inspect(Path(opts.pop("ckpt")), **opts)
    except KeyboardInterrupt:
        notice("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 (exit_code_for is where every error is mapped)
        return exit_code_for(exc)
    finally:
        if collecting:
            gc.enable()
