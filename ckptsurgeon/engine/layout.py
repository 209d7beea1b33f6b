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
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from ..errors import BadCheckpointError
from .limits import quote_name
from .source import Source

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
    """

    kind: str
    path: str
    directory: str | None = None


def resolve_layout(location: str | os.PathLike[str]) -> Layout:
    """The layout of `location` (see the module's docstring); BadCheckpointError when a directory
    holds no checkpoint this reader knows, or several where one was expected."""
    name = os.fspath(location)
    try:
        st = os.stat(name)
    except (OSError, ValueError):  # missing, or not statable: Source says so in its words
        return Layout("file", name)
    if not stat.S_ISDIR(st.st_mode):
        return Layout("hf-sharded" if os.path.basename(name).endswith(INDEX_SUFFIX) else "file", name)
    return _directory_layout(name)


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


def _join(directory: str, name: str) -> str:
    return os.path.join(directory, name)


def _directory_layout(directory: str) -> Layout:
    entries = _listing(directory)
    files = sorted(n for n, is_dir in entries.items() if not is_dir)
    if DCP_METADATA in files:
        return Layout("dcp", directory, directory)
    indexes = [n for n in files if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise BadCheckpointError(
            f"{directory}: several index files ({', '.join(map(quote_name, indexes))}); pass the one to read"
        )
    if indexes:
        return Layout("hf-sharded", _join(directory, indexes[0]), directory)
    deepspeed = _deepspeed_layout(directory, files)
    if deepspeed is not None:
        return deepspeed
    checkpoints = [n for n in files if not n.startswith(".") and n.lower().endswith(CHECKPOINT_SUFFIXES)]
    if len(checkpoints) == 1:
        return Layout("file", _join(directory, checkpoints[0]), directory)
    if checkpoints:
        shown = ", ".join(map(quote_name, checkpoints[:10])) + (", ..." if len(checkpoints) > 10 else "")
        raise BadCheckpointError(
            f"{directory}: {len(checkpoints)} checkpoint files and no index file ({shown}); pass the one to read"
        )
    raise BadCheckpointError(f"{directory}: no checkpoint in this directory: {_found(entries)}")


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


def _deepspeed_layout(directory: str, files: list[str]) -> Layout | None:
    """DeepSpeed's layout in `directory` (the run directory with `latest`, or a tag directory), or
    None when there is no sign of one."""
    if DEEPSPEED_TAG_FILE in files:
        tag = _read_tag(_join(directory, DEEPSPEED_TAG_FILE))
        tag_dir = _join(directory, tag)
        if not os.path.isdir(tag_dir):
            raise BadCheckpointError(
                f"{directory}: DeepSpeed's {DEEPSPEED_TAG_FILE!r} names the tag {quote_name(tag)}, "
                f"but {tag_dir} is not a directory"
            )
        tag_files = [n for n, is_dir in _listing(tag_dir).items() if not is_dir]
        found = _deepspeed_tag(tag_dir, tag_files, directory)
        if found is None:
            raise BadCheckpointError(
                f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt) in the tag directory "
                f"that {_join(directory, DEEPSPEED_TAG_FILE)} names"
            )
        return found
    return _deepspeed_tag(directory, files, directory)


def _read_tag(path: str) -> str:
    """The tag name in DeepSpeed's `latest` file: one path component, nothing else."""
    with Source(path) as src:
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


def _deepspeed_tag(tag_dir: str, files: list[str], directory: str) -> Layout | None:
    """The model states file of a DeepSpeed tag directory; None when it holds no DeepSpeed file."""
    import re  # here: reading a plain file never pays for it

    model = sorted(n for n in files if re.fullmatch(_MP_MODEL_STATES, n))
    zero3 = sorted(n for n in files if re.fullmatch(_ZERO3_MODEL_STATES, n))
    if len(model) > 1:
        raise BadCheckpointError(
            f"{tag_dir}: a model-parallel DeepSpeed checkpoint ({len(model)} mp_rank_*_model_states.pt files, "
            "each holding part of every layer): not supported; merge the model-parallel ranks first"
        )
    if model:
        return Layout("deepspeed", _join(tag_dir, model[0]), directory)
    if zero3:
        raise zero3_refusal(tag_dir, len(zero3))
    if any(n.startswith(_ZERO_FILES) for n in files):
        raise BadCheckpointError(
            f"{tag_dir}: DeepSpeed optimizer states (zero_pp_rank_*) without the model states file "
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
