"""Pure formatters: reports in, rich renderables or strings out. Nothing here reads files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from ..diff import DiffReport
from ..summary import InspectReport
from .text import human_bytes, safe, to_json

__all__ = ["human_bytes", "safe", "to_json"]  # re-exported: the rich-free helpers


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


RICH_ROWS_MAX = 2000  # above this, tables are plain aligned text: rich takes ~1 ms a row


def inspect_table(
    report: InspectReport, kinds: Mapping[str, str] | None = None, model: Mapping[str, Any] | None = None
) -> Table | str:
    """The tensor table (a rich Table, or plain aligned text for very long tables)."""
    title = "state_dict" + (f" at key {safe(report.state_dict_key)!r}" if report.state_dict_key else "")
    title = f"{title} ({report.format})"
    headers = ["key", "shape", "dtype", "numel", "bytes"] + (["model"] if kinds is not None else [])
    rows = [
        [safe(r.key), _shape(r.shape), r.dtype, f"{r.numel:,}", human_bytes(r.nbytes)]
        + ([kinds.get(r.key, "").replace("_", " ")] if kinds is not None else [])
        for r in report.tensors
    ]
    if kinds is not None and model is not None:
        rows += [[safe(k), "", "", "", "", "missing"] for k in model.get("missing_keys", [])]
    caption = (
        f"{report.num_tensors} tensors, {report.num_elements:,} elements, {human_bytes(report.total_bytes)}"
        + (f" (selected of {report.num_selected_of})" if report.num_selected_of != report.num_tensors else "")
    )
    if len(rows) > RICH_ROWS_MAX:
        return plain_table(title, headers, rows, right={3, 4}, caption=caption)
    table = Table(title=Text(title), title_justify="left", header_style="bold")
    for i, h in enumerate(headers):
        table.add_column(h, overflow="fold", justify="right" if i in (3, 4) else "left")
    for row in rows:
        cells: list[Any] = [Text(c) for c in row]
        if kinds is not None:
            cells[-1] = _kind_text(row[-1].replace(" ", "_"))
        table.add_row(*cells)
    table.caption = Text(caption)
    table.caption_justify = "left"
    return table


def plain_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int], caption: str) -> str:
    """Aligned columns without box drawing: fast for tens of thousands of rows, easy to awk."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([title, line(headers), *(line(r) for r in rows), caption]) + "\n"


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
