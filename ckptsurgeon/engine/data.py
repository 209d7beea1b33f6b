"""Reading the bytes of storages described by :class:`StorageMeta`, without torch.

Every read is a positioned read (`pread`) of the source file: nothing is mapped, nothing is read
twice, and memory stays bounded by the span or chunk asked for. Files are opened only after
`os.stat` says they are regular files, so a FIFO or a device never blocks or misbehaves.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Callable, Iterator

from ..errors import BadCheckpointError
from .meta import StorageMeta

DEFAULT_CHUNK = 16 << 20


def open_regular(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open `path` read-only if it is a regular file; return (fd, size). The caller closes fd.

    Raises BadCheckpointError for a missing, unreadable or non-regular file (directory, FIFO,
    device, socket) without ever opening a non-regular one.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise BadCheckpointError(f"{name}: no such file") from None
    except OSError as e:
        raise BadCheckpointError(f"{name}: cannot stat: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadCheckpointError(f"{name}: not a regular file ({_kind(st.st_mode)})")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open does not block
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BadCheckpointError(f"{name}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BadCheckpointError(f"{name}: not a regular file ({_kind(st.st_mode)})")
    return fd, st.st_size


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def pread_exact(fd: int, buf: bytearray | memoryview, offset: int, path: str) -> None:
    """Fill `buf` from `offset` of fd; a short read means the file is shorter than expected."""
    view = memoryview(buf)
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise BadCheckpointError(
                f"{path}: truncated or changed while reading: no data at byte {offset + done}"
            )
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
        raise ValueError(
            f"byte span [{start}, {end}) is outside storage {storage.key!r} of {storage.nbytes} bytes"
        )


def read_bytes(storage: StorageMeta, start: int, end: int) -> bytearray:
    """Bytes [start, end) of `storage`, read from its source file into a new bytearray.

    Pass `TensorMeta.span` to get the bytes a tensor occupies (for a non-contiguous tensor this
    includes the gaps between its elements).
    """
    if start == end:
        return bytearray()
    _check_span(storage, start, end)
    buf = bytearray(end - start)
    fd, _ = open_regular(storage.source)
    try:
        pread_exact(fd, buf, storage.data_offset + start, storage.source)
    finally:
        os.close(fd)
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
        fd, _ = open_regular(storage.source)
        try:
            pos = start
            while pos < end:
                n = min(len(buf), end - pos)
                chunk = view[:n]
                pread_exact(fd, chunk, storage.data_offset + pos, storage.source)
                if check:
                    crc = zlib.crc32(chunk, crc)
                pos += n
                yield chunk
        finally:
            os.close(fd)
    if check and crc != storage.crc32:
        raise crc_mismatch(storage, crc)


def crc_mismatch(storage: StorageMeta, actual: int) -> BadCheckpointError:
    """The error for a record whose bytes do not match its stored CRC-32."""
    record = storage.record_name or f"storage {storage.key}"
    return BadCheckpointError(
        f"{storage.source}: CRC-32 mismatch in record {record} "
        f"(stored {storage.crc32:08x}, computed {actual:08x}): the data is corrupt"
    )


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
    actual = crc()
    if actual != storage.crc32:
        raise crc_mismatch(storage, actual)


def verify_crc(storage: StorageMeta) -> None:
    """Stream the whole record of `storage` and check its CRC-32 (no-op when it has none)."""
    if storage.crc32 is None:
        return
    for _chunk in iter_chunks(storage, 0, storage.nbytes):
        pass
