"""Where a directory layout (`hf`, `hf-bin`, `dcp`) is written: a :class:`DirectoryTarget`.

A writer gives the target its files in two visible steps: the data files one by one
(:meth:`~DirectoryTarget.write_file`, from any thread, or :meth:`~DirectoryTarget.add_file` for a
file a writer made itself in `staging`), then :meth:`~DirectoryTarget.commit` with the index (or
`.metadata`), last. A directory is never complete-looking before `commit`:

* a local directory (:class:`LocalTarget`): the files go into the temporary directory of
  :func:`~.atomic.atomic_directory`, which takes the destination's place in one step when the
  `directory_target` block ends;
* a remote prefix (:class:`RemoteTarget`, `s3://bucket/out/`): each file is made in a local
  staging directory, uploaded whole (`engine.remote.upload`) and deleted, so at most as many files
  as there are writer threads sit on local disk at once; the index is uploaded after every data
  file. An existing layout is replaced only with `force` and only when the prefix holds nothing
  but layout files (`atomic.LAYOUT_FILE`): its index goes first, before any new file is uploaded,
  and its data files the new layout does not have go after the new index. On a failure or a
  signal before `commit`, the files uploaded so far are deleted (best effort): no index appears.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .. import interrupts
from ..errors import OutputError
from .atomic import LAYOUT_FILE, TMP_MARK, _clean_stale_temps, _remote, atomic_directory

__all__ = [
    "DirectoryTarget",
    "LocalTarget",
    "RemoteTarget",
    "check_remote_directory",
    "directory_target",
    "member_target",
]


def write_new_file(path: Path, write: Callable[[BinaryIO], object]) -> int:
    """Create `path` (new), write it with `write`, fsync it; returns its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _interruption() -> BaseException | None:
    """The signal received, as the exception that ends the command (None: none was)."""
    signum = interrupts.pending()
    return interrupts.Interrupted(signum) if signum is not None else None


def _is_index(name: str) -> bool:
    return name == ".metadata" or name.endswith(".index.json")


class DirectoryTarget:
    """A directory layout being written: data files first (`write_file`, `add_file`), the index
    last (`commit`). `staging` is a local directory where a file is made before it is added;
    `location(name)` names a file of the destination (for messages)."""

    staging: Path
    destination: str

    def location(self, name: str) -> str:
        return os.path.join(self.destination, name)

    def write_file(
        self, name: str, write: Callable[[BinaryIO], object], *, check: Callable[[Path], None] | None = None
    ) -> int:
        """Write the data file `name` with `write(f)` (in `staging`), run `check(path)` on the
        complete file, then add it to the layout; returns its size. Safe in several threads."""
        path = self.staging / name
        size = write_new_file(path, write)
        if check is not None:
            check(path)
        self.add_file(name, path)
        return size

    @property
    def shared(self) -> str:
        """What the other torchrun ranks need to write into this layout too (`member_target`)."""
        raise NotImplementedError

    def add_file(self, name: str, path: Path) -> None:
        """Add the complete data file `staging / name` to the layout."""
        raise NotImplementedError

    def commit(
        self,
        index: str | None = None,
        write: Callable[[BinaryIO], object] | None = None,
        *,
        layout: Sequence[str] | None = None,
    ) -> int:
        """Write (with `write`, unless it is in `staging` already) and add the `index` file, after
        every data file; then the layout is complete. `layout`: the data files of the whole new
        layout, when other writers (torchrun ranks) added some of them. Returns the index's size
        (0 without one)."""
        size = 0
        if index is not None:
            path = self.staging / index
            size = write_new_file(path, write) if write is not None else path.stat().st_size
            self.add_file(index, path)
        self._complete(layout)
        return size

    def _complete(self, layout: Sequence[str] | None) -> None:
        """What follows the index: nothing here (see `commit`)."""


class LocalTarget(DirectoryTarget):
    """The temporary directory of `atomic_directory`: files are written in place; the swap that
    makes them the destination happens when the `directory_target` block ends."""

    def __init__(self, temp: Path, destination: str) -> None:
        self.staging = temp
        self.destination = destination

    @property
    def shared(self) -> str:
        return str(self.staging)  # the ranks share a filesystem: they write into this directory

    def add_file(self, name: str, path: Path) -> None:
        if path != self.staging / name:
            os.replace(path, self.staging / name)


class RemoteTarget(DirectoryTarget):
    """A prefix of a remote store, written file by file (see the module's docstring)."""

    def __init__(self, url: str, staging: Path, storage_options: Mapping[str, Any] | None, old: Sequence[str]) -> None:
        self.destination = url.rstrip("/")
        self.staging = staging
        self.storage_options = storage_options
        self.old = tuple(old)  # the layout files the prefix held (its index already deleted)
        self.uploaded: list[str] = []
        self.committed = False
        self._lock = threading.Lock()

    @property
    def shared(self) -> str:
        return self.destination  # each rank uploads its own files to the prefix

    def location(self, name: str) -> str:
        from ..engine.remote import join_url

        return join_url(self.destination, name)

    def add_file(self, name: str, path: Path) -> None:
        from ..engine.remote import upload

        try:
            interrupts.raise_if_interrupted()
            with self._lock:
                self.uploaded.append(name)  # deleted again on failure, also if this upload half-happened
            upload(str(path), self.location(name), self.storage_options, stop=_interruption)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _complete(self, layout: Sequence[str] | None) -> None:
        """The layout is complete (its index uploaded): delete what only the old one had."""
        self.committed = True
        interrupts.commit()
        from ..engine.remote import delete_object

        kept = set(self.uploaded if layout is None else [*layout, *self.uploaded])
        for name in self.old:  # what the old layout had and the new one does not
            if name not in kept:
                with contextlib.suppress(OutputError):
                    delete_object(self.location(name), self.storage_options)

    def abandon(self) -> None:
        """Delete what was uploaded (best effort): after a failure, no part of the layout stays."""
        from ..engine.remote import delete_object

        for name in sorted(self.uploaded, key=_is_index, reverse=True):  # an index first, should one be there
            with contextlib.suppress(OutputError):
                delete_object(self.location(name), self.storage_options)


@contextlib.contextmanager
def directory_target(
    dest: Path | str, *, force: bool, storage_options: Mapping[str, Any] | None = None
) -> Iterator[DirectoryTarget]:
    """The target a directory layout is written to (see the module's docstring): a local path
    through `atomic_directory`, a URL (`s3://bucket/out/`) file by file. The writer must call
    `commit` before the block ends; a block left by an exception leaves the destination as it
    was (locally) or without any new file or index (remotely)."""
    url = _remote(dest)
    if url is None:
        local = Path(dest)
        with atomic_directory(local, force=force) as temp:
            yield LocalTarget(temp, str(local))
        return
    with _remote_target(url, force=force, storage_options=storage_options) as target:
        yield target


def check_remote_directory(
    url: str, storage_options: Mapping[str, Any] | None, *, force: bool, inputs: Sequence[str]
) -> list[str]:
    """Refuse a read-only store, a prefix that is (or holds) an input, an existing output without
    `force`, and one holding anything but layout files; returns the layout files it holds."""
    from ..engine.remote import list_output, refuse_read_only

    refuse_read_only(url)
    base = url.rstrip("/")
    for given in inputs:
        if given.rstrip("/") == base or given.startswith(base + "/"):
            raise OutputError(f"{url}: the output directory holds an input ({given}); write elsewhere")
    entries = list_output(url, storage_options)
    if entries and not force:
        raise OutputError(f"{url}: output exists; pass --force to replace it")
    others = sorted(
        n + ("/" if is_dir else "") for n, is_dir in entries.items() if is_dir or not LAYOUT_FILE.fullmatch(n)
    )
    if others:
        shown = ", ".join(others[:5]) + (f" (+{len(others) - 5} more)" if len(others) > 5 else "")
        raise OutputError(
            f"{url}: --force replaces a directory only when it holds nothing but a checkpoint layout; "
            f"it also holds {shown}"
        )
    return sorted(entries)


@contextlib.contextmanager
def member_target(
    dest: Path | str, shared: str, storage_options: Mapping[str, Any] | None
) -> Iterator[DirectoryTarget]:
    """The target of a torchrun rank other than 0, writing its share of the data files into the
    layout rank 0's target (`shared`: see `DirectoryTarget.shared`) is making: locally the same
    temporary directory (rank 0 swaps it into place or removes it); remotely the same prefix, from
    a staging directory of its own, its uploads deleted again if it fails. Rank 0 alone commits."""
    from .atomic import joined_directory

    url = _remote(dest)
    if url is None:
        with joined_directory(Path(dest), shared) as temp:
            yield LocalTarget(temp, str(dest))
        return
    with _staging(url) as staging:
        target = RemoteTarget(shared, staging, storage_options, old=())
        try:
            yield target
        except BaseException:
            with interrupts.shielded():
                target.abandon()
            raise


@contextlib.contextmanager
def _staging(url: str) -> Iterator[Path]:
    """A local directory where the files of a remote layout are made before they are uploaded."""
    import shutil
    import tempfile

    name = url.rstrip("/").rsplit("/", 1)[-1] or "output"
    scratch = Path(tempfile.gettempdir())
    _clean_stale_temps(scratch, name)  # a killed run's staging directory
    made: list[str] = []
    try:
        with interrupts.shielded():
            try:
                made.append(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=TMP_MARK, dir=scratch))
            except OSError as exc:
                raise OutputError(
                    f"{url}: cannot create a staging directory in {scratch}: {exc.strerror or exc}"
                ) from None
        interrupts.raise_if_interrupted()
        yield Path(made[0])
    finally:
        with interrupts.shielded():
            for path in made:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _remote_target(url: str, *, force: bool, storage_options: Mapping[str, Any] | None) -> Iterator[RemoteTarget]:
    from ..engine.remote import delete_object

    old = check_remote_directory(url, storage_options, force=force, inputs=())  # again: it may have changed
    target: RemoteTarget | None = None
    with _staging(url) as staging:
        try:
            for index in filter(_is_index, old):  # no reader may take the old index for the new layout
                delete_object(f"{url.rstrip('/')}/{index}", storage_options)
            target = RemoteTarget(url, staging, storage_options, [n for n in old if not _is_index(n)])
            yield target
            if not target.committed:
                raise AssertionError("a directory target left without commit()")  # pragma: no cover
        except BaseException:
            if target is not None and not target.committed:
                with interrupts.shielded():
                    target.abandon()
            raise
