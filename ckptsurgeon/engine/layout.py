"""What a CKPT argument names: a checkpoint file, or a directory laid out as one checkpoint.

:func:`resolve_layout` decides it from names alone (nothing is parsed here):

* a file (or anything that is not a directory: `Source` says what is wrong with it) is read as
  it is, except a file named `*.index.json`, which is a Hugging Face index;
* a directory holding `.metadata` is a torch.distributed.checkpoint (DCP) directory;
* else a directory with one `*.index.json` is Hugging Face sharded (several: refused, listing them);
* else DeepSpeed's layout: a `latest` file naming a tag directory, or a tag directory itself,
  holding `mp_rank_00_model_states.pt` (ZeRO-1/2: the whole model in its `module` entry) or
  `zero_pp_rank_*` files (ZeRO-3: the weights are partitioned, refused with the way out);
* else a directory with exactly one checkpoint file (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`,
  `*.ckpt`) is that file;
* anything else is a BadCheckpointError that says what the directory holds.

Directory entries may be symlinks (the Hugging Face cache is made of them): they are followed.

A URL is decided by the same rules (one code path: a directory is read through a small listing
interface, :class:`_LocalDirectory` or :class:`_RemoteDirectory`): one `fs.info` says whether it
names a directory (a prefix), one listing what it holds. A URL naming an index file, or a DCP
`.metadata` file (locally too: its directory is the checkpoint), is decided by its name alone,
without a request: that is how a store that cannot be listed (`https://`) is read; so is a URL
whose name ends in a checkpoint suffix (`.pt`, `.safetensors`, ...): an object.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

from ..errors import BadCheckpointError
from .limits import quote_name
from .source import Source, is_url, open_source

__all__ = ["CHECKPOINT_SUFFIXES", "INDEX_SUFFIX", "Layout", "resolve_layout", "zero3_refusal"]

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
INDEX_SUFFIX = ".index.json"
DCP_METADATA = ".metadata"
DEEPSPEED_TAG_FILE = "latest"
MAX_TAG_BYTES = 4096  # `latest` holds a tag name such as "global_step1000"

_MP_MODEL_STATES = r"mp_rank_\d+_model_states\.pt"
_ZERO3_MODEL_STATES = r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt"
_ZERO_FILES = ("zero_pp_rank_", "bf16_zero_pp_rank_")


class Layout(NamedTuple):
    """What to read for a CKPT argument.

    `kind`: "file" (read `path` as a checkpoint file), "hf-sharded" (`path` is the index file),
    "deepspeed" (`path` is the model states file of a ZeRO-1/2 checkpoint) or "dcp" (`path` is
    the directory). `directory` is the directory the user named (None when a file was named).
    `requests`: the requests made to a remote store to decide it (look-up and listings).
    """

    kind: str
    path: str
    directory: str | None = None
    requests: int = 0


class _Directory(Protocol):
    """What the rules need of a directory: its entries, the names of what it holds, its
    subdirectories, and a way to open a small file in it."""

    name: str

    def entries(self) -> dict[str, bool]: ...

    def join(self, entry: str) -> str: ...

    def child(self, entry: str) -> _Directory: ...

    def open(self, entry: str) -> Source: ...


class _LocalDirectory:
    def __init__(self, path: str) -> None:
        self.name = path

    def entries(self) -> dict[str, bool]:
        return _listing(self.name)

    def join(self, entry: str) -> str:
        return os.path.join(self.name, entry)

    def child(self, entry: str) -> _Directory:
        return _LocalDirectory(self.join(entry))

    def open(self, entry: str) -> Source:
        return Source(self.join(entry))


class _RemoteDirectory:
    """A prefix of a remote store (see engine.remote.RemoteDirectory); `counted` adds up the
    requests of this directory and of every one reached from it."""

    def __init__(self, store: Any, storage_options: Mapping[str, Any] | None, counted: list[int]) -> None:
        self.store = store
        self.name: str = store.url
        self.storage_options = storage_options
        self.counted = counted

    def entries(self) -> dict[str, bool]:
        before = self.store.requests
        try:
            entries: dict[str, bool] = self.store.entries()
            return entries
        finally:
            self.counted[0] += self.store.requests - before

    def join(self, entry: str) -> str:
        from .remote import join_url

        return join_url(self.name, entry)

    def child(self, entry: str) -> _Directory:
        return _RemoteDirectory(self.store.child(entry), self.storage_options, self.counted)

    def open(self, entry: str) -> Source:
        src = open_source(self.join(entry), self.storage_options)
        self.counted[0] += src.requests
        return src


def resolve_layout(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Layout:
    """The layout of `location`, a path or a URL (see the module's docstring; `storage_options`
    go to a URL's fsspec filesystem); BadCheckpointError when a directory holds no checkpoint
    this reader knows, or several where one was expected."""
    name = os.fspath(location)
    if is_url(name):
        from .remote import local_path

        path = local_path(name)
        if path is None:
            return _remote_layout(name, storage_options)
        name = path
    try:
        st = os.stat(name)
    except (OSError, ValueError):  # missing, or not statable: Source says so in its words
        return Layout("file", name)
    if not stat.S_ISDIR(st.st_mode):
        return _file_layout(name, os.path.basename(name), os.path.dirname(name) or ".")
    return _directory_layout(_LocalDirectory(name))


def _file_layout(name: str, base: str, parent: str) -> Layout:
    """A file named as the CKPT: an index file is its sharded checkpoint, a DCP `.metadata` file
    its directory, anything else itself."""
    if base == DCP_METADATA:
        return Layout("dcp", parent, parent)
    return Layout("hf-sharded" if base.endswith(INDEX_SUFFIX) else "file", name)


def _remote_layout(url: str, storage_options: Mapping[str, Any] | None) -> Layout:
    """The layout of a URL: an index or `.metadata` named is decided by its name; else a prefix
    is a directory (one `info`, one listing), anything else an object."""
    from .remote import RemoteDirectory

    parent, _, base = url.rstrip("/").rpartition("/")
    if not url.endswith("/") and (base == DCP_METADATA or base.endswith(INDEX_SUFFIX)):
        return _file_layout(url, base, parent)
    if not url.endswith("/") and base.lower().endswith(CHECKPOINT_SUFFIXES):
        return Layout("file", url)  # an object by its name: no look-up
    store = RemoteDirectory(url, storage_options)
    if not store.is_directory():
        return Layout("file", url, requests=store.requests)
    counted = [store.requests]
    layout = _directory_layout(_RemoteDirectory(store, storage_options, counted))
    return layout._replace(requests=counted[0])


def _listing(directory: str) -> dict[str, bool]:
    """Entry name -> whether it is a directory (symlinks followed; a dangling one is a file)."""
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError as e:
        raise BadCheckpointError(f"{directory}: cannot list the directory: {e.strerror or e}") from None
    out: dict[str, bool] = {}
    for entry in entries:
        try:
            out[entry.name] = entry.is_dir()
        except OSError:
            out[entry.name] = False
    return out


def _directory_layout(directory: _Directory) -> Layout:
    entries = directory.entries()
    where = directory.name
    files = sorted(n for n, is_dir in entries.items() if not is_dir)
    if DCP_METADATA in files:
        return Layout("dcp", where, where)
    indexes = [n for n in files if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise BadCheckpointError(
            f"{where}: several index files ({', '.join(map(quote_name, indexes))}); pass the one to read"
        )
    if indexes:
        return Layout("hf-sharded", directory.join(indexes[0]), where)
    deepspeed = _deepspeed_layout(directory, entries)
    if deepspeed is not None:
        return deepspeed
    checkpoints = [n for n in files if not n.startswith(".") and n.lower().endswith(CHECKPOINT_SUFFIXES)]
    if len(checkpoints) == 1:
        return Layout("file", directory.join(checkpoints[0]), where)
    if checkpoints:
        shown = ", ".join(map(quote_name, checkpoints[:10])) + (", ..." if len(checkpoints) > 10 else "")
        raise BadCheckpointError(
            f"{where}: {len(checkpoints)} checkpoint files and no index file ({shown}); pass the one to read"
        )
    raise BadCheckpointError(f"{where}: no checkpoint in this directory: {_found(entries)}")


def _found(entries: dict[str, bool]) -> str:
    """What a directory without a checkpoint holds, for the message."""
    visible = sorted(n + ("/" if is_dir else "") for n, is_dir in entries.items() if not n.startswith("."))
    if not visible:
        return "it is empty" if not entries else "it holds hidden entries only"
    shown = ", ".join(map(quote_name, visible[:10])) + (
        f", ... ({len(visible) - 10} more)" if len(visible) > 10 else ""
    )
    return (
        f"no *.index.json, no {DCP_METADATA}, no DeepSpeed files and no *.safetensors, *.bin, *.pt, *.pth "
        f"or *.ckpt file; found {shown}"
    )


def _deepspeed_layout(directory: _Directory, entries: dict[str, bool]) -> Layout | None:
    """DeepSpeed's layout in `directory` (the run directory with `latest`, or a tag directory), or
    None when there is no sign of one."""
    files = [n for n, is_dir in entries.items() if not is_dir]
    where = directory.name
    if DEEPSPEED_TAG_FILE in files:
        tag = _read_tag(directory)
        tag_dir = directory.child(tag)
        if not entries.get(tag):
            raise BadCheckpointError(
                f"{where}: DeepSpeed's {DEEPSPEED_TAG_FILE!r} names the tag {quote_name(tag)}, "
                f"but {tag_dir.name} is not a directory"
            )
        tag_files = [n for n, is_dir in tag_dir.entries().items() if not is_dir]
        found = _deepspeed_tag(tag_dir, tag_files, where)
        if found is None:
            raise BadCheckpointError(
                f"{tag_dir.name}: no DeepSpeed model states (mp_rank_00_model_states.pt) in the tag directory "
                f"that {directory.join(DEEPSPEED_TAG_FILE)} names"
            )
        return found
    return _deepspeed_tag(directory, files, where)


def _read_tag(directory: _Directory) -> str:
    """The tag name in DeepSpeed's `latest` file: one path component, nothing else."""
    path = directory.join(DEEPSPEED_TAG_FILE)
    with directory.open(DEEPSPEED_TAG_FILE) as src:
        if src.size > MAX_TAG_BYTES:
            raise BadCheckpointError(f"{path}: not a DeepSpeed tag file: {src.size} bytes")
        raw = src.pread(src.size, 0)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadCheckpointError(f"{path}: not a DeepSpeed tag file: not UTF-8 text") from None
    if not tag or tag in (".", "..") or any(c in tag for c in "/\\\x00") or not tag.isprintable():
        raise BadCheckpointError(f"{path}: not a DeepSpeed tag name: {quote_name(tag)}")
    return tag


def _deepspeed_tag(tag_dir: _Directory, files: list[str], directory: str) -> Layout | None:
    """The model states file of a DeepSpeed tag directory; None when it holds no DeepSpeed file."""
    import re  # here: reading a plain file never pays for it

    where = tag_dir.name
    model = sorted(n for n in files if re.fullmatch(_MP_MODEL_STATES, n))
    zero3 = sorted(n for n in files if re.fullmatch(_ZERO3_MODEL_STATES, n))
    if len(model) > 1:
        raise BadCheckpointError(
            f"{where}: a model-parallel DeepSpeed checkpoint ({len(model)} mp_rank_*_model_states.pt files, "
            "each holding part of every layer): not supported; merge the model-parallel ranks first"
        )
    if model:
        return Layout("deepspeed", tag_dir.join(model[0]), directory)
    if zero3:
        raise zero3_refusal(where, len(zero3))
    if any(n.startswith(_ZERO_FILES) for n in files):
        raise BadCheckpointError(
            f"{where}: DeepSpeed optimizer states (zero_pp_rank_*) without the model states file "
            "(mp_rank_00_model_states.pt)"
        )
    return None


def zero3_refusal(where: str, ranks: int | None) -> BadCheckpointError:
    """The refusal of a DeepSpeed ZeRO-3 checkpoint, whose files hold no whole weights (`ranks`:
    how many partitions there are, when known)."""
    across = f" across {ranks} rank{'s' if ranks != 1 else ''}" if ranks else ""
    return BadCheckpointError(
        f"{where}: a DeepSpeed ZeRO-3 checkpoint: the weights are partitioned{across} "
        "(zero_pp_rank_*), no file holds them whole; consolidate them first "
        "with the zero_to_fp32.py script DeepSpeed saves beside the checkpoint "
        "(python zero_to_fp32.py CHECKPOINT_DIR OUTPUT) and read its output"
    )
