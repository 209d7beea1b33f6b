"""What the CLI shows, as plain data: tables and lines built from reports, with no rich import.

A `TableData` prints as aligned plain text (when stdout is not a terminal, or the table is very
long) or is handed to `render.to_rich` for a terminal. Styles are hints that only rich uses.
"""

from __future__ import annotations

import itertools
import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..containers import quote_key

if TYPE_CHECKING:  # imported for annotations only: inspect never loads diff's machinery
    from ..diff import DiffReport
    from ..summary import InspectReport

KIND_STYLE = {"missing": "yellow", "unexpected": "red", "shape mismatch": "red"}


class TableData(NamedTuple):
    headers: tuple[str, ...]
    rows: list[list[str]]
    title: str = ""
    caption: str = ""
    right: frozenset[int] = frozenset()  # right-aligned column indexes
    styles: Mapping[tuple[int, int], str] = {}  # (row, column) -> rich style; never mutated


class Line(NamedTuple):
    text: str
    style: str = ""


def safe(text: Any) -> str:
    """Show control characters escaped (a crafted key could carry terminal escape sequences)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def key_text(key: Any) -> str:
    """A key for a table or a line: `safe`, and quoted as repr quotes it when it is empty, has
    leading or trailing whitespace or starts with a quote (so `''`, `' x'` and `x` differ)."""
    s = str(key)
    quoted = quote_key(s)
    return quoted if quoted != s else safe(s)


def display_width(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide and full-width characters 2, combining marks 0."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text
    )


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def to_json(data: Mapping[str, Any], *, pretty: bool = False) -> str:
    """One JSON document; indented for a person at a terminal, compact (C encoder) otherwise.

    ASCII only: a crafted key can hold a lone surrogate, which no UTF-8 stream can carry; JSON's
    \\u escapes carry it, and any JSON parser gives back the key exactly. Strict JSON: a
    non-finite float (which JSON cannot write; Python would write `NaN` or `Infinity`) is `null`.
    """
    import json

    def dump(obj: Any) -> str:
        if pretty:
            return json.dumps(obj, indent=2, allow_nan=False)
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)

    try:
        return dump(data)
    except ValueError:  # a non-finite float somewhere: the rare case pays for a second walk
        return dump(_finite(data))


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (for strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def plain(table: TableData) -> str:
    """Aligned columns without box drawing: fast for tens of thousands of rows, easy to awk.

    Columns are padded by display width, so keys in CJK characters (two columns each) line up.
    """
    rows = (table.headers, *table.rows)
    if all(map(str.isascii, itertools.chain.from_iterable(rows))):
        widths = [max([len(h)] + [len(r[i]) for r in table.rows]) for i, h in enumerate(table.headers)]
        # one str.format per row (the same padding as ljust/rjust)
        fmt = "  ".join(f"{{:{'>' if i in table.right else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*row).rstrip() for row in rows]
    else:
        cell_widths = [[display_width(c) for c in row] for row in rows]
        widths = [max(w[i] for w in cell_widths) for i in range(len(table.headers))]
        lines = [
            "  ".join(
                " " * (widths[i] - w[i]) + c if i in table.right else c + " " * (widths[i] - w[i])
                for i, c in enumerate(row)
            ).rstrip()
            for row, w in zip(rows, cell_widths)
        ]
    out = ([table.title] if table.title else []) + lines
    out += [table.caption] if table.caption else []
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- inspect


def inspect_table(
    report: InspectReport, kinds: Mapping[str, str] | None = None, model: Mapping[str, Any] | None = None
) -> TableData:
    title = "state_dict" + (f" at key {safe(report.state_dict_key)!r}" if report.state_dict_key else "")
    headers = ("key", "shape", "dtype", "numel", "bytes") + (("model",) if kinds is not None else ())
    # tens of thousands of rows with a few hundred distinct shapes and sizes: format each once
    shapes: dict[tuple[int, ...], str] = {}
    sizes: dict[int, str] = {}
    rows = [
        [
            key_text(key),
            shapes.get(shape) or shapes.setdefault(shape, shape_text(shape)),
            dtype if kind is None else safe(r.dtype_text),
            f"{numel:,}",
            sizes.get(nbytes) or sizes.setdefault(nbytes, human_bytes(nbytes)),
        ]
        for r in report.tensors
        for key, shape, dtype, numel, nbytes, kind in (r,)
    ]
    if kinds is not None:
        for row, r in zip(rows, report.tensors):
            row.append(kinds.get(r.key, "").replace("_", " "))
    for key, description in report.extra_state:  # non-tensor entries: a module's get_extra_state
        rows.append([safe(key), "extra state", safe(description), "", ""])
        if kinds is not None:
            rows[-1].append(kinds.get(key, "").replace("_", " "))
    if kinds is not None and model is not None:
        rows += [[key_text(k), "", "", "", "", "missing"] for k in model.get("missing_keys", [])]
    styles = {(i, 5): KIND_STYLE.get(row[5], "green") for i, row in enumerate(rows)} if kinds is not None else {}
    caption = f"{report.num_tensors} tensors, {report.num_elements:,} elements, {human_bytes(report.total_bytes)}"
    if report.num_selected_of != report.num_tensors:
        caption += f" (selected of {report.num_selected_of})"
    if report.extra_state:
        n = len(report.extra_state)
        caption += f"; {n} extra state {'entry' if n == 1 else 'entries'}"
    return TableData(headers, rows, f"{title} ({format_text(report)})", caption, frozenset({3, 4}), styles)


def format_text(report: InspectReport) -> str:
    """`torch-zip`, or `hf-sharded, 3 shards` for an input of several files."""
    if report.shards is None:
        return report.format
    n = len(report.shards)
    return f"{report.format}, {n} shard{'' if n == 1 else 's'}"


def _number(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6g}"


def with_values(table: TableData, report: InspectReport, values: Mapping[str, Any], *, stats: bool) -> TableData:
    """`table` (inspect's) with the columns of `--stats` (min ... zeros) and `--hash` (sha256) added
    to its tensor rows; the other rows (extra state, missing keys) get empty cells."""
    hashed = any(v.sha256 is not None for v in values.values())
    headers: tuple[str, ...] = ("min", "max", "mean", "std", "nan", "inf", "zeros") if stats else ()
    headers += ("sha256",) if hashed else ()
    first = len(table.headers)
    rows = []
    for i, row in enumerate(table.rows):
        extra = [""] * len(headers)
        if i < len(report.tensors):
            v = values[report.tensors[i].key]
            if stats and v.stats is not None:
                s = v.stats
                extra[:7] = [*map(_number, (s.min, s.max, s.mean, s.std)), f"{s.nan:,}", f"{s.inf:,}", f"{s.zeros:,}"]
            if hashed:
                extra[-1] = v.sha256 or ""
        rows.append([*row[:first], *extra, *row[first:]])
    right = table.right | (frozenset(range(first, first + 7)) if stats else frozenset())
    return table._replace(headers=(*table.headers, *headers), rows=rows, right=right)


def dtype_table(report: InspectReport) -> TableData:
    rows = [[d.dtype, str(d.num_tensors), f"{d.num_elements:,}", human_bytes(d.total_bytes)] for d in report.dtypes]
    return TableData(("dtype", "tensors", "elements", "bytes"), rows, "by dtype", right=frozenset({1, 2, 3}))


def other_entries_lines(entries: Iterable[tuple[str, str]]) -> list[Line]:
    return [Line(f"{key_text(k)}: {safe(v)}") for k, v in entries]


def shared_lines(groups: Iterable[Sequence[str]]) -> list[Line]:
    return [Line("shared storage: " + " = ".join(key_text(k) for k in g)) for g in groups]


def model_lines(model: Mapping[str, Any], allow_missing: bool, allow_unexpected: bool) -> list[Line]:
    ok = model["compatible_allowed"]
    relaxed = [n for n, on in (("missing", allow_missing), ("unexpected", allow_unexpected)) if on]
    lines = [
        Line(
            f"model {safe(model['model'])}: {'compatible' if ok else 'NOT compatible'}: "
            f"{len(model['missing_keys'])} missing, {len(model['unexpected_keys'])} unexpected, "
            f"{len(model['shape_mismatches'])} shape mismatches"
            + (f" (allowing {' and '.join(relaxed)})" if relaxed else ""),
            "green" if ok else "red",
        )
    ]
    lines += [
        Line(
            f"  shape mismatch {key_text(m['key'])}: "
            f"checkpoint {shape_text(m['checkpoint'])}, model {shape_text(m['model'])}"
        )
        for m in model["shape_mismatches"]
    ]
    lines += [Line(f"  suggestion: {safe(s)}") for s in model["suggestions"]]
    return lines


# ---------------------------------------------------------------------------------------- diff


def diff_table(report: DiffReport) -> TableData | None:
    """Every difference, one row a key; None when there is nothing to show."""
    rows = [[key_text(k), "only in A"] for k in report.only_in_a]
    rows += [[key_text(k), "only in B"] for k in report.only_in_b]
    rows += [[key_text(m.key), f"shape {shape_text(m.a)} vs {shape_text(m.b)}"] for m in report.shape_mismatches]
    ignored = " (ignored)" if report.ignore_dtype else ""
    rows += [[key_text(m.key), f"dtype {m.a} vs {m.b}{ignored}"] for m in report.dtype_mismatches]
    rows += [
        [key_text(m.key), f"extra state: {safe(m.a)} vs {safe(m.b)}, not equal"] for m in report.extra_state_mismatches
    ]
    rows += [
        [
            key_text(v.key),
            f"values: {v.num_different:,} of {v.numel:,} differ, "
            f"max abs {v.max_abs_diff:.6g}, max rel {v.max_rel_diff:.6g}, mean abs {v.mean_abs_diff:.6g}, "
            f"rel l2 {v.rel_l2:.6g}, cosine {v.cosine:.8g}",
        ]
        for v in report.value_mismatches
    ]
    return TableData(("key", "difference"), rows) if rows else None


def diff_summary(report: DiffReport) -> Line:
    extra = f", {report.num_equal_extra_state} extra state equal" if report.num_equal_extra_state else ""
    if report.identical:
        cast = len(report.dtype_mismatches)
        ignored = f" ({cast} of them in another dtype, ignored)" if cast else ""
        return Line(f"identical: {report.num_equal} tensors equal{ignored}{extra}", "green")
    parts = [
        (len(report.only_in_a), "only in A"),
        (len(report.only_in_b), "only in B"),
        (len(report.shape_mismatches), "shape mismatches"),
        (len(report.dtype_mismatches), "dtype mismatches" + (" (ignored)" if report.ignore_dtype else "")),
        (len(report.value_mismatches), "value mismatches"),
        (len(report.extra_state_mismatches), "extra state mismatches"),
    ]
    counted = ", ".join(f"{n} {label}" for n, label in parts if n)
    return Line(f"different: {counted}; {report.num_equal} equal{extra}", "red")


# ------------------------------------------------------------------------------------- writers


def rename_table(plan: Mapping[str, str]) -> TableData:
    rows = [[key_text(old), key_text(new)] for old, new in plan.items()]
    styles = {(i, 1): "bold" for i, (old, new) in enumerate(plan.items()) if old != new}
    return TableData(("old", "new"), rows, styles=styles)


def keys_table(rows: Iterable[tuple[str, str]], title: str, headers: tuple[str, str] = ("key", "from")) -> TableData:
    return TableData(headers, [[key_text(a), safe(b)] for a, b in rows], title)


def transplant_table(report: Any) -> TableData:
    """A TransplantReport: every model key with what transplant did to it."""
    frozen = set(report.frozen)
    norm_locked = set(report.frozen_norm_modules)
    rows: list[list[str]] = []
    styles: dict[tuple[int, int], str] = {}
    for key in report.loaded:
        status = "loaded, frozen" if key in frozen else "loaded"
        if key.rpartition(".")[0] in norm_locked:
            status += " (module kept in eval)"
        styles[(len(rows), 1)] = "green"
        rows.append([key_text(key), status])
    for key in report.missing:
        styles[(len(rows), 1)] = "yellow"
        rows.append([key_text(key), "missing: trainable"])
    for key in report.unexpected:
        styles[(len(rows), 1)] = "red"
        rows.append([key_text(key), "unexpected: ignored"])
    for key, ckpt, model in report.skipped:
        styles[(len(rows), 1)] = "red"
        rows.append([key_text(key), f"skipped: checkpoint {shape_text(ckpt)} vs model {shape_text(model)}"])
    title = "transplant" + (f" from state_dict at key {safe(report.state_dict_key)!r}" if report.state_dict_key else "")
    caption = (
        f"{len(report.loaded)} loaded, {len(report.frozen)} frozen, {len(report.missing)} missing, "
        f"{len(report.unexpected)} unexpected, {len(report.skipped)} skipped"
    )
    return TableData(("key", "status"), rows, title, caption, styles=styles)
