"""The command line: parse, call one core function, render. All printing and exiting lives here."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from typer.core import TyperGroup

from .. import _version
from ..errors import EXIT_BAD_INPUT, EXIT_DIFFERENT, EXIT_OK, UsageError
from ..merge import OnConflict
from . import actions, text
from .console import error, exit_code_for, expect_json, notice, print_json, progress, say, show, total_bytes
from .options import Kind, Opt, options_for

# Typer vendors click and exports only BadParameter of its exceptions; its base is UsageError.
ClickUsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _is_no_args_help(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoArgsIsHelpError"


class _SurgeonGroup(TyperGroup):
    """Runs every command inside `_errors_to_exit_codes`: the one place errors become exit codes."""

    def invoke(self, ctx: Any) -> Any:
        expect_json([*getattr(ctx, "_protected_args", ()), *ctx.args])
        with _errors_to_exit_codes():
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


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- commands


def _inspect(**options: Any) -> int:
    """List tensors (key, shape, dtype, elements, bytes), totals, container entries, tied storage.

    Reads metadata only (milliseconds, whatever the file size); --verify also reads the data and
    checks CRCs. With --model, mark each key as parameter, buffer, missing, unexpected or shape
    mismatch; the exit code then reports compatibility (0 compatible, 1 not).
    """
    return actions.inspect(**options)


def _extract(**options: Any) -> int:
    """Write the selected entries as a bare state_dict (the container is dropped).

    With no pattern the whole state_dict is written, which unwraps a training checkpoint.
    """
    return actions.extract(**options)


def _rename(
    *,
    ckpt: Path,
    strip_prefix: list[str] | None,
    add_prefix: str | None,
    sub: list[str] | None,
    map_file: Path | None,
    output: Path,
    force: bool,
    dry_run: bool,
    verify: bool,
    format: str | None,
    key: str | None,
    unsafe: bool,
    allow_global: list[str] | None,
    model: str | None,
    model_kwargs: str | None,
    allow_missing: bool,
    allow_unexpected: bool,
    as_json: bool,
) -> int:
    """Rename keys: --map, then --strip-prefix, then each --sub, then --add-prefix.

    The container is kept: only the state_dict inside it is renamed; every other entry is written
    back unchanged.
    """
    from ..io import OutputFormat, output_format, with_state_dict
    from ..rename import RenameRules, parse_sub
    from ..surgery import rename_state_dict

    rules = RenameRules(
        mapping=_read_map(map_file) if map_file else {},
        strip_prefixes=tuple(strip_prefix or ()),
        subs=tuple(parse_sub(s) for s in (sub or ())),
        add_prefix=add_prefix,
    )
    if rules.is_empty:
        raise UsageError("nothing to do: give --map, --strip-prefix, --sub or --add-prefix")
    if not dry_run:
        actions.check_output_first(output, [ckpt], force=force)
    ckpt_obj = actions.load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    actions.note_container(ckpt_obj)
    renamed, plan = rename_state_dict(ckpt_obj.state_dict, rules)
    model_data = actions.model_check(
        renamed,
        model,
        model_kwargs,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        ckpt_path=str(ckpt),
        out_path=str(output),
    )
    changed = sum(1 for old, new in plan.items() if old != new)
    refused_report = (
        actions.writer_report(
            "rename",
            output,
            renamed,
            dry_run=dry_run,
            format=format,
            notes=[],
            state_dict_key=ckpt_obj.state_dict_key,
            renamed=dict(plan),
            num_changed=changed,
            **actions.model_extra(model_data),
        )
        if as_json
        else None
    )
    if actions.refuse_incompatible(model_data, allow_missing, allow_unexpected, refused_report):
        return EXIT_DIFFERENT
    if changed == 0:
        notice("warning: no key changed", style="yellow")
    notes: list[str] = []
    if not dry_run:
        st_output = output_format(output, format) is OutputFormat.safetensors
        target = renamed if st_output else with_state_dict(ckpt_obj, renamed)
        if target is renamed and ckpt_obj.state_dict_path:
            notice("note: a .safetensors output holds the state_dict only; the container's other entries are dropped")
        notes = actions.write_output(
            target,
            output,
            [ckpt],
            force=force,
            verify=verify,
            safetensors_metadata=actions.safetensors_meta(ckpt_obj),
            unsafe=unsafe,
            allow_global=allow_global,
            format=format,
        )
    if as_json:
        print_json(
            actions.writer_report(
                "rename",
                output,
                renamed,
                dry_run=dry_run,
                format=format,
                notes=notes,
                state_dict_key=ckpt_obj.state_dict_key,
                renamed={old: new for old, new in plan.items()},
                num_changed=changed,
                **actions.model_extra(model_data),
            )
        )
    elif dry_run:
        show(text.rename_table(plan))
    else:
        notice(f"renamed {changed} of {len(plan)} keys")
        actions.report_done(output, renamed)
    return EXIT_OK


def _read_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--map {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--map {path}: not a JSON file: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UsageError(f"--map {path}: expected a JSON object of old name -> new name (strings)")
    return data


def _merge(
    *,
    ckpts: list[Path],
    on_conflict: OnConflict,
    average: bool,
    weights: str | None,
    output: Path,
    force: bool,
    dry_run: bool,
    verify: bool,
    format: str | None,
    key: str | None,
    unsafe: bool,
    allow_global: list[str] | None,
    model: str | None,
    model_kwargs: str | None,
    allow_missing: bool,
    allow_unexpected: bool,
    as_json: bool,
) -> int:
    """Union of the inputs' state_dicts in first-seen order, or (--average) their weighted mean."""
    from ..merge import average_state_dicts, merge_state_dicts, normalise_weights

    if len(ckpts) < 2:
        raise UsageError("merge needs at least two checkpoints")
    if weights is not None and not average:
        raise UsageError("--weights needs --average")
    parsed_weights = _parse_weights(weights) if weights is not None else None
    if average:
        normalise_weights(parsed_weights, len(ckpts))  # count and values, before any input is read
    if not dry_run:
        actions.check_output_first(output, ckpts, force=force)
    loaded = [actions.load(p, key=key, unsafe=unsafe, allow_global=allow_global) for p in ckpts]
    for c in loaded:
        actions.note_container(c)
    sds = [c.state_dict for c in loaded]
    with contextlib.ExitStack() as stack:
        if average:
            from ..io import check_output, staged_tensors
            from ..merge import check_averageable

            check_averageable(sds)
            report = None
            if dry_run:
                result = sds[0]
            else:
                check_output(output, ckpts, force=force)  # before minutes of averaging, not after
                stage = stack.enter_context(staged_tensors(output))  # the mean goes to disk as it is made
                with progress("averaging", total_bytes(sds[0].values()) * len(sds)) as advance:
                    result, report = average_state_dicts(sds, parsed_weights, progress=advance, sink=stage.add)
        else:
            result, report = merge_state_dicts(sds, on_conflict)
        model_data = actions.model_check(
            result,
            model,
            model_kwargs,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            ckpt_path=str(ckpts[0]),
            out_path=str(output),
        )
        sources = report.sources if report is not None else {k: 0 for k in result}
        refused_report = (
            actions.writer_report(
                "merge",
                output,
                result,
                dry_run=dry_run,
                format=format,
                notes=[],
                average=average,
                sources={k: str(ckpts[i]) for k, i in sources.items()},
                **actions.model_extra(model_data),
            )
            if as_json
            else None
        )
        if actions.refuse_incompatible(model_data, allow_missing, allow_unexpected, refused_report):
            return EXIT_DIFFERENT
        for w in text.merge_warnings(report) if report is not None else ():
            notice(f"warning: {w}", style="yellow")
        notes: list[str] = []
        if not dry_run:
            notes = actions.write_output(
                result,
                output,
                ckpts,
                force=force,
                verify=verify,
                unsafe=unsafe,
                allow_global=allow_global,
                format=format,
            )
    if as_json:
        print_json(
            actions.writer_report(
                "merge",
                output,
                result,
                dry_run=dry_run,
                format=format,
                notes=notes,
                average=average,
                sources={k: str(ckpts[i]) for k, i in sources.items()},
                conflicts=list(report.conflicts) if report else [],
                warnings=list(report.warnings) if report else [],
                **actions.model_extra(model_data),
            )
        )
    elif dry_run:
        rows = ((k, "mean of all inputs" if average else str(ckpts[i])) for k, i in sources.items())
        show(text.keys_table(rows, f"would write {len(result)} tensors to {output}"))
    else:
        actions.report_done(output, result)
    return EXIT_OK


def _parse_weights(value: str) -> list[float]:
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise UsageError(f"--weights {value!r}: expected comma-separated numbers") from None


def _diff(
    *,
    a: Path,
    b: Path,
    include: list[str] | None,
    exclude: list[str] | None,
    regex: bool,
    rtol: float,
    atol: float,
    ignore_dtype: bool,
    key_a: str | None,
    key_b: str | None,
    key: str | None,
    unsafe: bool,
    allow_global: list[str] | None,
    model: str | None,
    model_kwargs: str | None,
    allow_missing: bool,
    allow_unexpected: bool,
    as_json: bool,
) -> int:
    """Compare two checkpoints: keys only in one, shape, dtype and value mismatches.

    Exit 0 when identical (within --rtol/--atol), 1 when different. --key sets the state_dict of
    both sides, --key-a/--key-b one side. With --model, both sides are also checked against the
    model (exit 1 when either does not fit).
    """
    from ..diff import check_tolerances, diff_state_dicts

    check_tolerances(rtol, atol, prefix="--")  # before anything is read
    ca = actions.load(a, key=key_a if key_a is not None else key, unsafe=unsafe, allow_global=allow_global)
    cb = actions.load(b, key=key_b if key_b is not None else key, unsafe=unsafe, allow_global=allow_global)
    union = list(ca.state_dict) + [k for k in cb.state_dict if k not in ca.state_dict]
    keys = actions.select(union, include, exclude, regex) if (include or exclude) else union
    with progress("comparing", total_bytes(ca.state_dict[k] for k in keys if k in ca.state_dict)) as advance:
        report = diff_state_dicts(
            ca.state_dict, cb.state_dict, keys, rtol=rtol, atol=atol, ignore_dtype=ignore_dtype, progress=advance
        )
    models = {}
    for side, c in (("a", ca), ("b", cb)):
        m = actions.model_check(
            c.state_dict,
            model,
            model_kwargs,
            allow_missing=allow_missing,
            allow_unexpected=allow_unexpected,
            ckpt_path=str(c.path),
        )
        if m is not None:
            models[side] = m
    if as_json:
        data = report.to_dict()
        if models:
            data["model"] = {side: actions.public_model(m) for side, m in models.items()}
        print_json(data)
    else:
        table = text.diff_table(report)
        if table is not None:
            show(table)
        say(text.diff_summary(report))
        for side, m in models.items():
            for line in text.model_lines(m, allow_missing, allow_unexpected):
                say(text.Line(f"{side.upper()}: {line.text}", line.style))
    fits = all(m["compatible_allowed"] for m in models.values())
    return EXIT_OK if report.identical and fits else EXIT_DIFFERENT


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
            Kind.FLOAT: float,
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


for _name, _body in (("inspect", _inspect), ("extract", _extract), ("rename", _rename), ("merge", _merge),
                     ("diff", _diff)):  # fmt: skip
    _add_command(_name, _body)


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
