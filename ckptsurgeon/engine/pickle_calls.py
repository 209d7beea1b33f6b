"""What calling a modelled global builds: the handlers the VM's REDUCE dispatches to.

:data:`HANDLERS` maps each :class:`~.pickle_globals.ModelledCallable`'s `kind` to a function of
its argument tuple: OrderedDict, set, `_codecs.encode`, `torch.Size`, `torch.device` and torch's
tensor / parameter rebuild functions, which check every argument and return a
:class:`~.meta.TensorMeta`. They raise :class:`~.pickle_checks.Malformed` or
:class:`~.pickle_checks.Unsupported`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .limits import MAX_DIM_SIZE, MAX_DIMS, brief, numel_overflows
from .meta import DTYPE_ITEMSIZE, FLOATING_DTYPES, StorageMeta, TensorMeta, TorchDevice, TorchDtype, TorchSize
from .pickle_checks import Malformed, Unsupported, is_int
from .pickle_globals import Opaque


def _h_ordered_dict(args: tuple[Any, ...]) -> OrderedDict[Any, Any]:
    if not args:
        return OrderedDict()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        # (key, value) tuples, or [key, value] lists as Python 2's OrderedDict.__reduce__ wrote them
        pairs = args[0]
        if all(type(p) in (tuple, list) and len(p) == 2 for p in pairs):
            return OrderedDict(pairs)
    if len(args) == 1 and type(args[0]) in (dict, OrderedDict):
        return OrderedDict(args[0])  # as torch's call: the argument's attributes are not copied
    raise Malformed("collections.OrderedDict called with unexpected arguments")


def _h_set(args: tuple[Any, ...]) -> set[Any]:
    if not args:
        return set()
    if len(args) == 1 and type(args[0]) in (list, tuple):
        return set(args[0])
    raise Malformed("builtins.set called with unexpected arguments")


def _h_encode(args: tuple[Any, ...]) -> bytes:
    if len(args) in (1, 2) and type(args[0]) is str and all(type(a) is str for a in args):
        encoding = args[1].lower().replace("_", "-") if len(args) == 2 else "utf-8"
        try:
            if encoding in ("latin1", "latin-1", "iso-8859-1"):
                return args[0].encode("latin-1")
            if encoding in ("utf-8", "utf8", "ascii"):
                return args[0].encode(encoding)
        except UnicodeEncodeError:
            raise Malformed(f"_codecs.encode cannot encode its string as {encoding}") from None
        raise Unsupported(f"_codecs.encode with encoding {brief(args[1])}")
    raise Malformed("_codecs.encode called with unexpected arguments")


def _h_size(args: tuple[Any, ...]) -> TorchSize:
    if not args:
        return TorchSize()
    if len(args) == 1 and type(args[0]) in (tuple, list, TorchSize) and all(is_int(x) for x in args[0]):
        return TorchSize(args[0])
    raise Malformed("torch.Size called with something other than a tuple of ints")


def _h_device(args: tuple[Any, ...]) -> TorchDevice:
    if len(args) == 1 and type(args[0]) is str:
        spec = args[0]
        kind, _, index = spec.partition(":")
        if kind.isidentifier() and (not index or index.isdigit()):
            return TorchDevice(spec)
    elif len(args) == 2 and type(args[0]) is str and args[0].isidentifier():
        if args[1] is None:
            return TorchDevice(args[0])
        if is_int(args[1]) and args[1] >= 0 and ":" not in args[0]:
            return TorchDevice(f"{args[0]}:{args[1]}")
    raise Malformed(f"torch.device called with invalid arguments {brief(args)}")


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if type(values) not in (tuple, list, TorchSize) or len(values) > MAX_DIMS:
        raise Malformed(f"a tensor {what} that is not a tuple of at most {MAX_DIMS} ints")
    for v in values:
        if type(v) is not int:
            raise Malformed(f"a tensor {what} that is not a tuple of ints")
        if v < 0:
            raise Malformed(f"a tensor with a negative {what} {brief(tuple(values))}")
        if v >= MAX_DIM_SIZE:
            raise Malformed(f"a tensor with a {what} past 2**63: {brief(tuple(values))}")
    return values if type(values) is tuple else tuple(values)


def _make_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: str, metadata: Any
) -> Any:
    if type(storage) is Opaque:
        return storage
    if type(storage) is not StorageMeta:
        raise Malformed(f"a tensor rebuilt from a {type(storage).__name__} instead of a storage")
    shape = _check_ints(size, "size")
    strides = _check_ints(stride, "stride")
    if len(shape) != len(strides):
        raise Malformed(f"a tensor with {len(shape)} sizes but {len(strides)} strides")
    if not is_int(offset) or not 0 <= offset < MAX_DIM_SIZE:
        raise Malformed(f"a tensor with storage offset {brief(offset)}")
    if type(requires_grad) is not bool:
        raise Malformed(f"requires_grad is a {type(requires_grad).__name__}")
    if hooks is not None and type(hooks) not in (OrderedDict, dict):
        raise Malformed(f"backward hooks of type {type(hooks).__name__}")
    if hooks:
        raise Unsupported("a tensor with backward hooks")
    if metadata is not None and type(metadata) is not dict:
        raise Malformed(f"tensor metadata of type {type(metadata).__name__}")
    if metadata:
        raise Unsupported(f"a tensor with metadata {sorted(map(str, metadata))} (conj/neg bits)")
    if dtype not in DTYPE_ITEMSIZE:
        raise Unsupported(f"a tensor of dtype {dtype}")
    if requires_grad and dtype not in FLOATING_DTYPES and not dtype.startswith("complex"):
        raise Malformed(f"a {dtype} tensor that requires grad")
    if numel_overflows(shape):
        raise Malformed(f"a tensor of shape {brief(list(shape))}, whose number of elements overflows int64")
    numel = 1
    last = offset
    for n, st in zip(shape, strides):
        numel *= n
        last += (n - 1) * st
    itemsize = DTYPE_ITEMSIZE[dtype]
    if numel and (last + 1) * itemsize > storage.nbytes:  # TensorMeta.span, computed once
        raise Malformed(
            f"a {dtype} tensor of shape {list(shape)}, stride {list(strides)}, offset {offset} "
            f"spans bytes [{offset * itemsize}, {(last + 1) * itemsize}) of storage {brief(storage.key)}, "
            f"which holds {storage.nbytes}"
        )
    return TensorMeta(storage, dtype, shape, strides, offset, requires_grad, False)


def _h_rebuild_v2(args: tuple[Any, ...]) -> Any:
    if len(args) not in (6, 7):
        raise Malformed(f"_rebuild_tensor_v2 called with {len(args)} arguments")
    storage = args[0]
    dtype = storage.dtype if type(storage) is StorageMeta else ""
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    return _make_tensor(storage, offset, size, stride, requires_grad, hooks, dtype, args[6] if len(args) == 7 else None)


def _h_rebuild_v1(args: tuple[Any, ...]) -> Any:
    """`_rebuild_tensor(storage, storage_offset, size, stride)`, as torch 0.4 and older saved tensors."""
    if len(args) != 4:
        raise Malformed(f"_rebuild_tensor called with {len(args)} arguments")
    storage = args[0]
    dtype = storage.dtype if type(storage) is StorageMeta else ""
    return _make_tensor(storage, args[1], args[2], args[3], False, None, dtype, None)


def _h_rebuild_v3(args: tuple[Any, ...]) -> Any:
    if len(args) not in (7, 8):
        raise Malformed(f"_rebuild_tensor_v3 called with {len(args)} arguments")
    dtype = args[6]
    if type(dtype) is Opaque:
        return dtype
    if type(dtype) is not TorchDtype:
        raise Malformed(f"_rebuild_tensor_v3 with dtype argument of type {type(dtype).__name__}")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    return _make_tensor(
        storage, offset, size, stride, requires_grad, hooks, dtype.name, args[7] if len(args) == 8 else None
    )


def _h_parameter(args: tuple[Any, ...]) -> Any:
    """`torch.nn.Parameter(data[, requires_grad])` (REDUCE or NEWOBJ): requires_grad defaults to True."""
    if len(args) not in (1, 2):
        raise Malformed(f"torch.nn.Parameter called with {len(args)} arguments")
    return _h_rebuild_parameter((args[0], args[1] if len(args) == 2 else True, None))


def _h_rebuild_parameter(args: tuple[Any, ...]) -> Any:
    if len(args) != 3:
        raise Malformed(f"_rebuild_parameter called with {len(args)} arguments")
    data, requires_grad, hooks = args
    if type(data) is Opaque:
        return data
    if type(data) is not TensorMeta:
        raise Malformed(f"a Parameter rebuilt from a {type(data).__name__}")
    if data.is_parameter:
        raise Unsupported("a Parameter of a Parameter")
    if type(requires_grad) is not bool:
        raise Malformed(f"Parameter requires_grad is a {type(requires_grad).__name__}")
    if hooks is not None and type(hooks) not in (OrderedDict, dict):
        raise Malformed(f"backward hooks of type {type(hooks).__name__}")
    if hooks:
        raise Unsupported("a Parameter with backward hooks")
    if requires_grad and data.dtype not in FLOATING_DTYPES and not data.dtype.startswith("complex"):
        raise Malformed(f"a {data.dtype} Parameter that requires grad")
    return TensorMeta(data.storage, data.dtype, data.shape, data.stride, data.storage_offset, requires_grad, True)


HANDLERS: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "collections.OrderedDict": _h_ordered_dict,
    "builtins.set": _h_set,
    "_codecs.encode": _h_encode,
    "torch.Size": _h_size,
    "torch.device": _h_device,
    "torch._utils._rebuild_tensor": _h_rebuild_v1,
    "torch._utils._rebuild_tensor_v2": _h_rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _h_rebuild_v3,
    "torch._utils._rebuild_parameter": _h_rebuild_parameter,
    "torch.nn.parameter.Parameter": _h_parameter,
}

# The handlers that build a tensor or a torch value: no argument of theirs may be an opaque value.
TENSOR_HANDLERS = frozenset(HANDLERS) - {"collections.OrderedDict", "builtins.set"}
