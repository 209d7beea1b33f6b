"""Comparing two state_dicts: structure first, then values chunk by chunk.

Values are equal when `|a - b| <= atol + rtol * |b|` everywhere, NaNs in the same places count as
equal; with the defaults `rtol = atol = 0` that is exact equality. Memory stays bounded: values are
compared in fixed-size chunks (read with `pread` for engine TensorMeta tensors), bit-identical
tensors take a fast path and statistics are computed only for tensors that differ (bit-identical
pieces of those only add their norms): with numpy for the raw bytes of on-disk tensors of the
dtypes numpy can widen exactly, with torch otherwise (the same float64 operations, element by
element; the float64 sums agree within rounding). Pieces are cut at fixed offsets and their
statistics combined in order, so the report does not depend on the number of threads.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .engine.data import compare_spans, map_chunk_pairs
from .engine.meta import NUMPY_RAW, TensorMeta
from .tensors import RAW_BITS_DTYPES, dtype_name, is_tensor, plain_values, shape_of

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
    """How the values of one key differ. `max_abs_diff`, `max_rel_diff` and `mean_abs_diff` are of
    d = |a - b| (0 where both are NaN or the same infinity, infinite where one only is NaN);
    `rel_l2` = ||a - b|| / ||b|| and `cosine` = <a, b> / (||a|| ||b||) (for complex tensors the real
    part of <a, conj b>, the cosine of the angle between them as real vectors). All are float64,
    accumulated over the whole tensor; rel_l2 and cosine are NaN when a or b holds NaN or Inf,
    cosine also when either is all zeros, and rel_l2 is infinite when b is all zeros. NaN (no
    arithmetic: bit-pattern dtypes) where unknown."""

    key: str
    max_abs_diff: float
    max_rel_diff: float
    num_different: int
    numel: int
    mean_abs_diff: float = math.nan
    rel_l2: float = math.nan
    cosine: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "num_different": self.num_different,
            "numel": self.numel,
            "mean_abs_diff": _json_float(self.mean_abs_diff),
            "rel_l2": _json_float(self.rel_l2),
            "cosine": _json_float(self.cosine),
        }


def check_tolerances(rtol: float, atol: float, *, prefix: str = "") -> None:
    """Refuse a tolerance that is not a finite number >= 0 (UsageError naming it)."""
    from .errors import UsageError

    for name, value in (("rtol", rtol), ("atol", atol)):
        try:
            ok = math.isfinite(value) and value >= 0
        except TypeError:
            ok = False
        if not ok:
            raise UsageError(f"{prefix}{name} must be a finite number >= 0, got {value!r}")


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
    extra_state_mismatches: tuple[Mismatch, ...] = ()  # non-tensor values: a and b are descriptions
    num_equal_extra_state: int = 0
    ignore_dtype: bool = False  # dtype mismatches are reported but do not make the checkpoints differ

    @property
    def identical(self) -> bool:
        return not (
            self.only_in_a
            or self.only_in_b
            or self.shape_mismatches
            or (self.dtype_mismatches and not self.ignore_dtype)
            or self.value_mismatches
            or self.extra_state_mismatches
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
            "extra_state_mismatches": [m.to_dict() for m in self.extra_state_mismatches],
            "num_equal": self.num_equal,
            "num_equal_extra_state": self.num_equal_extra_state,
            "rtol": _json_float(self.rtol),
            "atol": _json_float(self.atol),
            "ignore_dtype": self.ignore_dtype,
        }


def diff_state_dicts(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    keys: Sequence[str] | None = None,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    ignore_dtype: bool = False,
    progress: Progress | None = None,
    threads: int = 2,
) -> DiffReport:
    """Compare two state_dicts over `keys` (default: the union, A's order first).

    Shapes and dtypes are compared from metadata; values only where shapes agree (across dtypes
    too, after promotion, so a cast checkpoint can be checked with a tolerance). With
    `ignore_dtype`, a dtype mismatch is still reported but does not make the report differ (its
    values still must agree). Non-tensor values (a module's extra state) are compared by equality
    (`values_equal`). `progress` is called with the number of bytes of A compared so far, chunk
    by chunk. `rtol` and `atol` must be finite and >= 0 (else UsageError). `threads` 1 compares on
    the calling thread only; more share the byte comparisons and statistics out between it and
    one helper thread. The report is the same for any `threads`.
    """
    check_tolerances(rtol, atol)
    if keys is None:
        keys = list(a) + [k for k in b if k not in a]
    extra_keys = [k for k in keys if k in a and k in b and not (is_tensor(a[k]) and is_tensor(b[k]))]
    extra: list[Mismatch] = []
    if extra_keys:
        from .containers import describe_value

        extra = [
            Mismatch(k, describe_value(a[k]), describe_value(b[k])) for k in extra_keys if not values_equal(a[k], b[k])
        ]
        skip = set(extra_keys)
        keys = [k for k in keys if k not in skip]
    workspace = _Workspace(threads)
    try:
        report = _diff(a, b, keys, rtol, atol, progress, workspace, ignore_dtype)
    finally:
        workspace.close()
    if extra_keys:
        report = dataclasses.replace(
            report, extra_state_mismatches=tuple(extra), num_equal_extra_state=len(extra_keys) - len(extra)
        )
    return report


def values_equal(x: Any, y: Any, _depth: int = 0) -> bool:
    """Equality of two state_dict values that need not be tensors (a module's extra state):
    plain data by `==` (NaN equals NaN), mappings and sequences item by item, tensors inside
    them by shape, dtype and exact values, `io.BytesIO` by content."""
    if is_tensor(x) or is_tensor(y):
        return (
            is_tensor(x)
            and is_tensor(y)
            and shape_of(x) == shape_of(y)
            and dtype_name(x) == dtype_name(y)
            and compare_values("", x, y) is None
        )
    if _depth > 100:
        return False
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return x.keys() == y.keys() and all(values_equal(x[k], y[k], _depth + 1) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(values_equal(i, j, _depth + 1) for i, j in zip(x, y))
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, io.BytesIO) and isinstance(y, io.BytesIO):
        return x.getbuffer() == y.getbuffer()
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 (an object whose == cannot say: not known to be equal)
        return False


def _diff(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    keys: Sequence[str],
    rtol: float,
    atol: float,
    progress: Progress | None,
    workspace: _Workspace,
    ignore_dtype: bool = False,
) -> DiffReport:
    only_a = tuple(k for k in keys if k in a and k not in b)
    only_b = tuple(k for k in keys if k in b and k not in a)
    shapes: list[Mismatch] = []
    dtypes: list[Mismatch] = []
    results: dict[str, ValueMismatch | None] = {}
    raw: list[str] = []  # on-disk pairs of one dtype: compared as bytes, all at once
    for key in keys:
        if key not in a or key not in b:
            continue
        x, y = a[key], b[key]
        if shape_of(x) != shape_of(y):
            shapes.append(Mismatch(key, shape_of(x), shape_of(y)))
        elif dtype_name(x) != dtype_name(y):
            dtypes.append(Mismatch(key, dtype_name(x), dtype_name(y)))
            results[key] = _compare(key, x, y, rtol, atol, _Counted(progress), workspace)
        elif _on_disk(x) and _on_disk(y):
            raw.append(key)
        else:
            results[key] = _compare(key, x, y, rtol, atol, _Counted(progress), workspace)

    def started_to_differ(i: int) -> None:  # numpy (or torch) imports while the rest is compared
        _import_in_background("numpy" if a[raw[i]].dtype in NUMPY_DTYPES else "torch")

    pairs = [(a[k].storage, a[k].span, b[k].storage, b[k].span) for k in raw]
    matches = compare_spans(pairs, pool=workspace.pool(), progress=progress, on_difference=started_to_differ)
    for key, match in zip(raw, matches):  # statistics once all bytes are compared
        if not match.equal:
            counted = _Counted(progress, match.reported)
            results[key] = _compare(key, a[key], b[key], rtol, atol, counted, workspace, scan=False)
    num_equal = sum(1 for k in results if results[k] is None and (ignore_dtype or dtype_name(a[k]) == dtype_name(b[k])))
    num_equal += sum(1 for match in matches if match.equal)
    values = tuple(m for k in keys if (m := results.get(k)) is not None)
    return DiffReport(
        only_a, only_b, tuple(shapes), tuple(dtypes), values, num_equal, rtol, atol, ignore_dtype=ignore_dtype
    )


def _import_in_background(module: str) -> None:
    """Start importing `module` on a second thread (numpy 0.2 s, torch 1.5-3 s); `import` later
    waits for it."""
    name = f"ckptsurgeon-import-{module}"
    if module in sys.modules or any(t.name == name for t in threading.enumerate()):
        return
    threading.Thread(target=importlib.import_module, args=(module,), name=name, daemon=True).start()


def compare_values(
    key: str,
    x: Any,
    y: Any,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    progress: Progress | None = None,
    threads: int = 2,
) -> ValueMismatch | None:
    """None when the values are equal under the tolerance, else the statistics of the difference.

    Two contiguous on-disk tensors of one dtype are compared as raw bytes (memcmp speed, no torch;
    the CRC-32 of every record streamed whole is checked on the way); statistics are computed
    only for chunks that differ, with numpy where it widens the dtype exactly.
    """
    workspace = _Workspace(threads)
    try:
        return _compare(key, x, y, rtol, atol, _Counted(progress), workspace)
    finally:
        workspace.close()


def _compare(
    key: str,
    x: Any,
    y: Any,
    rtol: float,
    atol: float,
    progress: _Counted,
    workspace: _Workspace,
    *,
    scan: bool = True,
) -> ValueMismatch | None:
    """compare_values; `scan=False` when two on-disk tensors are known to differ in their bytes."""
    stats = _Stats()
    if _on_disk(x) and _on_disk(y) and dtype_name(x) == dtype_name(y):
        pair = (x.storage, x.span, y.storage, y.span)
        if scan and compare_spans([pair], pool=workspace.pool(), progress=progress)[0].equal:
            return None
        _raw_stats(stats, x, y, rtol, atol, progress, workspace)
    else:
        same_dtype = dtype_name(x) == dtype_name(y)
        bits = dtype_name(x) in RAW_BITS_DTYPES or dtype_name(y) in RAW_BITS_DTYPES
        if bits and not same_dtype:
            return None  # bit patterns of two types have no common value: the dtype mismatch says it
        for cx, cy in _chunk_pairs(key, x, y):
            progress(cx.numel() * cx.element_size())
            stats.numel += cx.numel()
            if bits:  # no arithmetic: every element whose bits differ counts, by an unknown amount
                n = int((cx != cy).sum())
                stats.add(n, math.inf if n else 0.0, math.inf if n else 0.0, None)
            elif same_dtype and _bitwise_equal(cx, cy):
                stats.add(0, 0.0, 0.0, _chunk_norms(cx))
            else:
                stats.add(*_chunk_stats(cx, cy, rtol, atol))
    return stats.mismatch(key)


def _raw_stats(
    stats: _Stats, x: TensorMeta, y: TensorMeta, rtol: float, atol: float, progress: _Counted, workspace: _Workspace
) -> None:
    """Statistics of two on-disk tensors of one dtype, from their bytes, piece by piece on two
    threads (CRC-32s checked); numpy's where it widens the dtype exactly, else torch's."""
    bounds = _piece_bounds(x.nbytes, x.itemsize, x.dtype in NUMPY_DTYPES)
    numpy_stats = workspace.numpy_stats(x.dtype) if x.dtype in NUMPY_DTYPES else None
    piece_stats = numpy_stats.piece if numpy_stats is not None else _torch_raw_stats(x.dtype)

    def work(bx: memoryview, by: memoryview, equal: bool) -> PieceStats:
        if not equal:
            return piece_stats(bx, by, rtol, atol)
        if numpy_stats is not None:
            return 0, 0.0, 0.0, numpy_stats.norms(bx)
        return 0, 0.0, 0.0, _chunk_norms(_from_raw(bx, x.dtype))

    done = 0

    def count(n: int) -> None:  # reports only bytes beyond those the scan reported before
        nonlocal done
        done += n
        progress.reach(done)

    results = iter(
        map_chunk_pairs(
            x.storage,
            x.span,
            y.storage,
            y.span,
            bounds,
            work,
            pool=workspace.pool(),
            buffers=workspace.buffers,
            progress=count,
        )
    )
    for n, max_abs, max_rel, sums in results:
        stats.add(n, max_abs, max_rel, sums)
    stats.numel += x.numel


def _piece_bounds(nbytes: int, itemsize: int, numpy: bool) -> list[int]:
    """Byte offsets that cut a tensor into the pieces its statistics are computed on: NUMPY_PIECE
    elements for numpy, CHUNK_BYTES for torch (maxima and counts do not depend on the cut)."""
    step = NUMPY_PIECE * itemsize if numpy else CHUNK_BYTES - CHUNK_BYTES % itemsize
    return list(range(0, nbytes, step)) + [nbytes]


class _Counted:
    """A progress callback that counts the bytes reported through it (starting from `total`)."""

    def __init__(self, progress: Progress | None, total: int = 0) -> None:
        self.progress = progress
        self.total = total

    def __call__(self, n: int) -> None:
        self.total += n
        if self.progress is not None:
            self.progress(n)

    def reach(self, total: int) -> None:
        """Report the bytes up to `total` not reported yet."""
        if total > self.total:
            self(total - self.total)


Sums = tuple[float, float, float, float, float]  # float64 sums of d, d*d, |a|^2, |b|^2, Re(a conj b)
PieceStats = tuple[int, float, float, "Sums | None"]  # (number differing, max d, max rel, sums or None)


class _Stats:
    """Running statistics of a difference over chunks, added in the tensor's order."""

    def __init__(self) -> None:
        self.numel = 0
        self.num_diff = 0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.sums: Sums | None = (0.0, 0.0, 0.0, 0.0, 0.0)  # None: some values have no arithmetic

    def add(self, n: int, abs_d: float, rel_d: float, sums: Sums | None) -> None:
        """Add the statistics of one chunk or block (the caller counts its elements in `numel`)."""
        self.num_diff += n
        self.max_abs = max(self.max_abs, abs_d)
        self.max_rel = max(self.max_rel, rel_d)
        if sums is None or self.sums is None:
            self.sums = None
        else:
            d, d2, a2, b2, ab = self.sums
            self.sums = (d + sums[0], d2 + sums[1], a2 + sums[2], b2 + sums[3], ab + sums[4])

    def mismatch(self, key: str) -> ValueMismatch | None:
        """The ValueMismatch these statistics describe (None: no element differs)."""
        if self.num_diff == 0:
            return None
        mean_abs = rel_l2 = cosine = math.nan
        if self.sums is not None:
            sum_d, sum_d2, a2, b2, ab = self.sums
            mean_abs = sum_d / self.numel
            if math.isfinite(a2) and math.isfinite(b2):
                rel_l2 = math.sqrt(sum_d2) / math.sqrt(b2) if b2 > 0 else math.inf if sum_d2 > 0 else 0.0
                if a2 > 0 and b2 > 0:
                    cosine = max(-1.0, min(1.0, ab / (math.sqrt(a2) * math.sqrt(b2))))
        return ValueMismatch(key, self.max_abs, self.max_rel, self.num_diff, self.numel, mean_abs, rel_l2, cosine)


def _on_disk(t: Any) -> bool:
    return isinstance(t, TensorMeta) and t.is_contiguous


class _Workspace:
    """What one diff reuses from tensor to tensor: a helper thread, each thread's two read
    buffers (a fresh 16 MiB buffer per tensor costs more in page faults than the comparison
    itself) and numpy's scratch arrays."""

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._buffers = threading.local()
        self._numpy_stats: dict[str, _NumpyStats] = {}

    def pool(self) -> ThreadPoolExecutor | None:
        """The helper thread (None with `threads` 1: everything on the calling thread)."""
        if self.threads < 2:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptsurgeon-diff")
        return self._pool

    def buffers(self, size: int) -> tuple[bytearray, bytearray]:
        """The calling thread's two buffers, of at least `size` bytes."""
        pair = getattr(self._buffers, "pair", None)
        if pair is None or len(pair[0]) < size:
            pair = self._buffers.pair = (bytearray(size), bytearray(size))
        return pair

    def numpy_stats(self, dtype: str) -> _NumpyStats:
        if dtype not in self._numpy_stats:
            self._numpy_stats[dtype] = _NumpyStats(dtype)
        return self._numpy_stats[dtype]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _torch_raw_stats(dtype: str) -> Callable[[memoryview, memoryview, float, float], PieceStats]:
    def raw_stats(bx: memoryview, by: memoryview, rtol: float, atol: float) -> PieceStats:
        return _chunk_stats(_from_raw(bx, dtype), _from_raw(by, dtype), rtol, atol)

    return raw_stats


def _from_raw(raw: memoryview, dtype: str) -> Any:
    import torch

    return torch.frombuffer(raw, dtype=torch.uint8).view(getattr(torch, dtype))


def _bitwise_equal(cx: Any, cy: Any) -> bool:
    import torch

    if cx.element_size() == 0 or cx.numel() == 0:
        return True
    return torch.equal(cx.view(torch.uint8), cy.view(torch.uint8))


STATS_BLOCK = 1 << 20  # elements widened to float64 at a time: bounds the memory statistics take


def _chunk_stats(cx: Any, cy: Any, rtol: float, atol: float) -> PieceStats:
    """(number differing, max abs diff, max rel diff, sums) of two flat chunks, block by block."""
    stats = _Stats()
    for start in range(0, cx.numel(), STATS_BLOCK):
        stats.add(*_block_stats(cx[start : start + STATS_BLOCK], cy[start : start + STATS_BLOCK], rtol, atol))
    return stats.num_diff, stats.max_abs, stats.max_rel, stats.sums


def _chunk_norms(cx: Any) -> Sums:
    """The sums of a flat chunk compared with itself (d = 0), block by block, as _block_stats
    computes them."""
    a2 = 0.0
    for start in range(0, cx.numel(), STATS_BLOCK):
        xa = _widen(cx[start : start + STATS_BLOCK], cx)
        a2 += float((xa * xa.conj()).real.sum()) if xa.is_complex() else float((xa * xa).sum())
    return 0.0, 0.0, a2, a2, a2


def _widen(t: Any, other: Any) -> Any:
    import torch

    return t.to(torch.complex128 if (t.is_complex() or other.is_complex()) else torch.float64)


def _block_stats(cx: Any, cy: Any, rtol: float, atol: float) -> PieceStats:
    import torch

    xa = _widen(cx, cy)
    ya = _widen(cy, cx)
    diff = (xa - ya).abs()
    both_nan = torch.isnan(xa) & torch.isnan(ya)
    exact = xa == ya
    tol = atol + rtol * ya.abs()
    ok = exact | both_nan | (diff <= tol)
    bad = ~ok
    n = int(bad.sum())
    d = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    d = torch.where(exact | both_nan, torch.zeros_like(d), d)
    max_abs = float(d.max())
    denom = ya.abs()
    with torch.no_grad():
        rel = torch.where(denom > 0, d / denom, torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d)))
        rel = torch.where(torch.isinf(d), torch.full_like(d, math.inf), rel)  # inf / inf: infinite, not NaN
    if xa.is_complex():
        a2, b2 = float((xa * xa.conj()).real.sum()), float((ya * ya.conj()).real.sum())
        ab = float((xa * ya.conj()).real.sum())
    else:
        a2, b2, ab = float((xa * xa).sum()), float((ya * ya).sum()), float((xa * ya).sum())
    sums = (float(d.sum()), float((d * d).sum()), a2, b2, ab)
    return n, max_abs, float(rel.max()), sums


# engine dtype -> numpy dtype of its raw (little-endian) bytes, for the dtypes whose statistics numpy
# computes exactly as torch does. Not complex: torch's |z| is not hypot everywhere (its vectorised
# loop and its scalar tail round differently), so no elementwise formula reproduces it.
NUMPY_DTYPES = {
    **NUMPY_RAW,
    "float16": "<f2",
    "bfloat16": "<u2",  # the high half of a float32: widened through float32
}

NUMPY_PIECE = 1 << 17  # elements numpy works on at a time: its scratch arrays stay in cache


class _NumpyStats:
    """The statistics of pieces of raw bytes with numpy: the float64 operations of _block_stats, in
    reused scratch arrays (each thread its own; numpy releases the GIL while it computes)."""

    def __init__(self, dtype: str) -> None:
        import numpy as np

        self.np = np
        self.raw = np.dtype(NUMPY_DTYPES[dtype])
        self.bf16 = dtype == "bfloat16"
        self.local = threading.local()  # each thread's scratch arrays

    def piece(self, px: memoryview, py: memoryview, rtol: float, atol: float) -> PieceStats:
        """(number differing, max of d, max of rel, sums) over a piece of at most NUMPY_PIECE
        elements, d, rel and the sums as in _block_stats."""
        np = self.np
        k = len(px) // self.raw.itemsize
        x, y, diff, ya, tol, same, ok, mask = (a[:k] for a in self._scratch())
        with np.errstate(all="ignore"):
            self._widen(px, x)
            self._widen(py, y)
            np.abs(np.subtract(x, y, out=diff), out=diff)
            np.abs(y, out=ya)
            np.equal(x, y, out=same)
            same |= np.logical_and(np.isnan(x, out=ok), np.isnan(y, out=mask), out=ok)  # exact | both_nan
            np.add(np.multiply(ya, rtol, out=tol), atol, out=tol)
            np.less_equal(diff, tol, out=ok)
            ok |= same
            n = k - int(np.count_nonzero(ok))
            np.copyto(diff, math.inf, where=np.isnan(diff, out=mask))  # d
            np.copyto(diff, 0.0, where=same)
            sums = (
                float(np.add.reduce(diff)),
                float(np.add.reduce(np.multiply(diff, diff, out=tol))),
                float(np.add.reduce(np.multiply(x, x, out=tol))),
                float(np.add.reduce(np.multiply(y, y, out=tol))),
                float(np.add.reduce(np.multiply(x, y, out=tol))),
            )
            rel = np.divide(diff, ya, out=tol)
            not_pos = np.logical_not(np.greater(ya, 0.0, out=mask), out=mask)
            np.copyto(rel, 0.0, where=not_pos)
            np.copyto(rel, math.inf, where=np.logical_and(not_pos, np.greater(diff, 0.0, out=ok), out=ok))
            np.copyto(rel, math.inf, where=np.isinf(diff, out=mask))  # inf / inf: infinite, not NaN
            return n, float(diff.max()), float(rel.max()), sums

    def norms(self, px: memoryview) -> Sums:
        """The sums of a piece equal in both tensors (d = 0), as `piece` computes them."""
        np = self.np
        k = len(px) // self.raw.itemsize
        arrays = self._scratch()
        x, tol = arrays[0][:k], arrays[4][:k]
        with np.errstate(all="ignore"):
            self._widen(px, x)
            a2 = float(np.add.reduce(np.multiply(x, x, out=tol)))
        return 0.0, 0.0, a2, a2, a2

    def _scratch(self) -> tuple[Any, ...]:
        """This thread's arrays: x, y, diff, ya, tol (float64) and same, ok, mask (bool)."""
        if not hasattr(self.local, "arrays"):
            np, k = self.np, NUMPY_PIECE
            self.local.arrays = tuple(np.empty(k) for _ in range(5)) + tuple(np.empty(k, bool) for _ in range(3))
            self.local.bits = np.empty(k, np.uint32)
        arrays: tuple[Any, ...] = self.local.arrays
        return arrays

    def _widen(self, raw: memoryview, out: Any) -> None:
        values = self.np.frombuffer(raw, self.raw)
        if self.bf16:
            bits = self.local.bits[: len(values)]
            self.np.copyto(bits, values)
            bits <<= 16
            values = bits.view(self.np.float32)
        self.np.copyto(out, values)


def _chunk_pairs(key: str, x: Any, y: Any) -> Iterator[tuple[Any, Any]]:
    """Aligned flat chunks of both tensors, read a bounded amount at a time."""
    itemsize = max(_itemsize(x), _itemsize(y), 1)
    step = max(1, CHUNK_BYTES // itemsize)
    total = _numel(x)
    fx, fy = _flat_source(x, key), _flat_source(y, key)
    for start in range(0, total, step):
        stop = min(total, start + step)
        yield _flat_chunk(fx, start, stop), _flat_chunk(fy, start, stop)


def _flat_source(t: Any, key: str) -> Any:
    """A contiguous TensorMeta stays on disk; anything else becomes one flat torch tensor of plain
    CPU memory (sparse made dense, quantized dequantized, conj/neg resolved; bit-pattern dtypes
    as unsigned integers of their size, which is all `==` needs); meta tensors have no values to
    compare (UsageError)."""
    if isinstance(t, TensorMeta):
        if t.is_contiguous:
            from .engine.data import verify_crc

            verify_crc(t.storage)  # the chunks below are read span by span: check the record once
            return t
        from .engine.materialize import tensor_from_meta

        return tensor_from_meta(t).reshape(-1)
    t = plain_values(t, key, "compare the values of")
    if dtype_name(t) in RAW_BITS_DTYPES:
        import torch

        t = t.view(torch.uint16 if t.element_size() == 2 else torch.uint8)  # same size: any strides
    return t.reshape(-1)


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
