"""Remote checkpoints: objects in a store that fsspec reaches by URL (`s3://`, `gs://`, `hf://`,
`https://`, ...), read by range requests through the same :class:`~.source.Source` interface as
local files, and outputs uploaded only once they are complete.

A :class:`RemoteSource` validates the object once (its size and ETag, or what the backend has
instead: on S3 and HTTP from the answer to the first ranged GET, which also brings the object's
first bytes; elsewhere from `fs.info`) and reads byte ranges of it (`cat_file(path, start, end)`; on S3 and HTTP
with `If-Match: <ETag>`, so that an object replaced while it is read is refused, never mixed in).
Small reads are answered from a few cached blocks: a request asks for at least
:data:`FIRST_REQUEST` bytes, so the many small reads of a header cost one request. Transient
failures (5xx, throttling, a dropped connection) are retried with backoff a bounded number of
times, then end in a BadCheckpointError that names the cause. fsspec and its backends are
imported only when a URL is opened; a backend that is missing is an error naming the extra that
installs it.
"""

from __future__ import annotations

import bisect
import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import BadCheckpointError, EngineUnsupported, OutputError, UsageError
from .limits import quote_name
from .source import Source

__all__ = [
    "RemoteDirectory",
    "RemoteSource",
    "check_remote_output",
    "delete_object",
    "filesystem",
    "join_url",
    "list_output",
    "local_path",
    "parse_storage_options",
    "refuse_read_only",
    "upload",
]

FIRST_REQUEST = 100_000  # a small read asks for this much (huggingface_hub's first safetensors range)
CACHE_BLOCK = 1 << 20  # responses up to this size are kept for the reads that follow
CACHE_BLOCKS = 8
CHUNK = 16 << 20  # the largest single request: bigger reads are split ...
PARALLEL = 4  # ... into requests made this many at a time
NEAR = 1 << 16  # a check's bytes this close to a read come with it (a record's header, its descriptor)
PIECE = 1 << 20  # a streamed answer (`stream`) is handed on in pieces of this size
RETRIES = 4  # a transient failure is retried this many times ...
BACKOFF = 0.1  # ... after 0.1, 0.2, 0.4, 0.8 seconds

# URL scheme -> the ckptsurgeon extra that installs its fsspec backend
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf", "http": "http", "https": "http"}
_READ_ONLY = ("http", "https")
# exception classes (by name: aiohttp and botocore are imported by the backends, not here) that
# mean "the connection failed", worth another try
_TRANSIENT_NAMES = frozenset(
    {
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "IncompleteRead",
        "ResponseStreamingError",
        "ProtocolError",
        "FSTimeoutError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in ("EREMOTEIO", "EAGAIN", "EBUSY", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "EPIPE")
    if hasattr(errno, n)
)
T = TypeVar("T")


def local_path(url: str) -> str | None:
    """The local path a `file://` URL names (None for any other URL)."""
    if not url.lower().startswith("file://"):
        return None
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return None  # file://host/...: left to fsspec
    return unquote(parts.path)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """`--storage-options JSON`: a JSON object of fsspec storage options ({} when not given)."""
    if text is None:
        return {}
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--storage-options: not valid JSON: {e}") from None
    if type(value) is not dict:
        raise UsageError("--storage-options: expected a JSON object, e.g. '{\"anon\": true}'")
    return value


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _install_hint(protocol: str) -> str:
    extra = _EXTRAS.get(protocol)
    if extra is None:
        return f"install the fsspec backend for {protocol}:// (see fsspec's list of implementations)"
    return f"pip install 'ckptsurgeon[{extra}]'"


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; a missing backend is a UsageError naming
    the `pip install` that adds it."""
    protocol = _protocol(url)
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise UsageError(f"{url}: reading URLs needs fsspec: {_install_hint(protocol)}") from None
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except ImportError:
        hint = _install_hint(protocol)
        raise UsageError(f"{url}: the fsspec backend for {protocol}:// is not installed: {hint}") from None
    except ValueError as e:
        raise UsageError(f"{url}: {_one_line(e)}") from None
    except TypeError as e:
        reason = _one_line(e)
        raise UsageError(f"{url}: --storage-options not accepted by the {protocol}:// backend: {reason}") from None
    return fs, path


# -- failures -----------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (aiohttp, requests, botocore), if any."""
    for name in ("status", "status_code", "code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(value, int):
            return value
    return None


def failure_kind(exc: BaseException) -> str:
    """'changed', 'missing', 'denied', 'transient' or 'other' for an exception of a backend."""
    chain = _chain(exc)
    statuses = [s for s in map(_status, chain) if s is not None]
    if 412 in statuses or any("precondition" in str(e).lower().replace("-", "") for e in chain):
        return "changed"
    if any(s >= 500 or s in (408, 429) for s in statuses):
        return "transient"
    for e in chain:
        names = {c.__name__ for c in type(e).__mro__}
        if names & _TRANSIENT_NAMES or isinstance(e, (ConnectionError, TimeoutError)):
            return "transient"
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if "SlowDown" in str(e) or "Throttl" in str(e):
            return "transient"
    if 404 in statuses or isinstance(exc, FileNotFoundError):
        return "missing"
    if any(s in (401, 403) for s in statuses) or isinstance(exc, PermissionError):
        return "denied"
    return "other"


def _retrying(call: Callable[[], T], count: Callable[[], None], fail: Callable[[str, int, Exception], Exception]) -> T:
    """`call()`, retried with backoff while it fails transiently (RETRIES times at most);
    `count()` before every attempt, `fail(kind, attempts, exc)` gives the error to raise."""
    for attempt in range(RETRIES + 1):
        count()
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 -- every backend failure becomes a CheckpointError
            kind = failure_kind(exc)
            if kind == "transient" and attempt < RETRIES:
                time.sleep(BACKOFF * 2**attempt)
                continue
            raise fail(kind, attempt + 1, exc) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _identity_of(info: Mapping[str, Any]) -> str | None:
    """What changes when the object is replaced: its ETag, or the backend's equivalent."""
    for key in ("ETag", "etag", "generation", "md5Hash", "blob_id", "sha", "LastModified", "last_modified", "mtime"):
        value = info.get(key)
        if value:
            return str(value)
    lfs = info.get("lfs")
    if isinstance(lfs, Mapping) and lfs.get("sha256"):
        return str(lfs["sha256"])
    return None


def _buffered(fs: Any) -> bool:
    """Whether `fs.cat_file` is fsspec's generic one, which reads through a buffered file (whole
    blocks of several MB for a few bytes) unless told not to cache."""
    from fsspec.spec import AbstractFileSystem

    return type(fs).cat_file is AbstractFileSystem.cat_file


def _on_the_hub(fs: Any) -> bool:
    """Whether `fs` is huggingface_hub's HfFileSystem (repos at revisions, read by commit)."""
    return callable(getattr(fs, "resolve_path", None)) and hasattr(getattr(fs, "_api", None), "repo_info")


def _pinned(fs: Any, path: str) -> str:
    """`path` in a Hub repo with its revision (a branch or tag, which a push moves) replaced by
    the commit it names now, so that every read sees the files that were validated. One request
    (the repo's info); the file's info then describes that commit."""
    resolved = fs.resolve_path(path)
    revision = getattr(resolved, "revision", None)
    if not hasattr(resolved, "repo_id") or (revision and len(revision) == 40 and revision.isalnum()):
        return path  # a bucket, or already a commit id
    sha = fs._api.repo_info(resolved.repo_id, revision=revision, repo_type=resolved.repo_type).sha
    if not sha:
        return path
    return str(type(resolved)(resolved.repo_type, resolved.repo_id, sha, resolved.path_in_repo).unresolve())


async def _read_piece(read: Callable[[int], Awaitable[bytes]], size: int) -> bytes | bytearray:
    """`size` bytes from a streamed body (fewer only where it ends), from reads that each give
    what has arrived."""
    first = await read(size)
    if len(first) == size or not first:
        return first
    buf = bytearray(first)
    while len(buf) < size:
        more = await read(size - len(buf))
        if not more:
            break
        buf += more
    return buf


# -- reading ------------------------------------------------------------------------------------


class RemoteSource(Source):
    """An object in a remote store, open for ranged reads, with the size and ETag validated when
    it was opened. Same interface as a local Source (`name`, `size`, `pread`, `readinto`,
    `check_unchanged`, `bytes_read`), plus `requests`, the number of requests made (retries
    included). It has no file descriptor: `proc_path` (for libraries that take a path: torch's
    fallback) downloads the object once to a temporary file."""

    __slots__ = (
        "url",
        "fs",
        "path",
        "etag",
        "_size",
        "_lock",
        "_blocks",
        "_check_lock",
        "_starts",
        "_checks",
        "_known",
        "_s3",
        "_http",
        "_if_match",
        "_info_has_etag",
        "_copy",
        "_open",
    )

    remote = True

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.name = self.url = url
        self.identity = None
        self._fd = None
        self.bytes_read = self.requests = 0
        self._lock = threading.Lock()
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._check_lock = threading.RLock()
        self._starts: list[int] = []
        self._checks: list[tuple[int, int, Callable[[], None], tuple[int, int]]] = []
        self._known: list[tuple[int, bytes]] = []  # bytes a running check reads (see `run_check`)
        self._copy: str | None = None
        self._open = self._info_has_etag = False
        self.fs, self.path = filesystem(url, storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._s3 = "s3" in protocols and hasattr(self.fs, "_call_s3")
        self._http = _protocol(url) in _READ_ONLY and hasattr(self.fs, "set_session")
        first = _retrying(self._first_get, self._count, self._error("cannot open"))
        self._size, self.etag, head = first if first is not None else self._validate_by_info()
        self.file_id = (-1, hash((url, self._size, self.etag)))  # two Sources of one object compare equal
        # If-Match: where the identity is an ETag, and a strong one (a weak W/"..." fails every request)
        etag_known = first is not None or self._info_has_etag
        self._if_match = self.etag if etag_known and self.etag and not self.etag.startswith("W/") else None
        if head:
            self.bytes_read += len(head)
            self._blocks[0] = head
        self._open = True

    # -------------------------------------------------------------------------- requests

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def _error(self, what: str) -> Callable[[str, int, Exception], Exception]:
        def make(kind: str, attempts: int, exc: Exception) -> Exception:
            # the exception that carries a status says most (fsspec wraps HTTP errors in others)
            cause = _one_line(next((e for e in _chain(exc) if _status(e) is not None), exc))
            if kind == "changed":
                return BadCheckpointError(
                    f"{self.name}: the object changed while it was being read (its ETag no longer matches); "
                    "nothing was written from it"
                )
            if kind == "missing":
                gone = "no such object" if what == "cannot open" else "the object disappeared while it was being read"
                return BadCheckpointError(f"{self.name}: {gone}")
            if kind == "denied":
                return BadCheckpointError(f"{self.name}: access denied: {cause}")
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            return BadCheckpointError(f"{self.name}: {what}{tries}: {cause}")

        return make

    def _first_get(self) -> tuple[int, str | None, bytes] | None:
        """(size, ETag, first bytes) from one ranged GET of the object's first FIRST_REQUEST bytes,
        where the backend shows the answer's headers (S3, HTTP): the object is validated and its
        head read in one request (a safetensors header, a zip's data.pkl). None: ask `fs.info`."""
        from fsspec.asyn import sync

        want = f"bytes=0-{FIRST_REQUEST - 1}"
        if self._s3:
            bucket, key, version = self.fs.split_path(self.path)

            async def s3() -> tuple[str | None, str | None, bytes] | None:
                extra = {"VersionId": version} if version else {}
                try:
                    resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=want, **extra)
                except OSError as exc:
                    if 416 in map(_status, _chain(exc)):  # an empty object has no byte 0
                        return None
                    raise
                try:
                    return resp.get("ContentRange"), resp.get("ETag"), await resp["Body"].read()
                finally:
                    resp["Body"].close()

            answer = sync(self.fs.loop, s3)
        elif self._http:

            async def http() -> tuple[str | None, str | None, bytes] | None:
                session = await self.fs.set_session()
                kwargs = dict(self.fs.kwargs)
                headers = {**(kwargs.pop("headers", None) or {}), "Range": want}
                async with session.get(self.fs.encode_url(self.path), headers=headers, **kwargs) as r:
                    if r.status == 404:
                        raise FileNotFoundError(self.url)
                    if r.status != 416:  # 416: an empty object has no byte 0 (info tells)
                        r.raise_for_status()  # 5xx: retried
                    if r.status != 206:  # or a server that ignores Range: ask info
                        return None
                    return r.headers.get("Content-Range"), r.headers.get("ETag"), await r.read()

            answer = sync(self.fs.loop, http)
        else:
            return None
        if answer is None:
            return None
        content_range, etag, body = answer
        total = (content_range or "").rpartition("/")[2]
        if not total.isdigit() or len(body) != min(FIRST_REQUEST, int(total)):
            return None  # no total size said (`*/`), or an answer that is not the range asked for
        return int(total), etag, body

    def _validate_by_info(self) -> tuple[int, str | None, bytes]:
        """(size, identity, no bytes) from `fs.info`, for backends whose reads show no headers."""
        if _on_the_hub(self.fs):
            self.path = _retrying(lambda: _pinned(self.fs, self.path), self._count, self._error("cannot open"))
        info = self._info("cannot open")
        if info.get("type") == "directory":
            raise BadCheckpointError(f"{self.url}: not an object but a directory (prefix)")
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise BadCheckpointError(f"{self.url}: the store does not say the object's size")
        self._info_has_etag = "ETag" in info
        return size, _identity_of(info), b""

    def _info(self, what: str) -> dict[str, Any]:
        info: dict[str, Any] = _retrying(lambda: self.fs.info(self.path), self._count, self._error(what))
        return info

    def _s3_range(self, start: int, end: int) -> dict[str, Any]:
        """The arguments of S3's GetObject for bytes [start, end), pinned to the validated ETag."""
        bucket, key, version = self.fs.split_path(self.path)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if self._if_match:
            args["IfMatch"] = self._if_match
        if version:
            args["VersionId"] = version
        return args

    def _get(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object: one ranged GET, pinned to the validated ETag where the
        backend lets us say so."""
        if self._s3:
            from fsspec.asyn import sync

            async def get() -> bytes:
                resp = await self.fs._call_s3("get_object", **self._s3_range(start, end))
                try:
                    data: bytes = await resp["Body"].read()
                    return data
                finally:
                    resp["Body"].close()

            data: bytes = sync(self.fs.loop, get)
            return data
        if self._if_match and self._http:
            return bytes(self.fs.cat_file(self.path, start=start, end=end, headers={"If-Match": self._if_match}))
        if _buffered(self.fs):  # no ranged read of its own (HfFileSystem): an unbuffered file asks for the range only
            return bytes(self.fs.cat_file(self.path, start=start, end=end, cache_type="none"))
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

    def _fetch(self, start: int, end: int) -> bytes:
        if not self._open:
            raise BadCheckpointError(f"{self.name}: the checkpoint was closed before this read")
        data = _retrying(lambda: self._get(start, end), self._count, self._error(f"reading bytes {start}-{end}"))
        if len(data) != end - start:
            raise BadCheckpointError(
                f"{self.name}: the store returned {len(data)} bytes for bytes {start}-{end}: the object is not "
                "the one validated (changed or truncated); nothing was written from it"
            )
        with self._lock:
            self.bytes_read += len(data)
        return data

    def _block(self, start: int, need_end: int) -> bytes:
        """One request from `start`, for at least FIRST_REQUEST bytes; kept when small."""
        data = self._fetch(start, min(self._size, max(need_end, start + FIRST_REQUEST)))
        if len(data) <= CACHE_BLOCK:
            with self._lock:
                self._blocks[start] = data
                while len(self._blocks) > CACHE_BLOCKS:
                    self._blocks.popitem(last=False)
        return data

    def _read(self, offset: int, size: int) -> bytes | memoryview:
        end = offset + size
        if offset < 0 or end > self._size:
            raise BadCheckpointError(
                f"{self.name}: truncated or changed while reading: no data at byte {max(offset, self._size)}"
            )
        if size == 0:
            return b""
        if self._checks:
            fetched = self._run_checks(offset, end)
            if fetched is not None:
                lo, block = fetched
                return memoryview(block)[offset - lo : end - lo]
        head = b""
        with self._lock:
            for start, block in [*self._known, *self._blocks.items()]:
                if start <= offset < start + len(block):
                    if end <= start + len(block):
                        return memoryview(block)[offset - start : end - start]
                    head = block[offset - start :]  # the rest comes from one more request
                    break
        pos = offset + len(head)
        if end - pos > CHUNK:  # CHUNK-sized requests, PARALLEL of them at a time
            from concurrent.futures import ThreadPoolExecutor

            bounds = list(range(pos, end, CHUNK)) + [end]
            with ThreadPoolExecutor(min(PARALLEL, len(bounds) - 1), thread_name_prefix="ckptsurgeon-get") as pool:
                parts = list(pool.map(self._fetch, bounds[:-1], bounds[1:]))
            return b"".join([head, *parts])
        block = self._block(pos, end)
        if head:
            return head + block[: end - pos]
        return memoryview(block)[:size]

    def _run_checks(self, start: int, end: int) -> tuple[int, bytes] | None:
        """Run (once) the deferred checks of ranges that [start, end) touches. The bytes they read
        that lie near [start, end) (a record's local header, its data descriptor) come with the
        read itself, in one request: returned as (offset, bytes) when it was made."""
        with self._check_lock:
            entries = self._take_due(start, end)
            if not entries:
                return None
            near = NEAR
            lo = min([start] + [span[0] for *_, span in entries if start - near <= span[0] < start])
            hi = max([end] + [span[1] for *_, span in entries if end < span[1] <= end + near])
            fetched = None
            if (lo < start or hi > end) and hi - lo <= CHUNK + 2 * near:
                fetched = (lo, self._fetch(lo, min(hi, self._size)))
                with self._lock:  # where the checks find their bytes
                    self._blocks[lo] = fetched[1]
            try:
                for _, _, check, _ in entries:
                    check()
            finally:
                if fetched is not None and len(fetched[1]) > CACHE_BLOCK:
                    with self._lock:
                        self._blocks.pop(lo, None)
            return fetched

    def _take_due(self, start: int, end: int) -> list[tuple[int, int, Callable[[], None], tuple[int, int]]]:
        """Remove and return the deferred checks of the ranges that [start, end) touches."""
        with self._check_lock:
            i = max(0, bisect.bisect_right(self._starts, start) - 1)
            due: list[int] = []
            while i < len(self._starts) and self._starts[i] < end:
                if self._checks[i][1] > start:
                    due.append(i)
                i += 1
            entries = [self._checks[i] for i in due]
            for i in reversed(due):
                del self._starts[i], self._checks[i]
            return entries

    # ------------------------------------------------------------------- streamed reads

    def check_spans(self, start: int, end: int) -> list[tuple[int, int]]:
        """The bytes that the deferred checks of [start, end) read (a record's local header ..
        data descriptor): a streamed read that covers them runs the checks without requests."""
        with self._check_lock:
            i = max(0, bisect.bisect_right(self._starts, start) - 1)
            spans: list[tuple[int, int]] = []
            while i < len(self._starts) and self._starts[i] < end:
                if self._checks[i][1] > start:
                    spans.append(self._checks[i][3])
                i += 1
            return spans

    def take_checks(self, start: int, end: int) -> list[tuple[tuple[int, int], Callable[[], None]]]:
        """Remove and return the deferred checks of [start, end), as (span, check): the caller
        (a streamed read) runs each with `run_check` once the bytes of its span went by, and
        before it hands on the last byte of its range."""
        return [(span, check) for _, _, check, span in self._take_due(start, end)]

    def run_check(self, check: Callable[[], None], known: Sequence[tuple[int, bytes]]) -> None:
        """Run a check taken by `take_checks`, its reads served from `known` ((offset, bytes)
        the caller has already: a streamed read's headers and descriptors) where they fall."""
        with self._lock:
            self._known.extend(known)
        try:
            check()
        finally:
            with self._lock:
                for block in known:
                    self._known.remove(block)

    def stream(self, start: int, end: int, whole: int = CHUNK) -> Iterator[bytes | bytearray]:
        """Bytes [start, end) of the object, in pieces of PIECE bytes (the last may be shorter),
        from one ranged GET whose answer is read as it arrives (S3 and HTTP; other backends: a
        request per `whole` bytes, CHUNK at most). A transient failure resumes from the byte reached (RETRIES times at
        most); an answer shorter than asked, or from another version of the object, is a
        BadCheckpointError: no byte of it is handed on as the object's."""
        from fsspec.asyn import sync

        pos, attempt = start, 0
        streamed = self._s3 or self._http
        while pos < end:
            if not self._open:
                raise BadCheckpointError(f"{self.name}: the checkpoint was closed before this read")
            if streamed:
                self._count()
            try:
                body = sync(self.fs.loop, self._open_body, pos, end) if streamed else None
                if body is None:  # no streamed GET for this backend or server: whole requests
                    while pos < end:
                        data = self._fetch(pos, min(end, pos + max(1, min(whole, CHUNK))))
                        pos += len(data)
                        yield data
                    return
                read, close = body
                try:
                    while pos < end:
                        data = sync(self.fs.loop, _read_piece, read, min(PIECE, end - pos))
                        if not data:
                            raise BadCheckpointError(
                                f"{self.name}: the store's answer ended at byte {pos} of {start}-{end}: the object "
                                "is not the one validated (changed or truncated); nothing was written from it"
                            )
                        with self._lock:
                            self.bytes_read += len(data)
                        pos += len(data)
                        yield data
                finally:
                    close()
            except BadCheckpointError:
                raise
            except Exception as exc:  # noqa: BLE001 -- every backend failure becomes a CheckpointError
                kind = failure_kind(exc)
                if kind == "transient" and attempt < RETRIES:
                    time.sleep(BACKOFF * 2**attempt)
                    attempt += 1
                    continue
                raise self._error(f"reading bytes {pos}-{end}")(kind, attempt + 1, exc) from None

    async def _open_body(
        self, start: int, end: int
    ) -> tuple[Callable[[int], Awaitable[bytes]], Callable[[], None]] | None:
        """A ranged GET of [start, end) pinned to the validated ETag, its body not read yet:
        (read(n), close), or None where the answer cannot be streamed (then `_fetch` is used)."""
        if self._s3:
            resp = await self.fs._call_s3("get_object", **self._s3_range(start, end))
            body = resp["Body"]
            return body.read, body.close
        if self._http:
            session = await self.fs.set_session()
            kwargs = dict(self.fs.kwargs)
            headers = {**(kwargs.pop("headers", None) or {}), "Range": f"bytes={start}-{end - 1}"}
            if self._if_match:
                headers["If-Match"] = self._if_match
            r = await session.get(self.fs.encode_url(self.path), headers=headers, **kwargs)
            if r.status == 206:
                return r.content.read, r.close
            r.release()
            if r.status == 404:
                raise FileNotFoundError(self.url)
            r.raise_for_status()  # 412: changed; 5xx: retried
            return None  # 200: a server that ignores Range
        return None

    # ----------------------------------------------------------------- the Source interface

    @property
    def size(self) -> int:
        return self._size

    @property
    def fd(self) -> int:
        raise EngineUnsupported(f"{self.name}: a remote object has no file descriptor")

    @property
    def closed(self) -> bool:
        return not self._open

    @property
    def proc_path(self) -> str:
        """A local copy of the object (downloaded on first use, removed by `close()`), for libraries
        that only read files by path (torch's fallback)."""
        if self._copy is None:
            import tempfile

            fd, path = tempfile.mkstemp(prefix="ckptsurgeon-", suffix=".download")
            try:
                with os.fdopen(fd, "wb") as f:
                    step = PARALLEL * CHUNK
                    for pos in range(0, self._size, step):
                        f.write(self._read(pos, min(step, self._size - pos)))
            except BaseException:
                os.unlink(path)
                raise
            self._copy = path
        return self._copy

    def check_unchanged(self) -> None:
        info = self._info("cannot check the object")
        if info.get("size") != self._size or (self.etag is not None and _identity_of(info) != self.etag):
            raise BadCheckpointError(
                f"{self.name}: the object changed while it was being read (size {self._size} -> "
                f"{info.get('size')}); nothing was written from it"
            )

    def readinto(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        view[:] = self._read(offset, len(view))

    def pread(self, size: int, offset: int) -> bytes:
        return bytes(self._read(offset, size))

    def read_upto(self, size: int, offset: int) -> bytes:
        return self.pread(max(0, min(size, self._size - offset)), offset)

    def defer(self, start: int, end: int, check: Callable[[], None], span: tuple[int, int] | None = None) -> None:
        with self._check_lock:
            i = bisect.bisect_right(self._starts, start)
            self._starts.insert(i, start)
            self._checks.insert(i, (start, end, check, span or (start, end)))

    def close(self) -> None:
        self._open = False
        with self._lock:
            self._blocks.clear()
        copy, self._copy = self._copy, None
        if copy is not None:
            try:
                os.unlink(copy)
            except OSError:
                pass

    def __del__(self) -> None:
        copy = getattr(self, "_copy", None)
        if copy is not None:
            try:
                os.unlink(copy)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"RemoteSource({self.name!r}, size={self._size}, etag={self.etag!r})"


# -- writing ------------------------------------------------------------------------------------


def check_remote_output(
    url: str, storage_options: Mapping[str, Any] | None, *, force: bool, inputs: Sequence[str]
) -> None:
    """Refuse a read-only store (http, https), a directory (a prefix: never replaced by an object,
    as locally), and an existing object without `force` (one request)."""
    refuse_read_only(url)
    fs, path = filesystem(url, storage_options)

    def fail(kind: str, attempts: int, exc: Exception) -> Exception:
        return OutputError(f"{url}: cannot check the output: {_one_line(exc)}")

    def kind() -> str | None:
        try:
            return str(fs.info(path).get("type"))
        except FileNotFoundError:
            return None

    found = _retrying(kind, lambda: None, fail)
    if found == "directory":
        raise OutputError(f"{url}: output is a directory; end OUT with / to write a directory layout into it")
    if found is not None and not force:
        what = "is the same object as an input" if url in inputs else "exists"
        raise OutputError(f"{url}: output {what}; pass --force to replace it")


def refuse_read_only(url: str) -> None:
    """An output on a store that cannot be written (http, https) is an OutputError."""
    protocol = _protocol(url)
    if protocol in _READ_ONLY:
        raise OutputError(f"{url}: {protocol}:// is read-only; write to a local path or to s3://, gs://, hf://, ...")


def upload(
    local: str,
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    stop: Callable[[], BaseException | None] | None = None,
) -> None:
    """Upload the complete file `local` to `url`: the object appears whole or not at all (a
    single PUT, or a multipart upload completed at the end). On any failure, or an interruption
    (SIGINT/SIGTERM), the upload is cancelled and a multipart upload aborted. `stop()`, asked
    between short waits, gives an exception to end the upload with (an upload in a worker thread,
    which no signal reaches, is stopped so)."""
    fs, path = filesystem(url, storage_options)
    started = time.time()
    if not getattr(fs, "async_impl", False):
        try:
            fs.put_file(local, path)
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"{url}: upload failed: {_one_line(exc)}") from None
        return
    import asyncio
    import concurrent.futures

    future = asyncio.run_coroutine_threadsafe(fs._put_file(local, path), fs.loop)
    try:
        while True:  # short waits: a signal handler runs in between
            try:
                future.result(timeout=0.2)
                return
            except concurrent.futures.TimeoutError:
                stopped = stop() if stop is not None else None
                if stopped is not None:
                    raise stopped from None
    except BaseException as exc:
        future.cancel()
        concurrent.futures.wait([future], timeout=30)
        _abort_uploads(fs, path, started)
        if isinstance(exc, Exception) and not isinstance(exc, concurrent.futures.CancelledError):
            raise OutputError(f"{url}: upload failed: {_one_line(exc)}") from None
        raise


def _abort_uploads(fs: Any, path: str, since: float) -> None:
    """Abort the S3 multipart uploads of `path` begun since `since` (this run's): a cancelled
    upload leaves no object, and its parts are not kept either."""
    if not hasattr(fs, "_call_s3"):
        return
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def abort() -> None:
        found = await fs._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
        for up in found.get("Uploads", []):
            initiated = up.get("Initiated")
            if up.get("Key") == key and (initiated is None or initiated.timestamp() >= since - 60):
                await fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])

    try:
        sync(fs.loop, abort, timeout=30)
    except Exception:  # noqa: BLE001 -- best effort: an incomplete upload never shows as an object
        pass


# -- directories --------------------------------------------------------------------------------


# what a URL, or fsspec, reads in a name as more than a name: a %-escape (`%2e%2e` is `..` to an
# HTTP client), a query, a fragment, fsspec's chaining of URLs
_NOT_IN_NAMES = ("%", "?", "#", "::")


def join_url(directory: str, name: str) -> str:
    """The URL of `name` (a relative, `/`-separated path) inside the directory URL `directory`;
    a name the URL would read as something else (see `_NOT_IN_NAMES`) is refused."""
    found = [s for s in _NOT_IN_NAMES if s in name]
    if found:
        raise BadCheckpointError(
            f"{directory}: the name {quote_name(name)} holds {found[0]!r}, which a URL does not read as "
            "part of a name: not a file of this directory"
        )
    return directory.rstrip("/") + "/" + name


class RemoteDirectory:
    """A directory (a prefix) of a remote store as `engine.layout` decides layouts: is the URL a
    directory (one `fs.info`), what does it hold (one `fs.ls`), each request retried like a read.
    `requests` counts them. A store that cannot be listed (http, https) is not `listable`."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.requests = 0
        self.listable = _protocol(url) not in _READ_ONLY
        self.fs: Any = None
        self.path = ""
        if self.listable:
            self.fs, self.path = filesystem(url, storage_options)

    def _count(self) -> None:
        self.requests += 1

    def _fail(self, what: str) -> Callable[[str, int, Exception], Exception]:
        def make(kind: str, attempts: int, exc: Exception) -> Exception:
            cause = _one_line(next((e for e in _chain(exc) if _status(e) is not None), exc))
            if kind == "missing":
                return BadCheckpointError(f"{self.url}: {what}: no such directory")
            if kind == "denied":
                return BadCheckpointError(f"{self.url}: {what}: access denied: {cause}")
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            return BadCheckpointError(f"{self.url}: {what}{tries}: {cause}")

        return make

    def is_directory(self) -> bool:
        """Whether the URL names a directory (prefix); False for an object or nothing at all (the
        object's reader then says what is wrong)."""
        if self.fs is None:
            return False
        self.fs.invalidate_cache(self.path)  # what the store holds now, not what this process saw
        missing = object()

        def info() -> Any:
            try:
                return self.fs.info(self.path)
            except FileNotFoundError:
                return missing

        found = _retrying(info, self._count, self._fail("cannot look it up"))
        return found is not missing and isinstance(found, Mapping) and found.get("type") == "directory"

    def entries(self) -> dict[str, bool]:
        """Entry name -> whether it is a directory, from one listing."""
        if self.fs is None:
            raise BadCheckpointError(f"{self.url}: a {_protocol(self.url)}:// URL cannot be listed")
        listed = _retrying(
            lambda: self.fs.ls(self.path, detail=True, refresh=True), self._count, self._fail("cannot list")
        )
        return _entries(listed, self.path)

    def child(self, name: str) -> RemoteDirectory:
        return RemoteDirectory(join_url(self.url, name), self.storage_options)


def _output_failure(url: str, what: str) -> Callable[[str, int, Exception], Exception]:
    def make(kind: str, attempts: int, exc: Exception) -> Exception:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return OutputError(f"{url}: {what}{tries}: {_one_line(exc)}")

    return make


def list_output(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, bool]:
    """What the directory (prefix) output `url` holds now: entry name -> whether it is a
    directory; {} when it holds nothing. One listing, retried; OutputError when it fails."""
    fs, path = filesystem(url, storage_options)
    missing: dict[str, Any] = {}

    def ls() -> Any:
        try:
            return fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return missing

    listed = _retrying(ls, lambda: None, _output_failure(url, "cannot list the output"))
    return _entries(listed or (), path)


def _entries(listed: Sequence[Mapping[str, Any]], path: str) -> dict[str, bool]:
    """Entry name -> whether it is a directory, from `fs.ls(path, detail=True)`. S3 has two kinds
    of entry that are no files of the directory: an object named like the prefix itself (`out/`,
    a "folder" made in a console) is left out; a name that is an object and a prefix at once
    (`x.safetensors` and `x.safetensors/y`) is the object."""
    out: dict[str, bool] = {}
    for entry in listed:
        full = str(entry.get("name", "")).rstrip("/")
        name = full.rsplit("/", 1)[-1]
        if name and full != path.rstrip("/"):
            out[name] = out.get(name, True) and entry.get("type") == "directory"
    return out


def delete_object(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the object `url` (retried; one that is already gone is fine); OutputError when it fails."""
    fs, path = filesystem(url, storage_options)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    _retrying(rm, lambda: None, _output_failure(url, "cannot delete"))
