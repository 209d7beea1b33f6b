"""Reading a Hugging Face sharded checkpoint: an index file and the shard files it names.

The index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) maps every tensor name
to a shard file in its `weight_map`; its `metadata` may hold `total_size` and, for safetensors,
the tied names huggingface_hub dropped from the shards (`"lm_head.weight": "embed.weight"`).

The index is data from the file's author, checked as huggingface_hub checks it and more: at most
10 MB of UTF-8 JSON, no name given twice, `weight_map` a non-empty object of strings; shard names
relative paths inside the directory (no absolute or drive path, no `..`, whatever the OS) with
the extension the index type implies (`.safetensors` or `.bin`), and a shard's content must be
of that kind too (decided by its magic bytes). The tensors come from the shards themselves, each
opened once as a :class:`Source` and read by the existing readers (safetensors: the 8-byte
length and the header, nothing else); the index must agree with them: a tensor it lists for a
shard that does not hold it, or one a shard holds that it gives to another shard, is refused,
naming both. A tensor no entry lists, held by one shard only, is read (as huggingface_hub loads
it) and said in a note.

A URL index (`s3://.../model.safetensors.index.json`, `https://...`) is read the same way: its
shards are the URLs of their names joined onto the index's directory with `/`, opened by
:func:`~.source.open_source`. Opening a remote shard is one ranged GET of its first 100 kB, which
holds its header: the shards are opened and read in up to :data:`REMOTE_THREADS` threads at once
(however few `--jobs`), since those requests wait on the store's latency, not on this machine.

Key order: the shards in the order the `weight_map` first names them; in each shard, its tensors
in `weight_map` order, then any it holds that the index does not list, in the shard's order. For
an index huggingface_hub wrote, whose `weight_map` follows the state_dict, that is the state_dict's
order.
"""

from __future__ import annotations

import gc
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

from ..errors import BadCheckpointError
from .limits import brief, quote_name
from .meta import RawCheckpoint
from .safetensors_format import MAX_HEADER_BYTES, DuplicateKey, parse_header, unique_pairs
from .source import Source, is_url, open_source
from .threads import map_in_threads

__all__ = ["MAX_INDEX_BYTES", "HfIndex", "Shard", "read_hf_sharded", "read_index", "read_shard"]

MAX_INDEX_BYTES = 10 * 1024 * 1024  # huggingface_hub's MAX_INDEX_FILE_SIZE
REMOTE_THREADS = 16  # remote shards opened (and their headers read) at once, whatever --jobs says

# index name ending -> (shard extension, the formats its shards may have)
INDEX_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    ".safetensors.index.json": (".safetensors", ("safetensors",)),
    ".bin.index.json": (".bin", ("torch-zip", "torch-legacy")),
}

SHARD_FORMATS = ("safetensors", "torch-zip", "torch-legacy")

# a shard's reading: (its Source, the formats it may have) -> (format, its mapping of names to tensors)
ReadShard = Callable[[Source, Sequence[str]], tuple[str, Any]]


class Shard(NamedTuple):
    """One shard file as `inspect --json` lists it: `file` as the index names it, its `format`,
    the number of tensors it holds and its size in `bytes`."""

    file: str
    format: str
    num_tensors: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "num_tensors": self.num_tensors, "bytes": self.bytes}


class HfIndex(NamedTuple):
    """A checked index: `weight_map` (tensor -> shard name, in the file's order), `shards` (the shard
    names in first-named order), `ties` (dropped name -> kept name, from `metadata`), and the
    shard formats its type allows."""

    path: str
    weight_map: dict[str, str]
    shards: tuple[str, ...]
    ties: dict[str, str]
    extension: str
    formats: tuple[str, ...]


def _index_kind(path: str) -> tuple[str, tuple[str, ...]]:
    base = os.path.basename(path)
    for ending, kind in INDEX_KINDS.items():
        if base.endswith(ending):
            return kind
    raise BadCheckpointError(
        f"{path}: unknown index type: expected a name ending in "
        f"{' or '.join(INDEX_KINDS)} (model.safetensors.index.json, pytorch_model.bin.index.json)"
    )


def check_shard_name(name: str, extension: str, index: str) -> None:
    """Refuse a shard name that is not a plain relative path inside the index's directory, or whose
    extension is not the one the index type implies."""

    def bad(why: str) -> BadCheckpointError:
        return BadCheckpointError(f"{index}: shard name {quote_name(name)} {why}")

    if not name or "\x00" in name:
        raise bad("is not a file name")
    windows = PureWindowsPath(name)  # on every OS: "/" and "\" both separate, drives are seen
    if windows.drive or windows.root or PurePosixPath(name).is_absolute():
        raise bad("is an absolute path: shards must lie inside the index's directory")
    if ".." in windows.parts or ".." in PurePosixPath(name).parts:
        raise bad("leaves the index's directory (..)")
    if not name.endswith(extension):
        raise bad(f"does not end in {extension}, as the shards of this index must")


def read_index(src: Source) -> HfIndex:
    """Parse and check the index file `src` (see the module's docstring)."""
    path = src.name
    extension, formats = _index_kind(path)
    if src.size > MAX_INDEX_BYTES:
        raise BadCheckpointError(
            f"{path}: an index of {src.size} bytes exceeds the {MAX_INDEX_BYTES} byte limit; not a checkpoint index"
        )
    import json

    try:
        parsed = json.loads(src.pread(src.size, 0).decode("utf-8"), object_pairs_hook=unique_pairs)
    except DuplicateKey as e:
        raise BadCheckpointError(f"{path}: invalid index: the name {quote_name(e.args[0])} appears twice") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BadCheckpointError(f"{path}: invalid index: not JSON ({e})") from None
    except RecursionError:
        raise BadCheckpointError(f"{path}: invalid index: the JSON is nested too deeply") from None
    if type(parsed) is not dict or type(parsed.get("weight_map")) is not dict:
        raise BadCheckpointError(f"{path}: invalid index: expected a JSON object with a 'weight_map' object")
    weight_map: dict[str, Any] = parsed["weight_map"]
    if not weight_map:
        raise BadCheckpointError(f"{path}: invalid index: the 'weight_map' lists no tensor")
    for key, shard in weight_map.items():
        if type(shard) is not str:
            raise BadCheckpointError(
                f"{path}: invalid index: the shard of {quote_name(key)} is {brief(shard)}, not a name"
            )
    metadata = parsed.get("metadata", {})
    if type(metadata) is not dict:
        raise BadCheckpointError(f"{path}: invalid index: 'metadata' is {brief(metadata)}, not an object")
    shards = tuple(dict.fromkeys(weight_map.values()))
    for name in shards:
        check_shard_name(name, extension, path)
    ties = {k: v for k, v in metadata.items() if type(v) is str and k not in weight_map}
    return HfIndex(path, weight_map, shards, ties, extension, formats)


def read_shard(
    src: Source, formats: Sequence[str] = SHARD_FORMATS, *, allow_globals: frozenset[str] = frozenset()
) -> RawCheckpoint:
    """The engine's reading of one shard whose format must be one of `formats` (refused before it is
    parsed otherwise). A safetensors shard is read as its 8-byte length and its header, nothing
    more (`bytes_read` counts exactly that); a torch file as the zip or legacy reader reads it."""
    from .legacy import read_torch_legacy
    from .read import detect_format
    from .zipread import read_torch_zip

    size = src.size
    if "safetensors" in formats and size >= 8:
        (header_len,) = struct.unpack("<Q", src.pread(8, 0))
        if header_len <= MAX_HEADER_BYTES and 8 + header_len <= size:
            header = src.pread(header_len, 8)
            if header.lstrip(b" \t\r\n")[:1] == b"{":
                tensors, metadata = parse_header(header, size - 8 - header_len, src.name, src, 8 + header_len)
                return RawCheckpoint(
                    path=_full_name(src.name), format="safetensors", obj=tensors, metadata=metadata, source=src
                )
    fmt = detect_format(src)  # a non-checkpoint is refused here, with a hint of what it is
    if fmt not in formats:
        raise BadCheckpointError(f"{src.name}: a {fmt} file, not a {' or '.join(formats)} shard as its name says")
    try:
        if fmt == "torch-zip":
            return read_torch_zip(src, allow_globals=allow_globals)
        if fmt == "torch-legacy":
            return read_torch_legacy(src, allow_globals=allow_globals)
        from .safetensors_format import read_safetensors

        return read_safetensors(src)
    except OSError as e:
        raise BadCheckpointError(f"{src.name}: read error: {e.strerror or e}") from None


def _engine_reader(src: Source, formats: Sequence[str]) -> tuple[str, Any]:
    raw = read_shard(src, formats)
    return raw.format, raw.obj


def _full_name(name: str) -> str:
    """A path made absolute; a URL as it is."""
    return name if is_url(name) else os.path.abspath(name)


def read_hf_sharded(
    index_path: str | os.PathLike[str],
    *,
    read: ReadShard = _engine_reader,
    threads: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> RawCheckpoint:
    """Read the sharded checkpoint whose index is `index_path` (see the module's docstring).

    `read` reads one shard (the engine's `read_shard` by default; the caller may add a fallback);
    shards are read in `threads` threads (remote ones: see REMOTE_THREADS). `index_path` may be a
    URL (`storage_options` go to its fsspec filesystem). Returns a RawCheckpoint of format "hf-sharded" whose
    `obj` maps every tensor name to its tensor, `metadata` holds the ties the index records
    (dropped -> kept; the caller restores them) and `extras` holds "shards" (a `Shard` each),
    "tensor_files" (name -> shard), "sources" (every Source opened: the index's, closed, and one
    open Source per shard, which the caller owns from then on) and "notes" (lines for the user).
    """
    index_name = os.fspath(index_path)
    with open_source(index_name, storage_options) as index_src:
        index = read_index(index_src)
    if index_src.remote:
        threads = max(threads, min(REMOTE_THREADS, len(index.shards)))
    sources: list[Source] = [index_src]
    try:
        shard_sources = _open_shards(index, _ShardNames(index_name, storage_options), sources, threads)
        results = _read_all(shard_sources, lambda src: read(src, index.formats), threads)
        for src, (fmt, _) in zip(shard_sources, results):
            if fmt not in index.formats:  # a fallback reader's word
                raise BadCheckpointError(f"{src.name}: a {fmt} file, not a {index.extension} shard as its name says")
        obj, tensor_files, notes = _assemble(index, shard_sources, [obj for _, obj in results])
    except BaseException:
        for s in sources:
            s.close()
        raise
    shards = [
        Shard(name, fmt, len(shard_obj), src.size)
        for name, src, (fmt, shard_obj) in zip(index.shards, shard_sources, results)
    ]
    extras = {"shards": shards, "tensor_files": tensor_files, "sources": sources, "notes": notes}
    return RawCheckpoint(
        path=_full_name(index_name),
        format="hf-sharded",
        obj=obj,
        metadata=dict(index.ties),
        extras=extras,
        source=index_src,
    )


class _ShardNames:
    """Where an index's shards are: its directory's path, or URL (names joined with `/`)."""

    def __init__(self, index_name: str, storage_options: Mapping[str, Any] | None) -> None:
        self.url = is_url(index_name)
        self.directory = index_name.rpartition("/")[0] if self.url else os.path.dirname(index_name)
        self.storage_options = storage_options

    def open(self, name: str) -> Source:
        if self.url:
            from .remote import join_url

            return open_source(join_url(self.directory, name), self.storage_options)
        return Source(os.path.join(self.directory, name))


def _open_shards(index: HfIndex, names: _ShardNames, sources: list[Source], threads: int) -> list[Source]:
    """One Source per shard, in order (each appended to `sources` once it is open, for the
    caller to close), in `threads` threads for a remote index; two names of one file are refused."""
    import threading

    lock = threading.Lock()

    def open_one(name: str) -> Source:
        src = names.open(name)
        with lock:
            sources.append(src)
        return src

    opened: dict[tuple[int, int], str] = {}
    out = map_in_threads(open_one, index.shards, threads if names.url else 1, "ckptsurgeon-open")
    sources[len(sources) - len(out) :] = out  # in the index's order, whatever order they opened in
    for name, src in zip(index.shards, out):
        if src.file_id in opened:
            raise BadCheckpointError(
                f"{index.path}: the shard names {quote_name(opened[src.file_id])} and {quote_name(name)} are one file"
            )
        opened[src.file_id] = name
    return out


def _read_all(
    sources: Sequence[Source], read: Callable[[Source], tuple[str, Any]], threads: int
) -> list[tuple[str, Any]]:
    """`read` of every source, in order; in `threads` threads when there are several shards. The
    first failure in shard order is raised (the others are not started or run to their end)."""
    collecting = gc.isenabled()
    gc.disable()  # the readers build graphs without cycles: see read.read_source
    try:
        return map_in_threads(read, sources, threads, "ckptsurgeon-shard")
    finally:
        if collecting:
            gc.enable()


def _assemble(
    index: HfIndex, sources: Sequence[Source], objs: Sequence[Any]
) -> tuple[OrderedDict[str, Any], dict[str, str], list[str]]:
    """The whole state_dict from the shards' mappings, checked against the index."""
    held: dict[str, str] = {}  # tensor -> the shard holding it
    unlisted: dict[str, list[str]] = {}  # shard -> the tensors it holds that the index does not list
    for name, src, obj in zip(index.shards, sources, objs):
        if not isinstance(obj, Mapping) or not all(type(k) is str for k in obj):
            raise BadCheckpointError(f"{src.name}: not a shard: a shard holds a mapping of tensor names to tensors")
        for key in obj:
            listed = index.weight_map.get(key)
            if key in held:
                both = f"{quote_name(held[key])} and {quote_name(name)}"
                raise BadCheckpointError(f"{index.path}: the tensor {quote_name(key)} is in two shards: {both}")
            if listed is None:
                unlisted.setdefault(name, []).append(key)
            elif listed != name:
                raise BadCheckpointError(
                    f"{src.name}: the shard holds {quote_name(key)}, "
                    f"which the index {index.path} gives to {quote_name(listed)}"
                )
            held[key] = name
    for key, name in index.weight_map.items():
        if key not in held:
            raise BadCheckpointError(
                f"{index.path}: the index lists {quote_name(key)} in the shard {quote_name(name)}, "
                "which does not hold it"
            )
    by_shard: dict[str, list[str]] = {name: [] for name in index.shards}
    for key, name in index.weight_map.items():
        by_shard[name].append(key)
    out: OrderedDict[str, Any] = OrderedDict()
    files: dict[str, str] = {}
    for name, obj in zip(index.shards, objs):
        for key in by_shard[name] + unlisted.get(name, []):
            out[key] = obj[key]
            files[key] = name
    notes = []
    missing = [k for keys in unlisted.values() for k in keys]
    if missing:
        shown = ", ".join(map(quote_name, missing[:5])) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        notes.append(
            f"{index.path}: the shards hold {len(missing)} tensors the index does not list (read anyway): {shown}"
        )
    return out, files, notes
