"""Reading the bytes of storages described by :class:`StorageMeta`, without torch.

Every read is a positioned read (`pread`) through the storage's open
:class:`~ckptsurgeon.engine.source.Source`: nothing is mapped, nothing is read twice, no file is
opened by name again, and memory stays bounded by the span or chunk asked for.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..errors import BadCheckpointError
from .crc import crc32, crc32_combine
from .meta import StorageMeta

if TYPE_CHECKING:
    from concurrent.futures import Executor

DEFAULT_CHUNK = 16 << 20


def pread_exact(fd: int, buf: bytearray | memoryview, offset: int, path: str) -> None:
    """Fill `buf` from `offset` of fd; a short read means the file is shorter than expected."""
    view = memoryview(buf)
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise BadCheckpointError(f"{path}: truncated or changed while reading: no data at byte {offset + done}")
        done += n


def pread_bytes(fd: int, offset: int, size: int, path: str) -> bytes:
    """`size` bytes at `offset` (a short read is an error)."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        buf = bytearray(size)
        pread_exact(fd, buf, offset, path)
        return bytes(buf)
    return data


def _check_span(storage: StorageMeta, start: int, end: int) -> None:
    if not (0 <= start <= end <= storage.nbytes):
        raise ValueError(f"byte span [{start}, {end}) is outside storage {storage.key!r} of {storage.nbytes} bytes")


def read_bytes(storage: StorageMeta, start: int, end: int) -> bytearray:
    """Bytes [start, end) of `storage`, read from its source file into a new bytearray.

    Pass `TensorMeta.span` to get the bytes a tensor occupies (for a non-contiguous tensor this
    includes the gaps between its elements).
    """
    if start == end:
        return bytearray()
    _check_span(storage, start, end)
    buf = bytearray(end - start)
    storage.source.readinto(buf, storage.data_offset + start)
    return buf


def iter_chunks(
    storage: StorageMeta,
    start: int,
    end: int,
    chunk_size: int = DEFAULT_CHUNK,
    *,
    buffer: bytearray | None = None,
) -> Iterator[memoryview]:
    """Yield bytes [start, end) of `storage` as memoryviews of at most `chunk_size` bytes.

    The chunks share one buffer (`buffer` when given, so that a caller streaming many storages
    allocates it once): each is valid until the next one is requested (copy it with
    `bytes(chunk)` to keep it). When the whole storage is streamed (start=0, end=nbytes) and it
    has a CRC-32, the CRC is checked after the last chunk; a mismatch raises BadCheckpointError.
    """
    _check_span(storage, start, end)
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if buffer is not None and len(buffer) < min(chunk_size, end - start):
        raise ValueError("buffer is smaller than a chunk")
    return _chunks(storage, start, end, chunk_size, buffer)


def _chunks(
    storage: StorageMeta, start: int, end: int, chunk_size: int, buffer: bytearray | None
) -> Iterator[memoryview]:
    check = storage.crc32 is not None and start == 0 and end == storage.nbytes
    crc = 0
    if start < end:
        size = min(chunk_size, end - start)
        buf = buffer if buffer is not None else bytearray(size)
        view = memoryview(buf)[:size]
        source = storage.source
        pos = start
        while pos < end:
            n = min(len(buf), end - pos)
            chunk = view[:n]
            source.readinto(chunk, storage.data_offset + pos)
            if check:
                crc = crc32(chunk, crc)
            pos += n
            yield chunk
    if check:
        _check_crc(storage, crc)


def crc_mismatch(storage: StorageMeta, actual: int) -> BadCheckpointError:
    """The error for a record whose bytes do not match its stored CRC-32."""
    record = storage.record_name or f"storage {storage.key}"
    return BadCheckpointError(
        f"{storage.source}: CRC-32 mismatch in record {record} "
        f"(stored {storage.crc32:08x}, computed {actual:08x}): the data is corrupt"
    )


def _check_crc(storage: StorageMeta, actual: int) -> None:
    """The one comparison of computed and stored CRC-32."""
    if actual != storage.crc32:
        raise crc_mismatch(storage, actual)


def check_read_crc(storage: StorageMeta, *, whole: bool, crc: Callable[[], int]) -> None:
    """Check bytes just read or copied from `storage` against its record's CRC-32.

    `crc()` gives the CRC of those bytes; it is asked for only when the whole record was read.
    A partial read (a compacted view) checks the whole record instead. No-op without a CRC.
    """
    if storage.crc32 is None:
        return
    if not whole:
        verify_crc(storage)
        return
    _check_crc(storage, crc())


def verify_crc(storage: StorageMeta) -> None:
    """Stream the whole record of `storage` and check its CRC-32 (no-op when it has none)."""
    if storage.crc32 is None:
        return
    for _chunk in iter_chunks(storage, 0, storage.nbytes):
        pass


# -- comparing the bytes of two storages --------------------------------------------------------

SCAN_BLOCK = 128 << 10  # bytes per pread when comparing: a pair of such buffers stays in a core's cache
SCAN_TASK = 1 << 20  # bytes of a span that one thread compares before taking the next part
T = TypeVar("T")


def same_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    """Byte equality at memcmp speed (memoryview's own == goes element by element)."""
    import ctypes

    a, b = memoryview(a), memoryview(b)
    if a.nbytes != b.nbytes:
        return False
    n = a.nbytes
    memcmp = _memcmp()
    if n == 0:
        return True
    if memcmp is None or a.readonly or b.readonly:  # ctypes maps writable buffers only
        return a.tobytes() == b.tobytes()
    return bool(memcmp((ctypes.c_char * n).from_buffer(a), (ctypes.c_char * n).from_buffer(b), n) == 0)


@functools.lru_cache(maxsize=1)
def _memcmp() -> Any:
    import ctypes

    try:
        fn = ctypes.CDLL(None).memcmp  # ctypes releases the GIL during the call
    except (OSError, AttributeError):  # no C library handle on this platform
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _whole_with_crc(storage: StorageMeta, span: tuple[int, int]) -> bool:
    return storage.crc32 is not None and span == (0, storage.nbytes)


SpanPair = tuple[StorageMeta, tuple[int, int], StorageMeta, tuple[int, int]]  # (a, a_span, b, b_span)


class SpanMatch(NamedTuple):
    """What compare_spans found for one pair of spans."""

    equal: bool
    reported: int  # bytes of the pair passed to `progress` (all of them when equal)


def compare_spans(
    pairs: Sequence[SpanPair],
    *,
    pool: Executor | None = None,
    progress: Callable[[int], None] | None = None,
    on_difference: Callable[[int], None] | None = None,
) -> list[SpanMatch]:
    """Whether bytes [a_span) of `a` equal bytes [b_span) of `b`, for each pair of spans.

    The pairs are split into SCAN_TASK parts that the calling thread and, with `pool`, one of its
    threads take in turn (pread, memcmp and crc32 release the GIL); each file is opened once. A
    pair's comparison stops at its first difference, where `on_difference(index)` is called (on
    either thread). For each equal pair, the CRC-32 of a span that is a whole record is checked,
    pairs in order (the bytes are checksummed once for both files); a mismatch raises
    BadCheckpointError. `progress` is called on the calling thread with numbers of bytes of the
    first spans found equal.
    """
    for a, a_span, b, b_span in pairs:
        _check_span(a, *a_span)
        _check_span(b, *b_span)
    scan = _SpanScan(pairs, on_difference)
    if scan.parts:
        share_out(len(scan.parts), scan.part, pool, after=lambda: scan.report(progress))
    scan.report(progress)
    scan.check_crcs()
    return [SpanMatch(equal, reported) for equal, reported in zip(scan.equal, scan.reported)]


class _SpanScan:
    """One compare_spans: its parts, what they found, and each thread's read buffers."""

    def __init__(self, pairs: Sequence[SpanPair], on_difference: Callable[[int], None] | None) -> None:
        self.pairs = pairs
        sizes = [a_span[1] - a_span[0] for _, a_span, _, _ in pairs]
        self.equal = [size == b_span[1] - b_span[0] for size, (_, _, _, b_span) in zip(sizes, pairs)]
        self.checks = [  # per pair, the storages whose CRC-32 to check
            [s for s, span in ((a, a_span), (b, b_span)) if _whole_with_crc(s, span)] for a, a_span, b, b_span in pairs
        ]
        self.parts = [
            (i, start, min(start + SCAN_TASK, size))
            for i, size in enumerate(sizes)
            if self.equal[i]
            for start in range(0, size, SCAN_TASK)
        ]
        self.part_crcs = [0] * len(self.parts)
        self.reported = [0] * len(pairs)
        self.unreported = 0
        self.on_difference = on_difference
        self.lock = threading.Lock()
        self.local = threading.local()
        # a remote source answers each read with a request: larger blocks there
        remote = any(s.source.remote for a, _, b, _ in pairs for s in (a, b))
        self.block = min(SCAN_TASK if remote else SCAN_BLOCK, max(sizes, default=0))

    def part(self, k: int) -> None:
        i, start, end = self.parts[k]
        if not self.equal[i]:  # another part of the pair differs
            return
        equal = self._compare(k)
        with self.lock:
            was_equal = self.equal[i]
            if was_equal and equal:
                self.reported[i] += end - start
                self.unreported += end - start
            elif was_equal:
                self.equal[i] = False
        if was_equal and not equal and self.on_difference is not None:
            self.on_difference(i)

    def report(self, progress: Callable[[int], None] | None) -> None:
        with self.lock:
            n, self.unreported = self.unreported, 0
        if progress is not None and n:
            progress(n)

    def check_crcs(self) -> None:
        crcs = [0] * len(self.pairs)
        for (i, start, end), part_crc in zip(self.parts, self.part_crcs):
            crcs[i] = crc32_combine(crcs[i], part_crc, end - start) if start else part_crc
        for i, storages in enumerate(self.checks):
            if self.equal[i]:
                for storage in storages:
                    _check_crc(storage, crcs[i])

    def _compare(self, k: int) -> bool:
        """Compare part k (and checksum it while it is equal, when the pair has a CRC to check)."""
        i, start, end = self.parts[k]
        a, a_span, b, b_span = self.pairs[i]
        fd_a = None if a.source.remote else a.source.fd
        fd_b = None if b.source.remote else b.source.fd
        base_a, base_b = a.data_offset + a_span[0], b.data_offset + b_span[0]
        (va, vb), (addr_a, addr_b) = self._buffers()
        memcmp = _memcmp()
        want_crc = bool(self.checks[i])
        block = self.block
        crc = 0
        read_a = read_b = 0  # bytes read here, for the Sources' bytes_read (readinto counts its own)
        try:
            for pos in range(start, end, block):
                n = min(block, end - pos)
                ra, rb = (va, vb) if n == block else (va[:n], vb[:n])
                if fd_a is None or os.preadv(fd_a, [ra], base_a + pos) != n:  # a short read: readinto tells why
                    a.source.readinto(ra, base_a + pos)
                else:
                    read_a += n
                if fd_b is None or os.preadv(fd_b, [rb], base_b + pos) != n:
                    b.source.readinto(rb, base_b + pos)
                else:
                    read_b += n
                if memcmp(addr_a, addr_b, n) if memcmp is not None else ra != rb:
                    return False
                if want_crc:
                    crc = crc32(ra, crc)
        finally:
            a.source.count(read_a)
            b.source.count(read_b)
        self.part_crcs[k] = crc
        return True

    def _buffers(self) -> tuple[tuple[memoryview, memoryview], tuple[int, int]]:
        """This thread's two read buffers (small enough to stay in its core's cache), their addresses."""
        if not hasattr(self.local, "buffers"):
            import ctypes

            bufs = (bytearray(self.block), bytearray(self.block))
            arrays = tuple((ctypes.c_char * self.block).from_buffer(buf) for buf in bufs)
            self.local.arrays = arrays  # keeps the buffers exported: the addresses stay valid
            self.local.buffers = (
                (memoryview(bufs[0]), memoryview(bufs[1])),
                (ctypes.addressof(arrays[0]), ctypes.addressof(arrays[1])),
            )
        buffers: tuple[tuple[memoryview, memoryview], tuple[int, int]] = self.local.buffers
        return buffers


def share_out(
    count: int, work: Callable[[int], None], pool: Executor | None, *, after: Callable[[], None] | None = None
) -> None:
    """Call `work(i)` once for each i in range(count), in order of taking, on the calling thread
    and, with `pool`, on one of its threads at the same time (for work that releases the GIL).

    `after()` is called on the calling thread after each of its items. The first exception either
    thread raises stops both and is re-raised here, once both are done (so that what they read
    from may be closed or reused). Never call it from `pool`'s own thread.
    """
    taken = itertools.count()  # next() on a count is atomic: each item is taken once
    failed = False

    def loop(on_caller: bool) -> None:
        nonlocal failed
        try:
            while not failed and (i := next(taken)) < count:
                work(i)
                if on_caller and after is not None:
                    after()
        except BaseException:
            failed = True
            raise

    helper = pool.submit(loop, False) if pool is not None and count > 1 else None
    try:
        loop(True)
    except BaseException:
        if helper is not None:
            from concurrent.futures import wait

            wait([helper])
        raise
    if helper is not None:
        helper.result()


def map_chunk_pairs(
    a: StorageMeta,
    a_span: tuple[int, int],
    b: StorageMeta,
    b_span: tuple[int, int],
    bounds: Sequence[int],
    work: Callable[[memoryview, memoryview, bool], T],
    *,
    pool: Executor | None = None,
    buffers: Callable[[int], tuple[bytearray, bytearray]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[T]:
    """`work(chunk_a, chunk_b, equal)` for each pair of chunks [bounds[i], bounds[i + 1]) of two
    spans of one length (offsets within the spans, from 0 to their length), in a list in order.

    The chunks are shared out between the calling thread and, with `pool`, one of its threads
    (work that releases the GIL runs on both cores); each thread reads its chunks into its own
    two buffers (`buffers(size)` gives the calling thread's, at least `size` bytes each), valid
    during the call. When a span is a whole record with a CRC-32, the CRC is checked once all
    chunks are done; a chunk equal in both files is checksummed once for both. `progress` is
    called on the calling thread with numbers of bytes of `a` done.
    """
    _check_span(a, *a_span)
    _check_span(b, *b_span)
    size = a_span[1] - a_span[0]
    if b_span[1] - b_span[0] != size:
        raise ValueError(f"byte spans of {size} and {b_span[1] - b_span[0]} bytes differ in length")
    if not bounds or bounds[0] != 0 or bounds[-1] != size or any(x >= y for x, y in zip(bounds, bounds[1:])):
        raise ValueError(f"chunk bounds must rise from 0 to {size}")
    check_a, check_b = _whole_with_crc(a, a_span), _whole_with_crc(b, b_span)
    count = len(bounds) - 1
    largest = max((y - x for x, y in zip(bounds, bounds[1:])), default=0)
    results: list[Any] = [None] * count
    crcs = [(0, 0)] * count
    own = threading.local()
    lock = threading.Lock()
    unreported = 0

    def one(i: int) -> None:
        nonlocal unreported
        start, end = bounds[i], bounds[i + 1]
        if buffers is not None:
            buf_a, buf_b = buffers(largest)
        else:
            if not hasattr(own, "buffers"):
                own.buffers = (bytearray(largest), bytearray(largest))
            buf_a, buf_b = own.buffers
        va, vb = memoryview(buf_a)[: end - start], memoryview(buf_b)[: end - start]
        a.source.readinto(va, a.data_offset + a_span[0] + start)
        b.source.readinto(vb, b.data_offset + b_span[0] + start)
        equal = same_bytes(va, vb)
        crc_a = crc32(va) if check_a or (equal and check_b) else 0
        crc_b = crc_a if equal else crc32(vb) if check_b else 0
        crcs[i] = (crc_a, crc_b)
        results[i] = work(va, vb, equal)
        with lock:
            unreported += end - start

    def report() -> None:
        nonlocal unreported
        with lock:
            n, unreported = unreported, 0
        if progress is not None and n:
            progress(n)

    if count:
        share_out(count, one, pool, after=report)
        report()
    for check, storage, side in ((check_a, a, 0), (check_b, b, 1)):
        if check:
            crc = 0
            for (start, end), pair in zip(zip(bounds, bounds[1:]), crcs):
                crc = crc32_combine(crc, pair[side], end - start)
            _check_crc(storage, crc)
    return results
