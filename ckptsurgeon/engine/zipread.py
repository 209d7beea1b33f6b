"""Reading `torch.save`'s zip format: the ZIP directory by hand, then `data.pkl` through the
restricted unpickler, with every storage located (not read) in the file.

The ZIP layer is strict where torch is lax: members must be stored (never compressed or
encrypted), unique, non-overlapping, inside the file, with local headers and data descriptors that
agree with the central directory. Storage records must hold exactly the bytes their storage
needs, and `data.pkl` must pass its CRC-32.

It reads what torch's reader (miniz, through PyTorchStreamReader) reads, or refuses the file: the
end-of-central-directory record miniz takes, member names looked up with ASCII case folded, the
archive folder taken from the first member; whatever another ZIP reader could read differently
(a second end record, bytes after it or after the central directory, names differing only in
case) is refused as ambiguous.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import BadCheckpointError, EngineUnsupported
from .crc import crc32
from .meta import DTYPE_ITEMSIZE, RawCheckpoint, StorageMeta
from .pickle_checks import Malformed, container_budget, resolve_storage_id
from .source import Source
from .unpickle import unpickle

MAX_PICKLE_BYTES = 1 << 30  # a data.pkl larger than this is left to torch

# sig, disk, cd disk, entries on this disk, entries, cd size, cd offset, comment length
_EOCD = struct.Struct("<4s4H2IH")
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQ2H2I4Q")
_CENTRAL = struct.Struct("<4s6H3I5H2I")
_LOCAL = struct.Struct("<4s5H3I2H")
_U32_MAX = 0xFFFFFFFF
_U16_MAX = 0xFFFF
_TORCH_NAME_MAX = 511  # torch lists member names through a 512-byte buffer


class ZipMember(NamedTuple):
    """One stored member of a ZIP archive, as the central directory (checked against the local
    header) describes it."""

    name: str
    header_offset: int
    data_offset: int  # absolute offset of the first data byte
    size: int
    crc32: int
    flags: int


def _bad(path: str, reason: str) -> BadCheckpointError:
    return BadCheckpointError(f"{path}: {reason}")


def _zip64_values(extra: bytes, wanted: list[str], path: str, name: str) -> dict[str, int]:
    """Values of the zip64 extra field (0x0001) for the fields whose 32-bit value saturated."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == 0x0001:
            out = {}
            for i, field in enumerate(wanted):
                if field == "disk":
                    break
                if 8 * i + 8 > len(body):
                    raise _bad(path, f"member {name!r} has a zip64 extra field that is too short")
                out[field] = struct.unpack_from("<Q", body, 8 * i)[0]
            return out
        pos += 4 + length
    if wanted:
        raise _bad(path, f"member {name!r} needs a zip64 extra field but has none")
    return {}


_EOCD_SIG = b"PK\x05\x06"


def _ambiguous(path: str, reason: str) -> BadCheckpointError:
    return _bad(path, f"ambiguous ZIP archive: {reason}")


def _find_eocd(src: Source, file_size: int, path: str, base: int = 0) -> tuple[int, int, int, int]:
    """(entries, cd_size, cd_offset, end of the central directory region).

    The end-of-central-directory record is the one torch's reader (miniz) takes: the last
    signature with a whole record after it, comment length unchecked. Whatever another ZIP reader
    could take instead is refused as ambiguous: bytes after the record that its comment length
    does not cover, a signature in the comment, an earlier record whose comment reaches the end
    of the file, and any byte between the central directory and the end records.

    The archive is the bytes [base, file_size) of the file; the offsets returned are absolute.
    """
    tail_len = min(file_size - base, _EOCD.size + 0xFFFF)
    tail = src.pread(tail_len, file_size - tail_len)
    pos = tail.rfind(_EOCD_SIG, 0, max(0, len(tail) - _EOCD.size + len(_EOCD_SIG)))
    if pos < 0:
        raise _bad(
            path,
            "truncated or not a ZIP archive: no end-of-central-directory record at the end of the file",
        )
    _sig, disk, cd_disk, here, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, pos)
    eocd_offset = file_size - tail_len + pos
    after = len(tail) - pos - _EOCD.size  # bytes after the record: its comment, and nothing else
    if comment > after:
        raise _bad(
            path,
            f"truncated: the end-of-central-directory record at byte {eocd_offset} announces a "
            f"{comment}-byte comment but the file ends {after} bytes after it",
        )
    if comment < after:
        raise _ambiguous(
            path,
            f"{after - comment} bytes after the end-of-central-directory record at byte "
            f"{eocd_offset} that its comment length does not cover (torch reads that record; "
            "other ZIP readers look for another one)",
        )
    if _EOCD_SIG in tail[pos + _EOCD.size :]:
        raise _ambiguous(path, "the archive comment holds another end-of-central-directory signature")
    other = pos
    while (other := tail.rfind(_EOCD_SIG, 0, other)) >= 0:
        (other_comment,) = struct.unpack_from("<H", tail, other + 20)
        if other + _EOCD.size + other_comment == len(tail):
            raise _ambiguous(
                path,
                f"two end-of-central-directory records, at bytes {file_size - tail_len + other} "
                f"and {eocd_offset}, both reach the end of the file (torch reads the second)",
            )
    if disk or cd_disk or here != entries:
        raise _bad(path, "a multi-disk ZIP archive")
    region_end = eocd_offset
    loc_pos = pos - _EOCD64_LOCATOR.size
    if eocd_offset - base >= _EOCD64_LOCATOR.size:
        loc = tail[loc_pos:pos] if loc_pos >= 0 else src.pread(_EOCD64_LOCATOR.size, eocd_offset - _EOCD64_LOCATOR.size)
    else:
        loc = b""
    if loc[:4] == b"PK\x06\x07":
        _sig, disk64, eocd64_offset, disks = _EOCD64_LOCATOR.unpack(loc)
        eocd64_offset += base
        if disk64 != 0 or disks != 1:
            raise _bad(path, "a multi-disk ZIP64 archive")
        if eocd64_offset + _EOCD64.size > eocd_offset - _EOCD64_LOCATOR.size:
            raise _bad(path, "the ZIP64 end-of-central-directory record lies outside the file")
        rec = src.pread(_EOCD64.size, eocd64_offset)
        sig, size, _made, _need, disk, cd_disk, here64, entries64, cd_size64, cd_offset64 = _EOCD64.unpack(rec)
        if sig != b"PK\x06\x06":
            raise _bad(path, "corrupt ZIP64 end-of-central-directory record")
        if disk or cd_disk or here64 != entries64:
            raise _bad(path, "a multi-disk ZIP64 archive")
        gap = eocd_offset - _EOCD64_LOCATOR.size - eocd64_offset - _EOCD64.size
        if gap or size != _EOCD64.size - 12:
            raise _ambiguous(
                path,
                f"{gap + size - (_EOCD64.size - 12)} bytes between the ZIP64 end-of-central-directory "
                "record and its locator (torch ignores them; other ZIP readers may not)",
            )
        # torch takes the ZIP64 values; readers that use them only where the 32-bit fields are
        # saturated would take these: they must agree
        if (
            entries not in (entries64, _U16_MAX)
            or cd_size not in (cd_size64, _U32_MAX)
            or cd_offset not in (cd_offset64, _U32_MAX)
        ):
            raise _ambiguous(
                path,
                f"the end-of-central-directory record ({entries} entries, {cd_size} bytes at byte "
                f"{cd_offset}) and the ZIP64 one ({entries64} entries, {cd_size64} bytes at byte "
                f"{cd_offset64}) describe different central directories (torch reads the ZIP64 one)",
            )
        entries, cd_size, cd_offset = entries64, cd_size64, cd_offset64
        region_end = eocd64_offset
    elif _U32_MAX in (cd_size, cd_offset) or entries == _U16_MAX:
        raise _bad(path, "a ZIP64 archive without its ZIP64 end-of-central-directory locator")
    cd_offset += base
    if cd_offset + cd_size > region_end:
        raise _bad(path, "the ZIP central directory lies outside the file (truncated?)")
    if cd_offset + cd_size != region_end:
        raise _ambiguous(
            path,
            f"{region_end - cd_offset - cd_size} bytes between the central directory and the end "
            "records (torch ignores them; other ZIP readers may not)",
        )
    return entries, cd_size, cd_offset, region_end


def read_zip_directory(src: Source, file_size: int, path: str) -> list[ZipMember]:
    """All members of the ZIP archive open as `src`, in central-directory order, validated."""
    entries, cd_offset = _read_central(src, file_size, path)
    return _validate(src, entries, cd_offset, path)


_Entry = tuple[ZipMember, bytes, int, int]  # member, raw name, method, compressed size


def _read_central(src: Source, file_size: int, path: str, base: int = 0) -> tuple[list[_Entry], int]:
    """The central directory's entries (not yet validated) and its offset (absolute offsets of
    the archive at bytes [base, file_size) of the file)."""
    entries, cd_size, cd_offset, _ = _find_eocd(src, file_size, path, base)
    if entries * _CENTRAL.size > cd_size:
        raise _bad(path, f"the ZIP central directory is too small for {entries} entries")
    cd = src.pread(cd_size, cd_offset)
    out: list[_Entry] = []
    pos = 0
    for _ in range(entries):
        if pos + _CENTRAL.size > cd_size:
            raise _bad(path, "the ZIP central directory is truncated")
        (
            sig,
            _made,
            _need,
            flags,
            method,
            _time,
            _date,
            crc,
            csize,
            usize,
            nlen,
            elen,
            clen,
            disk,
            _iattr,
            _eattr,
            offset,
        ) = _CENTRAL.unpack_from(cd, pos)
        if sig != b"PK\x01\x02":
            raise _bad(path, f"corrupt ZIP central directory at byte {cd_offset + pos}")
        raw = cd[pos + 46 : pos + 46 + nlen]
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + elen]
        pos += 46 + nlen + elen + clen
        if pos > cd_size:
            raise _bad(path, "the ZIP central directory is truncated")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, f"a ZIP member name is not UTF-8: {raw!r:.60}") from None
        if usize == _U32_MAX or csize == _U32_MAX or offset == _U32_MAX or disk == _U16_MAX:
            wanted = [f for f, v in (("usize", usize), ("csize", csize), ("offset", offset)) if v == _U32_MAX]
            if disk == _U16_MAX:
                wanted.append("disk")
            z64 = _zip64_values(extra, wanted, path, name)
            usize = z64.get("usize", usize)
            csize = z64.get("csize", csize)
            offset = z64.get("offset", offset)
        out.append((ZipMember(name, base + offset, -1, usize, crc, flags), raw, method, csize))
    if pos != cd_size:
        raise _bad(path, "the ZIP central directory has trailing bytes")
    return out, cd_offset


def _validate(
    src: Source, entries: list[_Entry], cd_offset: int, path: str, storage_prefix: bytes | None = None
) -> list[ZipMember]:
    """Refuse duplicate, encrypted or compressed members; check every local header.

    Names are compared as torch's reader looks them up: ASCII case folded, so two members whose
    names differ only in case are duplicates too (which of them torch reads depends on its sort).
    With `storage_prefix` (b"archive/data/"), the local headers of a remote source's storage
    records are checked when they are first read (see `_locate_deferred`).
    """
    seen: dict[bytes, str] = {}
    for m, raw, method, csize in entries:
        folded = raw.lower()  # bytes.lower() folds ASCII only, as miniz's MZ_TOLOWER
        if folded in seen:
            if seen[folded] == m.name:
                raise _bad(path, f"duplicate ZIP member {m.name!r}")
            raise _ambiguous(
                path,
                f"members {seen[folded]!r} and {m.name!r} differ only in case (torch's reader "
                "does not tell them apart)",
            )
        seen[folded] = m.name
        if b"\x00" in raw:
            raise _bad(path, f"ZIP member name {m.name!r} holds a NUL byte (torch's reader cuts it there)")
        if m.header_offset >= cd_offset:  # a ZIP64 offset can be any 64-bit number
            raise _bad(path, f"ZIP member {m.name!r} starts past the central directory (corrupt file)")
        if m.flags & 0x41:
            raise _bad(path, f"ZIP member {m.name!r} is encrypted")
        if method != 0:
            raise _bad(
                path,
                f"ZIP member {m.name!r} is compressed (method {method}); torch.save never "
                "compresses, and inflating it could exhaust memory",
            )
        if csize != m.size:
            raise _bad(path, f"ZIP member {m.name!r} is stored with {csize} bytes but claims {m.size}")
    members, raw_names = [e[0] for e in entries], [e[1] for e in entries]
    if src.remote and storage_prefix is not None:
        return _locate_deferred(src, members, raw_names, cd_offset, path, storage_prefix)
    return _check_local_headers(src, members, raw_names, cd_offset, path)


class _Window:
    """Positioned reads served from one read-ahead buffer: dense runs of small records (many
    tiny tensors) cost a few large reads instead of one per header."""

    READ_AHEAD = 1 << 20

    def __init__(self, src: Source):
        self.src = src
        self.ahead = 0 if src.remote else self.READ_AHEAD  # a remote source caches small reads itself
        self.start = 0
        self.buf = b""

    def read(self, offset: int, size: int, ahead: bool) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at the end of the file)."""
        at = offset - self.start
        if 0 <= at and at + size <= len(self.buf):
            return self.buf[at : at + size]
        self.buf = self.src.read_upto(max(size, self.ahead if ahead else 0), offset)
        self.start = offset
        return self.buf[:size]


def _check_local_headers(
    src: Source, members: list[ZipMember], raw_names: list[bytes], cd_offset: int, path: str
) -> list[ZipMember]:
    """Read every local header (and data descriptor), fill in data offsets, check agreement."""
    located = _locate_plain(src, members, raw_names, cd_offset)
    if located is not None:
        return located
    return _locate_checked(src, members, raw_names, cd_offset, path)


def _locate_deferred(
    src: Source, members: list[ZipMember], raw_names: list[bytes], cd_offset: int, path: str, storage_prefix: bytes
) -> list[ZipMember]:
    """`_check_local_headers` for a remote source, where every read is a request: the records
    read now (`data.pkl`, the version records, ...) are located and checked as locally; a storage
    record's data offset is the one torch.save's writer gives it (its `FB` padding), and its
    local header and data descriptor are checked, that offset included, before its first byte is
    read. `inspect` thus reads no storage record's header. The first storage record's header is
    looked at now (it usually sits in what was read already): an archive that another writer laid
    out differently has every header read and checked now, as locally."""
    order = sorted(range(len(members)), key=[m.header_offset for m in members].__getitem__)
    limit = {i: members[j].header_offset for i, j in zip(order, order[1:])}
    if order:
        limit[order[-1]] = cd_offset
    now = [i for i in order if not raw_names[i].lower().startswith(storage_prefix) or not members[i].size]
    located = list(members)
    checked = _locate_checked(src, [members[i] for i in now], [raw_names[i] for i in now], cd_offset, path)
    for i, m in zip(now, checked):
        if m.data_offset + m.size > limit[i]:
            raise _bad(path, f"ZIP member {m.name!r} overlaps the next member (corrupt or truncated file)")
        located[i] = m
    read_now = set(now)
    later = [i for i in order if i not in read_now]
    if later:
        m = members[later[0]]
        head = src.read_upto(min(_LOCAL.size, limit[later[0]] - m.header_offset), m.header_offset)
        lengths = struct.unpack_from("<HH", head, 26) if len(head) == _LOCAL.size else (-1, -1)
        if m.header_offset + 30 + sum(lengths) != _torch_data_offset(m.header_offset, len(raw_names[later[0]]), m.size):
            return _check_local_headers(src, members, raw_names, cd_offset, path)  # not torch.save's layout
    for i in later:
        m, raw = members[i], raw_names[i]
        data_offset = _torch_data_offset(m.header_offset, len(raw), m.size)
        if data_offset + m.size > limit[i]:
            raise _bad(path, f"ZIP member {m.name!r} overlaps the next member (corrupt or truncated file)")
        located[i] = m = ZipMember(m.name, m.header_offset, data_offset, m.size, m.crc32, m.flags)
        span = (m.header_offset, min(limit[i], data_offset + m.size + 24))  # header .. data descriptor
        src.defer(data_offset, data_offset + m.size, _header_check(src, m, raw, limit[i], path), span)
    return located


def _torch_data_offset(header_offset: int, name_len: int, size: int) -> int:
    """Where torch.save's writer starts a record's data: after the local header, a zip64 extra
    (past 4 GiB) and the `FB` extra that pads the data to a multiple of 64 bytes."""
    zip64 = (16 if size >= _U32_MAX else 0) + (8 if header_offset >= _U32_MAX else 0)
    start = header_offset + 30 + name_len + (4 + zip64 if zip64 else 0) + 4
    return start + -start % 64


def _header_check(src: Source, m: ZipMember, raw: bytes, limit: int, path: str) -> Callable[[], None]:
    def check() -> None:
        (found,) = _locate_checked(src, [m], [raw], limit, path)
        if found.data_offset != m.data_offset:
            raise _bad(
                path,
                f"the local ZIP header of {m.name!r} puts its data at byte {found.data_offset}, not where "
                f"torch.save puts it ({m.data_offset}); a remote checkpoint is read in torch.save's layout "
                "only: download the file to read it",
            )

    return check


def _locate_plain(
    src: Source, members: list[ZipMember], raw_names: list[bytes], cd_offset: int
) -> list[ZipMember] | None:
    """`_locate_checked` in one tight loop for archives as torch.save writes them: local headers
    that repeat the central directory or defer to a signed data descriptor. Returns None at the
    first thing that is not so (it accepts a subset of what `_locate_checked` accepts, with the
    same result); `_locate_checked` then says what is wrong. Tens of thousands of tiny tensors
    made the general loop a tenth of `inspect`'s time."""
    order = sorted(range(len(members)), key=[m.header_offset for m in members].__getitem__)
    located: list[Any] = [None] * len(members)
    unpack = _LOCAL.unpack_from
    buf = b""
    start = end_of_buf = 0
    pending: ZipMember | None = None  # member whose data descriptor is unchecked
    pending_at = 0
    for rank, i in enumerate(order):
        m = members[i]
        raw = raw_names[i]
        offset = m.header_offset
        limit = members[order[rank + 1]].header_offset if rank + 1 < len(order) else cd_offset
        first = offset
        if pending is not None:
            if offset - pending_at > 64:  # before any read: the gap's size comes from the file
                return None
            first = pending_at
        need = offset + 30 + len(raw) - first
        if first < start or first + need > end_of_buf:
            ahead = _Window.READ_AHEAD if limit - offset < 1 << 16 else 0
            buf = src.read_upto(max(need, ahead), first)
            start = first
            end_of_buf = first + len(buf)
            if len(buf) < need:
                return None
        if pending is not None:
            if not _signed_descriptor(buf, pending_at - start, offset - pending_at, pending):
                return None
            pending = None
        at = offset - start
        if not buf.startswith(b"PK\x03\x04", at) or not buf.startswith(raw, at + 30):
            return None
        _sig, _need, flags, method, _t, _d, crc, csize, usize, nlen, elen = unpack(buf, at)
        if nlen != len(raw) or method != 0 or flags & 0x41:
            return None
        if not flags & 0x08 or (crc, csize, usize) != (0, 0, 0):
            if (crc, csize, usize) != (m.crc32, m.size, m.size) or _U32_MAX in (csize, usize):
                return None
        data_offset = offset + 30 + nlen + elen
        data_end = data_offset + m.size
        if data_end > limit:
            return None
        located[i] = ZipMember(m.name, offset, data_offset, m.size, m.crc32, flags)
        if flags & 0x08:
            pending = located[i]
            pending_at = data_end
    if pending is not None:
        gap = min(24, cd_offset - pending_at)
        if not _signed_descriptor(src.read_upto(gap, pending_at), 0, gap, pending):
            return None
    return located


def _signed_descriptor(buf: bytes, at: int, room: int, m: ZipMember) -> bool:
    """`buf[at:]` starts with a signed data descriptor (64- or 32-bit sizes) that repeats the
    central directory, within `room` bytes: what `_check_descriptor` accepts, signed."""
    if room < 16 or not buf.startswith(b"PK\x07\x08", at):
        return False
    if room >= 24 and buf.startswith(_DESCRIPTOR64.pack(m.crc32, m.size, m.size), at + 4):
        return True
    return m.size <= _U32_MAX and buf.startswith(_DESCRIPTOR32.pack(m.crc32, m.size, m.size), at + 4)


def _locate_checked(
    src: Source, members: list[ZipMember], raw_names: list[bytes], cd_offset: int, path: str
) -> list[ZipMember]:
    order = sorted(range(len(members)), key=[m.header_offset for m in members].__getitem__)
    located: list[ZipMember | None] = [None] * len(members)
    window = _Window(src)
    pending: tuple[ZipMember, int] | None = None  # member whose data descriptor is unchecked
    for rank, i in enumerate(order):
        m = members[i]
        raw = raw_names[i]
        limit = members[order[rank + 1]].header_offset if rank + 1 < len(order) else cd_offset
        ahead = limit - m.header_offset < 1 << 16
        if pending is not None:
            prev, prev_end = pending
            gap = m.header_offset - prev_end
            if 0 <= gap <= 64:  # one read for the descriptor and the header after it
                window.read(prev_end, gap + _LOCAL.size + len(raw), ahead)
            _check_descriptor(prev, window.read(prev_end, min(24, max(0, gap)), ahead), path)
            pending = None
        head = window.read(m.header_offset, _LOCAL.size + len(raw), ahead)
        if len(head) < _LOCAL.size:
            raise _bad(path, f"truncated: ZIP member {m.name!r} starts past the end of the file")
        sig, _need, flags, method, _t, _d, crc, csize, usize, nlen, elen = _LOCAL.unpack_from(head)
        if sig != b"PK\x03\x04":
            raise _bad(path, f"no local ZIP header for member {m.name!r} at byte {m.header_offset}")
        if head[30:] != raw or nlen != len(raw):
            raise _bad(path, f"the local ZIP header of {m.name!r} names a different member")
        if method != 0 or flags & 0x41:
            raise _bad(path, f"the local ZIP header of {m.name!r} disagrees with the central directory")
        if not flags & 0x08 or (crc, csize, usize) != (0, 0, 0):
            if _U32_MAX in (csize, usize):
                extra = window.read(m.header_offset + 30 + nlen, elen, ahead)
                z64 = _zip64_values(extra, ["usize", "csize"], path, m.name)
                usize, csize = z64["usize"], z64["csize"]
            if (crc, csize, usize) != (m.crc32, m.size, m.size):
                raise _bad(
                    path,
                    f"the local ZIP header of {m.name!r} gives size {usize} / CRC {crc:08x}; the "
                    f"central directory says {m.size} / {m.crc32:08x}",
                )
        data_offset = m.header_offset + 30 + nlen + elen
        data_end = data_offset + m.size
        if data_end > limit:
            what = "the central directory" if rank + 1 == len(order) else "the next member"
            raise _bad(path, f"ZIP member {m.name!r} overlaps {what} (corrupt or truncated file)")
        located[i] = ZipMember(m.name, m.header_offset, data_offset, m.size, m.crc32, flags)
        if flags & 0x08:
            pending = (located[i], data_end)  # type: ignore[assignment]
    if pending is not None:
        prev, prev_end = pending
        tail = window.read(prev_end, min(24, max(0, cd_offset - prev_end)), False)
        _check_descriptor(prev, tail, path)
    return [m for m in located if m is not None]


_DESCRIPTOR64 = struct.Struct("<IQQ")  # crc, compressed and uncompressed size (ZIP64)
_DESCRIPTOR32 = struct.Struct("<III")


def _check_descriptor(m: ZipMember, raw: bytes, path: str) -> None:
    """The data descriptor after a member's data (signature optional, 32- or 64-bit sizes) must
    repeat the central directory's CRC and size."""
    body = raw[4:] if raw[:4] == b"PK\x07\x08" else raw
    if body[:20] == _DESCRIPTOR64.pack(m.crc32, m.size, m.size):
        return
    if m.size <= _U32_MAX and len(body) >= 12 and body[:12] == _DESCRIPTOR32.pack(m.crc32, m.size, m.size):
        return
    raise _bad(path, f"the data descriptor of ZIP member {m.name!r} disagrees with the central directory")


def _record_bytes(src: Source, m: ZipMember, path: str) -> bytes:
    data = src.pread(m.size, m.data_offset)
    if crc32(data) != m.crc32:
        raise _bad(path, f"CRC-32 mismatch in record {m.name}: the file is corrupt")
    return data


_TORCH_FORMAT_VERSIONS = range(1, 11)  # what torch 2.13's reader accepts in the version record


def _check_torch_parses(src: Source, records: dict[bytes, ZipMember], path: str) -> None:
    """Refuse the small records torch parses before it loads anything, where torch would fail:
    the version (`.data/version`, else `version`: std::stoull, then a range) and
    `.storage_alignment` (Python's int())."""
    version = records.get(b".data/version") or records.get(b"version")
    if version is not None:
        text = _record_bytes(src, version, path).lstrip(b" \t\n\v\f\r")
        digits = text[1:] if text[:1] == b"+" else text
        number = digits[: len(digits) - len(digits.lstrip(b"0123456789"))]
        if not number or int(number) not in _TORCH_FORMAT_VERSIONS:
            raise _bad(path, f"unsupported archive version record {text[:20]!r} (torch refuses the file)")
    alignment = records.get(b".storage_alignment")
    if alignment is not None:
        data = _record_bytes(src, alignment, path)
        try:
            int(data)
        except ValueError:
            raise _bad(
                path, f"the .storage_alignment record {data[:20]!r} is not a number (torch refuses the file)"
            ) from None


def read_torch_zip(
    src: Source,
    *,
    allow_globals: frozenset[str] = frozenset(),
    opaque: bool = False,
    window: tuple[int, int] | None = None,
) -> RawCheckpoint:
    """Read the checkpoint in torch's zip format from `src` (the caller owns it); `opaque`: read
    opaque entries (see :mod:`.unpickle`).

    `window` (offset, length): the archive is those bytes of `src` (an item of a DCP `.distcp`
    file); every offset in the result is still absolute in `src`.
    """
    file_size, path = src.size, src.name
    base = 0
    if window is not None:
        base, file_size = window[0], window[0] + window[1]
    entries, cd_offset = _read_central(src, file_size, path, base)
    names = [e[0].name for e in entries]
    if not names:
        raise _bad(path, "not a checkpoint: an empty ZIP archive")
    if any(n.endswith(".npy") for n in names) and not any(n.endswith("/data.pkl") for n in names):
        raise _bad(path, "not a checkpoint: a NumPy .npz archive")
    prefix, slash, _ = names[0].partition("/")
    if not slash:
        raise _bad(path, "not a torch checkpoint: the ZIP members are not inside an archive folder")
    # torch takes the folder from the first member and refuses a member outside it (case counts)
    head = prefix + "/"
    cut = len(head.encode("utf-8"))
    if cut > _TORCH_NAME_MAX:
        raise _bad(path, f"the archive folder's name is {cut - 1} bytes long; torch's reader refuses it")
    for n in names:
        if not n.startswith(head):
            raise _bad(path, f"ZIP member {n!r} lies outside the archive folder {head!r} (torch refuses the file)")
    short = {n[len(head) :] for n in names}
    if "constants.pkl" in short or any(r.startswith("code/") for r in short):
        raise _bad(path, "a TorchScript archive, not a checkpoint; ckptsurgeon never calls torch.jit.load")
    members = _validate(src, entries, cd_offset, path, storage_prefix=head.encode("utf-8").lower() + b"data/")
    # looked up as torch does: by name with ASCII case folded (unique, as _validate checked)
    records = {e[1][cut:].lower(): m for e, m in zip(entries, members)}
    if b"data.pkl" not in records:
        raise _bad(path, "not a torch checkpoint: a ZIP archive without data.pkl")
    if b"byteorder" in records:
        order = _record_bytes(src, records[b"byteorder"], path)
        if order == b"big":
            raise EngineUnsupported(f"{path}: a big-endian checkpoint")
        if order != b"little":
            raise _bad(path, f"unknown byteorder record {order[:20]!r}")
    _check_torch_parses(src, records, path)
    pkl = records[b"data.pkl"]
    if pkl.size > MAX_PICKLE_BYTES:
        raise EngineUnsupported(f"{path}: data.pkl is {pkl.size} bytes, more than the engine reads")
    data = _record_bytes(src, pkl, path)
    storages: dict[str, StorageMeta] = {}

    def persistent_load(pid: tuple[Any, ...]) -> Any:
        cls, key, location, nbytes, known = resolve_storage_id(pid, 5, storages)
        if known is not None:
            return known
        if "\x00" in key:  # torch's lookup would end at the NUL
            raise Malformed(f"storage key {key!r} holds a NUL character")
        record = records.get(f"data/{key}".encode("utf-8", "surrogatepass").lower())
        if record is None:
            raise Malformed(f"storage {key!r} has no record data/{key}")
        if record.size != nbytes:
            raise Malformed(
                f"record {record.name} holds {record.size} bytes but storage {key!r} needs {nbytes} "
                f"({nbytes // DTYPE_ITEMSIZE[cls.dtype]} x {cls.dtype})"
            )
        meta = StorageMeta(src, key, cls.dtype, nbytes, record.data_offset, location, record.crc32, record.name)
        storages[key] = meta
        return meta

    obj, _ = unpickle(
        data,
        path=path,
        where="data.pkl",
        persistent_load=persistent_load,
        allow_globals=allow_globals,
        max_containers=container_budget(len(records)),
        opaque=opaque,
    )
    return RawCheckpoint(
        path=os.path.abspath(path),
        format="torch-zip",
        obj=obj,
        extras={"prefix": prefix, "storages": storages, "records": tuple(m.name[len(head) :] for m in members)},
        source=src,
    )
