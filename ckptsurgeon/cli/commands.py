"""The command line: parse, call one core function, render. All printing and exiting lives here."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import _version
from ..errors import EXIT_BAD_INPUT, EXIT_DIFFERENT, EXIT_OK, UsageError
from ..merge import OnConflict
from . import actions, text
from .console import error, exit_code_for, expect_json, notice, print_json, progress, say, show, total_bytes

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

# --------------------------------------------------------------------------- shared options

Ckpt = Annotated[
    Path, typer.Argument(help="Checkpoint file (torch.save zip or legacy format, or .safetensors).", show_default=False)
]
Include = Annotated[
    list[str] | None,
    typer.Option("--include", "-i", help="Select keys matching PATTERN (repeatable). See 'Key patterns' in README."),
]
Exclude = Annotated[list[str] | None, typer.Option("--exclude", "-x", help="Drop keys matching PATTERN (repeatable).")]
Regex = Annotated[bool, typer.Option("--regex", help="Patterns are Python regular expressions (re.search).")]
Key = Annotated[
    str | None,
    typer.Option("--key", help="Dotted path of the state_dict inside a container, e.g. 'model_state_dict'."),
]
Unsafe = Annotated[
    bool,
    typer.Option(
        "--unsafe", help="Allow a full unpickle (weights_only=False). EXECUTES CODE from the file: trusted files only."
    ),
]
AllowGlobal = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-global", help="Allow one pickle global, e.g. argparse.Namespace (repeatable); narrower than --unsafe."
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
ModelSpec = Annotated[
    str | None, typer.Option("--model", help="Check against a model: 'package.module:Name' or 'path/file.py:Name'.")
]
ModelKwargs = Annotated[
    str | None, typer.Option("--model-kwargs", help="JSON object of constructor arguments for --model.")
]
AllowMissing = Annotated[
    bool, typer.Option("--allow-missing", help="With --model: keys the model has but the checkpoint lacks are fine.")
]
AllowUnexpected = Annotated[
    bool, typer.Option("--allow-unexpected", help="With --model: keys the checkpoint has but the model lacks are fine.")
]
Output = Annotated[
    Path, typer.Option("--output", "-o", help="File to write (.safetensors: safetensors format; else torch.save).")
]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output (also when it is an input).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be written; write nothing.")]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify", help="Read the written file back and compare it with what was meant before it replaces OUT."
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log engine decisions on stderr.")]


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


@app.command()
def inspect(
    ckpt: Ckpt,
    include: Include = None,
    exclude: Exclude = None,
    regex: Regex = False,
    key: Key = None,
    as_json: JsonOut = False,
    model: ModelSpec = None,
    model_kwargs: ModelKwargs = None,
    allow_missing: AllowMissing = False,
    allow_unexpected: AllowUnexpected = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Also read all tensor data once and check every record's CRC-32.")
    ] = False,
    unsafe: Unsafe = False,
    allow_global: AllowGlobal = None,
) -> int:
    """List tensors (key, shape, dtype, elements, bytes), totals, container entries, tied storage.

    Reads metadata only (milliseconds, whatever the file size); --verify also reads the data and
    checks CRCs. With --model, mark each key as parameter, buffer, missing, unexpected or shape
    mismatch; the exit code then reports compatibility (0 compatible, 1 not).
    """
    return actions.inspect(
        ckpt,
        include=include,
        exclude=exclude,
        regex=regex,
        key=key,
        as_json=as_json,
        model=model,
        model_kwargs=model_kwargs,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        verify=verify,
        unsafe=unsafe,
        allow_global=allow_global,
    )


@app.command()
def extract(
    ckpt: Ckpt,
    output: Output,
    include: Include = None,
    exclude: Exclude = None,
    regex: Regex = False,
    key: Key = None,
    force: Force = False,
    dry_run: DryRun = False,
    verify: Verify = False,
    as_json: JsonOut = False,
    model: ModelSpec = None,
    model_kwargs: ModelKwargs = None,
    allow_missing: AllowMissing = False,
    allow_unexpected: AllowUnexpected = False,
    unsafe: Unsafe = False,
    allow_global: AllowGlobal = None,
) -> int:
    """Write the selected entries as a bare state_dict (the container is dropped).

    With no pattern the whole state_dict is written, which unwraps a training checkpoint.
    """
    return actions.extract(
        ckpt,
        output,
        include=include,
        exclude=exclude,
        regex=regex,
        key=key,
        force=force,
        dry_run=dry_run,
        verify=verify,
        as_json=as_json,
        model=model,
        model_kwargs=model_kwargs,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        unsafe=unsafe,
        allow_global=allow_global,
    )


@app.command()
def rename(
    ckpt: Ckpt,
    output: Output,
    strip_prefix: Annotated[
        list[str] | None,
        typer.Option("--strip-prefix", help="Remove prefix P where a key starts with it (repeatable, in order)."),
    ] = None,
    add_prefix: Annotated[
        str | None, typer.Option("--add-prefix", help="Prepend P to every key (applied last).")
    ] = None,
    sub: Annotated[
        list[str] | None,
        typer.Option(
            "--sub", help="sed-style s/REGEX/REPL/ on every key (repeatable, in order; Python re.sub syntax)."
        ),
    ] = None,
    map_file: Annotated[
        Path | None, typer.Option("--map", help="JSON file: an object old -> new (applied first).")
    ] = None,
    key: Key = None,
    force: Force = False,
    dry_run: DryRun = False,
    verify: Verify = False,
    as_json: JsonOut = False,
    model: ModelSpec = None,
    model_kwargs: ModelKwargs = None,
    allow_missing: AllowMissing = False,
    allow_unexpected: AllowUnexpected = False,
    unsafe: Unsafe = False,
    allow_global: AllowGlobal = None,
) -> int:
    """Rename keys: --map, then --strip-prefix, then each --sub, then --add-prefix.

    The container is kept: only the state_dict inside it is renamed; every other entry is written
    back unchanged.
    """
    from ..io import with_state_dict
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
        target = renamed if output.suffix.lower() == ".safetensors" else with_state_dict(ckpt_obj, renamed)
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
        )
    if as_json:
        print_json(
            actions.writer_report(
                "rename",
                output,
                renamed,
                dry_run=dry_run,
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


@app.command()
def merge(
    ckpts: Annotated[list[Path], typer.Argument(help="Two or more checkpoints.", show_default=False)],
    output: Output,
    on_conflict: Annotated[
        OnConflict, typer.Option("--on-conflict", help="A key in several inputs: error, first or last.")
    ] = OnConflict.error,
    average: Annotated[
        bool, typer.Option("--average", help="Weighted mean of floating-point tensors (same keys and shapes required).")
    ] = False,
    weights: Annotated[
        str | None, typer.Option("--weights", help="With --average: comma-separated weights, normalised to sum 1.")
    ] = None,
    key: Key = None,
    force: Force = False,
    dry_run: DryRun = False,
    verify: Verify = False,
    as_json: JsonOut = False,
    model: ModelSpec = None,
    model_kwargs: ModelKwargs = None,
    allow_missing: AllowMissing = False,
    allow_unexpected: AllowUnexpected = False,
    unsafe: Unsafe = False,
    allow_global: AllowGlobal = None,
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
                result, output, ckpts, force=force, verify=verify, unsafe=unsafe, allow_global=allow_global
            )
    if as_json:
        print_json(
            actions.writer_report(
                "merge",
                output,
                result,
                dry_run=dry_run,
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


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="First checkpoint (A).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="Second checkpoint (B).", show_default=False)],
    include: Include = None,
    exclude: Exclude = None,
    regex: Regex = False,
    rtol: Annotated[
        float, typer.Option("--rtol", help="Relative tolerance: equal when |a-b| <= atol + rtol*|b|.", min=0.0)
    ] = 0.0,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.", min=0.0)] = 0.0,
    ignore_dtype: Annotated[
        bool,
        typer.Option(
            "--ignore-dtype",
            help="Report dtype changes but do not count them as differences (values must still agree).",
        ),
    ] = False,
    key: Key = None,
    key_a: Annotated[
        str | None, typer.Option("--key-a", help="Dotted path of A's state_dict (overrides --key for A).")
    ] = None,
    key_b: Annotated[
        str | None, typer.Option("--key-b", help="Dotted path of B's state_dict (overrides --key for B).")
    ] = None,
    as_json: JsonOut = False,
    model: ModelSpec = None,
    model_kwargs: ModelKwargs = None,
    allow_missing: AllowMissing = False,
    allow_unexpected: AllowUnexpected = False,
    unsafe: Unsafe = False,
    allow_global: AllowGlobal = None,
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
