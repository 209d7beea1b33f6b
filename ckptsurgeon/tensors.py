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
    """The bytes a tensor's values take: elements times their size, or for a sparse tensor the
    bytes of what it stores (indices and specified values)."""
    if isinstance(value, TensorMeta):
        return value.nbytes
    if value.layout is not _torch().strided and not value.is_meta:
        return sum(_plain_nbytes(part) for part in _sparse_parts(value))
    return _plain_nbytes(value)


def _plain_nbytes(value: Any) -> int:
    return int(value.numel()) * int(DTYPE_ITEMSIZE.get(dtype_name(value), value.element_size()))


_COMPRESSED_INDICES = {
    "sparse_csr": ("crow_indices", "col_indices"),
    "sparse_bsr": ("crow_indices", "col_indices"),
    "sparse_csc": ("ccol_indices", "row_indices"),
    "sparse_bsc": ("ccol_indices", "row_indices"),
}


def _sparse_parts(value: Any) -> list[Any]:
    """The tensors a sparse tensor stores: its indices and its specified values."""
    layout = str(value.layout).removeprefix("torch.")
    if layout == "sparse_coo":
        return [value._indices(), value._values()]
    names = _COMPRESSED_INDICES.get(layout)
    if names is None:
        return [value]
    return [getattr(value, names[0])(), getattr(value, names[1])(), value.values()]


def kind_facts(value: Any) -> dict[str, Any] | None:
    """What `inspect` says about a tensor whose values are not plain dense memory (None for a
    plain one): its `kind` (see `tensor_kind`) and `layout`; for a sparse tensor `nnz`, the
    number of values it stores; for a quantized one its `qscheme` and its `scale` and
    `zero_point` (per tensor) or `axis` (per channel); `conj` / `neg` for views with those bits."""
    kind = tensor_kind(value)
    if kind is None:
        return None
    facts: dict[str, Any] = {"kind": kind, "layout": str(value.layout).removeprefix("torch.")}
    torch = _torch()
    if value.layout is not torch.strided and not value.is_meta:
        facts["nnz"] = int(_sparse_parts(value)[-1].numel())
    elif kind == "quantized":
        scheme = value.qscheme()
        facts["qscheme"] = str(scheme).removeprefix("torch.")
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            facts["scale"] = float(value.q_scale())
            facts["zero_point"] = int(value.q_zero_point())
        else:
            facts["axis"] = int(value.q_per_channel_axis())
    elif kind == "conjugate view":
        facts["conj"] = True
    elif kind == "negative view":
        facts["neg"] = True
    return facts


def is_parameter(value: Any) -> bool:
    if isinstance(value, TensorMeta):
        return value.is_parameter
    torch = _torch()
    return torch is not None and isinstance(value, torch.nn.Parameter)


def storage_id(value: Any) -> Any:
    """A hashable identity of the tensor's storage: equal for tensors that share one."""
    if isinstance(value, TensorMeta):
        return value.storage.identity
    if tensor_kind(value) in ("meta", "nested") or value.layout is not _torch().strided:
        return ("unique", id(value))  # no storage of its own to share (or none at all)
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
        if is_tensor(t) and tensor_kind(t) is None and nbytes_of(t):  # plain memory: a view has strides
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


# What torch warns about while it rebuilds the tensors of a file (re.match patterns of the
# messages): news about torch's own future, nothing a reader of a checkpoint did or can change.
# The CLI silences them (and turns any other warning into a notice).
TORCH_NOISE_WARNINGS = (
    r"Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation functions",
    r"TypedStorage is deprecated",
)


# dtypes whose elements are bit patterns without arithmetic in torch (no copy, no cast, no sum):
# compared bit for bit, never averaged
RAW_BITS_DTYPES = frozenset({"bits8", "bits16", "bits1x8", "bits2x4", "bits4x2", "float4_e2m1fn_x2"})


def tensor_kind(value: Any) -> str | None:
    """None for a tensor whose values are plain CPU memory (a TensorMeta, or a dense strided CPU
    torch tensor without conj/neg bit); else what it is: `meta`, `nested`, `sparse_coo`, ...,
    `quantized`, `conjugate view`, `negative view`, or a device type. Nothing may read the
    storage bytes of such a tensor through a pointer: that segfaults or reads garbage."""
    if isinstance(value, TensorMeta):
        return None
    if value.is_meta:
        return "meta"
    if value.is_nested:
        return "nested"
    if value.layout is not _torch().strided:
        return str(value.layout).removeprefix("torch.")
    if value.is_quantized:
        return "quantized"
    if value.device.type != "cpu":
        return str(value.device.type)
    if value.is_conj():
        return "conjugate view"
    if value.is_neg():
        return "negative view"
    return None


def kind_text(value: Any) -> str:
    """`meta float32`, `sparse_csr int64`, `quantized quint8`, or just the dtype of a plain tensor."""
    kind = tensor_kind(value)
    return f"{kind} {dtype_name(value)}" if kind else dtype_name(value)


def plain_values(value: Any, key: str, action: str) -> Any:
    """A dense strided CPU torch tensor with the values of the torch tensor `value`: sparse made
    dense, quantized dequantized, conj/neg bits resolved. `action` ("compare", "average", ...) names
    what needs the values in the UsageError raised where there are none (meta) or torch cannot
    produce them."""
    from .errors import UsageError

    kind = tensor_kind(value)
    if kind is None:
        return value.detach()
    if kind in ("meta", "nested"):
        why = "the checkpoint holds no data for it" if kind == "meta" else "nested tensors are not supported"
        raise UsageError(f"cannot {action} {kind_text(value)} tensor {key!r}: {why}")
    try:
        t = value.detach()
        if t.layout is not _torch().strided:
            t = t.to_dense()
        if t.is_quantized:
            t = t.dequantize()
        t = t.resolve_conj().resolve_neg()
        if t.device.type != "cpu":
            t = t.cpu()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"cannot {action} {kind_text(value)} tensor {key!r}: torch cannot read its values ({reason})"
        ) from None
    return t
