"""A torch-free description of what a checkpoint file holds.

The engine reads a checkpoint into a plain Python object graph (dict, OrderedDict with its
`_metadata` attribute, list, tuple, str, int, float, bool, bytes, None) whose tensors are
:class:`TensorMeta` leaves: shape, stride, offset and dtype, plus where the bytes of their storage
lie in the source file. Nothing here imports torch or touches tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# dtype name (as torch names it, without "torch.") -> bytes per element
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}

# legacy typed-storage class names in pickles (torch.<Name>) -> element dtype
STORAGE_DTYPE: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}
DTYPE_STORAGE: dict[str, str] = {v: k for k, v in STORAGE_DTYPE.items() if k != "UntypedStorage"}

FLOATING_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16"} | {d for d in DTYPE_ITEMSIZE if d.startswith("float8")}
)


@dataclass(frozen=True, slots=True)
class StorageMeta:
    """One storage: a run of raw bytes in a source file.

    `key` is the storage key inside the source file; two tensors that share a storage share one
    StorageMeta (compare with `is` or by `(source, key)`). `dtype` is the element type the storage
    was pickled with ("uint8" for an UntypedStorage).
    """

    source: str  # path of the file the bytes live in
    key: str
    dtype: str
    nbytes: int
    data_offset: int  # absolute offset of the first byte in `source`
    location: str = "cpu"  # device the storage was saved from, e.g. "cuda:0"
    crc32: int | None = None  # CRC-32 of the record (torch zip only)
    record_name: str | None = None  # e.g. "archive/data/0" (torch zip only)

    @property
    def identity(self) -> tuple[str, str]:
        return (self.source, self.key)


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One dense, strided tensor described without its data."""

    storage: StorageMeta
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int = 0  # in elements of `dtype`
    requires_grad: bool = False
    is_parameter: bool = False

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def span(self) -> tuple[int, int]:
        """[start, end) in bytes of the storage that this tensor's elements occupy."""
        if self.numel == 0:
            start = self.storage_offset * self.itemsize
            return (start, start)
        last = self.storage_offset + sum((n - 1) * st for n, st in zip(self.shape, self.stride))
        return (self.storage_offset * self.itemsize, (last + 1) * self.itemsize)

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for n, st in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and st != expected:
                return False
            expected *= n
        return True


@dataclass(frozen=True, slots=True)
class TorchDtype:
    """A pickled `torch.<dtype>` global that is a value in the graph (e.g. in hyper-parameters)."""

    name: str  # "float32"


@dataclass(frozen=True, slots=True)
class TorchDevice:
    """A pickled `torch.device(...)` value."""

    spec: str  # "cpu", "cuda:0"


class TorchSize(tuple):
    """A pickled `torch.Size(...)` value (a tuple of ints)."""

    __slots__ = ()


@dataclass(frozen=True)
class RawCheckpoint:
    """What the engine read from one file: its format and its object graph."""

    path: str
    format: str  # "torch-zip" | "torch-legacy" | "safetensors"
    obj: Any
    metadata: dict[str, str] | None = None  # safetensors __metadata__
    extras: dict[str, Any] = field(default_factory=dict)
