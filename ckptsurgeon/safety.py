"""Which pickle globals a user may allow with `--allow-global` (never code-running ones)."""

from __future__ import annotations

from .errors import UsageError

# Modules whose globals can run code or reach the file system, and builtins that do.
DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "pickle", "_pickle",
    "pkgutil", "builtins", "__builtin__", "socket", "ctypes", "code", "codeop", "pty", "commands",
    "multiprocessing", "webbrowser", "marshal", "types", "functools", "operator", "io", "_io",
    "torch.storage", "torch.serialization", "torch.jit", "torch._C", "torch.ops", "torch.hub",
)
DANGEROUS_NAMES = frozenset({"eval", "exec", "compile", "getattr", "setattr", "__import__", "open", "apply", "_load_from_bytes"})


def check_allowed_global(name: str) -> None:
    """Raise UsageError when `name` (MODULE.NAME) may not be allowed by --allow-global."""
    module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise UsageError(f"--allow-global {name!r}: expected MODULE.NAME, e.g. argparse.Namespace")
    for bad in DANGEROUS_MODULES:
        if module == bad or module.startswith(bad + "."):
            raise UsageError(f"--allow-global {name}: refused: globals of {bad} can execute code; use --unsafe for a trusted file")
    if attr in DANGEROUS_NAMES or attr.split(".")[-1] in DANGEROUS_NAMES:
        raise UsageError(f"--allow-global {name}: refused: {attr} can execute code; use --unsafe for a trusted file")
