"""The steps every command shares (load, select, --model check, write) and the bodies of
`inspect` and `extract`.

No typer here: `inspect` and `extract`, the commands run most often, can be answered from a plain
argv parse (see `fast`) without paying for Typer's import; `commands` declares the same bodies to
Typer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import EXIT_DIFFERENT, EXIT_OK, SelectionError, UsageError
from . import text
from .console import notice, print_json, progress, say, show, total_bytes

JSON_SCHEMA_VERSION = 1


def load(path: Path, *, key: str | None, unsafe: bool, allow_global: list[str] | None) -> Any:
    from ..io import load_checkpoint

    if unsafe:
        notice(f"warning: --unsafe: {path} is fully unpickled; it can run code", style="yellow")
    return load_checkpoint(path, unsafe=unsafe, key=key, allow_globals=checked_globals(allow_global))


def checked_globals(names: list[str] | None) -> tuple[str, ...]:
    if not names:
        return ()
    from ..safety import resolve_allowed_globals

    resolve_allowed_globals(names)  # refuse code-running names before anything is read
    return tuple(names)


def select(keys: Sequence[str], include: list[str] | None, exclude: list[str] | None, regex: bool) -> list[str]:
    from ..patterns import select_keys, unmatched_includes

    selected = select_keys(keys, include or (), exclude or (), regex=regex)
    for p in unmatched_includes(keys, include or (), regex=regex):
        notice(f"warning: --include {p!r} matches no key", style="yellow")
    if not selected:
        raise SelectionError("nothing selected: no key matches the patterns")
    return selected


def note_container(ckpt: Any) -> None:
    if ckpt.state_dict_key:
        notice(f"using the state_dict at key {ckpt.state_dict_key!r} of {ckpt.path}")


def model_check(
    state_dict: Mapping[str, Any],
    spec: str | None,
    kwargs: str | None,
    *,
    allow_missing: bool,
    allow_unexpected: bool,
    ckpt_path: str,
    out_path: str = "OUT",
) -> dict[str, Any] | None:
    """Run the --model check; returns its JSON-ready result (None without --model)."""
    if spec is None:
        if kwargs is not None:
            raise UsageError("--model-kwargs needs --model")
        return None
    from ..model import check_model_spec
    from ..tensors import is_tensor, shape_of

    # the model's code runs in a child process: it cannot print on stdout or end this process
    report = check_model_spec(
        spec,
        {k: shape_of(v) if is_tensor(v) else None for k, v in state_dict.items()},
        kwargs,
        metadata=getattr(state_dict, "_metadata", None),
    )
    data = report.to_dict()
    data["suggestions"] = [s.command(ckpt_path, out_path) for s in report.renames]
    data["compatible_allowed"] = report.compatible(allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    data["kinds"] = dict(report.kinds)
    data["model"] = spec
    return data


def public_model(data: dict[str, Any] | None) -> dict[str, Any]:
    if data is None:
        return {}
    hidden = {"kinds", "compatible_allowed"}
    out = {k: v for k, v in data.items() if k not in hidden}
    out["compatible_with_allowances"] = data["compatible_allowed"]
    return out


def inspect(
    ckpt: Path,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    regex: bool = False,
    key: str | None = None,
    as_json: bool = False,
    model: str | None = None,
    model_kwargs: str | None = None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    verify: bool = False,
    unsafe: bool = False,
    allow_global: list[str] | None = None,
) -> int:
    """The `inspect` command; returns its exit code (see `commands.inspect` for the options)."""
    from ..containers import describe_value
    from ..summary import inspect_state_dict

    ckpt_obj = load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    if verify:
        from ..io import iter_tensors, verify_data

        with progress("verifying", total_bytes(iter_tensors(ckpt_obj.container))) as advance:
            verify_data(ckpt_obj, advance)
    keys = (
        select(list(ckpt_obj.state_dict), include, exclude, regex)
        if (include or exclude)
        else list(ckpt_obj.state_dict)
    )
    report = inspect_state_dict(
        ckpt_obj.state_dict,
        keys,
        format=ckpt_obj.format,
        state_dict_key=ckpt_obj.state_dict_key,
        other_entries=[(k, describe_value(v)) for k, v in ckpt_obj.other_entries()],
    )
    # the model judges the whole state_dict (a selection only narrows what is shown): a key the
    # patterns leave out is not missing from the checkpoint
    model_data = model_check(
        ckpt_obj.state_dict,
        model,
        model_kwargs,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        ckpt_path=str(ckpt),
    )
    if as_json:
        data = report.to_dict()
        data.update(public_model(model_data))
        if model_data is not None:
            data["kinds"] = model_data["kinds"]
        print_json(data)
    else:
        shown_model = model_data
        if model_data is not None and (include or exclude):  # missing rows: those the patterns select
            from ..patterns import select_keys

            missing = select_keys(model_data["missing_keys"], include or (), exclude or (), regex=regex)
            shown_model = {**model_data, "missing_keys": missing}
        show(text.inspect_table(report, model_data["kinds"] if model_data else None, shown_model))
        if len(report.dtypes) > 1:
            show(text.dtype_table(report))
        for line in text.other_entries_lines(report.other_entries) + text.shared_lines(report.shared_storage):
            say(line)
        if model_data is not None:
            for line in text.model_lines(model_data, allow_missing, allow_unexpected):
                say(line)
    if model_data is not None and not model_data["compatible_allowed"]:
        return EXIT_DIFFERENT
    return EXIT_OK


def refuse_incompatible(
    model: dict[str, Any] | None,
    allow_missing: bool,
    allow_unexpected: bool,
    json_report: dict[str, Any] | None = None,
) -> bool:
    """With --model: say why nothing is written and return True when the result does not fit.
    `json_report` (with --json) is printed then, marked `"written": false`: the one document."""
    if model is None or model["compatible_allowed"]:
        return False
    for line in text.model_lines(model, allow_missing, allow_unexpected):
        notice(line.text, line.style)
    notice("nothing written: the result does not fit the model (see --allow-missing / --allow-unexpected)", style="red")
    if json_report is not None:
        print_json({**json_report, "written": False})
    return True


def check_output_first(output: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """The output checks (`-`, not a regular file, exists, is an input) before any input is read:
    a refusal should not wait for gigabytes to be parsed. `write_output` checks again."""
    from ..io import check_output

    check_output(output, inputs, force=force)


def write_output(
    obj: Any,
    output: Path,
    inputs: Sequence[Path],
    *,
    force: bool,
    verify: bool,
    safetensors_metadata: Any = None,
    unsafe: bool = False,
    allow_global: list[str] | None = None,
    format: str | None = None,
) -> list[str]:
    """Write `obj` to `output` in `format` (atomically, with a progress bar on a terminal); returns
    the notes."""
    from ..io import check_output, iter_tensors, save_checkpoint

    check_output(output, inputs, force=force)
    with progress("writing", total_bytes(iter_tensors(obj))) as advance:
        notes = save_checkpoint(
            obj,
            output,
            safetensors_metadata=safetensors_metadata,
            verify=verify,
            progress=advance,
            unsafe=unsafe,
            allow_globals=tuple(allow_global or ()),
            format=format,
        )
    for n in notes:
        notice(f"note: {n}")
    return notes


def writer_report(
    command: str,
    output: Path,
    state_dict: Mapping[str, Any],
    *,
    dry_run: bool,
    notes: Sequence[str],
    format: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    from ..io import output_format

    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": command,
        "output": str(output),
        "format": output_format(output, format).value,
        "dry_run": dry_run,
        "written": not dry_run,
        "keys": list(state_dict),
        "num_tensors": len(state_dict) - len(_extra_state(state_dict)),
        "extra_state": _extra_state(state_dict),
        "total_bytes": total_bytes(state_dict.values()),
        "notes": list(notes),
        **extra,
    }


def _extra_state(state_dict: Mapping[str, Any]) -> list[str]:
    """The keys of non-tensor values (a module's extra state)."""
    from ..containers import non_tensor_keys

    return non_tensor_keys(state_dict)


def report_done(output: Path, state_dict: Mapping[str, Any]) -> None:
    total = total_bytes(state_dict.values())
    extra = len(_extra_state(state_dict))
    also = f" and {extra} extra state {'entry' if extra == 1 else 'entries'}" if extra else ""
    notice(f"wrote {len(state_dict) - extra} tensors{also} ({text.human_bytes(total)}) to {output}")


def model_extra(model_data: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": public_model(model_data)} if model_data is not None else {}


def safetensors_meta(ckpt_obj: Any) -> Any:
    return ckpt_obj.safetensors_metadata if ckpt_obj.format == "safetensors" else None


def extract(
    ckpt: Path,
    output: Path,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    regex: bool = False,
    key: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    verify: bool = False,
    format: str | None = None,
    as_json: bool = False,
    model: str | None = None,
    model_kwargs: str | None = None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    unsafe: bool = False,
    allow_global: list[str] | None = None,
) -> int:
    """The `extract` command; returns its exit code (see `commands.extract` for the options)."""
    from ..surgery import extract_state_dict

    if not dry_run:
        check_output_first(output, [ckpt], force=force)
    ckpt_obj = load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    note_container(ckpt_obj)
    keys = select(list(ckpt_obj.state_dict), include, exclude, regex)
    result = extract_state_dict(ckpt_obj.state_dict, keys)
    model_data = model_check(
        result,
        model,
        model_kwargs,
        allow_missing=allow_missing,
        allow_unexpected=allow_unexpected,
        ckpt_path=str(ckpt),
        out_path=str(output),
    )
    if refuse_incompatible(
        model_data,
        allow_missing,
        allow_unexpected,
        writer_report(
            "extract",
            output,
            result,
            dry_run=dry_run,
            format=format,
            notes=[],
            state_dict_key=ckpt_obj.state_dict_key,
            **model_extra(model_data),
        )
        if as_json
        else None,
    ):
        return EXIT_DIFFERENT
    notes: list[str] = []
    if not dry_run:
        notes = write_output(
            result,
            output,
            [ckpt],
            force=force,
            verify=verify,
            safetensors_metadata=safetensors_meta(ckpt_obj),
            unsafe=unsafe,
            allow_global=allow_global,
            format=format,
        )
    if as_json:
        print_json(
            writer_report(
                "extract",
                output,
                result,
                dry_run=dry_run,
                format=format,
                notes=notes,
                state_dict_key=ckpt_obj.state_dict_key,
                **model_extra(model_data),
            )
        )
    elif dry_run:
        show(text.keys_table(((k, str(ckpt)) for k in result), f"would write {len(result)} tensors to {output}"))
    else:
        report_done(output, result)
    return EXIT_OK
