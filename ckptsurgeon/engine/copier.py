"""Copying storage bytes from source files into an output file: the copy machinery that the
torch zip writer (`zipwrite`) and the safetensors writer (`safetensors_write`) share.

Bytes travel with `os.copy_file_range` (in the kernel), or `pread`/`pwrite` in 16 MiB chunks when
the kernel cannot copy. A CRC-32 of the copied bytes, when asked for, is computed by a second
thread reading the same bytes while the kernel copies them. Holes of a sparse source stay holes in
the output. The kernel is asked to start writing the output to disk as the copy progresses, so
that the final fsync waits only for the rest. Every byte read is counted on its Source. Memory use
does not grow with the tensors. POSIX only (pread/pwrite).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ckptsurgeon.engine.crc import crc32, crc32_zeros
from ckptsurgeon.engine.meta import StorageMeta
from ckptsurgeon.engine.source import Source
from ckptsurgeon.errors import BadCheckpointError, EngineUnsupported, OutputError

CHUNK = 16 << 20  # the buffer of small writes is issued at this size
_BUFFER = 4 << 20  # one pread (CRC-32 alongside a kernel copy, or a copy through memory): a writer per
# thread (sharded outputs) keeps at most two of them, so eight threads stay within 64 MiB
_KERNEL_COPY_CHUNK = 64 << 20  # one copy_file_range call; writeback is started between calls
_WRITEBACK_STEP = 16 << 20  # start writing the output to disk every this many bytes
_THREADED_CRC_MIN = 8 << 20  # below this a thread costs more than it saves


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

    def __init__(self, fd: int):
        self.fd = fd
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
        buf = self._chunk_buffer()
        done = 0
        while done < length:
            n = pread(src, buf[: min(len(buf), length - done)], offset + done)
            if n == 0:
                raise BadCheckpointError(f"{src.path}: file is truncated at byte {offset + done}")
            crc = crc32(buf[:n], crc)
            pwrite_all(self.fd, buf[:n], out_pos + done)
            done += n
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


def crc32_range(src: CopySource, offset: int, length: int, crc: int, buf: memoryview) -> int:
    """The CRC-32 of `length` bytes of `src` from `offset`, continuing `crc`, read through `buf`."""
    done = 0
    while done < length:
        n = pread(src, buf[: min(len(buf), length - done)], offset + done)
        if n == 0:
            raise BadCheckpointError(f"{src.path}: file is truncated at byte {offset + done}")
        crc = crc32(buf[:n], crc)
        done += n
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
