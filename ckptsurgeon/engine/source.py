"""The one I/O boundary for reading: a checkpoint file opened once, validated, then read by handle.

A :class:`Source` is opened only after `stat` says the path is a regular file (a FIFO or a device
never blocks or misbehaves), and remembers the identity of what it validated: device, inode, size
and modification time. Every byte of a checkpoint is read through its open handle with positioned
reads, so a file renamed onto the path later is never seen, and a file changed in place (another
size or modification time) is refused instead of mixed with what was read before. Nothing else in
ckptsurgeon opens a checkpoint by name: engine readers, the copy engine, diff and the torch fallback
(through `/proc/self/fd`) all read a Source, made by :func:`open_source`. A URL opens an
:class:`~ckptsurgeon.engine.remote.RemoteSource`: the same interface over ranged requests, its
identity the object's size and ETag.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..errors import BadCheckpointError

__all__ = ["FileIdentity", "Source", "file_kind", "is_url", "open_source"]

# `scheme://`: a URL for fsspec. Two characters at least, so that a Windows drive (`C:/...`) is a path.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether `location` names an object by URL (`s3://b/k`, `https://...`, `file:///p`) rather
    than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def open_source(location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Source:
    """Open the checkpoint at `location`: a local path, or a URL read through fsspec by range
    requests (`storage_options` are passed to its filesystem). The one place a checkpoint is
    opened by name."""
    if is_url(location):
        from .remote import RemoteSource, local_path

        path = local_path(str(location))
        if path is not None:  # file://: the local file itself, read by descriptor
            return Source(path)
        return RemoteSource(str(location), storage_options)
    return Source(location)


class FileIdentity(NamedTuple):
    """What was validated: the same device, inode, size and mtime mean the same bytes."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO', ... for a non-regular file's mode (for messages)."""
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


class Source:
    """A regular file open for positioned reads, with the identity it had when it was opened.

    `name` is the path as given (for messages); `size` the size validated. Two Sources of one
    file (same device and inode, whatever the path) compare equal: they read the same bytes.
    Close with `close()` or a `with` block; a Source nobody references any more closes its descriptor itself.
    """

    __slots__ = ("name", "identity", "file_id", "_fd", "bytes_read", "requests", "__weakref__")

    remote = False  # every read is a request to a store (see engine.remote.RemoteSource)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        name = os.fspath(path)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise BadCheckpointError(f"{name}: no such file") from None
        except OSError as e:
            raise BadCheckpointError(f"{name}: cannot stat: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise BadCheckpointError(f"{name}: not a regular file ({file_kind(st.st_mode)})")
        try:
            # O_NONBLOCK: should the path be swapped for a FIFO after the stat, open does not block
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise BadCheckpointError(f"{name}: cannot open: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise BadCheckpointError(f"{name}: not a regular file ({file_kind(st.st_mode)})")
        self.name = name
        self.identity: FileIdentity | None = FileIdentity.of(st)
        self.file_id = (st.st_dev, st.st_ino)  # equal for two Sources of one file, whatever the path
        self._fd: int | None = fd
        self.bytes_read = 0  # bytes read from storage through this Source (`--json` bytes_read)
        self.requests = 0  # requests made to a remote store (`--json` requests): none for a local file

    @classmethod
    def scratch(cls, fd: int, name: str) -> Source:
        """A Source over a scratch file this process is still writing (e.g. the means of
        `merge --average`, parked on disk): its size grows, so no identity is checked. It reads
        through its own duplicate of `fd`, so it stays valid after the caller closes `fd`."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{name}: a scratch Source must be a regular file")
        self = cls.__new__(cls)
        self.name, self.identity, self.file_id = name, None, (st.st_dev, st.st_ino)
        self._fd = os.dup(fd)
        self.bytes_read = self.requests = 0
        return self

    # -------------------------------------------------------------------------- identity

    @property
    def size(self) -> int:
        return self.identity.size if self.identity is not None else os.fstat(self.fd).st_size

    @property
    def fd(self) -> int:
        """The open descriptor (for `copy_file_range`, `lseek`, ...): never close it yourself."""
        if self._fd is None:
            raise BadCheckpointError(f"{self.name}: the checkpoint was closed before this read")
        return self._fd

    @property
    def proc_path(self) -> str:
        """A path that opens this very file (not whatever is at `name` now), for libraries that
        only take paths (torch.load with mmap, safetensors): `/proc/self/fd/N` where it exists."""
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.exists(proc) else self.name

    def check_unchanged(self) -> None:
        """Refuse a file that was changed in place since it was validated (size or mtime)."""
        if self.identity is None:  # a scratch file of our own
            return
        now = FileIdentity.of(os.fstat(self.fd))
        if now != self.identity:
            raise BadCheckpointError(
                f"{self.name}: the file changed while it was being read "
                f"(size {self.identity.size} -> {now.size}); nothing was written from it"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Source) and other.file_id == self.file_id

    def __hash__(self) -> int:
        return hash(self.file_id)

    # ------------------------------------------------------------------------------ reads

    def readinto(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill `buf` from `offset`; a short read means the file is shorter than validated."""
        view = memoryview(buf)
        fd = self.fd
        done, total = 0, len(view)
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise BadCheckpointError(
                    f"{self.name}: truncated or changed while reading: no data at byte {offset + done}"
                )
            done += n
        self.bytes_read += total

    def count(self, nbytes: int) -> None:
        """Count bytes read from this file by other means (`copy_file_range`, torch's mmap)."""
        self.bytes_read += nbytes

    def pread(self, size: int, offset: int) -> bytes:
        """`size` bytes at `offset` (a short read is an error)."""
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            buf = bytearray(size)
            self.readinto(buf, offset)
            return bytes(buf)
        self.bytes_read += size
        return data

    def read_upto(self, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset`: fewer only where the file ends (read-ahead windows)."""
        data = os.pread(self.fd, size, offset)
        self.bytes_read += len(data)
        return data

    def defer(self, start: int, end: int, check: Callable[[], None], span: tuple[int, int] | None = None) -> None:
        """Run `check` before any byte of [start, end) is read. A local file checks at once: reads
        are cheap here. A remote Source runs it at the first read of the range, so that checks of
        records nobody reads (local ZIP headers, for `inspect`) cost no request; `span` says which
        bytes the check reads, so that they can come with that first read."""
        check()

    # --------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __str__(self) -> str:  # messages name the file as the user gave it
        return self.name

    def __repr__(self) -> str:
        return f"Source({self.name!r}, size={self.size})"
