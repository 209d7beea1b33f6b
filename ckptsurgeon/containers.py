"""Finding the state_dict inside a checkpoint container.

A checkpoint is a bare state_dict, or a container such as `{'epoch': 5, 'model_state_dict': ...,
'optimizer_state_dict': ...}`. These functions work on any object graph whose tensors are torch
tensors or engine TensorMeta leaves; they never import torch.

An opaque entry is a value the engine read without building it: an object the file makes by
calling a global outside the allowlist (`argparse.Namespace`, an OmegaConf `DictConfig`, a
dataclass, DeepSpeed's `ZeroStageEnum`), with no tensor in it and used by no tensor (see
ckptsurgeon.engine.unpickle). Nothing in it is imported or run; writers pickle it again as it was.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

from .engine.pickle_checks import opaque_globals
from .engine.pickle_globals import OpaqueObject, PickledGlobal
from .errors import ContainerError, UnsafeCheckpointError
from .tensors import is_tensor

STATE_DICT_NAMES = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
)

KeyPath = tuple[Any, ...]

EXTRA_STATE = "_extra_state"  # torch's key for what a module's get_extra_state returns


def is_extra_state_key(key: Any) -> bool:
    """`<module>._extra_state`, or `_extra_state` itself (the top module): torch's get_extra_state key."""
    return isinstance(key, str) and (key == EXTRA_STATE or key.endswith("." + EXTRA_STATE))


def is_tensor_mapping(obj: Any) -> bool:
    """A non-empty mapping with string keys whose values are all tensors, except that extra state
    entries (see `is_extra_state_key`) may hold any value; at least one value is a tensor."""
    if not isinstance(obj, Mapping) or len(obj) == 0:
        return False
    tensors = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if is_tensor(v):
            tensors += 1
        elif not is_extra_state_key(k):
            return False
    return tensors > 0


def _extra_state_only(obj: Any) -> bool:
    """A non-empty mapping of extra state entries only (a state_dict of a model without tensors)."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(is_extra_state_key(k) for k in obj)


def non_tensor_keys(state_dict: Mapping[str, Any]) -> list[str]:
    """The keys of a state_dict whose values are not tensors (extra state), in order."""
    return [k for k, v in state_dict.items() if not is_tensor(v)]


def quote_key(key: str) -> str:
    """A key as lines and tables show it: quoted as repr quotes it when it is empty, has leading or
    trailing whitespace or starts with a quote (so `''`, `' x'` and `x` differ); else as it is."""
    return repr(key) if not key or key[0] in "'\"" or key != key.strip() else key


def format_key_path(path: KeyPath) -> str:
    return ".".join(str(p) for p in path)


def _tensor_mappings(obj: Any, path: KeyPath, out: list[KeyPath], depth: int = 0) -> None:
    if depth > 50:
        return
    if isinstance(obj, Mapping):
        if is_tensor_mapping(obj):
            out.append(path)
            return
        for k, v in obj.items():
            _tensor_mappings(v, path + (k,), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensor_mappings(v, path + (i,), out, depth + 1)


def resolve_key_path(obj: Any, dotted: str) -> KeyPath:
    """Follow a dotted `--key` path; a key that itself contains dots is matched whole first."""
    parts = dotted.split(".")
    path: list[Any] = []
    node = obj
    i = 0
    while i < len(parts):
        step: str | int | None = None
        for j in range(len(parts), i, -1):
            candidate = ".".join(parts[i:j])
            if isinstance(node, Mapping) and candidate in node:
                step, i = candidate, j
                break
            if isinstance(node, (list, tuple)) and j == i + 1 and candidate.isdigit():
                if int(candidate) < len(node):
                    step, i = int(candidate), j
                break
        if step is None:
            where = format_key_path(tuple(path)) or "the top level"
            options = [str(k) for k in node] if isinstance(node, Mapping) else []
            hint = f" (keys there: {', '.join(sorted(options)[:10])})" if options else ""
            raise ContainerError(f"--key {dotted!r}: no entry {parts[i]!r} at {where}{hint}")
        path.append(step)
        node = node[step]
    return tuple(path)


def get_path(obj: Any, path: KeyPath) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def find_state_dict(obj: Any, key: str | None = None) -> tuple[KeyPath | None, Mapping[str, Any]]:
    """Locate the state_dict in `obj`: returns (path to it or None for the top level, the mapping).

    Rules: `key` (a dotted path) if given; else the top level if all its values are tensors (extra
    state entries, `<module>._extra_state`, may hold anything: see `is_tensor_mapping`); else
    the first of STATE_DICT_NAMES whose value is a mapping of tensors; else the single nested
    mapping of tensors. Ambiguity or nothing found raises ContainerError listing the candidates.
    """
    if key is not None:
        path = resolve_key_path(obj, key)
        found = get_path(obj, path)
        if not (
            isinstance(found, Mapping) and (len(found) == 0 or is_tensor_mapping(found) or _extra_state_only(found))
        ):
            raise ContainerError(f"--key {key!r} does not name a mapping of tensors")
        return (path or None), found
    if isinstance(obj, Mapping) and (len(obj) == 0 or is_tensor_mapping(obj)):
        return None, obj
    if isinstance(obj, Mapping):
        for name in STATE_DICT_NAMES:
            if name in obj and is_tensor_mapping(obj[name]):
                return (name,), obj[name]
    candidates: list[KeyPath] = []
    _tensor_mappings(obj, (), candidates)
    if len(candidates) == 1:
        return candidates[0], get_path(obj, candidates[0])
    if not candidates:
        raise ContainerError(
            f"no state_dict found: no mapping of tensors in a {type(obj).__name__}"
            + (f" with entries {', '.join(map(str, list(obj)[:10]))}" if isinstance(obj, Mapping) else "")
        )
    names = ", ".join(format_key_path(c) for c in candidates[:10])
    raise ContainerError(f"ambiguous container: several mappings of tensors ({names}); pick one with --key")


def replace_at(obj: Any, path: KeyPath | None, value: Any) -> Any:
    """A copy of the container with the entry at `path` replaced (the other entries shared)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    new_child = replace_at(obj[head], rest, value)
    if isinstance(obj, Mapping):
        copy: Any = obj.__class__(obj)  # type: ignore[call-arg]  # dict, OrderedDict: rebuilt from a mapping
        if hasattr(obj, "__dict__"):
            copy.__dict__.update(obj.__dict__)  # keeps an OrderedDict's _metadata
        copy[head] = new_child
        return copy
    items = list(obj)
    items[head] = new_child
    return type(obj)(items) if isinstance(obj, list) else tuple(items)


class OpaqueEntry(NamedTuple):
    """An opaque value (see the module docstring) at `path` of a container, and the globals
    outside the allowlist it names (sorted)."""

    path: str
    globals: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "globals": list(self.globals)}


def is_opaque(value: Any) -> bool:
    return type(value) is OpaqueObject or type(value) is PickledGlobal


def opaque_entries(obj: Any) -> list[OpaqueEntry]:
    """The opaque values of a container, outermost only, in container order, each with its path."""
    out: list[OpaqueEntry] = []
    seen: set[int] = set()
    todo: list[tuple[Any, KeyPath]] = [(obj, ())]
    while todo:
        node, path = todo.pop()
        if is_opaque(node):
            out.append(OpaqueEntry(format_key_path(path), tuple(sorted(opaque_globals(node)))))
            continue
        if id(node) in seen or len(path) > 50:
            continue
        if isinstance(node, Mapping) and not is_tensor(node):
            seen.add(id(node))
            todo += reversed([(v, path + (k,)) for k, v in node.items() if not is_tensor(v)])
        elif isinstance(node, (list, tuple)):
            seen.add(id(node))
            todo += reversed([(v, path + (i,)) for i, v in enumerate(node)])
    return out


def refuse_opaque_entries(path: str, obj: Any) -> None:
    """For a container in which no state_dict is found: raise UnsafeCheckpointError naming every
    opaque global of `obj` when a mapping in it holds tensors beside a value with an opaque part
    (a state_dict the opaque value keeps from being one: it is not a container entry then)."""
    todo: list[tuple[Any, int]] = [(obj, 0)]
    seen: set[int] = set()
    while todo:
        node, depth = todo.pop()
        if id(node) in seen or depth > 50 or is_opaque(node) or is_tensor(node):
            continue
        seen.add(id(node))
        if isinstance(node, Mapping):
            values = list(node.values())
            if any(is_tensor(v) for v in values) and any(opaque_globals(v) for v in values if not is_tensor(v)):
                raise UnsafeCheckpointError(path, opaque_globals(obj))
            todo += ((v, depth + 1) for v in values)
        elif isinstance(node, (list, tuple)):
            todo += ((v, depth + 1) for v in node)


def _not_loaded(value: Any) -> str:
    n = len(opaque_entries(value))
    return f", {n} not loaded" if n else ""


def describe_value(value: Any) -> str:
    """A short description of a non-state_dict container entry (e.g. `5`, `dict (2 entries)`,
    `argparse.Namespace (not loaded)`)."""
    if is_opaque(value):
        return f"{value.full} (not loaded)"
    dcp = sys.modules.get("ckptsurgeon.engine.dcp")  # not loaded: no DCP value can be here
    if dcp is not None and isinstance(value, dcp.NotRead):  # inspect reads a DCP .metadata only
        return "a value in the .distcp files (not read)"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."
    if is_tensor(value):
        return "tensor"
    if isinstance(value, (bytes, bytearray)):
        return f"{type(value).__name__} ({len(value)} bytes)"
    if isinstance(value, io.BytesIO):  # Transformer Engine's extra state (read only with --unsafe)
        return f"BytesIO ({len(value.getbuffer())} bytes)"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} ({len(value)} entries{_not_loaded(value)})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} ({len(value)} items{_not_loaded(value)})"
    return type(value).__name__
