"""Atomic output: every output ckptsurgeon writes goes through :func:`atomic_output` (a temporary
file beside the destination, fsync, rename, fsync of the directory), so a destination is replaced
whole or left exactly as it was. Also the checks on an output path made before any input is read
(:func:`check_output`) and the removal of temporary files a killed run left (:data:`TMP_MARK`).

A URL output (`s3://...`) is written to a local temporary file the same way, then uploaded
whole: the object appears complete or not at all (see `engine.remote.upload`)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .. import interrupts
from ..engine.source import is_url
from ..errors import OutputError

TMP_MARK = ".ckptsurgeon-tmp"


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
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Refuse `-` (stdout is not supported), an existing output that is not a regular file (even
    with --force), an existing output without --force, and an output that is an input without
    --force. Looks at paths only: cheap enough to run before any input is read (a URL output:
    one request to the store)."""
    url = _remote(output)
    if url is not None:
        from ..engine.remote import check_remote_output

        check_remote_output(url, storage_options, force=force, inputs=[str(p) for p in inputs])
        return
    output = _local(output)
    local_inputs = [_local(p) for p in inputs if _remote(p) is None]
    if str(output) == "-":
        raise OutputError("-o -: writing to stdout is not supported; give a file path")
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
