"""Key patterns: which state_dict keys an `--include` / `--exclude` selects.

A pattern with `*`, `?` or `[` is a glob over the whole key (`*` crosses dots). Any other pattern
matches that exact key or a module prefix: `conv1` selects `conv1.weight`, never `conv10.weight`.
With `regex=True` patterns are Python regular expressions searched anywhere in the key.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence

from .errors import SelectionError

Matcher = Callable[[str], bool]

_GLOB_CHARS = frozenset("*?[")


def compile_pattern(pattern: str, *, regex: bool = False) -> Matcher:
    """Turn one pattern into a predicate over keys (see the module docstring for the rules)."""
    if regex:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise SelectionError(f"invalid regular expression {pattern!r}: {exc}") from None
        return lambda key: compiled.search(key) is not None
    if not pattern:
        raise SelectionError("empty pattern")
    if _GLOB_CHARS.intersection(pattern):
        glob = re.compile(fnmatch.translate(pattern))
        return lambda key: glob.match(key) is not None
    if pattern.endswith("."):
        return lambda key: key.startswith(pattern)
    prefix = pattern + "."
    return lambda key: key == pattern or key.startswith(prefix)


def compile_selection(include: Sequence[str] = (), exclude: Sequence[str] = (), *, regex: bool = False) -> Matcher:
    """One predicate: matches any include (or there is none) and no exclude."""
    includes = [compile_pattern(p, regex=regex) for p in include]
    excludes = [compile_pattern(p, regex=regex) for p in exclude]

    def selected(key: str) -> bool:
        if includes and not any(m(key) for m in includes):
            return False
        return not any(m(key) for m in excludes)

    return selected


def select_keys(
    keys: Iterable[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    *,
    regex: bool = False,
) -> list[str]:
    """The keys selected by the patterns, in their original order."""
    selected = compile_selection(include, exclude, regex=regex)
    return [k for k in keys if selected(k)]


def unmatched_includes(keys: Iterable[str], include: Sequence[str], *, regex: bool = False) -> list[str]:
    """Include patterns that match no key at all (a likely typo worth a warning)."""
    keys = list(keys)
    out = []
    for p in include:
        m = compile_pattern(p, regex=regex)
        if not any(m(k) for k in keys):
            out.append(p)
    return out
