"""Saving a checkpoint: torch.save's zip format or safetensors (storage records copied byte for
byte when the engine read them), one file through :func:`~.atomic.atomic_output`, or a directory
layout (the Hub's safetensors or `.bin` shards with their index; DCP) through a
:class:`~.targets.DirectoryTarget` (local: `atomic_directory`; a URL: file by file, the index
last); optionally read back and compared (`verify`)."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from ..containers import replace_at
from ..engine.meta import TensorMeta
from ..engine.source import Source, is_url
from ..engine.threads import map_in_threads
from ..errors import CheckpointError, EngineUnsupported, OutputError, UsageError
from ..ranks import Team, team_directory, world
from ..tensors import is_tensor
from .atomic import atomic_output
from .load import Checkpoint, _debug, _read_source, as_torch, iter_tensors

if TYPE_CHECKING:
    from ..engine.safetensors_write import Entry
    from .targets import DirectoryTarget


def with_state_dict(ckpt: Checkpoint, state_dict: Mapping[str, Any]) -> Any:
    """The checkpoint's container with its state_dict replaced (other entries unchanged)."""
    return replace_at(ckpt.container, ckpt.state_dict_path, state_dict)


def make_state_dict(items: Sequence[tuple[str, Any]], metadata: Mapping[str, Any] | None) -> OrderedDict[str, Any]:
    """An OrderedDict state_dict, with `_metadata` attached when there is one."""
    sd: OrderedDict[str, Any] = OrderedDict(items)
    if metadata is not None:
        sd._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return sd


class OutputFormat(str, Enum):
    """The layout a writer produces (`--format`)."""

    pt = "pt"  # torch.save's zip format
    safetensors = "safetensors"
    hf = "hf"  # a directory: model-0000k-of-0000n.safetensors + model.safetensors.index.json
    hf_bin = "hf-bin"  # a directory: pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json
    dcp = "dcp"  # a directory: torch.distributed.checkpoint's .metadata + *.distcp

    @property
    def is_directory(self) -> bool:
        return self in (OutputFormat.hf, OutputFormat.hf_bin, OutputFormat.dcp)


DEFAULT_MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """A byte count from `--max-shard-size`: decimal units as the Hub writes them (`500MB`, `5GB`:
    GB = 10**9), binary ones (`2GiB`), or a plain number of bytes. Case-insensitive; a fraction
    (`1.5GB`) is rounded down, as huggingface_hub does. UsageError for anything else, or < 1."""
    import re

    if isinstance(size, int):
        value = size
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", size)
        unit = found.group(2).upper() if found else ""
        if found is None or unit not in _SIZE_UNITS:
            raise UsageError(
                f"--max-shard-size {size!r}: expected a size such as 500MB, 5GB (decimal, as the Hub), "
                "2GiB (binary) or a byte count"
            )
        number = found.group(1)
        value = int(number) * _SIZE_UNITS[unit] if number.isdigit() else int(float(number) * _SIZE_UNITS[unit])
    if value < 1:
        raise UsageError(f"--max-shard-size {size!r}: a shard holds at least one byte")
    return value


def output_format(
    output: str | os.PathLike[str], format: str | None = None, max_shard_size: str | int | None = None
) -> OutputFormat:
    """`format` when given, else from OUT as the user typed it: a path ending in `/`, an existing
    directory or a `--max-shard-size` -> hf (a sharded directory); `*.safetensors` -> safetensors;
    anything else -> pt. `--max-shard-size` with a single-file format, or a single-file format for
    a path ending in `/`, is a UsageError (with dcp it bounds each data file)."""
    text = os.fspath(output)
    if format is not None:
        try:
            chosen = OutputFormat(format)
        except ValueError:
            choices = ", ".join(f.value for f in OutputFormat)
            raise UsageError(f"--format {format!r}: expected one of {choices}") from None
    else:
        if text.endswith(("/", os.sep)) or os.path.isdir(text):
            chosen = OutputFormat.hf
        elif Path(text).suffix.lower() == ".safetensors":
            chosen = OutputFormat.safetensors
        elif max_shard_size is not None:
            chosen = OutputFormat.hf
        else:
            chosen = OutputFormat.pt
    if not chosen.is_directory and text.endswith(("/", os.sep)):
        raise UsageError(f"{text}: a path ending in / is a directory, but --format {chosen.value} writes one file")
    if max_shard_size is not None and not chosen.is_directory:
        why = "the --format given" if format is not None else "OUT's name"
        raise UsageError(
            f"--max-shard-size applies to sharded outputs (--format hf, hf-bin or dcp, or OUT ending in /); "
            f"{why} makes OUT {chosen.value}"
        )
    return chosen


class Written(NamedTuple):
    """What a writer wrote: the layout, notes for the user, and for a directory the files in it
    (name, bytes), in the order they were written (the index last), and the number of torchrun
    ranks that wrote them (1: this process alone)."""

    format: OutputFormat
    notes: list[str]
    files: list[tuple[str, int]]
    ranks: int = 1


def save_checkpoint(obj: Any, output: str | os.PathLike[str], **options: Any) -> list[str]:
    """Write `obj` atomically (see `write_checkpoint`, which takes the same keyword options) and
    return the notices for the user (e.g. what safetensors cannot represent)."""
    return write_checkpoint(obj, output, **options).notes


def write_checkpoint(
    obj: Any,
    output: str | os.PathLike[str],
    *,
    safetensors_metadata: Mapping[str, str] | None = None,
    verify: bool = False,
    progress: Callable[[int], None] | None = None,
    unsafe: bool = False,
    allow_globals: Sequence[str] = (),
    format: str | None = None,
    max_shard_size: str | int | None = None,
    threads: int = 1,
    force: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Written:
    """Write `obj` atomically to `output` in `format` (None: from the output, see `output_format`).

    Engine tensors (TensorMeta) are copied byte for byte from their files, into torch.save's zip
    format or into safetensors; other tensors are written by torch. A directory layout (`hf`,
    `hf-bin`: shards of at most `max_shard_size`, default 5GB, written by `threads` threads; `dcp`)
    is filled in a temporary directory beside `output` and swapped in whole; an existing one is
    replaced only with `force` and only when it holds nothing but a checkpoint layout. On any
    failure the destination is left exactly as it was and nothing temporary remains. With
    `verify`, every written file is read back and compared with `obj` before it replaces the
    destination. `progress` is called with byte counts as tensors are written. `unsafe` and
    `allow_globals` are what reading the output back may use (as for the input). `output` may be a
    URL (`s3://...`): a single file is written locally, then uploaded whole; a directory layout
    is uploaded file by file, the index last (`storage_options` go to fsspec).
    """
    fmt = output_format(output, format, max_shard_size)
    dest: Any = output if isinstance(output, str) and is_url(output) else Path(output)
    read_back = _ReadBack(verify, unsafe, frozenset(allow_globals))
    if fmt.is_directory:
        return _write_directory(
            obj,
            dest,
            fmt,
            safetensors_metadata,
            read_back,
            progress,
            max_shard_size,
            max(1, threads),
            force,
            storage_options,
        )
    notes: list[str] = []
    safetensors = fmt is OutputFormat.safetensors
    if safetensors:
        _check_tensors_only(obj, dest, fmt)

    def check(tmp: Path) -> None:
        read_back.check(obj, tmp, dest, by_key=safetensors)

    with atomic_output(dest, check=check if verify else None, storage_options=storage_options) as f:
        if safetensors:
            notes += _write_safetensors(obj, f, safetensors_metadata, progress, str(dest), threads)
        else:
            _write_pt(obj, f, dest, progress, threads)
    return Written(fmt, notes, [])


class _ReadBack(NamedTuple):
    """`--verify`: whether written files are read back, and how they may be read."""

    verify: bool
    unsafe: bool
    allow_globals: frozenset[str]

    def check(self, intended: Any, written: Path, output: Path | str, *, by_key: bool) -> None:
        if self.verify:
            _verify_written(
                intended, written, output, by_key=by_key, unsafe=self.unsafe, allow_globals=self.allow_globals
            )


def _write_pt(obj: Any, f: BinaryIO, output: Path, progress: Callable[[int], None] | None, threads: int = 1) -> None:
    """torch.save's zip format: records copied by the engine (remote ones read `threads` requests
    at a time), or torch.save for torch tensors."""
    if not _try_raw_write(obj, f, output, progress, threads):
        _write_torch(obj, f)


# ------------------------------------------------------------------------- directory layouts


class ShardPlan(NamedTuple):
    """The Hub's split of a state_dict: file name -> its keys (in order), and the total size."""

    files: list[tuple[str, list[str]]]
    total_size: int

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    def weight_map(self) -> dict[str, str]:
        return {key: name for name, keys in self.files for key in keys}


SAFETENSORS_PATTERN = "model{suffix}.safetensors"
BIN_PATTERN = "pytorch_model{suffix}.bin"


def plan_shards(state_dict: Mapping[str, Any], max_shard_size: int, pattern: str) -> ShardPlan:
    """Group the keys of `state_dict` into shards as `huggingface_hub.split_torch_state_dict_into_shards`
    does: greedily in key order, a tensor's size the bytes of its whole storage, tensors sharing a
    storage counted once and placed with the first, a tensor bigger than the limit alone in a shard
    (which comes before the shard being filled). One shard is named `pattern` without suffix."""
    by_storage: dict[Any, list[str]] = {}
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    total = 0
    for key, t in state_dict.items():
        ident, size = _hub_storage(t)
        if ident in by_storage:
            by_storage[ident].append(key)
            continue
        by_storage[ident] = [key]
        if size > max_shard_size:
            total += size
            shards.append([key])
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
        total += size
    if current:
        shards.append(current)
    for keys in by_storage.values():
        for shard in shards:
            if keys[0] in shard:
                shard.extend(keys[1:])
                break
    if len(shards) == 1:
        return ShardPlan([(pattern.format(suffix=""), shards[0])], total)
    n = len(shards)
    return ShardPlan(
        [(pattern.format(suffix=f"-{i + 1:05d}-of-{n:05d}"), keys) for i, keys in enumerate(shards)], total
    )


def _hub_storage(t: Any) -> tuple[Any, int]:
    """(identity, bytes) of a tensor's storage as huggingface_hub sees them: every empty storage is
    one (its data pointer is 0)."""
    from ..tensors import nbytes_of, storage_id, tensor_kind

    if isinstance(t, TensorMeta):
        size = t.storage.nbytes
        return (t.storage.identity if size else ("empty",)), size
    if tensor_kind(t) is None:
        size = int(t.untyped_storage().nbytes())
        return (storage_id(t) if size else ("empty",)), size
    return storage_id(t), nbytes_of(t)


def _write_directory(
    obj: Any,
    dest: Path,
    fmt: OutputFormat,
    metadata: Mapping[str, str] | None,
    read_back: _ReadBack,
    progress: Callable[[int], None] | None,
    max_shard_size: str | int | None,
    threads: int,
    force: bool,
    storage_options: Mapping[str, Any] | None = None,
) -> Written:
    """A directory layout, written through a directory target (see `targets.directory_target`):
    the shards (by `threads` threads; under torchrun, this rank's share of them), then the index."""
    if fmt is OutputFormat.dcp:
        return Written(
            fmt, [], _write_dcp(obj, dest, force, max_shard_size, _locked(progress), storage_options), world().size
        )
    _check_tensors_only(obj, dest, fmt)
    limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE)
    sd: OrderedDict[str, Any] = OrderedDict(obj)
    notes: list[str] = []
    index_metadata: dict[str, Any] = {}
    if fmt is OutputFormat.hf:
        sd, file_metadata, notes, dropped = _safetensors_plan(obj, metadata)
        plan = plan_shards(sd, limit, SAFETENSORS_PATTERN)
        if plan.is_sharded:  # the Hub's way: the file's own metadata is {"format": "pt"}, the rest in the index
            index_metadata = {k: v for k, v in file_metadata.items() if k != "format" and k not in dropped}
            index_metadata.update(dropped)
            file_metadata = {"format": "pt"}
        entries = {k: _entry(k, v) for k, v in sd.items()}
        from ..engine.safetensors_write import write_safetensors

        def write_shard(keys: list[str], f: BinaryIO, name: str) -> None:
            write_safetensors([entries[k] for k in keys], f, metadata=file_metadata, progress=advance, name=name)

    else:
        if getattr(obj, "_metadata", None):
            notes.append("the state_dict's _metadata (module versions) is not kept in .bin shards")
        plan = plan_shards(sd, limit, BIN_PATTERN)

        def write_shard(keys: list[str], f: BinaryIO, name: str) -> None:
            _write_pt(OrderedDict((k, sd[k]) for k in keys), f, Path(name), advance)

    advance = _locked(progress)
    # under torchrun each rank writes its share of the shards (see `ranks`), rank 0 the index
    with _team(dest, force, storage_options) as team:
        target = team.directory

        def one(item: tuple[str, list[str]]) -> tuple[str, int]:
            name, keys = item
            where = target.location(name)

            def check(path: Path) -> None:  # --verify: the shard reads back as meant, before it is added
                read_back.check(OrderedDict((k, sd[k]) for k in keys), path, where, by_key=True)

            size = target.write_file(
                name, lambda f: write_shard(keys, f, where), check=check if read_back.verify else None
            )
            return name, size

        mine = [plan.files[i] for i in team.mine([_shard_bytes(sd, keys) for _, keys in plan.files])]
        done = map_in_threads(one, mine, threads, "ckptsurgeon-shard")
        sizes = {name: size for rank_done in team.gather(done) for name, size in rank_done}
        files = [(name, sizes[name]) for name, _ in plan.files]
        if team.writes_index:
            layout = [name for name, _ in files]
            if not plan.is_sharded:
                target.commit(layout=layout)
            else:
                index = {
                    "metadata": {"total_size": plan.total_size, **index_metadata},
                    "weight_map": plan.weight_map(),
                }
                index_name = plan.files[0][0].split("-", 1)[0]
                index_name += (".safetensors" if fmt is OutputFormat.hf else ".bin") + ".index.json"
                import json

                text = json.dumps(index, indent=2).encode("utf-8")
                files.append((index_name, target.commit(index_name, lambda f: f.write(text), layout=layout)))
    return Written(fmt, notes, files, team.world.size)


def _team(
    dest: Path | str, force: bool, storage_options: Mapping[str, Any] | None
) -> AbstractContextManager[Team[DirectoryTarget]]:
    """The ranks writing `dest` (see `ranks.team_directory`) through one directory target: one
    process, or under torchrun every rank into rank 0's (its temporary directory, or its prefix
    of a remote store), rank 0 alone committing the index."""
    from .targets import directory_target, member_target

    return team_directory(
        world(),
        lambda: directory_target(dest, force=force, storage_options=storage_options),
        share=lambda target: target.shared,
        join=lambda shared: member_target(dest, shared, storage_options),
    )


def _shard_bytes(sd: Mapping[str, Any], keys: Sequence[str]) -> int:
    """The bytes of a shard's storages, each counted once (what balances shards across ranks)."""
    storages = dict(_hub_storage(sd[k]) for k in keys)
    return sum(storages.values())


def _write_dcp(
    obj: Any,
    dest: Path | str,
    force: bool,
    max_shard_size: str | int | None,
    progress: Callable[[int], None] | None,
    storage_options: Mapping[str, Any] | None,
) -> list[tuple[str, int]]:
    """torch.distributed.checkpoint's layout, its data in files of at most `max_shard_size` tensor
    bytes (one file without it), written through a directory target (made in its staging
    directory, then added), `.metadata` last; returns its files (name, bytes) in that order. Under
    torchrun each rank writes its share of the data files and rank 0 `.metadata`, once every rank
    is done."""
    from ..engine.dcp_write import METADATA, Placed, plan_dcp, write_dcp_files, write_dcp_metadata

    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    try:
        plan = plan_dcp(obj, limit)
    except EngineUnsupported as exc:
        raise UsageError(f"cannot write this checkpoint as dcp: {exc}") from None
    with _team(dest, force, storage_options) as team:
        target = team.directory
        placed, sizes = write_dcp_files(plan, team.mine(plan.sizes), str(target.staging), progress=progress)
        for name, _ in sizes:
            target.add_file(name, target.staging / name)
        everyone = team.gather((placed, sizes))
        files = sorted((name, size) for _, rank_sizes in everyone for name, size in rank_sizes)
        if team.writes_index:
            every_item = [Placed(*p) for rank_placed, _ in everyone for p in rank_placed]
            write_dcp_metadata(plan, every_item, str(target.staging))
            files.append((METADATA, target.commit(METADATA, layout=[name for name, _ in files])))
    return files


def _locked(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """`progress` made safe to call from the shard writers' threads."""
    if progress is None:
        return None
    import threading

    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            progress(n)

    return advance


def _check_tensors_only(obj: Any, output: Path, fmt: OutputFormat) -> None:
    """A .safetensors file, and the Hub's shards, hold a flat mapping of tensors: refuse anything
    else, naming what."""
    from ..containers import is_extra_state_key
    from ..errors import sorted_list

    what = "a .safetensors output" if fmt is OutputFormat.safetensors else f"a {fmt.value} output"
    holder = "safetensors holds" if fmt is OutputFormat.safetensors else f"{what} holds"
    if not isinstance(obj, Mapping):
        raise UsageError(f"{output}: {what} holds a bare state_dict only")
    others = [k for k, v in obj.items() if not is_tensor(v)]
    if others and all(is_extra_state_key(k) for k in others):
        raise UsageError(
            f"{output}: {holder} tensors only, not the extra state (non-tensor values) at "
            f"{sorted_list(others)}; leave it out (extract -x PATTERN) or write a .pt file"
        )
    if others:
        raise UsageError(f"{output}: {what} holds a bare state_dict only")


def _verify_written(
    intended: Any, written: Path, output: Path | str, *, by_key: bool, unsafe: bool, allow_globals: frozenset[str]
) -> None:
    """Read the written file back and compare every tensor (shape, dtype, values) with `intended`."""
    from ..diff import compare_values
    from ..tensors import dtype_name, shape_of, tensor_kind

    with contextlib.ExitStack() as stack:
        try:
            src = stack.enter_context(Source(written))
            _, container, _, _ = _read_source(src, unsafe=unsafe, allow_globals=allow_globals)
        except CheckpointError as exc:
            reason = str(exc).replace(str(written), str(output))
            raise OutputError(f"{output}: --verify failed: the written file does not read back: {reason}") from None
        if by_key:
            names = list(intended)
            want = [intended[k] for k in names]
            got = [container.get(k) for k in names] if isinstance(container, Mapping) else []
        else:
            names = [str(i) for i in range(len(list(iter_tensors(intended))))]
            want, got = list(iter_tensors(intended)), list(iter_tensors(container))
        if len(want) != len(got) or any(g is None for g in got):
            raise OutputError(f"{output}: --verify failed: the written file holds {len(got)} tensors, not {len(want)}")
        for name, w, g in zip(names, want, got):
            if tensor_kind(w) == "meta" and tensor_kind(g) == "meta":  # no values: the structure is all
                values_differ = False
            else:
                values_differ = compare_values(name, w, g) is not None
            if shape_of(w) != shape_of(g) or dtype_name(w) != dtype_name(g) or values_differ:
                raise OutputError(
                    f"{output}: --verify failed: tensor {name!r} reads back different from what was meant"
                )


def _try_raw_write(
    obj: Any, f: BinaryIO, output: Path | str, progress: Callable[[int], None] | None = None, threads: int = 1
) -> bool:
    """Copy storage records byte for byte when every tensor is a TensorMeta; False to use torch."""
    tensors = list(iter_tensors(obj))
    if not tensors or not all(isinstance(t, TensorMeta) for t in tensors):
        return False
    from ..engine.zipwrite import write_torch_zip

    start = f.tell()
    try:
        archive = Path(output).stem or "archive"
        write_torch_zip(obj, f, archive_name=archive, progress=progress, name=str(output), threads=threads)
        return True
    except EngineUnsupported as exc:
        _debug("raw write fallback: %s", exc)
        f.seek(start)
        f.truncate()
        return False


def _write_torch(obj: Any, f: BinaryIO) -> None:
    import torch

    from ..engine.limits import recursion_room
    from ..engine.pickle_checks import MAX_DEPTH

    with recursion_room(MAX_DEPTH):  # the converters and torch.save's pickler recurse per level
        obj = compact_views(as_torch(obj))
        torch.save(obj, f)


def _safetensors_plan(
    sd: Mapping[str, Any], metadata: Mapping[str, str] | None
) -> tuple[OrderedDict[str, Any], dict[str, str], list[str], dict[str, str]]:
    """What a safetensors file (or the Hub's shards) holds of `sd`: the tensors to write, the
    `__metadata__`, notes, and the ties left out. A tensor that is the very same view as another
    (a tied weight) is written once and its name recorded in the metadata as `dropped: kept`, as
    huggingface_hub does (unless the name is taken in the metadata already); "format": "pt" as
    huggingface_hub writes it (transformers checks it). Refuses (UsageError) tensors safetensors
    cannot hold."""
    from ..tensors import duplicate_names, shared_storage_groups, tensor_kind

    tensors: OrderedDict[str, Any] = OrderedDict(sd)
    notes = []
    file_metadata = {"format": "pt", **(metadata or {})}
    dropped = {k: v for k, v in duplicate_names(tensors).items() if k not in file_metadata}
    for name in dropped:
        del tensors[name]
    file_metadata.update(dropped)
    shared = shared_storage_groups(tensors)
    if shared:
        notes.append("safetensors cannot share storage: written separately: " + "; ".join(", ".join(g) for g in shared))
    if getattr(sd, "_metadata", None):
        notes.append("safetensors has no place for the state_dict's _metadata (module versions): dropped")
    resolved = [k for k, v in tensors.items() if tensor_kind(v) in ("conjugate view", "negative view")]
    if resolved:
        notes.append("safetensors has no conjugate or negative bit: resolved into the values of " + ", ".join(resolved))
    for k, v in tensors.items():
        _check_safetensors_tensor(k, v)
    return tensors, file_metadata, notes, dropped


def _write_safetensors(
    sd: Mapping[str, Any],
    f: BinaryIO,
    metadata: Mapping[str, str] | None,
    progress: Callable[[int], None] | None = None,
    name: str | None = None,
    threads: int = 1,
) -> list[str]:
    """Write `sd` as one safetensors file (see `_safetensors_plan` and
    :mod:`~ckptsurgeon.engine.safetensors_write`: header in the state_dict's order, data by
    decreasing element size, engine tensors copied from their files); returns the notes."""
    from ..engine.safetensors_write import write_safetensors

    tensors, file_metadata, notes, _ = _safetensors_plan(sd, metadata)
    entries = [_entry(k, v) for k, v in tensors.items()]
    write_safetensors(entries, f, metadata=file_metadata, progress=progress, name=name, threads=threads)
    return notes


def _check_safetensors_tensor(key: str, t: Any) -> None:
    """A UsageError for a tensor safetensors cannot hold (see `_safetensors_tensor`)."""
    from ..engine.safetensors_write import SAFETENSORS_CODES
    from ..tensors import dtype_name

    if isinstance(t, TensorMeta):
        if t.dtype not in SAFETENSORS_CODES:
            raise UsageError(
                f"cannot write {t.dtype} tensor {key!r} to safetensors: "
                "safetensors has no dtype for it (write a .pt file instead)"
            )
        return
    _safetensors_tensor(key, t)
    if dtype_name(t) not in SAFETENSORS_CODES:
        raise UsageError(f"safetensors has no dtype code for {key} ({dtype_name(t)}); write a .pt file")


def _entry(key: str, t: Any) -> Entry:
    """What the safetensors writer takes for one tensor: an engine tensor as it is (its bytes are
    copied from its file), a torch tensor as a function giving its contiguous bytes."""
    from ..engine.safetensors_write import Entry, entry_of
    from ..tensors import dtype_name

    if isinstance(t, TensorMeta):
        return entry_of(key, t)

    def data() -> memoryview:
        import torch

        flat = _safetensors_tensor(key, t).contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")

    return Entry(key, dtype_name(t), tuple(int(n) for n in t.shape), data)


def _safetensors_tensor(key: str, t: Any) -> Any:
    """A dense contiguous copy of `t` for safetensors, or a UsageError naming what it cannot hold:
    meta, sparse, quantized and nested tensors, and dtypes the installed safetensors has no code
    for (complex128, complex32, bits8, ...). conj/neg views are resolved (values unchanged)."""
    import safetensors
    from safetensors.torch import _SIZE  # the dtypes its writer knows (private)

    from ..tensors import kind_text, plain_values, tensor_kind

    kind = tensor_kind(t)
    if kind is not None and kind not in ("conjugate view", "negative view"):
        raise UsageError(f"cannot write {kind_text(t)} tensor {key!r} to safetensors: only dense tensors fit there")
    if t.dtype not in _SIZE:
        raise UsageError(
            f"cannot write {kind_text(t)} tensor {key!r} to safetensors: "
            f"safetensors {safetensors.__version__} has no dtype for it (write a .pt file instead)"
        )
    return plain_values(t, key, "write")  # no copy of a plain tensor: the writer streams them one by one


def compact_views(obj: Any) -> Any:
    """Shrink every storage to the span its tensors use, keeping tensors that share it shared.

    torch.save writes whole storages, so a slice of a large tensor would drag the whole base
    storage into the file; `.clone()` would fix that but break tying. This rebuilds each partly
    used storage once and re-views every tensor that uses it.
    """
    import torch

    from ..tensors import tensor_kind

    groups: dict[int, list[torch.Tensor]] = {}
    for t in iter_tensors(obj):
        if tensor_kind(t) is not None:  # sparse, quantized, meta, conj/neg: torch.save writes them as they are
            continue
        s = t.untyped_storage()
        if s.nbytes():
            groups.setdefault(s.data_ptr(), []).append(t)
    replace: dict[int, torch.Tensor] = {}
    for tensors in groups.values():
        storage = tensors[0].untyped_storage()
        spans = [_byte_span(t) for t in tensors]
        lo = min(s[0] for s in spans)
        hi = max(s[1] for s in spans)
        align = max(t.element_size() for t in tensors)
        lo -= lo % align
        if lo == 0 and hi >= storage.nbytes():
            continue
        new = torch.empty(hi - lo, dtype=torch.uint8)
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(storage, lo, (hi - lo,), (1,)))
        new_storage = new.untyped_storage()
        for t in tensors:
            view = torch.empty(0, dtype=t.dtype).set_(
                new_storage, t.storage_offset() - lo // t.element_size(), t.shape, t.stride()
            )
            if isinstance(t, torch.nn.Parameter):
                view = torch.nn.Parameter(view, requires_grad=t.requires_grad)
            replace[id(t)] = view
    return _replace_tensors(obj, replace) if replace else obj


def _byte_span(t: Any) -> tuple[int, int]:
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return (start, start)
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (start, (last + 1) * size)


def _replace_tensors(obj: Any, replace: dict[int, Any]) -> Any:
    if id(obj) in replace:
        return replace[id(obj)]
    if isinstance(obj, Mapping) and not is_tensor(obj):
        new = obj.__class__((k, _replace_tensors(v, replace)) for k, v in obj.items())  # type: ignore[call-arg]
        if hasattr(obj, "__dict__"):
            new.__dict__.update(obj.__dict__)
        return new
    if isinstance(obj, list):
        return [_replace_tensors(v, replace) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_replace_tensors(v, replace) for v in obj)
    return obj
