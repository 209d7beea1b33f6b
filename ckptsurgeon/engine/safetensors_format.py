"""Reading a safetensors file's header without the safetensors library.

Layout: an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
data_offsets; an optional `__metadata__` of strings), then the data. Stricter than the library:
a name given twice (at any level of the JSON) is refused, as the format demands.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Any

from ..errors import BadCheckpointError, EngineUnsupported
from .limits import MAX_DIM_SIZE, MAX_DIMS, brief, numel_overflows
from .meta import DTYPE_ITEMSIZE, RawCheckpoint, StorageMeta, TensorMeta
from .source import Source

MAX_HEADER_BYTES = 100_000_000  # the library's limit

# safetensors dtype code -> torch dtype name (safetensors/torch.py and its Rust dtype list)
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
# Codes the library knows but the data model does not (sub-byte types).
_UNMODELLED = {"F4", "F6_E2M3", "F6_E3M2"}
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


class DuplicateKey(Exception):
    """A JSON object names one key twice (json's `object_pairs_hook` would keep the last)."""


def unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` that refuses a key given twice (DuplicateKey)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def parse_header(
    header: bytes, data_size: int, path: str, source: Source, data_start: int
) -> tuple[OrderedDict[str, TensorMeta], dict[str, str] | None]:
    """Tensors (in the header's order: a state_dict's order when ckptsurgeon wrote the file) and
    `__metadata__` of a safetensors header whose data region holds `data_size` bytes."""

    def bad(reason: str) -> BadCheckpointError:
        return BadCheckpointError(f"{path}: corrupt safetensors header: {reason}")

    import json  # here, so that reading torch files does not pay for importing it

    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=unique_pairs)
    except DuplicateKey as e:
        raise bad(f"the name {e.args[0]!r} appears twice") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"invalid JSON ({e})") from None
    except RecursionError:
        raise bad("the JSON header is nested too deeply") from None
    if type(parsed) is not dict:
        raise bad("the header is not a JSON object")
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None:
        if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
            raise bad("__metadata__ must map strings to strings")
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, info in parsed.items():
        try:
            code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise bad(f"tensor {name!r} lacks one of {', '.join(_TENSOR_FIELDS)}") from None
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            if code in _UNMODELLED:
                raise EngineUnsupported(f"{path}: tensor {name!r} has dtype {code}")
            raise bad(f"tensor {name!r} has unknown dtype {code!r}")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise bad(f"tensor {name!r} has shape {brief(shape)} (a list of at most {MAX_DIMS} sizes)")
        numel = 1
        for d in shape:
            if type(d) is not int or not 0 <= d < MAX_DIM_SIZE:
                raise bad(f"tensor {name!r} has shape {brief(shape)}")
            numel *= d
        if numel_overflows(shape):
            raise bad(f"tensor {name!r} has shape {brief(shape)}, whose number of elements overflows int64")
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has data_offsets {brief(offsets)}")
        if numel * DTYPE_ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise bad(
                f"tensor {name!r} ({code} {shape}) needs {numel * DTYPE_ITEMSIZE[dtype]} bytes but "
                f"data_offsets {offsets} give {offsets[1] - offsets[0]}"
            )
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    expected = 0
    for begin, end, name, _, _ in sorted(entries):  # the data, in file order, leaves no gap
        if begin != expected:
            what = "overlaps the previous tensor" if begin < expected else "leaves a gap before it"
            raise bad(f"tensor {name!r} at bytes [{begin}, {end}) {what}")
        expected = end
    tensors: OrderedDict[str, TensorMeta] = OrderedDict()
    for begin, end, name, dtype, shape in entries:
        stride = []
        step = 1
        for d in reversed(shape):
            stride.append(step)
            step *= d
        storage = StorageMeta(source, name, dtype, end - begin, data_start + begin)
        tensors[name] = TensorMeta(storage, dtype, shape, tuple(reversed(stride)))
    if expected != data_size:
        if expected > data_size:
            raise BadCheckpointError(
                f"{path}: truncated safetensors file: the header needs {expected} data bytes, the file has {data_size}"
            )
        raise bad(f"{data_size - expected} bytes after the last tensor")
    return tensors, metadata


def read_safetensors(src: Source) -> RawCheckpoint:
    """Read the safetensors file `src` (the caller owns it)."""
    file_size, path = src.size, src.name
    if file_size < 8:
        raise BadCheckpointError(f"{path}: truncated safetensors file")
    (header_len,) = struct.unpack("<Q", src.pread(8, 0))
    if header_len > MAX_HEADER_BYTES:
        raise BadCheckpointError(
            f"{path}: safetensors header of {header_len} bytes exceeds the {MAX_HEADER_BYTES} limit"
        )
    if 8 + header_len > file_size:
        raise BadCheckpointError(f"{path}: truncated safetensors file (the header is cut)")
    header = src.pread(header_len, 8)
    tensors, metadata = parse_header(header, file_size - 8 - header_len, path, src, 8 + header_len)
    return RawCheckpoint(path=os.path.abspath(path), format="safetensors", obj=tensors, metadata=metadata, source=src)
