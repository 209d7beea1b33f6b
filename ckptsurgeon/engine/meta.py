"""A torch-free description of what a checkpoint file holds.

The engine reads a checkpoint into a plain Python object graph (dict, OrderedDict with its
`_metadata` attribute, list, tuple, str, int, float, bool, bytes, None) whose tensors are
:class:`TensorMeta` leaves: shape, stride, offset and dtype, plus where the bytes of their storage
lie in the source file. Nothing here imports torch or touches tensor data.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .source import Source

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

# dtype name -> the numpy dtype of its raw little-endian bytes, for the dtypes numpy holds as they
# are stored (the 16-bit floats and float8 need widening: each reader says how)
NUMPY_RAW: dict[str, str] = {
    "float64": "<f8",
    "float32": "<f4",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "u1",
    "bool": "?",
}

FLOATING_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16"} | {d for d in DTYPE_ITEMSIZE if d.startswith("float8")}
)


class _Value:
    """Base of the engine's value types: slotted, compared and hashed by their fields, never
    changed after construction (plain classes rather than dataclasses: the engine makes one per
    tensor, and a frozen dataclass takes 4x as long to construct; `import dataclasses` alone
    costs inspect a tenth of its run time)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Value) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


StorageId = tuple[tuple[int, int], str]  # (device and inode of the file, storage key)


class StorageMeta(_Value):
    """One storage: a run of raw bytes in a source file.

    `source` is the open :class:`~ckptsurgeon.engine.source.Source` the bytes are read through
    (never a path: nothing reopens a file by name). `key` is the storage key inside the source
    file; two tensors that share a storage share one StorageMeta (compare with `is` or by
    `identity`). `dtype` is the element type the storage was pickled with ("uint8" for an
    UntypedStorage).
    """

    __slots__ = ("source", "key", "dtype", "nbytes", "data_offset", "location", "crc32", "record_name")

    def __init__(
        self,
        source: Source,  # the open file the bytes live in
        key: str,
        dtype: str,
        nbytes: int,
        data_offset: int,  # absolute offset of the first byte in `source`
        location: str = "cpu",  # device the storage was saved from, e.g. "cuda:0"
        crc32: int | None = None,  # CRC-32 of the record (torch zip only)
        record_name: str | None = None,  # e.g. "archive/data/0" (torch zip only)
    ) -> None:
        self.source = source
        self.key = key
        self.dtype = dtype
        self.nbytes = nbytes
        self.data_offset = data_offset
        self.location = location
        self.crc32 = crc32
        self.record_name = record_name

    @property
    def identity(self) -> StorageId:
        """(file, key): the same storage of the same file, however often the file was opened."""
        return (self.source.file_id, self.key)


class TensorMeta(_Value):
    """One dense, strided tensor described without its data."""

    __slots__ = ("storage", "dtype", "shape", "stride", "storage_offset", "requires_grad", "is_parameter")

    def __init__(
        self,
        storage: StorageMeta,
        dtype: str,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        storage_offset: int = 0,  # in elements of `dtype`
        requires_grad: bool = False,
        is_parameter: bool = False,
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.shape = shape
        self.stride = stride
        self.storage_offset = storage_offset
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return prod(self.shape)

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


class TorchDtype(_Value):
    """A pickled `torch.<dtype>` global that is a value in the graph (e.g. in hyper-parameters)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # "float32"


class TorchDevice(_Value):
    """A pickled `torch.device(...)` value."""

    __slots__ = ("spec",)

    def __init__(self, spec: str) -> None:
        self.spec = spec  # "cpu", "cuda:0"


class TorchSize(tuple[int, ...]):
    """A pickled `torch.Size(...)` value (a tuple of ints)."""

    __slots__ = ()


class RawCheckpoint(_Value):
    """What the engine read from one file: its format and its object graph."""

    __slots__ = ("path", "format", "obj", "metadata", "extras", "source")

    def __init__(
        self,
        path: str,
        format: str,  # "torch-zip" | "torch-legacy" | "safetensors"
        obj: Any,
        metadata: dict[str, str] | None = None,  # safetensors __metadata__
        extras: dict[str, Any] | None = None,
        source: Source | None = None,  # the open file the checkpoint was read from
    ) -> None:
        self.path = path
        self.source = source
        self.format = format
        self.obj = obj
        self.metadata = metadata
        self.extras = {} if extras is None else extras
