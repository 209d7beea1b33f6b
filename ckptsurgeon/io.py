"""All checkpoint file I/O: safe loading, finding the state_dict, atomic saving.

Nothing else in ckptsurgeon opens a checkpoint file. A checkpoint is opened once, as an engine
:class:`~ckptsurgeon.engine.source.Source` (an open handle plus the identity that was validated),
and every later read goes through that handle: a file renamed onto the path afterwards is never
read, one changed in place is refused. Loading tries the torch-free engine first (metadata only:
tensors are TensorMeta leaves whose bytes stay on disk) and falls back to
`torch.load(weights_only=True, mmap=True, map_location="cpu")` of the same open file for what the
engine does not model. `unsafe=True` is the only way to reach `weights_only=False`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

from . import interrupts
from .containers import KeyPath, find_state_dict, format_key_path, replace_at
from .engine.meta import RawCheckpoint, TensorMeta
from .engine.source import Source
from .errors import (
    BadCheckpointError,
    CheckpointError,
    ContainerError,
    EngineUnsupported,
    OutputError,
    RestrictedPickleError,
    UnsafeCheckpointError,
    UsageError,
)
from .tensors import is_tensor


def _debug(message: str, *args: Any) -> None:
    """Engine decisions, for CKPTSURGEON_DEBUG (logging is imported only when something is said)."""
    import logging

    logging.getLogger("ckptsurgeon").debug(message, *args)


TMP_MARK = ".ckptsurgeon-tmp"


class Checkpoint:
    """A loaded checkpoint: the whole container plus the state_dict found inside it.

    It owns the open file its tensors are read from (`source`): use it as a context manager, or
    call `close()`, when done (a Checkpoint nobody references closes it too). Reading tensor bytes
    after `close()` is a BadCheckpointError.
    """

    def __init__(
        self,
        path: Path,
        format: str,  # "torch-zip" | "torch-legacy" | "safetensors"
        container: Any,
        state_dict_path: KeyPath | None,
        state_dict: Mapping[str, Any],
        engine: str,  # "raw" (torch-free, TensorMeta leaves) or "torch"
        safetensors_metadata: dict[str, str] | None = None,
        source: Source | None = None,
    ) -> None:
        self.path = path
        self.source = source
        self.format = format
        self.container = container
        self.state_dict_path = state_dict_path
        self.state_dict = state_dict
        self.engine = engine
        self.safetensors_metadata = safetensors_metadata

    def __repr__(self) -> str:
        return (
            f"Checkpoint(path={self.path!r}, format={self.format!r}, "
            f"state_dict_key={self.state_dict_key!r}, engine={self.engine!r})"
        )

    def close(self) -> None:
        """Close the checkpoint's file (tensors read lazily can then no longer be read)."""
        if self.source is not None:
            self.source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def state_dict_key(self) -> str | None:
        return format_key_path(self.state_dict_path) if self.state_dict_path else None

    def other_entries(self) -> list[tuple[str, Any]]:
        """Top-level container entries other than the state_dict (empty for a bare state_dict)."""
        if not self.state_dict_path or not isinstance(self.container, Mapping):
            return []
        return [(str(k), v) for k, v in self.container.items() if k != self.state_dict_path[0]]


# ----------------------------------------------------------------------------------------- load


def _read_raw(src: Source, allow_globals: frozenset[str]) -> RawCheckpoint | None:
    """The engine's reading, or None where it does not model the file (torch decides then).

    The engine also decides what the file is before anything parses it: a non-checkpoint is a
    BadCheckpointError here.
    """
    from .engine.read import read_source

    try:
        return read_source(src, allow_globals=allow_globals)
    except EngineUnsupported as exc:
        _debug("engine fallback for %s: %s", src, exc)
        return None


def _torch_load(src: Source, fmt: str, *, unsafe: bool, allow_globals: frozenset[str]) -> Any:
    """torch's own loading of the open file `src` (by `/proc/self/fd`, never by its name again),
    for what the engine does not model."""
    path = src.name
    opened = src.proc_path
    from .safety import check_torch_version

    check_torch_version()  # weights_only is only as safe as the torch that implements it
    import torch

    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(opened, framework="pt") as f:
                tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
                tensors_metadata = f.metadata()
            return tensors, tensors_metadata
        except Exception as exc:
            raise BadCheckpointError(f"{path}: not a readable safetensors file: {_one_line(exc)}") from None
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not unsafe}
    if fmt == "torch-zip":
        kwargs["mmap"] = True
    from .safety import torch_allowlist

    extra = torch_allowlist(allow_globals) if allow_globals and not unsafe else []
    try:
        with torch.serialization.safe_globals(extra):  # type: ignore[arg-type]  # (stand-in class, name) pairs
            obj = torch.load(opened, **kwargs)
    except CheckpointError as exc:  # an allowed class the file tried to call (see safety.py)
        raise BadCheckpointError(f"{path}: {exc}") from None
    except Exception as exc:
        if not unsafe:
            unsafe_names = _unsafe_globals(opened, fmt)
            if unsafe_names:
                raise UnsafeCheckpointError(str(path), unsafe_names) from None
        raise BadCheckpointError(f"{path}: not a readable checkpoint: {_one_line(exc)}") from None
    if unsafe:
        obj = _modules_to_state_dicts(obj)
    return obj


def _unsafe_globals(path: str, fmt: str) -> list[str]:
    """Globals the pickle references outside torch's allowlist (read without executing)."""
    import torch

    if fmt == "torch-zip":
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            return []
    return []


def _modules_to_state_dicts(obj: Any) -> Any:
    """With --unsafe, a pickled nn.Module (top level or a container entry) counts as its state_dict."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj.__class__((k, v.state_dict() if isinstance(v, torch.nn.Module) else v) for k, v in obj.items())
    return obj


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    unsafe: bool = False,
    key: str | None = None,
    allow_globals: Sequence[str] = (),
) -> Checkpoint:
    """Load a checkpoint safely and locate its state_dict (see containers.find_state_dict).

    Tensors are engine TensorMeta leaves when the torch-free engine can read the file (no tensor
    data is read), torch tensors (mmap-backed where possible) otherwise. The returned Checkpoint
    holds the file open (see `Checkpoint.close`).
    """
    path = Path(path)
    src = Source(path)
    try:
        fmt, container, engine, st_meta = _read_source(src, unsafe=unsafe, allow_globals=frozenset(allow_globals))
        sd_path, state_dict = find_state_dict(container, key)
    except ContainerError as exc:
        src.close()
        raise ContainerError(f"{path}: {exc}") from None
    except BaseException:
        src.close()
        raise
    if engine == "torch":
        nested = [str(k) for k, v in state_dict.items() if getattr(v, "is_nested", False)]
        if nested:
            src.close()
            raise UsageError(f"{path}: nested tensors are not supported: {', '.join(map(repr, nested[:5]))}")
    return Checkpoint(
        path=path,
        format=fmt,
        container=container,
        state_dict_path=sd_path,
        state_dict=state_dict,
        engine=engine,
        safetensors_metadata=st_meta,
        source=src,
    )


def _read_source(src: Source, *, unsafe: bool, allow_globals: frozenset[str]) -> tuple[str, Any, str, Any]:
    """(format, whole object, engine used, safetensors metadata) of an open checkpoint file."""
    raw: RawCheckpoint | None = None
    try:
        raw = _read_raw(src, allow_globals)
    except (UnsafeCheckpointError, RestrictedPickleError):
        if not unsafe:  # --unsafe: whatever torch.load(weights_only=False) reads (any protocol)
            raise
    if raw is not None:
        fmt, obj, engine, metadata = raw.format, raw.obj, "raw", raw.metadata
    else:
        from .engine.read import detect_format

        fmt, engine, metadata = detect_format(src), "torch", None
        obj = _torch_load(src, fmt, unsafe=unsafe, allow_globals=allow_globals)
        if fmt == "safetensors":
            obj, metadata = obj
        src.check_unchanged()  # torch read (or mapped) the file that was validated, as it was
    if fmt == "safetensors" and metadata:
        from .tensors import restore_duplicates

        metadata = restore_duplicates(obj, metadata) or None  # ties dropped by the writer come back
    return fmt, obj, engine, metadata


def verify_data(ckpt: Checkpoint, progress: Callable[[int], None] | None = None) -> int:
    """Read every storage of the checkpoint once and check its CRC-32 (zip records carry one).

    Returns the number of bytes checked. Raises BadCheckpointError on a mismatch or a short
    read. Tensors loaded by the torch fallback were already read by torch.load and are skipped.
    """
    from .engine.data import verify_crc

    seen: set[Any] = set()
    checked = 0
    for t in iter_tensors(ckpt.container):
        if isinstance(t, TensorMeta) and t.storage.identity not in seen:
            seen.add(t.storage.identity)
            verify_crc(t.storage)
            checked += t.storage.nbytes
            if progress is not None:
                progress(t.storage.nbytes)
    return checked


def as_torch(obj: Any) -> Any:
    """The same object graph with engine TensorMeta leaves turned into torch tensors."""
    if not any(isinstance(t, TensorMeta) for t in iter_tensors(obj)):
        return obj
    from .engine.materialize import to_torch

    return to_torch(obj)


def iter_tensors(obj: Any, depth: int = 0) -> Iterator[Any]:
    if is_tensor(obj):
        yield obj
    elif depth > 100:
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v, depth + 1)


# ----------------------------------------------------------------------------------------- save


def with_state_dict(ckpt: Checkpoint, state_dict: Mapping[str, Any]) -> Any:
    """The checkpoint's container with its state_dict replaced (other entries unchanged)."""
    return replace_at(ckpt.container, ckpt.state_dict_path, state_dict)


def make_state_dict(items: Sequence[tuple[str, Any]], metadata: Mapping[str, Any] | None) -> OrderedDict[str, Any]:
    """An OrderedDict state_dict, with `_metadata` attached when there is one."""
    sd: OrderedDict[str, Any] = OrderedDict(items)
    if metadata is not None:
        sd._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return sd


def check_output(output: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse `-` (stdout is not supported), an existing output that is not a regular file (even
    with --force), an existing output without --force, and an output that is an input without
    --force. Looks at paths only: cheap enough to run before any input is read."""
    if str(output) == "-":
        raise OutputError("-o -: writing to stdout is not supported; give a file path")
    refuse_non_regular(output)
    if output.exists() or output.is_symlink():
        same = any(_same_file(output, p) for p in inputs)
        if not force:
            what = "is the same file as an input" if same else "exists"
            raise OutputError(f"{output}: output {what}; pass --force to replace it")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{output}: directory {parent} does not exist")


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def refuse_non_regular(output: Path) -> None:
    """An existing output (or what a symlink output points to) must be a regular file: a rename
    over a device, a FIFO or a socket would replace the node itself (`/dev/null` by a file)."""
    try:
        mode = os.stat(output).st_mode
    except OSError:  # nothing there (or a dangling symlink): a new file will be made
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise OutputError(
            f"{output}: is {kind}; an output must be a regular file or not exist (--force does not change that)"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class OutputFormat(str, Enum):
    """The layout a writer produces (`--format`)."""

    pt = "pt"  # torch.save's zip format
    safetensors = "safetensors"


def output_format(path: Path, format: str | None = None) -> OutputFormat:
    """`format` when given, else from the output's name: `*.safetensors` -> safetensors, else pt."""
    if format is not None:
        try:
            return OutputFormat(format)
        except ValueError:
            choices = ", ".join(f.value for f in OutputFormat)
            raise UsageError(f"--format {format!r}: expected one of {choices}") from None
    return OutputFormat.safetensors if path.suffix.lower() == ".safetensors" else OutputFormat.pt


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
) -> list[str]:
    """Write `obj` atomically in `format` (see `output_format`: by default `.safetensors` outputs
    get the safetensors format, others torch.save's).

    Returns notices for the user (e.g. what safetensors cannot represent). On any failure the
    destination is left exactly as it was and no temporary file remains. With `verify`, the
    written file is read back and compared with `obj` before it replaces the destination.
    `progress` is called with byte counts as storages are copied (the byte-copying path only).
    `unsafe` and `allow_globals` are what reading the output back may use (as for the input).
    """
    output = Path(output)
    notes: list[str] = []
    safetensors = output_format(output, format) is OutputFormat.safetensors
    if safetensors:
        _check_safetensors_target(obj, output)

    def check(tmp: Path) -> None:
        _verify_written(obj, tmp, output, by_key=safetensors, unsafe=unsafe, allow_globals=frozenset(allow_globals))

    with atomic_output(output, check=check if verify else None) as f:
        if safetensors:
            notes += _write_safetensors(obj, f, safetensors_metadata)
        elif not _try_raw_write(obj, f, output, progress):
            _write_torch(obj, f)
    return notes


def _check_safetensors_target(obj: Any, output: Path) -> None:
    """A .safetensors file holds a flat mapping of tensors: refuse anything else, naming what."""
    from .containers import is_extra_state_key
    from .errors import sorted_list

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
    intended: Any, written: Path, output: Path, *, by_key: bool, unsafe: bool, allow_globals: frozenset[str]
) -> None:
    """Read the written file back and compare every tensor (shape, dtype, values) with `intended`."""
    from .diff import compare_values
    from .tensors import dtype_name, shape_of, tensor_kind

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


def _try_raw_write(obj: Any, f: BinaryIO, output: Path, progress: Callable[[int], None] | None = None) -> bool:
    """Copy storage records byte for byte when every tensor is a TensorMeta; False to use torch."""
    tensors = list(iter_tensors(obj))
    if not tensors or not all(isinstance(t, TensorMeta) for t in tensors):
        return False
    from .engine.zipwrite import write_torch_zip

    start = f.tell()
    try:
        write_torch_zip(obj, f, archive_name=output.stem or "archive", progress=progress, name=str(output))
        return True
    except EngineUnsupported as exc:
        _debug("raw write fallback: %s", exc)
        f.seek(start)
        f.truncate()
        return False


def _write_torch(obj: Any, f: BinaryIO) -> None:
    import torch

    from .engine.limits import recursion_room
    from .engine.pickle_checks import MAX_DEPTH

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

    from .engine.safetensors_format import SAFETENSORS_DTYPES
    from .tensors import dtype_name, duplicate_names, shared_storage_groups

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

    from .tensors import kind_text, plain_values, tensor_kind

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

    from .tensors import tensor_kind

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


# ------------------------------------------------------------------------------- staged tensors


class TensorStage:
    """Tensors computed one at a time, parked in a scratch file and handed back as TensorMeta.

    Lets a result bigger than memory (a `merge --average` of large checkpoints) be assembled on
    disk and then written by the byte-copying engine. See `staged_tensors`.
    """

    def __init__(self, fd: int, path: str):
        self._fd = fd
        self._source = Source.scratch(fd, path)
        self._end = 0
        self._count = 0

    def add(self, tensor: Any) -> TensorMeta:
        import torch

        from .engine.crc import crc32
        from .engine.meta import StorageMeta
        from .tensors import dtype_name, is_parameter, kind_text, tensor_kind

        interrupts.raise_if_interrupted()  # one swallowed by torch's import stops the job here
        if tensor_kind(tensor) is not None:  # its storage is not plain CPU memory: nothing to read
            raise UsageError(f"cannot stage a {kind_text(tensor)} tensor: only dense CPU tensors")
        data = tensor.detach().contiguous()
        nbytes = data.numel() * data.element_size()
        offset = self._end
        crc = 0
        if nbytes:
            view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            crc = crc32(view)
            done = 0
            while done < nbytes:
                done += os.pwrite(self._fd, view[done:], offset + done)
        self._end += nbytes
        key = str(self._count)
        self._count += 1
        storage = StorageMeta(
            self._source, key, dtype_name(data), nbytes, offset, crc32=crc, record_name=f"staged/{key}"
        )
        strides = tuple(int(s) for s in data.stride())
        return TensorMeta(
            storage, dtype_name(data), tuple(data.shape), strides, 0, bool(tensor.requires_grad), is_parameter(tensor)
        )


@contextlib.contextmanager
def staged_tensors(output: Path) -> Iterator[TensorStage]:
    """A TensorStage whose scratch file sits beside `output` and is removed on exit."""
    refuse_non_regular(output)
    with _temp_file(output) as temp:
        try:
            yield TensorStage(temp.fd, os.path.abspath(temp.path))
        except OSError as exc:
            raise _write_error(output, exc) from None


# -------------------------------------------------------------------------------- atomic output


def _clean_stale_temps(directory: Path, name: str) -> None:
    """Remove temporary files left by a killed earlier run for this output (their pid is gone).

    Only `.NAME.PID.RANDOM.ckptsurgeon-tmp` for exactly this NAME: the temp file of an output
    called `NAME.123` is another output's business.
    """
    import re

    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+{re.escape(TMP_MARK)}")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found and not _pid_alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_beside(dest: Path) -> tuple[int, str]:
    """A new temporary file in dest's directory, named so that a later run can clean it up."""
    directory = dest.parent if str(dest.parent) else Path(".")
    try:
        import tempfile

        return tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=TMP_MARK, dir=directory)
    except OSError as exc:
        raise OutputError(f"{dest}: cannot create a file in {directory}: {exc.strerror or exc}") from None


def _write_error(dest: Path, exc: OSError) -> OutputError:
    reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"{dest}: cannot write: {reason}")


class _Temp:
    """A temporary file beside an output: its fd, its path, and whether it was renamed away."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.renamed = False


@contextlib.contextmanager
def _temp_file(dest: Path) -> Iterator[_Temp]:
    """A new temporary file beside `dest`, closed and (unless renamed) removed on every exit,
    also when a signal arrives while it is being made or removed (see `interrupts`)."""
    made: list[_Temp] = []
    try:
        with interrupts.shielded():  # a signal in here is raised just below, once `made` is set
            made.append(_Temp(*_temp_beside(dest)))
        interrupts.raise_if_interrupted()
        yield made[0]
    finally:
        with interrupts.shielded():
            for temp in made:
                with contextlib.suppress(OSError):
                    os.close(temp.fd)
                if not temp.renamed:
                    with contextlib.suppress(OSError):
                        os.unlink(temp.path)


@contextlib.contextmanager
def atomic_output(dest: Path, *, check: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A file to write `dest` through: temp file in the same directory, fsync, rename, fsync dir.

    `check(temp_path)` runs on the complete temporary file before it replaces `dest`. An existing
    `dest` that is not a regular file is refused before anything is made.
    """
    refuse_non_regular(dest)
    directory = dest.parent if str(dest.parent) else Path(".")
    _clean_stale_temps(directory, dest.name)
    try:
        with _temp_file(dest) as temp:
            f = os.fdopen(temp.fd, "wb", closefd=False)
            try:
                yield f
                f.flush()
                os.fsync(temp.fd)
            finally:
                f.close()
            os.fchmod(temp.fd, _default_mode())
            if check is not None:
                check(Path(temp.path))
            with interrupts.shielded():
                interrupts.raise_if_interrupted()  # also one that was swallowed (torch's import)
                refuse_non_regular(dest)  # a FIFO made there since the check is not replaced
                os.replace(temp.path, dest)
                temp.renamed = True
                interrupts.commit()
    except OSError as exc:
        raise _write_error(dest, exc) from None
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
