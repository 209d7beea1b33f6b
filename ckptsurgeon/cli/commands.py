"""The command line: parse, call one core function, render. All printing and exiting lives here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import importlib
import typer
from typer.core import TyperGroup

from .. import _version
from . import text
from ..merge import OnConflict
from ..errors import EXIT_BAD_INPUT, EXIT_DIFFERENT, EXIT_INTERNAL, EXIT_OK, CheckpointError, UsageError


class _Lazy:
    """A module imported on first attribute access: `--help` and `--version` never load rich."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


render: Any = _Lazy("ckptsurgeon.cli.render")
JSON_SCHEMA_VERSION = 1

# Typer vendors click and exports only BadParameter of its exceptions; its base is UsageError.
ClickUsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _is_no_args_help(exc: BaseException) -> bool:
    return type(exc).__name__ == "NoArgsIsHelpError"

class _SurgeonGroup(TyperGroup):
    """Runs every command inside `_errors_to_exit_codes`: the one place errors become exit codes."""

    def invoke(self, ctx: Any) -> Any:
        with _errors_to_exit_codes():
            from ..safety import check_torch_version

            check_torch_version()
            rv = super().invoke(ctx)
        if isinstance(rv, int) and rv != EXIT_OK:
            raise typer.Exit(rv)
        return rv


@contextlib.contextmanager
def _errors_to_exit_codes() -> Iterator[None]:
    """CheckpointError -> its one-line cause and exit code; usage error -> 2; anything else -> 3."""
    try:
        yield
    except CheckpointError as exc:
        notice(f"error: {exc}", style="red")
        raise typer.Exit(exc.exit_code) from None
    except ClickUsageError as exc:
        if _is_no_args_help(exc):
            raise
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx else "ckptsurgeon"
        notice(f"error: {exc.format_message()} (see '{command} --help')", style="red")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None
    except Exception:
        _consoles.err.print("internal error (a bug in ckptsurgeon; please report it with this traceback):", markup=False)
        traceback.print_exc(file=sys.stderr)
        raise typer.Exit(EXIT_INTERNAL) from None


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

def _console(stream: Any, *, soft_wrap: bool) -> Any:
    from rich.console import Console

    # Piped output is not wrapped at 80 columns: scripts read it line by line.
    return Console(file=stream, highlight=False, soft_wrap=soft_wrap, width=None if stream.isatty() else 400)


class _Consoles:
    """stdout carries data only; everything else goes to stderr, one message a line.

    Made on first use and bound to the sys.stdout/stderr of the current call (test runners swap
    them per call).
    """

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


_consoles = _Consoles()


def notice(message: str, style: str = "") -> None:
    if sys.stderr.isatty():
        _consoles.err.print(text.safe(message), markup=False, style=style or None)
    else:  # plain lines for logs and pipes (and no rich import for a quiet --json run)
        sys.stderr.write(text.safe(message) + "\n")
        sys.stderr.flush()


RICH_ROWS_MAX = 2000  # rich takes ~1 ms a row: longer tables are plain text even on a terminal


def _show(table: text.TableData) -> None:
    """A table on stdout: drawn by rich on a terminal, plain aligned columns when piped."""
    if sys.stdout.isatty() and len(table.rows) <= RICH_ROWS_MAX:
        _consoles.out.print(render.to_rich(table))
    else:
        sys.stdout.write(text.plain(table))


def _say(line: text.Line) -> None:
    """A line of data on stdout (styled on a terminal)."""
    if sys.stdout.isatty():
        _consoles.out.print(line.text, style=line.style or None, markup=False, highlight=False)
    else:
        sys.stdout.write(line.text + "\n")


def print_json(data: Mapping[str, Any]) -> None:
    sys.stdout.write(text.to_json(data, pretty=sys.stdout.isatty()) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- shared options

Ckpt = Annotated[Path, typer.Argument(help="Checkpoint file (torch.save zip or legacy format, or .safetensors).", show_default=False)]
Include = Annotated[
    Optional[list[str]],
    typer.Option("--include", "-i", help="Select keys matching PATTERN (repeatable). See 'Key patterns' in README."),
]
Exclude = Annotated[Optional[list[str]], typer.Option("--exclude", "-x", help="Drop keys matching PATTERN (repeatable).")]
Regex = Annotated[bool, typer.Option("--regex", help="Patterns are Python regular expressions (re.search).")]
Key = Annotated[Optional[str], typer.Option("--key", help="Dotted path of the state_dict inside a container, e.g. 'model_state_dict'.")]
Unsafe = Annotated[
    bool, typer.Option("--unsafe", help="Allow a full unpickle (weights_only=False). EXECUTES CODE from the file: trusted files only.")
]
AllowGlobal = Annotated[
    Optional[list[str]],
    typer.Option("--allow-global", help="Allow one pickle global, e.g. argparse.Namespace (repeatable); narrower than --unsafe."),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
ModelSpec = Annotated[
    Optional[str], typer.Option("--model", help="Check against a model: 'package.module:Name' or 'path/file.py:Name'.")
]
ModelKwargs = Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON object of constructor arguments for --model.")]
AllowMissing = Annotated[bool, typer.Option("--allow-missing", help="With --model: keys the model has but the checkpoint lacks are fine.")]
AllowUnexpected = Annotated[
    bool, typer.Option("--allow-unexpected", help="With --model: keys the checkpoint has but the model lacks are fine.")
]
Output = Annotated[Path, typer.Option("--output", "-o", help="File to write (.safetensors: safetensors format; else torch.save).")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output (also when it is an input).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would be written; write nothing.")]
Verify = Annotated[bool, typer.Option("--verify", help="Read the written file back and compare it with what was meant before it replaces OUT.")]
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


def _load(path: Path, *, key: Optional[str], unsafe: bool, allow_global: Optional[list[str]]) -> Any:
    from ..io import load_checkpoint

    if unsafe:
        notice(f"warning: --unsafe: {path} is fully unpickled; it can run code", style="yellow")
    return load_checkpoint(path, unsafe=unsafe, key=key, allow_globals=_checked_globals(allow_global))


def _checked_globals(names: Optional[list[str]]) -> tuple[str, ...]:
    if not names:
        return ()
    from ..safety import resolve_allowed_globals

    resolve_allowed_globals(names)  # refuse code-running names before anything is read
    return tuple(names)


def _select(keys: Sequence[str], include: Optional[list[str]], exclude: Optional[list[str]], regex: bool) -> list[str]:
    from ..errors import SelectionError
    from ..patterns import select_keys, unmatched_includes

    selected = select_keys(keys, include or (), exclude or (), regex=regex)
    for p in unmatched_includes(keys, include or (), regex=regex):
        notice(f"warning: --include {p!r} matches no key", style="yellow")
    if not selected:
        raise SelectionError("nothing selected: no key matches the patterns")
    return selected


def _note_container(ckpt: Any) -> None:
    if ckpt.state_dict_key:
        notice(f"using the state_dict at key {ckpt.state_dict_key!r} of {ckpt.path}")


def _model_check(
    state_dict: Mapping[str, Any],
    spec: Optional[str],
    kwargs: Optional[str],
    *,
    allow_missing: bool,
    allow_unexpected: bool,
    ckpt_path: str,
    out_path: str = "OUT",
) -> Optional[dict[str, Any]]:
    """Run the --model check; returns its JSON-ready result (None without --model)."""
    if spec is None:
        if kwargs is not None:
            raise UsageError("--model-kwargs needs --model")
        return None
    from ..model import check_model, load_model
    from ..tensors import shape_of

    model = load_model(spec, kwargs)
    report = check_model(
        {k: shape_of(v) for k, v in state_dict.items()}, model, metadata=getattr(state_dict, "_metadata", None)
    )
    data = report.to_dict()
    data["suggestions"] = [s.command(ckpt_path, out_path) for s in report.renames]
    data["compatible_allowed"] = report.compatible(allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    data["kinds"] = dict(report.kinds)
    data["model"] = spec
    return data


def _public_model(data: Optional[dict[str, Any]]) -> dict[str, Any]:
    if data is None:
        return {}
    hidden = {"kinds", "compatible_allowed"}
    out = {k: v for k, v in data.items() if k not in hidden}
    out["compatible_with_allowances"] = data["compatible_allowed"]
    return out


def _refuse_incompatible(model: Optional[dict[str, Any]], allow_missing: bool, allow_unexpected: bool) -> None:
    if model is not None and not model["compatible_allowed"]:
        for line in text.model_lines(model, allow_missing, allow_unexpected):
            notice(line.text, line.style)
        notice("nothing written: the result does not fit the model (see --allow-missing / --allow-unexpected)", style="red")
        raise typer.Exit(EXIT_DIFFERENT)


def _write(
    obj: Any,
    output: Path,
    inputs: Sequence[Path],
    *,
    force: bool,
    verify: bool,
    safetensors_metadata: Any = None,
    unsafe: bool = False,
    allow_global: Optional[list[str]] = None,
) -> list[str]:
    from ..io import check_output, save_checkpoint

    from ..io import iter_tensors

    check_output(output, inputs, force=force)
    with _progress("writing", _total_bytes(iter_tensors(obj))) as progress:
        notes = save_checkpoint(
            obj, output, safetensors_metadata=safetensors_metadata, verify=verify, progress=progress,
            unsafe=unsafe, allow_globals=tuple(allow_global or ()),
        )
    for n in notes:
        notice(f"note: {n}")
    return notes


def _writer_report(command: str, output: Path, state_dict: Mapping[str, Any], *, dry_run: bool, notes: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": command,
        "output": str(output),
        "dry_run": dry_run,
        "written": not dry_run,
        "keys": list(state_dict),
        "num_tensors": len(state_dict),
        "total_bytes": _total_bytes(state_dict.values()),
        "notes": list(notes),
        **extra,
    }


PROGRESS_MIN_BYTES = 256 << 20


@contextlib.contextmanager
def _progress(description: str, total_bytes: int) -> Iterator[Optional[Any]]:
    """A byte-counting progress callback drawn on stderr, for big jobs on a terminal only."""
    if total_bytes < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_consoles.err, transient=True) as bar:
        task = bar.add_task(description, total=total_bytes)
        yield lambda n: bar.advance(task, n)


def _total_bytes(tensors: Iterable[Any]) -> int:
    from ..tensors import nbytes_of

    return sum(nbytes_of(t) for t in tensors)


def _done(output: Path, state_dict: Mapping[str, Any]) -> None:
    total = _total_bytes(state_dict.values())
    notice(f"wrote {len(state_dict)} tensors ({text.human_bytes(total)}) to {output}")


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
    from ..containers import describe_value
    from ..summary import inspect_state_dict

    ckpt_obj = _load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    if verify:
        from ..io import iter_tensors, verify_data

        with _progress("verifying", _total_bytes(iter_tensors(ckpt_obj.container))) as progress:
            verify_data(ckpt_obj, progress)
    keys = _select(list(ckpt_obj.state_dict), include, exclude, regex) if (include or exclude) else list(ckpt_obj.state_dict)
    report = inspect_state_dict(
        ckpt_obj.state_dict,
        keys,
        format=ckpt_obj.format,
        state_dict_key=ckpt_obj.state_dict_key,
        other_entries=[(k, describe_value(v)) for k, v in ckpt_obj.other_entries()],
    )
    selection = {k: ckpt_obj.state_dict[k] for k in keys}
    if getattr(ckpt_obj.state_dict, "_metadata", None) is not None:
        from ..io import make_state_dict

        selection = make_state_dict(list(selection.items()), ckpt_obj.state_dict._metadata)
    model_data = _model_check(
        selection, model, model_kwargs, allow_missing=allow_missing, allow_unexpected=allow_unexpected, ckpt_path=str(ckpt)
    )
    if as_json:
        data = report.to_dict()
        data.update(_public_model(model_data))
        if model_data is not None:
            data["kinds"] = model_data["kinds"]
        print_json(data)
    else:
        _show(text.inspect_table(report, model_data["kinds"] if model_data else None, model_data))
        if len(report.dtypes) > 1:
            _show(text.dtype_table(report))
        for line in text.other_entries_lines(report.other_entries) + text.shared_lines(report.shared_storage):
            _say(line)
        if model_data is not None:
            for line in text.model_lines(model_data, allow_missing, allow_unexpected):
                _say(line)
    if model_data is not None and not model_data["compatible_allowed"]:
        return EXIT_DIFFERENT
    return EXIT_OK


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
    from ..surgery import extract_state_dict

    ckpt_obj = _load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    _note_container(ckpt_obj)
    keys = _select(list(ckpt_obj.state_dict), include, exclude, regex)
    result = extract_state_dict(ckpt_obj.state_dict, keys)
    model_data = _model_check(
        result, model, model_kwargs, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
        ckpt_path=str(ckpt), out_path=str(output),
    )
    _refuse_incompatible(model_data, allow_missing, allow_unexpected)
    notes: list[str] = []
    if not dry_run:
        notes = _write(result, output, [ckpt], force=force, verify=verify, safetensors_metadata=_st_meta(ckpt_obj), unsafe=unsafe, allow_global=allow_global)
    if as_json:
        print_json(
            _writer_report("extract", output, result, dry_run=dry_run, notes=notes, state_dict_key=ckpt_obj.state_dict_key, **_model_extra(model_data))
        )
    elif dry_run:
        _show(text.keys_table(((k, str(ckpt)) for k in result), f"would write {len(result)} tensors to {output}"))
    else:
        _done(output, result)
    return EXIT_OK


def _model_extra(model_data: Optional[dict[str, Any]]) -> dict[str, Any]:
    return {"model": _public_model(model_data)} if model_data is not None else {}


def _st_meta(ckpt_obj: Any) -> Any:
    return ckpt_obj.safetensors_metadata if ckpt_obj.format == "safetensors" else None


@app.command()
def rename(
    ckpt: Ckpt,
    output: Output,
    strip_prefix: Annotated[Optional[list[str]], typer.Option("--strip-prefix", help="Remove prefix P where a key starts with it (repeatable, in order).")] = None,
    add_prefix: Annotated[Optional[str], typer.Option("--add-prefix", help="Prepend P to every key (applied last).")] = None,
    sub: Annotated[Optional[list[str]], typer.Option("--sub", help="sed-style s/REGEX/REPL/ on every key (repeatable, in order; Python re.sub syntax).")] = None,
    map_file: Annotated[Optional[Path], typer.Option("--map", help="JSON file: an object old -> new (applied first).")] = None,
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
    ckpt_obj = _load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    _note_container(ckpt_obj)
    renamed, plan = rename_state_dict(ckpt_obj.state_dict, rules)
    model_data = _model_check(
        renamed, model, model_kwargs, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
        ckpt_path=str(ckpt), out_path=str(output),
    )
    _refuse_incompatible(model_data, allow_missing, allow_unexpected)
    changed = sum(1 for old, new in plan.items() if old != new)
    if changed == 0:
        notice("warning: no key changed", style="yellow")
    notes: list[str] = []
    if not dry_run:
        target = renamed if output.suffix.lower() == ".safetensors" else with_state_dict(ckpt_obj, renamed)
        if target is renamed and ckpt_obj.state_dict_path:
            notice("note: a .safetensors output holds the state_dict only; the container's other entries are dropped")
        notes = _write(target, output, [ckpt], force=force, verify=verify, safetensors_metadata=_st_meta(ckpt_obj), unsafe=unsafe, allow_global=allow_global)
    if as_json:
        print_json(
            _writer_report(
                "rename", output, renamed, dry_run=dry_run, notes=notes, state_dict_key=ckpt_obj.state_dict_key,
                renamed={old: new for old, new in plan.items()}, num_changed=changed, **_model_extra(model_data),
            )
        )
    elif dry_run:
        _show(text.rename_table(plan))
    else:
        notice(f"renamed {changed} of {len(plan)} keys")
        _done(output, renamed)
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
    on_conflict: Annotated[OnConflict, typer.Option("--on-conflict", help="A key in several inputs: error, first or last.")] = OnConflict.error,
    average: Annotated[bool, typer.Option("--average", help="Weighted mean of floating-point tensors (same keys and shapes required).")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help="With --average: comma-separated weights, normalised to sum 1.")] = None,
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
    from ..merge import average_state_dicts, merge_state_dicts

    if len(ckpts) < 2:
        raise UsageError("merge needs at least two checkpoints")
    if weights is not None and not average:
        raise UsageError("--weights needs --average")
    parsed_weights = _parse_weights(weights) if weights is not None else None
    loaded = [_load(p, key=key, unsafe=unsafe, allow_global=allow_global) for p in ckpts]
    for c in loaded:
        _note_container(c)
    sds = [c.state_dict for c in loaded]
    with contextlib.ExitStack() as stack:
        if average:
            from ..io import check_output, staged_tensors
            from ..merge import check_averageable, normalise_weights

            check_averageable(sds)
            normalise_weights(parsed_weights, len(sds))
            report = None
            if dry_run:
                result = sds[0]
            else:
                check_output(output, ckpts, force=force)  # before minutes of averaging, not after
                stage = stack.enter_context(staged_tensors(output))  # the mean goes to disk as it is made
                with _progress("averaging", _total_bytes(sds[0].values()) * len(sds)) as progress:
                    result, report = average_state_dicts(sds, parsed_weights, progress=progress, sink=stage.add)
        else:
            result, report = merge_state_dicts(sds, on_conflict)
        model_data = _model_check(
            result, model, model_kwargs, allow_missing=allow_missing, allow_unexpected=allow_unexpected,
            ckpt_path=str(ckpts[0]), out_path=str(output),
        )
        _refuse_incompatible(model_data, allow_missing, allow_unexpected)
        sources = report.sources if report is not None else {k: 0 for k in result}
        for w in report.warnings if report is not None else ():
            notice(f"warning: {w}", style="yellow")
        notes: list[str] = []
        if not dry_run:
            notes = _write(result, output, ckpts, force=force, verify=verify, unsafe=unsafe, allow_global=allow_global)
    if as_json:
        print_json(
            _writer_report(
                "merge", output, result, dry_run=dry_run, notes=notes, average=average,
                sources={k: str(ckpts[i]) for k, i in sources.items()},
                conflicts=list(report.conflicts) if report else [],
                warnings=list(report.warnings) if report else [],
                **_model_extra(model_data),
            )
        )
    elif dry_run:
        rows = ((k, "mean of all inputs" if average else str(ckpts[i])) for k, i in sources.items())
        _show(text.keys_table(rows, f"would write {len(result)} tensors to {output}"))
    else:
        _done(output, result)
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
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance: equal when |a-b| <= atol + rtol*|b|.", min=0.0)] = 0.0,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.", min=0.0)] = 0.0,
    key: Key = None,
    as_json: JsonOut = False,
    model: ModelSpec = None,
    model_kwargs: ModelKwargs = None,
    allow_missing: AllowMissing = False,
    allow_unexpected: AllowUnexpected = False,
    unsafe: Unsafe = False,
    allow_global: AllowGlobal = None,
) -> int:
    """Compare two checkpoints: keys only in one, shape, dtype and value mismatches.

    Exit 0 when identical (within --rtol/--atol), 1 when different. With --model, both sides are
    also checked against the model (exit 1 when either does not fit).
    """
    from ..diff import diff_state_dicts

    ca = _load(a, key=key, unsafe=unsafe, allow_global=allow_global)
    cb = _load(b, key=key, unsafe=unsafe, allow_global=allow_global)
    union = list(ca.state_dict) + [k for k in cb.state_dict if k not in ca.state_dict]
    keys = _select(union, include, exclude, regex) if (include or exclude) else union
    with _progress("comparing", _total_bytes(ca.state_dict[k] for k in keys if k in ca.state_dict)) as progress:
        report = diff_state_dicts(ca.state_dict, cb.state_dict, keys, rtol=rtol, atol=atol, progress=progress)
    models = {}
    for side, c in (("a", ca), ("b", cb)):
        m = _model_check(c.state_dict, model, model_kwargs, allow_missing=allow_missing, allow_unexpected=allow_unexpected, ckpt_path=str(c.path))
        if m is not None:
            models[side] = m
    if as_json:
        data = report.to_dict()
        if models:
            data["model"] = {side: _public_model(m) for side, m in models.items()}
        print_json(data)
    else:
        table = text.diff_table(report)
        if table is not None:
            _show(table)
        _say(text.diff_summary(report))
        for side, m in models.items():
            for line in text.model_lines(m, allow_missing, allow_unexpected):
                _say(text.Line(f"{side.upper()}: {line.text}", line.style))
    fits = all(m["compatible_allowed"] for m in models.values())
    return EXIT_OK if report.identical and fits else EXIT_DIFFERENT


# --------------------------------------------------------------------------- entry points


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI on `argv` and return the exit code; never raises SystemExit."""
    if os.environ.get("CKPTSURGEON_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = app(args=args, prog_name="ckptsurgeon", standalone_mode=False)
    except ClickUsageError as exc:  # top-level options, unknown command, no arguments at all
        ctx = getattr(exc, "ctx", None)
        if _is_no_args_help(exc) and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")
        else:
            notice(f"error: {exc.format_message()} (see 'ckptsurgeon --help')", style="red")  # type: ignore[attr-defined]
        return EXIT_BAD_INPUT
    except (typer.Abort, KeyboardInterrupt):
        notice("interrupted")
        return 130
    return int(rv) if isinstance(rv, int) else EXIT_OK


def entrypoint() -> None:
    """The console script: `sys.exit(main())`."""
    sys.exit(main())

