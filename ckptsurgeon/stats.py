"""Statistics and content hashes of tensor values (`inspect --stats`, `--check-finite`, `--hash`).

Each tensor's logical contents (the bytes of `tensor.contiguous()`, little-endian) are read a
block of BLOCK elements at a time and reduced with numpy in float64, in scratch arrays each thread
reuses (a block and its scratch stay in the core's cache). Each block gives a partial result
(count, sum, mean, sum of squared deviations, min, max, counts); a tensor's statistics combine its
blocks' partials in order, so they are the same for any number of threads. Tensors, and pieces of
large on-disk ones, are shared out between `threads` threads (pread, crc32, sha256 and numpy's
loops release the GIL). An on-disk contiguous tensor is read straight from its storage (the
CRC-32 checked when the whole record is read); a strided view is made contiguous first (memory
bounded by that tensor), and tensors the engine hands to torch (quantized, sparse, ...) go
through `plain_values`. numpy (and torch, where needed) is imported only when a value is asked for.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .engine.meta import FLOATING_DTYPES, NUMPY_RAW, TensorMeta

BLOCK = 1 << 16  # elements reduced at a time: a thread's scratch arrays (~1.5 MiB) stay in its L2 cache
PIECE_BLOCKS = 64  # blocks of an on-disk tensor that one thread takes at a time (16 MiB of float32)


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
    t: Any,
    key: str,
    *,
    stats: bool = False,
    finite: bool = False,
    sha256: bool = False,
    chunk_bytes: int | None = None,
) -> TensorValues:
    """Compute what is asked of tensor `t` (a TensorMeta or a torch tensor) in one pass over its
    values: `stats` (TensorStats), `finite` (NaN/Inf counts only), `sha256` (hex digest of the
    logical contiguous little-endian bytes, equal for the same values in any file format).
    `chunk_bytes` sets the block size (tests: many small blocks)."""
    return values_of([(key, t)], stats=stats, finite=finite, sha256=sha256, chunk_bytes=chunk_bytes)[key]


def values_of(
    tensors: Iterable[tuple[str, Any]],
    *,
    stats: bool = False,
    finite: bool = False,
    sha256: bool = False,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
) -> dict[str, TensorValues]:
    """`tensor_values` of each (key, tensor), computed by `threads` threads; the results do not
    depend on `threads`. `progress` is called on the calling thread with numbers of bytes done."""
    jobs = [_Job(key, t, stats=stats, finite=finite, sha256=sha256, chunk_bytes=chunk_bytes) for key, t in tensors]
    items = [item for job in jobs for item in job.items()]
    items.sort(key=lambda item: -item.nbytes if item.whole else 0)  # long sequential items first
    lock = threading.Lock()
    done = [0]

    def work(i: int, scratch: _Scratch) -> None:
        item = items[i]
        item.job.run(item, scratch)
        with lock:
            done[0] += item.nbytes

    def report() -> None:
        with lock:
            n, done[0] = done[0], 0
        if progress is not None and n:
            progress(n)

    run_shared(len(items), work, threads, after=report)
    report()
    return {job.key: job.result() for job in jobs}


def run_shared(
    count: int, work: Callable[[int, _Scratch], None], threads: int, *, after: Callable[[], None] | None = None
) -> None:
    """Call `work(i, scratch)` once for each i in range(count), in order of taking, on the calling
    thread and `threads - 1` others (each with its own `_Scratch`). `after()` runs on the calling
    thread after each of its items. The first exception stops every thread and is raised here
    once all have stopped."""
    taken = itertools.count()  # next() on a count is atomic: each item is taken once
    failed: list[BaseException] = []

    def loop(on_caller: bool) -> None:
        scratch = _Scratch()
        try:
            while not failed and (i := next(taken)) < count:
                work(i, scratch)
                if on_caller and after is not None:
                    after()
        except BaseException as exc:
            failed.append(exc)
            if on_caller:
                raise

    helpers = [
        threading.Thread(target=loop, args=(False,), name=f"ckptsurgeon-values-{n}", daemon=True)
        for n in range(min(threads, count) - 1)
    ]
    for h in helpers:
        h.start()
    try:
        loop(True)
    finally:
        for h in helpers:
            h.join()
    if failed:
        raise failed[0]


# dtypes reduced as float64 (complex and bit-pattern dtypes are hashed only)
_NUMERIC = frozenset(
    {"int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"} | FLOATING_DTYPES
)


class _Item(NamedTuple):
    """One piece of work: `nbytes` bytes of a job's tensor from its block `first` on (the whole
    tensor when `whole`)."""

    job: _Job
    place: int  # the item's place among its job's items
    first: int  # the first block
    nbytes: int
    whole: bool


class _Job:
    """One tensor: what to compute, its items, and their partial results."""

    def __init__(self, key: str, t: Any, *, stats: bool, finite: bool, sha256: bool, chunk_bytes: int | None) -> None:
        self.key, self.t = key, t
        self.stats, self.finite, self.sha256 = stats, finite, sha256
        self.chunk_bytes = chunk_bytes
        self.meta = type(t) is TensorMeta
        self.on_disk = self.meta and t.is_contiguous
        self.dtype = t.dtype if self.meta else ""  # a torch tensor's: known once plain (in `run`)
        self.parts: list[list[tuple[Any, ...]]] = []
        self.crcs: list[int] = []
        self.digest: str | None = None

    def _needs_values(self, dtype: str) -> bool:
        return dtype in _NUMERIC and (self.stats or (self.finite and dtype in FLOATING_DTYPES))

    def block_elements(self, itemsize: int) -> int:
        return BLOCK if self.chunk_bytes is None else max(1, self.chunk_bytes // max(itemsize, 1))

    def items(self) -> list[_Item]:
        if self.meta and not self._needs_values(self.dtype) and not self.sha256:
            return []
        nbytes = _nbytes(self.t)
        if not self.on_disk or self.sha256 or not nbytes:  # read in order (a hash), or copied first
            items = [_Item(self, 0, 0, nbytes, True)]
        else:
            per = self.block_elements(self.t.itemsize) * self.t.itemsize * PIECE_BLOCKS
            items = [
                _Item(self, i, start // per * PIECE_BLOCKS, min(per, nbytes - start), False)
                for i, start in enumerate(range(0, nbytes, per))
            ]
        self.parts = [[] for _ in items]
        self.crcs = [0] * len(items)
        return items

    def run(self, item: _Item, scratch: _Scratch) -> None:
        """Read and reduce the item's blocks (on any thread)."""
        digest = None
        if self.sha256:
            import hashlib

            digest = hashlib.sha256()
        if self.on_disk:
            t = self.t
            reduce = _reducer(self.dtype, self.stats) if self._needs_values(self.dtype) else None
            step = self.block_elements(t.itemsize) * t.itemsize
            start = item.first * step
            end = start + item.nbytes
            base = t.storage.data_offset + t.storage_offset * t.itemsize
            buf = scratch.buffer(step)
            crc = 0
            check = self.check_crc
            if check:
                from .engine.crc import crc32
            parts = self.parts[item.place]
            for pos in range(start, end, step):
                view = buf[: min(step, end - pos)]
                t.storage.source.readinto(view, base + pos)
                if check:
                    crc = crc32(view, crc)
                if digest is not None:
                    digest.update(view)
                if reduce is not None:
                    parts.append(reduce(view, scratch))
            self.crcs[item.place] = crc
        else:
            data, itemsize = self._contiguous()
            reduce = _reducer(self.dtype, self.stats) if self._needs_values(self.dtype) else None
            view = memoryview(data).cast("B")
            step = self.block_elements(itemsize) * itemsize
            parts = self.parts[item.place]
            for pos in range(0, len(view), step):
                block = view[pos : pos + step]
                if digest is not None:
                    digest.update(block)
                if reduce is not None:
                    parts.append(reduce(block, scratch))
        if digest is not None:
            self.digest = digest.hexdigest()

    @property
    def check_crc(self) -> bool:
        t = self.t
        return bool(t.storage.crc32 is not None and t.storage_offset == 0 and t.nbytes == t.storage.nbytes)

    def _contiguous(self) -> tuple[Any, int]:
        """The tensor's values in logical order as one buffer (a copy), and its itemsize; sets
        `dtype` for a torch tensor."""
        if self.meta:
            return _contiguous_copy(self.t), self.t.itemsize
        import torch

        t = _plain(self.t, self.key)
        self.dtype = _torch_dtype_name(t)
        return t.contiguous().reshape(-1).view(torch.uint8).numpy(), t.element_size()

    def result(self) -> TensorValues:
        if self.on_disk and self.check_crc and self.parts:
            from .engine.crc import crc32_combine
            from .engine.data import crc_mismatch

            crc = 0
            per = self.block_elements(self.t.itemsize) * self.t.itemsize * PIECE_BLOCKS
            for i, part_crc in enumerate(self.crcs):
                crc = crc32_combine(crc, part_crc, min(per, self.t.nbytes - i * per)) if i else part_crc
            if crc != self.t.storage.crc32:
                raise crc_mismatch(self.t.storage, crc)
        if not self._needs_values(self.dtype):
            return TensorValues(None, self.digest, 0, 0)
        return _combine([p for parts in self.parts for p in parts], self.stats, self.digest)


def _combine(parts: list[tuple[Any, ...]], stats: bool, digest: str | None) -> TensorValues:
    """The blocks' partial results, in order, as one tensor's values (Chan's pairwise update of
    the sum of squared deviations; the mean from the exact float64 sum where it is finite)."""
    if not stats:
        return TensorValues(None, digest, sum(p[0] for p in parts), sum(p[1] for p in parts))
    n = zeros = nan = inf = 0
    total = mean = m2 = 0.0
    lo, hi = math.inf, -math.inf
    for k, s, m, pm2, plo, phi, pz, pnan, pinf in parts:
        total += s
        zeros, nan, inf = zeros + pz, nan + pnan, inf + pinf
        lo, hi = _nan_min(lo, plo), -_nan_min(-hi, -phi)
        size = n + k
        delta = m - mean
        mean += delta * k / size
        m2 += pm2 + delta * delta * n * k / size
        n = size
    if n == 0:
        return TensorValues(None, digest, 0, 0)
    bad = nan or inf  # torch.std of values holding NaN or Inf is NaN
    std = math.sqrt(m2 / (n - 1)) if n > 1 and not bad else math.nan
    mean = total / n if math.isfinite(total) or bad else mean
    return TensorValues(TensorStats(lo, hi, mean, std, nan, inf, zeros), digest, nan, inf)


def _nan_min(a: float, b: float) -> float:
    """min that propagates NaN, as torch.min does."""
    return a if math.isnan(a) else b if math.isnan(b) else min(a, b)


def _nbytes(t: Any) -> int:
    from .tensors import nbytes_of

    return nbytes_of(t)


def _torch_dtype_name(t: Any) -> str:
    from .tensors import dtype_name

    return dtype_name(t)


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


# ------------------------------------------------------------------------------ block reduction


class _Scratch:
    """One thread's reusable arrays: the read buffer, and float64, float32, uint32 and bool
    arrays of a block's length (grown when a block is longer)."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.size = 0

    def buffer(self, nbytes: int) -> memoryview:
        if len(self.raw) < nbytes:
            self.raw = bytearray(nbytes)
        return memoryview(self.raw)

    def arrays(self, k: int) -> tuple[Any, Any, Any, Any]:
        """(float64, float32, uint32, bool) arrays of k elements."""
        if k > self.size:
            import numpy as np

            self.size = max(k, BLOCK)
            self.f64, self.f32 = np.empty(self.size), np.empty(self.size, np.float32)
            self.u32, self.mask = np.empty(self.size, np.uint32), np.empty(self.size, bool)
        return self.f64[:k], self.f32[:k], self.u32[:k], self.mask[:k]


def _reducer(dtype: str, full: bool) -> Callable[[memoryview, _Scratch], tuple[Any, ...]]:
    """The reduction of one block of raw bytes of `dtype`: with `full`, (count, sum, mean, sum of
    squared deviations, min, max, zeros, NaNs, Infs); else (NaNs, Infs)."""
    import numpy as np

    floating = dtype in FLOATING_DTYPES
    table = _float8_table(dtype) if dtype.startswith("float8") else _float16_table() if dtype == "float16" else None
    raw_dtype = np.dtype(NUMPY_RAW.get(dtype, "<u2" if dtype in ("float16", "bfloat16") else "u1"))

    def exact(raw: memoryview, s: _Scratch) -> tuple[Any, Any]:
        """The block's values in a dtype numpy computes on exactly (float32 for the narrow floats)."""
        bits = np.frombuffer(raw, raw_dtype)
        x64, f32, u32, _ = s.arrays(len(bits))
        if table is not None:  # float16, float8: every bit pattern's float32, looked up
            return np.take(table, bits, out=f32, mode="clip"), x64
        if dtype == "bfloat16":  # the high half of a float32
            np.copyto(u32, bits)
            u32 <<= 16
            return u32.view(np.float32), x64
        return bits, x64

    def finite_only(raw: memoryview, s: _Scratch) -> tuple[Any, ...]:
        v, _ = exact(raw, s)
        if not len(v) or math.isfinite(float(v.min())) and math.isfinite(float(v.max())):
            return 0, 0
        mask = s.arrays(len(v))[3]
        return int(np.count_nonzero(np.isnan(v, out=mask))), int(np.count_nonzero(np.isinf(v, out=mask)))

    def full_stats(raw: memoryview, s: _Scratch) -> tuple[Any, ...]:
        v, x = exact(raw, s)
        k = len(v)
        if not k:
            return 0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0, 0, 0
        mask = s.arrays(k)[3]
        with np.errstate(all="ignore"):
            np.copyto(x, v, casting="unsafe")  # int64 and uint64 round as torch's .to(float64)
            total = float(np.add.reduce(x))
            lo, hi = float(v.min()), float(v.max())
            zeros = k - int(np.count_nonzero(v)) if dtype == "bool" else int(np.count_nonzero(np.equal(v, 0, out=mask)))
            nan = inf = 0
            if not math.isfinite(total) and floating:
                nan = int(np.count_nonzero(np.isnan(v, out=mask)))
                inf = int(np.count_nonzero(np.isinf(v, out=mask)))
            if nan or inf:
                return k, total, total / k, math.nan, lo, hi, zeros, nan, inf
            mean = total / k if math.isfinite(total) else float(np.add.reduce(x / k))  # the sum overflowed
            np.subtract(x, mean, out=x)
            np.multiply(x, x, out=x)
            return k, total, mean, float(np.add.reduce(x)), lo, hi, zeros, 0, 0

    return full_stats if full else finite_only


_TABLES: dict[str, Any] = {}


def _float16_table() -> Any:
    """The float32 value of each of the 65536 float16 bit patterns (numpy's own conversion is
    several times slower than a look-up in this 256 KiB table)."""
    if "float16" not in _TABLES:
        import numpy as np

        with np.errstate(all="ignore"):  # NaN patterns
            _TABLES["float16"] = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    return _TABLES["float16"]


# float8 formats: exponent bits, mantissa bits, bias, signed, where NaN is ("max": all ones in
# exponent and mantissa, "ieee": exponent all ones with a mantissa (and infinities), "negzero":
# the bit pattern of -0, "top": 0xff)
_FLOAT8 = {
    "float8_e4m3fn": (4, 3, 7, True, "max"),
    "float8_e5m2": (5, 2, 15, True, "ieee"),
    "float8_e4m3fnuz": (4, 3, 8, True, "negzero"),
    "float8_e5m2fnuz": (5, 2, 16, True, "negzero"),
    "float8_e8m0fnu": (8, 0, 127, False, "top"),
}


def _float8_table(dtype: str) -> Any:
    """The float32 value of each of the 256 bit patterns of a float8 dtype (as torch decodes them)."""
    if dtype not in _TABLES:
        import numpy as np

        ebits, mbits, bias, signed, nan_rule = _FLOAT8[dtype]
        b = np.arange(256, dtype=np.int64)
        sign = np.where((b >> 7) & 1, -1.0, 1.0) if signed else np.ones(256)
        e = (b >> mbits) & ((1 << ebits) - 1)
        m = (b & ((1 << mbits) - 1)).astype(np.float64)
        frac = m / (1 << mbits)
        value = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias)) * sign
        if dtype == "float8_e8m0fnu":  # exponent only: no zero, no subnormals
            value = 2.0 ** (b - bias)
        emax, mmax = (1 << ebits) - 1, (1 << mbits) - 1
        if nan_rule == "max":
            value[(e == emax) & (m == mmax)] = np.nan
        elif nan_rule == "ieee":
            value[(e == emax) & (m != 0)] = np.nan
            value[(e == emax) & (m == 0)] = np.inf * sign[(e == emax) & (m == 0)]
        elif nan_rule == "negzero":
            value[0x80] = np.nan
        else:
            value[0xFF] = np.nan
        _TABLES[dtype] = value.astype(np.float32)
    return _TABLES[dtype]
