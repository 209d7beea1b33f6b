"""Copying storage bytes from source files into an output file: the copy machinery that the
torch zip writer (`zipwrite`) and the safetensors writer (`safetensors_write`) share.

Bytes travel with `os.copy_file_range` (in the kernel), or `pread`/`pwrite` in 16 MiB chunks when
the kernel cannot copy. A CRC-32 of the copied bytes, when asked for, is computed by a second
thread reading the same bytes while the kernel copies them. Holes of a sparse source stay holes in
the output. The kernel is asked to start writing the output to disk as the copy progresses, so
that the final fsync waits only for the rest. Every byte read is counted on its Source. Memory use
does not grow with the tensors. POSIX only (pread/pwrite).

A remote source has no descriptor to copy from: the writer says beforehand which ranges it will
copy (:class:`ReadAhead`), and they are read ahead of it, a few ranged GETs at a time (`--jobs`),
records next to each other in one request, each answer streamed through a bounded window. The
writer copies from a remote and a local source by the same `Copier.copy`, in the same order.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from ckptsurgeon.engine.crc import crc32, crc32_zeros
from ckptsurgeon.engine.meta import StorageMeta
from ckptsurgeon.engine.source import Source
from ckptsurgeon.errors import BadCheckpointError, EngineUnsupported, OutputError

if TYPE_CHECKING:
    from ckptsurgeon.engine.remote import RemoteSource

CHUNK = 16 << 20  # the buffer of small writes is issued at this size
_BUFFER = 4 << 20  # one pread (CRC-32 alongside a kernel copy, or a copy through memory): a writer per
# thread (sharded outputs) keeps at most two of them, so eight threads stay within 64 MiB
_KERNEL_COPY_CHUNK = 64 << 20  # one copy_file_range call; writeback is started between calls
_WRITEBACK_STEP = 16 << 20  # start writing the output to disk every this many bytes
_THREADED_CRC_MIN = 8 << 20  # below this a thread costs more than it saves
AHEAD_WINDOW = 8 << 20  # bytes one request may have read ahead of the writer ...
AHEAD_STREAMS = 4  # ... with this many requests at a time at most: 32 MiB (a writer per thread of a
# sharded output reads one request at a time: eight threads stay within 64 MiB)
MERGE_GAP = 1 << 16  # ranges this close (a zip record's header and descriptor apart) share a request ...
REQUEST_MAX = 64 << 20  # ... of at most this many bytes (a bigger range has a request of its own)


def check_posix() -> None:
    """The copy needs positioned reads and writes: EngineUnsupported elsewhere."""
    if not all(hasattr(os, f) for f in ("pwrite", "preadv", "ftruncate")):
        raise EngineUnsupported("the engine writer needs POSIX pread/pwrite")


class CopySource:
    """A source file's open handle, with what the copy needs to know of it (holes)."""

    def __init__(self, source: Source):
        self.path = source.name
        self.source = source  # counts what is read (`bytes_read`)
        # the Source owns the descriptor; a remote one has none (its bytes come by `readinto`)
        self.fd: int | None = None if source.remote else source.fd
        self.stat = os.fstat(self.fd) if self.fd is not None else None
        self.size = source.size
        blocks = getattr(self.stat, "st_blocks", None)
        self.sparse = self.stat is not None and blocks is not None and blocks * 512 < self.stat.st_size

    def segments(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Split `[offset, offset + length)` into `(offset, length, is_hole)` runs."""
        end = offset + length
        if self.fd is None or not self.sparse or not hasattr(os, "SEEK_DATA"):
            yield (offset, length, False)
            return
        pos = offset
        while pos < end:
            try:
                data = min(os.lseek(self.fd, pos, os.SEEK_DATA), end)
            except OSError as e:
                if e.errno != errno.ENXIO:  # no hole support: treat everything as data
                    yield (pos, end - pos, False)
                    return
                data = end  # only a hole up to the end of the file
            if data > pos:
                yield (pos, data - pos, True)
                pos = data
            if pos >= end:
                break
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            yield (pos, hole - pos, False)
            pos = hole


def check_sources(needs: Iterable[tuple[StorageMeta, int]], out_fd: int, out_name: str) -> dict[Source, CopySource]:
    """The sources of the storages in `needs` (storage, bytes of its file it needs up to), each
    checked to be unchanged, long enough, and not the output itself."""
    sources: dict[Source, CopySource] = {}
    out_stat = os.fstat(out_fd)
    for storage, end in needs:
        source = storage.source
        src = sources.get(source)
        if src is None:
            source.check_unchanged()
            src = sources[source] = CopySource(source)
            if src.stat is not None and (src.stat.st_dev, src.stat.st_ino) == (out_stat.st_dev, out_stat.st_ino):
                raise OutputError(f"{out_name}: the output is also an input ({src.path})")
        if end > src.size:
            raise BadCheckpointError(
                f"{source}: file is truncated: storage {storage.key!r} needs bytes up to {end}, the file has {src.size}"
            )
    return sources


class Copier:
    """Appends bytes to a file descriptor: small writes buffered, source ranges copied."""

    def __init__(self, fd: int, ahead: ReadAhead | None = None):
        self.fd = fd
        self.ahead = ahead  # the remote ranges `copy` is given, read in advance
        self.pos = 0  # logical end of the output, including `pending`
        self.pending = bytearray()  # small writes not yet issued
        self.buffer: memoryview | None = None
        self.crc_buffer: memoryview | None = None
        self.kernel_copy = hasattr(os, "copy_file_range")
        self.written_back = 0  # output bytes the kernel was asked to start writing to disk

    def start_writeback(self, end: int) -> None:
        """Have the kernel start writing the output up to `end` to disk (this returns at once):
        the disk works while later bytes are copied, and the fsync that makes the output durable
        waits only for the rest. (POSIX_FADV_DONTNEED starts writeback on Linux; dirty pages stay
        cached.) Called as copies progress, so a 1 GB tensor does not wait for its last byte."""
        if end - self.written_back >= _WRITEBACK_STEP and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.written_back, end - self.written_back, os.POSIX_FADV_DONTNEED)
            self.written_back = end

    def write(self, b: bytes | bytearray | memoryview) -> None:
        """Append `b` (buffered: small writes are issued together)."""
        self.pending += b
        self.pos += len(b)
        if len(self.pending) >= CHUNK:
            self.flush()

    def write_through(self, b: memoryview) -> None:
        """Append `b` unbuffered (a large block: no copy into the buffer)."""
        self.flush()
        pwrite_all(self.fd, b, self.pos)
        self.pos += len(b)
        self.start_writeback(self.pos)

    def flush(self) -> None:
        if self.pending:
            pwrite_all(self.fd, memoryview(self.pending), self.pos - len(self.pending))
            self.pending = bytearray()

    def finish(self) -> None:
        """Issue what is buffered and give the file its logical length (a hole at the end of
        the output is not written, so the file would be short)."""
        self.flush()
        if os.fstat(self.fd).st_size != self.pos:
            os.ftruncate(self.fd, self.pos)

    def copy(self, src: CopySource, offset: int, length: int, *, want_crc: bool) -> int:
        """Append `length` bytes of `src` from `offset`; return their CRC-32 if `want_crc`.

        Holes in the source are skipped (they read as zeros in the output too).
        """
        self.flush()
        crc = 0
        if src.fd is None and self.ahead is not None and length:
            for piece in self.ahead.take(src.source, offset, length):
                if want_crc:
                    crc = crc32(piece, crc)
                pwrite_all(self.fd, piece, self.pos)
                self.pos += len(piece)
                self.start_writeback(self.pos)
            return crc
        for seg_offset, seg_length, is_hole in src.segments(offset, length):
            if is_hole:
                if want_crc:
                    crc = crc32_zeros(crc, seg_length)
            elif want_crc and self.kernel_copy and src.fd is not None and seg_length >= _THREADED_CRC_MIN:
                crc = self._copy_kernel_crc_threaded(src, seg_offset, seg_length, self.pos, crc)
            elif want_crc:
                crc = self._copy_with_crc(src, seg_offset, seg_length, self.pos, crc)
            else:
                self._copy_plain(src, seg_offset, seg_length, self.pos)
            self.pos += seg_length
        return crc

    def _chunk_buffer(self) -> memoryview:
        if self.buffer is None:
            self.buffer = memoryview(bytearray(_BUFFER))
        return self.buffer

    def _copy_kernel_crc_threaded(self, src: CopySource, offset: int, length: int, out_pos: int, crc: int) -> int:
        """Copy in the kernel while a second thread reads the same source bytes for the CRC-32
        (both release the GIL): about the speed of a plain copy on two cores."""
        result: dict[str, Any] = {}
        if self.crc_buffer is None:  # the copier may need `buffer` (fallback): not shared
            self.crc_buffer = memoryview(bytearray(_BUFFER))
        crc_buffer = self.crc_buffer

        def compute() -> None:
            try:
                result["crc"] = crc32_range(src, offset, length, crc, crc_buffer)
            except BaseException as e:  # re-raised in the calling thread
                result["error"] = e

        worker = threading.Thread(target=compute, name="ckptsurgeon-crc32", daemon=True)
        worker.start()
        try:
            self._copy_plain(src, offset, length, out_pos)
        finally:
            worker.join()
        if "error" in result:
            raise result["error"]
        return int(result["crc"])

    def _copy_with_crc(self, src: CopySource, offset: int, length: int, out_pos: int, crc: int) -> int:
        done = 0
        for piece in read_pieces(src, offset, length, self._chunk_buffer()):
            crc = crc32(piece, crc)
            pwrite_all(self.fd, piece, out_pos + done)
            done += len(piece)
            self.start_writeback(out_pos + done)
        return crc

    def _copy_plain(self, src: CopySource, offset: int, length: int, out_pos: int) -> None:
        done = 0
        while done < length and self.kernel_copy and src.fd is not None:
            try:
                n = os.copy_file_range(
                    src.fd,
                    self.fd,
                    min(_KERNEL_COPY_CHUNK, length - done),
                    offset + done,
                    out_pos + done,
                )
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.kernel_copy = False
                break
            if n == 0:
                raise BadCheckpointError(f"{src.path}: file is truncated at byte {offset + done}")
            src.source.count(n)
            done += n
            self.start_writeback(out_pos + done)
        if done < length:
            self._copy_with_crc(src, offset + done, length - done, out_pos + done, 0)  # CRC unused


# -- reading remote ranges ahead of the writer ----------------------------------------------------


class _Request(NamedTuple):
    """One ranged GET: bytes [lo, hi) of `source`, which hold `ranges` ((offset, length), in
    order) and whatever lies between them (records' headers and data descriptors)."""

    source: Any  # a RemoteSource (engine.remote is imported only when a URL is read)
    lo: int
    hi: int
    ranges: list[tuple[int, int]]


def plan_requests(ranges: Sequence[tuple[Source, int, int]]) -> list[_Request]:
    """The requests that read `ranges` of remote sources, in the order given: a range that starts
    at most MERGE_GAP after the previous one ends, in the same source, shares its request (up to
    REQUEST_MAX bytes); a request also covers the bytes that the deferred checks of its ranges
    read (local headers, data descriptors) when they lie within NEAR of it."""
    from .remote import NEAR

    groups: list[tuple[Source, list[tuple[int, int]]]] = []
    for source, offset, length in ranges:
        if not source.remote or length <= 0:
            continue
        if groups:
            last_source, last = groups[-1]
            first, end = last[0][0], last[-1][0] + last[-1][1]
            if last_source is source and end <= offset <= end + MERGE_GAP and offset + length - first <= REQUEST_MAX:
                last.append((offset, length))
                continue
        groups.append((source, [(offset, length)]))
    requests = []
    for source, group in groups:
        start, end = group[0][0], group[-1][0] + group[-1][1]
        spans = cast("RemoteSource", source).check_spans(start, end)
        lo = min([start] + [s for s, _ in spans if start - NEAR <= s < start])
        hi = min(source.size, max([end] + [e for _, e in spans if end < e <= end + NEAR]))
        requests.append(_Request(source, lo, hi, group))
    return requests


def read_ahead(ranges: Sequence[tuple[Source, int, int]], streams: int) -> ReadAhead | None:
    """A ReadAhead of `ranges` ((source, offset, length), in the order they will be copied), or
    None when no source is remote (a local file is copied in the kernel as it comes)."""
    return ReadAhead(ranges, streams) if any(source.remote for source, _, _ in ranges) else None


class ReadAhead:
    """The remote ranges a writer will copy, read ahead of it: `take` them in the order given.

    Requests (see `plan_requests`) run `streams` at a time (AHEAD_STREAMS at most), each in a
    thread that streams its answer into a window of AHEAD_WINDOW bytes, so that memory stays
    bounded whatever the sizes. A range's deferred checks (its zip record's local header and
    data descriptor, which come with the request) run before `take` hands on the range's end;
    its CRC-32 is the writer's to check, as for a local copy. `close()` stops what still runs."""

    def __init__(self, ranges: Sequence[tuple[Source, int, int]], streams: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self._requests = plan_requests(ranges)
        streams = max(1, min(streams, AHEAD_STREAMS, len(self._requests)))
        self._window = AHEAD_WINDOW
        self._queues = [_Window(self._window) for _ in self._requests]
        self._order = [
            (r.source, offset, length, i) for i, r in enumerate(self._requests) for offset, length in r.ranges
        ]
        self._next = 0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="ckptsurgeon-get") if self._requests else None
        for i in range(len(self._requests)):  # run in this order, `streams` at a time
            assert self._pool is not None
            self._pool.submit(self._read, i)

    def take(self, source: Source, offset: int, length: int) -> Iterator[memoryview]:
        """The bytes [offset, offset + length) of `source`, in pieces: the next range planned."""
        if self._next >= len(self._order) or self._order[self._next][:3] != (source, offset, length):
            raise AssertionError(f"ReadAhead: {source}[{offset}:+{length}] asked out of the planned order")
        i = self._order[self._next][3]
        self._next += 1
        q = self._queues[i]
        while True:
            kind, item = q.get()
            if kind == "data":
                yield item
            elif kind == "end":
                return
            else:
                raise item

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the reading threads

    def _read(self, i: int) -> None:
        request, q = self._requests[i], self._queues[i]
        try:
            if not self._stop.is_set():
                _stream_request(request, lambda item: q.put(item, self._stop), self._window)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the writer, raised where it takes the range
            with contextlib.suppress(_Stopped):
                q.put(("error", exc), self._stop)


class _Window:
    """What one request has read and the writer has not taken yet: a queue of (kind, item) that
    holds at most `limit` bytes of data (or one item, whatever its size)."""

    def __init__(self, limit: int):
        self._items: deque[tuple[str, Any]] = deque()
        self._held = 0
        self._limit = limit
        self._changed = threading.Condition()

    def put(self, item: tuple[str, Any], stop: threading.Event) -> None:
        """Append `item`, waiting while the window is full; _Stopped once `stop` is set."""
        size = len(item[1]) if item[0] == "data" else 0
        with self._changed:
            while self._held and self._held + size > self._limit:
                if stop.is_set():
                    raise _Stopped
                self._changed.wait(0.1)
            self._items.append(item)
            self._held += size
            self._changed.notify_all()

    def get(self) -> tuple[str, Any]:
        with self._changed:
            while not self._items:
                self._changed.wait()
            item = self._items.popleft()
            if item[0] == "data":
                self._held -= len(item[1])
            self._changed.notify_all()
            return item


class _Stopped(Exception):
    """The writer closed the ReadAhead: a reading thread ends quietly."""


def _stream_request(request: _Request, put: Any, window: int) -> None:
    """Stream `request`, putting ("data", piece) for the bytes of its ranges and ("end", None)
    after each range, once the checks of its record have run on the bytes that went by. Where the
    backend cannot stream an answer, requests are `window` bytes at most."""
    source, lo, hi, ranges = request
    checks = [c for offset, length in ranges for c in source.take_checks(offset, offset + length)]
    gaps: list[tuple[int, bytes]] = []  # bytes between the ranges, kept for the checks
    ends = [offset + length for offset, length in ranges]
    r = done = 0  # the range being read; the ranges whose end was put

    def close_ranges(upto: int, reached: int) -> None:
        """Run the checks whose bytes went by (all those of ranges before `upto`), then put the
        end of every range before `upto`."""
        nonlocal done
        due = [c for c in checks if c[0][1] <= reached or (upto and c[0][0] < ends[upto - 1])]
        for c in due:
            checks.remove(c)
            source.run_check(c[1], list(gaps))
        keep = min((span[0] for span, _ in checks), default=reached)
        gaps[:] = [g for g in gaps if g[0] + len(g[1]) > keep]
        while done < upto:
            put(("end", None))
            done += 1

    pos = lo
    for piece in source.stream(lo, hi, whole=window):
        view, base = memoryview(piece), pos
        pos += len(view)
        at = base
        while at < pos:
            if r < len(ranges) and ranges[r][0] <= at:
                if done < r:
                    close_ranges(r, at)
                stop = min(pos, ends[r])
                put(("data", view[at - base : stop - base]))
                if stop == ends[r]:
                    r += 1
            else:
                stop = min(pos, ranges[r][0] if r < len(ranges) else hi)
                chunk = bytes(view[at - base : stop - base])
                if gaps and gaps[-1][0] + len(gaps[-1][1]) == at:
                    gaps[-1] = (gaps[-1][0], gaps[-1][1] + chunk)
                else:
                    gaps.append((at, chunk))
            at = stop
    close_ranges(len(ranges), pos)  # checks whose bytes lie beyond the request read them themselves


def read_pieces(src: CopySource, offset: int, length: int, buf: memoryview) -> Iterator[memoryview]:
    """`length` bytes of `src` from `offset`, read through `buf` piece by piece (each piece a view
    of `buf`, valid until the next); a file that ends first is a BadCheckpointError."""
    done = 0
    while done < length:
        n = pread(src, buf[: min(len(buf), length - done)], offset + done)
        if n == 0:
            raise BadCheckpointError(f"{src.path}: file is truncated at byte {offset + done}")
        yield buf[:n]
        done += n


def crc32_range(src: CopySource, offset: int, length: int, crc: int, buf: memoryview) -> int:
    """The CRC-32 of `length` bytes of `src` from `offset`, continuing `crc`, read through `buf`."""
    for piece in read_pieces(src, offset, length, buf):
        crc = crc32(piece, crc)
    return crc


def pread(src: CopySource, buf: memoryview, offset: int) -> int:
    """One positioned read into `buf` (counted on the source); 0 at the end of the file."""
    try:
        if src.fd is None:  # a remote source: a full read, or a BadCheckpointError that says why not
            src.source.readinto(buf, offset)
            return len(buf)
        n = os.preadv(src.fd, [buf], offset)
        src.source.count(n)
        return n
    except OSError as e:
        raise BadCheckpointError(f"{src.path}: read error: {e.strerror or e}") from e


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
