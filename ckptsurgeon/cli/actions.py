"""The steps every command shares (load, select, --model check) and the body of `inspect`.

No typer here: `inspect`, the command run most often, can be answered from a plain argv parse
(see `fast`) without paying for Typer's import; `commands` declares the same body to Typer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from ..errors import EXIT_DIFFERENT, EXIT_OK, SelectionError, UsageError
from . import text
from .console import notice, print_json, progress, say, show, total_bytes

JSON_SCHEMA_VERSION = 1


def load(path: Path, *, key: Optional[str], unsafe: bool, allow_global: Optional[list[str]]) -> Any:
    from ..io import load_checkpoint

    if unsafe:
        notice(f"warning: --unsafe: {path} is fully unpickled; it can run code", style="yellow")
    return load_checkpoint(path, unsafe=unsafe, key=key, allow_globals=checked_globals(allow_global))


def checked_globals(names: Optional[list[str]]) -> tuple[str, ...]:
    if not names:
        return ()
    from ..safety import resolve_allowed_globals

    resolve_allowed_globals(names)  # refuse code-running names before anything is read
    return tuple(names)


def select(keys: Sequence[str], include: Optional[list[str]], exclude: Optional[list[str]], regex: bool) -> list[str]:
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


def public_model(data: Optional[dict[str, Any]]) -> dict[str, Any]:
    if data is None:
        return {}
    hidden = {"kinds", "compatible_allowed"}
    out = {k: v for k, v in data.items() if k not in hidden}
    out["compatible_with_allowances"] = data["compatible_allowed"]
    return out


def inspect(
    ckpt: Path,
    *,
    include: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    regex: bool = False,
    key: Optional[str] = None,
    as_json: bool = False,
    model: Optional[str] = None,
    model_kwargs: Optional[str] = None,
    allow_missing: bool = False,
    allow_unexpected: bool = False,
    verify: bool = False,
    unsafe: bool = False,
    allow_global: Optional[list[str]] = None,
) -> int:
    """The `inspect` command; returns its exit code (see `commands.inspect` for the options)."""
    from ..containers import describe_value
    from ..summary import inspect_state_dict

    ckpt_obj = load(ckpt, key=key, unsafe=unsafe, allow_global=allow_global)
    if verify:
        from ..io import iter_tensors, verify_data

        with progress("verifying", total_bytes(iter_tensors(ckpt_obj.container))) as advance:
            verify_data(ckpt_obj, advance)
    keys = select(list(ckpt_obj.state_dict), include, exclude, regex) if (include or exclude) else list(ckpt_obj.state_dict)
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
    model_data = model_check(
        selection, model, model_kwargs, allow_missing=allow_missing, allow_unexpected=allow_unexpected, ckpt_path=str(ckpt)
    )
    if as_json:
        data = report.to_dict()
        data.update(public_model(model_data))
        if model_data is not None:
            data["kinds"] = model_data["kinds"]
        print_json(data)
    else:
        show(text.inspect_table(report, model_data["kinds"] if model_data else None, model_data))
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
