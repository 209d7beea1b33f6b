"""Comparing two state_dicts: structure first, then values chunk by chunk.

Values are equal when `|a - b| <= atol + rtol * |b|` everywhere, NaNs in the same places count as
equal; with the defaults `rtol = atol = 0` that is exact equality. Memory stays bounded: values are
compared in fixed-size chunks (read with `pread` for engine TensorMeta tensors), bit-identical
chunks take a fast path and statistics are computed only where chunks differ.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
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
    buffers = _Buffers()
    try:
        report = _diff(a, b, keys, rtol, atol, progress, buffers)
    finally:
        buffers.close()
    return report


def _diff(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    keys: Sequence[str],
    rtol: float,
    atol: float,
    progress: Progress | None,
    buffers: _Buffers,
) -> DiffReport:
    only_a = tuple(k for k in keys if k in a and k not in b)
    only_b = tuple(k for k in keys if k in b and k not in a)
    shapes: list[Mismatch] = []
    dtypes: list[Mismatch] = []
    results: dict[str, ValueMismatch | None] = {}
    later: list[str] = []  # byte-different on-disk pairs: statistics once everything is compared
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
        if same_dtype and _on_disk(x) and _on_disk(y):
            if _raw_equal(x, y, buffers, progress):
                num_equal += 1
            else:  # torch imports on another thread while the remaining tensors are compared
                _import_torch_in_background()
                later.append(key)
            continue
        results[key] = compare_values(key, x, y, rtol=rtol, atol=atol, progress=progress, buffers=buffers)
        if results[key] is None and same_dtype:
            num_equal += 1
    for key in later:
        results[key] = compare_values(key, a[key], b[key], rtol=rtol, atol=atol, buffers=buffers)
        if results[key] is None:  # bytes differ but values are equal within the tolerance
            num_equal += 1
    values = tuple(m for k in keys if (m := results.get(k)) is not None)
    return DiffReport(only_a, only_b, tuple(shapes), tuple(dtypes), values, num_equal, rtol, atol)


def _raw_equal(x: TensorMeta, y: TensorMeta, buffers: _Buffers, progress: Progress | None) -> bool:
    """Whether two on-disk tensors hold the same bytes (stops at the first differing chunk; the
    statistics pass then reads them whole, CRCs included)."""
    for bx, by in _raw_chunk_pairs(x, y, buffers):
        if progress is not None:
            progress(len(bx))
        if not _same_bytes(bx, by):
            return False
    return True


def _import_torch_in_background() -> None:
    """Start importing torch (1.5-3 s) on a second thread; `import torch` later waits for it."""
    if "torch" in sys.modules or any(t.name == _IMPORT_THREAD for t in threading.enumerate()):
        return
    threading.Thread(target=importlib.import_module, args=("torch",), name=_IMPORT_THREAD, daemon=True).start()


_IMPORT_THREAD = "ckptsurgeon-import-torch"


def compare_values(
    key: str,
    x: Any,
    y: Any,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    progress: Progress | None = None,
    buffers: _Buffers | None = None,
) -> ValueMismatch | None:
    """None when the values are equal under the tolerance, else the statistics of the difference.

    Two contiguous on-disk tensors of one dtype are compared as raw bytes (memcmp speed, no torch;
    the CRC-32 of every record streamed whole is checked on the way); torch computes statistics
    only for chunks that differ.
    """
    stats = _Stats()
    if _on_disk(x) and _on_disk(y) and dtype_name(x) == dtype_name(y):
        for bx, by in _raw_chunk_pairs(x, y, buffers or _Buffers()):
            if progress is not None:
                progress(len(bx))
            if _same_bytes(bx, by):
                stats.numel += len(bx) // x.itemsize
            else:
                stats.add(_from_raw(bx, x.dtype), _from_raw(by, y.dtype), rtol, atol)
    else:
        same_dtype = dtype_name(x) == dtype_name(y)
        for cx, cy in _chunk_pairs(x, y):
            if progress is not None:
                progress(cx.numel() * cx.element_size())
            if same_dtype and _bitwise_equal(cx, cy):
                stats.numel += cx.numel()
            else:
                stats.add(cx, cy, rtol, atol)
    if stats.num_diff == 0:
        return None
    return ValueMismatch(key, stats.max_abs, stats.max_rel, stats.num_diff, stats.numel)


class _Stats:
    """Running statistics of a difference over chunks."""

    def __init__(self) -> None:
        self.numel = 0
        self.num_diff = 0
        self.max_abs = 0.0
        self.max_rel = 0.0

    def add(self, cx: Any, cy: Any, rtol: float, atol: float) -> None:
        n, abs_d, rel_d = _chunk_stats(cx, cy, rtol, atol)
        self.numel += cx.numel()
        self.num_diff += n
        self.max_abs = max(self.max_abs, abs_d)
        self.max_rel = max(self.max_rel, rel_d)


def _on_disk(t: Any) -> bool:
    return isinstance(t, TensorMeta) and t.is_contiguous


class _Buffers:
    """Two chunk buffers, allocated once per diff (a fresh 16 MiB buffer per tensor costs more
    in page faults than the comparison itself)."""

    def __init__(self) -> None:
        self._pair: tuple[bytearray, bytearray] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptsurgeon-diff")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def pair(self) -> tuple[bytearray, bytearray]:
        if self._pair is None:
            self._pair = (bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES))
        return self._pair


def _raw_chunk_pairs(x: TensorMeta, y: TensorMeta, buffers: _Buffers) -> Iterator[tuple[memoryview, memoryview]]:
    """The bytes of two same-sized contiguous tensors, chunk by chunk (reused buffers)."""
    from .engine.data import iter_chunks

    step = CHUNK_BYTES - CHUNK_BYTES % x.itemsize
    buf_a, buf_b = buffers.pair()
    ita = iter_chunks(x.storage, *x.span, chunk_size=step, buffer=buf_a)
    itb = iter_chunks(y.storage, *y.span, chunk_size=step, buffer=buf_b)
    # B's chunk is read and CRC-checked on a second thread while A's is (pread and crc32
    # release the GIL): the two files stream in parallel on two cores.
    pool = buffers.pool()
    while True:
        pending = pool.submit(next, itb, None)
        bx = next(ita, None)
        by = pending.result()
        if bx is None or by is None:
            break
        yield bx, by
    for _ in itb:  # run B's generator to its end: that is where its CRC is checked
        pass


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    """Byte equality at memcmp speed (memoryview's own == goes element by element)."""
    if len(a) != len(b):
        return False
    memcmp = _memcmp()
    if memcmp is None:
        return a.tobytes() == b.tobytes()
    n = len(a)
    return n == 0 or memcmp((ctypes.c_char * n).from_buffer(a), (ctypes.c_char * n).from_buffer(b), n) == 0


@functools.lru_cache(maxsize=1)
def _memcmp() -> Any:
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError):  # no C library handle on this platform
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _from_raw(raw: memoryview, dtype: str) -> Any:
    import torch

    return torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, dtype))


def _bitwise_equal(cx: Any, cy: Any) -> bool:
    import torch

    if cx.element_size() == 0 or cx.numel() == 0:
        return True
    return torch.equal(cx.view(torch.uint8), cy.view(torch.uint8))


STATS_BLOCK = 1 << 20  # elements widened to float64 at a time: bounds the memory statistics take


def _chunk_stats(cx: Any, cy: Any, rtol: float, atol: float) -> tuple[int, float, float]:
    """(number differing, max abs diff, max rel diff) of two flat chunks, block by block."""
    n, max_abs, max_rel = 0, 0.0, 0.0
    for start in range(0, cx.numel(), STATS_BLOCK):
        bn, babs, brel = _block_stats(cx[start : start + STATS_BLOCK], cy[start : start + STATS_BLOCK], rtol, atol)
        n, max_abs, max_rel = n + bn, max(max_abs, babs), max(max_rel, brel)
    return n, max_abs, max_rel


def _block_stats(cx: Any, cy: Any, rtol: float, atol: float) -> tuple[int, float, float]:
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
            from .engine.data import verify_crc

            verify_crc(t.storage)  # the chunks below are read span by span: check the record once
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
    if isinstance(t, TensorMeta):
        from .engine.data import read_bytes

        base = t.storage_offset * t.itemsize
        buf = read_bytes(t.storage, base + start * t.itemsize, base + stop * t.itemsize)
        return _from_raw(memoryview(buf), t.dtype)
    return t[start:stop]
