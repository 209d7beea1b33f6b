"""One job per command: the whole pipeline of `inspect`, `extract`, `rename`, `merge` and `diff`.

Each job takes a checkpoint path (or two, or several) and small immutable option objects, and
returns an immutable result: `exit_code` (0 ok, 1 a difference or a model that does not fit),
`notices` (the lines the CLI writes on stderr: which state_dict was used, warnings, notes of the
writer) and `to_dict()`, the command's `--json` document. Bad input raises the `CheckpointError`
family, as everywhere in the core. The CLI is one client: it builds the options from argv, passes
`notify` to see the notices as they happen (before an error, too), and renders the result.

Plain NamedTuples (no dataclasses import): `inspect` and `extract` run on the CLI's fast path,
whose start-up time is most of their run time. Nothing heavy is imported before it is needed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import EXIT_DIFFERENT, EXIT_OK, SelectionError, UsageError

if TYPE_CHECKING:
    from .diff import DiffReport
    from .io import Checkpoint, OutputFormat, Written
    from .merge import MergeReport, OnConflict
    from .rename import RenameRules
    from .stats import TensorValues
    from .summary import InspectReport

__all__ = [
    "DiffResult",
    "InspectResult",
    "Loading",
    "ModelCheck",
    "Selection",
    "WriteResult",
    "Writing",
    "diff",
    "extract",
    "inspect",
    "merge",
    "rename",
]

JSON_SCHEMA_VERSION = 1

Notify = Callable[[str], None]
# progress(description, total_bytes) -> a context giving a byte-count callback (or None)
Progress = Callable[[str, int], AbstractContextManager["Callable[[int], None] | None"]]


# ------------------------------------------------------------------------------------ options


class Selection(NamedTuple):
    """`-i/--include`, `-x/--exclude`, `--regex`: which keys (all when both are empty)."""

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    regex: bool = False

    @property
    def is_all(self) -> bool:
        return not self.include and not self.exclude


class Loading(NamedTuple):
    """`--key`, `--unsafe`, `--allow-global`, `--jobs`, `--storage-options`: how a checkpoint is read."""

    key: str | None = None
    unsafe: bool = False
    allow_globals: Sequence[str] = ()
    jobs: int | None = None  # threads for shards and tensors; None: the CPUs, at most 8
    storage_options: str | None = None  # JSON object passed to fsspec for URLs (inputs and outputs)

    @property
    def fsspec_options(self) -> dict[str, Any]:
        """`storage_options` parsed (a UsageError when it is not a JSON object)."""
        from .engine.remote import parse_storage_options

        return parse_storage_options(self.storage_options)

    @property
    def threads(self) -> int:
        """`jobs`, or the number of CPUs this process may use, at most 8."""
        if self.jobs is not None:
            if self.jobs < 1:
                raise UsageError(f"--jobs {self.jobs}: expected a number of threads >= 1")
            return self.jobs
        import os

        return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class ModelCheck(NamedTuple):
    """`--model SPEC` (None: no check), `--model-kwargs JSON`, `--allow-missing`, `--allow-unexpected`."""

    spec: str | None = None
    kwargs: str | None = None
    allow_missing: bool = False
    allow_unexpected: bool = False


class Writing(NamedTuple):
    """`-o/--output` (as typed: a trailing `/` asks for a directory), `-f/--force`, `--dry-run`,
    `--verify`, `--format pt|safetensors|hf|hf-bin|dcp` (None: from OUT, see `io.output_format`),
    `--max-shard-size SIZE` (None: not given; the shards then hold at most 5GB), `--dtype` (None: no
    cast; else the floating-point tensors written are cast to it)."""

    output: str | Path
    force: bool = False
    dry_run: bool = False
    verify: bool = False
    format: str | None = None
    dtype: str | None = None
    max_shard_size: str | None = None


ALL_KEYS = Selection()
SAFE_LOADING = Loading()  # the state_dict found by itself, weights-only unpickling
NO_MODEL = ModelCheck()


# ------------------------------------------------------------------------------------ results


class InspectResult(NamedTuple):
    """What `inspect` found. `model` is the `--model` check (None without it); `shown_missing` the
    model's missing keys that the selection selects (the rows a table shows)."""

    report: InspectReport
    model: Mapping[str, Any] | None
    model_options: ModelCheck
    shown_missing: Sequence[str]
    notices: tuple[str, ...]
    values: Mapping[str, TensorValues] | None = None  # --stats / --check-finite / --hash, per key
    check_finite: bool = False
    stats: bool = False
    bytes_read: int = 0  # bytes read from storage, every file of the input counted
    requests: int = 0  # requests made to remote stores

    @property
    def non_finite(self) -> list[str]:
        """The selected keys whose tensors hold NaN or Inf (with `check_finite`; else empty)."""
        if not self.check_finite or self.values is None:
            return []
        return [k for k, v in self.values.items() if not v.finite]

    @property
    def exit_code(self) -> int:
        unfit = self.model is not None and not self.model["compatible_allowed"]
        return EXIT_DIFFERENT if unfit or self.non_finite else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        data = self.report.to_dict()
        if self.values is not None:
            for row in data["tensors"]:
                v = self.values[row["key"]]
                if self.stats:
                    row["stats"] = v.stats.to_dict() if v.stats is not None else None
                if v.sha256 is not None:
                    row["sha256"] = v.sha256
            if self.check_finite:
                data["non_finite"] = self.non_finite
        data.update(public_model(self.model))
        if self.model is not None:
            data["kinds"] = self.model["kinds"]
        data.update(bytes_read=self.bytes_read, requests=self.requests)
        return data


class WriteResult(NamedTuple):
    """What a writer (`extract`, `rename`, `merge`) wrote, or would write (`dry_run`), or refused
    to write because the result does not fit `--model` (`refused`: exit 1, nothing written)."""

    command: str
    output: str
    format: str
    dry_run: bool
    refused: bool
    keys: tuple[str, ...]
    num_tensors: int
    extra_state: tuple[str, ...]
    total_bytes: int
    notes: tuple[str, ...]
    sources: Mapping[str, str]  # key -> the input it comes from ("mean of all inputs" with --average)
    state_dict_key: str | None = None  # extract, rename
    renamed: Mapping[str, str] | None = None  # rename: old -> new, every key
    average: bool = False  # merge
    conflicts: tuple[str, ...] = ()  # merge
    warnings: tuple[str, ...] = ()  # merge
    model: Mapping[str, Any] | None = None
    model_options: ModelCheck = NO_MODEL
    notices: tuple[str, ...] = ()
    dtype: str | None = None  # --dtype
    cast: tuple[str, ...] = ()  # the keys --dtype cast (or would cast, with dry_run)
    bytes_read: int = 0  # bytes read from storage, every file of every input counted
    requests: int = 0  # requests made to remote stores
    files: tuple[tuple[str, int], ...] = ()  # a directory output: its files (name, bytes), the index last
    ranks: tuple[tuple[int, int], ...] = ()  # under torchrun: (bytes_read, requests) of each rank

    @property
    def is_directory(self) -> bool:
        return self.format in ("hf", "hf-bin", "dcp")

    @property
    def written(self) -> bool:
        return not self.dry_run and not self.refused

    @property
    def exit_code(self) -> int:
        return EXIT_DIFFERENT if self.refused else EXIT_OK

    @property
    def num_changed(self) -> int:
        return sum(1 for old, new in (self.renamed or {}).items() if old != new)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": JSON_SCHEMA_VERSION,
            "command": self.command,
            "output": self.output,
            "format": self.format,
            "dry_run": self.dry_run,
            "written": self.written,
            "keys": list(self.keys),
            "num_tensors": self.num_tensors,
            "extra_state": list(self.extra_state),
            "total_bytes": self.total_bytes,
            "notes": list(self.notes),
        }
        if self.is_directory:
            data["files"] = [{"file": name, "bytes": size} for name, size in self.files]
        if self.command in ("extract", "rename"):
            data["state_dict_key"] = self.state_dict_key
        if self.command == "rename":
            data["renamed"] = dict(self.renamed or {})
            data["num_changed"] = self.num_changed
        if self.command == "merge":
            data["average"] = self.average
            data["sources"] = dict(self.sources)
            if not self.refused:
                data["conflicts"] = list(self.conflicts)
                data["warnings"] = list(self.warnings)
        if self.dtype is not None:
            data["dtype"] = self.dtype
            data["cast"] = list(self.cast)
        if self.model is not None:
            data["model"] = public_model(self.model)
        data.update(bytes_read=self.bytes_read, requests=self.requests)
        if self.ranks:
            data["ranks"] = [{"rank": r, "bytes_read": b, "requests": n} for r, (b, n) in enumerate(self.ranks)]
        return data


class DiffResult(NamedTuple):
    """What `diff` found; `models` the `--model` check of each side ("a", "b") that was checked."""

    report: DiffReport
    models: Mapping[str, Mapping[str, Any]]
    model_options: ModelCheck
    notices: tuple[str, ...]
    bytes_read: int = 0  # bytes read from storage, every file of both inputs counted
    requests: int = 0  # requests made to remote stores

    @property
    def exit_code(self) -> int:
        fits = all(m["compatible_allowed"] for m in self.models.values())
        return EXIT_OK if self.report.identical and fits else EXIT_DIFFERENT

    def to_dict(self) -> dict[str, Any]:
        data = self.report.to_dict()
        if self.models:
            data["model"] = {side: public_model(m) for side, m in self.models.items()}
        data.update(bytes_read=self.bytes_read, requests=self.requests)
        return data


# --------------------------------------------------------------------------------------- jobs


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[None]:
    yield None


class _Notices:
    """The notices of one job: kept for its result, and passed on to `notify` as they happen."""

    def __init__(self, notify: Notify | None) -> None:
        self.lines: list[str] = []
        self._notify = notify

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self._notify is not None:
            self._notify(line)


def inspect(
    ckpt: str | Path,
    *,
    selection: Selection = ALL_KEYS,
    loading: Loading = SAFE_LOADING,
    model: ModelCheck = NO_MODEL,
    verify: bool = False,
    stats: bool = False,
    check_finite: bool = False,
    sha256: bool = False,
    notify: Notify | None = None,
    progress: Progress | None = None,
) -> InspectResult:
    """List the tensors of `ckpt`'s state_dict (the selected ones), its totals, the container's other
    entries and tied storage; `verify` also reads all data and checks every CRC-32. With `model`,
    the whole state_dict is checked against the model (`exit_code` 1 when it does not fit).
    `stats` computes each selected tensor's min, max, mean, std and NaN/Inf/zero counts, `sha256`
    the sha256 of its contents; `check_finite` makes `exit_code` 1 when one holds NaN or Inf."""
    from .containers import describe_value, opaque_entries
    from .summary import inspect_state_dict

    say = _Notices(notify)
    progress = progress or _no_progress
    ckpt = _location(ckpt)
    ckpt_obj = _load(ckpt, loading, say, metadata_only=True)  # a DCP directory: its .metadata alone
    if verify:
        from .io import iter_tensors, verify_data

        with progress("verifying", total_bytes(iter_tensors(ckpt_obj.container))) as advance:
            verify_data(ckpt_obj, advance)
    keys = list(ckpt_obj.state_dict) if selection.is_all else _select(list(ckpt_obj.state_dict), selection, say)
    report = inspect_state_dict(
        ckpt_obj.state_dict,
        keys,
        format=ckpt_obj.format,
        state_dict_key=ckpt_obj.state_dict_key,
        other_entries=[(k, describe_value(v)) for k, v in ckpt_obj.other_entries()],
        opaque_entries=opaque_entries(ckpt_obj.container) if ckpt_obj.engine == "raw" else (),
        shards=ckpt_obj.shards,
        tensor_files=ckpt_obj.tensor_files,
    )
    # the model judges the whole state_dict (a selection only narrows what is shown): a key the
    # patterns leave out is not missing from the checkpoint
    model_data = _model_check(ckpt_obj.state_dict, model, ckpt_path=str(ckpt))
    shown_missing: list[str] = []
    if model_data is not None:
        shown_missing = list(model_data["missing_keys"])
        if not selection.is_all:
            from .patterns import select_keys

            shown_missing = select_keys(shown_missing, selection.include, selection.exclude, regex=selection.regex)
    values = None
    if stats or check_finite or sha256:
        from .stats import values_of

        with progress("reading values", report.total_bytes) as advance:
            values = values_of(
                ((r.key, ckpt_obj.state_dict[r.key]) for r in report.tensors),
                stats=stats,
                finite=check_finite,
                sha256=sha256,
                threads=loading.threads,
                progress=advance,
            )
        bad = [k for k, v in values.items() if not v.finite] if check_finite else []
        if bad:
            named = ", ".join(f"{k} ({values[k].nan} NaN, {values[k].inf} Inf)" for k in bad)
            say(f"not finite: {len(bad)} of {len(values)} tensors hold NaN or Inf: {named}")
    return InspectResult(
        report, model_data, model, shown_missing, tuple(say.lines), values, check_finite, stats, *_io([ckpt_obj])
    )


def extract(
    ckpt: str | Path,
    writing: Writing,
    *,
    selection: Selection = ALL_KEYS,
    loading: Loading = SAFE_LOADING,
    model: ModelCheck = NO_MODEL,
    notify: Notify | None = None,
    progress: Progress | None = None,
) -> WriteResult:
    """Write the selected entries of `ckpt`'s state_dict as a bare state_dict to `writing.output`
    (the container is dropped; no selection: the whole state_dict). Nothing selected is an error."""
    from .surgery import extract_state_dict

    say = _Notices(notify)
    ckpt, output = _location(ckpt), _location(writing.output)
    writing = _check_dtype(writing)
    _check_output(writing, [ckpt], loading)
    ckpt_obj = _load(ckpt, loading, say)
    _note_container(ckpt_obj, say)
    keys = _select(list(ckpt_obj.state_dict), selection, say)
    result = extract_state_dict(ckpt_obj.state_dict, keys)
    model_data = _model_check(result, model, ckpt_path=str(ckpt), out_path=str(output))
    fields: dict[str, Any] = dict(sources={k: str(ckpt) for k in result}, state_dict_key=ckpt_obj.state_dict_key)
    if _refused(model_data):
        return _write_result(
            "extract", writing, result, None, model_data, model, say, refused=True, loaded=[ckpt_obj], **fields
        )
    with contextlib.ExitStack() as stack:
        result, fields["cast"] = _cast(result, writing, stack, progress)
        written = _write(result, writing, [ckpt], loading, say, progress, safetensors_metadata=_st_meta(ckpt_obj))
    return _write_result("extract", writing, result, written, model_data, model, say, loaded=[ckpt_obj], **fields)


def rename(
    ckpt: str | Path,
    rules: RenameRules,
    writing: Writing,
    *,
    loading: Loading = SAFE_LOADING,
    model: ModelCheck = NO_MODEL,
    notify: Notify | None = None,
    progress: Progress | None = None,
) -> WriteResult:
    """Rename the keys of `ckpt`'s state_dict by `rules` and write it back in its container (every
    other entry unchanged) to `writing.output`. Two keys given one name is an error."""
    from .io import OutputFormat, with_state_dict
    from .surgery import rename_state_dict

    say = _Notices(notify)
    ckpt, output = _location(ckpt), _location(writing.output)
    if rules.is_empty:
        raise UsageError("nothing to do: give --map, --strip-prefix, --sub or --add-prefix")
    writing = _check_dtype(writing)
    fmt = _check_output(writing, [ckpt], loading)
    ckpt_obj = _load(ckpt, loading, say)
    _note_container(ckpt_obj, say)
    renamed, plan = rename_state_dict(ckpt_obj.state_dict, rules)
    model_data = _model_check(renamed, model, ckpt_path=str(ckpt), out_path=str(output))
    fields: dict[str, Any] = dict(
        sources={k: str(ckpt) for k in renamed}, state_dict_key=ckpt_obj.state_dict_key, renamed=dict(plan)
    )
    if _refused(model_data):
        return _write_result(
            "rename", writing, renamed, None, model_data, model, say, refused=True, loaded=[ckpt_obj], **fields
        )
    if all(old == new for old, new in plan.items()):
        say("warning: no key changed")
    with contextlib.ExitStack() as stack:
        renamed, fields["cast"] = _cast(renamed, writing, stack, progress)
        target: Any = renamed
        if not writing.dry_run:
            if fmt in (OutputFormat.pt, OutputFormat.dcp):  # layouts that hold a whole container
                target = with_state_dict(ckpt_obj, renamed)
            elif ckpt_obj.state_dict_path:
                what = "a .safetensors output" if fmt is OutputFormat.safetensors else f"a {fmt.value} output"
                say(f"note: {what} holds the state_dict only; the container's other entries are dropped")
        written = _write(target, writing, [ckpt], loading, say, progress, safetensors_metadata=_st_meta(ckpt_obj))
    return _write_result("rename", writing, renamed, written, model_data, model, say, loaded=[ckpt_obj], **fields)


def merge(
    ckpts: Sequence[str | Path],
    writing: Writing,
    *,
    on_conflict: OnConflict | str = "error",
    average: bool = False,
    weights: Sequence[float] | None = None,
    loading: Loading = SAFE_LOADING,
    model: ModelCheck = NO_MODEL,
    notify: Notify | None = None,
    progress: Progress | None = None,
) -> WriteResult:
    """The union of the state_dicts of `ckpts` in first-seen order (a key in several: `on_conflict`
    error, first or last), or with `average` their weighted mean (`weights`, normalised; equal by
    default), written to `writing.output`."""
    from .merge import OnConflict, average_state_dicts, merge_state_dicts, normalise_weights

    say = _Notices(notify)
    progress = progress or _no_progress
    paths, output = [_location(p) for p in ckpts], _location(writing.output)
    if len(paths) < 2:
        raise UsageError("merge needs at least two checkpoints")
    if weights is not None and not average:
        raise UsageError("--weights needs --average")
    if average:
        normalise_weights(None if weights is None else list(weights), len(paths))  # before any input is read
    writing = _check_dtype(writing)
    _check_output(writing, paths, loading)
    loaded = [_load(p, loading, say) for p in paths]
    for c in loaded:
        _note_container(c, say)
    sds = [c.state_dict for c in loaded]
    report: MergeReport | None = None
    with contextlib.ExitStack() as stack:
        if average:
            from .io import staged_tensors
            from .merge import check_averageable

            check_averageable(sds)
            if writing.dry_run:
                result = sds[0]
            else:
                # before minutes of averaging, not after
                _check_output(writing, paths, loading)
                # the mean goes to disk as it is made, in a scratch file beside OUT (in the temp
                # directory for a URL; a file's name for a directory output: staged_tensors refuses
                # to stand for anything but a file)
                stage = stack.enter_context(staged_tensors(_scratch_for(writing)))
                with progress("averaging", total_bytes(sds[0].values()) * len(sds)) as advance:
                    result, report = average_state_dicts(
                        sds, None if weights is None else list(weights), progress=advance, sink=stage.add
                    )
        else:
            result, report = merge_state_dicts(sds, OnConflict(on_conflict))
        model_data = _model_check(result, model, ckpt_path=str(paths[0]), out_path=str(output))
        indexes = report.sources if report is not None else {k: 0 for k in result}
        fields: dict[str, Any] = dict(average=average, sources={k: str(paths[i]) for k, i in indexes.items()})
        if _refused(model_data):
            return _write_result(
                "merge", writing, result, None, model_data, model, say, refused=True, loaded=loaded, **fields
            )
        for w in merge_warnings(report) if report is not None else ():
            say(f"warning: {w}")
        result, fields["cast"] = _cast(result, writing, stack, progress)
        written = _write(result, writing, paths, loading, say, progress)
    if report is not None:
        fields.update(conflicts=tuple(report.conflicts), warnings=tuple(report.warnings))
    return _write_result("merge", writing, result, written, model_data, model, say, loaded=loaded, **fields)


def diff(
    a: str | Path,
    b: str | Path,
    *,
    selection: Selection = ALL_KEYS,
    loading: Loading = SAFE_LOADING,
    key_a: str | None = None,
    key_b: str | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    ignore_dtype: bool = False,
    model: ModelCheck = NO_MODEL,
    notify: Notify | None = None,
    progress: Progress | None = None,
) -> DiffResult:
    """Compare the state_dicts of `a` and `b` (the selected keys of their union): keys only in one,
    shape, dtype, extra state and value mismatches; equal when `|a-b| <= atol + rtol*|b|`.
    `key_a`/`key_b` override `loading.key` for one side. `exit_code` 0 identical, 1 different (or
    a side that does not fit `model`)."""
    from .diff import check_tolerances, diff_state_dicts

    say = _Notices(notify)
    progress = progress or _no_progress
    check_tolerances(rtol, atol, prefix="--")  # before anything is read
    ca = _load(_location(a), loading._replace(key=key_a if key_a is not None else loading.key), say)
    cb = _load(_location(b), loading._replace(key=key_b if key_b is not None else loading.key), say)
    union = list(ca.state_dict) + [k for k in cb.state_dict if k not in ca.state_dict]
    keys = union if selection.is_all else _select(union, selection, say)
    with progress("comparing", total_bytes(ca.state_dict[k] for k in keys if k in ca.state_dict)) as advance:
        report = diff_state_dicts(
            ca.state_dict,
            cb.state_dict,
            keys,
            rtol=rtol,
            atol=atol,
            ignore_dtype=ignore_dtype,
            progress=advance,
            threads=loading.threads,
        )
    models = {}
    for side, c in (("a", ca), ("b", cb)):
        m = _model_check(c.state_dict, model, ckpt_path=str(c.path))
        if m is not None:
            models[side] = m
    return DiffResult(report, models, model, tuple(say.lines), *_io([ca, cb]))


# ------------------------------------------------------------------------------------ helpers


def total_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the tensors among `tensors` (a state_dict's extra state entries count nothing)."""
    from .tensors import is_tensor, nbytes_of

    return sum(nbytes_of(t) for t in tensors if is_tensor(t))


def public_model(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A `--model` check as the JSON documents show it."""
    if data is None:
        return {}
    hidden = {"kinds", "compatible_allowed"}
    out = {k: v for k, v in data.items() if k not in hidden}
    out["compatible_with_allowances"] = data["compatible_allowed"]
    return out


def merge_warnings(report: MergeReport, shown: int = 3) -> list[str]:
    """A MergeReport's warnings as notices: one summary line for the integer tensors taken from the
    first input (a ResNet has one `num_batches_tracked` per BatchNorm), then any others."""
    from .containers import quote_key

    taken = list(report.taken_from_first)
    lines = list(report.warnings[len(taken) :])  # taken_from_first's own lines come first
    if taken:
        names = ", ".join(quote_key(k) for k in taken[:shown]) + (
            f" (+{len(taken) - shown} more)" if len(taken) > shown else ""
        )
        verb = "differ between inputs and were" if len(taken) > 1 else "differs between inputs and was"
        lines.insert(
            0, f"{len(taken)} integer tensor{'s' if len(taken) > 1 else ''} {verb} taken from the first: {names}"
        )
    return lines


def _location(location: str | os.PathLike[str]) -> str:
    """A checkpoint's location as the job keeps it: the string given (a URL, or a path whose
    trailing `/` says it is a directory)."""
    return os.fspath(location)


def _scratch_for(writing: Writing) -> Path:
    """The file name scratch files for OUT are made beside: OUT's own for a file, `OUT.staged` for a
    directory layout (staged_tensors stands for a file only), in the temp directory for a URL."""
    from .io import output_format

    place = _staging_place(_location(writing.output))
    fmt = output_format(writing.output, writing.format, writing.max_shard_size)
    return place.parent / f"{place.name}.staged" if fmt.is_directory else place


def _staging_place(output: str) -> Path:
    """Where scratch files for `output` go: beside a local output, in the temp directory for a URL."""
    from .engine.source import is_url

    if not is_url(output):
        return Path(output)
    import tempfile

    return Path(tempfile.gettempdir()) / Path(output).name


def _io(checkpoints: Sequence[Checkpoint]) -> tuple[int, int]:
    """(bytes read, requests made) through the checkpoints' sources, each source counted once."""
    sources = {id(s): s for c in checkpoints for s in c.sources}
    return sum(s.bytes_read for s in sources.values()), sum(s.requests for s in sources.values())


def _io_fields(checkpoints: Sequence[Checkpoint], written: Written | None = None) -> dict[str, Any]:
    """`bytes_read` and `requests`; after a write shared by torchrun ranks, the sums over the
    ranks, and each rank's (`ranks`)."""
    bytes_read, requests = _io(checkpoints)
    if written is None or written.ranks == 1:
        return {"bytes_read": bytes_read, "requests": requests}
    from .ranks import all_gather, world

    each = tuple((int(b), int(n)) for b, n in all_gather(world(), [bytes_read, requests]))
    return {"bytes_read": sum(b for b, _ in each), "requests": sum(n for _, n in each), "ranks": each}


def _load(path: Path | str, loading: Loading, say: Notify, *, metadata_only: bool = False) -> Checkpoint:
    from .io import load_checkpoint

    if loading.unsafe:
        say(f"warning: --unsafe: {path} is fully unpickled; it can run code")
    allow_globals = tuple(loading.allow_globals)
    if allow_globals:
        from .safety import resolve_allowed_globals

        resolve_allowed_globals(list(allow_globals))  # refuse code-running names before anything is read
    threads = loading.threads  # a bad --jobs is refused before anything is read
    ckpt = load_checkpoint(
        path,
        unsafe=loading.unsafe,
        key=loading.key,
        allow_globals=allow_globals,
        threads=threads,
        metadata_only=metadata_only,
        storage_options=loading.fsspec_options,
    )
    for note in ckpt.notes:
        say(f"warning: {note}")
    return ckpt


def _select(keys: Sequence[str], selection: Selection, say: Notify) -> list[str]:
    from .patterns import select_keys, unmatched_includes

    selected = select_keys(keys, selection.include, selection.exclude, regex=selection.regex)
    for p in unmatched_includes(keys, selection.include, regex=selection.regex):
        say(f"warning: --include {p!r} matches no key")
    if not selected:
        raise SelectionError("nothing selected: no key matches the patterns")
    return selected


def _note_container(ckpt: Checkpoint, say: Notify) -> None:
    if ckpt.state_dict_key:
        say(f"using the state_dict at key {ckpt.state_dict_key!r} of {ckpt.path}")


def _model_check(
    state_dict: Mapping[str, Any], model: ModelCheck, *, ckpt_path: str, out_path: str = "OUT"
) -> dict[str, Any] | None:
    """Run the --model check; returns its JSON-ready result (None without a model)."""
    if model.spec is None:
        if model.kwargs is not None:
            raise UsageError("--model-kwargs needs --model")
        return None
    from .model import check_model_spec
    from .tensors import is_tensor, shape_of

    # the model's code runs in a child process: it cannot print on stdout or end this process
    report = check_model_spec(
        model.spec,
        {k: shape_of(v) if is_tensor(v) else None for k, v in state_dict.items()},
        model.kwargs,
        metadata=getattr(state_dict, "_metadata", None),
    )
    data = report.to_dict()
    data["suggestions"] = [s.command(ckpt_path, out_path) for s in report.renames]
    data["compatible_allowed"] = report.compatible(
        allow_missing=model.allow_missing, allow_unexpected=model.allow_unexpected
    )
    data["kinds"] = dict(report.kinds)
    data["model"] = model.spec
    return data


def _refused(model_data: Mapping[str, Any] | None) -> bool:
    return model_data is not None and not model_data["compatible_allowed"]


def _check_output(writing: Writing, inputs: Sequence[Path | str], loading: Loading) -> OutputFormat:
    """The layout to write (`--format`, else from OUT as typed; `--max-shard-size` parsed) and,
    unless this is a dry run, the output checks: before any input is read, since a refusal should
    not wait for gigabytes to be parsed. `_write` checks again."""
    from .io import check_output, output_format, parse_size

    fmt = output_format(writing.output, writing.format, writing.max_shard_size)
    if writing.max_shard_size is not None:
        parse_size(writing.max_shard_size)
    if not writing.dry_run:
        check_output(
            _location(writing.output),
            inputs,
            force=writing.force,
            directory=fmt.is_directory,
            storage_options=loading.fsspec_options,
        )
    return fmt


def _st_meta(ckpt_obj: Checkpoint) -> Any:
    return ckpt_obj.safetensors_metadata if ckpt_obj.format == "safetensors" else None


def _check_dtype(writing: Writing) -> Writing:
    """`writing` with its `--dtype` as a plain name; one the cast does not know is refused before
    any input is read."""
    if writing.dtype is None:
        return writing
    from .cast import check_cast_dtype

    return writing._replace(dtype=check_cast_dtype(writing.dtype))


def _cast(
    state_dict: Mapping[str, Any],
    writing: Writing,
    stack: contextlib.ExitStack,
    progress: Progress | None,
) -> tuple[Any, tuple[str, ...]]:
    """`--dtype`: the state_dict with its floating-point tensors cast, parked in a scratch file
    beside the output until it is written (`stack` removes it), and the keys cast. A dry run
    only names the keys."""
    if writing.dtype is None:
        return state_dict, ()
    from .cast import cast_keys, cast_state_dict

    if writing.dry_run:
        return state_dict, tuple(cast_keys(state_dict, writing.dtype))
    from .io import staged_tensors

    stage = stack.enter_context(staged_tensors(_scratch_for(writing)))  # OUT was checked when the job began
    keys = cast_keys(state_dict, writing.dtype)
    with (progress or _no_progress)("casting", total_bytes(state_dict[k] for k in keys)) as advance:
        cast, done = cast_state_dict(state_dict, writing.dtype, stage.add_storage, progress=advance)
    return cast, tuple(done)


def _write(
    obj: Any,
    writing: Writing,
    inputs: Sequence[Path | str],
    loading: Loading,
    say: Notify,
    progress: Progress | None,
    safetensors_metadata: Any = None,
) -> Written | None:
    """Write `obj` (atomically) unless this is a dry run; returns what the writer wrote."""
    if writing.dry_run:
        return None
    from .io import check_output, iter_tensors, output_format, write_checkpoint

    fmt = output_format(writing.output, writing.format, writing.max_shard_size)
    output = _location(writing.output)
    check_output(
        output, inputs, force=writing.force, directory=fmt.is_directory, storage_options=loading.fsspec_options
    )
    with (progress or _no_progress)("writing", total_bytes(iter_tensors(obj))) as advance:
        written = write_checkpoint(
            obj,
            writing.output,
            safetensors_metadata=safetensors_metadata,
            verify=writing.verify,
            progress=advance,
            unsafe=loading.unsafe,
            allow_globals=tuple(loading.allow_globals),
            format=writing.format,
            max_shard_size=writing.max_shard_size,
            threads=loading.threads,
            force=writing.force,
            storage_options=loading.fsspec_options,
        )
    for n in written.notes:
        say(f"note: {n}")
    return written


def _write_result(
    command: str,
    writing: Writing,
    state_dict: Mapping[str, Any],
    written: Written | None,
    model_data: Mapping[str, Any] | None,
    model: ModelCheck,
    say: _Notices,
    *,
    refused: bool = False,
    loaded: Sequence[Checkpoint] = (),
    **fields: Any,
) -> WriteResult:
    from .containers import non_tensor_keys
    from .io import output_format

    extra = non_tensor_keys(state_dict)
    size = total_bytes(state_dict.values())
    if writing.dtype is not None and writing.dry_run:
        from .cast import cast_nbytes

        size = cast_nbytes(state_dict, writing.dtype)
    return WriteResult(
        command=command,
        output=str(writing.output),
        format=output_format(writing.output, writing.format, writing.max_shard_size).value,
        dry_run=writing.dry_run,
        refused=refused,
        keys=tuple(state_dict),
        num_tensors=len(state_dict) - len(extra),
        extra_state=tuple(extra),
        total_bytes=size,
        notes=tuple(written.notes if written is not None else ()),
        files=tuple(written.files if written is not None else ()),
        model=model_data,
        model_options=model,
        notices=tuple(say.lines),
        dtype=writing.dtype,
        **_io_fields(loaded, written),
        **fields,
    )
