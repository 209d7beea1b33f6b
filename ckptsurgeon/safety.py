"""Which pickle globals a user may allow with `--allow-global` (never code-running ones)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import UsageError

# Modules whose globals can run code or reach the file system, and builtins that do.
DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pickle", "_pickle",
    "pkgutil", "builtins", "__builtin__", "socket", "ctypes", "code", "codeop", "pty", "commands",
    "multiprocessing", "webbrowser", "marshal", "types", "functools", "operator", "io", "_io",
    "timeit", "pdb", "bdb", "trace", "profile", "cProfile", "threading", "asyncio", "signal",
    "torch.storage", "torch.serialization", "torch.jit", "torch._C", "torch.ops", "torch.hub",
    "torch.utils", "torch.package", "torch._dynamo", "torch.fx", "torch.compiler",
)
DANGEROUS_NAMES = frozenset({"eval", "exec", "compile", "getattr", "setattr", "__import__", "open", "apply", "_load_from_bytes"})


def check_allowed_global(name: str) -> None:
    """Raise UsageError when `name` (MODULE.NAME) may not be allowed by --allow-global.

    This is the check on the name; `check_allowed_target` checks what it resolves to (a class,
    never a function: functions like `timeit.timeit` run code by design).
    """
    module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise UsageError(f"--allow-global {name!r}: expected MODULE.NAME, e.g. argparse.Namespace")
    for bad in DANGEROUS_MODULES:
        if module == bad or module.startswith(bad + "."):
            raise UsageError(f"--allow-global {name}: refused: globals of {bad} can execute code; use --unsafe for a trusted file")
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
    import importlib

    out = []
    for name in sorted(set(names)):
        check_allowed_global(name)
        module, _, attr = name.rpartition(".")
        try:
            target: Any = importlib.import_module(module)
            for part in attr.split("."):
                target = getattr(target, part)
        except Exception:
            raise UsageError(f"--allow-global {name}: cannot import it") from None
        check_allowed_target(name, target)
        out.append(target)
    return out


def check_allowed_target(name: str, target: object) -> None:
    """Only classes may be allowed: a function (or any other callable) named in a pickle is called."""
    if not isinstance(target, type):
        raise UsageError(
            f"--allow-global {name}: refused: it is a {type(target).__name__}, not a class; "
            "only data classes (e.g. argparse.Namespace) can be allowed, use --unsafe for a trusted file"
        )
