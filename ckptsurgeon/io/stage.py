"""Staged tensors: results computed one tensor at a time, parked in a scratch file beside the
output and handed back as TensorMeta, so a result bigger than memory is written by the
byte-copying engine (see :func:`staged_tensors`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import interrupts
from ..engine.meta import TensorMeta
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
        import torch

        from ..engine.crc import crc32
        from ..engine.meta import StorageMeta
        from ..tensors import dtype_name, is_parameter, kind_text, tensor_kind

        interrupts.raise_if_interrupted()  # one swallowed by torch's import stops the job here
        if tensor_kind(tensor) is not None:  # its storage is not plain CPU memory: nothing to read
            raise UsageError(f"cannot stage a {kind_text(tensor)} tensor: only dense CPU tensors")
        data = tensor.detach().contiguous()
        nbytes = data.numel() * data.element_size()
        offset = self._end
        crc = 0
        if nbytes:
            view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            crc = crc32(view)
            done = 0
            while done < nbytes:
                done += os.pwrite(self._fd, view[done:], offset + done)
        self._end += nbytes
        key = str(self._count)
        self._count += 1
        storage = StorageMeta(
            self._source, key, dtype_name(data), nbytes, offset, crc32=crc, record_name=f"staged/{key}"
        )
        strides = tuple(int(s) for s in data.stride())
        return TensorMeta(
            storage, dtype_name(data), tuple(data.shape), strides, 0, bool(tensor.requires_grad), is_parameter(tensor)
        )


@contextlib.contextmanager
def staged_tensors(output: Path) -> Iterator[TensorStage]:
    """A TensorStage whose scratch file sits beside `output` and is removed on exit."""
    refuse_non_regular(output)
    with _temp_file(output) as temp:
        try:
            yield TensorStage(temp.fd, os.path.abspath(temp.path))
        except OSError as exc:
            raise _write_error(output, exc) from None
