"""A corpus of broken and hostile checkpoint files, written byte by byte without importing torch.

`build_corpus(directory, marker)` writes every case into its own sub-directory of `directory` (so a
test can tell which command left a stray file next to which input) and returns the list of
:class:`Case`. The bytes are deterministic for a given `marker` path: the zip writer reproduces
`torch.save` (torch 2.13) byte for byte, the legacy writer reproduces
`torch.save(..., _use_new_zipfile_serialization=False)` up to the storage keys, and pickles are
produced by the pure-Python pickler with fake globals, so nothing here needs torch or numpy.

Every code-execution case would create the file `marker` if its pickle were ever run by an
unrestricted unpickler (e.g. `torch.load(weights_only=False)`); a tool that never runs them leaves
`marker` absent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import random
import shlex
import struct
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = (
    "valid",
    "not-checkpoint",
    "code-exec",
    "malformed-pickle",
    "zip-damage",
    "legacy-damage",
    "safetensors-damage",
)


@dataclass(frozen=True)
class Case:
    """One file of the corpus: `kind` is one of KINDS, `note` says what is wrong with it."""

    name: str
    path: Path
    kind: str
    note: str


# Case name -> keyword arguments of torch.load (safetensors.torch.load_file for .safetensors) under
# which the file loads WITHOUT raising on torch 2.13 / safetensors 0.8 (measured): the cases that
# prove ckptsurgeon's own validation is needed.
TORCH_LOADS_SILENTLY: dict[str, dict[str, Any]] = {
    "zip-record-short": {"mmap": True},  # the tensor's last element is the next header's bytes
    "zip-record-long": {"mmap": True},
    "zip-record-empty": {"mmap": True},  # the whole tensor is zip header bytes
    "zip-cd-size-larger": {"mmap": True},
    "pkl-pid-huge-numel": {"mmap": True},
    "pkl-pid-overflow-numel": {"mmap": True},  # float64 garbage read from the zip headers
    "zip-crc-flip-data": {},  # torch never checks CRC-32
    "zip-crc-flip-pkl": {},  # loads key 'v' instead of 'w'
    "zip-bomb-lying-size": {},
    "zip-duplicate-data-record": {},  # miniz takes the first copy, Python's zipfile the last
    "zip-duplicate-data-pkl": {},
    "zip-local-cd-name-mismatch": {},
    "zip-cd-offset-wrong": {},  # data/0 is read from data/1's local header: garbage floats
    "pkl-storage-two-dtypes": {},
    "pkl-storage-two-sizes": {},
    "legacy-duplicate-key": {},
    "st-duplicate-names": {},
    "zip-two-end-records": {},  # torch reads central directory B: other weights
    "zip-two-end-records-exact": {},
    "zip-case-variant-after": {},
    "zip-case-variant-before": {},  # torch reads archive/DATA/0: other weights
    "zip-trailing-bytes": {},
    "zip-end-record-copy-in-comment": {},
    "zip-gap-after-central-directory": {},
    "zip-end-records-disagree": {},
}

# ------------------------------------------------------------------------------------------------
# pickles without the modules they name


class Global:
    """A pickle GLOBAL (`module name`) written without importing `module`."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name

    def __call__(self, *args: Any) -> Call:
        return Call(self, args)


_GLOBALS: dict[tuple[str, str], Global] = {}


def G(module: str, name: str) -> Global:
    """The one Global object for `module.name` (one object, so repeats pickle as BINGET, as torch's do)."""
    return _GLOBALS.setdefault((module, name), Global(module, name))


class Call:
    """`func(*args)` as a REDUCE."""

    __slots__ = ("func", "args")

    def __init__(self, func: Any, args: tuple):
        self.func = func
        self.args = args

    def __call__(self, *args: Any) -> Call:
        return Call(self, args)

    def __reduce__(self):  # noqa: D105
        return (self.func, self.args)


class NewObj:
    """`cls.__new__(cls, *args)` then BUILD with `state`, as a pickled class instance."""

    __slots__ = ("cls", "args", "state")

    def __init__(self, cls: Global, args: tuple = (), state: Any = None):
        self.cls = cls
        self.args = args
        self.state = state


class Raw:
    """Opcodes copied verbatim into the pickle: they must push exactly one object."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class Storage:
    """A storage reference, pickled as the persistent id torch writes for it."""

    __slots__ = ("storage_type", "key", "location", "numel", "legacy", "pid_override")

    def __init__(
        self,
        storage_type: str | Global | Any,
        key: Any,
        numel: Any,
        *,
        location: Any = "cpu",
        legacy: bool = False,
        pid_override: Any = None,
    ):
        self.storage_type = G("torch", storage_type) if isinstance(storage_type, str) else storage_type
        self.key = key
        self.location = location
        self.numel = numel
        self.legacy = legacy
        self.pid_override = pid_override

    def pid(self) -> Any:
        if self.pid_override is not None:
            return self.pid_override
        pid: tuple = ("storage", self.storage_type, self.key, self.location, self.numel)
        return pid + (None,) if self.legacy else pid


class _Pickler(pickle._Pickler):  # type: ignore[name-defined]
    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid() if isinstance(obj, Storage) else None

    def _save_fake_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + obj.module.encode("utf-8") + b"\n" + obj.name.encode("utf-8") + b"\n")
        self.memoize(obj)

    def _save_newobj(self, obj: NewObj) -> None:
        self.save(obj.cls)
        self.save(tuple(obj.args))
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def _save_raw(self, obj: Raw) -> None:
        self.write(obj.data)

    dispatch[Global] = _save_fake_global
    dispatch[NewObj] = _save_newobj
    dispatch[Raw] = _save_raw


def dumps(obj: Any) -> bytes:
    """Pickle `obj` (which may hold Global/Call/NewObj/Raw/Storage nodes) with protocol 2, like torch.save."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def rebuild_tensor(storage: Storage, offset: Any, size: Any, stride: Any, requires_grad: bool = False) -> Call:
    """A `torch._utils._rebuild_tensor_v2(...)` call as torch.save writes it."""
    # torch pickles a fresh size and stride tuple per tensor: equal tuples must not share a memo slot
    size, stride = (tuple(list(t)) if isinstance(t, tuple) else t for t in (size, stride))
    return G("torch._utils", "_rebuild_tensor_v2")(storage, offset, size, stride, requires_grad, OrderedDict())


def _contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(size):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


# ------------------------------------------------------------------------------------------------
# in-memory state dicts (pickle graph + storage bytes)

_PACK = {"FloatStorage": "f", "DoubleStorage": "d", "LongStorage": "q", "IntStorage": "i", "HalfStorage": "e"}
_ITEMSIZE = {
    "FloatStorage": 4,
    "DoubleStorage": 8,
    "LongStorage": 8,
    "IntStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "ByteStorage": 1,
    "BoolStorage": 1,
}


@dataclass
class Blob:
    """The bytes of one storage."""

    key: str
    storage_type: str
    numel: int
    data: bytes


@dataclass
class StateDict:
    """An OrderedDict of tensors ready to pickle, plus the bytes of its storages in key order."""

    obj: Any
    blobs: list[Blob] = field(default_factory=list)


def pack(storage_type: str, values: Iterable[float]) -> bytes:
    values = list(values)
    if storage_type == "BFloat16Storage":
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    return struct.pack(f"<{len(values)}{_PACK[storage_type]}", *values)


class Builder:
    """Builds a state dict the way torch.save numbers its storages (first pickled, first keyed)."""

    def __init__(self, *, legacy: bool = False):
        self.legacy = legacy
        self.blobs: list[Blob] = []
        self._n = 0

    def storage(self, storage_type: str, values: list[float], *, numel: int | None = None) -> Storage:
        key = str(self._n) if not self.legacy else str(140_000_000_000_000 + 64 * self._n)
        self._n += 1
        data = pack(storage_type, values)
        self.blobs.append(Blob(key, storage_type, len(values), data))
        return Storage(storage_type, key, len(values) if numel is None else numel, legacy=self.legacy)

    def tensor(self, storage_type: str, values: list[float], size: tuple[int, ...]) -> Call:
        return rebuild_tensor(self.storage(storage_type, values), 0, size, _contiguous_stride(size))


def base_state(*, legacy: bool = False, prefix: str = "") -> StateDict:
    """{'<prefix>w': float32 arange(6).view(2, 3), '<prefix>b': int64 [1, 2]}."""
    b = Builder(legacy=legacy)
    sd = OrderedDict()
    sd[prefix + "w"] = b.tensor("FloatStorage", [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], (2, 3))
    sd[prefix + "b"] = b.tensor("LongStorage", [1, 2], (2,))
    return StateDict(sd, b.blobs)


def tricky_state() -> StateDict:
    """Tied weights, a view with an offset, a 0-dim double, an empty tensor, bfloat16, a Parameter."""
    b = Builder()
    sd = OrderedDict()
    emb = b.storage("FloatStorage", [float(i) for i in range(12)])
    tied = rebuild_tensor(emb, 0, (3, 4), (4, 1))
    sd["emb.weight"] = tied
    sd["head.weight"] = tied
    sd["row"] = rebuild_tensor(emb, 4, (4,), (1,))
    sd["scalar"] = b.tensor("DoubleStorage", [2.5], ())
    sd["empty"] = b.tensor("FloatStorage", [], (0, 3))
    sd["bf"] = b.tensor("BFloat16Storage", [1.0, -2.0], (2,))
    sd["p"] = G("torch._utils", "_rebuild_parameter")(b.tensor("FloatStorage", [1.0, 1.0], (2,)), True, OrderedDict())
    sd._metadata = OrderedDict([("", {"version": 1}), ("emb", {"version": 2})])  # type: ignore[attr-defined]
    return StateDict(sd, b.blobs)


# ------------------------------------------------------------------------------------------------
# the zip format (what torch.save / PyTorchStreamWriter + miniz write)


@dataclass
class ZipEntry:
    """One zip member. `data` is what is stored (compressed bytes when method == 8)."""

    name: str
    data: bytes
    crc: int | None = None  # CRC-32 of the uncompressed bytes; computed from data if None
    size: int | None = None  # uncompressed size; len(data) if None
    method: int = 0


@dataclass
class ZipLayout:
    """A written archive and where its parts are, for precise damage."""

    data: bytearray
    local: list[int]  # offset of each local header
    payload: list[int]  # offset of each member's first data byte
    central: list[int]  # offset of each central-directory entry
    cd_start: int
    zip64_eocd: int
    locator: int
    eocd: int


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write_zip(entries: list[ZipEntry], *, alignment: int = 64) -> ZipLayout:
    """Lay out `entries` exactly as torch 2.13 does (64-byte aligned data, data descriptors, zip64 end)."""
    out = bytearray()
    local, payload, meta = [], [], []
    for e in entries:
        name = e.name.encode("utf-8")
        crc = _crc(e.data) if e.crc is None else e.crc
        size = len(e.data) if e.size is None else e.size
        flags = 0x0808 if e.data else 0x0800
        offset = len(out)
        start = offset + 30 + len(name) + 4
        pad = (-start) % alignment
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        local.append(offset)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, flags, e.method, 0, 0, 0, 0, 0, len(name), len(extra))
        out += name + extra
        payload.append(len(out))
        out += e.data
        if flags & 0x8:
            out += struct.pack("<4sIII", b"PK\x07\x08", crc, len(e.data), size)
        meta.append((name, flags, crc, size, offset, e))
    cd_start = len(out)
    central = []
    for name, flags, crc, size, offset, e in meta:
        central.append(len(out))
        out += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            0,
            0,
            flags,
            e.method,
            0,
            0,
            crc,
            len(e.data),
            size,
            len(name),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        out += name
    cd_size = len(out) - cd_start
    zip64_eocd = len(out)
    n = len(entries)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, cd_size, cd_start)
    locator = len(out)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, zip64_eocd, 1)
    eocd = len(out)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, cd_size, cd_start, 0)
    return ZipLayout(out, local, payload, central, cd_start, zip64_eocd, locator, eocd)


def serialization_id(seed: bytes) -> bytes:
    return str(int.from_bytes(hashlib.sha256(seed).digest()[:16], "little")).zfill(40)[:40].encode()


def torch_zip_entries(
    pkl: bytes, blobs: list[Blob], prefix: str = "archive", sid: bytes | None = None
) -> list[ZipEntry]:
    """The members torch 2.13 writes, in its order (`sid`: the serialization id, random in torch)."""
    entries = [
        ZipEntry(f"{prefix}/data.pkl", pkl),
        ZipEntry(f"{prefix}/.format_version", b"1"),
        ZipEntry(f"{prefix}/.storage_alignment", b"64"),
        ZipEntry(f"{prefix}/byteorder", b"little"),
    ]
    entries += [ZipEntry(f"{prefix}/data/{b.key}", b.data) for b in blobs]
    entries += [
        ZipEntry(f"{prefix}/version", b"3\n"),
        ZipEntry(f"{prefix}/.data/serialization_id", serialization_id(pkl) if sid is None else sid),
    ]
    return entries


def torch_zip(obj: Any, blobs: Iterable[Blob] = (), prefix: str = "archive", sid: bytes | None = None) -> bytes:
    """`torch.save(obj)` bytes for a pickle graph `obj` (or ready pickle bytes) and its storages."""
    pkl = obj if isinstance(obj, bytes) else dumps(obj)
    return bytes(write_zip(torch_zip_entries(pkl, list(blobs), prefix, sid)).data)


def state_zip(sd: StateDict, prefix: str = "archive", sid: bytes | None = None) -> bytes:
    return torch_zip(sd.obj, sd.blobs, prefix, sid)


def _entry_index(layout_entries: list[ZipEntry], suffix: str) -> int:
    return next(i for i, e in enumerate(layout_entries) if e.name.endswith(suffix))


# ------------------------------------------------------------------------------------------------
# the legacy format and safetensors

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_file(
    obj: Any,
    blobs: list[Blob],
    *,
    magic: Any = MAGIC_NUMBER,
    protocol: Any = PROTOCOL_VERSION,
    keys: list[Any] | None = None,
    counts: dict[str, int] | None = None,
) -> bytes:
    """`torch.save(obj, _use_new_zipfile_serialization=False)` bytes."""
    out = io.BytesIO()
    for part in (magic, protocol, SYS_INFO):
        out.write(part.data if isinstance(part, Raw) else dumps(part))
    out.write(obj if isinstance(obj, bytes) else dumps(obj))
    by_key = {b.key: b for b in blobs}
    keys = sorted(by_key) if keys is None else keys
    out.write(dumps(keys))
    for key in keys:
        blob = by_key[key]
        count = (counts or {}).get(key, blob.numel)
        out.write(struct.pack("<q", count) + blob.data)
    return out.getvalue()


def legacy_of(sd: StateDict, **kwargs: Any) -> bytes:
    """`legacy_file` of a StateDict."""
    return legacy_file(sd.obj, sd.blobs, **kwargs)


def safetensors_file(tensors: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file: (name, dtype, shape, bytes) laid out in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    return safetensors_raw(json.dumps(header, separators=(",", ":")).encode(), b"".join(t[3] for t in tensors))


def safetensors_raw(header: bytes, data: bytes, header_len: int | None = None) -> bytes:
    header = header + b" " * ((-len(header)) % 8)
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


# ------------------------------------------------------------------------------------------------
# raw pickle opcodes for the malformed cases


def op_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = pickle.encode_long(n)  # type: ignore[attr-defined]
    return b"\x8a" + bytes([len(data)]) + data


def long_put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def long_get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


# ------------------------------------------------------------------------------------------------
# the registry of cases


@dataclass(frozen=True)
class _Ctx:
    marker: Path

    @property
    def shell(self) -> str:
        return f"touch {shlex.quote(str(self.marker))}"

    @property
    def python(self) -> str:
        return f"open({str(self.marker)!r}, 'w').close()"


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: str
    note: str
    filename: str
    write: Callable[[Path, _Ctx], None]


_SPECS: list[_Spec] = []


def _add(name: str, kind: str, note: str, ext: str, make: Callable[[_Ctx], bytes]) -> None:
    assert kind in KINDS and all(s.name != name for s in _SPECS), name

    def write(path: Path, ctx: _Ctx) -> None:
        path.write_bytes(make(ctx))

    _SPECS.append(_Spec(name, kind, note, name + ext, write))


def _add_special(name: str, kind: str, note: str, filename: str, write: Callable[[Path, _Ctx], None]) -> None:
    _SPECS.append(_Spec(name, kind, note, filename, write))


def case_names() -> list[str]:
    """The names of all cases, in corpus order (no file is written)."""
    return [s.name for s in _SPECS]


def build_corpus(directory: Path, marker: Path | None = None) -> list[Case]:
    """Write every case under `directory` (one sub-directory per case) and return them.

    `marker` is the file every code-execution payload would create; it defaults to
    `directory / "MARKER"` and must not exist afterwards.
    """
    directory = Path(directory)
    ctx = _Ctx(Path(marker) if marker is not None else directory / "MARKER")
    cases = []
    for spec in _SPECS:
        sub = directory / spec.name
        sub.mkdir(parents=True, exist_ok=False)
        path = sub / spec.filename
        spec.write(path, ctx)
        cases.append(Case(spec.name, path, spec.kind, spec.note))
    return cases


def write_reference(path: Path) -> Path:
    """A valid torch zip checkpoint {'ref.weight': 2x2 float32, 'ref.bias': float32[2]} (a merge/diff partner)."""
    b = Builder()
    sd = OrderedDict()
    sd["ref.weight"] = b.tensor("FloatStorage", [1.0, 2.0, 3.0, 4.0], (2, 2))
    sd["ref.bias"] = b.tensor("FloatStorage", [0.5, -0.5], (2,))
    path.write_bytes(torch_zip(sd, b.blobs, prefix=path.stem))
    return path


# ---------------- valid files

_add(
    "valid-zip",
    "valid",
    "torch.save of {'w': float32 2x3, 'b': int64[2]}, byte-identical to torch 2.13",
    ".pt",
    lambda ctx: state_zip(base_state(prefix="layer."), prefix="valid-zip"),
)
_add(
    "valid-zip-tricky",
    "valid",
    "tied weights, a view at an offset, 0-dim float64, empty, bfloat16, a Parameter, _metadata",
    ".pt",
    lambda ctx: state_zip(tricky_state(), prefix="valid-zip-tricky"),
)


def _container(ctx: _Ctx) -> bytes:
    sd = base_state(prefix="layer.")
    return torch_zip({"state_dict": sd.obj, "epoch": 3, "lr": 0.1}, sd.blobs, "valid-zip-container")


_add(
    "valid-zip-container",
    "valid",
    "{'state_dict': ..., 'epoch': 3, 'lr': 0.1}: a training checkpoint",
    ".pt",
    _container,
)
_add(
    "valid-legacy",
    "valid",
    "the pre-1.6 (non-zip) torch.save format",
    ".pt",
    lambda ctx: legacy_of(base_state(legacy=True, prefix="layer.")),
)
_add(
    "valid-safetensors",
    "valid",
    "a safetensors file written like safetensors 0.8",
    ".safetensors",
    lambda ctx: safetensors_file(
        [
            ("layer.b", "I64", [2], pack("LongStorage", [1, 2])),
            ("layer.w", "F32", [2, 3], pack("FloatStorage", [0, 1, 2, 3, 4, 5])),
        ]
    ),
)

# ---------------- not a checkpoint

_HTML = b"""<!DOCTYPE html>
<html><head><title>404 Not Found</title></head>
<body><h1>Not Found</h1><p>The requested URL /models/resnet50.pt was not found on this server.</p></body></html>
"""
_LFS = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a2146b5e3f5c6e2b9f6d1c8a0b3e7d5c2a1f0e9d8c7b6a5f4e3d2c1b0a998\nsize 102467823\n"
)


def _not(name: str, note: str, data: bytes, ext: str = ".pt") -> None:
    _add(name, "not-checkpoint", note, ext, lambda ctx: data)


_not("empty", "a zero-byte file", b"")
_not("one-byte", "a single byte 'P'", b"P")
_not("pk-only", "the two bytes 'PK'", b"PK")
_not("text", "plain text", b"hello, this is not a checkpoint\n")
_not("html-error-page", "an HTML 404 page saved by a failed download", _HTML)
_not("git-lfs-pointer", "a Git LFS pointer file instead of the weights", _LFS)
_not("json-config", "a config.json saved under a checkpoint name", b'{"hidden_size": 768, "num_layers": 12}\n')
_not("random-bytes", "4 KiB of random bytes", random.Random(1234).randbytes(4096))
_not(
    "numpy-npy",
    "a NumPy .npy file",
    b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
    + b" " * 53
    + b"\n"
    + struct.pack("<2f", 1, 2),
)
_add(
    "gzip-of-checkpoint",
    "not-checkpoint",
    "a valid checkpoint, gzip-compressed",
    ".pt",
    lambda ctx: gzip.compress(state_zip(base_state()), mtime=0),
)
_add(
    "zip-not-torch",
    "not-checkpoint",
    "an ordinary zip archive (README + CSV), no data.pkl",
    ".pt",
    lambda ctx: bytes(
        write_zip([ZipEntry("dataset/README.txt", b"hello\n"), ZipEntry("dataset/train.csv", b"a,b\n1,2\n")]).data
    ),
)
_add(
    "zip-pickle-int",
    "not-checkpoint",
    "a well-formed torch zip whose object is the int 42 (no tensors)",
    ".pt",
    lambda ctx: torch_zip(42),
)
_add(
    "zip-pickle-strings",
    "not-checkpoint",
    "a well-formed torch zip holding a list of strings",
    ".pt",
    lambda ctx: torch_zip(["not", "a", "state", "dict"]),
)


def _torchscript(ctx: _Ctx) -> bytes:
    sd = base_state()
    net = NewObj(G("__torch__", "Net"), (), {"training": True, "w": sd.obj["w"]})
    entries = torch_zip_entries(dumps(net), sd.blobs, "net")
    entries[1:1] = [
        ZipEntry(
            "net/code/__torch__.py",
            b"class Net(Module):\n  __parameters__ = []\n  def forward(self, x):\n    return x\n",
        ),
        ZipEntry("net/code/__torch__.py.debug_pkl", dumps(())),
        ZipEntry("net/constants.pkl", dumps(())),
    ]
    return bytes(write_zip(entries).data)


_add(
    "torchscript-archive",
    "not-checkpoint",
    "a TorchScript archive (torch.jit.save): constants.pkl and code/",
    ".pt",
    _torchscript,
)


def _tar_legacy(ctx: _Ctx) -> bytes:
    members = {
        "sys_info": dumps(SYS_INFO),
        "storages": dumps(1)
        + dumps(("1", "cpu", G("torch", "FloatStorage")))
        + struct.pack("<q", 2)
        + pack("FloatStorage", [1, 2])
        + dumps([]),
        "tensors": dumps(1)
        + dumps(("2", "1", G("torch", "FloatTensor")))
        + struct.pack("<ii", 1, 0)
        + struct.pack("<qqq", 2, 1, 0),
        "pickle": dumps(OrderedDict(w=Raw(op_str("2") + b"Q"))),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_add("tar-pre-1.0", "not-checkpoint", "the pre-1.0 tar format (members storages, tensors, pickle)", ".pt", _tar_legacy)


def _write_dir(path: Path, ctx: _Ctx) -> None:
    path.mkdir()
    (path / "data.pkl").write_bytes(dumps({}))


def _write_fifo(path: Path, ctx: _Ctx) -> None:
    os.mkfifo(path)


def _write_loop(path: Path, ctx: _Ctx) -> None:
    other = path.with_name("loop-b.pt")
    os.symlink(other.name, path)
    os.symlink(path.name, other)


def _write_dangling(path: Path, ctx: _Ctx) -> None:
    os.symlink("does-not-exist.pt", path)


_add_special("directory", "not-checkpoint", "a directory named like a checkpoint", "model.pt", _write_dir)
_add_special(
    "fifo", "not-checkpoint", "a named pipe with no writer: opening it for reading blocks", "pipe.pt", _write_fifo
)
_add_special(
    "symlink-loop", "not-checkpoint", "a symlink loop (loop-a.pt -> loop-b.pt -> loop-a.pt)", "loop-a.pt", _write_loop
)
_add_special(
    "symlink-dangling", "not-checkpoint", "a symlink to a file that does not exist", "dangling.pt", _write_dangling
)

# ---------------- code execution


def _payloads(ctx: _Ctx) -> dict[str, Any]:
    """Pickle graphs that create ctx.marker when unpickled without restrictions."""
    shell, py = ctx.shell, ctx.python
    b = G("builtins", "__import__")
    bare_net_state = {"training": True, "_parameters": OrderedDict(), "_forward_hooks": G("posix", "system")(shell)}
    return {
        "os-system": G("os", "system")(shell),
        "posix-system": G("posix", "system")(shell),
        "builtins-eval": G("builtins", "eval")(py),
        "builtins-exec": G("builtins", "exec")(py),
        "py2-builtin-eval": G("__builtin__", "eval")(py),
        "subprocess-popen": G("subprocess", "Popen")(["touch", str(ctx.marker)]),
        "import-attrgetter": G("operator", "attrgetter")("system")(b("os"))(shell),
        "getattr-chain": G("builtins", "getattr")(G("builtins", "getattr")(b("subprocess"), "os"), "system")(shell),
        "runpy-run-code": G("runpy", "_run_code")(py, {}),
        "pickle-loads-nested": G("pickle", "loads")(dumps(G("posix", "system")(shell))),
        "torch-load-from-bytes": G("torch.storage", "_load_from_bytes")(dumps(G("posix", "system")(shell))),
        "main-net-module": NewObj(G("__main__", "Net"), (), bare_net_state),
        "argparse-namespace": NewObj(G("argparse", "Namespace"), (), {"lr": 0.1, "cmd": G("posix", "system")(shell)}),
        "numpy-runstring": G("numpy.testing._private.utils", "runstring")(py, {}),
        "numpy-scalar": {
            "best_acc": G("numpy.core.multiarray", "scalar")(G("numpy", "dtype")("f8", False, True), b"\x00" * 8),
            "hook": G("numpy.testing._private.utils", "runstring")(py, {}),
        },
        # classes, not functions: harmless-looking for --allow-global, yet built by calling them
        # with the file's arguments they create (or truncate) the file those arguments name
        "logging-filehandler": G("logging", "FileHandler")(str(ctx.marker), "w"),
        "zipfile-zipfile": G("zipfile", "ZipFile")(str(ctx.marker), "w"),
        "tarfile-tarfile": G("tarfile", "TarFile")(str(ctx.marker), "w"),
        "io-fileio": G("io", "FileIO")(str(ctx.marker), "w"),
        "sqlite3-connection": G("sqlite3", "Connection")(str(ctx.marker)),
    }


def _payload_state(ctx: _Ctx, payload: str, *, legacy: bool) -> StateDict:
    """A normal-looking state dict with the payload hidden among its values."""
    sd = base_state(legacy=legacy)
    value = _payloads(ctx)[payload]
    if payload == "main-net-module":
        # a whole pickled nn.Module: its parameters are real tensors, a hook runs the command
        params = OrderedDict(weight=G("torch._utils", "_rebuild_parameter")(sd.obj["w"], True, OrderedDict()))
        state = {"training": True, "_parameters": params, "_forward_hooks": G("posix", "system")(ctx.shell)}
        return StateDict(NewObj(G("__main__", "Net"), (), state), sd.blobs[:1])
    if payload == "argparse-namespace":
        return StateDict({"model": sd.obj, "args": value}, sd.blobs)
    sd.obj["extra"] = value
    return sd


_ZIP_PAYLOADS = list(_payloads(_Ctx(Path("/x"))))
_LEGACY_PAYLOADS = [
    "os-system",
    "builtins-eval",
    "main-net-module",
    "torch-load-from-bytes",
    "numpy-runstring",
    "argparse-namespace",
    "logging-filehandler",
    "zipfile-zipfile",
]
_BARE_PAYLOADS = [
    "posix-system",
    "builtins-exec",
    "subprocess-popen",
    "pickle-loads-nested",
    "runpy-run-code",
    "getattr-chain",
]
# Payload -> the class a user would pass to --allow-global for it (its exec-zip-* and exec-legacy-*
# cases must still be refused then, and create nothing).
ALLOW_GLOBAL_PAYLOADS = {
    "logging-filehandler": "logging.FileHandler",
    "zipfile-zipfile": "zipfile.ZipFile",
    "tarfile-tarfile": "tarfile.TarFile",
    "io-fileio": "io.FileIO",
    "sqlite3-connection": "sqlite3.Connection",
}

for _p in _ZIP_PAYLOADS:
    _add(
        f"exec-zip-{_p}",
        "code-exec",
        f"torch zip whose data.pkl calls {_p} next to real tensors",
        ".pt",
        lambda ctx, p=_p: state_zip(_payload_state(ctx, p, legacy=False)),
    )
for _p in _LEGACY_PAYLOADS:
    _add(
        f"exec-legacy-{_p}",
        "code-exec",
        f"legacy-format file whose object pickle calls {_p}",
        ".pt",
        lambda ctx, p=_p: legacy_of(_payload_state(ctx, p, legacy=True)),
    )
for _p in _BARE_PAYLOADS:
    _add(
        f"exec-bare-{_p}",
        "code-exec",
        f"a bare pickle that calls {_p}",
        ".pkl",
        lambda ctx, p=_p: dumps(_payloads(ctx)[p]),
    )


def _inst(ctx: _Ctx) -> bytes:
    # protocol-0 INST names the callable inline: a scanner that only looks for GLOBAL misses it
    return b"(" + op_str(ctx.shell) + b"ios\nsystem\n."


def _obj(ctx: _Ctx) -> bytes:
    return b"(cposix\nsystem\n" + op_str(ctx.shell) + b"o."


def _stack_global(ctx: _Ctx) -> bytes:
    # protocol-4 STACK_GLOBAL takes module and name from the stack
    return b"\x80\x04\x8c\x02os\x8c\x06system\x93" + op_str(ctx.shell) + b"\x85R."


_add(
    "exec-bare-inst-opcode",
    "code-exec",
    "a bare pickle calling os.system through the INST opcode (no GLOBAL)",
    ".pkl",
    _inst,
)
_add("exec-bare-obj-opcode", "code-exec", "a bare pickle calling posix.system through the OBJ opcode", ".pkl", _obj)
_add(
    "exec-bare-stack-global",
    "code-exec",
    "a protocol-4 pickle calling os.system through STACK_GLOBAL",
    ".pkl",
    _stack_global,
)
_add(
    "exec-zip-inst-opcode",
    "code-exec",
    "a torch zip whose data.pkl calls os.system through INST",
    ".pt",
    lambda ctx: torch_zip(b"\x80\x02" + _inst(ctx)),
)
_add(
    "exec-zip-stack-global",
    "code-exec",
    "a torch zip whose data.pkl uses STACK_GLOBAL to reach os.system",
    ".pt",
    lambda ctx: torch_zip(_stack_global(ctx)),
)


def _payload_in_pid(ctx: _Ctx) -> bytes:
    storage = Storage(G("posix", "system")(ctx.shell), "0", 6)
    return torch_zip(OrderedDict(w=rebuild_tensor(storage, 0, (2, 3), (3, 1))), base_state().blobs[:1])


_add(
    "exec-zip-in-persistent-id",
    "code-exec",
    "the storage type inside a persistent id is a posix.system call",
    ".pt",
    _payload_in_pid,
)
_add(
    "exec-legacy-in-magic",
    "code-exec",
    "legacy format whose first pickle (the magic number) calls posix.system",
    ".pt",
    lambda ctx: legacy_of(base_state(legacy=True), magic=G("posix", "system")(ctx.shell)),
)
_add(
    "exec-legacy-in-protocol",
    "code-exec",
    "legacy format whose protocol-version pickle calls builtins.eval",
    ".pt",
    lambda ctx: legacy_of(base_state(legacy=True), protocol=G("builtins", "eval")(ctx.python)),
)

# ---------------- malformed pickles (inside an otherwise well-formed torch zip)


def _pkl_zip(
    name: str,
    note: str,
    make_pkl: Callable[[], bytes],
    blobs: Callable[[], list[Blob]] = lambda: [],
    kind: str = "malformed-pickle",
) -> None:
    _add(name, kind, note, ".pt", lambda ctx: torch_zip(make_pkl(), blobs()))


_BASE_PKL = dumps(base_state().obj)


def _base_blobs() -> list[Blob]:
    return base_state().blobs


_pkl_zip(
    "pkl-truncated-half",
    "data.pkl cut in half (zip CRCs match the cut bytes)",
    lambda: _BASE_PKL[: len(_BASE_PKL) // 2],
    _base_blobs,
)
_pkl_zip("pkl-truncated-no-stop", "data.pkl without its final STOP opcode", lambda: _BASE_PKL[:-1], _base_blobs)
_pkl_zip("pkl-empty", "an empty data.pkl record", lambda: b"", _base_blobs)
_pkl_zip(
    "pkl-bad-opcode",
    "an opcode byte 0xff that no pickle protocol defines",
    lambda: _BASE_PKL[:2] + b"\xff" + _BASE_PKL[2:],
    _base_blobs,
)
_pkl_zip("pkl-nul-opcode", "a NUL byte where an opcode should be", lambda: b"\x80\x02\x00.")
_pkl_zip("pkl-stop-empty-stack", "STOP with nothing on the stack", lambda: b"\x80\x02.")
_pkl_zip("pkl-underflow-reduce", "REDUCE on an empty stack", lambda: b"\x80\x02R.")
_pkl_zip("pkl-underflow-tuple2", "TUPLE2 with one item on the stack", lambda: b"\x80\x02K\x01\x86.")
_pkl_zip("pkl-underflow-setitems", "SETITEMS with no MARK", lambda: b"\x80\x02}K\x01K\x02u.")
_pkl_zip("pkl-underflow-appends", "APPENDS with no MARK", lambda: b"\x80\x02]K\x01e.")
_pkl_zip("pkl-memo-get-missing", "BINGET of a memo slot never written", lambda: b"\x80\x02}q\x00h\xc8.")
_pkl_zip("pkl-memo-long-get-huge", "LONG_BINGET 2**31", lambda: b"\x80\x02" + long_get(2**31) + b".")
_pkl_zip(
    "pkl-setitem-on-list",
    "SETITEM on a list (the CVE-2026-24747 shape)",
    lambda: b"\x80\x02]" + op_str("k") + op_str("v") + b"s.",
)
_pkl_zip(
    "pkl-deep-list-nesting",
    "100,000 nested lists as a value next to a real tensor",
    lambda: dumps(OrderedDict(w=base_state().obj["w"], deep=Raw(b"]" * 100_000 + b"a" * 99_999))),
    lambda: base_state().blobs[:1],
)
_pkl_zip(
    "pkl-deep-tuple-nesting",
    "a tuple nested 100,000 deep as the whole object",
    lambda: b"\x80\x02K\x01" + b"\x85" * 100_000 + b".",
)
_pkl_zip(
    "pkl-deep-dict-nesting",
    "dicts nested 50,000 deep around the state dict's tensor",
    lambda: b"\x80\x02" + (b"}" + op_str("k")) * 50_000 + dumps(base_state().obj["w"])[2:-1] + b"s" * 50_000 + b".",
    lambda: base_state().blobs[:1],
)


def _billion_laughs(levels: int = 64) -> bytes:
    out = bytearray(b")" + long_put(100_000))
    for i in range(levels):
        out += long_get(100_000 + i) + b"\x86" + long_put(100_000 + i + 1)
    return bytes(out)


_pkl_zip(
    "pkl-billion-laughs",
    "a 64-level DAG of shared tuples: 2**64 leaves if walked without a memo",
    lambda: dumps(OrderedDict(w=base_state().obj["w"], laughs=Raw(_billion_laughs()))),
    lambda: base_state().blobs[:1],
)
_pkl_zip(
    "pkl-huge-object-count",
    "a list of 3,000,000 empty dicts (3 MB data.pkl)",
    lambda: b"\x80\x02](" + b"}" * 3_000_000 + b"e.",
)
_pkl_zip(
    "pkl-bytearray-2g",
    "builtins.bytearray(2**31) (allowlisted by weights_only): 2 GiB from a tiny file",
    lambda: dumps(OrderedDict(w=base_state().obj["w"], buf=G("builtins", "bytearray")(2**31))),
    lambda: base_state().blobs[:1],
)
_pkl_zip("pkl-bytearray-1t", "builtins.bytearray(2**40)", lambda: dumps({"buf": G("builtins", "bytearray")(2**40)}))
_pkl_zip(
    "pkl-torch-tensor-ctor",
    "torch.Tensor(2**31): an 8 GiB uninitialised tensor from an allowlisted global",
    lambda: dumps(OrderedDict(w=G("torch", "Tensor")(2**31))),
)
_pkl_zip(
    "pkl-long-tensor-ctor",
    "torch.LongTensor(2**32): 32 GiB",
    lambda: dumps(OrderedDict(w=G("torch", "LongTensor")(2**32))),
)
_pkl_zip(
    "pkl-tensor-ctor-2d",
    "torch.Tensor(65536, 65536): 16 GiB",
    lambda: dumps(OrderedDict(w=G("torch", "Tensor")(65536, 65536))),
)


def _one_tensor(storage: Storage, offset: Any, size: Any, stride: Any) -> Callable[[], bytes]:
    return lambda: dumps(OrderedDict(w=rebuild_tensor(storage, offset, size, stride)))


_F6 = lambda: [Blob("0", "FloatStorage", 6, pack("FloatStorage", range(6)))]  # noqa: E731

_pkl_zip(
    "pkl-pid-huge-numel",
    "the persistent id claims 2**40 floats; data/0 holds 6",
    _one_tensor(Storage("FloatStorage", "0", 2**40), 0, (2, 3), (3, 1)),
    _F6,
)
_pkl_zip(
    "pkl-pid-overflow-numel",
    "numel 2**62 doubles: numel * itemsize overflows int64",
    _one_tensor(Storage("DoubleStorage", "0", 2**62), 0, (2, 3), (3, 1)),
    _F6,
)
_pkl_zip(
    "pkl-pid-negative-numel",
    "the persistent id claims -1 elements",
    _one_tensor(Storage("FloatStorage", "0", -1), 0, (2, 3), (3, 1)),
    _F6,
)
_pkl_zip("pkl-pid-not-tuple", "a persistent id that is a string", lambda: b"\x80\x02" + op_str("0") + b"Q.")
_pkl_zip(
    "pkl-pid-short-tuple",
    "a persistent id ('storage',) with no fields",
    lambda: dumps(
        OrderedDict(w=rebuild_tensor(Storage("FloatStorage", "0", 6, pid_override=("storage",)), 0, (6,), (1,)))
    ),
    _F6,
)
_pkl_zip(
    "pkl-pid-module-typename",
    "a persistent id ('module', ...) instead of a storage",
    lambda: dumps(OrderedDict(w=Storage("x", "0", 0, pid_override=("module", "Net", "net.py", "src")))),
)
_pkl_zip(
    "pkl-pid-type-is-string",
    "the storage type in the persistent id is the string 'FloatStorage'",
    _one_tensor(Storage(Raw(op_str("FloatStorage")), "0", 6), 0, (2, 3), (3, 1)),
    _F6,
)
_pkl_zip(
    "pkl-pid-key-not-string",
    "the storage key is a list",
    _one_tensor(Storage("FloatStorage", Raw(b"]"), 6), 0, (2, 3), (3, 1)),
    _F6,
)
_pkl_zip("pkl-negative-size", "size (-2, 3)", _one_tensor(Storage("FloatStorage", "0", 6), 0, (-2, 3), (3, 1)), _F6)
_pkl_zip("pkl-negative-stride", "stride (-3, 1)", _one_tensor(Storage("FloatStorage", "0", 6), 0, (2, 3), (-3, 1)), _F6)
_pkl_zip(
    "pkl-negative-offset", "storage_offset -1", _one_tensor(Storage("FloatStorage", "0", 6), -1, (2, 3), (3, 1)), _F6
)
_pkl_zip(
    "pkl-span-past-storage",
    "size (100,) on a 6-element storage",
    _one_tensor(Storage("FloatStorage", "0", 6), 0, (100,), (1,)),
    _F6,
)
_pkl_zip(
    "pkl-offset-past-storage",
    "offset 5, size (2,) on a 6-element storage (ends at element 7)",
    _one_tensor(Storage("FloatStorage", "0", 6), 5, (2,), (1,)),
    _F6,
)
_pkl_zip(
    "pkl-huge-stride",
    "stride (2**40, 1) for a (2, 3) tensor on 6 elements",
    _one_tensor(Storage("FloatStorage", "0", 6), 0, (2, 3), (2**40, 1)),
    _F6,
)
_pkl_zip(
    "pkl-size-stride-rank-mismatch",
    "size (2, 3) with stride (1,)",
    _one_tensor(Storage("FloatStorage", "0", 6), 0, (2, 3), (1,)),
    _F6,
)
_pkl_zip(
    "pkl-size-not-ints", "size ('2', 3.5)", _one_tensor(Storage("FloatStorage", "0", 6), 0, ("2", 3.5), (3, 1)), _F6
)
_pkl_zip(
    "pkl-rebuild-too-few-args",
    "_rebuild_tensor_v2(storage, 0)",
    lambda: dumps(OrderedDict(w=G("torch._utils", "_rebuild_tensor_v2")(Storage("FloatStorage", "0", 6), 0))),
    _F6,
)
_pkl_zip(
    "pkl-rebuild-storage-none",
    "_rebuild_tensor_v2 with None for the storage",
    lambda: dumps(OrderedDict(w=rebuild_tensor(None, 0, (2, 3), (3, 1)))),
)  # type: ignore[arg-type]
_pkl_zip(
    "pkl-storage-two-dtypes",
    "storage '0' used as float32 (6) by 'w' and as int64 (3) by 'v'",
    lambda: dumps(
        OrderedDict(
            w=rebuild_tensor(Storage("FloatStorage", "0", 6), 0, (2, 3), (3, 1)),
            v=rebuild_tensor(Storage("LongStorage", "0", 3), 0, (3,), (1,)),
        )
    ),
    _F6,
)
_pkl_zip(
    "pkl-storage-two-sizes",
    "storage '0' claimed as 6 floats and as 6 doubles (48 bytes; record has 24)",
    lambda: dumps(
        OrderedDict(
            w=rebuild_tensor(Storage("FloatStorage", "0", 6), 0, (2, 3), (3, 1)),
            v=rebuild_tensor(Storage("DoubleStorage", "0", 6), 0, (6,), (1,)),
        )
    ),
    _F6,
)
_pkl_zip(
    "pkl-unicode-key",
    "a key whose BINUNICODE bytes are not UTF-8 (\\xff\\xfe)",
    lambda: dumps(OrderedDict([(Raw(op_str(b"\xff\xfe")), base_state().obj["w"])])),
    lambda: base_state().blobs[:1],
)
_pkl_zip("pkl-unicode-global", "a GLOBAL whose module name is not UTF-8", lambda: b"\x80\x02c\xff\xfe\n\xfd\n.")
_pkl_zip(
    "pkl-unicode-storage-key",
    "a storage key that is not UTF-8",
    _one_tensor(Storage("FloatStorage", Raw(op_str(b"\xc3\x28")), 6), 0, (2, 3), (3, 1)),
    _F6,
)
_pkl_zip(
    "pkl-binunicode-past-end",
    "BINUNICODE claims 2**31 bytes in a 20-byte pickle",
    lambda: b"\x80\x02X" + struct.pack("<I", 2**31) + b"abc.",
)
_pkl_zip("pkl-global-no-newline", "GLOBAL whose name never ends", lambda: b"\x80\x02ctorch\n" + b"A" * 100)

# ---------------- zip-level damage


def _zip_case(
    name: str,
    note: str,
    damage: Callable[[ZipLayout, list[ZipEntry]], bytes | bytearray],
    entries: Callable[[], list[ZipEntry]] | None = None,
) -> None:
    def make(ctx: _Ctx) -> bytes:
        es = entries() if entries is not None else torch_zip_entries(_BASE_PKL, _base_blobs())
        layout = write_zip(es)
        return bytes(damage(layout, es))

    _add(name, "zip-damage", note, ".pt", make)


def _replace_blob(key: str, data: bytes) -> Callable[[], list[ZipEntry]]:
    def entries() -> list[ZipEntry]:
        es = torch_zip_entries(_BASE_PKL, _base_blobs())
        i = _entry_index(es, f"/data/{key}")
        es[i] = ZipEntry(es[i].name, data)
        return es

    return entries


def _without(suffix: str) -> Callable[[], list[ZipEntry]]:
    return lambda: [e for e in torch_zip_entries(_BASE_PKL, _base_blobs()) if not e.name.endswith(suffix)]


_W = pack("FloatStorage", range(6))
_zip_case(
    "zip-record-short",
    "data/0 has 20 bytes, its storage needs 24 (torch mmap=True loads it silently)",
    lambda lay, es: lay.data,
    _replace_blob("0", _W[:20]),
)
_zip_case(
    "zip-record-long",
    "data/0 has 28 bytes, its storage needs 24 (torch mmap=True loads it silently)",
    lambda lay, es: lay.data,
    _replace_blob("0", _W + b"\x00" * 4),
)
_zip_case(
    "zip-record-empty", "data/0 is empty, its storage needs 24 bytes", lambda lay, es: lay.data, _replace_blob("0", b"")
)
_zip_case(
    "zip-missing-record",
    "no data/1 record for a storage the pickle references",
    lambda lay, es: lay.data,
    _without("/data/1"),
)
_zip_case("zip-missing-data-pkl", "no data.pkl record", lambda lay, es: lay.data, _without("/data.pkl"))


def _flip(offset_of: Callable[[ZipLayout, list[ZipEntry]], int], xor: int = 0x01):
    def damage(lay: ZipLayout, es: list[ZipEntry]) -> bytearray:
        lay.data[offset_of(lay, es)] ^= xor
        return lay.data

    return damage


_zip_case(
    "zip-crc-flip-data",
    "one bit flipped in data/0 (CRC-32 mismatch; torch loads a wrong value)",
    _flip(lambda lay, es: lay.payload[_entry_index(es, "/data/0")] + 5),
)
_zip_case(
    "zip-crc-flip-pkl",
    "key 'w' changed to 'v' inside data.pkl (CRC-32 mismatch; torch loads key 'v')",
    _flip(lambda lay, es: lay.payload[0] + _BASE_PKL.index(op_str("w")) + 5, ord("w") ^ ord("v")),
)


def _deflate_bomb(prefix: bytes, gib: int = 1) -> tuple[bytes, int, int]:
    """DEFLATE stream of `prefix` + `gib` GiB of zeros, built chunk by chunk: (stream, size, crc)."""
    chunk = b"\x00" * (1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(prefix + chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    repeat = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush(zlib.Z_FINISH)
    n = gib * 1024
    crc = zlib.crc32(prefix)
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    return first + repeat * (n - 1) + tail, len(prefix) + n * len(chunk), crc & 0xFFFFFFFF


_BOMB: dict[str, tuple[bytes, int, int]] = {}


def _bomb_entries(lie: bool) -> Callable[[], list[ZipEntry]]:
    def entries() -> list[ZipEntry]:
        if "pkl" not in _BOMB:
            _BOMB["pkl"] = _deflate_bomb(_BASE_PKL)
        stream, size, crc = _BOMB["pkl"]
        es = torch_zip_entries(_BASE_PKL, _base_blobs())
        es[0] = ZipEntry(
            es[0].name, stream, crc=_crc(_BASE_PKL) if lie else crc, size=len(_BASE_PKL) if lie else size, method=8
        )
        return es

    return entries


_zip_case(
    "zip-bomb-data-pkl",
    "data.pkl DEFLATE-compressed: ~1 MiB in the file, 1 GiB inflated",
    lambda lay, es: lay.data,
    _bomb_entries(False),
)
_zip_case(
    "zip-bomb-lying-size",
    "as zip-bomb-data-pkl, but the headers claim the 246-byte uncompressed size",
    lambda lay, es: lay.data,
    _bomb_entries(True),
)


def _set_flags(index_suffix: str, bit: int):
    def damage(lay: ZipLayout, es: list[ZipEntry]) -> bytearray:
        i = _entry_index(es, index_suffix)
        for pos in (lay.local[i] + 6, lay.central[i] + 8):
            flags = struct.unpack_from("<H", lay.data, pos)[0] | bit
            struct.pack_into("<H", lay.data, pos, flags)
        return lay.data

    return damage


_zip_case("zip-encrypted-pkl", "the encrypted flag is set on data.pkl", _set_flags("/data.pkl", 0x1))
_zip_case("zip-encrypted-data", "the encrypted flag is set on data/0", _set_flags("/data/0", 0x1))
_zip_case(
    "zip-duplicate-data-record",
    "two members named archive/data/0 with different bytes",
    lambda lay, es: lay.data,
    lambda: (lambda es: es[:5] + [ZipEntry(es[4].name, pack("FloatStorage", [9] * 6))] + es[5:])(
        torch_zip_entries(_BASE_PKL, _base_blobs())
    ),
)
_zip_case(
    "zip-duplicate-data-pkl",
    "two members named archive/data.pkl (the second one a different object)",
    lambda lay, es: lay.data,
    lambda: torch_zip_entries(_BASE_PKL, _base_blobs()) + [ZipEntry("archive/data.pkl", dumps({"x": 1}))],
)


def _patch(pos_of: Callable[[ZipLayout, list[ZipEntry]], int], fmt: str, value: int):
    def damage(lay: ZipLayout, es: list[ZipEntry]) -> bytearray:
        struct.pack_into(fmt, lay.data, pos_of(lay, es), value)
        return lay.data

    return damage


def _multi_patch(lay: ZipLayout, patches: list[tuple[int, str, tuple]]) -> bytearray:
    for pos, fmt, values in patches:
        struct.pack_into(fmt, lay.data, pos, *values)
    return lay.data


def _local_name_differs(lay: ZipLayout, es: list[ZipEntry]) -> bytearray:
    i = _entry_index(es, "/data/0")
    pos = lay.local[i] + 30 + len(es[i].name) - 1
    lay.data[pos] = ord("7")  # local header says data/7, the central directory data/0
    return lay.data


_zip_case(
    "zip-local-cd-name-mismatch",
    "local header names archive/data/7, central directory archive/data/0",
    _local_name_differs,
)
_zip_case(
    "zip-cd-offset-wrong",
    "the central directory's offset for data/0 points at data/1's local header",
    lambda lay, es: _patch(
        lambda lo, e: lo.central[_entry_index(e, "/data/0")] + 42, "<I", lay.local[_entry_index(es, "/data/1")]
    )(lay, es),
)
_zip_case(
    "zip-cd-offset-inside-data",
    "the central directory's offset for data/0 points into tensor bytes",
    lambda lay, es: _patch(
        lambda lo, e: lo.central[_entry_index(e, "/data/0")] + 42, "<I", lay.payload[_entry_index(es, "/data/0")] + 4
    )(lay, es),
)
_zip_case(
    "zip-cd-size-larger",
    "the central directory says data/0 holds 48 bytes; 24 are stored",
    lambda lay, es: _patch(lambda lo, e: lo.central[_entry_index(e, "/data/0")] + 20, "<Q", 48 | (48 << 32))(lay, es),
)
_zip_case(
    "zip-cd-size-past-eof",
    "the central directory says data/0 holds 2**31 bytes",
    lambda lay, es: _patch(lambda lo, e: lo.central[_entry_index(e, "/data/0")] + 20, "<Q", 2**31 | (2**31 << 32))(
        lay, es
    ),
)
_zip_case(
    "zip-local-extra-huge",
    "data/0's local header extra length is 0xFFFF (data offset past the record)",
    _patch(lambda lo, e: lo.local[_entry_index(e, "/data/0")] + 28, "<H", 0xFFFF),
)
_zip_case(
    "zip-method-unknown",
    "data/0 uses compression method 99",
    lambda lay, es: _multi_patch(
        lay,
        [
            (lay.local[_entry_index(es, "/data/0")] + 8, "<H", (99,)),
            (lay.central[_entry_index(es, "/data/0")] + 10, "<H", (99,)),
        ],
    ),
)
_zip_case(
    "zip-cd-truncated",
    "cut in the middle of the central directory",
    lambda lay, es: lay.data[: (lay.cd_start + lay.zip64_eocd) // 2],
)
_zip_case(
    "zip-no-end-records",
    "the zip64 end record, locator and end of central directory are missing",
    lambda lay, es: lay.data[: lay.zip64_eocd],
)
_zip_case(
    "zip-eocd-fewer-entries",
    "the end records claim 3 entries; the central directory has 8",
    lambda lay, es: _multi_patch(lay, [(lay.eocd + 8, "<HH", (3, 3)), (lay.zip64_eocd + 24, "<QQ", (3, 3))]),
)
_zip_case(
    "zip-cd-offset-past-eof",
    "the end records put the central directory past the end of the file",
    lambda lay, es: _multi_patch(
        lay, [(lay.eocd + 16, "<I", (len(lay.data) + 4096,)), (lay.zip64_eocd + 48, "<Q", (len(lay.data) + 4096,))]
    ),
)
_zip_case(
    "zip-multi-disk",
    "the end record claims a multi-disk (spanned) archive",
    lambda lay, es: _multi_patch(
        lay, [(lay.eocd + 4, "<HH", (1, 1)), (lay.zip64_eocd + 16, "<II", (1, 1)), (lay.locator + 16, "<I", (2,))]
    ),
)
_zip_case(
    "zip-prefix-mismatch",
    "data.pkl under archive/, its data records under other/",
    lambda lay, es: lay.data,
    lambda: [
        ZipEntry(e.name.replace("archive/data/", "other/data/"), e.data)
        for e in torch_zip_entries(_BASE_PKL, _base_blobs())
    ],
)
_zip_case(
    "zip-non-utf8-name",
    "data/0's name is not UTF-8 although the UTF-8 flag is set",
    lambda lay, es: _xor_bytes(
        lay, [lay.local[_entry_index(es, "/data/0")] + 30 + 2, lay.central[_entry_index(es, "/data/0")] + 46 + 2], 0x80
    ),
)


def _xor_bytes(lay: ZipLayout, positions: list[int], xor: int) -> bytearray:
    for pos in positions:
        lay.data[pos] ^= xor
    return lay.data


for _pct in (10, 50, 90):
    _zip_case(
        f"zip-truncated-{_pct}pct",
        f"a valid checkpoint cut at {_pct}% of its length",
        lambda lay, es, p=_pct: lay.data[: len(lay.data) * p // 100],
    )
_zip_case("zip-truncated-last-byte", "a valid checkpoint without its last byte", lambda lay, es: lay.data[:-1])
_zip_case(
    "zip-truncated-after-data",
    "cut right after the last local record, before the central directory",
    lambda lay, es: lay.data[: lay.cd_start],
)


def _zip64_cd_offset(lay: ZipLayout, es: list[ZipEntry]) -> bytearray:
    return _multi_patch(lay, [(lay.eocd + 16, "<I", (0xFFFFFFFF,)), (lay.zip64_eocd + 48, "<Q", (2**62,))])


_zip_case("zip64-cd-offset-huge", "the zip64 end record puts the central directory at 2**62", _zip64_cd_offset)
_zip_case(
    "zip64-entries-huge",
    "the zip64 end record claims 2**40 entries",
    lambda lay, es: _multi_patch(
        lay, [(lay.eocd + 8, "<HH", (0xFFFF, 0xFFFF)), (lay.zip64_eocd + 24, "<QQ", (2**40, 2**40))]
    ),
)
_zip_case(
    "zip64-locator-past-eof",
    "the zip64 locator points past the end of the file",
    lambda lay, es: _multi_patch(lay, [(lay.eocd + 16, "<I", (0xFFFFFFFF,)), (lay.locator + 8, "<Q", (2**40,))]),
)
_zip_case(
    "zip64-bad-signature",
    "the zip64 end record's signature is wrong while the end record defers to it",
    lambda lay, es: _multi_patch(
        lay, [(lay.eocd + 16, "<I", (0xFFFFFFFF,)), (lay.zip64_eocd, "<4s", (b"PK\x06\x05",))]
    ),
)


def _zip64_extra_size(lay: ZipLayout, es: list[ZipEntry]) -> bytes:
    # rewrite data/0's central entry: sizes 0xFFFFFFFF and a zip64 extra claiming 2**40 bytes
    i = _entry_index(es, "/data/0")
    data = bytes(lay.data)
    start, end = lay.central[i], lay.central[i + 1]
    entry = bytearray(data[start:end])
    struct.pack_into("<II", entry, 20, 0xFFFFFFFF, 0xFFFFFFFF)
    extra = struct.pack("<HHQQ", 0x0001, 16, 2**40, 2**40)
    struct.pack_into("<H", entry, 30, len(extra))
    entry += extra
    cd = data[lay.cd_start : start] + bytes(entry) + data[end : lay.zip64_eocd]
    out = bytearray(data[: lay.cd_start] + cd)
    z64 = len(out)
    n = len(es)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, len(cd), lay.cd_start)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), lay.cd_start, 0)
    return bytes(out)


_zip_case("zip64-extra-size-huge", "data/0's zip64 extra field claims 2**40 bytes", _zip64_extra_size)


# ---------------- zip ambiguity: files another ZIP reader (or torch) reads differently


def _two_end_records(junk: bytes) -> Callable[[ZipLayout, list[ZipEntry]], bytes]:
    """The real end record points at central directory A; a second one in the archive comment,
    followed by `junk`, points at central directory B, which lists an evil archive/data/0 record
    (stored after the others) in place of the real one. torch takes the last signature: B."""

    def damage(lay: ZipLayout, es: list[ZipEntry]) -> bytes:
        data = bytes(lay.data)
        ends = lay.central[1:] + [lay.zip64_eocd]
        central = [data[a:b] for a, b in zip(lay.central, ends)]
        n, target = len(es) - 1, _entry_index(es, "/data/0")
        cd_a = b"".join(central[:n])
        cd_b = b"".join(central[-1] if i == target else c for i, c in enumerate(central[:n]))
        out = bytearray(data[: lay.cd_start] + cd_b + cd_a)
        a_at, b_at = lay.cd_start + len(cd_b), lay.cd_start
        z64 = len(out)
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, len(cd_a), a_at)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1)
        comment = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd_b), b_at, 0) + junk
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd_a), a_at, len(comment)) + comment
        return bytes(out)

    return damage


def _with_evil_data0(at: int) -> Callable[[], list[ZipEntry]]:
    def entries() -> list[ZipEntry]:
        es = torch_zip_entries(_BASE_PKL, _base_blobs())
        i = _entry_index(es, "/data/0")
        evil = ZipEntry("archive/data/0" if at == 99 else "archive/DATA/0", pack("FloatStorage", [9] * 6))
        es.insert(len(es) if at == 99 else i + at, evil)
        return es

    return entries


def _comment(lay: ZipLayout, comment: bytes) -> bytes:
    struct.pack_into("<H", lay.data, lay.eocd + 20, len(comment))
    return bytes(lay.data) + comment


def _gap_after_cd(lay: ZipLayout, es: list[ZipEntry]) -> bytes:
    junk = b"PK\x01\x02" + bytes(28)
    struct.pack_into("<Q", lay.data, lay.locator + 8, lay.zip64_eocd + len(junk))
    return bytes(lay.data[: lay.zip64_eocd] + junk + lay.data[lay.zip64_eocd :])


_zip_case(
    "zip-two-end-records",
    "a second end-of-central-directory record (and 2 junk bytes) in the archive comment "
    "points at a central directory with another data/0",
    _two_end_records(b"\0\0"),
    _with_evil_data0(99),
)
_zip_case(
    "zip-two-end-records-exact",
    "as zip-two-end-records without the junk: both end records reach the end of the file",
    _two_end_records(b""),
    _with_evil_data0(99),
)
_zip_case(
    "zip-case-variant-after",
    "archive/DATA/0 (other bytes) listed after archive/data/0",
    lambda lay, es: lay.data,
    _with_evil_data0(1),
)
_zip_case(
    "zip-case-variant-before",
    "archive/DATA/0 (other bytes) listed before archive/data/0",
    lambda lay, es: lay.data,
    _with_evil_data0(0),
)
_zip_case(
    "zip-member-outside-folder",
    "a member other/readme.txt beside the archive/ folder (torch refuses it too)",
    lambda lay, es: lay.data,
    lambda: torch_zip_entries(_BASE_PKL, _base_blobs()) + [ZipEntry("other/readme.txt", b"hello\n")],
)
_zip_case(
    "zip-trailing-bytes",
    "two zero bytes after the end-of-central-directory record",
    lambda lay, es: bytes(lay.data) + b"\0\0",
)
_zip_case(
    "zip-end-record-copy-in-comment",
    "the archive comment is a copy of the end-of-central-directory record",
    lambda lay, es: _comment(lay, bytes(lay.data[lay.eocd :])),
)
_zip_case(
    "zip-gap-after-central-directory",
    "32 bytes starting with a central-directory signature between the central directory and the ZIP64 end record",
    _gap_after_cd,
)
_zip_case(
    "zip-end-records-disagree",
    "the 32-bit end record puts the central directory at data.pkl's local header, the ZIP64 one at the real one",
    lambda lay, es: _multi_patch(lay, [(lay.eocd + 16, "<I", (0,))]),
)

# ---------------- legacy-format damage


def _legacy_case(name: str, note: str, make: Callable[[], bytes]) -> None:
    _add(name, "legacy-damage", note, ".pt", lambda ctx: make())


def _legacy_base(**kw: Any) -> bytes:
    sd = base_state(legacy=True)
    return legacy_file(sd.obj, sd.blobs, **kw)


_LEGACY_LEN = len(_legacy_base())
_legacy_case("legacy-truncated-data", "the last storage's bytes are cut short", lambda: _legacy_base()[:-5])
_legacy_case(
    "legacy-truncated-count",
    "cut inside the last storage's int64 element count",
    lambda: _legacy_base()[: _LEGACY_LEN - 24 - 4],
)
for _pct in (10, 50, 90):
    _legacy_case(
        f"legacy-truncated-{_pct}pct",
        f"a valid legacy checkpoint cut at {_pct}%",
        lambda p=_pct: _legacy_base()[: _LEGACY_LEN * p // 100],
    )
_legacy_case(
    "legacy-count-too-big",
    "a storage's element count says 1,000,000 (the pickle says 6)",
    lambda: _legacy_base(counts={str(140_000_000_000_000): 1_000_000}),
)
_legacy_case(
    "legacy-count-too-small",
    "a storage's element count says 3 (the pickle says 6)",
    lambda: _legacy_base(counts={str(140_000_000_000_000): 3}),
)
_legacy_case(
    "legacy-count-negative",
    "a storage's element count is -1",
    lambda: _legacy_base(counts={str(140_000_000_000_000): -1}),
)
_legacy_case("legacy-bad-magic", "the magic number is off by one", lambda: _legacy_base(magic=MAGIC_NUMBER + 1))
_legacy_case("legacy-bad-protocol", "protocol version 1000 instead of 1001", lambda: _legacy_base(protocol=1000))
_legacy_case("legacy-magic-only", "the magic number and nothing else", lambda: dumps(MAGIC_NUMBER))
_legacy_case(
    "legacy-missing-keys",
    "the object pickle with no storage-key list or data after it",
    lambda: _LEGACY_HEAD + dumps(base_state(legacy=True).obj),
)
_LEGACY_HEAD = dumps(MAGIC_NUMBER) + dumps(PROTOCOL_VERSION) + dumps(SYS_INFO)


def _legacy_unknown_key() -> bytes:
    sd = base_state(legacy=True)
    return legacy_file(sd.obj, sd.blobs + [Blob("999", "FloatStorage", 1, pack("FloatStorage", [1]))])


def _legacy_duplicate_key() -> bytes:
    sd = base_state(legacy=True)
    return legacy_of(sd, keys=[sd.blobs[0].key, sd.blobs[0].key, sd.blobs[1].key])


_legacy_case("legacy-unknown-key", "the storage-key list names a key the object never used", _legacy_unknown_key)
_legacy_case("legacy-duplicate-key", "the storage-key list names the same key twice", _legacy_duplicate_key)
_legacy_case(
    "legacy-keys-not-list",
    "the storage-key list is an int",
    lambda: _LEGACY_HEAD + dumps(base_state(legacy=True).obj) + dumps(7),
)


def _legacy_view() -> bytes:
    sd = base_state(legacy=True)
    st = Storage(
        "FloatStorage",
        sd.blobs[0].key,
        6,
        pid_override=("storage", G("torch", "FloatStorage"), sd.blobs[0].key, "cpu", 6, ("view-1", 4, 100)),
    )
    return legacy_file(OrderedDict(w=rebuild_tensor(st, 0, (100,), (1,))), sd.blobs[:1])


_legacy_case("legacy-view-past-storage", "a storage view (offset 4, 100 elements) of a 6-element storage", _legacy_view)


def _legacy_tar_polyglot() -> bytes:
    """sys_info carries a string laid over a tar header's fields, with the right checksum."""
    sd = base_state(legacy=True)
    plain = legacy_of(sd)
    sys_info = {"pad": "A" * 420, **SYS_INFO}  # first, so that it covers bytes 100..345
    data = bytearray(dumps(MAGIC_NUMBER) + dumps(PROTOCOL_VERSION) + dumps(sys_info) + plain[len(_LEGACY_HEAD) :])
    data[100:148] = bytes(48)  # mode, uid, gid, size, mtime: empty
    data[156:157] = b"0"  # a regular file
    data[157:345] = bytes(188)  # no link, user or group names, no device numbers
    data[148:156] = b"%06o\0 " % (256 + sum(data[:148]) + sum(data[156:512]))
    return bytes(data)


_legacy_case(
    "legacy-tar-polyglot",
    "a legacy file whose first 512 bytes are also a valid tar header (torch.load tries the tar format first)",
    _legacy_tar_polyglot,
)

# ---------------- safetensors damage


def _st(name: str, note: str, make: Callable[[], bytes]) -> None:
    _add(name, "safetensors-damage", note, ".safetensors", lambda ctx: make())


_W24 = pack("FloatStorage", range(6))


def _st_header(header: dict[str, Any] | bytes, data: bytes = _W24, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return safetensors_raw(raw, data, header_len)


def _t(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [2, 3] if shape is None else shape, "data_offsets": offsets or [0, 24]}


_st(
    "st-header-past-eof",
    "the header length (1,000,000) runs past the end of the file",
    lambda: _st_header({"w": _t()}, header_len=1_000_000),
)
_st(
    "st-header-huge",
    "the header length claims 200 MB (over the format's 100 MB limit)",
    lambda: _st_header({"w": _t()}, header_len=200_000_000),
)
_st("st-header-len-2-63", "the header length is 2**63 - 1", lambda: _st_header({"w": _t()}, header_len=2**63 - 1))
_st("st-header-len-zero", "the header length is 0", lambda: _st_header({"w": _t()}, header_len=0))
_st("st-shorter-than-length", "a 5-byte file (shorter than the 8-byte header length)", lambda: b"\x10\x00\x00\x00\x00")
_st("st-invalid-json", "the header is truncated JSON", lambda: _st_header(b'{"w":{"dtype":"F32","shape":[2,3],"data_'))
_st("st-json-not-object", "the header is a JSON list", lambda: _st_header(b"[1, 2, 3]"))
_st("st-header-not-utf8", "the header is not UTF-8", lambda: _st_header(b'{"\xff\xfe":{}}'))
_st(
    "st-duplicate-names",
    "the header names tensor 'w' twice, as float32 [2, 3] then int32 [6] (the library keeps the last)",
    lambda: _st_header(
        b'{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},'
        b'"w":{"dtype":"I32","shape":[6],"data_offsets":[0,24]}}'
    ),
)
_st(
    "st-overlap",
    "two tensors share bytes 8..16",
    lambda: _st_header({"a": _t(shape=[4], offsets=[0, 16]), "b": _t(shape=[4], offsets=[8, 24])}),
)
_st(
    "st-gap",
    "bytes 8..16 belong to no tensor",
    lambda: _st_header({"a": _t(shape=[2], offsets=[0, 8]), "b": _t(shape=[2], offsets=[16, 24])}),
)
_st("st-trailing-bytes", "16 bytes after the last tensor", lambda: _st_header({"w": _t()}, _W24 + b"\x00" * 16))
_st(
    "st-unknown-dtype",
    "dtype 'F128'",
    lambda: _st_header({"w": _t(dtype="F128", shape=[3], offsets=[0, 48])}, _W24 + b"\x00" * 24),
)
_st(
    "st-shape-offset-mismatch",
    "shape [2, 3] float32 needs 24 bytes; offsets span 20",
    lambda: _st_header({"w": _t(offsets=[0, 20])}, _W24[:20]),
)
_st("st-offsets-past-eof", "offsets [0, 24] but only 16 data bytes", lambda: _st_header({"w": _t()}, _W24[:16]))
_st("st-offsets-reversed", "data_offsets [24, 0]", lambda: _st_header({"w": _t(offsets=[24, 0])}))
_st("st-negative-shape", "shape [-1, 6]", lambda: _st_header({"w": _t(shape=[-1, 6])}))
_st("st-huge-shape", "shape [2**40, 2**40]: numel overflows int64", lambda: _st_header({"w": _t(shape=[2**40, 2**40])}))
_st("st-metadata-not-strings", "__metadata__ maps to an int", lambda: _st_header({"__metadata__": {"a": 1}, "w": _t()}))
_st("st-tensor-not-object", "a tensor entry that is a string", lambda: _st_header({"w": "F32"}))
_st(
    "st-truncated-last-byte",
    "a valid safetensors file without its last byte",
    lambda: safetensors_file([("w", "F32", [2, 3], _W24)])[:-1],
)
