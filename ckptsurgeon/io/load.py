"""Loading a checkpoint: safely, once, through one open file; finding its state_dict.

A checkpoint is opened once, as an engine :class:`~ckptsurgeon.engine.source.Source` (an open
handle plus the identity that was validated), and every later read goes through that handle: a
file renamed onto the path afterwards is never read, one changed in place is refused. Loading
tries the torch-free engine first (metadata only: tensors are TensorMeta leaves whose bytes stay
on disk) and falls back to `torch.load(weights_only=True, mmap=True, map_location="cpu")` of the
same open file for what the engine does not model. `unsafe=True` is the only way to reach
`weights_only=False`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..containers import KeyPath, find_state_dict, format_key_path
from ..engine.meta import RawCheckpoint, TensorMeta
from ..engine.source import Source, is_url, open_source
from ..errors import (
    BadCheckpointError,
    CheckpointError,
    ContainerError,
    EngineUnsupported,
    RestrictedPickleError,
    UnsafeCheckpointError,
    UsageError,
)
from ..tensors import is_tensor


def _debug(message: str, *args: Any) -> None:
    """Engine decisions, for CKPTSURGEON_DEBUG (logging is imported only when something is said)."""
    import logging

    logging.getLogger("ckptsurgeon").debug(message, *args)


class Checkpoint:
    """A loaded checkpoint: the whole container plus the state_dict found inside it.

    It owns the open file its tensors are read from (`source`): use it as a context manager, or
    call `close()`, when done (a Checkpoint nobody references closes it too). Reading tensor bytes
    after `close()` is a BadCheckpointError.
    """

    def __init__(
        self,
        path: Path | str,  # a str for a URL
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


def _read_raw(src: Source, allow_globals: frozenset[str]) -> RawCheckpoint | None:
    """The engine's reading, or None where it does not model the file (torch decides then).

    The engine also decides what the file is before anything parses it: a non-checkpoint is a
    BadCheckpointError here.
    """
    from ..engine.read import read_source

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
    from ..safety import check_torch_version

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
    from ..safety import torch_allowlist

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
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint safely and locate its state_dict (see containers.find_state_dict).

    `path` may be a URL (`s3://...`, `https://...`), read by range requests; `storage_options`
    go to its fsspec filesystem.

    Tensors are engine TensorMeta leaves when the torch-free engine can read the file (no tensor
    data is read), torch tensors (mmap-backed where possible) otherwise. The returned Checkpoint
    holds the file open (see `Checkpoint.close`).
    """
    path = path if isinstance(path, str) and is_url(path) else Path(path)
    src = open_source(path, storage_options)
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
        from ..engine.read import detect_format

        fmt, engine, metadata = detect_format(src), "torch", None
        obj = _torch_load(src, fmt, unsafe=unsafe, allow_globals=allow_globals)
        if fmt == "safetensors":
            obj, metadata = obj
        src.check_unchanged()  # torch read (or mapped) the file that was validated, as it was
    if fmt == "safetensors" and metadata:
        from ..tensors import restore_duplicates

        metadata = restore_duplicates(obj, metadata) or None  # ties dropped by the writer come back
    return fmt, obj, engine, metadata


def verify_data(ckpt: Checkpoint, progress: Callable[[int], None] | None = None) -> int:
    """Read every storage of the checkpoint once and check its CRC-32 (zip records carry one).

    Returns the number of bytes checked. Raises BadCheckpointError on a mismatch or a short
    read. Tensors loaded by the torch fallback were already read by torch.load and are skipped.
    """
    from ..engine.data import verify_crc

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
    from ..engine.materialize import to_torch

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
