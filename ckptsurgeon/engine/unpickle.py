"""A restricted pickle VM that reads torch checkpoints into the torch-free data model.

It accepts exactly the opcodes `torch/_weights_only_unpickler.py` accepts and never imports or
calls anything named in the file. Globals resolve against three tables:

* the globals this engine models (OrderedDict, the tensor/parameter rebuild functions, storage
  classes, dtypes, `torch.Size`, `torch.device`, `_codecs.encode` for bytes, `builtins.set`);
* the rest of torch's weights_only allowlist (:data:`TORCH_WEIGHTS_ONLY_GLOBALS`) and the caller's
  `allow_globals`: valid, but not modelled, so reading ends in :class:`EngineUnsupported`;
* everything else: recorded, replaced by a placeholder, and reported together at the end as
  :class:`UnsafeCheckpointError`.

Storages come from the `persistent_load` callback the format reader supplies.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import BadCheckpointError, EngineUnsupported, RestrictedPickleError, UnsafeCheckpointError
from .limits import MAX_DIM_SIZE, MAX_DIMS, brief, numel_overflows
from .meta import (
    DTYPE_ITEMSIZE,
    FLOATING_DTYPES,
    STORAGE_DTYPE,
    StorageMeta,
    TensorMeta,
    TorchDevice,
    TorchDtype,
    TorchSize,
)

MAX_DEPTH = 1000  # deepest container nesting accepted in the object graph

# Modules torch never allows, even when a user allowlists a name from them.
BLOCKLISTED_MODULES = frozenset({"sys", "os", "posix", "nt"})

# From torch/_utils.py (itself from CPython's _compat_pickle): Python 2 names torch renames.
IMPORT_MAPPING = {
    "__builtin__": "builtins",
    "copy_reg": "copyreg",
    "Queue": "queue",
    "repr": "reprlib",
    "_abcoll": "collections.abc",
    "UserDict": "collections",
    "UserList": "collections",
    "UserString": "collections",
    "whichdb": "dbm",
    "StringIO": "io",
    "cStringIO": "io",
}
NAME_MAPPING = {
    ("__builtin__", "xrange"): ("builtins", "range"),
    ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"),
    ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"),
    ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"),
    ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"),
    ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"),
    ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
}

_TENSOR_TYPES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_DTYPE_GLOBALS = frozenset(
    [
        "bfloat16",
        "bits16",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bool",
        "complex128",
        "complex32",
        "complex64",
        "float16",
        "float32",
        "float4_e2m1fn_x2",
        "float64",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "int16",
        "int32",
        "int64",
        "int8",
        "qint32",
        "qint8",
        "quint2x4",
        "quint4x2",
        "quint8",
        "uint16",
        "uint32",
        "uint64",
        "uint8",
    ]
    + [f"int{i}" for i in range(1, 8)]
    + [f"uint{i}" for i in range(1, 8)]
)

# torch 2.13's `_weights_only_unpickler._get_allowed_globals()` keys (a test compares them).
TORCH_WEIGHTS_ONLY_GLOBALS = frozenset(
    [
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
        "torch.per_channel_affine",
        "torch.per_channel_affine_float_qparams",
        "torch.per_channel_symmetric",
        "torch.per_tensor_affine",
        "torch.per_tensor_symmetric",
    ]
    + [f"torch.{d}" for d in _DTYPE_GLOBALS]
    + [
        f"torch._utils.{f}"
        for f in (
            "_rebuild_device_tensor_from_cpu_tensor",
            "_rebuild_device_tensor_from_numpy",
            "_rebuild_meta_tensor_no_storage",
            "_rebuild_nested_tensor",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_wrapper_subclass",
        )
    ]
    + [f"torch.{n}Storage" for n in _TENSOR_TYPES + ("ComplexDouble", "ComplexFloat")]
    + [f"torch.{n}Storage" for n in ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")]
    + [f"torch.cuda.{n}Storage" for n in _TENSOR_TYPES + ("ComplexDouble", "ComplexFloat")]
    + [f"torch.{n}Tensor" for n in _TENSOR_TYPES]
    + [f"torch.cuda.{n}Tensor" for n in _TENSOR_TYPES]
    + [f"torch.sparse.{n}Tensor" for n in _TENSOR_TYPES if n != "Bool"]
    + [f"torch.cuda.sparse.{n}Tensor" for n in _TENSOR_TYPES if n != "Bool"]
)

# Allowed constructors that allocate memory sized by an int argument (`bytearray(10**12)`).
_ALLOCATING = frozenset(
    {"builtins.bytearray", "torch.Tensor", "torch.storage.TypedStorage", "torch.storage.UntypedStorage"}
    | {n for n in TORCH_WEIGHTS_ONLY_GLOBALS if n.endswith(("Tensor", "Storage"))}
)


class StorageClass:
    """A pickled storage class global (`torch.FloatStorage`, `torch.storage.UntypedStorage`, ...)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage class {self.name}>"


class Opaque:
    """Placeholder for a value the engine does not model (or refuses); `name` says what it was."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<opaque {self.name}>"


class _Function:
    """A modelled global callable; `kind` selects its handler."""

    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self) -> str:
        return f"<global {self.kind}>"


_ORDERED_DICT = _Function("collections.OrderedDict")
_SET = _Function("builtins.set")
_MODELLED: dict[str, Any] = {
    "collections.OrderedDict": _ORDERED_DICT,
    "builtins.set": _SET,
    "_codecs.encode": _Function("_codecs.encode"),
    "torch.Size": _Function("torch.Size"),
    "torch.device": _Function("torch.device"),
    "torch._utils._rebuild_tensor_v2": _Function("torch._utils._rebuild_tensor_v2"),
    "torch._utils._rebuild_tensor_v3": _Function("torch._utils._rebuild_tensor_v3"),
    "torch._utils._rebuild_parameter": _Function("torch._utils._rebuild_parameter"),
    "torch.storage.UntypedStorage": StorageClass("torch.storage.UntypedStorage", "uint8"),
}
for _name, _dtype in STORAGE_DTYPE.items():
    if _name != "UntypedStorage":
        _MODELLED[f"torch.{_name}"] = StorageClass(f"torch.{_name}", _dtype)
        _MODELLED[f"torch.cuda.{_name}"] = StorageClass(f"torch.cuda.{_name}", _dtype)
for _name in _DTYPE_GLOBALS:
    _MODELLED[f"torch.{_name}"] = TorchDtype(_name)
del _name, _dtype


class PickleTruncated(BadCheckpointError):
    """The pickle ended before its STOP opcode (the legacy reader may then read more).

    `refused` holds the refused globals seen before the end.
    """

    def __init__(self, message: str, refused: set[str] | None = None):
        super().__init__(message)
        self.refused = refused or set()


class Unsupported(Exception):
    """Raised by a handler or `persistent_load`: valid for torch, not modelled here."""


class Malformed(Exception):
    """Raised by a handler or `persistent_load`: corrupt or hostile (torch may load it anyway)."""


class _StorageMalformed(Malformed):
    """Malformed raised by `persistent_load`: the storages do not match the file's records.

    Unlike the rest (the pickle program itself), a full unpickle would not make it right.
    """


def _is_int(x: Any) -> bool:
    return type(x) is int


_U16 = struct.Struct("<H").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from
_F64 = struct.Struct(">d").unpack_from


def _opcode_refusal(op: int, offset: int) -> str:
    import pickletools

    for info in pickletools.opcodes:
        if info.code.encode("latin-1")[0] == op:
            return (
                f"unsupported pickle opcode 0x{op:02x} ({info.name}) at offset {offset}; "
                "torch's weights_only loader refuses it too; only --unsafe (a full unpickle, for "
                "trusted files) reads it"
            )
    return f"invalid pickle opcode 0x{op:02x} at offset {offset}: the pickle is corrupt"


def resolve_name(module: str, name: str) -> str:
    """The dotted name torch's weights_only unpickler looks up for a GLOBAL opcode."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


# MARK (every tuple, list, dict or batch built from a mark), EMPTY_DICT, EMPTY_LIST, EMPTY_SET,
# TUPLE1-3: the opcodes that make a container
_MAKES_CONTAINER = frozenset({0x28, 0x7D, 0x5D, 0x8F, 0x85, 0x86, 0x87})


class _Machine:
    """One run of the VM over one pickle; see :func:`unpickle`."""

    def __init__(
        self,
        persistent_load: Callable[[tuple[Any, ...]], Any] | None,
        allow_globals: frozenset[str],
        max_containers: int = 1_000_000,
    ):
        self.persistent_load = persistent_load
        self.allow_globals = allow_globals
        self.max_containers = max_containers
        self.unsafe: set[str] = set()
        self.unsupported: list[str] = []
        self._globals: dict[bytes, Any] = {}
        self._key_heights: dict[int, tuple[tuple[Any, ...], int]] = {}

    # -- globals -------------------------------------------------------------------------
    def find_global(self, line_module: bytes, line_name: bytes) -> Any:
        key = line_module + b"\n" + line_name
        hit = self._globals.get(key)
        if hit is not None:
            return hit
        try:
            full = resolve_name(line_module.decode("utf-8"), line_name.decode("utf-8"))
        except UnicodeDecodeError:
            raise Malformed("a GLOBAL name is not valid UTF-8") from None
        module = full.rsplit(".", 1)[0]
        if module in BLOCKLISTED_MODULES:
            self.unsafe.add(full)
            value: Any = Opaque(full)
        elif full in _MODELLED:
            value = _MODELLED[full]
        elif full in TORCH_WEIGHTS_ONLY_GLOBALS or full in self.allow_globals:
            value = Opaque(full)
        else:
            self.unsafe.add(full)
            value = Opaque(full)
        self._globals[key] = value
        return value

    def check_keys(self, keys: Any) -> None:
        """Refuse dict keys / set members that are tuples nested deeper than MAX_DEPTH: hashing
        one recurses in C and can crash the interpreter (torch's loader included)."""
        verified = self._key_heights
        for key in keys:
            if type(key) is int:
                _check_key_int(key)
            if type(key) is not tuple or id(key) in verified:
                continue
            height = 1
            todo = [(key, 1)]
            while todo:
                item, depth = todo.pop()
                for part in item:
                    if type(part) is int:
                        _check_key_int(part)
                    if type(part) is tuple:
                        known = verified.get(id(part))
                        reach = depth + (known[1] if known else 1)
                        if reach > MAX_DEPTH:
                            raise Malformed(f"a dict key or set member nested more than {MAX_DEPTH} deep")
                        height = max(height, reach)
                        if known is None:
                            todo.append((part, depth + 1))
            verified[id(key)] = (key, height)  # the key is kept alive, so its id stays unique

    # -- REDUCE / NEWOBJ -------------------------------------------------------------------
    def call(self, func: Any, args: Any) -> Any:
        if type(args) is list:
            args = tuple(args)
        if type(args) is not tuple:
            raise Malformed(f"REDUCE arguments are a {type(args).__name__}, not a tuple")
        if type(func) is _Function:
            if func is _SET and args and type(args[0]) in (list, tuple):
                self.check_keys(args[0])
            elif func is _ORDERED_DICT and args and type(args[0]) in (list, tuple):
                self.check_keys([p[0] for p in args[0] if type(p) is tuple and p])
            return _HANDLERS[func.kind](args)
        if type(func) is Opaque:
            if func.name in _ALLOCATING and any(_is_int(a) for a in args):
                shown = ", ".join(brief(a) for a in args[:4])
                raise Malformed(
                    f"refused {func.name}({shown}): a constructor that allocates memory sized by a number in the file"
                )
            if func.name in self.unsafe:
                return func
            raise Unsupported(f"{func.name}(...)")
        if type(func) is StorageClass:
            if any(_is_int(a) for a in args):
                raise Malformed(f"refused {func.name}({brief(args[0])}): allocates memory sized by the file")
            raise Unsupported(f"{func.name}(...) outside a persistent id")
        raise Malformed(f"REDUCE on a {type(func).__name__} value, which is not an allowed callable")

    def newobj(self, cls: Any, args: Any) -> Any:
        if cls is _ORDERED_DICT and args == ():
            return OrderedDict()
        if type(cls) is Opaque or type(cls) is StorageClass:
            return self.call(cls, args)
        if type(cls) is _Function:
            raise Unsupported(f"NEWOBJ of {cls.kind}")
        raise Malformed(f"NEWOBJ on a {type(cls).__name__} value, which is not an allowed class")

    def build(self, inst: Any, state: Any) -> None:
        kind = type(inst)
        if kind is OrderedDict:
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise Unsupported(f"OrderedDict state of type {type(state).__name__}")
            inst.__dict__.update(state)
        elif kind is Opaque:
            return
        elif kind in (dict, list, tuple, str, int, float, bool, bytes, type(None)):
            raise Malformed(f"BUILD on a {kind.__name__}")
        else:
            raise Unsupported(f"BUILD on a {kind.__name__}")

    def persistent(self, pid: Any) -> Any:
        if type(pid) is not tuple or not pid:
            raise Malformed(f"a persistent id of type {type(pid).__name__}")
        typename = pid[0]
        if type(typename) is bytes:
            typename = typename.decode("ascii", "replace")
        if typename != "storage":
            raise Malformed(f"a persistent id of kind {brief(typename)} (only 'storage' is allowed)")
        for part in pid:
            if type(part) is Opaque:
                return part
        if self.persistent_load is None:
            raise Malformed("a persistent id where none is expected")
        try:
            return self.persistent_load(pid)
        except Malformed as e:  # about the storages, not the pickle program
            raise _StorageMalformed(str(e)) from None

    # -- the loop ---------------------------------------------------------------------------
    def run(self, data: bytes, pos: int) -> tuple[Any, int]:  # noqa: C901 - one dispatch loop
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        append = stack.append
        end = len(data)
        unsupported = self.unsupported
        call = self.call
        # containers the file may still make: bounds time and memory of a hostile pickle
        # (3,000,000 empty dicts in a 3 MB pickle) that no nesting or size check catches
        budget = self.max_containers
        try:
            while True:
                op = data[pos]
                pos += 1
                if op in _MAKES_CONTAINER:
                    budget -= 1
                    if budget < 0:
                        raise Malformed(
                            f"more than {self.max_containers:,} containers (dicts, lists, tuples): "
                            "far more than the file's tensors need"
                        )
                if op == 0x72:  # LONG_BINPUT
                    memo[_U32(data, pos)[0]] = stack[-1]
                    pos += 4
                elif op == 0x68:  # BINGET
                    append(memo[data[pos]])
                    pos += 1
                elif op == 0x4B:  # BININT1
                    append(data[pos])
                    pos += 1
                elif op == 0x28:  # MARK
                    metastack.append(stack)
                    stack = []
                    append = stack.append
                elif op == 0x58:  # BINUNICODE
                    (n,) = _U32(data, pos)
                    pos += 4
                    if pos + n > end:
                        raise PickleTruncated("")
                    append(str(data[pos : pos + n], "utf-8", "surrogatepass"))
                    pos += n
                elif op == 0x52:  # REDUCE
                    args = stack.pop()
                    func = stack[-1]
                    if func is _ORDERED_DICT and args == ():  # every tensor's backward hooks
                        stack[-1] = OrderedDict()
                    else:
                        try:
                            stack[-1] = call(func, args)
                        except Unsupported as e:
                            unsupported.append(str(e))
                            stack[-1] = Opaque(str(e))
                elif op == 0x74:  # TUPLE
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    append(tuple(items))
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x29:  # EMPTY_TUPLE
                    append(())
                elif op == 0x51:  # BINPERSID
                    try:
                        stack[-1] = self.persistent(stack[-1])
                    except Unsupported as e:
                        unsupported.append(str(e))
                        stack[-1] = Opaque(str(e))
                elif op == 0x89:  # NEWFALSE
                    append(False)
                elif op == 0x86:  # TUPLE2
                    b = stack.pop()
                    stack[-1] = (stack[-1], b)
                elif op == 0x71:  # BINPUT
                    memo[data[pos]] = stack[-1]
                    pos += 1
                elif op == 0x6A:  # LONG_BINGET
                    append(memo[_U32(data, pos)[0]])
                    pos += 4
                elif op == 0x75:  # SETITEMS
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    target = stack[-1]
                    if type(target) is dict or type(target) is OrderedDict:
                        if len(items) % 2:
                            raise Malformed("SETITEMS with an odd number of items")
                        keys = items[::2]
                        self.check_keys(keys)
                        target.update(zip(keys, items[1::2]))
                    elif type(target) is not Opaque:
                        raise Malformed(f"SETITEMS on a {type(target).__name__}")
                elif op == 0x88:  # NEWTRUE
                    append(True)
                elif op == 0x4E:  # NONE
                    append(None)
                elif op == 0x4D:  # BININT2
                    append(_U16(data, pos)[0])
                    pos += 2
                elif op == 0x4A:  # BININT
                    append(_I32(data, pos)[0])
                    pos += 4
                elif op == 0x8A:  # LONG1
                    n = data[pos]
                    if pos + 1 + n > end:
                        raise PickleTruncated("")
                    append(int.from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True))
                    pos += 1 + n
                elif op == 0x47:  # BINFLOAT
                    append(_F64(data, pos)[0])
                    pos += 8
                elif op == 0x87:  # TUPLE3
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif op == 0x7D:  # EMPTY_DICT
                    append({})
                elif op == 0x5D:  # EMPTY_LIST
                    append([])
                elif op == 0x65:  # APPENDS
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    target = stack[-1]
                    if type(target) is list:
                        target.extend(items)
                    elif type(target) is not Opaque:
                        raise Malformed(f"APPENDS on a {type(target).__name__}")
                elif op == 0x61:  # APPEND
                    item = stack.pop()
                    target = stack[-1]
                    if type(target) is list:
                        target.append(item)
                    elif type(target) is not Opaque:
                        raise Malformed(f"APPEND on a {type(target).__name__}")
                elif op == 0x73:  # SETITEM
                    value = stack.pop()
                    key = stack.pop()
                    target = stack[-1]
                    if type(target) is dict or type(target) is OrderedDict:
                        if type(key) is tuple or type(key) is int:
                            self.check_keys((key,))
                        target[key] = value
                    elif type(target) is not Opaque:
                        raise Malformed(f"SETITEM on a {type(target).__name__}")
                elif op == 0x63:  # GLOBAL
                    nl1 = data.index(b"\n", pos)
                    nl2 = data.index(b"\n", nl1 + 1)
                    append(self.find_global(data[pos:nl1], data[nl1 + 1 : nl2]))
                    pos = nl2 + 1
                elif op == 0x62:  # BUILD
                    state = stack.pop()
                    try:
                        self.build(stack[-1], state)
                    except Unsupported as e:
                        unsupported.append(str(e))
                elif op == 0x81:  # NEWOBJ
                    args = stack.pop()
                    try:
                        stack[-1] = self.newobj(stack[-1], args)
                    except Unsupported as e:
                        unsupported.append(str(e))
                        stack[-1] = Opaque(str(e))
                elif op == 0x55:  # SHORT_BINSTRING (torch.load decodes it as UTF-8)
                    n = data[pos]
                    if pos + 1 + n > end:
                        raise PickleTruncated("")
                    append(str(data[pos + 1 : pos + 1 + n], "utf-8"))
                    pos += 1 + n
                elif op == 0x8F:  # EMPTY_SET
                    append(set())
                elif op == 0x80:  # PROTO
                    if data[pos] > 5:
                        raise Malformed(f"pickle protocol {data[pos]} does not exist")
                    pos += 1
                elif op == 0x2E:  # STOP
                    return stack.pop(), pos
                else:
                    raise Malformed(_opcode_refusal(op, pos - 1))
        except (IndexError, struct.error, ValueError) as e:
            if isinstance(e, UnicodeDecodeError):
                raise Malformed(f"a string is not valid UTF-8 near offset {pos}") from None
            if pos >= end or (isinstance(e, ValueError) and "subsection not found" in str(e)):
                raise PickleTruncated("") from None
            raise Malformed(f"stack underflow or bad value at offset {pos - 1} ({e})") from None
        except KeyError as e:
            raise Malformed(f"a memo reference {e} that was never stored, near offset {pos}") from None
        except TypeError as e:
            raise Malformed(f"invalid operation near offset {pos} ({e})") from None
        except RecursionError:
            raise Malformed(f"a dict key nested too deeply near offset {pos}") from None


# -- handlers for the modelled callables ------------------------------------------------------


def _h_ordered_dict(args: tuple[Any, ...]) -> OrderedDict[Any, Any]:
    if not args:
        return OrderedDict()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        pairs = args[0]
        if all(type(p) is tuple and len(p) == 2 for p in pairs):
            return OrderedDict(pairs)
    raise Malformed("collections.OrderedDict called with unexpected arguments")


def _h_set(args: tuple[Any, ...]) -> set[Any]:
    if not args:
        return set()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        return set(args[0])
    raise Malformed("builtins.set called with unexpected arguments")


def _h_encode(args: tuple[Any, ...]) -> bytes:
    if len(args) in (1, 2) and type(args[0]) is str and all(type(a) is str for a in args):
        encoding = args[1].lower().replace("_", "-") if len(args) == 2 else "utf-8"
        try:
            if encoding in ("latin1", "latin-1", "iso-8859-1"):
                return args[0].encode("latin-1")
            if encoding in ("utf-8", "utf8", "ascii"):
                return args[0].encode(encoding)
        except UnicodeEncodeError:
            raise Malformed(f"_codecs.encode cannot encode its string as {encoding}") from None
        raise Unsupported(f"_codecs.encode with encoding {brief(args[1])}")
    raise Malformed("_codecs.encode called with unexpected arguments")


def _h_size(args: tuple[Any, ...]) -> TorchSize:
    if not args:
        return TorchSize()
    if len(args) == 1 and type(args[0]) in (tuple, list, TorchSize) and all(_is_int(x) for x in args[0]):
        return TorchSize(args[0])
    raise Malformed("torch.Size called with something other than a tuple of ints")


def _h_device(args: tuple[Any, ...]) -> TorchDevice:
    if len(args) == 1 and type(args[0]) is str:
        spec = args[0]
        kind, _, index = spec.partition(":")
        if kind.isidentifier() and (not index or index.isdigit()):
            return TorchDevice(spec)
    elif len(args) == 2 and type(args[0]) is str and args[0].isidentifier():
        if args[1] is None:
            return TorchDevice(args[0])
        if _is_int(args[1]) and args[1] >= 0 and ":" not in args[0]:
            return TorchDevice(f"{args[0]}:{args[1]}")
    raise Malformed(f"torch.device called with invalid arguments {brief(args)}")


def _check_key_int(key: int) -> None:
    """Refuse an int dict key or set member wider than 64 bits: CPython hashes ints modulo
    2**61 - 1, so `k * (2**61 - 1)` all hash alike and a dict of them takes quadratic time."""
    if not -(1 << 63) <= key < (1 << 64):
        raise Malformed("a dict key or set member that is an integer wider than 64 bits")


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if type(values) not in (tuple, list, TorchSize) or len(values) > MAX_DIMS:
        raise Malformed(f"a tensor {what} that is not a tuple of at most {MAX_DIMS} ints")
    for v in values:
        if type(v) is not int:
            raise Malformed(f"a tensor {what} that is not a tuple of ints")
        if v < 0:
            raise Malformed(f"a tensor with a negative {what} {brief(tuple(values))}")
        if v >= MAX_DIM_SIZE:
            raise Malformed(f"a tensor with a {what} past 2**63: {brief(tuple(values))}")
    return values if type(values) is tuple else tuple(values)


def _make_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: str, metadata: Any
) -> Any:
    if type(storage) is Opaque:
        return storage
    if type(storage) is not StorageMeta:
        raise Malformed(f"a tensor rebuilt from a {type(storage).__name__} instead of a storage")
    shape = _check_ints(size, "size")
    strides = _check_ints(stride, "stride")
    if len(shape) != len(strides):
        raise Malformed(f"a tensor with {len(shape)} sizes but {len(strides)} strides")
    if not _is_int(offset) or not 0 <= offset < MAX_DIM_SIZE:
        raise Malformed(f"a tensor with storage offset {brief(offset)}")
    if type(requires_grad) is not bool:
        raise Malformed(f"requires_grad is a {type(requires_grad).__name__}")
    if hooks is not None and type(hooks) not in (OrderedDict, dict):
        raise Malformed(f"backward hooks of type {type(hooks).__name__}")
    if hooks:
        raise Unsupported("a tensor with backward hooks")
    if metadata is not None and type(metadata) is not dict:
        raise Malformed(f"tensor metadata of type {type(metadata).__name__}")
    if metadata:
        raise Unsupported(f"a tensor with metadata {sorted(map(str, metadata))} (conj/neg bits)")
    if dtype not in DTYPE_ITEMSIZE:
        raise Unsupported(f"a tensor of dtype {dtype}")
    if requires_grad and dtype not in FLOATING_DTYPES and not dtype.startswith("complex"):
        raise Malformed(f"a {dtype} tensor that requires grad")
    if numel_overflows(shape):
        raise Malformed(f"a tensor of shape {brief(list(shape))}, whose number of elements overflows int64")
    numel = 1
    last = offset
    for n, st in zip(shape, strides):
        numel *= n
        last += (n - 1) * st
    itemsize = DTYPE_ITEMSIZE[dtype]
    if numel and (last + 1) * itemsize > storage.nbytes:  # TensorMeta.span, computed once
        raise Malformed(
            f"a {dtype} tensor of shape {list(shape)}, stride {list(strides)}, offset {offset} "
            f"spans bytes [{offset * itemsize}, {(last + 1) * itemsize}) of storage {brief(storage.key)}, "
            f"which holds {storage.nbytes}"
        )
    return TensorMeta(storage, dtype, shape, strides, offset, requires_grad, False)


def _h_rebuild_v2(args: tuple[Any, ...]) -> Any:
    if len(args) not in (6, 7):
        raise Malformed(f"_rebuild_tensor_v2 called with {len(args)} arguments")
    storage = args[0]
    dtype = storage.dtype if type(storage) is StorageMeta else ""
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    return _make_tensor(storage, offset, size, stride, requires_grad, hooks, dtype, args[6] if len(args) == 7 else None)


def _h_rebuild_v3(args: tuple[Any, ...]) -> Any:
    if len(args) not in (7, 8):
        raise Malformed(f"_rebuild_tensor_v3 called with {len(args)} arguments")
    dtype = args[6]
    if type(dtype) is Opaque:
        return dtype
    if type(dtype) is not TorchDtype:
        raise Malformed(f"_rebuild_tensor_v3 with dtype argument of type {type(dtype).__name__}")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    return _make_tensor(
        storage, offset, size, stride, requires_grad, hooks, dtype.name, args[7] if len(args) == 8 else None
    )


def _h_rebuild_parameter(args: tuple[Any, ...]) -> Any:
    if len(args) != 3:
        raise Malformed(f"_rebuild_parameter called with {len(args)} arguments")
    data, requires_grad, hooks = args
    if type(data) is Opaque:
        return data
    if type(data) is not TensorMeta:
        raise Malformed(f"a Parameter rebuilt from a {type(data).__name__}")
    if data.is_parameter:
        raise Unsupported("a Parameter of a Parameter")
    if type(requires_grad) is not bool:
        raise Malformed(f"Parameter requires_grad is a {type(requires_grad).__name__}")
    if hooks is not None and type(hooks) not in (OrderedDict, dict):
        raise Malformed(f"backward hooks of type {type(hooks).__name__}")
    if hooks:
        raise Unsupported("a Parameter with backward hooks")
    if requires_grad and data.dtype not in FLOATING_DTYPES and not data.dtype.startswith("complex"):
        raise Malformed(f"a {data.dtype} Parameter that requires grad")
    return TensorMeta(data.storage, data.dtype, data.shape, data.stride, data.storage_offset, requires_grad, True)


_HANDLERS: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "collections.OrderedDict": _h_ordered_dict,
    "builtins.set": _h_set,
    "_codecs.encode": _h_encode,
    "torch.Size": _h_size,
    "torch.device": _h_device,
    "torch._utils._rebuild_tensor_v2": _h_rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _h_rebuild_v3,
    "torch._utils._rebuild_parameter": _h_rebuild_parameter,
}


# -- after the run ---------------------------------------------------------------------------

_LEAVES = (str, int, float, bool, bytes, type(None), TensorMeta, TorchDtype, TorchDevice, TorchSize)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _children(node: Any) -> list[Any]:
    kind = type(node)
    if kind is dict:
        return [*node.keys(), *node.values()]
    if kind is OrderedDict:
        return [*node.keys(), *node.values(), *node.__dict__.values()]
    return list(node)


def check_graph(root: Any, max_nodes: int) -> None:
    """Refuse graphs that are cyclic, nested deeper than MAX_DEPTH, that expand (counting shared
    references once per use) to more than `max_nodes` nodes, or that hold values outside the model.

    Raises Malformed / Unsupported.
    """
    kind = type(root)
    if kind not in _CONTAINERS:
        _check_leaf(root)
        return
    done: dict[int, tuple[int, int]] = {}  # id -> (depth, expanded size)
    on_path: set[int] = set()
    work: list[tuple[Any, bool]] = [(root, False)]
    while work:
        node, finished = work.pop()
        nid = id(node)
        if finished:
            on_path.discard(nid)
            depth = size = 1
            for child in _children(node):
                if type(child) in _CONTAINERS:
                    cd, cs = done[id(child)]
                    depth = max(depth, cd + 1)
                    size += cs
                else:
                    size += 1
            if depth > MAX_DEPTH:
                raise Malformed(f"containers nested more than {MAX_DEPTH} deep")
            if size > max_nodes:
                raise Malformed(f"shared references expand the object graph past {max_nodes} nodes")
            done[nid] = (depth, size)
            continue
        if nid in done:
            continue
        if nid in on_path:
            raise Unsupported("a container that contains itself")
        on_path.add(nid)
        work.append((node, True))
        if type(node) in (dict, OrderedDict, set) and any(type(k) is TensorMeta for k in node):
            raise Unsupported("a tensor used as a dict key or set member")
        if len(on_path) > MAX_DEPTH:
            raise Malformed(f"containers nested more than {MAX_DEPTH} deep")
        for child in _children(node):
            if type(child) in _CONTAINERS:
                cid = id(child)
                if cid in on_path:
                    raise Unsupported("a container that contains itself")
                if cid not in done:
                    work.append((child, False))
            else:
                _check_leaf(child)


def _check_leaf(value: Any) -> None:
    kind = type(value)
    if kind in _LEAVES:
        return
    if kind is StorageMeta:
        raise Unsupported("a bare storage outside a tensor")
    if kind is Opaque:
        raise Unsupported(value.name)
    if kind is StorageClass or kind is _Function:
        raise Unsupported(f"the global {brief(value)} as a value")
    raise Unsupported(f"a value of type {kind.__name__}")


def scan_globals(data: bytes, start: int = 0) -> set[str]:
    """Every GLOBAL / STACK_GLOBAL name in the pickle at `start`, read without executing it."""
    import io
    import pickletools

    names: set[str] = set()
    strings: list[str] = []
    # protocol 4 memoizes every string and fetches repeated module names from the memo
    memo: dict[int, str] = {}
    memoized = 0  # MEMOIZE's next index
    last: str | None = None  # the string the last opcode pushed, if it pushed one
    try:
        for info, arg, _pos in pickletools.genops(io.BytesIO(memoryview(data)[start:])):
            name = info.name
            if type(arg) is str:
                if name == "GLOBAL" or name == "INST":
                    module, _, attr = arg.partition(" ")
                    names.add(resolve_name(module, attr))
                    last = None
                elif "UNICODE" in name:
                    strings.append(arg)
                    last = arg
                else:
                    last = None
            elif name == "MEMOIZE":
                if last is not None:
                    memo[memoized] = last
                memoized += 1
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and isinstance(arg, int):
                if last is not None:
                    memo[arg] = last
                elif arg in memo:
                    del memo[arg]
            elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int):
                last = memo.get(arg)
                if last is not None:
                    strings.append(last)
            elif name == "STACK_GLOBAL":
                if len(strings) >= 2:
                    names.add(resolve_name(strings[-2], strings[-1]))
                last = None
            elif name == "STOP":
                break
            elif name != "FRAME" and name != "MARK":
                last = None
    except Exception:  # noqa: BLE001 - a malformed tail ends the scan; we report what we saw
        pass
    return names


def _refused(names: set[str], allow_globals: frozenset[str]) -> set[str]:
    out = set()
    for full in names:
        module = full.rsplit(".", 1)[0]
        if module in BLOCKLISTED_MODULES:
            out.add(full)
        elif full in _MODELLED or full in TORCH_WEIGHTS_ONLY_GLOBALS or full in allow_globals:
            continue
        else:
            out.add(full)
    return out


def resolve_storage_id(
    pid: tuple[Any, ...], fields: int, storages: Mapping[str, StorageMeta], *, bytes_key: bool = False
) -> tuple[StorageClass, str, str, int, StorageMeta | None]:
    """Check a `('storage', cls, key, location, numel, ...)` persistent id.

    Returns (storage class, key, location, nbytes, the StorageMeta already made for this key or
    None). One key seen with two dtypes, sizes or devices is refused: torch would silently
    reinterpret the bytes.
    """
    if len(pid) != fields:
        raise Malformed(f"a storage persistent id with {len(pid)} fields (expected {fields})")
    cls, key, location, numel = pid[1:5]
    if type(cls) is not StorageClass:
        raise Malformed(f"a storage persistent id whose type is a {type(cls).__name__}")
    if bytes_key and type(key) is bytes:
        key = key.decode("ascii", "replace")
    if type(key) is not str:
        raise Malformed(f"a storage key of type {type(key).__name__}")
    if type(location) is bytes:
        location = location.decode("ascii", "replace")
    if type(location) is not str:
        raise Malformed(f"a storage location of type {type(location).__name__}")
    if type(numel) is not int or numel < 0:
        raise Malformed(f"storage {brief(key)} has size {brief(numel)}")
    nbytes = numel * DTYPE_ITEMSIZE[cls.dtype]
    known = storages.get(key)
    if known is not None:
        if known.dtype != cls.dtype:
            raise Malformed(f"storage {brief(key)} is referenced as both {known.dtype} and {cls.dtype}")
        if known.nbytes != nbytes or known.location != location:
            raise Malformed(f"storage {brief(key)} is referenced with two different sizes or devices")
    elif location.startswith("meta"):
        raise Unsupported(f"storage {brief(key)} on the meta device")
    return cls, key, location, nbytes, known


def container_budget(num_storages: int) -> int:
    """How many containers a pickle holding `num_storages` storages may make.

    A tensor costs about six (size, stride and argument tuples, the persistent id, the hooks
    OrderedDict) and an optimizer state a few more; 200,000 covers any plausible rest.
    """
    return 200_000 + 64 * num_storages


def unpickle(
    data: bytes,
    *,
    path: str,
    where: str,
    persistent_load: Callable[[tuple[Any, ...]], Any] | None = None,
    allow_globals: frozenset[str] = frozenset(),
    start: int = 0,
    complete: bool = True,
    max_nodes: int | None = None,
    max_containers: int = 1_000_000,
) -> tuple[Any, int]:
    """Run the restricted VM over the pickle at `data[start:]`; return (object, end offset).

    `persistent_load(pid)` turns a `('storage', StorageClass, key, location, numel, ...)` tuple
    into a StorageMeta. Errors name `path` and `where` (e.g. "data.pkl"). Raises
    UnsafeCheckpointError (all refused globals), EngineUnsupported, PickleTruncated (the data
    ended early; with `complete=False` even when refused globals were seen, so that the caller
    can read more and retry), RestrictedPickleError (an opcode or construct the VM refuses, as
    weights_only does) or BadCheckpointError (storages that do not match the records).
    `max_containers` bounds the number of container-making opcodes (see `container_budget`).
    """
    machine = _Machine(persistent_load, allow_globals, max_containers)
    try:
        obj, end = machine.run(data, start)
        if not machine.unsafe and not machine.unsupported:
            if max_nodes is None:
                max_nodes = 16 * (len(data) - start) + 1_000_000
            check_graph(obj, max_nodes)
    except PickleTruncated:
        # the VM ran every opcode up to the cut, so it saw every GLOBAL there is
        if machine.unsafe and complete:
            raise UnsafeCheckpointError(path, machine.unsafe) from None
        raise PickleTruncated(f"{path}: {where} is truncated (the pickle has no STOP opcode)", machine.unsafe) from None
    except Malformed as e:
        refused = machine.unsafe | _refused(scan_globals(data, start), allow_globals)
        if refused:
            raise UnsafeCheckpointError(path, refused) from None
        if isinstance(e, _StorageMalformed):
            raise BadCheckpointError(f"{path}: {where}: {e}") from None
        raise RestrictedPickleError(f"{path}: {where}: {e}") from None
    except Unsupported as e:
        machine.unsupported.append(str(e))
    except BadCheckpointError as e:  # from persistent_load
        refused = machine.unsafe | _refused(scan_globals(data, start), allow_globals)
        if refused:
            raise UnsafeCheckpointError(path, refused) from None
        raise e
    if machine.unsafe:
        raise UnsafeCheckpointError(path, machine.unsafe)
    if machine.unsupported:
        raise EngineUnsupported(f"{path}: {where}: not modelled: {machine.unsupported[0]}")
    return obj, end
