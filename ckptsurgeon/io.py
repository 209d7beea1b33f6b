"""All checkpoint file I/O: safe loading, finding the state_dict, atomic saving.

Nothing else in ckptsurgeon opens a checkpoint file. Loading tries the torch-free engine first
(metadata only: tensors are TensorMeta leaves whose bytes stay on disk) and falls back to
`torch.load(weights_only=True, mmap=True, map_location="cpu")` for what the engine does not model.
`unsafe=True` is the only way to reach `weights_only=False`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .containers import KeyPath, find_state_dict, format_key_path, replace_at
from .engine.meta import RawCheckpoint, TensorMeta
from .errors import (
    BadCheckpointError,
    CheckpointError,
    ContainerError,
    EngineUnsupported,
    OutputError,
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
    """A loaded checkpoint: the whole container plus the state_dict found inside it."""

    def __init__(
        self,
        path: Path,
        format: str,  # "torch-zip" | "torch-legacy" | "safetensors"
        container: Any,
        state_dict_path: KeyPath | None,
        state_dict: Mapping[str, Any],
        engine: str,  # "raw" (torch-free, TensorMeta leaves) or "torch"
        safetensors_metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.format = format
        self.container = container
        self.state_dict_path = state_dict_path
        self.state_dict = state_dict
        self.engine = engine
        self.safetensors_metadata = safetensors_metadata

    def __repr__(self) -> str:
        return f"Checkpoint(path={self.path!r}, format={self.format!r}, state_dict_key={self.state_dict_key!r}, engine={self.engine!r})"

    @property
    def state_dict_key(self) -> str | None:
        return format_key_path(self.state_dict_path) if self.state_dict_path else None

    def other_entries(self) -> list[tuple[str, Any]]:
        """Top-level container entries other than the state_dict (empty for a bare state_dict)."""
        if not self.state_dict_path or not isinstance(self.container, Mapping):
            return []
        return [(str(k), v) for k, v in self.container.items() if k != self.state_dict_path[0]]


# ----------------------------------------------------------------------------------------- load


def _read_raw(path: Path, allow_globals: frozenset[str]) -> RawCheckpoint | None:
    """The engine's reading, or None where it does not model the file (torch decides then).

    The engine also decides what the file is before anything parses it: a missing, unreadable or
    non-regular file (a FIFO is never opened), or a non-checkpoint, is a BadCheckpointError here.
    """
    from .engine.read import read_checkpoint

    try:
        return read_checkpoint(path, allow_globals=allow_globals)
    except EngineUnsupported as exc:
        _debug("engine fallback for %s: %s", path, exc)
        return None


def _torch_load(path: Path, fmt: str, *, unsafe: bool, allow_globals: frozenset[str]) -> Any:
    from .safety import check_torch_version

    check_torch_version()  # weights_only is only as safe as the torch that implements it
    import torch

    if fmt == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return OrderedDict((k, f.get_tensor(k)) for k in f.keys())
        except Exception as exc:
            raise BadCheckpointError(f"{path}: not a readable safetensors file: {_one_line(exc)}") from None
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not unsafe}
    if fmt == "torch-zip":
        kwargs["mmap"] = True
    from .safety import resolve_allowed_globals

    extra = resolve_allowed_globals(allow_globals) if allow_globals and not unsafe else []
    try:
        with torch.serialization.safe_globals(extra):
            obj = torch.load(path, **kwargs)
    except CheckpointError:
        raise
    except Exception as exc:
        if not unsafe:
            unsafe_names = _unsafe_globals(path, fmt)
            if unsafe_names:
                raise UnsafeCheckpointError(str(path), unsafe_names) from None
        raise BadCheckpointError(f"{path}: not a readable checkpoint: {_one_line(exc)}") from None
    if unsafe:
        obj = _modules_to_state_dicts(obj)
    return obj


def _unsafe_globals(path: Path, fmt: str) -> list[str]:
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
        return obj.__class__(
            (k, v.state_dict() if isinstance(v, torch.nn.Module) else v) for k, v in obj.items()
        )
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
    data is read), torch tensors (mmap-backed where possible) otherwise.
    """
    path = Path(path)
    fmt, container, engine, st_meta = _read_container(path, unsafe=unsafe, allow_globals=frozenset(allow_globals))
    try:
        sd_path, state_dict = find_state_dict(container, key)
    except ContainerError as exc:
        raise ContainerError(f"{path}: {exc}") from None
    if engine == "torch":
        nested = [str(k) for k, v in state_dict.items() if getattr(v, "is_nested", False)]
        if nested:
            raise UsageError(f"{path}: nested tensors are not supported: {', '.join(map(repr, nested[:5]))}")
    return Checkpoint(
        path=path,
        format=fmt,
        container=container,
        state_dict_path=sd_path,
        state_dict=state_dict,
        engine=engine,
        safetensors_metadata=st_meta,
    )


def _read_container(path: Path, *, unsafe: bool, allow_globals: frozenset[str]) -> tuple[str, Any, str, Any]:
    """(format, whole object, engine used, safetensors metadata) of a checkpoint file."""
    raw: RawCheckpoint | None = None
    try:
        raw = _read_raw(path, allow_globals)
    except UnsafeCheckpointError:
        if not unsafe:
            raise
    if raw is not None:
        return raw.format, raw.obj, "raw", raw.metadata
    from .engine.read import detect_format

    fmt = detect_format(path)
    return fmt, _torch_load(path, fmt, unsafe=unsafe, allow_globals=allow_globals), "torch", None


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
    """Refuse an existing output without --force, and an output that is an input without --force."""
    if output.exists() or output.is_symlink():
        same = any(_same_file(output, p) for p in inputs)
        if not force:
            what = "is the same file as an input" if same else "exists"
            raise OutputError(f"{output}: output {what}; pass --force to replace it")
        if output.is_dir():
            raise OutputError(f"{output}: is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{output}: directory {parent} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_safetensors_path(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def save_checkpoint(
    obj: Any,
    output: str | os.PathLike[str],
    *,
    safetensors_metadata: Mapping[str, str] | None = None,
    verify: bool = False,
    progress: Callable[[int], None] | None = None,
    unsafe: bool = False,
    allow_globals: Sequence[str] = (),
) -> list[str]:
    """Write `obj` atomically; `.safetensors` outputs get the safetensors format, others torch.save's.

    Returns notices for the user (e.g. what safetensors cannot represent). On any failure the
    destination is left exactly as it was and no temporary file remains. With `verify`, the
    written file is read back and compared with `obj` before it replaces the destination.
    `progress` is called with byte counts as storages are copied (the byte-copying path only).
    `unsafe` and `allow_globals` are what reading the output back may use (as for the input).
    """
    output = Path(output)
    notes: list[str] = []
    safetensors = is_safetensors_path(output)
    if safetensors and not (isinstance(obj, Mapping) and all(is_tensor(v) for v in obj.values())):
        raise UsageError(f"{output}: a .safetensors output holds a bare state_dict only")

    def check(tmp: Path) -> None:
        _verify_written(obj, tmp, output, by_key=safetensors, unsafe=unsafe, allow_globals=frozenset(allow_globals))

    with atomic_output(output, check=check if verify else None) as f:
        if safetensors:
            notes += _write_safetensors(obj, f, safetensors_metadata)
        elif not _try_raw_write(obj, f, output, progress):
            _write_torch(obj, f)
    return notes


def _verify_written(
    intended: Any, written: Path, output: Path, *, by_key: bool, unsafe: bool, allow_globals: frozenset[str]
) -> None:
    """Read the written file back and compare every tensor (shape, dtype, values) with `intended`."""
    from .diff import compare_values
    from .tensors import dtype_name, shape_of, tensor_kind

    try:
        _, container, _, _ = _read_container(written, unsafe=unsafe, allow_globals=allow_globals)
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
            raise OutputError(f"{output}: --verify failed: tensor {name!r} reads back different from what was meant")


def _try_raw_write(obj: Any, f: BinaryIO, output: Path, progress: Callable[[int], None] | None = None) -> bool:
    """Copy storage records byte for byte when every tensor is a TensorMeta; False to use torch."""
    tensors = list(iter_tensors(obj))
    if not tensors or not all(isinstance(t, TensorMeta) for t in tensors):
        return False
    from .engine.zipwrite import write_torch_zip

    start = f.tell()
    try:
        write_torch_zip(obj, f, archive_name=output.stem or "archive", progress=progress)
        return True
    except EngineUnsupported as exc:
        _debug("raw write fallback: %s", exc)
        f.seek(start)
        f.truncate()
        return False


def _write_torch(obj: Any, f: BinaryIO) -> None:
    import torch

    from .engine.limits import recursion_room
    from .engine.unpickle import MAX_DEPTH

    with recursion_room(MAX_DEPTH):  # the converters and torch.save's pickler recurse per level
        obj = compact_views(as_torch(obj))
        torch.save(obj, f)


def _write_safetensors(sd: Mapping[str, Any], f: BinaryIO, metadata: Mapping[str, str] | None) -> list[str]:
    from safetensors.torch import save

    from .tensors import shared_storage_groups

    notes = []
    tensors = as_torch(OrderedDict(sd))
    shared = shared_storage_groups(tensors)
    if shared:
        notes.append(
            "safetensors cannot share storage: written separately: "
            + "; ".join(", ".join(g) for g in shared)
        )
    if getattr(sd, "_metadata", None):
        notes.append("safetensors has no place for the state_dict's _metadata (module versions): dropped")
    plain = {k: _safetensors_tensor(k, v) for k, v in tensors.items()}
    f.write(save(plain, metadata=dict(metadata) if metadata else None))
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
    return plain_values(t, key, "write").contiguous().clone()


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
        new = obj.__class__((k, _replace_tensors(v, replace)) for k, v in obj.items())
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
        self._path = path
        self._end = 0
        self._count = 0

    def add(self, tensor: Any) -> TensorMeta:
        import torch

        from .engine.crc import crc32
        from .engine.meta import StorageMeta
        from .tensors import dtype_name, is_parameter, kind_text, tensor_kind

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
        storage = StorageMeta(self._path, key, dtype_name(data), nbytes, offset, crc32=crc, record_name=f"staged/{key}")
        strides = tuple(int(s) for s in data.stride())
        return TensorMeta(
            storage, dtype_name(data), tuple(data.shape), strides, 0, bool(tensor.requires_grad), is_parameter(tensor)
        )


@contextlib.contextmanager
def staged_tensors(output: Path) -> Iterator[TensorStage]:
    """A TensorStage whose scratch file sits beside `output` and is removed on exit."""
    fd, tmp = _temp_beside(output)
    try:
        yield TensorStage(fd, os.path.abspath(tmp))
    except OSError as exc:
        raise _write_error(output, exc) from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


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


@contextlib.contextmanager
def atomic_output(dest: Path, *, check: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A file to write `dest` through: temp file in the same directory, fsync, rename, fsync dir.

    `check(temp_path)` runs on the complete temporary file before it replaces `dest`.
    """
    directory = dest.parent if str(dest.parent) else Path(".")
    _clean_stale_temps(directory, dest.name)
    fd, tmp = _temp_beside(dest)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(dest, exc) from None
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
