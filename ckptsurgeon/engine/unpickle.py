"""A restricted pickle VM that reads torch checkpoints into the torch-free data model.

It accepts exactly the opcodes `torch/_weights_only_unpickler.py` accepts and never imports or
calls anything named in the file. Beside it: :mod:`.pickle_globals` (what a GLOBAL may name and
resolves to: modelled, allowed but not modelled, opaque, or refused and reported together at the
end as :class:`UnsafeCheckpointError`), :mod:`.pickle_calls` (what calling a modelled global
builds) and :mod:`.pickle_checks` (limits on containers, dict key checks, the check of the
finished graph, the opaque objects that hold tensors).

Opaque entries (`opaque=True`): a global outside the allowlists that runs no code by its name
(:func:`~.pickle_globals.runs_code`) is a :class:`PickledGlobal`; REDUCE / NEWOBJ of it make an
:class:`OpaqueObject` that records the call and what BUILD, SETITEM(S) and APPEND(S) do to it,
and nothing is imported or called. Such a global is refused after all, with the others, when
the object could bear on a tensor: when an opaque value is an argument of a call that builds a
tensor or a torch value (the rebuild functions, `torch.Size`, `_codecs.encode`, every allowed
but unmodelled global, a storage class) or part of a persistent id, and when the finished graph
has a tensor or storage inside an opaque object (`opaque_refusals`).

Storages come from the `persistent_load` callback the format reader supplies.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import BadCheckpointError, EngineUnsupported, RestrictedPickleError, UnsafeCheckpointError
from .limits import brief
from .pickle_calls import HANDLERS, TENSOR_HANDLERS
from .pickle_checks import (
    ExtensionClass,
    ExtensionValue,
    Malformed,
    Unsupported,
    check_graph,
    check_keys,
    is_int,
    opaque_globals,
    opaque_refusals,
)
from .pickle_globals import (
    ALLOCATING_GLOBALS,
    BLOCKLISTED_MODULES,
    MODELLED_GLOBALS,
    ORDERED_DICT,
    PARAMETER,
    SET,
    TORCH_WEIGHTS_ONLY_GLOBALS,
    ModelledCallable,
    Opaque,
    OpaqueObject,
    PickledGlobal,
    StorageClass,
    refused_globals,
    resolve_name,
    runs_code,
    scan_globals,
)


class PickleTruncated(BadCheckpointError):
    """The pickle ended before its STOP opcode (the legacy reader may then read more).

    `refused` holds the refused globals seen before the end.
    """

    def __init__(self, message: str, refused: set[str] | None = None):
        super().__init__(message)
        self.refused = refused or set()


class _StorageMalformed(Malformed):
    """Malformed raised by `persistent_load`: the storages do not match the file's records.

    Unlike the rest (the pickle program itself), a full unpickle would not make it right.
    """


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


# The opcodes the VM runs, as the ints `data[pos]` gives (no other opcode is accepted).
MARK = pickle.MARK[0]
STOP = pickle.STOP[0]
PROTO = pickle.PROTO[0]
NONE = pickle.NONE[0]
NEWFALSE = pickle.NEWFALSE[0]
NEWTRUE = pickle.NEWTRUE[0]
BININT = pickle.BININT[0]
BININT1 = pickle.BININT1[0]
BININT2 = pickle.BININT2[0]
LONG1 = pickle.LONG1[0]
BINFLOAT = pickle.BINFLOAT[0]
SHORT_BINSTRING = pickle.SHORT_BINSTRING[0]
BINUNICODE = pickle.BINUNICODE[0]
EMPTY_TUPLE = pickle.EMPTY_TUPLE[0]
TUPLE = pickle.TUPLE[0]
TUPLE1 = pickle.TUPLE1[0]
TUPLE2 = pickle.TUPLE2[0]
TUPLE3 = pickle.TUPLE3[0]
EMPTY_LIST = pickle.EMPTY_LIST[0]
APPEND = pickle.APPEND[0]
APPENDS = pickle.APPENDS[0]
EMPTY_DICT = pickle.EMPTY_DICT[0]
SETITEM = pickle.SETITEM[0]
SETITEMS = pickle.SETITEMS[0]
EMPTY_SET = pickle.EMPTY_SET[0]
BINGET = pickle.BINGET[0]
LONG_BINGET = pickle.LONG_BINGET[0]
BINPUT = pickle.BINPUT[0]
LONG_BINPUT = pickle.LONG_BINPUT[0]
GLOBAL = pickle.GLOBAL[0]
REDUCE = pickle.REDUCE[0]
BUILD = pickle.BUILD[0]
NEWOBJ = pickle.NEWOBJ[0]
BINPERSID = pickle.BINPERSID[0]
# protocol 4, for pickles read with an extension table (see `run`); not torch's: named apart
PROTO4_FRAME = pickle.FRAME[0]
PROTO4_SHORT_BINUNICODE = pickle.SHORT_BINUNICODE[0]
PROTO4_MEMOIZE = pickle.MEMOIZE[0]
PROTO4_STACK_GLOBAL = pickle.STACK_GLOBAL[0]

# MARK (every tuple, list, dict or batch built from a mark), EMPTY_DICT, EMPTY_LIST, EMPTY_SET,
# TUPLE1-3: the opcodes that make a container
_MAKES_CONTAINER = frozenset({MARK, EMPTY_DICT, EMPTY_LIST, EMPTY_SET, TUPLE1, TUPLE2, TUPLE3})


class _Machine:
    """One run of the VM over one pickle; see :func:`unpickle`."""

    def __init__(
        self,
        persistent_load: Callable[[tuple[Any, ...]], Any] | None,
        allow_globals: frozenset[str],
        max_containers: int = 1_000_000,
        opaque: bool = False,
        extension: Mapping[str, ExtensionClass] | None = None,
    ):
        self.persistent_load = persistent_load
        self.allow_globals = allow_globals
        self.extension = extension or {}
        self.max_containers = max_containers
        self.opaque = opaque
        self.opaque_names: set[str] = set()  # globals read as PickledGlobal
        self.unsafe: set[str] = set()
        self.unsupported: list[str] = []
        self._globals: dict[bytes, Any] = {}
        self._key_heights: dict[int, tuple[tuple[Any, ...], int]] = {}  # see check_keys

    # -- globals -------------------------------------------------------------------------
    def find_global(self, line_module: bytes, line_name: bytes) -> Any:
        key = line_module + b"\n" + line_name
        hit = self._globals.get(key)
        if hit is not None:
            return hit
        try:
            module_name, attr_name = line_module.decode("utf-8"), line_name.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("a GLOBAL name is not valid UTF-8") from None
        full = resolve_name(module_name, attr_name)
        module = full.rsplit(".", 1)[0]
        if module in BLOCKLISTED_MODULES:
            self.unsafe.add(full)
            value: Any = Opaque(full)
        elif full in self.extension:
            value = self.extension[full]
        elif full in MODELLED_GLOBALS:
            value = MODELLED_GLOBALS[full]
        elif full in TORCH_WEIGHTS_ONLY_GLOBALS or full in self.allow_globals:
            value = Opaque(full)
        elif self.opaque and not runs_code(full):
            self.opaque_names.add(full)
            value = PickledGlobal(module_name, attr_name, full)
        else:
            self.unsafe.add(full)
            value = Opaque(full)
        self._globals[key] = value
        return value

    def refuse_opaque_in(self, value: Any, what: str) -> Opaque | None:
        """Refuse the opaque globals inside `value` (an argument of `what`, which builds a tensor
        or a torch value); an Opaque placeholder for the result when there are any."""
        if not self.opaque_names:
            return None
        names = opaque_globals(value)
        if not names:
            return None
        self.unsafe |= names
        return Opaque(what)

    # -- REDUCE / NEWOBJ -------------------------------------------------------------------
    def call(self, func: Any, args: Any, newobj: bool = False) -> Any:
        if type(args) is list:
            args = tuple(args)
        if type(args) is not tuple:
            raise Malformed(f"REDUCE arguments are a {type(args).__name__}, not a tuple")
        if type(func) is PickledGlobal or type(func) is OpaqueObject:
            return OpaqueObject(func, args, newobj)  # recorded, never called
        if type(func) is ModelledCallable:
            if func.kind in TENSOR_HANDLERS and (refused := self.refuse_opaque_in(args, func.kind)):
                return refused
            if func is SET and args and type(args[0]) in (list, tuple):
                check_keys(args[0], self._key_heights)
            elif func is ORDERED_DICT and args and type(args[0]) in (list, tuple):
                check_keys([p[0] for p in args[0] if type(p) in (tuple, list) and p], self._key_heights)
            return HANDLERS[func.kind](args)
        if (type(func) is Opaque or type(func) is StorageClass) and (refused := self.refuse_opaque_in(args, func.name)):
            return refused
        if isinstance(func, ExtensionClass):
            return func.call(args)
        if type(func) is Opaque:
            if func.name in ALLOCATING_GLOBALS and any(is_int(a) for a in args):
                shown = ", ".join(brief(a) for a in args[:4])
                raise Malformed(
                    f"refused {func.name}({shown}): a constructor that allocates memory sized by a number in the file"
                )
            if func.name in self.unsafe:
                return func
            raise Unsupported(f"{func.name}(...)")
        if type(func) is StorageClass:
            if any(is_int(a) for a in args):
                raise Malformed(f"refused {func.name}({brief(args[0])}): allocates memory sized by the file")
            raise Unsupported(f"{func.name}(...) outside a persistent id")
        raise Malformed(f"REDUCE on a {type(func).__name__} value, which is not an allowed callable")

    def newobj(self, cls: Any, args: Any) -> Any:
        if cls is ORDERED_DICT and args == ():
            return OrderedDict()
        if type(cls) in (Opaque, StorageClass, PickledGlobal, OpaqueObject) or cls is PARAMETER:
            return self.call(cls, args, newobj=True)
        if isinstance(cls, ExtensionClass):
            if type(args) is not tuple:
                raise Malformed(f"NEWOBJ arguments are a {type(args).__name__}, not a tuple")
            return cls.new(args)
        if type(cls) is ModelledCallable:
            raise Unsupported(f"NEWOBJ of {cls.kind}")
        raise Malformed(f"NEWOBJ on a {type(cls).__name__} value, which is not an allowed class")

    def build(self, inst: Any, state: Any) -> None:
        kind = type(inst)
        if kind is OrderedDict:
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise Unsupported(f"OrderedDict state of type {type(state).__name__}")
            inst.__dict__.update(state)
        elif kind is OpaqueObject:
            inst.states.append(state)
        elif kind is Opaque:
            return
        elif isinstance(inst, ExtensionValue):
            inst.build(state)
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
        if refused := self.refuse_opaque_in(pid, "a persistent id"):
            return refused
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
        # protocol 4's opcodes, which torch's weights_only loader refuses, only for the plain
        # pickles a caller reads with an extension table (DCP's `.metadata`)
        proto4 = bool(self.extension)
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
                if op == LONG_BINPUT:
                    memo[_U32(data, pos)[0]] = stack[-1]
                    pos += 4
                elif op == BINGET:
                    append(memo[data[pos]])
                    pos += 1
                elif op == BININT1:
                    append(data[pos])
                    pos += 1
                elif op == MARK:
                    metastack.append(stack)
                    stack = []
                    append = stack.append
                elif op == BINUNICODE:
                    (n,) = _U32(data, pos)
                    pos += 4
                    if pos + n > end:
                        raise PickleTruncated("")
                    append(str(data[pos : pos + n], "utf-8", "surrogatepass"))
                    pos += n
                elif op == REDUCE:
                    args = stack.pop()
                    func = stack[-1]
                    if func is ORDERED_DICT and args == ():  # every tensor's backward hooks
                        stack[-1] = OrderedDict()
                    else:
                        try:
                            stack[-1] = call(func, args)
                        except Unsupported as e:
                            unsupported.append(str(e))
                            stack[-1] = Opaque(str(e))
                elif op == TUPLE:
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    append(tuple(items))
                elif op == TUPLE1:
                    stack[-1] = (stack[-1],)
                elif op == EMPTY_TUPLE:
                    append(())
                elif op == BINPERSID:
                    try:
                        stack[-1] = self.persistent(stack[-1])
                    except Unsupported as e:
                        unsupported.append(str(e))
                        stack[-1] = Opaque(str(e))
                elif op == NEWFALSE:
                    append(False)
                elif op == TUPLE2:
                    b = stack.pop()
                    stack[-1] = (stack[-1], b)
                elif op == BINPUT:
                    memo[data[pos]] = stack[-1]
                    pos += 1
                elif op == LONG_BINGET:
                    append(memo[_U32(data, pos)[0]])
                    pos += 4
                elif op == SETITEMS:
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    target = stack[-1]
                    if type(target) is dict or type(target) is OrderedDict:
                        if len(items) % 2:
                            raise Malformed("SETITEMS with an odd number of items")
                        keys = items[::2]
                        check_keys(keys, self._key_heights)
                        target.update(zip(keys, items[1::2]))
                    elif type(target) is OpaqueObject:
                        if len(items) % 2:
                            raise Malformed("SETITEMS with an odd number of items")
                        target.dictitems += zip(items[::2], items[1::2])
                    elif type(target) is not Opaque:
                        raise Malformed(f"SETITEMS on a {type(target).__name__}")
                elif op == NEWTRUE:
                    append(True)
                elif op == NONE:
                    append(None)
                elif op == BININT2:
                    append(_U16(data, pos)[0])
                    pos += 2
                elif op == BININT:
                    append(_I32(data, pos)[0])
                    pos += 4
                elif op == LONG1:
                    n = data[pos]
                    if pos + 1 + n > end:
                        raise PickleTruncated("")
                    append(int.from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True))
                    pos += 1 + n
                elif op == BINFLOAT:
                    append(_F64(data, pos)[0])
                    pos += 8
                elif op == TUPLE3:
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif op == EMPTY_DICT:
                    append({})
                elif op == EMPTY_LIST:
                    append([])
                elif op == APPENDS:
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    target = stack[-1]
                    if type(target) is list:
                        target.extend(items)
                    elif type(target) is OpaqueObject:
                        target.listitems += items
                    elif type(target) is not Opaque:
                        raise Malformed(f"APPENDS on a {type(target).__name__}")
                elif op == APPEND:
                    item = stack.pop()
                    target = stack[-1]
                    if type(target) is list:
                        target.append(item)
                    elif type(target) is OpaqueObject:
                        target.listitems.append(item)
                    elif type(target) is not Opaque:
                        raise Malformed(f"APPEND on a {type(target).__name__}")
                elif op == SETITEM:
                    value = stack.pop()
                    key = stack.pop()
                    target = stack[-1]
                    if type(target) is dict or type(target) is OrderedDict:
                        if type(key) is tuple or type(key) is int:
                            check_keys((key,), self._key_heights)
                        target[key] = value
                    elif type(target) is OpaqueObject:
                        target.dictitems.append((key, value))
                    elif type(target) is not Opaque:
                        raise Malformed(f"SETITEM on a {type(target).__name__}")
                elif op == GLOBAL:
                    nl1 = data.index(b"\n", pos)
                    nl2 = data.index(b"\n", nl1 + 1)
                    append(self.find_global(data[pos:nl1], data[nl1 + 1 : nl2]))
                    pos = nl2 + 1
                elif op == BUILD:
                    state = stack.pop()
                    try:
                        self.build(stack[-1], state)
                    except Unsupported as e:
                        unsupported.append(str(e))
                elif op == NEWOBJ:
                    args = stack.pop()
                    try:
                        stack[-1] = self.newobj(stack[-1], args)
                    except Unsupported as e:
                        unsupported.append(str(e))
                        stack[-1] = Opaque(str(e))
                elif op == SHORT_BINSTRING:  # torch.load decodes it as UTF-8
                    n = data[pos]
                    if pos + 1 + n > end:
                        raise PickleTruncated("")
                    append(str(data[pos + 1 : pos + 1 + n], "utf-8"))
                    pos += 1 + n
                elif op == EMPTY_SET:
                    append(set())
                elif op == PROTO:
                    if data[pos] > 5:
                        raise Malformed(f"pickle protocol {data[pos]} does not exist")
                    pos += 1
                elif op == STOP:
                    return stack.pop(), pos
                elif op == PROTO4_FRAME and proto4:  # a framing hint: the frame's opcodes follow inline
                    pos += 8
                elif op == PROTO4_SHORT_BINUNICODE and proto4:
                    n = data[pos]
                    if pos + 1 + n > end:
                        raise PickleTruncated("")
                    append(str(data[pos + 1 : pos + 1 + n], "utf-8", "surrogatepass"))
                    pos += 1 + n
                elif op == PROTO4_MEMOIZE and proto4:
                    memo[len(memo)] = stack[-1]
                elif op == PROTO4_STACK_GLOBAL and proto4:
                    name = stack.pop()
                    module = stack.pop()
                    if type(module) is not str or type(name) is not str:
                        raise Malformed("STACK_GLOBAL on values that are not strings")
                    append(
                        self.find_global(module.encode("utf-8", "surrogatepass"), name.encode("utf-8", "surrogatepass"))
                    )
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
    opaque: bool = False,
    extension: Mapping[str, ExtensionClass] | None = None,
) -> tuple[Any, int]:
    """Run the restricted VM over the pickle at `data[start:]`; return (object, end offset).

    `persistent_load(pid)` turns a `('storage', StorageClass, key, location, numel, ...)` tuple
    into a StorageMeta. Errors name `path` and `where` (e.g. "data.pkl"). Raises
    UnsafeCheckpointError (all refused globals), EngineUnsupported, PickleTruncated (the data
    ended early; with `complete=False` even when refused globals were seen, so that the caller
    can read more and retry), RestrictedPickleError (an opcode or construct the VM refuses, as
    weights_only does) or BadCheckpointError (storages that do not match the records).
    `max_containers` bounds the number of container-making opcodes (see `container_budget`).
    With `opaque`, globals outside the allowlists that build no tensor become opaque entries
    (see the module docstring) instead of refusals. `extension` maps further global names to
    classes the caller models (see ExtensionClass).
    """
    machine = _Machine(persistent_load, allow_globals, max_containers, opaque, extension)
    try:
        obj, end = machine.run(data, start)
        if machine.opaque_names:
            machine.unsafe |= opaque_refusals(obj)
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
        refused = machine.unsafe | refused_globals(scan_globals(data, start), allow_globals | machine.extension.keys())
        if refused:
            raise UnsafeCheckpointError(path, refused) from None
        if isinstance(e, _StorageMalformed):
            raise BadCheckpointError(f"{path}: {where}: {e}") from None
        raise RestrictedPickleError(f"{path}: {where}: {e}") from None
    except Unsupported as e:
        machine.unsupported.append(str(e))
    except BadCheckpointError as e:  # from persistent_load
        refused = machine.unsafe | refused_globals(scan_globals(data, start), allow_globals | machine.extension.keys())
        if refused:
            raise UnsafeCheckpointError(path, refused) from None
        raise e
    if machine.unsafe:
        raise UnsafeCheckpointError(path, machine.unsafe)
    if machine.unsupported:
        if machine.opaque_names:  # torch, which would read the rest, refuses these names
            raise UnsafeCheckpointError(path, machine.opaque_names)
        raise EngineUnsupported(f"{path}: {where}: not modelled: {machine.unsupported[0]}")
    return obj, end
