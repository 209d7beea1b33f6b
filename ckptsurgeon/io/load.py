"""Loading a checkpoint: safely, once, through one open file; finding its state_dict.

A checkpoint is opened once, as an engine :class:`~ckptsurgeon.engine.source.Source` (an open
handle plus the identity that was validated), and every later read goes through that handle: a
file renamed onto the path afterwards is never read, one changed in place is refused. Loading
tries the torch-free engine first (metadata only: tensors are TensorMeta leaves whose bytes stay
on disk) and falls back to `torch.load(weights_only=True, mmap=True, map_location="cpu")` of the
same open file for what the engine does not model. `unsafe=True` is the only way to reach
`weights_only=False`.

A CKPT may also be a directory (see `engine.layout`): Hugging Face shards with their index (every
shard opened once, read in parallel), DeepSpeed's ZeRO-1/2 layout, or a directory holding one
checkpoint file. A Checkpoint owns every Source it was read from.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..containers import KeyPath, find_state_dict, format_key_path, is_extra_state_key, refuse_opaque_entries
from ..engine.layout import Layout, resolve_layout, zero3_refusal
from ..engine.meta import RawCheckpoint, TensorMeta
from ..engine.source import Source, is_url, open_source
from ..errors import (
    BadCheckpointError,
    CheckpointError,
    ContainerError,
    EngineUnsupported,
    RestrictedPickleError,
    UnsafeCheckpointError,
    UsageError,
)
from ..tensors import is_tensor

if TYPE_CHECKING:
    from ..engine.sharded import Shard


def _debug(message: str, *args: Any) -> None:
    """Engine decisions, for CKPTSURGEON_DEBUG (logging is imported only when something is said)."""
    import logging

    logging.getLogger("ckptsurgeon").debug(message, *args)


class Checkpoint:
    """A loaded checkpoint: the whole container plus the state_dict found inside it.

    It owns the open files its tensors are read from (`sources`: one for a file, one per shard
    for a directory; `source` is the first): use it as a context manager, or call `close()`, when
    done (a Checkpoint nobody references closes them too). Reading tensor bytes after `close()`
    is a BadCheckpointError. `shards` (the shard files, for a Hugging Face sharded directory)
    and `tensor_files` (key -> its shard) are None for a single file; `notes` are lines for
    the user about how the input was read.
    """

    def __init__(
        self,
        path: Path | str,  # a str for a URL
        format: str,  # "torch-zip" | "torch-legacy" | "safetensors" | "hf-sharded" | "deepspeed" | "dcp"
        container: Any,
        state_dict_path: KeyPath | None,
        state_dict: Mapping[str, Any],
        engine: str,  # "raw" (torch-free, TensorMeta leaves) or "torch"
        safetensors_metadata: dict[str, str] | None = None,
        source: Source | None = None,
        *,
        sources: Sequence[Source] = (),
        shards: Sequence[Shard] | None = None,
        tensor_files: Mapping[str, str] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.sources: tuple[Source, ...] = tuple(sources) or ((source,) if source is not None else ())
        self.source = source if source is not None else (self.sources[0] if self.sources else None)
        self.format = format
        self.container = container
        self.state_dict_path = state_dict_path
        self.state_dict = state_dict
        self.engine = engine
        self.safetensors_metadata = safetensors_metadata
        self.shards = tuple(shards) if shards is not None else None
        self.tensor_files = dict(tensor_files) if tensor_files is not None else None
        self.notes = tuple(notes)

    def __repr__(self) -> str:
        return (
            f"Checkpoint(path={self.path!r}, format={self.format!r}, "
            f"state_dict_key={self.state_dict_key!r}, engine={self.engine!r})"
        )

    def close(self) -> None:
        """Close the checkpoint's files (tensors read lazily can then no longer be read)."""
        for src in self.sources:
            src.close()

    @property
    def bytes_read(self) -> int:
        """Bytes read from storage so far through the checkpoint's files (`--json` bytes_read)."""
        return sum(src.bytes_read for src in {id(s): s for s in self.sources}.values())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def state_dict_key(self) -> str | None:
        return format_key_path(self.state_dict_path) if self.state_dict_path else None

    def other_entries(self) -> list[tuple[str, Any]]:
        """Top-level container entries other than the state_dict (empty for a bare state_dict)."""
        if not self.state_dict_path or not isinstance(self.container, Mapping):
            return []
        return [(str(k), v) for k, v in self.container.items() if k != self.state_dict_path[0]]


EngineRead = Callable[[Source, frozenset[str], bool], RawCheckpoint]  # (file, allowed globals, opaque)


def _engine_read(src: Source, allow_globals: frozenset[str], opaque: bool) -> RawCheckpoint:
    from ..engine.read import read_source

    return read_source(src, allow_globals=allow_globals, opaque=opaque)


def _read_raw(
    src: Source, allow_globals: frozenset[str], opaque: bool = True, read: EngineRead = _engine_read
) -> RawCheckpoint | None:
    """The engine's reading (`read`), or None where it does not model the file (torch decides then).

    The engine also decides what the file is before anything parses it: a non-checkpoint is a
    BadCheckpointError here. `opaque`: container entries built by globals outside the allowlist
    are read as inert opaque entries (see ckptsurgeon.engine.unpickle), not refused.
    """
    try:
        return read(src, allow_globals, opaque)
    except EngineUnsupported as exc:
        _debug("engine fallback for %s: %s", src, exc)
        return None


def _torch_load(src: Source, fmt: str, *, unsafe: bool, allow_globals: frozenset[str]) -> Any:
    """torch's own loading of the open file `src` (by `/proc/self/fd`, never by its name again),
    for what the engine does not model."""
    path = src.name
    opened = src.proc_path
    from ..safety import check_torch_version

    check_torch_version()  # weights_only is only as safe as the torch that implements it
    import torch

    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(opened, framework="pt") as f:
                tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
                tensors_metadata = f.metadata()
            return tensors, tensors_metadata
        except Exception as exc:
            raise BadCheckpointError(f"{path}: not a readable safetensors file: {_one_line(exc)}") from None
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not unsafe}
    if fmt == "torch-zip":
        kwargs["mmap"] = True
    from ..safety import torch_allowlist

    extra = torch_allowlist(allow_globals) if allow_globals and not unsafe else []
    try:
        with torch.serialization.safe_globals(extra):  # type: ignore[arg-type]  # (stand-in class, name) pairs
            obj = torch.load(opened, **kwargs)
    except CheckpointError as exc:  # an allowed class the file tried to call (see safety.py)
        raise BadCheckpointError(f"{path}: {exc}") from None
    except Exception as exc:
        if not unsafe:
            unsafe_names = _unsafe_globals(opened, fmt)
            if unsafe_names:
                raise UnsafeCheckpointError(str(path), unsafe_names) from None
        raise BadCheckpointError(f"{path}: not a readable checkpoint: {_one_line(exc)}") from None
    if unsafe:
        obj = _modules_to_state_dicts(obj)
    return obj


def _unsafe_globals(path: str, fmt: str) -> list[str]:
    """Globals the pickle references outside torch's allowlist (read without executing)."""
    import torch

    if fmt == "torch-zip":
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            return []
    return []


def _modules_to_state_dicts(obj: Any) -> Any:
    """With --unsafe, a pickled nn.Module (top level or a container entry) counts as its state_dict."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj.__class__((k, v.state_dict() if isinstance(v, torch.nn.Module) else v) for k, v in obj.items())
    return obj


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    unsafe: bool = False,
    key: str | None = None,
    allow_globals: Sequence[str] = (),
    threads: int = 1,
    metadata_only: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint safely and locate its state_dict (see containers.find_state_dict).

    `path` is a checkpoint file, a Hugging Face index file, or a directory laid out as one
    checkpoint (see `engine.layout.resolve_layout`), or the URL of any of them (`s3://...`,
    `https://...`), read by range requests (`storage_options` go to its fsspec filesystem).
    Tensors are engine TensorMeta leaves when the torch-free engine can read the file (no tensor
    data is read), torch tensors (mmap-backed where possible) otherwise. The shards of a directory
    are read in `threads` threads. The returned Checkpoint holds its files open (see
    `Checkpoint.close`).
    """
    path = path if isinstance(path, str) and is_url(path) else Path(path)
    layout = resolve_layout(path, storage_options)
    read = _read_layout(
        layout,
        unsafe=unsafe,
        allow_globals=frozenset(allow_globals),
        threads=threads,
        metadata_only=metadata_only,
        storage_options=storage_options,
    )
    if read.sources:  # the requests that found the layout count with its first file
        read.sources[0].requests += layout.requests
    try:
        container = read.container
        if read.format == "hf-sharded":
            _check_flat(container, read.tensor_files or {})
        try:
            sd_path, state_dict = find_state_dict(container, key)
        except ContainerError:
            refuse_opaque_entries(str(path), container)  # the state_dict is not beside them
            raise
        if layout.kind == "deepspeed":
            _check_not_partitioned(layout, state_dict)
        if read.engine == "torch":
            nested = [str(k) for k, v in state_dict.items() if getattr(v, "is_nested", False)]
            if nested:
                raise UsageError(f"{path}: nested tensors are not supported: {', '.join(map(repr, nested[:5]))}")
    except ContainerError as exc:
        _close(read.sources)
        raise ContainerError(f"{path}: {exc}") from None
    except BaseException:
        _close(read.sources)
        raise
    return Checkpoint(
        path=path,
        format=read.format,
        container=container,
        state_dict_path=sd_path,
        state_dict=state_dict,
        engine=read.engine,
        safetensors_metadata=read.metadata,
        sources=read.sources,
        shards=read.shards,
        tensor_files=read.tensor_files,
        notes=read.notes,
    )


class _Read(NamedTuple):
    """What reading a layout gave: the Checkpoint's parts."""

    format: str
    container: Any
    engine: str
    metadata: Any
    sources: tuple[Source, ...]
    shards: tuple[Shard, ...] | None = None
    tensor_files: dict[str, str] | None = None
    notes: tuple[str, ...] = ()


def _read_layout(
    layout: Layout,
    *,
    unsafe: bool,
    allow_globals: frozenset[str],
    threads: int,
    metadata_only: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> _Read:
    """Read what `layout` names; the Sources opened are in the result (closed again on failure).
    `metadata_only`: a DCP directory's `.metadata` alone (tensor bytes are still read on demand;
    its non-tensor values are not read)."""
    if layout.kind == "dcp":
        from ..engine.dcp import read_dcp, read_dcp_metadata

        read_dir = read_dcp_metadata if metadata_only else read_dcp
        return _several_files(read_dir(layout.path, allow_globals=allow_globals, storage_options=storage_options))
    if layout.kind == "hf-sharded":
        from ..engine.sharded import read_hf_sharded

        reader = functools.partial(_read_shard, unsafe=unsafe, allow_globals=allow_globals)
        return _several_files(
            read_hf_sharded(layout.path, read=reader, threads=threads, storage_options=storage_options)
        )
    src = open_source(layout.path, storage_options)
    try:
        fmt, obj, engine, metadata = _read_source(src, unsafe=unsafe, allow_globals=allow_globals)
    except BaseException:
        src.close()
        raise
    return _Read("deepspeed" if layout.kind == "deepspeed" else fmt, obj, engine, metadata, (src,))


def _read_shard(src: Source, formats: Sequence[str], *, unsafe: bool, allow_globals: frozenset[str]) -> tuple[str, Any]:
    """One shard of a directory, read as any file is (the engine, else torch), in `formats` only."""
    from ..engine.sharded import read_shard

    def engine(s: Source, allowed: frozenset[str], opaque: bool) -> RawCheckpoint:
        return read_shard(s, formats, allow_globals=allowed)  # a shard holds tensors only: nothing opaque

    fmt, obj, _, _ = _read_source(src, unsafe=unsafe, allow_globals=allow_globals, read=engine)
    return fmt, obj


def _several_files(raw: RawCheckpoint) -> _Read:
    """A checkpoint read from several files (`raw.extras["sources"]`: the reader opened them, the
    Checkpoint owns them), with the ties its metadata records restored."""
    sources = list(raw.extras.get("sources") or ([raw.source] if raw.source is not None else []))
    owned = {id(s) for s in sources}
    leaves = list(iter_tensors(raw.obj))
    for t in leaves:  # whatever a tensor reads through is owned too
        if isinstance(t, TensorMeta) and id(t.storage.source) not in owned:
            owned.add(id(t.storage.source))
            sources.append(t.storage.source)
    engine = "raw" if all(isinstance(t, TensorMeta) for t in leaves) else "torch"
    files = raw.extras.get("tensor_files")
    if raw.metadata:
        from ..tensors import restore_duplicates

        before = set(raw.obj)
        restore_duplicates(raw.obj, raw.metadata)  # ties dropped by the writer come back
        if files is not None:
            files = dict(files)
            files.update((k, files[raw.metadata[k]]) for k in raw.obj if k not in before)
    shards = raw.extras.get("shards")
    return _Read(
        raw.format,
        raw.obj,
        engine,
        None,
        tuple(sources),
        tuple(shards) if shards is not None else None,
        files,
        tuple(raw.extras.get("notes", ())),
    )


def _close(sources: Sequence[Source]) -> None:
    for src in sources:
        src.close()


def _check_flat(container: Any, files: Mapping[str, str]) -> None:
    """The shards of a directory hold tensors (and extra state) only: nothing else is a state_dict."""
    from ..tensors import is_tensor

    for key, value in container.items():
        if not is_tensor(value) and not is_extra_state_key(key):
            raise BadCheckpointError(
                f"{files.get(key, '?')}: {key!r} is a {type(value).__name__}, not a tensor: a shard holds tensors only"
            )


def _check_not_partitioned(layout: Layout, state_dict: Mapping[str, Any]) -> None:
    """A DeepSpeed `module` whose tensors are all empty holds placeholders of partitioned weights."""
    from ..tensors import is_tensor, numel_of

    tensors = [v for v in state_dict.values() if is_tensor(v)]
    if tensors and all(numel_of(t) == 0 for t in tensors):
        raise zero3_refusal(os.path.dirname(layout.path), None)


def _read_source(
    src: Source, *, unsafe: bool, allow_globals: frozenset[str], read: EngineRead = _engine_read
) -> tuple[str, Any, str, Any]:
    """(format, whole object, engine used, safetensors metadata) of an open checkpoint file;
    `read` is the engine's reading of it."""
    raw: RawCheckpoint | None = None
    try:
        raw = _read_raw(src, allow_globals, opaque=not unsafe, read=read)
    except (UnsafeCheckpointError, RestrictedPickleError):
        if not unsafe:  # --unsafe: whatever torch.load(weights_only=False) reads (any protocol)
            raise
    if raw is not None:
        fmt, obj, engine, metadata = raw.format, raw.obj, "raw", raw.metadata
    else:
        from ..engine.read import detect_format

        fmt, engine, metadata = detect_format(src), "torch", None
        obj = _torch_load(src, fmt, unsafe=unsafe, allow_globals=allow_globals)
        if fmt == "safetensors":
            obj, metadata = obj
        src.check_unchanged()  # torch read (or mapped) the file that was validated, as it was
    if fmt == "safetensors" and metadata:
        from ..tensors import restore_duplicates

        metadata = restore_duplicates(obj, metadata) or None  # ties dropped by the writer come back
    return fmt, obj, engine, metadata


def verify_data(ckpt: Checkpoint, progress: Callable[[int], None] | None = None) -> int:
    """Read every storage of the checkpoint once and check its CRC-32 (zip records carry one).

    Returns the number of bytes checked. Raises BadCheckpointError on a mismatch or a short
    read. Tensors loaded by the torch fallback were already read by torch.load and are skipped.
    """
    from ..engine.data import verify_crc

    seen: set[Any] = set()
    checked = 0
    for t in iter_tensors(ckpt.container):
        if isinstance(t, TensorMeta) and t.storage.identity not in seen:
            seen.add(t.storage.identity)
            verify_crc(t.storage)
            checked += t.storage.nbytes
            if progress is not None:
                progress(t.storage.nbytes)
    return checked


def as_torch(obj: Any) -> Any:
    """The same object graph with engine TensorMeta leaves turned into torch tensors."""
    if not any(isinstance(t, TensorMeta) for t in iter_tensors(obj)):
        return obj
    from ..engine.materialize import to_torch

    return to_torch(obj)


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[Any]:
    if is_tensor(obj):
        yield obj
    elif depth > 100:
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v, depth + 1)
