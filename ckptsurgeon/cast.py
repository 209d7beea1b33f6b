"""`--dtype`: cast the floating-point tensors of a state_dict, values exactly as torch's `.to(dtype)`.

Pure: the cast storages go to a sink (a writer's :class:`~ckptsurgeon.io.TensorStage`, a
scratch file beside the output) piece by piece, so the cast state_dict is TensorMeta leaves that
the byte-copying writer copies like any other, and memory stays bounded by one piece whatever
the size of a tensor. Each storage is cast once: tensors that share it (tied weights, views)
still share the cast one. Integer, bool, complex and quantized tensors are left as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import Enum
from typing import Any

from .engine.meta import DTYPE_ITEMSIZE, FLOATING_DTYPES, StorageMeta, TensorMeta
from .errors import UsageError
from .tensors import dtype_name, is_tensor, numel_of, storage_id, tensor_kind

__all__ = ["CastDtype", "cast_keys", "cast_nbytes", "cast_state_dict", "check_cast_dtype"]


class CastDtype(str, Enum):
    """The dtypes `--dtype` casts to."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    float64 = "float64"
    float8_e4m3fn = "float8_e4m3fn"
    float8_e5m2 = "float8_e5m2"


# elements cast at a time: a piece and its cast copy stay within 16 MiB each (float64 is 8 bytes).
# A multiple of torch's vector width: torch's conversion gives a NaN other bits in its vector loop
# than in its scalar tail (float64 -> bfloat16), so pieces must cut where a whole-tensor cast does.
CAST_PIECE = 1 << 21

# where a cast storage goes: (dtype, contiguous pieces in order) -> the storage they make
StorageSink = Callable[[str, Iterable[Any]], StorageMeta]


def check_cast_dtype(name: str) -> str:
    """`name` when `--dtype` can cast to it; else a UsageError listing the choices."""
    try:
        return CastDtype(name).value
    except ValueError:
        choices = ", ".join(d.value for d in CastDtype)
        raise UsageError(f"--dtype {name!r}: expected one of {choices}") from None


def cast_keys(state_dict: Mapping[str, Any], dtype: str) -> list[str]:
    """The keys, in order, whose tensors a cast to `dtype` changes: floating-point tensors of
    another dtype (a quantized tensor's dtype, quint8 or qint8, is not floating point)."""
    check_cast_dtype(dtype)
    return [k for k, t in state_dict.items() if is_tensor(t) and dtype_name(t) in FLOATING_DTYPES - {dtype}]


def cast_nbytes(state_dict: Mapping[str, Any], dtype: str) -> int:
    """The bytes of the tensors of `state_dict` once cast to `dtype` (as `nbytes_of` counts them)."""
    from .tensors import nbytes_of

    cast = set(cast_keys(state_dict, dtype))
    return sum(
        numel_of(t) * DTYPE_ITEMSIZE[dtype] if k in cast else nbytes_of(t)
        for k, t in state_dict.items()
        if is_tensor(t)
    )


def cast_state_dict(
    state_dict: Mapping[str, Any],
    dtype: str,
    sink: StorageSink,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[OrderedDict[str, Any], list[str]]:
    """`state_dict` with its floating-point tensors cast to `dtype` (an OrderedDict, with the
    `_metadata` of `state_dict`), and the keys cast.

    Each storage used by tensors to cast is cast once, over the span they use, piece by piece
    into `sink`; every such tensor becomes a TensorMeta on the cast storage with its shape,
    strides and offset (relative to the span), `requires_grad` and Parameter-ness, so tied
    tensors stay tied. Tensors whose values are not plain memory (sparse, meta, negative views)
    are cast by torch in memory. Other entries are passed through unchanged. The values are
    those of torch's `tensor.to(dtype)`, bit for bit. `progress` is called with the bytes of the
    tensors cast, as they are done.
    """
    import torch

    from .tensors import nbytes_of

    keys = cast_keys(state_dict, dtype)
    target = getattr(torch, dtype)
    out: OrderedDict[str, Any] = OrderedDict(state_dict)
    groups: dict[Any, list[str]] = {}
    for key in keys:
        t = state_dict[key]
        if isinstance(t, TensorMeta):
            groups.setdefault(("meta", t.storage.identity, t.dtype), []).append(key)
        elif tensor_kind(t) is None:
            groups.setdefault(("torch", storage_id(t), dtype_name(t)), []).append(key)
        else:
            out[key] = _cast_in_memory(key, t, target)
            if progress is not None:
                progress(nbytes_of(t))
    for group in groups.values():
        tensors = [state_dict[k] for k in group]
        lo = min(_offset(t) for t in tensors)
        hi = max(_end(t) for t in tensors)
        pieces = (piece.to(target) for piece in _pieces(tensors[0], lo, hi))
        storage = sink(dtype, pieces)
        made: dict[int, TensorMeta] = {}  # one object stays one object (a tied Parameter)
        for key, t in zip(group, tensors):
            if id(t) not in made:
                shape = tuple(int(n) for n in t.shape)
                made[id(t)] = TensorMeta(
                    storage, dtype, shape, _stride(t), _offset(t) - lo, bool(t.requires_grad), _is_parameter(t)
                )
            out[key] = made[id(t)]
        if progress is not None:
            progress(sum(nbytes_of(t) for t in tensors))
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata  # type: ignore[attr-defined]
    return out, keys


def _cast_in_memory(key: str, t: Any, target: Any) -> Any:
    try:
        cast = t.detach().to(target)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        from .tensors import kind_text

        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot cast {kind_text(t)} tensor {key!r} to {target}: {reason}") from None
    if _is_parameter(t):
        import torch

        return torch.nn.Parameter(cast, requires_grad=bool(t.requires_grad))
    return cast.requires_grad_(bool(t.requires_grad))


def _pieces(t: Any, lo: int, hi: int) -> Iterator[Any]:
    """Elements [lo, hi) of `t`'s storage, as flat torch tensors of `t`'s dtype, a piece at a time."""
    import torch

    dtype = getattr(torch, dtype_name(t))
    if isinstance(t, TensorMeta):
        from .engine.data import iter_chunks, verify_crc

        size = t.itemsize
        if (lo * size, hi * size) != (0, t.storage.nbytes):
            verify_crc(t.storage)  # a part is read below: the whole record is checked once first
        buffer = bytearray(min(CAST_PIECE * size, (hi - lo) * size) or 1)
        for chunk in iter_chunks(t.storage, lo * size, hi * size, CAST_PIECE * size, buffer=buffer):
            yield torch.frombuffer(chunk, dtype=torch.uint8).view(dtype)  # read before the next chunk
        return
    flat = torch.empty(0, dtype=dtype).set_(t.untyped_storage(), lo, (hi - lo,), (1,))
    for start in range(lo, hi, CAST_PIECE):
        yield flat[start - lo : min(hi, start + CAST_PIECE) - lo]


def _offset(t: Any) -> int:
    return t.storage_offset if isinstance(t, TensorMeta) else int(t.storage_offset())


def _stride(t: Any) -> tuple[int, ...]:
    return tuple(t.stride) if isinstance(t, TensorMeta) else tuple(int(s) for s in t.stride())


def _end(t: Any) -> int:
    """One past the last storage element `t` uses (its offset when it has no elements)."""
    shape = tuple(int(n) for n in t.shape)
    if 0 in shape:
        return _offset(t)
    return _offset(t) + sum((n - 1) * s for n, s in zip(shape, _stride(t))) + 1


def _is_parameter(t: Any) -> bool:
    from .tensors import is_parameter

    return is_parameter(t)
