"""Saving a checkpoint: torch.save's zip format (storage records copied byte for byte when the
engine read them) or safetensors, always through :func:`~.atomic.atomic_output`, optionally read
back and compared (`verify`)."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from ..containers import replace_at
from ..engine.meta import TensorMeta
from ..engine.source import Source, is_url
from ..errors import CheckpointError, EngineUnsupported, OutputError, UsageError
from ..tensors import is_tensor
from .atomic import atomic_output
from .load import Checkpoint, _debug, _read_source, as_torch, iter_tensors


def with_state_dict(ckpt: Checkpoint, state_dict: Mapping[str, Any]) -> Any:
    """The checkpoint's container with its state_dict replaced (other entries unchanged)."""
    return replace_at(ckpt.container, ckpt.state_dict_path, state_dict)


def make_state_dict(items: Sequence[tuple[str, Any]], metadata: Mapping[str, Any] | None) -> OrderedDict[str, Any]:
    """An OrderedDict state_dict, with `_metadata` attached when there is one."""
    sd: OrderedDict[str, Any] = OrderedDict(items)
    if metadata is not None:
        sd._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return sd


class OutputFormat(str, Enum):
    """The layout a writer produces (`--format`)."""

    pt = "pt"  # torch.save's zip format
    safetensors = "safetensors"


def output_format(path: Path | str, format: str | None = None) -> OutputFormat:
    """`format` when given, else from the output's name: `*.safetensors` -> safetensors, else pt."""
    if format is not None:
        try:
            return OutputFormat(format)
        except ValueError:
            choices = ", ".join(f.value for f in OutputFormat)
            raise UsageError(f"--format {format!r}: expected one of {choices}") from None
    return OutputFormat.safetensors if Path(path).suffix.lower() == ".safetensors" else OutputFormat.pt


def save_checkpoint(
    obj: Any,
    output: str | os.PathLike[str],
    *,
    safetensors_metadata: Mapping[str, str] | None = None,
    verify: bool = False,
    progress: Callable[[int], None] | None = None,
    unsafe: bool = False,
    allow_globals: Sequence[str] = (),
    format: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write `obj` atomically in `format` (see `output_format`: by default `.safetensors` outputs
    get the safetensors format, others torch.save's).

    Returns notices for the user (e.g. what safetensors cannot represent). On any failure the
    destination is left exactly as it was and no temporary file remains. With `verify`, the
    written file is read back and compared with `obj` before it replaces the destination.
    `progress` is called with byte counts as storages are copied (the byte-copying path only).
    `unsafe` and `allow_globals` are what reading the output back may use (as for the input).
    `output` may be a URL (`s3://...`): written locally, then uploaded whole (`storage_options`).
    """
    output = output if isinstance(output, str) and is_url(output) else Path(output)
    notes: list[str] = []
    safetensors = output_format(output, format) is OutputFormat.safetensors
    if safetensors:
        _check_safetensors_target(obj, output)

    def check(tmp: Path) -> None:
        _verify_written(obj, tmp, output, by_key=safetensors, unsafe=unsafe, allow_globals=frozenset(allow_globals))

    with atomic_output(output, check=check if verify else None, storage_options=storage_options) as f:
        if safetensors:
            notes += _write_safetensors(obj, f, safetensors_metadata)
        elif not _try_raw_write(obj, f, output, progress):
            _write_torch(obj, f)
    return notes


def _check_safetensors_target(obj: Any, output: Path | str) -> None:
    """A .safetensors file holds a flat mapping of tensors: refuse anything else, naming what."""
    from ..containers import is_extra_state_key
    from ..errors import sorted_list

    if not isinstance(obj, Mapping):
        raise UsageError(f"{output}: a .safetensors output holds a bare state_dict only")
    others = [k for k, v in obj.items() if not is_tensor(v)]
    if others and all(is_extra_state_key(k) for k in others):
        raise UsageError(
            f"{output}: safetensors holds tensors only, not the extra state (non-tensor values) at "
            f"{sorted_list(others)}; leave it out (extract -x PATTERN) or write a .pt file"
        )
    if others:
        raise UsageError(f"{output}: a .safetensors output holds a bare state_dict only")


def _verify_written(
    intended: Any, written: Path, output: Path | str, *, by_key: bool, unsafe: bool, allow_globals: frozenset[str]
) -> None:
    """Read the written file back and compare every tensor (shape, dtype, values) with `intended`."""
    from ..diff import compare_values
    from ..tensors import dtype_name, shape_of, tensor_kind

    with contextlib.ExitStack() as stack:
        try:
            src = stack.enter_context(Source(written))
            _, container, _, _ = _read_source(src, unsafe=unsafe, allow_globals=allow_globals)
        except CheckpointError as exc:
            reason = str(exc).replace(str(written), str(output))
            raise OutputError(f"{output}: --verify failed: the written file does not read back: {reason}") from None
        if by_key:
            names = list(intended)
            want = [intended[k] for k in names]
            got = [container.get(k) for k in names] if isinstance(container, Mapping) else []
        else:
            names = [str(i) for i in range(len(list(iter_tensors(intended))))]
            want, got = list(iter_tensors(intended)), list(iter_tensors(container))
        if len(want) != len(got) or any(g is None for g in got):
            raise OutputError(f"{output}: --verify failed: the written file holds {len(got)} tensors, not {len(want)}")
        for name, w, g in zip(names, want, got):
            if tensor_kind(w) == "meta" and tensor_kind(g) == "meta":  # no values: the structure is all
                values_differ = False
            else:
                values_differ = compare_values(name, w, g) is not None
            if shape_of(w) != shape_of(g) or dtype_name(w) != dtype_name(g) or values_differ:
                raise OutputError(
                    f"{output}: --verify failed: tensor {name!r} reads back different from what was meant"
                )


def _try_raw_write(obj: Any, f: BinaryIO, output: Path | str, progress: Callable[[int], None] | None = None) -> bool:
    """Copy storage records byte for byte when every tensor is a TensorMeta; False to use torch."""
    tensors = list(iter_tensors(obj))
    if not tensors or not all(isinstance(t, TensorMeta) for t in tensors):
        return False
    from ..engine.zipwrite import write_torch_zip

    start = f.tell()
    try:
        write_torch_zip(obj, f, archive_name=Path(output).stem or "archive", progress=progress, name=str(output))
        return True
    except EngineUnsupported as exc:
        _debug("raw write fallback: %s", exc)
        f.seek(start)
        f.truncate()
        return False


def _write_torch(obj: Any, f: BinaryIO) -> None:
    import torch

    from ..engine.limits import recursion_room
    from ..engine.pickle_checks import MAX_DEPTH

    with recursion_room(MAX_DEPTH):  # the converters and torch.save's pickler recurse per level
        obj = compact_views(as_torch(obj))
        torch.save(obj, f)


def _write_safetensors(sd: Mapping[str, Any], f: BinaryIO, metadata: Mapping[str, str] | None) -> list[str]:
    """Write `sd` as safetensors with its header in the state_dict's order (the library's `save`
    sorts it), so that reading the file back gives the keys in their order. The data is laid out
    by decreasing element size (stable), as the library does, so every tensor is aligned. A
    tensor that is the very same view as another (a tied weight) is written once and its name
    recorded in `__metadata__` as `dropped: kept`, as huggingface_hub does; reading restores it."""
    import json

    import torch

    from ..engine.safetensors_format import SAFETENSORS_DTYPES
    from ..tensors import dtype_name, duplicate_names, shared_storage_groups

    codes = {name: code for code, name in SAFETENSORS_DTYPES.items()}
    notes = []
    tensors = as_torch(OrderedDict(sd))
    # tied weights: written once, the tie recorded (the Hub's way), unless the name is taken in
    # the metadata already; "format": "pt" as huggingface_hub writes it (transformers checks it)
    metadata = {"format": "pt", **(metadata or {})}
    dropped = {k: v for k, v in duplicate_names(tensors).items() if k not in metadata}
    for name in dropped:
        del tensors[name]
    metadata.update(dropped)
    shared = shared_storage_groups(tensors)
    if shared:
        notes.append("safetensors cannot share storage: written separately: " + "; ".join(", ".join(g) for g in shared))
    if getattr(sd, "_metadata", None):
        notes.append("safetensors has no place for the state_dict's _metadata (module versions): dropped")
    tensors = OrderedDict((k, _safetensors_tensor(k, v)) for k, v in tensors.items())  # or exit 2
    unknown = [f"{k} ({dtype_name(v)})" for k, v in tensors.items() if dtype_name(v) not in codes]
    if unknown:
        raise UsageError(f"safetensors has no dtype code for {', '.join(sorted(unknown)[:10])}; write a .pt file")
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for k, v in tensors.items():
        header[k] = {"dtype": codes[dtype_name(v)], "shape": [int(n) for n in v.shape], "data_offsets": [0, 0]}
    data_order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: ties keep key order
    offset = 0
    for k in data_order:
        end = offset + tensors[k].numel() * tensors[k].element_size()
        header[k]["data_offsets"] = [offset, end]
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the library writes it
    f.write(len(encoded).to_bytes(8, "little") + encoded)
    for k in data_order:
        flat = tensors[k].contiguous().reshape(-1)
        if flat.numel():
            f.write(memoryview(flat.view(torch.uint8).numpy()))
    return notes


def _safetensors_tensor(key: str, t: Any) -> Any:
    """A dense contiguous copy of `t` for safetensors, or a UsageError naming what it cannot hold:
    meta, sparse, quantized and nested tensors, and dtypes the installed safetensors has no code
    for (complex128, complex32, bits8, ...). conj/neg views are resolved (values unchanged)."""
    import safetensors
    from safetensors.torch import _SIZE  # the dtypes its writer knows (private)

    from ..tensors import kind_text, plain_values, tensor_kind

    kind = tensor_kind(t)
    if kind is not None and kind not in ("conjugate view", "negative view"):
        raise UsageError(f"cannot write {kind_text(t)} tensor {key!r} to safetensors: only dense tensors fit there")
    if t.dtype not in _SIZE:
        raise UsageError(
            f"cannot write {kind_text(t)} tensor {key!r} to safetensors: "
            f"safetensors {safetensors.__version__} has no dtype for it (write a .pt file instead)"
        )
    return plain_values(t, key, "write")  # no copy of a plain tensor: the writer streams them one by one


def compact_views(obj: Any) -> Any:
    """Shrink every storage to the span its tensors use, keeping tensors that share it shared.

    torch.save writes whole storages, so a slice of a large tensor would drag the whole base
    storage into the file; `.clone()` would fix that but break tying. This rebuilds each partly
    used storage once and re-views every tensor that uses it.
    """
    import torch

    from ..tensors import tensor_kind

    groups: dict[int, list[torch.Tensor]] = {}
    for t in iter_tensors(obj):
        if tensor_kind(t) is not None:  # sparse, quantized, meta, conj/neg: torch.save writes them as they are
            continue
        s = t.untyped_storage()
        if s.nbytes():
            groups.setdefault(s.data_ptr(), []).append(t)
    replace: dict[int, torch.Tensor] = {}
    for tensors in groups.values():
        storage = tensors[0].untyped_storage()
        spans = [_byte_span(t) for t in tensors]
        lo = min(s[0] for s in spans)
        hi = max(s[1] for s in spans)
        align = max(t.element_size() for t in tensors)
        lo -= lo % align
        if lo == 0 and hi >= storage.nbytes():
            continue
        new = torch.empty(hi - lo, dtype=torch.uint8)
        new.copy_(torch.empty(0, dtype=torch.uint8).set_(storage, lo, (hi - lo,), (1,)))
        new_storage = new.untyped_storage()
        for t in tensors:
            view = torch.empty(0, dtype=t.dtype).set_(
                new_storage, t.storage_offset() - lo // t.element_size(), t.shape, t.stride()
            )
            if isinstance(t, torch.nn.Parameter):
                view = torch.nn.Parameter(view, requires_grad=t.requires_grad)
            replace[id(t)] = view
    return _replace_tensors(obj, replace) if replace else obj


def _byte_span(t: Any) -> tuple[int, int]:
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return (start, start)
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (start, (last + 1) * size)


def _replace_tensors(obj: Any, replace: dict[int, Any]) -> Any:
    if id(obj) in replace:
        return replace[id(obj)]
    if isinstance(obj, Mapping) and not is_tensor(obj):
        new = obj.__class__((k, _replace_tensors(v, replace)) for k, v in obj.items())  # type: ignore[call-arg]
        if hasattr(obj, "__dict__"):
            new.__dict__.update(obj.__dict__)
        return new
    if isinstance(obj, list):
        return [_replace_tensors(v, replace) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_replace_tensors(v, replace) for v in obj)
    return obj
