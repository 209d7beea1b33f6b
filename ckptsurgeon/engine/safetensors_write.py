"""Write a safetensors file by copying tensor bytes from their source files, without torch.

The header lists the tensors in the order given (a state_dict's order: reading the file back gives
the keys in that order; the library's own `save` sorts them) and is padded with spaces so that the
data starts 8-byte aligned, as the library writes it. The data is laid out by decreasing element
size (stable: ties keep the order given), as the library does, so every tensor is aligned.

A tensor that is an engine :class:`~ckptsurgeon.engine.meta.TensorMeta` is copied from its source
file by the machinery of :mod:`~ckptsurgeon.engine.copier` (in the kernel, CRC-checked against a
torch zip record, holes kept); a strided view is laid out contiguously block by block (memory: one
block of rows, or the view's span when its rows interleave). Any other tensor is given as a
function returning its contiguous bytes, called when its turn comes (one tensor in memory at a
time).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from math import prod
from typing import Any, BinaryIO, NamedTuple

from ckptsurgeon.engine.copier import CHUNK, Copier, CopySource, check_posix, check_sources, read_ahead
from ckptsurgeon.engine.data import check_read_crc, read_bytes, verify_crc
from ckptsurgeon.engine.meta import DTYPE_ITEMSIZE, StorageId, TensorMeta
from ckptsurgeon.engine.pickle_write import plan_storages
from ckptsurgeon.engine.safetensors_format import SAFETENSORS_DTYPES
from ckptsurgeon.engine.source import Source
from ckptsurgeon.errors import OutputError

SAFETENSORS_CODES: dict[str, str] = {name: code for code, name in SAFETENSORS_DTYPES.items()}  # dtype -> code
_BLOCK = CHUNK  # bytes of output one block of a strided view holds


class Entry(NamedTuple):
    """One tensor of a safetensors file: its name, dtype (torch's name, e.g. "bfloat16"), shape,
    and where its bytes come from: a TensorMeta (copied from its file) or a function returning
    its bytes in C order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: TensorMeta | Callable[[], memoryview]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


def entry_of(name: str, t: TensorMeta) -> Entry:
    """The Entry of an engine tensor."""
    return Entry(name, t.dtype, t.shape, t)


def safetensors_layout(
    entries: Sequence[Entry], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[Entry, int]]]:
    """The file's first bytes (length prefix and padded JSON header) and the data order: each
    entry with its offset in the data region. ValueError for a dtype without a safetensors code."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for e in entries:
        code = SAFETENSORS_CODES.get(e.dtype)
        if code is None:
            raise ValueError(f"safetensors has no dtype code for {e.dtype} ({e.name!r})")
        header[e.name] = {"dtype": code, "shape": [int(n) for n in e.shape], "data_offsets": [0, 0]}
    order = sorted(entries, key=lambda e: -DTYPE_ITEMSIZE[e.dtype])  # stable: ties keep their order
    placed: list[tuple[Entry, int]] = []
    offset = 0
    for e in order:
        end = offset + e.nbytes
        header[e.name]["data_offsets"] = [offset, end]
        placed.append((e, offset))
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library writes it
    return len(encoded).to_bytes(8, "little") + encoded, placed


def write_safetensors(
    entries: Sequence[Entry],
    out: BinaryIO,
    *,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    name: str | None = None,
    threads: int = 1,
) -> int:
    """Write `entries` as a safetensors file to `out` (a new file positioned at 0, truncated
    first; the caller closes and fsyncs it). Returns the file's size.

    Raises EngineUnsupported (before writing anything) for an engine tensor it cannot copy,
    BadCheckpointError for a source that is missing, changed, too short or fails its CRC-32, and
    OutputError when writing fails or the output is one of the sources. `progress` is called with
    each tensor's byte count once it is written. Tensors of a remote source are read ahead of the
    writer, up to `threads` requests at a time.
    """
    check_posix()
    out_name = name if name is not None else getattr(out, "name", None)
    if not isinstance(out_name, str):
        out_name = "<output>"
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("write_safetensors: a name is given twice")
    head, placed = safetensors_layout(entries, metadata)
    metas = OrderedDict((e.name, e.data) for e in entries if isinstance(e.data, TensorMeta))
    plan = plan_storages(metas)  # validates every engine tensor (strides, spans, dtypes)
    out.flush()
    if out.tell() != 0:
        raise ValueError("write_safetensors needs an output positioned at offset 0")
    fd = out.fileno()
    sources = check_sources(((p.source, p.source.data_offset + p.source.nbytes) for p in plan.values()), fd, out_name)
    ahead = read_ahead([r for e, _ in placed if (r := _copied_range(e)) is not None], threads)
    try:
        os.ftruncate(fd, 0)
        copier = Copier(fd, ahead)
        copier.write(head)
        checked: set[StorageId] = set()
        for e, _ in placed:
            if isinstance(e.data, TensorMeta):
                _copy_tensor(copier, e.data, sources, checked)
            else:
                data = e.data()
                if len(data) != e.nbytes:
                    raise ValueError(f"{e.name!r}: {len(data)} bytes given for {e.nbytes}")
                if len(data) >= _BLOCK:
                    copier.write_through(data)
                else:
                    copier.write(data)
            if progress is not None:
                progress(e.nbytes)
        copier.finish()
    except OSError as e:
        raise OutputError(f"{out_name}: cannot write: {e.strerror or e}") from e
    finally:
        if ahead is not None:
            ahead.close()
    out.seek(copier.pos)
    return copier.pos


def _copied_range(e: Entry) -> tuple[Source, int, int] | None:
    """(source, offset, length) that `_copy_tensor` copies for `e`, if it copies one range."""
    t = e.data
    if not isinstance(t, TensorMeta) or t.numel == 0 or not t.is_contiguous:
        return None
    return t.storage.source, t.storage.data_offset + t.storage_offset * t.itemsize, t.nbytes


def _copy_tensor(copier: Copier, t: TensorMeta, sources: dict[Source, CopySource], checked: set[StorageId]) -> None:
    """Append the elements of `t` in C order. A whole storage is copied with its CRC-32 checked on
    the way; any part of one (a view) has its record's CRC-32 checked once per storage."""
    storage = t.storage
    if t.numel == 0:
        return
    if t.is_contiguous:
        start = t.storage_offset * t.itemsize
        whole = start == 0 and t.nbytes == storage.nbytes
        want_crc = whole and storage.crc32 is not None
        crc = copier.copy(sources[storage.source], storage.data_offset + start, t.nbytes, want_crc=want_crc)
        if whole:
            check_read_crc(storage, whole=True, crc=lambda: crc)
            checked.add(storage.identity)
            return
    else:
        _copy_strided(copier, t)
    if storage.identity not in checked:
        verify_crc(storage)
        checked.add(storage.identity)


def _copy_strided(copier: Copier, t: TensorMeta) -> None:
    """Lay out a strided view contiguously: blocks of rows (of the first dimension), each read as
    the span it occupies and gathered with numpy's `as_strided` (elements as opaque records). When
    the rows interleave (a transpose), a block's span is most of the storage: the view's whole
    span is read once instead."""
    import numpy as np
    from numpy.lib.stride_tricks import as_strided

    itemsize = t.itemsize
    record = np.dtype(f"V{itemsize}")
    rows, inner = t.shape[0], t.shape[1:]
    row_bytes = prod(inner) * itemsize
    inner_extent = sum((n - 1) * s for n, s in zip(inner, t.stride[1:]))
    per_block = max(1, _BLOCK // max(1, row_bytes))
    block_span = ((min(per_block, rows) - 1) * t.stride[0] + inner_extent + 1) * itemsize
    if block_span > 4 * min(per_block, rows) * row_bytes + _BLOCK:
        per_block = rows
    strides = tuple(s * itemsize for s in t.stride)
    for r0 in range(0, rows, per_block):
        n = min(rows, r0 + per_block) - r0
        first = t.storage_offset + r0 * t.stride[0]
        extent = (n - 1) * t.stride[0] + inner_extent
        raw = np.frombuffer(read_bytes(t.storage, first * itemsize, (first + extent + 1) * itemsize), record)
        block = np.ascontiguousarray(as_strided(raw, shape=(n, *inner), strides=strides, writeable=False))
        copier.write_through(memoryview(block.view(np.uint8).reshape(-1).data))
