"""The `.metadata` file of a torch.distributed.checkpoint (DCP) directory, without torch.

DCP writes `.metadata` as a plain protocol-4 pickle of its own dataclasses. It is read here by the
engine's restricted unpickler with an extension table (:data:`DCP_GLOBALS`): the DCP metadata
classes (and the older `torch.distributed._shard` paths of `TensorProperties`) are built as inert
:class:`Record` values, never imported; `torch.Size`, dtypes, `torch.serialization._get_layout`
and `pathlib` paths are data. Any other global is refused before a single opcode runs. The
records are then checked and turned into :class:`DcpMetadata`: plain tuples that say which chunk
of which tensor lies at which `[offset, offset + length)` of which `.distcp` file.

Facts (torch 2.13, `torch/distributed/checkpoint/metadata.py`, `filesystem.py`):
`state_dict_metadata[fqn]` is a `TensorStorageMetadata(properties, size, chunks)` or a
`BytesStorageMetadata()`; `storage_data[MetadataIndex(fqn, offset, index)]` is a
`_StorageInfo(relative_path, offset, length[, transform_descriptors])`, joined on the fqn and the
chunk's offsets (bytes items have offset None); `planner_data[fqn]` is the path of keys that
un-flattens the state_dict (`('optim', 'state', 'w', 'step')`).
"""

from __future__ import annotations

import posixpath
from typing import Any, NamedTuple

from ..errors import BadCheckpointError, EngineUnsupported, RestrictedPickleError, UnsafeCheckpointError
from .limits import MAX_DIM_SIZE, MAX_DIMS, brief
from .meta import DTYPE_ITEMSIZE, TorchDtype
from .pickle_checks import ExtensionClass, ExtensionValue, Malformed
from .pickle_globals import scan_globals
from .unpickle import PickleTruncated, unpickle

# Measured: a chunk costs ~130 bytes of pickle (its ChunkStorageMetadata, MetadataIndex and
# _StorageInfo), so 256 MiB holds ~2 million chunks: 2,000 tensors (a large model with its Adam
# states) sharded over 1,000 ranks. The records built from it take several times that in memory.
MAX_METADATA_BYTES = 256 << 20
MAX_LIST_INDEX = 1 << 20  # a planner_data path that indexes a list further is refused

_META = "torch.distributed.checkpoint.metadata."
_OLD_META = "torch.distributed._shard.sharded_tensor.metadata."
TENSOR_PROPERTIES_FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


class Record(ExtensionValue):
    """An instance of a DCP metadata class, as data: its class name and its fields."""

    __slots__ = ("cls", "fields")

    def __init__(self, cls: str):
        self.cls = cls
        self.fields: dict[str, Any] = {}

    @property
    def kind(self) -> str:
        return self.cls.rsplit(".", 1)[1]

    def build(self, state: Any) -> None:
        if type(state) is tuple and len(state) == 2 and type(state[1]) is dict and state[0] in (None, {}):
            state = state[1]  # (dict state, slots state) of a slotted dataclass
        if type(state) is dict and all(type(k) is str for k in state):
            self.fields.update(state)
        elif type(state) is tuple and self.kind == "TensorProperties" and len(state) == 5:
            self.fields.update(zip(TENSOR_PROPERTIES_FIELDS, state))  # its __setstate__ takes a tuple
        else:
            raise Malformed(f"{self.kind} restored from a {type(state).__name__}")

    def children(self) -> list[Any]:
        return list(self.fields.values())

    def __repr__(self) -> str:
        return f"{self.kind}({self.fields!r})"


class _RecordClass(ExtensionClass):
    """A DCP dataclass: NEWOBJ with no arguments makes an empty record; BUILD fills it."""

    __slots__ = ()

    def new(self, args: tuple[Any, ...]) -> Any:
        if args:
            raise Malformed(f"{self.name} created with arguments {brief(args)}")
        return Record(self.name)


class _MemoryFormat(ExtensionClass):
    """`_MEM_FORMAT_ENCODING(n)`: an enum member, kept as its number."""

    __slots__ = ()

    def call(self, args: tuple[Any, ...]) -> Any:
        if len(args) != 1 or type(args[0]) is not int or not 0 <= args[0] < 16:
            raise Malformed(f"{self.name} called with {brief(args)}")
        return args[0]


class _Layout(ExtensionClass):
    """`torch.serialization._get_layout("torch.strided")`: kept as the layout's name."""

    __slots__ = ()

    def call(self, args: tuple[Any, ...]) -> Any:
        if len(args) != 1 or type(args[0]) is not str or not args[0].startswith("torch."):
            raise Malformed(f"{self.name} called with {brief(args)}")
        return args[0]


class _Path(ExtensionClass):
    """`pathlib.PosixPath(*parts)` (`storage_meta.checkpoint_id`): kept as a string."""

    __slots__ = ()

    def call(self, args: tuple[Any, ...]) -> Any:
        if not all(type(a) is str for a in args):
            raise Malformed(f"{self.name} called with {brief(args)}")
        return posixpath.join(*args) if args else "."


_RECORDS = [
    _META + n
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "MetadataIndex",
        "TensorProperties",
        "StorageMeta",
    )
] + ["torch.distributed.checkpoint.filesystem._StorageInfo", _OLD_META + "TensorProperties"]

DCP_GLOBALS: dict[str, ExtensionClass] = {name: _RecordClass(name) for name in _RECORDS}
DCP_GLOBALS.update(
    {
        _META + "_MEM_FORMAT_ENCODING": _MemoryFormat(_META + "_MEM_FORMAT_ENCODING"),
        _OLD_META + "MEM_FORMAT_ENCODING": _MemoryFormat(_OLD_META + "MEM_FORMAT_ENCODING"),
        "torch.serialization._get_layout": _Layout("torch.serialization._get_layout"),
    }
)
for _name in ("pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib._local.PosixPath", "pathlib._local.PurePosixPath"):
    DCP_GLOBALS[_name] = _Path(_name)
del _name


def _allowed(name: str) -> bool:
    """A global `.metadata` may name: the table above, `torch.Size` and the dtypes."""
    if name in DCP_GLOBALS or name == "torch.Size":
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and attr in DTYPE_ITEMSIZE


# -- what the records say ------------------------------------------------------------------------


class Chunk(NamedTuple):
    """One chunk of a tensor and where its bytes lie."""

    offsets: tuple[int, ...]  # of its first element in the whole tensor
    sizes: tuple[int, ...]
    file: str  # relative path of its `.distcp` file
    offset: int  # of the item in that file
    length: int


class TensorEntry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


class BytesEntry(NamedTuple):
    """A non-tensor value, pickled by torch.save at `[offset, offset + length)` of `file`."""

    file: str
    offset: int
    length: int


class DcpMetadata(NamedTuple):
    """`.metadata`, checked: each fqn's entry and the key path that places it in the state_dict,
    in the order of the state_dict that was saved."""

    entries: dict[str, TensorEntry | BytesEntry]
    paths: dict[str, tuple[str | int, ...]]
    version: str | None


def parse_metadata(data: bytes, path: str) -> DcpMetadata:
    """Unpickle and check the bytes of a `.metadata` file (`path` names it in messages).

    Raises UnsafeCheckpointError (a global outside the DCP classes) or BadCheckpointError
    (corrupt, truncated or inconsistent metadata).
    """
    refused = {name for name in scan_globals(data) if not _allowed(name)}
    if refused:
        raise UnsafeCheckpointError(path, refused)
    try:
        root, _ = unpickle(data, path=path, where=".metadata", extension=DCP_GLOBALS, max_containers=len(data) + 1000)
    except PickleTruncated:
        raise BadCheckpointError(f"{path}: truncated: the pickle has no STOP opcode") from None
    except EngineUnsupported as e:  # no torch fallback reads `.metadata` more safely
        raise RestrictedPickleError(str(e)) from None
    try:
        return _check(root)
    except Malformed as e:
        raise BadCheckpointError(f"{path}: invalid DCP metadata: {e}") from None


def _record(value: Any, kind: str, where: str) -> dict[str, Any]:
    if type(value) is not Record or value.kind != kind:
        raise Malformed(f"{where} is {_what(value)}, not a {kind}")
    return value.fields


def _what(value: Any) -> str:
    return f"a {value.kind}" if type(value) is Record else f"a {type(value).__name__}"


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS:
        raise Malformed(f"{where} is {brief(value)}, not a tuple of at most {MAX_DIMS} sizes")
    if not all(type(v) is int and 0 <= v < MAX_DIM_SIZE for v in value):
        raise Malformed(f"{where} is {brief(value)}")
    return tuple(value)


def _check(root: Any) -> DcpMetadata:
    meta = _record(root, "Metadata", "the pickled object")
    sd_meta = meta.get("state_dict_metadata")
    storage = meta.get("storage_data")
    planner = meta.get("planner_data")
    version = meta.get("version")
    if type(sd_meta) is not dict or not all(type(k) is str for k in sd_meta):
        raise Malformed("state_dict_metadata is not a dict of names")
    if type(storage) is not dict:
        raise Malformed(f"storage_data is {_what(storage)}, not a dict")
    if version is not None and type(version) is not str:
        raise Malformed(f"version is {_what(version)}")
    items: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for index, info in storage.items():
        idx = _record(index, "MetadataIndex", "a storage_data key")
        fqn, offset = idx.get("fqn"), idx.get("offset")
        if type(fqn) is not str:
            raise Malformed(f"a storage_data key names {brief(fqn)}")
        where = f"the item of {fqn!r}"
        key = (fqn, None if offset is None else _ints(offset, f"{where}: offset"))
        fields = _record(info, "_StorageInfo", where)
        rel, start, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
        if type(rel) is not str or type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise Malformed(f"{where} lies at {brief(rel)} [{brief(start)}, +{brief(length)})")
        if fields.get("transform_descriptors"):
            raise Malformed(f"{where} is stored through transforms {brief(fields['transform_descriptors'])}")
        if key in items:
            raise Malformed(f"{where} at offsets {key[1]} is stored twice")
        items[key] = (check_relative_path(rel, where), start, length)
    entries: dict[str, TensorEntry | BytesEntry] = {}
    for fqn, value in sd_meta.items():
        if type(value) is Record and value.kind == "BytesStorageMetadata":
            found = items.pop((fqn, None), None)
            if found is None:
                raise Malformed(f"the non-tensor item {fqn!r} has no storage_data entry")
            entries[fqn] = BytesEntry(*found)
        else:
            entries[fqn] = _tensor_entry(fqn, _record(value, "TensorStorageMetadata", f"entry {fqn!r}"), items)
    if items:
        (fqn, offsets), _ = next(iter(items.items()))
        raise Malformed(f"storage_data holds an item of {fqn!r} at offsets {offsets} that no entry describes")
    paths = _paths(planner, entries)
    return DcpMetadata({fqn: entries[fqn] for fqn in paths}, paths, version)


def _tensor_entry(
    fqn: str, fields: dict[str, Any], items: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]
) -> TensorEntry:
    where = f"tensor {fqn!r}"
    props = _record(fields.get("properties"), "TensorProperties", f"{where}: properties")
    dtype = props.get("dtype")
    if type(dtype) is not TorchDtype or dtype.name not in DTYPE_ITEMSIZE:
        raise Malformed(f"{where} has dtype {brief(dtype)}")
    layout = props.get("layout", "torch.strided")
    if layout != "torch.strided":
        raise Malformed(f"{where} has layout {brief(layout)}")
    shape = _ints(fields.get("size"), f"{where}: size")
    raw_chunks = fields.get("chunks")
    if type(raw_chunks) is not list or not raw_chunks:
        raise Malformed(f"{where} has no chunks")
    chunks = []
    for raw in raw_chunks:
        c = _record(raw, "ChunkStorageMetadata", f"a chunk of {fqn!r}")
        offsets = _ints(c.get("offsets"), f"a chunk of {fqn!r}: offsets")
        sizes = _ints(c.get("sizes"), f"a chunk of {fqn!r}: sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise Malformed(
                f"the chunk of {where} at {list(offsets)} has {len(sizes)} dimensions, the tensor {len(shape)}"
            )
        if any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise Malformed(
                f"the chunk of {where} at {list(offsets)} of sizes {list(sizes)} reaches past {list(shape)}"
            )
        found = items.pop((fqn, offsets), None)
        if found is None:
            raise Malformed(f"the chunk of {where} at {list(offsets)} has no storage_data entry")
        chunks.append(Chunk(offsets, sizes, *found))
    _check_cover(where, shape, chunks)
    return TensorEntry(dtype.name, shape, tuple(chunks))


MAX_IRREGULAR_CHUNKS = 4096  # chunks of one tensor checked pair by pair when they form no grid


def _check_cover(where: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks (each inside the tensor) must not overlap and must cover every element."""
    live = [c for c in chunks if _numel(c.sizes)]
    covered = sum(_numel(c.sizes) for c in live)
    if covered < _numel(shape):
        raise Malformed(f"the chunks of {where} cover {covered} of its {_numel(shape)} elements")
    if _is_grid(shape, live):
        return
    if len(live) > MAX_IRREGULAR_CHUNKS:
        raise Malformed(f"{where} has {len(live)} chunks that form no grid (more than {MAX_IRREGULAR_CHUNKS})")
    boxes = sorted(live)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if shape and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break  # sorted by the first offset: no later chunk reaches back into `a`
            if all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise Malformed(f"the chunks of {where} at {list(a.offsets)} and {list(b.offsets)} overlap")
    if covered != _numel(shape):  # no overlap: more elements than the tensor cannot happen
        raise Malformed(f"the chunks of {where} cover {covered} of its {_numel(shape)} elements")


def _numel(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _is_grid(shape: tuple[int, ...], chunks: list[Chunk]) -> bool:
    """True when the chunks are exactly the cells of a grid over the tensor (the layouts DCP
    writes: every rank's shard a block of per-dimension splits): an exact cover, checked in
    O(n log n) where a pairwise overlap check would take O(n^2)."""
    index: list[dict[int, int]] = []
    cells = 1
    for d, n in enumerate(shape):
        points = sorted({0, n} | {c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
        index.append({p: i for i, p in enumerate(points)})
        cells *= len(points) - 1
    seen = set()
    for c in chunks:
        cell = []
        for d, pos in enumerate(index):
            i = pos[c.offsets[d]]
            if pos[c.offsets[d] + c.sizes[d]] != i + 1:
                return False
            cell.append(i)
        seen.add(tuple(cell))
    return len(seen) == len(chunks) == cells


def _paths(planner: Any, entries: dict[str, Any]) -> dict[str, tuple[str | int, ...]]:
    """fqn -> key path, from planner_data (flat `(fqn,)` where there is none), in its order."""
    if planner is None:
        planner = {}
    if type(planner) is not dict:
        raise Malformed(f"planner_data is {_what(planner)}, not a dict")
    paths: dict[str, tuple[str | int, ...]] = {}
    for fqn, path in planner.items():
        if fqn not in entries:
            continue  # DCP records paths of values it did not save (e.g. empty containers)
        if type(path) is not tuple or not path or not all(type(p) in (str, int) for p in path):
            raise Malformed(f"planner_data gives {fqn!r} the path {brief(path)}")
        if type(path[0]) is not str or any(type(p) is int and not 0 <= p < MAX_LIST_INDEX for p in path):
            raise Malformed(f"planner_data gives {fqn!r} the path {brief(path)}")
        paths[fqn] = path
    for fqn in entries:
        paths.setdefault(fqn, (fqn,))
    return paths


def check_relative_path(rel: str, where: str) -> str:
    """A `.distcp` file name of the directory: relative, normalized, never leaving it."""
    if (
        not rel
        or "\x00" in rel
        or "\\" in rel
        or rel.startswith("/")
        or (len(rel) > 1 and rel[1] == ":")
        or any(part in ("", ".", "..") for part in rel.split("/"))
    ):
        raise Malformed(f"{where} lies in {rel!r}, which is not a file inside the checkpoint directory")
    return rel


def build_tree(meta: DcpMetadata, values: dict[str, Any]) -> dict[str, Any]:
    """The nested state_dict from each fqn's value and planner_data's paths, as DCP's
    `unflatten_state_dict` builds it (a str key makes a dict, an int key a list)."""
    root: dict[str, Any] = {}
    room = 16 * len(meta.paths) + 1024  # list slots planner_data may make (holes are None)
    for fqn, path in meta.paths.items():
        node: Any = root
        for i, key in enumerate(path):
            last = i == len(path) - 1
            fresh: Any = values[fqn] if last else {} if type(path[i + 1]) is str else []
            if type(node) is dict:
                if last:
                    if key in node:
                        raise BadCheckpointError(f"planner_data places two values at {'.'.join(map(str, path))}")
                    node[key] = fresh
                else:
                    node = node.setdefault(key, fresh)
            elif type(node) is list and type(key) is int:
                room -= max(0, key + 1 - len(node))
                if room < 0:
                    raise BadCheckpointError(f"planner_data path {brief(path)} of {fqn!r} makes lists of mostly holes")
                node.extend([None] * (key + 1 - len(node)))
                if last:
                    if node[key] is not None:
                        raise BadCheckpointError(f"planner_data places two values at {'.'.join(map(str, path))}")
                    node[key] = fresh
                else:
                    if node[key] is None:
                        node[key] = fresh
                    node = node[key]
            else:
                raise BadCheckpointError(
                    f"planner_data path {brief(path)} of {fqn!r} indexes a {type(node).__name__} with {brief(key)}"
                )
            if not last and type(node) not in (dict, list):
                raise BadCheckpointError(f"planner_data path {brief(path)} of {fqn!r} goes through a value")
    return root
