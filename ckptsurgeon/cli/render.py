"""Rich renderings of the CLI's tables, for a terminal. Everything else is in `text` (no rich)."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from . import text
from .text import TableData


def to_rich(table: TableData) -> Table:
    """A rich Table of `table` (cells are Text: key names are never read as markup)."""
    out = Table(title=Text(table.title) if table.title else None, title_justify="left", header_style="bold")
    for i, header in enumerate(table.headers):
        out.add_column(header, overflow="fold", justify="right" if i in table.right else "left")
    for r, row in enumerate(table.rows):
        out.add_row(*(Text(cell, style=table.styles.get((r, c), "")) for c, cell in enumerate(row)))
    if table.caption:
        out.caption = Text(table.caption)
        out.caption_justify = "left"
    return out


def transplant_table(report: Any) -> Table:
    """A TransplantReport as a rich table: every model key with what transplant did to it.

    >>> from rich.console import Console  # doctest: +SKIP
    >>> Console().print(transplant_table(report))  # doctest: +SKIP
    """
    return to_rich(text.transplant_table(report))
