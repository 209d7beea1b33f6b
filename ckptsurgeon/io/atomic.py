"""Atomic output: every output ckptsurgeon writes goes through :func:`atomic_output` (a temporary
file beside the destination, fsync, rename, fsync of the directory) or, for a directory layout,
:func:`atomic_directory` (a temporary directory beside it, filled and fsynced, then swapped in),
so a destination is replaced whole or left exactly as it was. Also the checks on an output path
made before any input is read (:func:`check_output`) and the removal of temporary files and
directories a killed run left (:data:`TMP_MARK`).

A URL output (`s3://...`) is written to a local temporary file the same way, then uploaded
whole: the object appears complete or not at all (see `engine.remote.upload`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .. import interrupts
from ..engine.source import is_url
from ..errors import OutputError

TMP_MARK = ".ckptsurgeon-tmp"
OLD_MARK = ".ckptsurgeon-old"  # a replaced directory layout set aside (where directories cannot be swapped)

# What `--force` may replace in a directory: a Hugging Face layout (shards + index, or one file) or
# the files of torch.distributed.checkpoint
LAYOUT_FILE = re.compile(
    r"(?:model(?:-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(?:-\d{5}-of-\d{5})?\.bin|pytorch_model\.bin\.index\.json"
    r"|\.metadata|[^/]*\.distcp)"
)


def _remote(output: Path | str) -> str | None:
    """The URL of an output written through fsspec (None for a local path or a file:// URL)."""
    if isinstance(output, str) and is_url(output):
        from ..engine.remote import local_path

        return output if local_path(output) is None else None
    return None


def _local(output: Path | str) -> Path:
    if isinstance(output, str) and is_url(output):
        from ..engine.remote import local_path

        return Path(local_path(output) or output)
    return Path(output)


def check_output(
    output: Path | str,
    inputs: Sequence[Path | str],
    *,
    force: bool,
    directory: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Refuse `-` (stdout is not supported), an existing output that is not a regular file (even
    with --force), an existing output without --force, and an output that is an input without
    --force. A `directory` output (a sharded layout) must instead be a directory or not exist, and
    `--force` replaces only a directory that holds nothing but a checkpoint layout (see
    `layout_intruders`). Looks at paths only: cheap enough to run before any input is read (a URL
    output: one request to the store)."""
    url = _remote(output)
    if url is not None:
        from ..engine.remote import check_remote_output

        if directory:
            from .targets import check_remote_directory

            check_remote_directory(url, storage_options, force=force, inputs=[str(p) for p in inputs])
            return
        check_remote_output(url, storage_options, force=force, inputs=[str(p) for p in inputs])
        return
    output = _local(output)
    local_inputs = [_local(p) for p in inputs if _remote(p) is None]
    if str(output) == "-":
        raise OutputError("-o -: writing to stdout is not supported; give a file path")
    if directory:
        refuse_non_layout(output, force=force)
    else:
        refuse_non_regular(output)
    if output.exists() or output.is_symlink():
        same = any(_same_file(output, p) for p in local_inputs)
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


def layout_intruders(directory: Path) -> list[str]:
    """The entries of `directory` that are not part of a checkpoint layout (`LAYOUT_FILE`: shards
    and index of the Hub's layouts, DCP's `.metadata` and `*.distcp`, each a file or a symlink),
    sorted; [] when `--force` may replace it."""
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        return [f"(unreadable: {exc.strerror or exc})"]
    others = []
    for entry in entries:
        fits = LAYOUT_FILE.fullmatch(entry.name) is not None
        if not fits or not (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
            others.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return sorted(others)


def refuse_non_layout(output: Path, *, force: bool) -> None:
    """A directory output (a sharded layout) may replace a directory, with --force, that holds
    nothing but a checkpoint layout; never a file, a symlink or anything else."""
    try:
        mode = os.lstat(output).st_mode
    except OSError:  # nothing there: a new directory will be made
        return
    if not stat.S_ISDIR(mode):
        kind = (
            "a symlink"
            if stat.S_ISLNK(mode)
            else next(
                (name for test, name in _KINDS if test(mode)), "a file" if stat.S_ISREG(mode) else "not a directory"
            )
        )
        raise OutputError(f"{output}: is {kind}; a sharded output is a directory (--force does not change that)")
    if not force:
        raise OutputError(f"{output}: output exists; pass --force to replace it")
    others = layout_intruders(output)
    if others:
        shown = ", ".join(others[:5]) + (f" (+{len(others) - 5} more)" if len(others) > 5 else "")
        raise OutputError(
            f"{output}: --force replaces a directory only when it holds nothing but a checkpoint layout; "
            f"it also holds {shown}"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _clean_stale_temps(directory: Path, name: str) -> None:
    """Remove temporary files and directories left by a killed earlier run for this output (their
    pid is gone).

    Only `.NAME.PID.RANDOM.ckptsurgeon-tmp` for exactly this NAME: the temp file of an output
    called `NAME.123` is another output's business. A directory layout set aside to be replaced
    (`.NAME.PID.RANDOM.ckptsurgeon-old`) by a run killed before the new one took its place is put
    back when NAME is missing, else removed: the destination holds the old layout or the new.
    """
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+({re.escape(TMP_MARK)}|{re.escape(OLD_MARK)})")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if not found or _pid_alive(int(found.group(1))):
            continue
        if found.group(2) == OLD_MARK and not os.path.lexists(os.path.join(directory, name)):
            with contextlib.suppress(OSError):
                os.rename(entry.path, os.path.join(directory, name))
            continue
        with contextlib.suppress(OSError):
            if found.group(2) == OLD_MARK:
                _remove_layout(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                _remove_tree(entry.path)
            else:
                os.unlink(entry.path)


def _remove_tree(path: str) -> None:
    """Remove a temporary directory ckptsurgeon made (it holds nothing of anyone else's)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _remove_layout(path: str) -> None:
    """Remove a replaced output directory: its checkpoint layout files only, then the directory
    if that left it empty (a file that came there since it was checked stays, in the directory)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if LAYOUT_FILE.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


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
def atomic_output(
    dest: Path | str,
    *,
    check: Callable[[Path], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[BinaryIO]:
    """A file to write `dest` through: temp file in the same directory, fsync, rename, fsync dir.

    `check(temp_path)` runs on the complete temporary file before it replaces `dest`. An existing
    `dest` that is not a regular file is refused before anything is made. A URL `dest` is written
    to a temporary file in the temp directory, checked, then uploaded (`storage_options` go to
    fsspec); nothing appears at the URL unless the upload completes.
    """
    url = _remote(dest)
    if url is not None:
        with _uploaded(url, check, storage_options) as f:
            yield f
        return
    dest = _local(dest)
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


def _fsync_path(path: str | Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system
    cannot (the caller then renames the old one aside first)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def atomic_directory(dest: Path, *, force: bool, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A new directory to fill, which then takes the place of `dest` in one step.

    The caller writes (and fsyncs) its files into the yielded temporary directory beside `dest`,
    the index last. The directory is fsynced and renamed into place; an existing `dest` (allowed
    by `force` and only when it holds nothing but a checkpoint layout, checked again here) is
    swapped out atomically, or, where the system cannot swap, renamed aside first, the new one
    renamed in, the old one removed: a crash at any point leaves `dest` with the old layout or the
    new one, whole, and the next run removes what is left over. `check(temp_dir)` runs on the
    complete directory before it replaces `dest`. On any failure the temporary directory is
    removed and `dest` is untouched.
    """
    import tempfile

    refuse_non_layout(dest, force=force)
    directory = dest.parent if str(dest.parent) else Path(".")
    _clean_stale_temps(directory, dest.name)
    made: list[str] = []  # the new directory, while it is not in place
    replaced: list[str] = []  # where the old layout went
    try:
        with interrupts.shielded():
            try:
                made.append(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=TMP_MARK, dir=directory))
            except OSError as exc:
                raise OutputError(f"{dest}: cannot create a directory in {directory}: {exc.strerror or exc}") from None
        interrupts.raise_if_interrupted()
        temp = made[0]
        os.chmod(temp, 0o777 & ~_umask())
        yield Path(temp)
        _fsync_path(temp, directory=True)
        if check is not None:
            check(Path(temp))
        with interrupts.shielded():
            interrupts.raise_if_interrupted()
            refuse_non_layout(dest, force=force)  # what came there since the first check
            if not os.path.lexists(dest):
                os.rename(temp, dest)
            elif _exchange(temp, str(dest)):
                replaced.append(temp)  # `temp` now holds the old layout
            else:
                aside = tempfile.mktemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=OLD_MARK, dir=directory)
                os.rename(dest, aside)
                try:
                    os.rename(temp, dest)
                except OSError:
                    os.rename(aside, dest)  # the old layout back in its place
                    raise
                replaced.append(aside)
            made.clear()
            interrupts.commit()
            with contextlib.suppress(OSError):
                _fsync_path(directory, directory=True)
    except OSError as exc:
        raise _write_error(dest, exc) from None
    finally:
        with interrupts.shielded():
            for path in made:
                _remove_tree(path)
            for path in replaced:
                _remove_layout(path)


@contextlib.contextmanager
def joined_directory(dest: Path, temp: str) -> Iterator[Path]:
    """The temporary directory `temp` of another process's `atomic_directory` for `dest` (rank 0's,
    under torchrun), for this process to add files to: a failure to write is an OutputError, as
    there; the other process removes it or swaps it into place."""
    try:
        yield Path(temp)
    except OSError as exc:
        raise _write_error(dest, exc) from None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def _uploaded(
    url: str, check: Callable[[Path], None] | None, storage_options: Mapping[str, Any] | None
) -> Iterator[BinaryIO]:
    """`atomic_output` for a URL: a local temporary file, uploaded once it is complete and checked."""
    import tempfile

    from ..engine.remote import upload

    local = Path(tempfile.gettempdir()) / Path(url).name
    _clean_stale_temps(local.parent, local.name)  # a killed upload's local copy
    with _temp_file(local) as temp:
        try:
            f = os.fdopen(temp.fd, "wb", closefd=False)
            try:
                yield f
                f.flush()
            finally:
                f.close()
            if check is not None:
                check(Path(temp.path))
        except OSError as exc:
            raise OutputError(f"{url}: cannot write the local copy {temp.path}: {exc.strerror or exc}") from None
        interrupts.raise_if_interrupted()
        upload(temp.path, url, storage_options)
        interrupts.commit()
