"""The bodies of the five commands: parsed keywords -> the option objects -> one core job
(`ckptsurgeon.jobs`) -> one renderer (`renderers`). Each returns the exit code.

No typer here: `inspect` and `extract`, the commands run most often, can be answered from a plain
argv parse (see `fast`) without paying for Typer's import; `commands` declares the same bodies to
Typer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import jobs
from ..errors import UsageError
from .console import notice, progress
from .renderers import render


def _notify(line: str) -> None:
    notice(line, style="yellow" if line.startswith("warning:") else "")


def _live(options: dict[str, Any]) -> dict[str, Any]:
    """What every job gets from the CLI: notices printed as they happen, progress bars on a
    terminal. Called last, once the option groups were taken out: a parsed option that no group
    took is a bug (an option declared in the table but never used), said before the job runs."""
    if options:
        raise TypeError(f"options that no job takes: {', '.join(sorted(options))}")
    return {"notify": _notify, "progress": progress}


def _selection(options: dict[str, Any]) -> jobs.Selection:
    """`-i`, `-x`, `--regex`, taken out of the parsed keywords (absent ones at their defaults)."""
    include, exclude = options.pop("include", None), options.pop("exclude", None)
    return jobs.Selection(tuple(include or ()), tuple(exclude or ()), options.pop("regex", False))


def _loading(options: dict[str, Any]) -> jobs.Loading:
    """`--key`, `--unsafe`, `--allow-global`, `--jobs`, `--storage-options`, taken out of the parsed keywords."""
    allow = options.pop("allow_global", None)
    return jobs.Loading(
        options.pop("key", None),
        options.pop("unsafe", False),
        tuple(allow or ()),
        options.pop("jobs", None),
        options.pop("storage_options", None),
    )


def _model(options: dict[str, Any]) -> jobs.ModelCheck:
    """`--model`, `--model-kwargs`, `--allow-missing`, `--allow-unexpected`, taken out likewise."""
    return jobs.ModelCheck(
        options.pop("model", None),
        options.pop("model_kwargs", None),
        options.pop("allow_missing", False),
        options.pop("allow_unexpected", False),
    )


def _writing(options: dict[str, Any]) -> jobs.Writing:
    """The writer options (the option table's entries named as `jobs.Writing`'s fields), each
    taken as given or at its default: a new option common to the writers needs no line here.
    OUT stays the string typed: a trailing `/` asks for a directory layout."""
    writing = jobs.Writing(**{f: options.pop(f) for f in jobs.Writing._fields if f in options})
    return writing._replace(output=str(writing.output))


def inspect(
    *,
    ckpt: Path | str,
    verify: bool = False,
    stats: bool = False,
    check_finite: bool = False,
    sha256: bool = False,
    as_json: bool = False,
    **options: Any,
) -> int:
    """List tensors (key, shape, dtype, elements, bytes), totals, container entries, tied storage.

    Reads metadata only (milliseconds, whatever the file size); --verify also reads the data and
    checks CRCs; --stats, --check-finite and --hash read the selected tensors' values (--check-finite:
    exit 1 when one holds NaN or Inf). With --model, mark each key as parameter, buffer, missing,
    unexpected or shape mismatch; the exit code then reports compatibility (0 compatible, 1 not).
    """
    result = jobs.inspect(
        ckpt,
        selection=_selection(options),
        loading=_loading(options),
        model=_model(options),
        verify=verify,
        stats=stats,
        check_finite=check_finite,
        sha256=sha256,
        **_live(options),
    )
    return render(result, as_json=as_json)


def extract(*, ckpt: Path | str, as_json: bool = False, **options: Any) -> int:
    """Write the selected entries as a bare state_dict (the container is dropped).

    With no pattern the whole state_dict is written, which unwraps a training checkpoint.
    """
    result = jobs.extract(
        ckpt,
        selection=_selection(options),
        loading=_loading(options),
        model=_model(options),
        writing=_writing(options),
        **_live(options),
    )
    return render(result, as_json=as_json)


def rename(
    *,
    ckpt: Path,
    strip_prefix: list[str] | None,
    add_prefix: str | None,
    sub: list[str] | None,
    map_file: Path | None,
    as_json: bool,
    **options: Any,
) -> int:
    """Rename keys: --map, then --strip-prefix, then each --sub, then --add-prefix.

    The container is kept: only the state_dict inside it is renamed; every other entry is written
    back unchanged.
    """
    from ..rename import RenameRules, parse_sub

    rules = RenameRules(
        mapping=_read_map(map_file) if map_file else {},
        strip_prefixes=tuple(strip_prefix or ()),
        subs=tuple(parse_sub(s) for s in (sub or ())),
        add_prefix=add_prefix,
    )
    result = jobs.rename(
        ckpt,
        rules,
        loading=_loading(options),
        model=_model(options),
        writing=_writing(options),
        **_live(options),
    )
    return render(result, as_json=as_json)


def _read_map(path: Path) -> dict[str, str]:
    import json  # not at the top: inspect and extract never pay for it

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--map {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--map {path}: not a JSON file: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise UsageError(f"--map {path}: expected a JSON object of old name -> new name (strings)")
    return data


def merge(
    *,
    ckpts: list[Path],
    on_conflict: Any,
    average: bool,
    weights: str | None,
    as_json: bool,
    **options: Any,
) -> int:
    """Union of the inputs' state_dicts in first-seen order, or (--average) their weighted mean."""
    parsed_weights: list[float] | None = None
    if weights is not None:
        # parsed only where the job's own checks (two inputs, --average) pass: they are said first
        parsed_weights = _parse_weights(weights) if average and len(ckpts) >= 2 else []
    result = jobs.merge(
        ckpts,
        on_conflict=on_conflict,
        average=average,
        weights=parsed_weights,
        loading=_loading(options),
        model=_model(options),
        writing=_writing(options),
        **_live(options),
    )
    return render(result, as_json=as_json)


def _parse_weights(value: str) -> list[float]:
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise UsageError(f"--weights {value!r}: expected comma-separated numbers") from None


def diff(
    *,
    a: Path,
    b: Path,
    rtol: float,
    atol: float,
    ignore_dtype: bool,
    key_a: str | None,
    key_b: str | None,
    as_json: bool,
    **options: Any,
) -> int:
    """Compare two checkpoints: keys only in one, shape, dtype and value mismatches.

    Exit 0 when identical (within --rtol/--atol), 1 when different. --key sets the state_dict of
    both sides, --key-a/--key-b one side. With --model, both sides are also checked against the
    model (exit 1 when either does not fit).
    """
    result = jobs.diff(
        a,
        b,
        selection=_selection(options),
        loading=_loading(options),
        key_a=key_a,
        key_b=key_b,
        rtol=rtol,
        atol=atol,
        ignore_dtype=ignore_dtype,
        model=_model(options),
        **_live(options),
    )
    return render(result, as_json=as_json)
