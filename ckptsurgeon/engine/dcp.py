"""Reading a torch.distributed.checkpoint (DCP) directory without torch: `.metadata` plus
`__<rank>_<n>.distcp` files.

`.metadata` is read by :mod:`.dcp_metadata` (the restricted unpickler, DCP's classes as inert
records). Each item of a `.distcp` file is read with the engine's own readers over its window:
in the default format a complete `torch.save` zip at `[offset, offset + length)` (read by
:func:`~.zipread.read_torch_zip`, bytes items through the same restricted unpickler), in the
SAFETENSORS format a safetensors file starting at `offset` (told apart by magic bytes). A tensor
saved as one chunk becomes a plain StorageMeta into its `.distcp` file, so the copy engine, CRC
checks and every other reader of StorageMeta work on it unchanged. A tensor split into chunks
(ranks of an FSDP / DTensor run) gets a StorageMeta on an :class:`AssembledSource`: an unlinked
scratch file that its chunks are copied into, on the first read only (the CRC-32 of each chunk
record checked), so memory stays at a 16 MiB buffer plus the pages of the tensor being assembled.

The directory may be a URL (`s3://bucket/ckpt`): every file is then opened by
:func:`~.source.open_source`, its name joined onto the directory with `/`. A remote `.distcp` file
is opened only when one of its items is first read, so that reading `.metadata` alone (inspect)
costs the requests of `.metadata` only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import BadCheckpointError, EngineUnsupported, UnsafeCheckpointError
from .crc import crc32
from .data import crc_mismatch, verify_crc
from .dcp_metadata import MAX_METADATA_BYTES, BytesEntry, Chunk, DcpMetadata, TensorEntry, build_tree, parse_metadata
from .meta import DTYPE_ITEMSIZE, RawCheckpoint, StorageMeta, TensorMeta
from .safetensors_format import MAX_HEADER_BYTES, parse_header
from .source import Source, is_url, open_source
from .zipread import read_torch_zip

__all__ = ["AssembledSource", "NotRead", "is_dcp_directory", "read_dcp", "read_dcp_metadata"]

METADATA = ".metadata"
_BLOCK = 16 << 20  # bytes read at once while assembling chunks


def is_dcp_directory(path: str) -> bool:
    """A directory holding `.metadata` is a DCP checkpoint."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


class NotRead:
    """A non-tensor value of a DCP checkpoint that `read_dcp_metadata` did not read."""

    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn

    def __repr__(self) -> str:
        return f"NotRead({self.fqn!r})"


def read_dcp_metadata(
    directory: str, *, allow_globals: frozenset[str] = frozenset(), storage_options: Mapping[str, Any] | None = None
) -> RawCheckpoint:
    """The DCP checkpoint in `directory` from its `.metadata` alone (for inspect): tensors with
    their shape and dtype, whose bytes are read (and chunks assembled) only if someone reads
    them; non-tensor values are :class:`NotRead`. No byte of a `.distcp` file is read here (nor,
    for a URL, is any `.distcp` object opened)."""
    return _read(directory, allow_globals, storage_options, eager=False)


def read_dcp(
    directory: str, *, allow_globals: frozenset[str] = frozenset(), storage_options: Mapping[str, Any] | None = None
) -> RawCheckpoint:
    """Read the DCP checkpoint in `directory`: the nested state_dict DCP saved (rebuilt from
    planner_data), tensors as TensorMeta leaves, non-tensor values unpickled.

    Every item is located and checked against `.metadata` (dtype, shape, inside its file);
    chunked tensors are assembled on first read. `extras["sources"]` lists every Source opened
    (the caller owns them and closes them all); `RawCheckpoint.source` is the `.metadata` one;
    `extras["files"]` maps each fqn (dotted as DCP flattens the state_dict) to the `.distcp`
    files its items lie in, `extras["version"]` is the DCP version. Raises BadCheckpointError
    (UnsafeCheckpointError for refused globals) on anything hostile. `directory` may be a URL
    (`storage_options` go to its fsspec filesystem).
    """
    return _read(directory, allow_globals, storage_options, eager=True)


def _read(
    directory: str, allow_globals: frozenset[str], storage_options: Mapping[str, Any] | None, eager: bool
) -> RawCheckpoint:
    reader = _Reader(directory, allow_globals, storage_options)
    try:
        obj = reader.read(eager)
    except BaseException:
        reader.close()
        raise
    return RawCheckpoint(
        path=reader.directory if reader.remote else os.path.abspath(directory),
        format="dcp",
        obj=obj,
        extras={
            "sources": reader.sources,
            "version": reader.meta.version if reader.meta else None,
            "files": _files(reader.meta) if reader.meta else {},
        },
        source=reader.sources[0],
    )


class _Reader:
    def __init__(
        self, directory: str, allow_globals: frozenset[str], storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.remote = is_url(directory)
        self.directory = directory.rstrip("/") if self.remote else directory
        self.allow_globals = allow_globals
        self.storage_options = storage_options
        self.sources: list[Source] = []
        self.files: dict[str, Source] = {}
        self.lazy = False  # remote files opened on first read (see `read`)
        self.meta: DcpMetadata | None = None
        self.headers: dict[tuple[str, int], dict[str, TensorMeta]] = {}  # safetensors items

    def close(self) -> None:
        for src in self.sources:
            src.close()

    def open(self, rel: str) -> Source:
        if self.remote:
            from .remote import join_url

            src = open_source(join_url(self.directory, rel), self.storage_options)
        else:
            src = Source(os.path.join(self.directory, rel))
        self.sources.append(src)
        return src

    def file(self, rel: str) -> Source:
        """The Source of the `.distcp` file `rel` (made once, by `read`)."""
        src = self.files.get(rel)
        if src is None:
            if self.lazy:
                src = _OpenedOnFirstRead(f"{self.directory}/{rel}", lambda: self.open_file(rel))
                self.sources.append(src)
            else:
                src = self.open(rel)
            self.files[rel] = src
        return src

    def open_file(self, rel: str) -> Source:
        from .remote import join_url

        return open_source(join_url(self.directory, rel), self.storage_options)

    def read(self, eager: bool) -> Any:
        if not self.remote and not os.path.isdir(self.directory):
            raise BadCheckpointError(f"{self.directory}: not a directory")
        src = self.open(METADATA)
        if src.size > MAX_METADATA_BYTES:
            raise BadCheckpointError(
                f"{src.name}: {src.size} bytes, more than the {MAX_METADATA_BYTES >> 20} MiB a DCP .metadata may have"
            )
        meta = self.meta = parse_metadata(src.pread(src.size, 0), src.name)
        self.lazy = self.remote and not eager  # opening a remote file is a request: made when it is read
        for entry in meta.entries.values():
            for file in [c.file for c in entry.chunks] if isinstance(entry, TensorEntry) else [entry.file]:
                self.file(file)
        values: dict[str, Any] = {}
        refused: set[str] = set()  # by all non-tensor items, reported together
        for fqn, entry in meta.entries.items():
            if not isinstance(entry, BytesEntry):
                values[fqn] = self.tensor(fqn, entry, eager)
            elif not eager:
                values[fqn] = NotRead(fqn)
            else:
                try:
                    values[fqn] = self.bytes_value(fqn, entry)
                except UnsafeCheckpointError as e:
                    refused.update(e.globals)
        if refused:
            raise UnsafeCheckpointError(self.directory, refused)
        return build_tree(meta, values)

    # -- items --------------------------------------------------------------------------------

    def window(self, fqn: str, file: str, offset: int, length: int) -> Source:
        src = self.file(file)
        if offset + length > src.size:
            raise BadCheckpointError(
                f"{src.name}: the item of {fqn!r} at bytes [{offset}, {offset + length}) lies "
                f"outside the file ({src.size} bytes): truncated or corrupt"
            )
        return src

    def bytes_value(self, fqn: str, entry: BytesEntry) -> Any:
        src = self.window(fqn, entry.file, entry.offset, entry.length)
        raw = self.zip_item(src, fqn, entry.offset, entry.length)
        if raw.extras["storages"]:
            raise BadCheckpointError(f"{src.name}: the non-tensor item {fqn!r} holds tensors (not supported)")
        return raw.obj

    def zip_item(self, src: Source, fqn: str, offset: int, length: int) -> RawCheckpoint:
        try:
            return read_torch_zip(src, allow_globals=self.allow_globals, window=(offset, length))
        except EngineUnsupported as e:  # no torch fallback reads a DCP item more safely
            raise BadCheckpointError(f"{src.name}: the item of {fqn!r}: {e}") from None
        except BadCheckpointError as e:
            if type(e) is not BadCheckpointError:  # UnsafeCheckpointError names the globals
                raise
            raise BadCheckpointError(f"the item of {fqn!r} at byte {offset}: {e}") from None

    def chunk_tensor(self, fqn: str, entry: TensorEntry, chunk: Chunk) -> TensorMeta:
        """The TensorMeta of one chunk's item, checked against the metadata."""
        src = self.window(fqn, chunk.file, chunk.offset, chunk.length)
        magic = src.pread(min(4, src.size - chunk.offset), chunk.offset)
        if magic == b"PK\x03\x04":
            raw = self.zip_item(src, fqn, chunk.offset, chunk.length)
            t = raw.obj
            if type(t) is not TensorMeta:
                raise BadCheckpointError(f"{src.name}: the item of tensor {fqn!r} holds a {type(t).__name__}")
        else:
            t = self.safetensors_item(src, fqn, chunk)
        where = f"{src.name}: the chunk of {fqn!r} at {list(chunk.offsets)}"
        if t.dtype != entry.dtype or t.shape != chunk.sizes:
            raise BadCheckpointError(
                f"{where} is a {t.dtype} tensor of shape {list(t.shape)}; .metadata says "
                f"{entry.dtype} of shape {list(chunk.sizes)}"
            )
        s = t.storage
        # one key per item: every item of a file numbers its storages from "0"
        storage = StorageMeta(
            src, f"{chunk.offset}:{s.key}", s.dtype, s.nbytes, s.data_offset, s.location, s.crc32, s.record_name
        )
        return TensorMeta(storage, t.dtype, t.shape, t.stride, t.storage_offset)

    def safetensors_item(self, src: Source, fqn: str, chunk: Chunk) -> TensorMeta:
        """A tensor of the safetensors file that starts at `chunk.offset` (DCP's SAFETENSORS
        format: one such file at the end of each `.distcp`, keyed by fqn)."""
        key = (chunk.file, chunk.offset)
        tensors = self.headers.get(key)
        if tensors is None:
            start = chunk.offset
            if src.size - start < 8:
                raise BadCheckpointError(
                    f"{src.name}: the item of {fqn!r} at byte {start} is neither a zip nor safetensors"
                )
            (header_len,) = struct.unpack("<Q", src.pread(8, start))
            if header_len > MAX_HEADER_BYTES or start + 8 + header_len > src.size:
                raise BadCheckpointError(
                    f"{src.name}: the item of {fqn!r} at byte {start} is neither a torch.save zip nor a "
                    "safetensors file (or it is truncated)"
                )
            data_start = start + 8 + header_len
            header = src.pread(header_len, start + 8)
            tensors, _ = parse_header(header, src.size - data_start, src.name, src, data_start)
            self.headers[key] = tensors
        t = tensors.get(fqn)
        if t is None:
            raise BadCheckpointError(f"{src.name}: the safetensors item at byte {chunk.offset} has no tensor {fqn!r}")
        if t.nbytes != chunk.length:
            raise BadCheckpointError(
                f"{src.name}: tensor {fqn!r} holds {t.nbytes} bytes; .metadata gives its item {chunk.length}"
            )
        return t

    def tensor(self, fqn: str, entry: TensorEntry, eager: bool) -> TensorMeta:
        shape = entry.shape
        if eager and len(entry.chunks) == 1:
            return self.chunk_tensor(fqn, entry, entry.chunks[0])  # covers the tensor (checked)
        if eager:
            parts = [(c, self.chunk_tensor(fqn, entry, c)) for c in entry.chunks]

            def resolve() -> list[tuple[Chunk, TensorMeta]]:
                return parts
        else:

            def resolve() -> list[tuple[Chunk, TensorMeta]]:
                return [(c, self.chunk_tensor(fqn, entry, c)) for c in entry.chunks]

        itemsize = DTYPE_ITEMSIZE[entry.dtype]
        numel = 1
        for n in shape:
            numel *= n
        strides = _row_major(shape)
        name = f"{self.directory}/{fqn} (assembled from {len(entry.chunks)} chunks)"
        src = AssembledSource(name, numel * itemsize, lambda view: _fill(view, shape, itemsize, resolve()))
        self.sources.append(src)
        storage = StorageMeta(src, fqn, entry.dtype, numel * itemsize, 0)
        return TensorMeta(storage, entry.dtype, shape, strides)


class _OpenedOnFirstRead(Source):
    """A remote `.distcp` file, opened (a request) only when something first reads it; until then
    it has read nothing and made no request."""

    __slots__ = ("_opener", "_inner", "_lock")

    remote = True

    def __init__(self, name: str, opener: Callable[[], Source]) -> None:
        self.name, self.identity, self._fd = name, None, None
        self.file_id = (-2, hash(name))
        self._opener: Callable[[], Source] | None = opener
        self._inner: Source | None = None
        self._lock = threading.Lock()  # chunks may be read in several threads

    def _source(self) -> Source:
        with self._lock:
            if self._inner is None:
                if self._opener is None:
                    raise BadCheckpointError(f"{self.name}: the checkpoint was closed before this read")
                self._inner = self._opener()
            return self._inner

    @property
    def bytes_read(self) -> int:
        return self._inner.bytes_read if self._inner is not None else 0

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        pass

    @property
    def requests(self) -> int:
        return self._inner.requests if self._inner is not None else 0

    @requests.setter
    def requests(self, value: int) -> None:
        pass

    @property
    def size(self) -> int:
        return self._source().size

    @property
    def fd(self) -> int:
        return self._source().fd

    @property
    def proc_path(self) -> str:
        return self._source().proc_path

    @property
    def closed(self) -> bool:
        return self._opener is None and (self._inner is None or self._inner.closed)

    def check_unchanged(self) -> None:
        self._source().check_unchanged()

    def readinto(self, buf: bytearray | memoryview, offset: int) -> None:
        self._source().readinto(buf, offset)

    def pread(self, size: int, offset: int) -> bytes:
        return self._source().pread(size, offset)

    def read_upto(self, size: int, offset: int) -> bytes:
        return self._source().read_upto(size, offset)

    def count(self, nbytes: int) -> None:
        self._source().count(nbytes)

    def defer(self, start: int, end: int, check: Callable[[], None], span: tuple[int, int] | None = None) -> None:
        self._source().defer(start, end, check, span)

    def close(self) -> None:
        self._opener = None
        if self._inner is not None:
            self._inner.close()

    def __repr__(self) -> str:
        return f"_OpenedOnFirstRead({self.name!r}, open={self._inner is not None})"


def _files(meta: DcpMetadata) -> dict[str, tuple[str, ...]]:
    """fqn -> the `.distcp` files (relative paths) its items lie in, each once, in chunk order."""
    out: dict[str, tuple[str, ...]] = {}
    for fqn, entry in meta.entries.items():
        files = [c.file for c in entry.chunks] if isinstance(entry, TensorEntry) else [entry.file]
        out[fqn] = tuple(dict.fromkeys(files))
    return out


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# -- assembling chunks ------------------------------------------------------------------------------


class AssembledSource(Source):
    """A Source over a scratch file that is filled on first use: `fill(view)` writes its
    `nbytes` bytes into a writable mapping of the file. Until something reads it, no file
    exists; its own reads are not counted in `bytes_read` (the chunks it reads are, on their
    `.distcp` Sources)."""

    __slots__ = ("_fill", "_nbytes", "_failed")
    _ids = itertools.count()

    def __init__(self, name: str, nbytes: int, fill: Callable[[memoryview], None]) -> None:
        self.name, self.identity, self._fd = name, None, None
        self.file_id = (-1, next(self._ids))  # no real file yet; never equal to one
        self.requests = 0  # a local scratch file: no request to a store
        self._nbytes = nbytes
        self._fill: Callable[[memoryview], None] | None = fill
        self._failed = False

    @property
    def bytes_read(self) -> int:
        return 0

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        pass

    @property
    def size(self) -> int:
        return self._nbytes

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._assemble()
        return Source.fd.fget(self)  # type: ignore[attr-defined,no-any-return]

    @property
    def closed(self) -> bool:
        return self._fd is None and self._fill is None

    def close(self) -> None:
        self._fill = None
        super().close()

    def _assemble(self) -> None:
        import mmap
        import tempfile

        fill = self._fill
        if fill is None or self._failed:
            raise BadCheckpointError(f"{self.name}: the checkpoint was closed before this read")
        self._failed = True  # until the fill succeeds: a second read must not see half a tensor
        with tempfile.TemporaryFile(prefix="ckptsurgeon-dcp-") as f:
            fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, self._nbytes)
            if self._nbytes:
                mm = mmap.mmap(fd, self._nbytes)
                try:
                    fill(memoryview(mm))
                finally:
                    # after an error a traceback may still hold a view of it: then the mapping
                    # goes when the traceback does
                    with contextlib.suppress(BufferError):
                        mm.close()
        except BaseException:
            os.close(fd)
            raise
        self._failed = False
        self._fd = fd


def _fill(view: memoryview, shape: tuple[int, ...], itemsize: int, parts: list[tuple[Chunk, TensorMeta]]) -> None:
    """Copy each chunk's elements to their place in the row-major tensor `view`."""
    dst_strides = _row_major(shape)
    buf = bytearray(0)
    for chunk, t in parts:
        storage = t.storage
        storage.source.check_unchanged()
        whole = storage.crc32 is not None and t.is_contiguous and t.span == (0, storage.nbytes)
        crc = 0
        for start, length, group in _groups(_runs(t, chunk.offsets, dst_strides, itemsize)):
            if len(group) == 1:  # straight into place
                data = view[group[0][0] : group[0][0] + length]
            else:
                if len(buf) < length:
                    buf = bytearray(_BLOCK)
                data = memoryview(buf)[:length]
            storage.source.readinto(data, storage.data_offset + start)
            if whole:
                crc = crc32(data, crc)
            if len(group) > 1:
                pos = 0
                for dst, n in group:
                    view[dst : dst + n] = data[pos : pos + n]
                    pos += n
        if not whole:
            verify_crc(storage)
        elif crc != storage.crc32:
            raise crc_mismatch(storage, crc)


def _groups(runs: Iterator[tuple[int, int, int]]) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """Runs (source, destination, length) gathered into reads of at most _BLOCK bytes:
    (source start, length, [(destination, length) of each run in it])."""
    group: list[tuple[int, int]] = []
    start = length = 0
    for src, dst, n in runs:
        if group and src == start + length and length + n <= _BLOCK:
            group.append((dst, n))
            length += n
            continue
        if group:
            yield start, length, group
            group = []
        if n > _BLOCK:
            for at in range(0, n, _BLOCK):
                piece = min(_BLOCK, n - at)
                yield src + at, piece, [(dst + at, piece)]
        else:
            start, length, group = src, n, [(dst, n)]
    if group:
        yield start, length, group


def _runs(
    t: TensorMeta, offsets: tuple[int, ...], dst_strides: tuple[int, ...], itemsize: int
) -> Iterator[tuple[int, int, int]]:
    """(source byte offset in the storage, destination byte offset, length) of each run of
    elements of chunk `t` that is contiguous in both, in the chunk's element order."""
    shape, src_strides = t.shape, t.stride
    if 0 in shape:
        return
    k, run = len(shape), 1
    while k > 0:
        n = shape[k - 1]
        if n != 1 and (src_strides[k - 1] != run or dst_strides[k - 1] != run):
            break
        run *= n
        k -= 1
    dst_base = sum(o * d for o, d in zip(offsets, dst_strides))
    outer = shape[:k]
    for idx in itertools.product(*(range(n) for n in outer)):
        src = t.storage_offset + sum(i * s for i, s in zip(idx, src_strides))
        dst = dst_base + sum(i * d for i, d in zip(idx, dst_strides))
        yield src * itemsize, dst * itemsize, run * itemsize
