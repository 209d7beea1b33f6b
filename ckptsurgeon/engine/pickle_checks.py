"""The checks the restricted unpickler (:mod:`.unpickle`) applies beyond running opcodes.

What they refuse is raised as :class:`Malformed` (corrupt or hostile: torch may load it anyway)
or :class:`Unsupported` (valid for torch, not modelled here). Here are the limits on containers
(:data:`MAX_DEPTH`, :func:`container_budget`), the dict key / set member checks that keep hashing
from crashing or crawling, :func:`check_graph` over the finished object graph, and
:func:`resolve_storage_id` for the storage persistent ids the format readers receive.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from .limits import brief
from .meta import DTYPE_ITEMSIZE, StorageMeta, TensorMeta, TorchDevice, TorchDtype, TorchSize
from .pickle_globals import ModelledCallable, Opaque, OpaqueObject, PickledGlobal, StorageClass

MAX_DEPTH = 1000  # deepest container nesting accepted in the object graph


class Unsupported(Exception):
    """Raised by a handler or `persistent_load`: valid for torch, not modelled here."""


class Malformed(Exception):
    """Raised by a handler or `persistent_load`: corrupt or hostile (torch may load it anyway)."""


class ExtensionClass:
    """A global that a caller of `unpickle` models itself (`extension=`, e.g. the records of
    DCP's `.metadata`): never imported. REDUCE calls `call(args)`, NEWOBJ calls `new(args)`;
    each returns plain data or an :class:`ExtensionValue`. Raise Malformed / Unsupported."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def call(self, args: tuple[Any, ...]) -> Any:
        raise Unsupported(f"{self.name}(...)")

    def new(self, args: tuple[Any, ...]) -> Any:
        raise Unsupported(f"NEWOBJ of {self.name}")

    def __repr__(self) -> str:
        return f"<extension {self.name}>"


class ExtensionValue:
    """A value an :class:`ExtensionClass` built: BUILD calls `build(state)`, and the graph check
    walks `children()` as it walks a container's items."""

    __slots__ = ()

    def build(self, state: Any) -> None:
        raise Unsupported(f"BUILD on a {type(self).__name__}")

    def children(self) -> list[Any]:
        return []


def is_int(x: Any) -> bool:
    return type(x) is int


def container_budget(num_storages: int) -> int:
    """How many containers a pickle holding `num_storages` storages may make.

    A tensor costs about six (size, stride and argument tuples, the persistent id, the hooks
    OrderedDict) and an optimizer state a few more; 200,000 covers any plausible rest.
    """
    return 200_000 + 64 * num_storages


def check_keys(keys: Any, verified: dict[int, tuple[tuple[Any, ...], int]]) -> None:
    """Refuse dict keys / set members that are tuples nested deeper than MAX_DEPTH: hashing
    one recurses in C and can crash the interpreter (torch's loader included).

    `verified` maps the id of each tuple key checked before (kept alive there, so that its id
    stays unique) to (the key, its height): one VM run passes the same dict each time.
    """
    for key in keys:
        if type(key) is int:
            check_key_int(key)
        if type(key) is not tuple or id(key) in verified:
            continue
        height = 1
        todo = [(key, 1)]
        while todo:
            item, depth = todo.pop()
            for part in item:
                if type(part) is int:
                    check_key_int(part)
                if type(part) is tuple:
                    known = verified.get(id(part))
                    reach = depth + (known[1] if known else 1)
                    if reach > MAX_DEPTH:
                        raise Malformed(f"a dict key or set member nested more than {MAX_DEPTH} deep")
                    height = max(height, reach)
                    if known is None:
                        todo.append((part, depth + 1))
        verified[id(key)] = (key, height)  # the key is kept alive, so its id stays unique


def check_key_int(key: int) -> None:
    """Refuse an int dict key or set member wider than 64 bits: CPython hashes ints modulo
    2**61 - 1, so `k * (2**61 - 1)` all hash alike and a dict of them takes quadratic time."""
    if not -(1 << 63) <= key < (1 << 64):
        raise Malformed("a dict key or set member that is an integer wider than 64 bits")


# -- after the run ---------------------------------------------------------------------------

_LEAVES = (str, int, float, bool, bytes, type(None), TensorMeta, TorchDtype, TorchDevice, TorchSize, PickledGlobal)
_CONTAINERS = (dict, OrderedDict, list, tuple, set, OpaqueObject)


def _is_node(x: Any) -> bool:
    return type(x) in _CONTAINERS or isinstance(x, ExtensionValue)


def _children(node: Any) -> list[Any]:
    if isinstance(node, ExtensionValue):
        return node.children()
    kind = type(node)
    if kind is dict:
        return [*node.keys(), *node.values()]
    if kind is OrderedDict:
        return [*node.keys(), *node.values(), *node.__dict__.values()]
    if kind is OpaqueObject:
        return node.children()  # type: ignore[no-any-return]
    return list(node)


def _walk(root: Any) -> list[Any]:
    """Every container of the graph at `root` (itself included) once, each after its children
    (except along a cycle)."""
    out: list[Any] = []
    seen: set[int] = set()
    todo: list[tuple[Any, bool]] = [(root, False)]
    while todo:
        node, finished = todo.pop()
        if finished:
            out.append(node)
            continue
        if type(node) not in _CONTAINERS or id(node) in seen:
            continue
        seen.add(id(node))
        todo.append((node, True))
        todo += ((c, False) for c in _children(node) if type(c) in _CONTAINERS and id(c) not in seen)
    return out


def opaque_globals(root: Any) -> set[str]:
    """The names of the opaque globals (:class:`PickledGlobal`) in the graph at `root`."""
    if type(root) is PickledGlobal:
        return {root.full}
    return {c.full for node in _walk(root) for c in _children(node) if type(c) is PickledGlobal}


_BEARS_ON_TENSORS = (TensorMeta, StorageMeta, StorageClass)


def opaque_refusals(root: Any) -> set[str]:
    """The opaque globals to refuse after all: those inside an :class:`OpaqueObject` that holds
    a tensor, a storage or a storage class somewhere below it (a module, a tensor subclass, a
    state built around a tensor): reading such an object would need running its code."""
    nodes = _walk(root)
    holds: dict[int, bool] = {}
    for node in nodes:  # children first (a cycle's back edge counts as holding nothing)
        holds[id(node)] = any(type(c) in _BEARS_ON_TENSORS or holds.get(id(c), False) for c in _children(node))
    refused: set[str] = set()
    for node in nodes:
        if type(node) is OpaqueObject and holds[id(node)]:
            refused |= opaque_globals(node)
    return refused


def check_graph(root: Any, max_nodes: int) -> None:
    """Refuse graphs that are cyclic, nested deeper than MAX_DEPTH, that expand (counting shared
    references once per use) to more than `max_nodes` nodes, or that hold values outside the model.
    A cycle back to an opaque object (OmegaConf's nodes point to their parent) is no refusal: the
    reference back counts as one node.

    Raises Malformed / Unsupported.
    """
    if not _is_node(root):
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
                if _is_node(child):
                    known = done.get(id(child))
                    if known is None:  # a reference back to an opaque object on the path
                        size += 1
                        continue
                    cd, cs = known
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
        if nid in done or (nid in on_path and type(node) is OpaqueObject):
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
            if _is_node(child):
                cid = id(child)
                if cid in on_path and type(child) is not OpaqueObject:
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
    if kind is StorageClass or kind is ModelledCallable:
        raise Unsupported(f"the global {brief(value)} as a value")
    raise Unsupported(f"a value of type {kind.__name__}")


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
