"""Reading torch's legacy format (`torch.save(..., _use_new_zipfile_serialization=False)`).

The file is a run of pickles: the magic number, the protocol version (1001), a sys_info dict, the
object (storages as persistent ids `('storage', type, key, location, numel, view_metadata)`) and
the sorted list of storage keys; then, per key, an int64 little-endian element count and the raw
bytes. Every storage's offset follows from those counts, so no tensor data is read.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from ..errors import BadCheckpointError, EngineUnsupported, UnsafeCheckpointError
from .meta import DTYPE_ITEMSIZE, RawCheckpoint, StorageMeta
from .pickle_checks import Unsupported, container_budget, resolve_storage_id
from .sniff import MAGIC_NUMBER
from .source import Source
from .unpickle import PickleTruncated, unpickle

PROTOCOL_VERSION = 1001
_FIRST_READ = 1 << 20


def _bad(path: str, reason: str) -> BadCheckpointError:
    return BadCheckpointError(f"{path}: {reason}")


class _Pickles:
    """Reads consecutive pickles from the head of a file, reading more of it when one is cut."""

    def __init__(self, src: Source, file_size: int, path: str, allow_globals: frozenset[str], opaque: bool = False):
        self.src = src
        self.opaque = opaque
        self.file_size = file_size
        self.path = path
        self.allow_globals = allow_globals
        self.buf = b""
        self.pos = 0

    def _grow(self) -> bool:
        if len(self.buf) >= self.file_size:
            return False
        size = min(self.file_size, max(_FIRST_READ, 8 * len(self.buf)))
        self.buf = self.src.pread(size, 0)
        return True

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the file, from the buffer when it holds them."""
        if offset + size <= len(self.buf):
            return self.buf[offset : offset + size]
        return self.src.pread(size, offset)

    def load(self, where: str, persistent_load: Any = None) -> Any:
        while True:
            try:
                obj, end = unpickle(
                    self.buf,
                    path=self.path,
                    where=where,
                    persistent_load=persistent_load,
                    allow_globals=self.allow_globals,
                    start=self.pos,
                    complete=False,
                    # the storage count comes after the object: bound it by what the file could hold
                    max_containers=container_budget(self.file_size // 64),
                    opaque=self.opaque and persistent_load is not None,  # only the object itself
                )
            except PickleTruncated as e:
                if self._grow():
                    continue
                if e.refused:
                    raise UnsafeCheckpointError(self.path, e.refused) from None
                raise
            self.pos = end
            return obj


def _torch_reads_as_tar(src: Source) -> bool:
    """Whether torch.load's first attempt, `tarfile.open(f, "r:")`, accepts the file (it tries
    the tar format before the legacy pickles). Python's tar reader is asked only when the first
    block's header checksum is right, the test it starts with."""
    block = src.read_upto(512, 0)  # a shorter file is no tar to tarfile either
    if len(block) < 512:
        return False
    field = block[148:156].split(b"\0", 1)[0].strip()
    if block[148] not in (0o200, 0o377):  # a base-256 checksum is left to tarfile
        try:
            wanted = int(field.decode("ascii") or "0", 8)
        except (UnicodeDecodeError, ValueError):
            return False
        body = block[:148] + b" " * 8 + block[156:]
        if wanted not in (sum(body), sum(b - 256 if b > 127 else b for b in body)):
            return False
    import tarfile

    if src.remote:  # a valid tar header checksum is rare enough: refuse it as torch might read a tar
        return True
    with os.fdopen(os.dup(src.fd), "rb") as f:
        f.seek(0)
        try:
            tarfile.open(fileobj=f, mode="r:", format=tarfile.PAX_FORMAT).close()
        except tarfile.TarError:
            return False
        except Exception:  # noqa: BLE001 -- raised inside torch.load too: it fails on the file
            return True
    return True


def read_torch_legacy(
    src: Source, *, allow_globals: frozenset[str] = frozenset(), opaque: bool = False
) -> RawCheckpoint:
    """Read the checkpoint in torch's legacy format from `src` (the caller owns it); `opaque`:
    read opaque entries in the pickled object (see :mod:`.unpickle`)."""
    file_size, path = src.size, src.name
    if _torch_reads_as_tar(src):
        raise _bad(
            path,
            "ambiguous legacy checkpoint: its first 512 bytes are also a tar header, so torch.load "
            "takes it for the pre-1.0 tar format (and its weights_only loader refuses it)",
        )
    pickles = _Pickles(src, file_size, path, allow_globals, opaque)
    if pickles.load("the magic number") != MAGIC_NUMBER:
        raise _bad(path, "not a legacy torch checkpoint: wrong magic number")
    version = pickles.load("the protocol version")
    if version != PROTOCOL_VERSION:
        raise _bad(path, f"unknown legacy protocol version {version!r}")
    sys_info = pickles.load("sys_info")
    if type(sys_info) is not dict:
        raise _bad(path, "corrupt sys_info in a legacy checkpoint")
    if sys_info.get("little_endian", True) is not True:
        raise EngineUnsupported(f"{path}: a big-endian legacy checkpoint")

    # Offsets are known only once the key list after the object is read: the StorageMetas are
    # created with data_offset -1 and completed below, before anyone else sees them.
    storages: dict[str, StorageMeta] = {}

    def persistent_load(pid: tuple[Any, ...]) -> Any:
        cls, key, location, nbytes, known = resolve_storage_id(pid, 6, storages, bytes_key=True)
        if pid[5] is not None:
            raise Unsupported("a legacy storage view")
        if known is not None:
            return known
        meta = StorageMeta(src, key, cls.dtype, nbytes, -1, location)
        storages[key] = meta
        return meta

    obj = pickles.load("the pickled object", persistent_load)
    keys = pickles.load("the storage key list")
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise _bad(path, "corrupt storage key list in a legacy checkpoint")
    if len(set(keys)) != len(keys):
        raise _bad(path, "the storage key list names a storage twice")
    if set(keys) != set(storages):
        missing = sorted(set(storages) - set(keys))
        extra = sorted(set(keys) - set(storages))
        raise _bad(
            path,
            f"the storage key list does not match the pickled object (no data for {missing[:5]}, "
            f"unreferenced {extra[:5]})",
        )

    pos = pickles.pos
    for key in keys:
        meta = storages[key]
        if pos + 8 > file_size:
            raise _bad(path, f"truncated: the data of storage {key!r} is missing")
        (count,) = struct.unpack("<q", pickles.read(pos, 8))
        if count * DTYPE_ITEMSIZE[meta.dtype] != meta.nbytes:
            raise _bad(
                path,
                f"storage {key!r} holds {count} elements but is pickled with "
                f"{meta.nbytes // DTYPE_ITEMSIZE[meta.dtype]}",
            )
        if pos + 8 + meta.nbytes > file_size:
            raise _bad(path, f"truncated: storage {key!r} extends past the end of the file")
        object.__setattr__(meta, "data_offset", pos + 8)  # completing our own new object
        pos += 8 + meta.nbytes
    if pos != file_size:
        raise _bad(path, f"{file_size - pos} unexpected bytes after the last storage")
    return RawCheckpoint(
        path=os.path.abspath(path), format="torch-legacy", obj=obj, extras={"storages": storages}, source=src
    )
