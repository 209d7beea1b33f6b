"""The option table (`ckptsurgeon.cli.options`) is the one declaration of every argument and option:
Typer's commands and the Typer-free parser are built from it. One loop over the table checks both."""

from __future__ import annotations

import typer.main

from ckptsurgeon.cli.commands import app
from ckptsurgeon.cli.fast import FAST_COMMANDS, parse
from ckptsurgeon.cli.options import COMMANDS, OPTIONS, Kind, options_for

_VALUES = {Kind.TEXT: "v", Kind.TEXTS: "v", Kind.PATH: "p.pt", Kind.FLOAT: "0.5", Kind.INT: "3"}


def _click_commands() -> dict:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_typer_takes_exactly_the_table() -> None:
    commands = _click_commands()
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        declared = {o.dest: o for o in options_for(name)}
        params = {p.name: p for p in command.params if p.name != "help"}
        assert set(params) == set(declared), name
        for dest, param in params.items():
            opt = declared[dest]
            assert set(getattr(param, "opts", ())) == set(opt.flags) or not opt.flags, (name, dest)
            assert param.required == opt.required, (name, dest)
            assert param.metavar == (opt.metavar or None), (name, dest)
            assert param.help == opt.help, (name, dest)
            assert getattr(param, "multiple", False) == (opt.kind is Kind.TEXTS), (name, dest)


def test_the_fast_parser_takes_what_the_table_marks_fast_and_nothing_else() -> None:
    for command in FAST_COMMANDS:
        base = [command, "ckpt.pt"] + (["-o", "out.pt"] if command == "extract" else [])
        for opt in OPTIONS:
            if not opt.flags or command not in opt.commands or opt.dest == "output":
                continue
            for flag in opt.flags:
                argv = base + ([flag] if opt.kind is Kind.FLAG else [flag, _VALUES.get(opt.kind, "v")])
                parsed = parse(argv)
                if not opt.fast:
                    assert parsed is None, argv  # Typer answers it
                    continue
                assert parsed is not None and parsed[0] == command, argv
                value = parsed[1][opt.dest]
                if opt.kind is Kind.INT:
                    assert value == 3, argv
                    assert parse(base + [flag, "v"]) is None, argv  # not a number: Typer says so
                    continue
                assert value == (True if opt.kind is Kind.FLAG else ["v"] if opt.kind is Kind.TEXTS else "v"), argv
        assert parse([command, "ckpt.pt", "--no-such-option"]) is None


def test_every_option_is_documented_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    missing = sorted({flag for o in OPTIONS for flag in o.flags if flag.startswith("--") and flag not in readme})
    assert not missing, missing
