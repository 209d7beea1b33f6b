"""Write a `torch.save`-compatible zip file by copying storage bytes from source files.

The layout is the one torch 2.13's `PyTorchStreamWriter` (miniz) produces: stored records with
local headers flagged 0x0808 and a data descriptor, an `FB` extra field padding each record's data
to a multiple of 64, zip64 extras past 4 GiB and a zip64 end record always. For the same object
graph the file equals `torch.save`'s byte for byte, except `.data/serialization_id` (random).

Storage bytes travel with `os.copy_file_range` (in the kernel), or `pread`/`pwrite` in 16 MiB
chunks when the kernel cannot copy. A CRC-32 is reused from the source record when a whole record
is copied, else computed by a second thread reading the same bytes while the kernel copies them.
Holes of a sparse source stay holes in the output. Memory use does not grow with the tensors.
POSIX only (pread/pwrite); elsewhere it raises EngineUnsupported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from ckptsurgeon.engine.crc import crc32, crc32_zeros
from ckptsurgeon.engine.data import check_read_crc
from ckptsurgeon.engine.pickle_write import PlannedStorage, pickle_graph
from ckptsurgeon.engine.source import Source
from ckptsurgeon.errors import BadCheckpointError, EngineUnsupported, OutputError

_ZIP64_LIMIT = 0xFFFFFFFF  # miniz switches to zip64 fields at sizes/offsets >= this
_ALIGNMENT = 64  # torch's storage alignment
_CHUNK = 16 << 20
_KERNEL_COPY_CHUNK = 64 << 20  # one copy_file_range call; writeback is started between calls
_WRITEBACK_STEP = 16 << 20  # start writing the output to disk every this many bytes
_THREADED_CRC_MIN = 8 << 20  # below this a thread costs more than it saves
_LOCAL_SIG = 0x04034B50
_DESCRIPTOR_SIG = 0x08074B50
_CENTRAL_SIG = 0x02014B50
_ZIP64_END_SIG = 0x06064B50
_ZIP64_LOCATOR_SIG = 0x07064B50
_END_SIG = 0x06054B50
_FLAGS_DESCRIPTOR = 0x0808  # data descriptor follows + UTF-8 names
_FLAGS_EMPTY = 0x0800  # UTF-8 names only


def write_torch_zip(
    obj: Any,
    out: BinaryIO,
    *,
    archive_name: str,
    progress: Callable[[int], None] | None = None,
    name: str | None = None,
) -> None:
    """Write `obj` (an object graph with TensorMeta leaves) to `out` as `torch.save` would.

    `out` is a new binary file opened for writing and positioned at 0 (it is truncated first);
    the caller owns it: this function neither closes nor fsyncs it. `archive_name` is the record
    prefix, the output file's basename without extension for `torch.save` compatibility.
    Storages shared by several tensors are written once; a storage only partly used is cut to
    the union of its tensors' spans. Raises EngineUnsupported (before writing anything) for a
    graph it cannot represent, BadCheckpointError if a source file is missing or too short, and
    OutputError if writing fails or the output is one of the sources. `progress` is called with
    the number of bytes of each storage once it is written. `name` is what error messages call
    the output (default: `out.name`, when that is a path and not a file descriptor).
    """
    if not all(hasattr(os, f) for f in ("pwrite", "preadv", "ftruncate")):
        raise EngineUnsupported("the engine writer needs POSIX pread/pwrite")
    if not archive_name or "/" in archive_name or "\0" in archive_name:
        raise ValueError(f"invalid archive name {archive_name!r}")
    graph = pickle_graph(obj)
    out.flush()
    if out.tell() != 0:
        raise ValueError("write_torch_zip needs an output positioned at offset 0")
    fd = out.fileno()
    import fcntl  # POSIX only, like pwrite

    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        raise ValueError("write_torch_zip cannot write to a file opened for appending")
    out_name = name if name is not None else getattr(out, "name", None)
    if not isinstance(out_name, str):  # os.fdopen's file objects are named by their fd number
        out_name = "<output>"
    sources = _check_sources(graph.storages)
    out_stat = os.fstat(fd)
    for src in sources.values():
        if src.stat is not None and (src.stat.st_dev, src.stat.st_ino) == (out_stat.st_dev, out_stat.st_ino):
            raise OutputError(f"{out_name}: the output is also an input ({src.path})")
    try:
        os.ftruncate(fd, 0)
        end = _write_archive(fd, graph.data, graph.storages, sources, archive_name, progress)
    except OSError as e:
        raise OutputError(f"{out_name}: cannot write: {e.strerror or e}") from e
    out.seek(end)


def _write_archive(
    fd: int,
    data_pkl: bytes,
    storages: list[PlannedStorage],
    sources: dict[Source, _Source],
    prefix: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    w = _ZipWriter(fd)
    w.add_bytes(f"{prefix}/data.pkl", data_pkl)
    w.add_bytes(f"{prefix}/.format_version", b"1")
    w.add_bytes(f"{prefix}/.storage_alignment", str(_ALIGNMENT).encode())
    w.add_bytes(f"{prefix}/byteorder", b"little")
    for key, planned in enumerate(storages):
        w.add_storage(f"{prefix}/data/{key}", planned, sources[planned.source.source])
        if progress is not None:
            progress(planned.nbytes)
    w.add_bytes(f"{prefix}/version", b"3\n")
    # torch's form: two random 64-bit numbers, 20 digits each (os.urandom: `secrets` imports hashlib)
    serialization_id = "".join(f"{int.from_bytes(os.urandom(8), 'little'):020d}" for _ in range(2))
    w.add_bytes(f"{prefix}/.data/serialization_id", serialization_id.encode())
    w.finish()
    return w.pos


class _Source:
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


def _check_sources(storages: list[PlannedStorage]) -> dict[Source, _Source]:
    """The sources of `storages`, each checked to be unchanged and long enough."""
    sources: dict[Source, _Source] = {}
    for planned in storages:
        source = planned.source.source
        src = sources.get(source)
        if src is None:
            source.check_unchanged()
            src = sources[source] = _Source(source)
        end = planned.data_offset + planned.nbytes
        if end > src.size:
            raise BadCheckpointError(
                f"{source}: file is truncated: storage {planned.source.key!r} needs bytes up "
                f"to {end}, the file has {src.size}"
            )
    return sources


class _ZipWriter:
    """Appends stored records to a file descriptor and remembers them for the central directory."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pos = 0  # logical end of the archive, including `pending`
        self.pending = bytearray()  # small writes not yet issued
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, size, header offset, crc
        self.buffer: memoryview | None = None
        self.crc_buffer: memoryview | None = None
        self.kernel_copy = hasattr(os, "copy_file_range")
        self.written_back = 0  # output bytes the kernel was asked to start writing to disk

    # -- records ------------------------------------------------------------------------------

    def add_bytes(self, name: str, data: bytes) -> None:
        header_offset = self.pos
        self.write(_local_header(name.encode("utf-8"), len(data), header_offset))
        self.write(data)
        crc = crc32(data)
        if data:
            self.write(_descriptor(crc, len(data), header_offset))
        self.entries.append((name.encode("utf-8"), len(data), header_offset, crc))

    def add_storage(self, name: str, planned: PlannedStorage, src: _Source) -> None:
        size = planned.nbytes
        header_offset = self.pos
        self.write(_local_header(name.encode("utf-8"), size, header_offset))
        crc = 0
        if size:
            # The source's CRC is checked, never trusted: torch does not check it on load, and
            # a flipped byte copied on would carry the old CRC into the output.
            crc = self.copy(src, planned.data_offset, size, want_crc=True)
            check_read_crc(planned.source, whole=planned.is_whole, crc=lambda: crc)
            self.write(_descriptor(crc, size, header_offset))
        self.entries.append((name.encode("utf-8"), size, header_offset, crc))

    def start_writeback(self, end: int) -> None:
        """Have the kernel start writing the output up to `end` to disk (this returns at once):
        the disk works while later bytes are copied, and the fsync that makes the output durable
        waits only for the rest. (POSIX_FADV_DONTNEED starts writeback on Linux; dirty pages stay
        cached.) Called as copies progress, so a 1 GB tensor does not wait for its last byte."""
        if end - self.written_back >= _WRITEBACK_STEP and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.written_back, end - self.written_back, os.POSIX_FADV_DONTNEED)
            self.written_back = end

    def finish(self) -> None:
        cd_offset = self.pos
        for name, size, header_offset, crc in self.entries:
            self.write(_central_entry(name, size, header_offset, crc))
        cd_size = self.pos - cd_offset
        n = len(self.entries)
        zip64_end = self.pos
        self.write(struct.pack("<IQHHIIQQQQ", _ZIP64_END_SIG, 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_offset))
        self.write(struct.pack("<IIQI", _ZIP64_LOCATOR_SIG, 0, zip64_end, 1))
        self.write(
            struct.pack(
                "<IHHHHIIH",
                _END_SIG,
                0,
                0,
                min(n, 0xFFFF),
                min(n, 0xFFFF),
                min(cd_size, _ZIP64_LIMIT),
                min(cd_offset, _ZIP64_LIMIT),
                0,
            )
        )
        self.flush()

    # -- bytes --------------------------------------------------------------------------------

    def write(self, b: bytes) -> None:
        self.pending += b
        self.pos += len(b)
        if len(self.pending) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            _pwrite_all(self.fd, memoryview(self.pending), self.pos - len(self.pending))
            self.pending = bytearray()

    def copy(self, src: _Source, offset: int, length: int, *, want_crc: bool) -> int:
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
            self.buffer = memoryview(bytearray(_CHUNK))
        return self.buffer

    def _copy_kernel_crc_threaded(self, src: _Source, offset: int, length: int, out_pos: int, crc: int) -> int:
        """Copy in the kernel while a second thread reads the same source bytes for the CRC-32
        (both release the GIL): about the speed of a plain copy on two cores."""
        result: dict[str, Any] = {}
        if self.crc_buffer is None:  # the copier may need `buffer` (fallback): not shared
            self.crc_buffer = memoryview(bytearray(_CHUNK))
        crc_buffer = self.crc_buffer

        def compute() -> None:
            try:
                result["crc"] = _crc32_range(src, offset, length, crc, crc_buffer)
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

    def _copy_with_crc(self, src: _Source, offset: int, length: int, out_pos: int, crc: int) -> int:
        buf = self._chunk_buffer()
        done = 0
        while done < length:
            n = _pread(src, buf[: min(_CHUNK, length - done)], offset + done)
            if n == 0:
                raise BadCheckpointError(f"{src.path}: file is truncated at byte {offset + done}")
            crc = crc32(buf[:n], crc)
            _pwrite_all(self.fd, buf[:n], out_pos + done)
            done += n
            self.start_writeback(out_pos + done)
        return crc

    def _copy_plain(self, src: _Source, offset: int, length: int, out_pos: int) -> None:
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


def _crc32_range(src: _Source, offset: int, length: int, crc: int, buf: memoryview) -> int:
    done = 0
    while done < length:
        n = _pread(src, buf[: min(len(buf), length - done)], offset + done)
        if n == 0:
            raise BadCheckpointError(f"{src.path}: file is truncated at byte {offset + done}")
        crc = crc32(buf[:n], crc)
        done += n
    return crc


def _pread(src: _Source, buf: memoryview, offset: int) -> int:
    if src.fd is None:  # a remote source: a full read, or a BadCheckpointError that says why not
        src.source.readinto(buf, offset)
        return len(buf)
    try:
        n = os.preadv(src.fd, [buf], offset)
        src.source.count(n)
        return n
    except OSError as e:
        raise BadCheckpointError(f"{src.path}: read error: {e.strerror or e}") from e


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


# -- zip structures -----------------------------------------------------------------------------


def _local_header(name: bytes, size: int, offset: int) -> bytes:
    """Local file header with miniz's zip64 extra (if any) and torch's `FB` padding extra."""
    zip64 = b""
    if size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT:
        fields = b""
        if size >= _ZIP64_LIMIT:
            fields += struct.pack("<QQ", size, 0)  # miniz writes compressed size 0 here
        if offset >= _ZIP64_LIMIT:
            fields += struct.pack("<Q", offset)
        zip64 = struct.pack("<HH", 1, len(fields)) + fields
    data_start = offset + 30 + len(name) + len(zip64) + 4
    pad = -data_start % _ALIGNMENT
    extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    flags = _FLAGS_DESCRIPTOR if size else _FLAGS_EMPTY
    return struct.pack("<IHHHHHIIIHH", _LOCAL_SIG, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra)) + name + extra


def _descriptor(crc: int, size: int, offset: int) -> bytes:
    if size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT:
        return struct.pack("<IIQQ", _DESCRIPTOR_SIG, crc, size, size)
    return struct.pack("<IIII", _DESCRIPTOR_SIG, crc, size, size)


def _central_entry(name: bytes, size: int, offset: int, crc: int) -> bytes:
    fields = b""
    stored_size, stored_offset = size, offset
    if size >= _ZIP64_LIMIT:
        fields += struct.pack("<QQ", size, size)
        stored_size = _ZIP64_LIMIT
    if offset >= _ZIP64_LIMIT:
        fields += struct.pack("<Q", offset)
        stored_offset = _ZIP64_LIMIT
    extra = struct.pack("<HH", 1, len(fields)) + fields if fields else b""
    flags = _FLAGS_DESCRIPTOR if size else _FLAGS_EMPTY
    return (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            _CENTRAL_SIG,
            0,
            0,
            flags,
            0,
            0,
            0,
            crc,
            stored_size,
            stored_size,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            stored_offset,
        )
        + name
        + extra
    )
