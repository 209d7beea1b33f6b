"""Staged tensors: results computed one tensor at a time, parked in a scratch file beside the
output and handed back as TensorMeta, so a result bigger than memory is written by the
byte-copying engine (see :func:`staged_tensors`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import interrupts
from ..engine.meta import StorageMeta, TensorMeta
from ..engine.source import Source
from ..errors import UsageError
from .atomic import _temp_file, _write_error, refuse_non_regular


class TensorStage:
    """Tensors computed one at a time, parked in a scratch file and handed back as TensorMeta.

    Lets a result bigger than memory (a `merge --average` of large checkpoints) be assembled on
    disk and then written by the byte-copying engine. See `staged_tensors`.
    """

    def __init__(self, fd: int, path: str):
        self._fd = fd
        self._source = Source.scratch(fd, path)
        self._end = 0
        self._count = 0

    def add(self, tensor: Any) -> TensorMeta:
        """Park one dense CPU torch tensor; its TensorMeta (contiguous, on a storage of its own)."""
        from ..tensors import dtype_name, is_parameter, kind_text, tensor_kind

        if tensor_kind(tensor) is not None:  # its storage is not plain CPU memory: nothing to read
            raise UsageError(f"cannot stage a {kind_text(tensor)} tensor: only dense CPU tensors")
        data = tensor.detach().contiguous()
        storage = self.add_storage(dtype_name(data), [data])
        strides = tuple(int(s) for s in data.stride())
        return TensorMeta(
            storage, dtype_name(data), tuple(data.shape), strides, 0, bool(tensor.requires_grad), is_parameter(tensor)
        )

    def add_storage(self, dtype: str, chunks: Iterable[Any]) -> StorageMeta:
        """Park one storage of `dtype` elements written piece by piece: `chunks` are contiguous
        CPU torch tensors (made one at a time, so the storage may be bigger than memory). The
        caller views the StorageMeta as it needs (tied tensors keep sharing it)."""
        import torch

        from ..engine.crc import crc32

        interrupts.raise_if_interrupted()  # one swallowed by torch's import stops the job here
        offset = self._end
        crc = 0
        for chunk in chunks:
            nbytes = chunk.numel() * chunk.element_size()
            if not nbytes:
                continue
            view = memoryview(chunk.reshape(-1).view(torch.uint8).numpy())
            crc = crc32(view, crc)
            done = 0
            while done < nbytes:
                done += os.pwrite(self._fd, view[done:], self._end + done)
            self._end += nbytes
            interrupts.raise_if_interrupted()
        key = str(self._count)
        self._count += 1
        return StorageMeta(self._source, key, dtype, self._end - offset, offset, crc32=crc, record_name=f"staged/{key}")


@contextlib.contextmanager
def staged_tensors(output: Path) -> Iterator[TensorStage]:
    """A TensorStage whose scratch file sits beside `output` and is removed on exit."""
    refuse_non_regular(output)
    with _temp_file(output) as temp:
        try:
            yield TensorStage(temp.fd, os.path.abspath(temp.path))
        except OSError as exc:
            raise _write_error(output, exc) from None
