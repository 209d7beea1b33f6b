"""The engine's entry point for reading: the complete metadata of a checkpoint, without torch.

>>> ckpt = read_checkpoint("model.pt")          # doctest: +SKIP
>>> ckpt.format, type(ckpt.obj)                 # doctest: +SKIP
('torch-zip', <class 'collections.OrderedDict'>)
"""

from __future__ import annotations

import gc
import os

from ..errors import BadCheckpointError, EngineUnsupported, UnsafeCheckpointError
from .legacy import read_torch_legacy
from .meta import RawCheckpoint
from .safetensors_format import read_safetensors
from .sniff import HEAD_SIZE, sniff_format
from .source import Source, open_source
from .zipread import read_torch_zip

__all__ = [
    "detect_format",
    "read_checkpoint",
    "read_source",
    "Source",
    "BadCheckpointError",
    "EngineUnsupported",
    "UnsafeCheckpointError",
]


def read_checkpoint(
    path: str | os.PathLike[str], *, allow_globals: frozenset[str] = frozenset(), opaque: bool = False
) -> RawCheckpoint:
    """Open the checkpoint at `path` (a path or a URL) as a :class:`Source` and `read_source` it
    (the Source is closed again if reading fails; else `RawCheckpoint.source` holds it)."""
    src = open_source(path)
    try:
        return read_source(src, allow_globals=allow_globals, opaque=opaque)
    except BaseException:
        src.close()
        raise


def read_source(src: Source, *, allow_globals: frozenset[str] = frozenset(), opaque: bool = False) -> RawCheckpoint:
    """Read the format and the whole object graph of the checkpoint `src`; no tensor data.

    The format ("torch-zip", "torch-legacy" or "safetensors") is decided by magic bytes. Tensors
    become TensorMeta leaves whose StorageMeta says where their bytes lie in the file (read them
    with `engine.data`). Globals named in `allow_globals` ("module.name") are accepted as valid
    but not modelled, which ends in EngineUnsupported so that the caller can use torch. With
    `opaque`, a global outside the allowlists that builds no tensor is read as an inert
    :class:`~.pickle_globals.OpaqueObject` (or :class:`~.pickle_globals.PickledGlobal`) instead of
    being refused (see :mod:`.unpickle`).

    `extras`: for "torch-zip", "prefix" (the archive folder), "storages" (key -> StorageMeta, in
    first-reference order) and "records" (record names without the prefix); for "torch-legacy",
    "storages". `path` is absolute; every `StorageMeta.source` is `src`, the handle every later
    read of tensor bytes goes through.

    Raises BadCheckpointError (unreadable, not a checkpoint, corrupt, hostile),
    UnsafeCheckpointError (the pickle needs globals outside the allowlist: all of them listed) or
    EngineUnsupported (valid, but not representable here: fall back to torch.load).
    """
    name = src.name
    # The graph holds no cycles the collector could free, yet its thousands of tuples and dicts
    # set the collector off again and again (a fifth of the time of a 20,000-tensor read).
    collecting = gc.isenabled()
    gc.disable()
    try:
        kind = detect_format(src)
        if kind == "torch-zip":
            return read_torch_zip(src, allow_globals=allow_globals, opaque=opaque)
        if kind == "torch-legacy":
            return read_torch_legacy(src, allow_globals=allow_globals, opaque=opaque)
        return read_safetensors(src)
    except OSError as e:
        raise BadCheckpointError(f"{name}: read error: {e.strerror or e}") from None
    finally:
        if collecting:
            gc.enable()


def detect_format(src: Source) -> str:
    """ "torch-zip", "torch-legacy" or "safetensors", from the magic bytes; BadCheckpointError else."""
    try:
        return sniff_format(src.pread(min(src.size, HEAD_SIZE), 0), src.size, src.name)
    except OSError as e:
        raise BadCheckpointError(f"{src.name}: read error: {e.strerror or e}") from None
