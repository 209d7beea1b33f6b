"""Pure formatters: reports in, rich renderables or strings out. Nothing here reads files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from ..diff import DiffReport
from ..summary import InspectReport


def safe(text: Any) -> str:
    """Show control characters escaped (a crafted key could carry terminal escape sequences)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def to_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def inspect_table(report: InspectReport, kinds: Mapping[str, str] | None = None, model: Mapping[str, Any] | None = None) -> Table:
    title = "state_dict" + (f" at key {safe(report.state_dict_key)!r}" if report.state_dict_key else "")
    table = Table(title=Text(f"{title} ({report.format})"), title_justify="left", header_style="bold")
    table.add_column("key", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("numel", justify="right")
    table.add_column("bytes", justify="right")
    if kinds is not None:
        table.add_column("model")
    for row in report.tensors:
        cells = [Text(safe(row.key)), _shape(row.shape), row.dtype, f"{row.numel:,}", human_bytes(row.nbytes)]
        if kinds is not None:
            cells.append(_kind_text(kinds.get(row.key, "")))
        table.add_row(*cells)
    if kinds is not None and model is not None:
        for key in model.get("missing_keys", []):
            table.add_row(Text(safe(key)), "", "", "", "", _kind_text("missing"))
    table.caption = Text(
        f"{report.num_tensors} tensors, {report.num_elements:,} elements, {human_bytes(report.total_bytes)}"
        + (f" (selected of {report.num_selected_of})" if report.num_selected_of != report.num_tensors else "")
    )
    table.caption_justify = "left"
    return table


def _kind_text(kind: str) -> Text:
    style = {"missing": "yellow", "unexpected": "red", "shape_mismatch": "red"}.get(kind, "green")
    return Text(kind.replace("_", " "), style=style)


def dtype_table(report: InspectReport) -> Table:
    table = Table(title="by dtype", title_justify="left", header_style="bold")
    for col, just in (("dtype", "left"), ("tensors", "right"), ("elements", "right"), ("bytes", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in report.dtypes:
        table.add_row(d.dtype, str(d.num_tensors), f"{d.num_elements:,}", human_bytes(d.total_bytes))
    return table


def other_entries_lines(entries: Iterable[tuple[str, str]]) -> list[Text]:
    return [Text(f"{safe(k)}: {safe(v)}") for k, v in entries]


def shared_lines(groups: Iterable[Sequence[str]]) -> list[Text]:
    return [Text("shared storage: " + " = ".join(safe(k) for k in g)) for g in groups]


def model_lines(model: Mapping[str, Any], allow_missing: bool, allow_unexpected: bool) -> list[Text]:
    lines = []
    ok = model["compatible_allowed"]
    verdict = "compatible" if ok else "NOT compatible"
    relaxed = [n for n, on in (("missing", allow_missing), ("unexpected", allow_unexpected)) if on]
    lines.append(
        Text(
            f"model {safe(model['model'])}: {verdict}: {len(model['missing_keys'])} missing, "
            f"{len(model['unexpected_keys'])} unexpected, {len(model['shape_mismatches'])} shape mismatches"
            + (f" (allowing {' and '.join(relaxed)})" if relaxed else ""),
            style="green" if ok else "red",
        )
    )
    for m in model["shape_mismatches"]:
        lines.append(Text(f"  shape mismatch {safe(m['key'])}: checkpoint {_shape(m['checkpoint'])}, model {_shape(m['model'])}"))
    for s in model["suggestions"]:
        lines.append(Text(f"  suggestion: {safe(s)}"))
    return lines


def diff_table(report: DiffReport) -> Table | None:
    if report.identical:
        return None
    table = Table(header_style="bold")
    table.add_column("key", overflow="fold")
    table.add_column("difference")
    for k in report.only_in_a:
        table.add_row(Text(safe(k)), "only in A")
    for k in report.only_in_b:
        table.add_row(Text(safe(k)), "only in B")
    for m in report.shape_mismatches:
        table.add_row(Text(safe(m.key)), f"shape {_shape(m.a)} vs {_shape(m.b)}")
    for m in report.dtype_mismatches:
        table.add_row(Text(safe(m.key)), f"dtype {m.a} vs {m.b}")
    for v in report.value_mismatches:
        table.add_row(
            Text(safe(v.key)),
            f"values: {v.num_different:,} of {v.numel:,} differ, max abs {v.max_abs_diff:.6g}, max rel {v.max_rel_diff:.6g}",
        )
    return table


def diff_summary(report: DiffReport) -> str:
    if report.identical:
        return f"identical: {report.num_equal} tensors equal"
    parts = [
        (len(report.only_in_a), "only in A"),
        (len(report.only_in_b), "only in B"),
        (len(report.shape_mismatches), "shape mismatches"),
        (len(report.dtype_mismatches), "dtype mismatches"),
        (len(report.value_mismatches), "value mismatches"),
    ]
    return "different: " + ", ".join(f"{n} {label}" for n, label in parts if n) + f"; {report.num_equal} equal"


def rename_table(plan: Mapping[str, str]) -> Table:
    table = Table(header_style="bold")
    table.add_column("old", overflow="fold")
    table.add_column("new", overflow="fold")
    for old, new in plan.items():
        table.add_row(Text(safe(old)), Text(safe(new), style="" if old == new else "bold"))
    return table


def keys_table(rows: Iterable[tuple[str, str]], title: str, headers: tuple[str, str] = ("key", "from")) -> Table:
    table = Table(title=Text(title), title_justify="left", header_style="bold")
    table.add_column(headers[0], overflow="fold")
    table.add_column(headers[1], overflow="fold")
    for a, b in rows:
        table.add_row(Text(safe(a)), Text(safe(b)))
    return table


def transplant_table(report: Any) -> Table:
    """A TransplantReport as a table: every model key with what transplant did to it.

    >>> from rich.console import Console  # doctest: +SKIP
    >>> Console().print(transplant_table(report))  # doctest: +SKIP
    """
    frozen = set(report.frozen)
    norm_locked = set(report.frozen_norm_modules)
    table = Table(
        title=Text("transplant" + (f" from state_dict at key {safe(report.state_dict_key)!r}" if report.state_dict_key else "")),
        title_justify="left",
        header_style="bold",
    )
    table.add_column("key", overflow="fold")
    table.add_column("status")
    for key in report.loaded:
        module = key.rpartition(".")[0]
        status = "loaded, frozen" if key in frozen else "loaded"
        if module in norm_locked:
            status += " (module kept in eval)"
        table.add_row(Text(safe(key)), Text(status, style="green"))
    for key in report.missing:
        table.add_row(Text(safe(key)), Text("missing: trainable", style="yellow"))
    for key in report.unexpected:
        table.add_row(Text(safe(key)), Text("unexpected: ignored", style="red"))
    for key, ckpt, model in report.skipped:
        table.add_row(Text(safe(key)), Text(f"skipped: checkpoint {_shape(ckpt)} vs model {_shape(model)}", style="red"))
    table.caption = Text(
        f"{len(report.loaded)} loaded, {len(report.frozen)} frozen, {len(report.missing)} missing, "
        f"{len(report.unexpected)} unexpected, {len(report.skipped)} skipped"
    )
    table.caption_justify = "left"
    return table
