"""Write a `torch.save`-compatible zip file by copying storage bytes from source files.

The layout is the one torch 2.13's `PyTorchStreamWriter` (miniz) produces: stored records with
local headers flagged 0x0808 and a data descriptor, an `FB` extra field padding each record's data
to a multiple of 64, zip64 extras past 4 GiB and a zip64 end record always. For the same object
graph the file equals `torch.save`'s byte for byte, except `.data/serialization_id` (random in
torch's files; drawn from the content here, so that writing a checkpoint twice gives one file).

Storage bytes are copied by the machinery of :mod:`~ckptsurgeon.engine.copier` (the kernel's
`copy_file_range`, a CRC-32 computed alongside and checked against the source record, holes kept,
writeback started as it goes). Memory use does not grow with the tensors. POSIX only
(pread/pwrite); elsewhere it raises EngineUnsupported.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, BinaryIO

from ckptsurgeon.engine.copier import Copier, CopySource, ReadAhead, check_posix, check_sources, read_ahead
from ckptsurgeon.engine.crc import crc32
from ckptsurgeon.engine.data import check_read_crc
from ckptsurgeon.engine.pickle_write import PlannedStorage, pickle_graph
from ckptsurgeon.engine.source import Source
from ckptsurgeon.errors import OutputError

_ZIP64_LIMIT = 0xFFFFFFFF  # miniz switches to zip64 fields at sizes/offsets >= this
_ALIGNMENT = 64  # torch's storage alignment
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
    threads: int = 1,
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
    the output (default: `out.name`, when that is a path and not a file descriptor). Records of a
    remote source are read ahead of the writer, up to `threads` requests at a time.
    """
    check_posix()
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
    sources = check_sources(((p.source, p.data_offset + p.nbytes) for p in graph.storages), fd, out_name)
    ahead = read_ahead([(p.source.source, p.data_offset, p.nbytes) for p in graph.storages], threads)
    try:
        os.ftruncate(fd, 0)
        end = _write_archive(fd, graph.data, graph.storages, sources, archive_name, progress, ahead)
    except OSError as e:
        raise OutputError(f"{out_name}: cannot write: {e.strerror or e}") from e
    finally:
        if ahead is not None:
            ahead.close()
    out.seek(end)


def _write_archive(
    fd: int,
    data_pkl: bytes,
    storages: list[PlannedStorage],
    sources: dict[Source, CopySource],
    prefix: str,
    progress: Callable[[int], None] | None = None,
    ahead: ReadAhead | None = None,
) -> int:
    w = _ZipWriter(fd, ahead)
    w.add_bytes(f"{prefix}/data.pkl", data_pkl)
    w.add_bytes(f"{prefix}/.format_version", b"1")
    w.add_bytes(f"{prefix}/.storage_alignment", str(_ALIGNMENT).encode())
    w.add_bytes(f"{prefix}/byteorder", b"little")
    for key, planned in enumerate(storages):
        w.add_storage(f"{prefix}/data/{key}", planned, sources[planned.source.source])
        if progress is not None:
            progress(planned.nbytes)
    w.add_bytes(f"{prefix}/version", b"3\n")
    w.add_bytes(f"{prefix}/.data/serialization_id", _serialization_id(data_pkl, w.entries))
    w.finish()
    return w.pos


def _serialization_id(data_pkl: bytes, entries: list[tuple[bytes, int, int, int]]) -> bytes:
    """torch's form (two 64-bit numbers, 20 digits each), drawn from the content instead of at
    random: the same checkpoint written twice, by one process or by the ranks of a torchrun
    job, is the same file byte for byte, and different contents get different ids (torch only
    logs the id, to tell files apart)."""
    import hashlib

    digest = hashlib.blake2b(data_pkl, digest_size=16)
    for name, size, _offset, crc in entries:
        digest.update(b"%s\0%d\0%d\0" % (name, size, crc))
    raw = digest.digest()
    return b"".join(b"%020d" % int.from_bytes(raw[i : i + 8], "little") for i in (0, 8))


class _ZipWriter(Copier):
    """Appends stored records to a file descriptor and remembers them for the central directory."""

    def __init__(self, fd: int, ahead: ReadAhead | None = None):
        super().__init__(fd, ahead)
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, size, header offset, crc

    # -- records ------------------------------------------------------------------------------

    def add_bytes(self, name: str, data: bytes) -> None:
        header_offset = self.pos
        self.write(_local_header(name.encode("utf-8"), len(data), header_offset))
        self.write(data)
        crc = crc32(data)
        if data:
            self.write(_descriptor(crc, len(data), header_offset))
        self.entries.append((name.encode("utf-8"), len(data), header_offset, crc))

    def add_storage(self, name: str, planned: PlannedStorage, src: CopySource) -> None:
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
        super().finish()


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
