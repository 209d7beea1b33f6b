"""Which pickle globals a user may allow with `--allow-global`, and how they are built.

An allowed class is never called with arguments from the file: torch's weights_only unpickler gets
a stand-in (`torch_allowlist`) that makes the instance with `object.__new__(cls)` (a namedtuple:
`tuple.__new__(cls, fields)`; an Enum: the existing member with that value) and leaves BUILD only
plain attribute state to put into its `__dict__`. Classes that could still run code on the file's
data, or that reach the system, are refused before anything is read (`check_allowed_target`).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

# shared with the VM, which never reads a global of these as an opaque entry
from .engine.pickle_globals import DANGEROUS_MODULES as DANGEROUS_MODULES
from .engine.pickle_globals import DANGEROUS_NAMES, denied_module
from .errors import BadCheckpointError, UsageError

# Pure data classes of refused modules (a C type, built by its own argument-free constructor).
_PURE_BUILTIN_CLASSES = {"types.SimpleNamespace": types.SimpleNamespace}


def check_allowed_global(name: str) -> None:
    """Raise UsageError when `name` (MODULE.NAME) may not be allowed by --allow-global.

    This is the check on the name; `check_allowed_target` checks what it resolves to (a class,
    never a function: functions like `timeit.timeit` run code by design).
    """
    module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise UsageError(f"--allow-global {name!r}: expected MODULE.NAME, e.g. argparse.Namespace")
    if name in _PURE_BUILTIN_CLASSES:
        return
    bad = denied_module(module)
    if bad:
        raise UsageError(
            f"--allow-global {name}: refused: globals of {bad} can execute code or reach the system; "
            "use --unsafe for a trusted file"
        )
    if attr in DANGEROUS_NAMES or attr.split(".")[-1] in DANGEROUS_NAMES:
        raise UsageError(f"--allow-global {name}: refused: {attr} can execute code; use --unsafe for a trusted file")


MIN_TORCH = (2, 10)
TORCH_CVES = "CVE-2025-32434 before 2.6, CVE-2026-24747 before 2.10"


def parse_version(text: str) -> tuple[int, ...]:
    """`2.13.0+cpu` -> (2, 13, 0); stops at the first part that is not a number."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def installed_torch_version() -> str:
    """torch's version without importing torch (~2 s): read from its version.py."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("torch is not installed; install torch>=2.10 (e.g. pip install torch==2.13.0)")
    for location in spec.submodule_search_locations:
        try:
            with open(f"{location}/version.py", encoding="utf-8") as f:
                found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
        except OSError:
            continue
        if found:
            return found.group(1)
    from importlib import metadata  # an unusual layout: ask the package metadata

    return metadata.version("torch")


def check_torch_version(version: str | None = None) -> None:
    """Refuse a torch with known weights_only bypasses."""
    if version is None:
        version = installed_torch_version()
    if parse_version(version)[:2] < MIN_TORCH:
        raise UsageError(
            f"torch {version} is refused: releases before 2.10 have known weights_only bypasses "
            f"({TORCH_CVES}); upgrade torch"
        )


def resolve_allowed_globals(names: Iterable[str]) -> list[type]:
    """The classes `--allow-global` names, each checked by name first, then by what it is."""
    out = []
    for name in sorted(set(names)):
        target = _resolve(name)
        check_allowed_target(name, target)
        out.append(target)
    return out


def check_allowed_target(name: str, target: object) -> str:
    """Refuse what `--allow-global name` resolved to unless instances can be built without code.

    Only classes may be allowed (a function named in a pickle is called). A class is refused when
    it or a base comes from a refused module (a subclass of `logging.FileHandler` is one), when a
    base is a C type other than `object` (its constructor and destructor are out of sight), or when
    a class of its MRO defines a method that unpickling, hashing, freeing or re-saving the object
    would run on the file's data (`__setstate__`, `__del__`, `__getattr__`, `__reduce__`, ...,
    a property setter), other than the pure ones dataclasses, namedtuple and argparse.Namespace
    write. Returns how instances are built: "object", "namedtuple", "enum" or "namespace".
    """

    def refuse(why: str) -> UsageError:
        return UsageError(
            f"--allow-global {name}: refused: {why}; only plain data classes (e.g. argparse.Namespace, "
            "dataclasses) can be allowed, use --unsafe for a trusted file"
        )

    if not isinstance(target, type):
        raise refuse(f"it is a {type(target).__name__}, not a class")
    if _PURE_BUILTIN_CLASSES.get(name) is target:
        return "namespace"
    for klass in target.__mro__:
        module = getattr(klass, "__module__", None) or ""
        if module != "builtins" and denied_module(module):
            raise refuse(
                f"{_qualified(klass)} belongs to {denied_module(module)}, which can execute code or reach the system"
            )
    import enum

    if issubclass(target, enum.Enum):
        return "enum"  # members are looked up, never made
    kind = "namedtuple" if issubclass(target, tuple) and "_fields" in _all_attrs(target) else "object"
    for klass in target.__mro__:
        if klass is object or (kind == "namedtuple" and klass is tuple):
            continue
        if not klass.__flags__ & _HEAPTYPE:
            raise refuse(f"its base {_qualified(klass)} is a C type, whose construction cannot be checked")
        for attr, value in vars(klass).items():
            if attr in _HOOKS and not _pure_hook(klass, attr, value, kind):
                raise refuse(f"{_qualified(klass)} defines {attr}, which would run on data from the file")
            if attr == "__init__" and not isinstance(value, types.FunctionType):
                raise refuse(f"{_qualified(klass)} has a C constructor")
            if kind == "object" and _runs_code_when_set(value):  # BUILD's slot state setattr()s
                raise refuse(f"{_qualified(klass)}.{attr} runs code when it is set")
    return kind


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement (or type())
# Methods unpickling (BUILD, hashing dict keys, hasattr), freeing or re-saving an instance runs.
_HOOKS = frozenset(
    {
        "__new__",
        "__setstate__",
        "__getstate__",
        "__reduce__",
        "__reduce_ex__",
        "__getnewargs__",
        "__getnewargs_ex__",
        "__setattr__",
        "__delattr__",
        "__getattr__",
        "__getattribute__",
        "__del__",
        "__eq__",
        "__hash__",
    }
)
_DATACLASS_HOOKS = frozenset({"__eq__", "__hash__", "__setattr__", "__delattr__", "__getstate__", "__setstate__"})


def _qualified(klass: type) -> str:
    return f"{klass.__module__}.{klass.__qualname__}"


def _all_attrs(klass: type) -> set[str]:
    return {a for k in klass.__mro__ for a in vars(k)}


def _runs_code_when_set(value: object) -> bool:
    if isinstance(value, property):
        return value.fset is not None
    if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):  # slots, __dict__
        return False
    return hasattr(type(value), "__set__")


def _pure_hook(klass: type, attr: str, value: Any, kind: str) -> bool:
    """Whether a hook method is one of the generated, pure ones (or None, e.g. `__hash__ = None`)."""
    if value is None:
        return True
    func = getattr(value, "__func__", value)
    if not isinstance(func, types.FunctionType):
        return False
    if "__dataclass_fields__" in vars(klass) and attr in _DATACLASS_HOOKS:
        return func.__code__.co_filename.startswith("<") or func.__module__ == "dataclasses"
    if kind == "namedtuple" and "_fields" in vars(klass):
        if attr == "__new__":
            return func.__module__ == f"namedtuple_{klass.__name__}"
        return attr == "__getnewargs__" and func.__module__ == "collections"
    return (klass.__module__, klass.__qualname__, attr) == ("argparse", "Namespace", "__eq__")


def torch_allowlist(names: Iterable[str]) -> list[tuple[Any, str]]:
    """What to hand `torch.serialization.safe_globals` for the classes `--allow-global` names.

    Each class is named (as the pickle names it) by a stand-in whose `__new__` both NEWOBJ and
    REDUCE reach: it refuses arguments and makes the instance itself (see the module docstring).
    The class itself is listed under a name no GLOBAL opcode can produce (it holds a newline), so
    that torch's BUILD accepts its instances while the file can never call it.
    """
    out: list[tuple[Any, str]] = []
    for name in sorted(set(names)):
        cls = _resolve(name)
        kind = check_allowed_target(name, cls)
        pickled_name = f"{cls.__module__}.{cls.__qualname__}"
        out.append((_stand_in(cls, kind, pickled_name), pickled_name))
        if kind in ("object", "namespace"):
            out.append((cls, f"ckptsurgeon\nBUILD only\n{pickled_name}"))
    return out


def _stand_in(cls: type, kind: str, name: str) -> type:
    def refuse(args: tuple[Any, ...], why: str) -> BadCheckpointError:
        shown = ", ".join(_brief(a) for a in args[:4]) + (", ..." if len(args) > 4 else "")
        return BadCheckpointError(
            f"refused to build {name}({shown}): {why}; --allow-global builds objects from "
            "attribute state only, never by calling the class; use --unsafe for a trusted file"
        )

    def __new__(_stand_in: type, *args: Any) -> Any:
        if kind == "enum":
            member = _enum_member(cls, args)
            if member is None:
                raise refuse(args, "no member has this value")
            return member
        if kind == "namedtuple":
            if len(args) != len(cls._fields):  # type: ignore[attr-defined]
                raise refuse(args, f"it has {len(cls._fields)} fields")  # type: ignore[attr-defined]
            return tuple.__new__(cls, args)
        if args:
            raise refuse(args, "the file passes arguments to its constructor")
        return cls.__new__(cls) if kind == "namespace" else object.__new__(cls)  # type: ignore[call-overload]

    return type(f"{cls.__name__}StandIn", (), {"__new__": staticmethod(__new__), "__module__": __name__})


def _enum_member(cls: Any, args: tuple[Any, ...]) -> Any:
    if len(args) != 1:
        return None
    for member in cls.__members__.values():
        if type(member._value_) is type(args[0]) and member._value_ == args[0]:
            return member
    return None


def _brief(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bytes, bool, type(None))) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve(name: str) -> Any:
    import importlib

    check_allowed_global(name)
    module, _, attr = name.rpartition(".")
    try:
        target: Any = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception:
        raise UsageError(f"--allow-global {name}: cannot import it") from None
    return target
