"""The engine's entry point for reading: the complete metadata of a checkpoint, without torch.

>>> ckpt = read_checkpoint("model.pt")          # doctest: +SKIP
>>> ckpt.format, type(ckpt.obj)                 # doctest: +SKIP
('torch-zip', <class 'collections.OrderedDict'>)
"""

from __future__ import annotations

import gc
import os

from ..errors import BadCheckpointError, EngineUnsupported, UnsafeCheckpointError
from .data import open_regular, pread_bytes
from .legacy import read_torch_legacy
from .meta import RawCheckpoint
from .safetensors_format import read_safetensors
from .sniff import HEAD_SIZE, sniff_format
from .zipread import read_torch_zip

__all__ = [
    "detect_format",
    "read_checkpoint",
    "BadCheckpointError",
    "EngineUnsupported",
    "UnsafeCheckpointError",
]


def read_checkpoint(
    path: str | os.PathLike[str], *, allow_globals: frozenset[str] = frozenset()
) -> RawCheckpoint:
    """Read the format and the whole object graph of the checkpoint at `path`; no tensor data.

    The format ("torch-zip", "torch-legacy" or "safetensors") is decided by magic bytes. Tensors
    become TensorMeta leaves whose StorageMeta says where their bytes lie in the file (read them
    with `engine.data`). Globals named in `allow_globals` ("module.name") are accepted as valid
    but not modelled, which ends in EngineUnsupported so that the caller can use torch.

    `extras`: for "torch-zip", "prefix" (the archive folder), "storages" (key -> StorageMeta, in
    first-reference order) and "records" (record names without the prefix); for "torch-legacy",
    "storages". `path` and every `StorageMeta.source` are absolute.

    Raises BadCheckpointError (unreadable, not a checkpoint, corrupt, hostile),
    UnsafeCheckpointError (the pickle needs globals outside the allowlist: all of them listed) or
    EngineUnsupported (valid, but not representable here: fall back to torch.load).
    """
    name = os.fspath(path)
    fd, size = open_regular(name)
    # The graph holds no cycles the collector could free, yet its thousands of tuples and dicts
    # set the collector off again and again (a fifth of the time of a 20,000-tensor read).
    collecting = gc.isenabled()
    gc.disable()
    try:
        kind = _sniff(fd, size, name)
        if kind == "torch-zip":
            return read_torch_zip(fd, size, name, allow_globals=allow_globals)
        if kind == "torch-legacy":
            return read_torch_legacy(fd, size, name, allow_globals=allow_globals)
        return read_safetensors(fd, size, name)
    except OSError as e:
        raise BadCheckpointError(f"{name}: read error: {e.strerror or e}") from None
    finally:
        os.close(fd)
        if collecting:
            gc.enable()


def detect_format(path: str | os.PathLike[str]) -> str:
    """"torch-zip", "torch-legacy" or "safetensors", from the magic bytes; BadCheckpointError else."""
    name = os.fspath(path)
    fd, size = open_regular(name)
    try:
        return _sniff(fd, size, name)
    except OSError as e:
        raise BadCheckpointError(f"{name}: read error: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _sniff(fd: int, size: int, name: str) -> str:
    return sniff_format(pread_bytes(fd, 0, min(size, HEAD_SIZE), name), size, name)
