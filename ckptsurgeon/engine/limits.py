"""Bounds the readers apply to what a file says, and a safe way to quote a value from a file."""

from __future__ import annotations

import contextlib
import reprlib
import sys
from collections.abc import Iterator
from typing import Any

MAX_DIMS = 64  # dimensions of one tensor (real ones have a handful)
MAX_DIM_SIZE = 1 << 63  # one size, stride or offset: torch's int64


def numel_overflows(shape: Any) -> bool:
    """True when the product of a shape's non-zero sizes does not fit torch's int64: torch
    (`numel: integer multiplication overflow`) and safetensors refuse such a shape even when a
    zero size makes the tensor empty, e.g. [2**62, 2**62, 0]."""
    product = 1
    for n in shape:
        product *= max(n, 1)
    return product >= MAX_DIM_SIZE


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel = 2
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 4
_QUOTE.maxstring = _QUOTE.maxother = 40
_QUOTE.maxlong = 40


def brief(value: Any) -> str:
    """A short repr of a value read from a file, for error messages.

    Never a full `repr`: a few hundred pickle bytes can build lists that share themselves 60 levels
    deep, whose repr has 2**60 items.
    """
    return _QUOTE.repr(value)


def quote_name(name: str, limit: int = 200) -> str:
    """A name read from a file (a tensor name, a file name) for a message: its whole `repr` (escaped,
    one line), unless it is longer than `limit` characters: then cut, as `brief` cuts."""
    return repr(name) if len(name) <= limit else repr(name[: limit - 3]) + "..."


@contextlib.contextmanager
def recursion_room(depth: int, frames_per_level: int = 4) -> Iterator[None]:
    """Let recursive code (a pickler, a converter) walk a graph nested `depth` deep.

    The readers accept graphs nested up to pickle_checks.MAX_DEPTH (1,000); walking one takes a few
    Python frames per level, more than the default limit of 1,000 frames. The limit is raised
    for the duration only (Python frames cost no C stack since 3.11, and little before).
    """
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, old + depth * frames_per_level))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)
