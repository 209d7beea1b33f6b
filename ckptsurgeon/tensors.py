"""Facts about one tensor, whether a torch.Tensor or an engine TensorMeta, without importing torch."""

from __future__ import annotations

import sys
from typing import Any

from .engine.meta import DTYPE_ITEMSIZE, TensorMeta


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(value: Any) -> bool:
    if isinstance(value, TensorMeta):
        return True
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def dtype_name(value: Any) -> str:
    """`float32`, `bfloat16`, ... (torch's name without the `torch.` prefix)."""
    if isinstance(value, TensorMeta):
        return value.dtype
    return str(value.dtype).removeprefix("torch.")


def shape_of(value: Any) -> tuple[int, ...]:
    if isinstance(value, TensorMeta):
        return value.shape
    return tuple(int(s) for s in value.shape)


def numel_of(value: Any) -> int:
    if isinstance(value, TensorMeta):
        return value.numel
    return int(value.numel())


def nbytes_of(value: Any) -> int:
    if isinstance(value, TensorMeta):
        return value.nbytes
    return int(value.numel()) * DTYPE_ITEMSIZE.get(dtype_name(value), value.element_size())


def is_parameter(value: Any) -> bool:
    if isinstance(value, TensorMeta):
        return value.is_parameter
    torch = _torch()
    return torch is not None and isinstance(value, torch.nn.Parameter)


def storage_id(value: Any) -> Any:
    """A hashable identity of the tensor's storage: equal for tensors that share one."""
    if isinstance(value, TensorMeta):
        return value.storage.identity
    storage = value.untyped_storage()
    if storage.nbytes() == 0:
        return ("empty", id(value))
    return ("torch", storage.data_ptr())


def shared_storage_groups(tensors: dict[str, Any]) -> list[list[str]]:
    """Groups of keys (two or more) whose tensors share one storage, in key order."""
    groups: dict[Any, list[str]] = {}
    for key, t in tensors.items():
        groups.setdefault(storage_id(t), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]
