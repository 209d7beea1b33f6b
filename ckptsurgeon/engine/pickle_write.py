"""Pickle an engine object graph into the `data.pkl` that `torch.save` would write for it.

The graph holds :class:`~ckptsurgeon.engine.meta.TensorMeta` leaves instead of tensors. This module
emits pickle protocol 2 opcode by opcode, following CPython's C pickler (memo, batching of 1000,
tuple opcodes) and torch's reductions (`_rebuild_tensor_v2` / `_v3`, `_rebuild_parameter`,
persistent ids `('storage', torch.<X>Storage, key, location, numel)`), so that for the same object
graph the bytes equal those of `torch.save`. It never imports torch.

Opaque entries (:class:`~ckptsurgeon.engine.pickle_globals.OpaqueObject`, `PickledGlobal`) are
pickled again as the file had them: the global, the arguments, REDUCE or NEWOBJ, then the items
and BUILD states recorded, so that `pickle.load` (torch.load with weights_only=False) builds the
same object from the output as from the input. Nothing in them is imported or called here.

It also plans storages (:func:`plan_storages`): which bytes of which source storage the graph
needs. A storage only partly used by its tensors is compacted to the union of their spans.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptsurgeon.engine.meta import (
    DTYPE_ITEMSIZE,
    DTYPE_STORAGE,
    StorageId,
    StorageMeta,
    TensorMeta,
    TorchDevice,
    TorchDtype,
    TorchSize,
)
from ckptsurgeon.engine.pickle_globals import OpaqueObject, PickledGlobal
from ckptsurgeon.errors import EngineUnsupported

# opcodes of pickle protocol 2 (see Lib/pickletools.py)
_PROTO2 = b"\x80\x02"
_STOP = b"."
_MARK = b"("
_NONE = b"N"
_NEWOBJ = b"\x81"
_NEWTRUE = b"\x88"
_NEWFALSE = b"\x89"
_BININT = b"J"
_BININT1 = b"K"
_BININT2 = b"M"
_LONG1 = b"\x8a"
_LONG4 = b"\x8b"
_BINFLOAT = b"G"
_BINUNICODE = b"X"
_EMPTY_TUPLE = b")"
_TUPLE = b"t"
_TUPLE_N = (b"", b"\x85", b"\x86", b"\x87")  # TUPLE1, TUPLE2, TUPLE3
_EMPTY_LIST = b"]"
_APPEND = b"a"
_APPENDS = b"e"
_EMPTY_DICT = b"}"
_SETITEM = b"s"
_SETITEMS = b"u"
_GLOBAL = b"c"
_REDUCE = b"R"
_BUILD = b"b"
_BINPERSID = b"Q"
_BINPUT = b"q"
_LONG_BINPUT = b"r"
_BINGET = b"h"
_LONG_BINGET = b"j"

_BATCHSIZE = 1000  # CPython's pickler batches APPENDS / SETITEMS by this many items
_SMALL_BINPUT = [_BINPUT + bytes((i,)) for i in range(256)]
_SMALL_BINGET = [_BINGET + bytes((i,)) for i in range(256)]
_SMALL_BININT1 = [_BININT1 + bytes((i,)) for i in range(256)]

# one memo key per torch-side object that `torch.save` pickles by identity
_LITERAL_STORAGE = ("literal", "storage")
_LITERAL_LATIN1 = ("literal", "latin1")

V2_DTYPES = frozenset(DTYPE_STORAGE)  # pickled as a typed storage with _rebuild_tensor_v2
V3_DTYPES = frozenset(DTYPE_ITEMSIZE) - V2_DTYPES  # untyped storage + dtype, _rebuild_tensor_v3


@dataclass(frozen=True, slots=True)
class PlannedStorage:
    """One output storage: the bytes `[start, start + nbytes)` of `source`'s storage.

    `dtype` is the element type of every tensor that uses it; `start` is a multiple of its size.
    """

    source: StorageMeta
    dtype: str
    start: int
    nbytes: int

    @property
    def is_whole(self) -> bool:
        """True when the output storage is the source storage unchanged."""
        return self.start == 0 and self.nbytes == self.source.nbytes

    @property
    def data_offset(self) -> int:
        """Absolute offset of the first byte in the source file."""
        return self.source.data_offset + self.start

    @property
    def offset_shift(self) -> int:
        """Elements to subtract from each tensor's storage_offset."""
        return self.start // DTYPE_ITEMSIZE[self.dtype]


_SCALARS = frozenset({type(None), bool, int, float, str, bytes, complex})


def _encode_long(x: int) -> bytes:
    """pickle.encode_long (LONG1/LONG4 payload): little-endian two's complement, shortest form."""
    if x == 0:
        return b""
    nbytes = (x.bit_length() >> 3) + 1
    result = x.to_bytes(nbytes, byteorder="little", signed=True)
    if x < 0 and nbytes > 1 and result[-1] == 0xFF and (result[-2] & 0x80) != 0:
        result = result[:-1]
    return result


def iter_tensors(obj: Any) -> Iterator[TensorMeta]:
    """Yield each TensorMeta of an object graph once, in first-reached (pickling) order."""
    seen: set[int] = set()
    stack: list[Any] = [obj]
    scalars = _SCALARS
    while stack:
        node = stack.pop()
        if type(node) in scalars or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node) is TensorMeta:
            yield node
            continue
        children: list[Any]
        if isinstance(node, dict):
            children = [x for kv in node.items() for x in kv if type(x) not in scalars]
            if isinstance(node, collections.OrderedDict) and vars(node):
                children.append(vars(node))
        elif isinstance(node, (list, tuple, set, frozenset)):
            children = [x for x in node if type(x) not in scalars]
        else:
            continue
        children.reverse()
        stack.extend(children)


def plan_storages(obj: Any) -> dict[StorageId, PlannedStorage]:
    """Group the graph's tensors by source storage and plan the bytes each output storage holds.

    A storage is cut down to the union of its tensors' byte spans (a view of one row brings one
    row). Raises EngineUnsupported for tensors the writer cannot represent: an unknown dtype,
    negative strides or offsets, a span outside its storage, two dtypes on one storage, or two
    different StorageMeta under one identity.
    """
    plan: dict[StorageId, PlannedStorage] = {}
    extents: dict[tuple[tuple[int, ...], tuple[int, ...]], int | None] = {}  # checked layouts
    for t in iter_tensors(obj):
        storage = t.storage
        layout = (t.shape, t.stride)
        if layout not in extents:
            extents[layout] = _checked_extent(t)
        extent = extents[layout]  # elements after the first, None when empty
        itemsize = DTYPE_ITEMSIZE.get(t.dtype)
        offset = t.storage_offset
        if itemsize is None:
            raise EngineUnsupported(f"{_where(t)}: dtype {t.dtype!r} is not supported by the engine")
        if type(offset) is not int or offset < 0:
            raise EngineUnsupported(f"{_where(t)}: invalid storage offset {offset}")
        start = offset * itemsize
        stop = start if extent is None else (offset + extent + 1) * itemsize
        ident = storage.identity
        planned = plan.get(ident)
        if planned is None:
            plan[ident] = PlannedStorage(storage, t.dtype, start, stop - start)
            continue
        if planned.source is not storage and planned.source != storage:
            raise EngineUnsupported(f"{storage.source}: storage {storage.key!r} is described twice, differently")
        if planned.dtype != t.dtype:
            dtypes = ", ".join(sorted({planned.dtype, t.dtype}))
            raise EngineUnsupported(f"{storage.source}: storage {storage.key!r} is viewed as several dtypes: {dtypes}")
        lo = min(planned.start, start)
        hi = max(planned.start + planned.nbytes, stop)
        plan[ident] = PlannedStorage(storage, t.dtype, lo, hi - lo)
    for planned in plan.values():
        end = planned.start + planned.nbytes
        if end > planned.source.nbytes:
            raise EngineUnsupported(
                f"{planned.source.source}: a tensor reaches byte {end} of storage "
                f"{planned.source.key!r} of {planned.source.nbytes} bytes"
            )
    return plan


def _checked_extent(t: TensorMeta) -> int | None:
    """Validate a tensor's shape and stride; return its last element's distance from its first
    (None for an empty tensor)."""
    _check_layout(t)
    if 0 in t.shape:
        return None
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride))


def _where(t: TensorMeta) -> str:
    return f"{t.storage.source}: storage {t.storage.key!r}"


def _check_layout(t: TensorMeta) -> None:
    where = _where(t)
    if type(t.shape) is not tuple or type(t.stride) is not tuple or len(t.shape) != len(t.stride):
        raise EngineUnsupported(f"{where}: shape {t.shape} and stride {t.stride} do not match")
    if any(type(n) is not int or n < 0 for n in t.shape):
        raise EngineUnsupported(f"{where}: invalid shape {t.shape}")
    if any(type(s) is not int or s < 0 for s in t.stride):
        raise EngineUnsupported(f"{where}: negative or invalid stride {t.stride}")


@dataclass(frozen=True, slots=True)
class PickledGraph:
    """`data.pkl` bytes and the storages it references, in key order ("0", "1", ...)."""

    data: bytes
    storages: list[PlannedStorage]


def pickle_graph(obj: Any) -> PickledGraph:
    """Pickle an object graph as `torch.save` would, with TensorMeta leaves as tensors.

    Storages are planned with :func:`plan_storages` (views compacted, offsets rebased) and keyed
    "0", "1", ... in the order they are first referenced. Raises EngineUnsupported for values it
    cannot write (unknown types, recursive tuples, OrderedDict subclasses, ...).
    """
    from .limits import recursion_room
    from .pickle_checks import MAX_DEPTH

    pickler = _Pickler(plan_storages(obj))
    with recursion_room(MAX_DEPTH):  # the pickler recurses, 2-3 frames a level
        pickler.dump(obj)
    return PickledGraph(b"".join(pickler.parts), pickler.order)


class _Pickler:
    """Protocol-2 emitter with CPython's memo rules: objects are memoized by identity."""

    def __init__(self, plan: dict[StorageId, PlannedStorage]):
        self.plan = plan
        self.parts: list[bytes] = []
        self.memo: dict[Any, int] = {}
        self.memo_size = 0
        self.keep: list[Any] = []  # keeps memoized graph objects alive so ids stay unique
        self.keys: dict[StorageId, str] = {}
        self.order: list[PlannedStorage] = []
        self.tuples_in_progress: set[int] = set()
        self.write = self.parts.append

    def dump(self, obj: Any) -> None:
        self.write(_PROTO2)
        self.save(obj)
        self.write(_STOP)

    # -- memo ---------------------------------------------------------------------------------

    def put(self, key: Any = None) -> None:
        """Memoize the object just built; key None for a fresh object never referenced again."""
        idx = self.memo_size
        self.memo_size += 1
        if key is not None:
            self.memo[key] = idx
        self.write(_SMALL_BINPUT[idx] if idx < 256 else _LONG_BINPUT + struct.pack("<I", idx))

    def put_obj(self, obj: Any) -> None:
        self.keep.append(obj)
        self.put(id(obj))

    def get(self, key: Any) -> bool:
        idx = self.memo.get(key)
        if idx is None:
            return False
        self.write(_SMALL_BINGET[idx] if idx < 256 else _LONG_BINGET + struct.pack("<I", idx))
        return True

    # -- values -------------------------------------------------------------------------------

    def save(self, obj: Any) -> None:
        t = type(obj)
        if obj is None:
            self.write(_NONE)
        elif t is bool:
            self.write(_NEWTRUE if obj else _NEWFALSE)
        elif t is int:
            self.save_int(obj)
        elif t is float:
            self.write(_BINFLOAT + struct.pack(">d", obj))
        elif self.get(id(obj)):
            pass
        elif t is str:
            self.save_str(obj)
            self.put_obj(obj)
        elif t is tuple:
            self.save_tuple(obj)
        elif t is list:
            self.write(_EMPTY_LIST)
            self.put_obj(obj)
            self.batch_list(obj)
        elif t is dict:
            self.write(_EMPTY_DICT)
            self.put_obj(obj)
            self.batch_dict_exact(obj)
        elif t is collections.OrderedDict:
            self.save_ordered_dict(obj)
        elif t is TensorMeta:
            self.save_tensor(obj)
        elif t is TorchDtype:
            self.save_dtype(obj.name)
        elif t is TorchSize:
            self.save_global("torch", "Size")
            self.save_fresh_tuple((tuple(obj),))
            self.write(_REDUCE)
            self.put_obj(obj)
        elif t is TorchDevice:
            self.save_device(obj)
        elif t is bytes:
            self.save_bytes(obj)
            self.put_obj(obj)
        elif t is bytearray:
            self.save_global("__builtin__", "bytearray")
            if obj:
                self.save(bytes(obj))  # 1-byte bytes are shared objects in CPython: memo by id
                self.write(_TUPLE_N[1])
                self.put()
            else:
                self.write(_EMPTY_TUPLE)
            self.write(_REDUCE)
            self.put_obj(obj)
        elif t is set:
            self.save_global("__builtin__", "set")
            self.write(_EMPTY_LIST)
            self.put()
            self.batch_list(list(obj))
            self.write(_TUPLE_N[1])
            self.put()
            self.write(_REDUCE)
            self.put_obj(obj)
        elif t is complex:
            self.save_global("__builtin__", "complex")
            self.save_fresh_tuple((obj.real, obj.imag))
            self.write(_REDUCE)
            self.put_obj(obj)
        elif t is OpaqueObject:
            self.save_opaque(obj)
        elif t is PickledGlobal:
            self.save_global(obj.module, obj.name)
        else:
            raise EngineUnsupported(f"cannot write a value of type {t.__module__}.{t.__qualname__}")

    def save_opaque(self, obj: OpaqueObject) -> None:
        """An opaque entry as CPython's save_reduce writes an object: the call, its memo entry,
        the list items (APPENDS), the dict items (SETITEMS), then each BUILD state."""
        self.save(obj.callable)
        self.save(obj.args)
        self.write(_NEWOBJ if obj.newobj else _REDUCE)
        self.put_obj(obj)
        if obj.listitems:
            self.batch_list(obj.listitems)
        if obj.dictitems:
            self.batch_dict_iter(obj.dictitems)
        for state in obj.states:
            self.save(state)
            self.write(_BUILD)

    def save_int(self, x: int) -> None:
        if 0 <= x <= 0xFF:
            self.write(_SMALL_BININT1[x])
        elif 0 <= x <= 0xFFFF:
            self.write(_BININT2 + struct.pack("<H", x))
        elif -0x80000000 <= x <= 0x7FFFFFFF:
            self.write(_BININT + struct.pack("<i", x))
        else:
            enc = _encode_long(x)
            if len(enc) < 256:
                self.write(_LONG1 + bytes((len(enc),)) + enc)
            else:
                self.write(_LONG4 + struct.pack("<i", len(enc)) + enc)

    def save_str(self, s: str) -> None:
        enc = s.encode("utf-8", "surrogatepass")
        self.write(_BINUNICODE + struct.pack("<I", len(enc)) + enc)

    def save_literal(self, s: str) -> None:
        """A string torch pickles as one shared object (a code constant)."""
        key = ("literal", s)
        if not self.get(key):
            self.save_str(s)
            self.put(key)

    def save_global(self, module: str, name: str) -> None:
        key = ("global", module, name)
        if not self.get(key):
            self.write(_GLOBAL + f"{module}\n{name}\n".encode())
            self.put(key)

    def save_dtype(self, name: str) -> None:
        if name not in DTYPE_ITEMSIZE:
            raise EngineUnsupported(f"cannot write torch dtype {name!r}")
        self.save_global("torch", name)

    def save_device(self, dev: TorchDevice) -> None:
        kind, sep, index = dev.spec.partition(":")
        args: tuple[Any, ...] = (kind,)
        if sep:
            if not index.isdigit():
                raise EngineUnsupported(f"cannot write torch device {dev.spec!r}")
            args = (kind, int(index))
        self.save_global("torch", "device")
        for a in args:
            if type(a) is str:
                self.save_str(a)
                self.put()
            else:
                self.save(a)
        self.write(_TUPLE_N[len(args)])
        self.put()
        self.write(_REDUCE)
        self.put_obj(dev)

    def save_bytes(self, b: bytes) -> None:
        """bytes in protocol 2: `_codecs.encode(latin1 text, 'latin1')`; caller memoizes."""
        if not b:
            self.save_global("__builtin__", "bytes")
            self.write(_EMPTY_TUPLE)
        else:
            self.save_global("_codecs", "encode")
            self.save(b.decode("latin1"))  # 1-char strings are shared objects in CPython
            self.save_literal("latin1")
            self.write(_TUPLE_N[2])
            self.put()
        self.write(_REDUCE)

    def save_tuple(self, obj: tuple[Any, ...]) -> None:
        if not obj:
            self.write(_EMPTY_TUPLE)
            return
        if id(obj) in self.tuples_in_progress:
            raise EngineUnsupported("cannot write a tuple that contains itself")
        self.tuples_in_progress.add(id(obj))
        if len(obj) <= 3:
            for item in obj:
                self.save(item)
            self.write(_TUPLE_N[len(obj)])
        else:
            self.write(_MARK)
            for item in obj:
                self.save(item)
            self.write(_TUPLE)
        self.tuples_in_progress.discard(id(obj))
        self.put_obj(obj)

    def save_fresh_tuple(self, items: tuple[Any, ...]) -> None:
        """A tuple created during reduction (never shared): saved and memoized, not registered."""
        if not items:
            self.write(_EMPTY_TUPLE)
            return
        if len(items) <= 3:
            for item in items:
                self.save_fresh(item)
            self.write(_TUPLE_N[len(items)])
        else:
            self.write(_MARK)
            for item in items:
                self.save_fresh(item)
            self.write(_TUPLE)
        self.put()

    def save_fresh(self, item: Any) -> None:
        if type(item) is tuple:
            self.save_fresh_tuple(item)
        else:
            self.save(item)

    def batch_list(self, items: list[Any]) -> None:
        """CPython's batch_list_exact: APPEND for one item, else MARK..APPENDS per 1000."""
        n = len(items)
        if n == 0:
            return
        if n == 1:
            self.save(items[0])
            self.write(_APPEND)
            return
        total = 0
        while total < n:
            self.write(_MARK)
            for item in items[total : total + _BATCHSIZE]:
                self.save(item)
            total = min(n, total + _BATCHSIZE)
            self.write(_APPENDS)

    def batch_dict_exact(self, d: dict[Any, Any]) -> None:
        """CPython's batch_dict_exact (plain dict): SETITEM for one item, else MARK..SETITEMS
        per 1000, with a trailing empty batch when the size is a multiple of 1000."""
        n = len(d)
        if n == 0:
            return
        if n == 1:
            ((k, v),) = d.items()
            self.save(k)
            self.save(v)
            self.write(_SETITEM)
            return
        items = list(d.items())
        pos = 0
        while True:
            self.write(_MARK)
            batch = items[pos : pos + _BATCHSIZE]
            for k, v in batch:
                self.save(k)
                self.save(v)
            pos += len(batch)
            self.write(_SETITEMS)
            if len(batch) != _BATCHSIZE:
                break

    def batch_dict_iter(self, items: list[tuple[Any, Any]]) -> None:
        """CPython's batch_dict over an iterator (OrderedDict reduce): batches of 1000, a lone
        last item as SETITEM."""
        pos = 0
        n = len(items)
        while pos < n:
            batch = items[pos : pos + _BATCHSIZE]
            pos += len(batch)
            if len(batch) == 1:
                self.save(batch[0][0])
                self.save(batch[0][1])
                self.write(_SETITEM)
                break
            self.write(_MARK)
            for k, v in batch:
                self.save(k)
                self.save(v)
            self.write(_SETITEMS)

    def save_ordered_dict(self, od: collections.OrderedDict[Any, Any]) -> None:
        self.save_global("collections", "OrderedDict")
        self.write(_EMPTY_TUPLE)
        self.write(_REDUCE)
        self.put_obj(od)
        self.batch_dict_iter(list(od.items()))
        state = vars(od)
        if state:
            self.save(state)
            self.write(_BUILD)

    def save_empty_ordered_dict(self) -> None:
        """The fresh `OrderedDict()` of backward hooks that torch pickles with every tensor."""
        self.save_global("collections", "OrderedDict")
        self.write(_EMPTY_TUPLE)
        self.write(_REDUCE)
        self.put()

    # -- tensors ------------------------------------------------------------------------------

    def save_tensor(self, t: TensorMeta) -> None:
        if t.is_parameter:
            self.save_global("torch._utils", "_rebuild_parameter")
            self.save_tensor_body(t, requires_grad=False)
            self.put()
            self.write(_NEWTRUE if t.requires_grad else _NEWFALSE)
            self.save_empty_ordered_dict()
            self.write(_TUPLE_N[3])
            self.put()
            self.write(_REDUCE)
        else:
            self.save_tensor_body(t, requires_grad=t.requires_grad)
        self.put_obj(t)

    def save_tensor_body(self, t: TensorMeta, *, requires_grad: bool) -> None:
        """`_rebuild_tensor_v2/_v3(storage, offset, size, stride, requires_grad, hooks[, dtype])`,
        up to and including REDUCE."""
        planned = self.plan[t.storage.identity]
        v3 = t.dtype in V3_DTYPES
        self.save_global("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
        self.write(_MARK)
        self.save_persistent_id(planned, v3)
        self.save_int(t.storage_offset - planned.offset_shift)
        self.save_fresh_tuple(tuple(t.shape))
        self.save_fresh_tuple(tuple(t.stride))
        self.write(_NEWTRUE if requires_grad else _NEWFALSE)
        self.save_empty_ordered_dict()
        if v3:
            self.save_dtype(t.dtype)
        self.write(_TUPLE)
        self.put()
        self.write(_REDUCE)

    def save_persistent_id(self, planned: PlannedStorage, v3: bool) -> None:
        ident = planned.source.identity
        key = self.keys.get(ident)
        if key is None:
            key = self.keys[ident] = str(len(self.keys))
            self.order.append(planned)
        self.write(_MARK)
        self.save_literal("storage")
        if v3:
            self.save_global("torch.storage", "UntypedStorage")
            numel = planned.nbytes
        else:
            self.save_global("torch", DTYPE_STORAGE[planned.dtype])
            numel = planned.nbytes // DTYPE_ITEMSIZE[planned.dtype]
        if not self.get(("storage key", key)):
            self.save_str(key)
            self.put(("storage key", key))
        # Outputs are CPU checkpoints whatever device the source was saved from: the torch path
        # loads with map_location="cpu" too, and a CPU-only machine loads the result as it is.
        self.save_literal("cpu")
        self.save_int(numel)
        self.write(_TUPLE)
        self.put()
        self.write(_BINPERSID)
