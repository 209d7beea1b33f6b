"""Facts about one tensor, whether a torch.Tensor or an engine TensorMeta, without importing torch."""

from __future__ import annotations

import sys
from collections.abc import Mapping
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


def _view_of(value: Any) -> tuple[Any, ...]:
    """Everything that makes two tensors the same view: storage, dtype, offset, shape, strides."""
    if isinstance(value, TensorMeta):
        return (value.storage.identity, value.dtype, value.storage_offset, value.shape, value.stride)
    return (storage_id(value), str(value.dtype), value.storage_offset(), tuple(value.shape), tuple(value.stride()))


def duplicate_names(tensors: Mapping[str, Any]) -> dict[str, str]:
    """A plan for formats without shared storage (safetensors): `{dropped: kept}` for every name
    whose tensor is the very same view as another's (tied weights), as huggingface_hub and
    safetensors' `save_model` drop them: of each group the alphabetically first name is kept.
    Tensors that share storage without being the same view are not in the plan."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, t in tensors.items():
        if is_tensor(t) and nbytes_of(t):
            groups.setdefault(_view_of(t), []).append(key)
    plan: dict[str, str] = {}
    for names in groups.values():
        kept = min(names)
        plan.update((name, kept) for name in names if name != kept)
    return plan


def restore_duplicates(tensors: dict[str, Any], metadata: Mapping[str, str]) -> dict[str, str]:
    """Undo `duplicate_names` on a read safetensors state_dict, in place: each metadata entry
    `dropped -> kept` whose `kept` is a tensor of the file and whose `dropped` is not comes back
    as a second name of that very tensor (appended in metadata order). Returns the metadata
    without those entries."""
    rest: dict[str, str] = {}
    for name, kept in metadata.items():
        if name not in tensors and isinstance(kept, str) and is_tensor(tensors.get(kept)):
            tensors[name] = tensors[kept]
        else:
            rest[name] = kept
    return rest


def shared_storage_groups(tensors: dict[str, Any]) -> list[list[str]]:
    """Groups of keys (two or more) whose tensors share one storage, in key order."""
    groups: dict[Any, list[str]] = {}
    for key, t in tensors.items():
        groups.setdefault(storage_id(t), []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]
