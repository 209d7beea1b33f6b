"""Statistics and content hashes of tensor values (`inspect --stats`, `--check-finite`, `--hash`).

One streaming pass per tensor over its logical contents (the bytes of `tensor.contiguous()`,
little-endian), a bounded chunk at a time: an on-disk contiguous tensor is read straight from its
storage (CRC-checked when the whole record is read) and reduced with numpy in float64; a strided
view is made contiguous first (memory bounded by that tensor), and tensors the engine hands to
torch (quantized, sparse, ...) go through `plain_values`. numpy (and torch, where needed) is
imported only when a statistic is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

from .engine.meta import FLOATING_DTYPES, TensorMeta

CHUNK_BYTES = 1 << 20  # bytes read (and widened to float64) at a time: memory stays bounded


class TensorStats(NamedTuple):
    """min, max, mean, std (sample, as `torch.std`) as float64; counts of NaN, Inf and zeros."""

    min: float
    max: float
    mean: float
    std: float
    nan: int
    inf: int
    zeros: int

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


class TensorValues(NamedTuple):
    """What was computed for one tensor: `stats` (None when not asked, for an empty tensor or a
    dtype without arithmetic: complex, bit patterns), `sha256` (None when not asked), and the
    NaN/Inf counts `--check-finite` needs (0 for integer and bool tensors)."""

    stats: TensorStats | None
    sha256: str | None
    nan: int
    inf: int

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0


def tensor_values(
    t: Any, key: str, *, stats: bool = False, finite: bool = False, sha256: bool = False, chunk_bytes: int = CHUNK_BYTES
) -> TensorValues:
    """Compute what is asked of tensor `t` (a TensorMeta or a torch tensor) in one pass over its
    values: `stats` (TensorStats), `finite` (NaN/Inf counts only), `sha256` (hex digest of the
    logical contiguous little-endian bytes, equal for the same values in any file format)."""
    if type(t) is not TensorMeta:
        t = _plain(t, key)
    dtype = t.dtype if type(t) is TensorMeta else _torch_dtype_name(t)
    numeric = dtype in _NUMERIC
    need_values = numeric and (stats or (finite and dtype in FLOATING_DTYPES))
    if not need_values and not sha256:
        return TensorValues(None, None, 0, 0)
    acc = _Accumulator(dtype, full=stats) if need_values else None
    digest = None
    if sha256:
        import hashlib

        digest = hashlib.sha256()
    for chunk in _logical_chunks(t, key, chunk_bytes):
        if acc is not None:
            acc.add(chunk)
        if digest is not None:
            digest.update(chunk)
    result = acc.result() if acc is not None and stats else None
    nan, inf = (acc.nan, acc.inf) if acc is not None else (0, 0)
    return TensorValues(result, digest.hexdigest() if digest is not None else None, nan, inf)


# dtypes reduced as float64 (complex and bit-pattern dtypes are hashed only)
_NUMERIC = frozenset(
    {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"} | FLOATING_DTYPES
)


def _torch_dtype_name(t: Any) -> str:
    from .tensors import dtype_name

    return dtype_name(t)


def _logical_chunks(t: Any, key: str, chunk_bytes: int) -> Iterator[memoryview]:
    """The bytes of `t.contiguous()` in order, as memoryviews of whole elements (each valid until
    the next is asked for)."""
    if type(t) is TensorMeta:
        if t.is_contiguous:
            from .engine.data import iter_chunks

            start = t.storage_offset * t.itemsize
            step = max(t.itemsize, chunk_bytes - chunk_bytes % t.itemsize)
            if t.nbytes:
                yield from iter_chunks(t.storage, start, start + t.nbytes, step)
            return
        data, itemsize = _contiguous_copy(t), t.itemsize  # a strided view: bounded by its span
    else:
        import torch

        data, itemsize = t.contiguous().reshape(-1).view(torch.uint8).numpy(), t.element_size()
    view = memoryview(data).cast("B")
    step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
    for pos in range(0, len(view), step):
        yield view[pos : pos + step]


def _contiguous_copy(t: TensorMeta) -> Any:
    """The elements of a strided on-disk view in logical order, copied from its span with numpy's
    `as_strided` (elements as opaque fixed-size records: any dtype, no torch)."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    from .engine.data import read_bytes

    start, end = t.span
    raw = np.frombuffer(read_bytes(t.storage, start, end), np.dtype(f"V{t.itemsize}"))
    strides = tuple(st * t.itemsize for st in t.stride)
    return np.ascontiguousarray(as_strided(raw, shape=t.shape, strides=strides, writeable=False)).reshape(-1)


def _plain(t: Any, key: str) -> Any:
    """A torch tensor as dense CPU values (`plain_values`); bit patterns viewed as integers (no copy)."""
    from .tensors import RAW_BITS_DTYPES, plain_values

    t = plain_values(t, key, "read the values of")
    if _torch_dtype_name(t) in RAW_BITS_DTYPES:
        import torch

        t = t.view(torch.uint16 if t.element_size() == 2 else torch.uint8)
    return t


class _Accumulator:
    """Streaming float64 reduction of raw little-endian chunks of one dtype: counts, min, max, the
    exact float64 sum (for the mean) and Chan's pairwise update of the sum of squared deviations
    (for the sample standard deviation). `full=False` counts only NaN and Inf."""

    def __init__(self, dtype: str, *, full: bool) -> None:
        import numpy as np

        from .diff import NUMPY_DTYPES

        self.np = np
        self.dtype = dtype
        self.raw = np.dtype(NUMPY_DTYPES.get(dtype, "u1"))
        self.full = full
        self.floating = dtype in FLOATING_DTYPES
        self.n = self.nan = self.inf = self.zeros = 0
        self.total = 0.0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def _widen(self, raw: memoryview) -> Any:
        np = self.np
        if self.dtype == "bfloat16":
            bits = np.frombuffer(raw, "<u2").astype(np.uint32)
            bits <<= 16
            return bits.view(np.float32).astype(np.float64)
        if self.dtype.startswith("float8"):
            import torch

            raw_t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            return raw_t.view(getattr(torch, self.dtype)).to(torch.float64).numpy()
        return np.frombuffer(raw, self.raw).astype(np.float64)

    def add(self, raw: memoryview) -> None:
        np = self.np
        x = self._widen(raw)
        k = len(x)
        if not k:
            return
        if self.floating:
            self.nan += int(np.count_nonzero(np.isnan(x)))
            self.inf += int(np.count_nonzero(np.isinf(x)))
        if not self.full:
            return
        with np.errstate(all="ignore"):
            self.zeros += k - int(np.count_nonzero(x))
            s = float(x.sum())
            lo, hi = float(x.min()), float(x.max())
            m = s / k
            x -= m
            m2 = float(np.dot(x, x))
        self.lo, self.hi = _nan_min(self.lo, lo), -_nan_min(-self.hi, -hi)
        n = self.n + k
        delta = m - self.mean
        self.mean += delta * k / n
        self.m2 += m2 + delta * delta * self.n * k / n
        self.n = n
        self.total += s

    def result(self) -> TensorStats | None:
        if self.n == 0:
            return None
        bad = self.nan or self.inf  # torch.std of values holding NaN or Inf is NaN
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 and not bad else math.nan
        mean = self.total / self.n if math.isfinite(self.total) or bad else self.mean
        return TensorStats(self.lo, self.hi, mean, std, self.nan, self.inf, self.zeros)


def _nan_min(a: float, b: float) -> float:
    """min that propagates NaN, as torch.min does."""
    return a if math.isnan(a) else b if math.isnan(b) else min(a, b)
