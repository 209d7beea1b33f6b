"""The two renderers of a job's result: `TEXT` (tables and lines, as a person reads them) and
`JSON` (the command's one `--json` document). Each has `render(result)`, which writes stdout
(data) and stderr (what a writer did, why nothing was written) through `console`."""

from __future__ import annotations

from typing import Any

from ..jobs import DiffResult, InspectResult, WriteResult
from . import text
from .console import notice, print_json, say, show


def _refusal(result: WriteResult) -> None:
    """Why a writer wrote nothing (`--model` refused the result): on stderr, in both renderers."""
    opts = result.model_options
    assert result.model is not None
    for line in text.model_lines(result.model, opts.allow_missing, opts.allow_unexpected):
        notice(line.text, line.style)
    notice("nothing written: the result does not fit the model (see --allow-missing / --allow-unexpected)", style="red")


class JsonRenderer:
    """`--json`: the result's `to_dict()` on stdout."""

    def render(self, result: Any) -> None:
        if isinstance(result, WriteResult) and result.refused:
            _refusal(result)
        print_json(result.to_dict())


class TextRenderer:
    """Tables and lines: data on stdout, a writer's summary on stderr."""

    def render(self, result: Any) -> None:
        if isinstance(result, InspectResult):
            self._inspect(result)
        elif isinstance(result, WriteResult):
            self._write(result)
        elif isinstance(result, DiffResult):
            self._diff(result)
        else:
            raise TypeError(f"no text rendering for {type(result).__name__}")

    def _inspect(self, result: InspectResult) -> None:
        report, model, opts = result.report, result.model, result.model_options
        shown = {**model, "missing_keys": list(result.shown_missing)} if model is not None else None
        table = text.inspect_table(report, model["kinds"] if model else None, shown)
        if result.values is not None:
            table = text.with_values(table, report, result.values, stats=result.stats)
        show(table)
        if len(report.dtypes) > 1:
            show(text.dtype_table(report))
        for line in text.other_entries_lines(report.other_entries) + text.shared_lines(report.shared_storage):
            say(line)
        if model is not None:
            for line in text.model_lines(model, opts.allow_missing, opts.allow_unexpected):
                say(line)

    def _write(self, result: WriteResult) -> None:
        if result.refused:
            _refusal(result)
        elif result.dry_run:
            title = f"would write {len(result.keys)} tensors to {result.output}"
            if result.command == "rename":
                show(text.rename_table(result.renamed or {}))
            elif result.average:
                show(text.keys_table(((k, "mean of all inputs") for k in result.keys), title))
            else:
                show(text.keys_table(((k, result.sources[k]) for k in result.keys), title))
            if result.dtype is not None:
                notice(f"would cast {len(result.cast)} of {result.num_tensors} tensors to {result.dtype}")
        else:
            if result.command == "rename":
                notice(f"renamed {result.num_changed} of {len(result.keys)} keys")
            if result.dtype is not None:
                notice(f"cast {len(result.cast)} of {result.num_tensors} tensors to {result.dtype}")
            extra = len(result.extra_state)
            also = f" and {extra} extra state {'entry' if extra == 1 else 'entries'}" if extra else ""
            size = text.human_bytes(result.total_bytes)
            notice(f"wrote {result.num_tensors} tensors{also} ({size}) to {result.output}{_layout(result)}")

    def _diff(self, result: DiffResult) -> None:
        opts = result.model_options
        table = text.diff_table(result.report)
        if table is not None:
            show(table)
        say(text.diff_summary(result.report))
        for side, m in result.models.items():
            for line in text.model_lines(m, opts.allow_missing, opts.allow_unexpected):
                say(text.Line(f"{side.upper()}: {line.text}", line.style))


def _layout(result: WriteResult) -> str:
    """` as hf: 4 shards and an index` for a directory output; nothing for one file."""
    if not result.is_directory:
        return ""
    shards = sum(1 for name, _ in result.files if not name.endswith(".json") and name != ".metadata")
    index = len(result.files) - shards
    what = f"{shards} shard{'s' if shards != 1 else ''}" + (" and an index" if index else "")
    return f" as {result.format}: {what}"


TEXT = TextRenderer()
JSON = JsonRenderer()


def render(result: Any, *, as_json: bool) -> int:
    """Render `result` as text or JSON; returns its exit code."""
    (JSON if as_json else TEXT).render(result)
    return int(result.exit_code)
