"""Writing a torch.distributed.checkpoint (DCP) directory without torch.

The layout is what `torch.distributed.checkpoint.save` writes from one process: `__0_0.distcp`
(or, with a largest file size, `__0_0.distcp`, `__0_1.distcp`, ...: see `plan_dcp`) holding one
item per value — each tensor and each non-tensor value a complete `torch.save` zip
(written by the copy engine, :func:`~.zipwrite.write_torch_zip`), one after the other — and
`.metadata`, written last: a pickle of DCP's metadata classes (`Metadata`,
`TensorStorageMetadata`, ...) emitted opcode by opcode as plain `pickle.load` reads them, no
torch imported. The state_dict is flattened as DCP's `flatten_state_dict` does (keys joined with
"."; `planner_data` keeps the path that un-flattens it), so `torch.distributed.checkpoint.load`
and `dcp_to_torch_save` give back the same nested values.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from ..errors import EngineUnsupported, OutputError
from .meta import TensorMeta, TorchDtype, TorchSize
from .pickle_write import _Pickler, iter_tensors
from .zipwrite import write_torch_zip

__all__ = ["DcpPlan", "Placed", "plan_dcp", "write_dcp", "write_dcp_files", "write_dcp_metadata"]

DATA_FILE_PATTERN = "__0_{index}.distcp"  # as one process of DCP's FileSystemWriter names its files
METADATA = ".metadata"
DCP_VERSION = "1.0.0"  # torch 2.13's `torch.distributed.checkpoint.metadata` writes this

_META = "torch.distributed.checkpoint.metadata"
_COPY_CHUNK = 64 << 20


class DcpPlan(NamedTuple):
    """What a DCP directory of a value holds: its items (fqn -> (key path, value), as `flatten`
    makes them) and its data files (name -> the fqns in it, in order), each written on its own."""

    items: dict[str, tuple[tuple[str | int, ...], Any]]
    files: list[tuple[str, list[str]]]

    @property
    def sizes(self) -> list[int]:
        """The tensor bytes of each data file (what balances them across writers)."""
        return [sum(_item_bytes(self.items[fqn][1]) for fqn in fqns) for _, fqns in self.files]


class Placed(NamedTuple):
    """Where one item was written: its data file, offset and length."""

    fqn: str
    file: str
    offset: int
    length: int


def plan_dcp(obj: Any, max_file_size: int | None = None) -> DcpPlan:
    """The items of `obj` (a dict with TensorMeta leaves) and their data files: one file
    (`__0_0.distcp`), or with `max_file_size` files `__0_0.distcp`, `__0_1.distcp`, ... filled in
    item order up to that many tensor bytes each (an item bigger than that alone in its file).
    Raises EngineUnsupported for values the layout cannot hold (a tuple holding tensors, which DCP
    would pickle as one opaque value)."""
    if not isinstance(obj, Mapping):
        raise EngineUnsupported(f"a DCP checkpoint holds a dict, not a {type(obj).__name__}")
    items = flatten(obj)
    groups: list[list[str]] = [[]]
    filled = 0
    for fqn, (_path, value) in items.items():
        size = _item_bytes(value)
        if max_file_size is not None and groups[-1] and filled + size > max_file_size:
            groups.append([])
            filled = 0
        groups[-1].append(fqn)
        filled += size
    return DcpPlan(items, [(DATA_FILE_PATTERN.format(index=i), fqns) for i, fqns in enumerate(groups)])


def write_dcp(
    obj: Any, directory: str, *, max_file_size: int | None = None, progress: Callable[[int], None] | None = None
) -> None:
    """Fill the empty directory `directory` with a DCP checkpoint of `obj`, a dict (a state_dict
    or a container such as `{"model": ..., "optim": ..., "step": 7}`) with TensorMeta leaves, its
    data in one file or, with `max_file_size`, in several (see `plan_dcp`).

    Every file is fsynced; `.metadata` is written last (the caller renames the directory into
    place). Raises EngineUnsupported for values the layout cannot hold, OutputError if writing
    fails.
    """
    plan = plan_dcp(obj, max_file_size)
    if os.listdir(directory):
        raise ValueError(f"write_dcp needs an empty directory: {directory}")
    placed, _ = write_dcp_files(plan, range(len(plan.files)), directory, progress=progress)
    write_dcp_metadata(plan, placed, directory)


def write_dcp_files(
    plan: DcpPlan, which: Iterable[int], directory: str, *, progress: Callable[[int], None] | None = None
) -> tuple[list[Placed], list[tuple[str, int]]]:
    """Write the data files of `plan` at positions `which` into `directory` (each item a complete
    `torch.save` zip, one after the other; fsynced); returns where each item went and each file's
    (name, bytes). A file does not depend on the others: writers may share them out."""
    placed: list[Placed] = []
    sizes: list[tuple[str, int]] = []
    for i in which:
        name, fqns = plan.files[i]
        data_path = os.path.join(directory, name)
        try:
            with open(data_path, "xb") as out, tempfile.TemporaryFile(dir=directory) as scratch:
                pos = 0
                for fqn in fqns:
                    value = plan.items[fqn][1]
                    length = _append_item(value, out, scratch, pos, data_path)
                    placed.append(Placed(fqn, name, pos, length))
                    pos += length
                    if progress is not None and type(value) is TensorMeta:
                        progress(value.nbytes)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            raise OutputError(f"{directory}: cannot write: {e.strerror or e}") from e
        sizes.append((name, pos))
    return placed, sizes


def write_dcp_metadata(plan: DcpPlan, placed: Iterable[Placed], directory: str) -> int:
    """Write `.metadata` (fsynced) for `plan`, whose every item was written where `placed` says;
    the same bytes whichever writer wrote which file. Returns its size."""
    where = {p.fqn: p for p in placed}
    # the plan's own name objects: the pickler memoizes by identity, so a name that came from
    # another rank (an equal but distinct string) would change the bytes
    names = {name: name for name, _ in plan.files}
    state_dict_metadata: dict[str, Any] = {}
    storage_data: dict[Any, Any] = {}
    for fqn, (_path, value) in plan.items.items():
        if type(value) is TensorMeta:
            shape = TorchSize(value.shape)
            chunk = _New(f"{_META}.ChunkStorageMetadata", {"offsets": _zeros(shape), "sizes": shape})
            state_dict_metadata[fqn] = _New(
                f"{_META}.TensorStorageMetadata",
                {"properties": _properties(value), "size": shape, "chunks": [chunk]},
            )
            index = _New(f"{_META}.MetadataIndex", {"fqn": fqn, "offset": _zeros(shape), "index": 0})
        else:
            state_dict_metadata[fqn] = _New(f"{_META}.BytesStorageMetadata", None)
            index = _New(f"{_META}.MetadataIndex", {"fqn": fqn, "offset": None, "index": None})
        p = where[fqn]
        storage_data[index] = _New(
            "torch.distributed.checkpoint.filesystem._StorageInfo",
            {"relative_path": names[p.file], "offset": p.offset, "length": p.length, "transform_descriptors": None},
        )
    metadata = _New(
        f"{_META}.Metadata",
        {
            "state_dict_metadata": state_dict_metadata,
            "planner_data": {fqn: path for fqn, (path, _) in plan.items.items()},
            "storage_data": storage_data,
            "storage_meta": None,
            "version": DCP_VERSION,
        },
    )
    pickler = _MetadataPickler({})
    pickler.dump(metadata)
    data = b"".join(pickler.parts)
    try:
        with open(os.path.join(directory, METADATA), "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"{directory}: cannot write: {e.strerror or e}") from e
    return len(data)


def _item_bytes(value: Any) -> int:
    return int(value.nbytes) if type(value) is TensorMeta else 0


def flatten(obj: Mapping[Any, Any]) -> dict[str, tuple[tuple[str | int, ...], Any]]:
    """fqn -> (key path, value), as DCP's `flatten_state_dict` makes them: dicts are walked
    (keys made strings), lists are walked when they hold a tensor or a container that does, any
    other value is one item."""
    out: dict[str, tuple[tuple[str | int, ...], Any]] = {}

    def terminal(value: Any) -> bool:
        if isinstance(value, Mapping):
            return False
        if not isinstance(value, list):
            return True
        for entry in value:
            if isinstance(entry, (Mapping, list)) and not terminal(entry):
                return False
            if type(entry) is TensorMeta:
                return False
        return True

    def walk(path: tuple[str | int, ...], value: Any) -> None:
        if isinstance(value, Mapping):
            for key, child in value.items():
                walk((*path, str(key)), child)
        elif terminal(value):
            if type(value) is not TensorMeta and next(iter_tensors(value), None) is not None:
                shown = ".".join(map(str, path))
                raise EngineUnsupported(f"{shown!r}: a {type(value).__name__} holding tensors cannot be saved as DCP")
            fqn = ".".join(map(str, path))
            if fqn in out:
                raise EngineUnsupported(f"two values flatten to the DCP name {fqn!r}")
            out[fqn] = (path, value)
        else:
            for i, child in enumerate(value):
                walk((*path, i), child)

    for key, value in obj.items():
        walk((str(key),), value)
    return out


def _append_item(value: Any, out: Any, scratch: Any, pos: int, name: str) -> int:
    """Write `value` as a torch.save zip at `pos` of `out`; return its length. The copy engine
    writes whole files from offset 0: the zip is made in `scratch`, then copied in the kernel."""
    scratch.seek(0)
    write_torch_zip(value, scratch, archive_name="archive", name=name)
    length = int(scratch.tell())
    scratch.flush()
    src, dst = scratch.fileno(), out.fileno()
    done = 0
    while done < length:
        n = min(_COPY_CHUNK, length - done)
        try:
            copied = os.copy_file_range(src, dst, n, done, pos + done)
        except (AttributeError, OSError):
            copied = os.pwrite(dst, os.pread(src, n, done), pos + done)
        if copied <= 0:
            raise OSError(f"{name}: no progress copying an item")
        done += copied
    return length


def _zeros(shape: TorchSize) -> TorchSize:
    return TorchSize((0,) * len(shape))


class _New:
    """An instance of class `cls` for `.metadata`: NEWOBJ, then BUILD with `state` (unless None).
    Hashed by identity (a MetadataIndex is a dict key)."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: str, state: Any) -> None:
        self.cls = cls
        self.state = state


class _Call(NamedTuple):
    """`func(*args)` for `.metadata`: REDUCE."""

    func: str
    args: tuple[Any, ...]


def _properties(t: TensorMeta) -> _New:
    """TensorProperties; its `__setstate__` takes (dtype, layout, requires_grad, memory format, pin_memory)."""
    return _New(
        f"{_META}.TensorProperties",
        (
            TorchDtype(t.dtype),
            _Call("torch.serialization._get_layout", ("torch.strided",)),
            False,
            _Call(f"{_META}._MEM_FORMAT_ENCODING", (0,)),  # TORCH_CONTIGUOUS_FORMAT
            False,
        ),
    )


_NEWOBJ = b"\x81"


class _MetadataPickler(_Pickler):
    """The engine's protocol-2 pickler, plus DCP's classes (`_New`, `_Call`)."""

    def save(self, obj: Any) -> None:
        t = type(obj)
        if t is _New:
            module, _, name = obj.cls.rpartition(".")
            self.save_global(module, name)
            self.write(b")")  # EMPTY_TUPLE
            self.write(_NEWOBJ)
            self.put()
            if obj.state is not None:
                self.save(obj.state)
                self.write(b"b")  # BUILD
        elif t is _Call:
            module, _, name = obj.func.rpartition(".")
            self.save_global(module, name)
            self.save_fresh_tuple(obj.args)
            self.write(b"R")  # REDUCE
            self.put()
        else:
            super().save(obj)
