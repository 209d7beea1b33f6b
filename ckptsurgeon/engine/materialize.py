"""Turn an engine object graph into real torch values, reading tensor bytes with `pread`.

The only engine module that imports torch. Each source storage becomes one torch storage holding
just the span its tensors use, so views stay views of one storage and tied tensors stay tied.
"""

from __future__ import annotations

import collections
import ctypes
from typing import Any

import torch

from ckptsurgeon.engine.crc import crc32
from ckptsurgeon.engine.data import check_read_crc
from ckptsurgeon.engine.meta import StorageId, TensorMeta, TorchDevice, TorchDtype, TorchSize
from ckptsurgeon.engine.pickle_write import PlannedStorage, plan_storages
from ckptsurgeon.errors import EngineUnsupported


def to_torch(obj: Any) -> Any:
    """Return `obj` with every TensorMeta replaced by a CPU torch tensor (torch tensors in it stay).

    Containers are rebuilt with the same shape and sharing (an object reached twice is converted
    once); OrderedDicts keep their attributes (`_metadata`); TorchDtype, TorchDevice and TorchSize
    become torch.dtype, torch.device and torch.Size; Parameters become nn.Parameter with their
    requires_grad. Tensors of one source storage share one torch storage, read once with `pread`
    and only over the span they use. Raises BadCheckpointError if a source is missing or short,
    EngineUnsupported for values it does not model.
    """
    plan = plan_storages(obj)
    storages = {ident: _read_storage(planned) for ident, planned in plan.items()}
    return _Converter(plan, storages).convert(obj)


def tensor_from_meta(t: TensorMeta) -> torch.Tensor:
    """Read one tensor into a new contiguous CPU tensor that owns its memory.

    Only the bytes the tensor spans are read. The result is a plain tensor (not a Parameter,
    requires_grad False), whatever `t` says. Raises BadCheckpointError if the source is short.
    """
    plan = plan_storages(t)
    (planned,) = plan.values()
    storage = _read_storage(planned)
    view = _view(storage, t, planned)
    if view.is_contiguous() and view.untyped_storage().nbytes() == view.nbytes:
        return view
    return view.clone(memory_format=torch.contiguous_format)


def _read_storage(planned: PlannedStorage) -> torch.UntypedStorage:
    data = torch.empty(planned.nbytes, dtype=torch.uint8)
    if planned.nbytes:
        buf = memoryview((ctypes.c_char * planned.nbytes).from_address(data.data_ptr())).cast("B")
        planned.source.source.readinto(buf, planned.data_offset)
        # torch never checks a record's CRC; we do, for every record whose bytes we read
        check_read_crc(planned.source, whole=planned.is_whole, crc=lambda: crc32(buf))
    return data.untyped_storage()


def _view(storage: torch.UntypedStorage, t: TensorMeta, planned: PlannedStorage) -> torch.Tensor:
    dtype = _dtype(t.dtype)
    empty = torch.empty((0,), dtype=dtype)
    return empty.set_(storage, t.storage_offset - planned.offset_shift, t.shape, t.stride)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise EngineUnsupported(f"torch has no dtype {name!r}")
    return dtype


class _Converter:
    def __init__(
        self,
        plan: dict[StorageId, PlannedStorage],
        storages: dict[StorageId, torch.UntypedStorage],
    ):
        self.plan = plan
        self.storages = storages
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []
        self.tuples_in_progress: set[int] = set()

    def convert(self, obj: Any) -> Any:
        t = type(obj)
        if obj is None or t in (bool, int, float, str, bytes, complex):
            return obj
        done = self.memo.get(id(obj))
        if done is not None:
            return done
        self.keep.append(obj)
        result: Any
        if t is TensorMeta:
            result = self.tensor(obj)
        elif t is TorchDtype:
            result = _dtype(obj.name)
        elif t is TorchDevice:
            result = torch.device(obj.spec)
        elif t is TorchSize:
            result = torch.Size(obj)
        elif t is collections.OrderedDict:
            od: collections.OrderedDict[Any, Any] = collections.OrderedDict()
            self.memo[id(obj)] = od
            for k, v in obj.items():
                od[self.convert(k)] = self.convert(v)
            for name, value in vars(obj).items():
                setattr(od, name, self.convert(value))
            return od
        elif t is dict:
            d: dict[Any, Any] = {}
            self.memo[id(obj)] = d
            for k, v in obj.items():
                d[self.convert(k)] = self.convert(v)
            return d
        elif t is list:
            lst: list[Any] = []
            self.memo[id(obj)] = lst
            lst.extend(self.convert(x) for x in obj)
            return lst
        elif t is tuple:
            if id(obj) in self.tuples_in_progress:
                raise EngineUnsupported("cannot convert a tuple that contains itself")
            self.tuples_in_progress.add(id(obj))
            result = tuple(self.convert(x) for x in obj)
            self.tuples_in_progress.discard(id(obj))
        elif t is set:
            result = {self.convert(x) for x in obj}
        elif t is bytearray:
            result = bytearray(obj)
        elif isinstance(obj, torch.Tensor):  # a graph mixing both (a --dtype cast of a torch-loaded file)
            result = obj
        else:
            name = f"{t.__module__}.{t.__qualname__}"
            raise EngineUnsupported(f"cannot convert a value of type {name}")
        self.memo[id(obj)] = result
        return result

    def tensor(self, t: TensorMeta) -> torch.Tensor:
        ident = t.storage.identity
        tensor = _view(self.storages[ident], t, self.plan[ident])
        if t.is_parameter:
            return torch.nn.Parameter(tensor, requires_grad=t.requires_grad)
        if t.requires_grad:
            tensor.requires_grad_(True)
        return tensor
