"""Comparing two state_dicts: structure first, then values chunk by chunk.

Values are equal when `|a - b| <= atol + rtol * |b|` everywhere, NaNs in the same places count as
equal; with the defaults `rtol = atol = 0` that is exact equality. Memory stays bounded: values are
compared in fixed-size chunks (read with `pread` for engine TensorMeta tensors), bit-identical
chunks take a fast path and statistics are computed only where chunks differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine.meta import TensorMeta
from .tensors import dtype_name, shape_of

SCHEMA_VERSION = 1
CHUNK_BYTES = 16 << 20

Progress = Callable[[int], None]  # called with a number of bytes just processed


@dataclass(frozen=True)
class Mismatch:
    key: str
    a: Any
    b: Any

    def to_dict(self) -> dict[str, Any]:
        conv = (lambda v: list(v)) if isinstance(self.a, tuple) else (lambda v: v)
        return {"key": self.key, "a": conv(self.a), "b": conv(self.b)}


@dataclass(frozen=True)
class ValueMismatch:
    key: str
    max_abs_diff: float
    max_rel_diff: float
    num_different: int
    numel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "num_different": self.num_different,
            "numel": self.numel,
        }


def _json_float(x: float) -> float | None:
    """JSON has no inf/nan: they are written as null."""
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class DiffReport:
    """Everything `diff` found; `identical` is what its exit code reports."""

    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    shape_mismatches: tuple[Mismatch, ...]
    dtype_mismatches: tuple[Mismatch, ...]
    value_mismatches: tuple[ValueMismatch, ...]
    num_equal: int
    rtol: float = 0.0
    atol: float = 0.0

    @property
    def identical(self) -> bool:
        return not (
            self.only_in_a or self.only_in_b or self.shape_mismatches or self.dtype_mismatches or self.value_mismatches
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "identical": self.identical,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_mismatches": [m.to_dict() for m in self.shape_mismatches],
            "dtype_mismatches": [m.to_dict() for m in self.dtype_mismatches],
            "value_mismatches": [m.to_dict() for m in self.value_mismatches],
            "num_equal": self.num_equal,
            "rtol": self.rtol,
            "atol": self.atol,
        }


def diff_state_dicts(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    keys: Sequence[str] | None = None,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    progress: Progress | None = None,
) -> DiffReport:
    """Compare two state_dicts over `keys` (default: the union, A's order first).

    Shapes and dtypes are compared from metadata; values only where shapes agree (across dtypes
    too, after promotion, so a cast checkpoint can be checked with a tolerance). `progress` is
    called with the number of bytes of A compared so far, chunk by chunk.
    """
    if keys is None:
        keys = list(a) + [k for k in b if k not in a]
    only_a = tuple(k for k in keys if k in a and k not in b)
    only_b = tuple(k for k in keys if k in b and k not in a)
    shapes: list[Mismatch] = []
    dtypes: list[Mismatch] = []
    values: list[ValueMismatch] = []
    num_equal = 0
    for key in keys:
        if key not in a or key not in b:
            continue
        x, y = a[key], b[key]
        if shape_of(x) != shape_of(y):
            shapes.append(Mismatch(key, shape_of(x), shape_of(y)))
            continue
        same_dtype = dtype_name(x) == dtype_name(y)
        if not same_dtype:
            dtypes.append(Mismatch(key, dtype_name(x), dtype_name(y)))
        mismatch = compare_values(key, x, y, rtol=rtol, atol=atol, progress=progress)
        if mismatch is not None:
            values.append(mismatch)
        elif same_dtype:
            num_equal += 1
    return DiffReport(only_a, only_b, tuple(shapes), tuple(dtypes), tuple(values), num_equal, rtol, atol)


def compare_values(
    key: str, x: Any, y: Any, *, rtol: float = 0.0, atol: float = 0.0, progress: Progress | None = None
) -> ValueMismatch | None:
    """None when the values are equal under the tolerance, else the statistics of the difference."""
    numel = 0
    num_diff = 0
    max_abs = 0.0
    max_rel = 0.0
    for cx, cy in _chunk_pairs(x, y):
        numel += cx.numel()
        if progress is not None:
            progress(cx.numel() * cx.element_size())
        if dtype_name(x) == dtype_name(y) and _bitwise_equal(cx, cy):
            continue
        n, abs_d, rel_d = _chunk_stats(cx, cy, rtol, atol)
        num_diff += n
        max_abs = max(max_abs, abs_d)
        max_rel = max(max_rel, rel_d)
    if num_diff == 0:
        return None
    return ValueMismatch(key, max_abs, max_rel, num_diff, numel)


def _bitwise_equal(cx: Any, cy: Any) -> bool:
    import torch

    if cx.element_size() == 0 or cx.numel() == 0:
        return True
    return torch.equal(cx.view(torch.uint8), cy.view(torch.uint8))


def _chunk_stats(cx: Any, cy: Any, rtol: float, atol: float) -> tuple[int, float, float]:
    import torch

    wide = torch.complex128 if (cx.is_complex() or cy.is_complex()) else torch.float64
    xa = cx.to(wide)
    ya = cy.to(wide)
    diff = (xa - ya).abs()
    both_nan = torch.isnan(xa) & torch.isnan(ya)
    exact = xa == ya
    tol = atol + rtol * ya.abs()
    ok = exact | both_nan | (diff <= tol)
    bad = ~ok
    n = int(bad.sum())
    if n == 0:
        return 0, 0.0, 0.0
    d = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    d = torch.where(exact | both_nan, torch.zeros_like(d), d)
    max_abs = float(d.max())
    denom = ya.abs()
    with torch.no_grad():
        rel = torch.where(denom > 0, d / denom, torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d)))
    return n, max_abs, float(rel.max())


def _chunk_pairs(x: Any, y: Any) -> Iterator[tuple[Any, Any]]:
    """Aligned flat chunks of both tensors, read a bounded amount at a time."""
    itemsize = max(_itemsize(x), _itemsize(y), 1)
    step = max(1, CHUNK_BYTES // itemsize)
    total = _numel(x)
    fx, fy = _flat_source(x), _flat_source(y)
    for start in range(0, total, step):
        stop = min(total, start + step)
        yield _flat_chunk(fx, start, stop), _flat_chunk(fy, start, stop)


def _flat_source(t: Any) -> Any:
    """A contiguous TensorMeta stays on disk; anything else becomes one flat torch tensor."""
    if isinstance(t, TensorMeta):
        if t.is_contiguous:
            return t
        from .engine.materialize import tensor_from_meta

        return tensor_from_meta(t).reshape(-1)
    return t.detach().reshape(-1)


def _itemsize(t: Any) -> int:
    return t.itemsize if isinstance(t, TensorMeta) else t.element_size()


def _numel(t: Any) -> int:
    return t.numel if isinstance(t, TensorMeta) else t.numel()


def _flat_chunk(t: Any, start: int, stop: int) -> Any:
    """Elements [start, stop) of a flat source (see _flat_source) as a 1-d torch tensor."""
    import torch

    if isinstance(t, TensorMeta):
        from .engine.data import read_bytes

        base = t.storage_offset * t.itemsize
        buf = read_bytes(t.storage, base + start * t.itemsize, base + stop * t.itemsize)
        return _typed(torch.frombuffer(buf, dtype=torch.uint8), t.dtype)
    return t[start:stop]


def _typed(raw: Any, dtype: str) -> Any:
    import torch

    return raw.view(getattr(torch, dtype))
