"""The torch-free reader: every zoo file reads exactly as torch.load(weights_only=True) sees it,
and every kind of broken, hostile or unsupported file is refused with the right error."""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from zoo import (
    LEGACY_DTYPES,
    ZOO,
    StorageRef,
    TensorSpec,
    build,
    build_zoo,
    craft_zip,
    dtype_tensors,
    pickle_bytes,
    torch_zip,
)

from ckptsurgeon.engine.data import iter_chunks, read_bytes, verify_crc
from ckptsurgeon.engine.meta import DTYPE_ITEMSIZE, TensorMeta, TorchDevice, TorchDtype, TorchSize
from ckptsurgeon.engine.pickle_globals import TORCH_WEIGHTS_ONLY_GLOBALS
from ckptsurgeon.engine.read import read_checkpoint
from ckptsurgeon.errors import BadCheckpointError, EngineUnsupported, UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def torch_load(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")


def storage_bytes(t: torch.Tensor) -> bytes:
    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(s).numpy().tobytes()


class Comparer:
    """Recursively checks that the engine's graph matches torch's, including which objects and
    storages are shared."""

    def __init__(self) -> None:
        self.same_object: dict[int, int] = {}
        self.storage_to_ptr: dict[tuple[str, str], int] = {}
        self.ptr_to_storage: dict[int, tuple[str, str]] = {}
        self.tensors = 0

    def check(self, ours: Any, theirs: Any, where: str = "obj") -> None:
        if isinstance(theirs, (torch.Tensor, dict, list, set)):
            # shared references stay shared (a tied weight is one object, in torch and here)
            assert self.same_object.setdefault(id(theirs), id(ours)) == id(ours), where
        if isinstance(theirs, torch.Tensor):
            self.check_tensor(ours, theirs, where)
        elif isinstance(theirs, torch.Size):
            assert type(ours) is TorchSize and tuple(ours) == tuple(theirs), where
        elif isinstance(theirs, torch.device):
            assert ours == TorchDevice(str(theirs)), where
        elif isinstance(theirs, torch.dtype):
            assert ours == TorchDtype(str(theirs).removeprefix("torch.")), where
        elif isinstance(theirs, dict):
            assert type(ours) is type(theirs), where
            assert list(ours) == list(theirs), where
            assert hasattr(ours, "_metadata") == hasattr(theirs, "_metadata"), where
            if hasattr(theirs, "_metadata"):
                self.check(ours._metadata, theirs._metadata, f"{where}._metadata")
            for key in theirs:
                self.check(ours[key], theirs[key], f"{where}[{key!r}]")
        elif isinstance(theirs, (list, tuple)):
            assert type(ours) is type(theirs) and len(ours) == len(theirs), where
            for i, (a, b) in enumerate(zip(ours, theirs)):
                self.check(a, b, f"{where}[{i}]")
        else:
            assert type(ours) is type(theirs) and ours == theirs, where

    def check_tensor(self, ours: Any, t: torch.Tensor, where: str) -> None:
        self.tensors += 1
        assert type(ours) is TensorMeta, where
        assert ours.shape == tuple(t.shape), where
        assert ours.stride == t.stride(), where
        assert ours.storage_offset == t.storage_offset(), where
        assert ours.dtype == str(t.dtype).removeprefix("torch."), where
        assert ours.requires_grad == t.requires_grad, where
        assert ours.is_parameter == isinstance(t, torch.nn.Parameter), where
        storage = ours.storage
        assert storage.nbytes == t.untyped_storage().nbytes(), where
        raw = storage_bytes(t)
        assert read_bytes(storage, 0, storage.nbytes) == raw, where
        start, end = ours.span
        assert read_bytes(storage, start, end) == raw[start:end], where
        if storage.nbytes:  # one engine storage <-> one torch storage
            ptr = t.untyped_storage().data_ptr()
            assert self.storage_to_ptr.setdefault(storage.identity, ptr) == ptr, where
            assert self.ptr_to_storage.setdefault(ptr, storage.identity) == storage.identity, where


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_file_reads_as_torch_loads_it(zoo: dict[str, Path], name: str) -> None:
    path = zoo[name]
    ckpt = read_checkpoint(path)
    expected_format = (
        "safetensors" if name == "safetensors" else "torch-legacy" if name.startswith("legacy") else "torch-zip"
    )
    assert ckpt.format == expected_format
    assert ckpt.path == str(path.resolve())
    comparer = Comparer()
    theirs = torch_load(path)
    if ckpt.format == "safetensors":
        assert type(ckpt.obj) is collections.OrderedDict
        assert list(ckpt.obj) == list(theirs)  # load_file's order: by data offset
        theirs = collections.OrderedDict(theirs)
    comparer.check(ckpt.obj, theirs)
    assert comparer.tensors > 0


def test_zoo_storages_carry_location_crc_and_record(zoo: dict[str, Path]) -> None:
    ckpt = read_checkpoint(zoo["cuda_location"])
    storages = ckpt.extras["storages"]
    assert [s.location for s in storages.values()] == ["cuda:0", "cuda:0"]
    with zipfile.ZipFile(zoo["cuda_location"]) as zf:
        for key, s in storages.items():
            info = zf.getinfo(f"cuda_location/data/{key}")
            assert s.record_name == info.filename and s.crc32 == info.CRC
            assert read_bytes(s, 0, s.nbytes) == zf.read(info)
            verify_crc(s)  # the stored CRC is the record's
    legacy = read_checkpoint(zoo["legacy_cuda_location"])
    assert {s.location for s in legacy.extras["storages"].values()} == {"cuda:0"}
    assert all(s.crc32 is None for s in legacy.extras["storages"].values())


def test_tied_storages_are_one_object(zoo: dict[str, Path]) -> None:
    for name in ("tied", "legacy_views"):
        obj = read_checkpoint(zoo[name]).obj
        assert obj["encoder.weight"] is obj["decoder.weight"]
        assert obj["first_row"].storage is obj["encoder.weight"].storage
        assert obj["other"].storage is not obj["encoder.weight"].storage


def test_module_metadata_matches_torch(zoo: dict[str, Path]) -> None:
    sd = read_checkpoint(zoo["module"]).obj
    assert sd._metadata == {
        "": {"version": 1},
        "conv": {"version": 1},
        "bn": {"version": 2},
        "head": {"version": 1},
        "head.0": {"version": 1},
        "head.1": {"version": 1},
    }
    assert sd._metadata == torch.load(zoo["module"], weights_only=True)._metadata


def test_format_is_decided_by_content_not_suffix(zoo: dict[str, Path], tmp_path: Path) -> None:
    swapped_st = tmp_path / "model.pt"
    swapped_st.write_bytes(zoo["safetensors"].read_bytes())
    swapped_pt = tmp_path / "model.safetensors"
    swapped_pt.write_bytes(zoo["tied"].read_bytes())
    assert read_checkpoint(swapped_st).format == "safetensors"
    assert read_checkpoint(swapped_pt).format == "torch-zip"


def test_safetensors_metadata_and_zero_copy_offsets(zoo: dict[str, Path]) -> None:
    ckpt = read_checkpoint(zoo["safetensors"])
    assert ckpt.metadata == {"format": "pt", "note": "zoo"}
    theirs = load_file(str(zoo["safetensors"]))
    for name, meta in ckpt.obj.items():
        assert meta.is_contiguous and meta.storage.key == name
        assert read_bytes(meta.storage, 0, meta.storage.nbytes) == storage_bytes(theirs[name])


def test_weights_only_allowlist_mirrors_torch() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    assert TORCH_WEIGHTS_ONLY_GLOBALS == set(_get_allowed_globals())


def test_reading_never_imports_torch(zoo: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from ckptsurgeon.engine.read import read_checkpoint\n"
        "from ckptsurgeon.engine.data import read_bytes, verify_crc\n"
        "for p in sys.argv[1:]:\n"
        "    ckpt = read_checkpoint(p)\n"
        "    for s in ckpt.extras.get('storages', {}).values():\n"
        "        read_bytes(s, 0, s.nbytes); verify_crc(s)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'safetensors')))\n"
    )
    files = [str(zoo[n]) for n in ("training", "legacy_training", "safetensors")]
    out = subprocess.run([sys.executable, "-c", code, *files], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- data access ---------------------------------------------------------------------------


def test_crc_mismatch_is_caught_when_streaming(zoo: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "tied.pt"
    path.write_bytes(zoo["tied"].read_bytes())
    storage = read_checkpoint(path).obj["encoder.weight"].storage
    with open(path, "r+b") as f:  # flip one byte of the weight's data
        f.seek(storage.data_offset + 5)
        byte = f.read(1)
        f.seek(storage.data_offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    ckpt = read_checkpoint(path)  # metadata is intact
    storage = ckpt.obj["encoder.weight"].storage
    with pytest.raises(BadCheckpointError, match=r"CRC-32 mismatch in record tied/data/0"):
        verify_crc(storage)
    with pytest.raises(BadCheckpointError, match="CRC-32 mismatch"):
        for _ in iter_chunks(storage, 0, storage.nbytes, chunk_size=7):
            pass
    partial = b"".join(bytes(c) for c in iter_chunks(storage, 4, storage.nbytes, chunk_size=7))
    assert partial == read_bytes(storage, 4, storage.nbytes)  # a partial read is not checked
    verify_crc(ckpt.obj["other"].storage)
    with pytest.raises(ValueError, match="outside storage"):
        read_bytes(storage, 0, storage.nbytes + 1)


def test_iter_chunks_covers_the_span_in_order(zoo: dict[str, Path]) -> None:
    obj = read_checkpoint(zoo["views"]).obj
    storage = obj["base"].storage
    chunks = [bytes(c) for c in iter_chunks(storage, 3, 90, chunk_size=10)]
    assert [len(c) for c in chunks] == [10] * 8 + [7]
    assert b"".join(chunks) == storage_bytes(torch.arange(24, dtype=torch.float32))[3:90]


# -- zip64 -----------------------------------------------------------------------------------


def _local(name: bytes, data: bytes, zip64: bool) -> bytes:
    extra = struct.pack("<HHQQ", 1, 16, len(data), len(data)) if zip64 else b""
    size = 0xFFFFFFFF if zip64 else len(data)
    return (
        struct.pack("<4s5H3I2H", b"PK\x03\x04", 45, 0x800, 0, 0, 0, zlib.crc32(data), size, size, len(name), len(extra))
        + name
        + extra
    )


def _central(name: bytes, data: bytes, offset: int) -> bytes:
    extra = struct.pack("<HHQ", 1, 8, offset) if offset >= 0xFFFFFFFF else b""
    return (
        struct.pack(
            "<4s6H3I5H2I",
            b"PK\x01\x02",
            45,
            45,
            0x800,
            0,
            0,
            0,
            zlib.crc32(data),
            len(data),
            len(data),
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            min(offset, 0xFFFFFFFF),
        )
        + name
        + extra
    )


def write_sparse_zip64(path: Path, far: int) -> bytes:
    """A checkpoint whose only storage record starts `far` bytes into a sparse file."""
    data = struct.pack("<4f", 1.5, -2.0, 3.25, 4.0)
    pkl = pickle_bytes({"w": TensorSpec(StorageRef(torch.FloatStorage, "0", 4), (2, 2), (2, 1))})
    members = [(b"archive/data.pkl", pkl, 0, False), (b"archive/data/0", data, far, True)]
    with open(path, "wb") as f:
        for name, body, offset, zip64 in members:
            f.seek(offset)
            f.write(_local(name, body, zip64) + body)
        cd_offset = f.tell()
        cd = b"".join(_central(name, body, offset) for name, body, offset, _ in members)
        f.write(cd)
        eocd64 = f.tell()
        f.write(struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 2, 2, len(cd), cd_offset))
        f.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
        f.write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 2, 2, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    return data


def test_zip64_record_past_4_gib(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    far = (5 << 30) + 3
    data = write_sparse_zip64(path, far)
    with zipfile.ZipFile(path) as zf:  # the hand-made file is a valid ZIP64 archive
        assert zf.read("archive/data/0") == data
    w = read_checkpoint(path).obj["w"]
    assert w.storage.data_offset > 1 << 32
    assert (w.shape, w.stride, w.dtype) == ((2, 2), (2, 1), "float32")
    assert read_bytes(w.storage, 0, 16) == data
    verify_crc(w.storage)


# -- broken zip files ------------------------------------------------------------------------


def float_spec(key: str = "0", numel: int = 6, **kw: Any) -> TensorSpec:
    kw.setdefault("size", (numel,))
    kw.setdefault("stride", (1,))
    return TensorSpec(StorageRef(torch.FloatStorage, key, numel), **kw)


def test_crafted_zip_control_reads_like_torch(tmp_path: Path) -> None:
    path = torch_zip(
        tmp_path / "ok.pt",
        {"a": float_spec(size=(2, 3), stride=(3, 1)), "b": float_spec(size=(2,), stride=(2,), offset=1)},
        {"0": struct.pack("<6f", *range(6))},
    )
    ours = read_checkpoint(path).obj
    theirs = torch.load(path, weights_only=True)
    Comparer().check(ours, theirs)
    assert theirs["b"].tolist() == [1.0, 3.0]


def refused(path: Path, match: str, error: type[Exception] = BadCheckpointError) -> str:
    with pytest.raises(error, match=match) as info:
        read_checkpoint(path)
    message = str(info.value)
    if issubclass(error, BadCheckpointError):
        assert str(path) in message and "\n" not in message
    return message


def test_record_size_must_equal_storage_size(tmp_path: Path) -> None:
    short = torch_zip(tmp_path / "short.pt", {"a": float_spec()}, {"0": bytes(20)})
    refused(short, r"record archive/data/0 holds 20 bytes but storage '0' needs 24")
    long = torch_zip(tmp_path / "long.pt", {"a": float_spec()}, {"0": bytes(28)})
    refused(long, r"holds 28 bytes but storage '0' needs 24")


def test_numel_larger_than_the_record_is_refused(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "huge.pt", {"a": float_spec(numel=10**15, size=(10**15,))}, {"0": bytes(24)})
    refused(path, r"holds 24 bytes but storage '0' needs 4000000000000000")


def test_one_storage_with_two_dtypes(tmp_path: Path) -> None:
    obj = {"f": float_spec(), "i": TensorSpec(StorageRef(torch.IntStorage, "0", 6), (6,), (1,))}
    path = torch_zip(tmp_path / "two.pt", obj, {"0": bytes(24)})
    refused(path, r"storage '0' is referenced as both float32 and int32")
    torch.load(path, weights_only=True)  # torch accepts it


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (dict(size=(4,), offset=3), r"spans bytes \[12, 28\) of storage '0', which holds 24"),
        (dict(size=(3, 2), stride=(2, 2)), r"spans bytes \[0, 28\)"),
        (dict(size=(-1,)), r"negative size"),
        (dict(size=(2,), stride=(-1,)), r"negative stride"),
        (dict(size=(2,), offset=-1), r"storage offset -1"),
        (dict(size=(2, 3), stride=(1,)), r"2 sizes but 1 strides"),
    ],
)
def test_tensor_geometry_is_validated(tmp_path: Path, spec: dict, match: str) -> None:
    path = torch_zip(tmp_path / "geo.pt", {"a": float_spec(**spec)}, {"0": bytes(24)})
    refused(path, match)


def test_missing_storage_record(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "missing.pt", {"a": float_spec(key="7")}, {"0": bytes(24)})
    refused(path, r"storage '7' has no record data/7")


def test_compressed_member_is_refused(tmp_path: Path) -> None:
    members = [("archive/data.pkl", pickle_bytes({"a": float_spec()})), ("archive/data/0", bytes(24))]
    path = craft_zip(tmp_path / "deflate.pt", members, compress={"archive/data.pkl"})
    refused(path, r"ZIP member 'archive/data.pkl' is compressed \(method 8\)")


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    members = [
        ("archive/data.pkl", pickle_bytes({"a": float_spec()})),
        ("archive/data/0", bytes(24)),
        ("archive/data/0", b"\x01" * 24),
    ]
    refused(craft_zip(tmp_path / "dup.pt", members), r"duplicate ZIP member 'archive/data/0'")


def _central_offset(raw: bytes, name: str) -> int:
    return raw.rindex(name.encode()) - 46


def test_encrypted_member_is_refused(zoo: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(zoo["tied"].read_bytes())
    raw[_central_offset(raw, "tied/data/1") + 8] |= 1
    path = tmp_path / "tied.pt"
    path.write_bytes(raw)
    refused(path, r"ZIP member 'tied/data/1' is encrypted")


def test_local_header_must_name_the_member(zoo: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(zoo["tied"].read_bytes())
    with zipfile.ZipFile(zoo["tied"]) as zf:
        offset = zf.getinfo("tied/data/0").header_offset
    raw[offset + 30 + len("tied/data/")] = ord("9")
    path = tmp_path / "tied.pt"
    path.write_bytes(raw)
    refused(path, r"local ZIP header of 'tied/data/0' names a different member")


def test_local_header_size_must_match(tmp_path: Path) -> None:
    path = torch_zip(tmp_path / "local.pt", {"a": float_spec()}, {"0": bytes(24)})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo("archive/data/0").header_offset
    struct.pack_into("<I", raw, offset + 22, 25)  # uncompressed size in the local header
    path.write_bytes(raw)
    refused(path, r"local ZIP header of 'archive/data/0' gives size 25")


def test_data_descriptor_must_match(zoo: dict[str, Path], tmp_path: Path) -> None:
    ckpt = read_checkpoint(zoo["tied"])
    storage = ckpt.extras["storages"]["1"]
    raw = bytearray(zoo["tied"].read_bytes())
    end = storage.data_offset + storage.nbytes
    assert raw[end : end + 4] == b"PK\x07\x08"
    raw[end + 4] ^= 0xFF  # the CRC in the data descriptor
    path = tmp_path / "tied.pt"
    path.write_bytes(raw)
    refused(path, r"data descriptor of ZIP member 'tied/data/1' disagrees")


def test_data_pkl_crc_is_checked(zoo: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(zoo["tied"].read_bytes())
    at = raw.index(b"encoder.weight")
    raw[at] = ord("E")
    path = tmp_path / "tied.pt"
    path.write_bytes(raw)
    refused(path, r"CRC-32 mismatch in record tied/data.pkl")


def test_data_pkl_size_claims_are_checked(zoo: dict[str, Path], tmp_path: Path) -> None:
    raw = bytearray(zoo["tied"].read_bytes())
    central = _central_offset(raw, "tied/data.pkl")
    for field in (20, 24):  # compressed and uncompressed size
        struct.pack_into("<I", raw, central + field, 10**8)
    path = tmp_path / "tied.pt"
    path.write_bytes(raw)
    refused(path, r"ZIP member 'tied/data.pkl' overlaps the next member")
    cut = torch_zip(tmp_path / "cut.pt", {"a": float_spec()}, {"0": bytes(24)})
    members = [("archive/data.pkl", pickle_bytes({"a": 1})[:-1])]
    refused(craft_zip(cut, members), r"data.pkl is truncated")


def test_truncated_file(zoo: dict[str, Path], tmp_path: Path) -> None:
    raw = zoo["training"].read_bytes()
    for keep in (len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"cut{keep}.pt"
        path.write_bytes(raw[:keep])
        refused(path, r"truncated or not a ZIP archive")


def test_byteorder(tmp_path: Path) -> None:
    def with_order(order: bytes) -> Path:
        members = [
            ("archive/data.pkl", pickle_bytes({"a": float_spec()})),
            ("archive/byteorder", order),
            ("archive/data/0", bytes(24)),
        ]
        return craft_zip(tmp_path / f"{order.decode()}.pt", members)

    with pytest.raises(EngineUnsupported, match="big-endian"):
        read_checkpoint(with_order(b"big"))
    refused(with_order(b"middle"), r"unknown byteorder record b'middle'")
    assert read_checkpoint(with_order(b"little")).obj["a"].shape == (6,)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    refused(path, r"a TorchScript archive, not a checkpoint; ckptsurgeon never calls torch.jit.load")


# -- hostile pickles ---------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func: Any, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


class Net:  # pickled as __main__.Net below
    pass


def test_unsafe_globals_are_all_listed_and_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    Net.__module__ = "__main__"
    monkeypatch.setattr(sys.modules["__main__"], "Net", Net, raising=False)
    obj = {
        "args": argparse.Namespace(lr=0.1),
        "array": np.arange(3),
        "model": Net(),
        "evil": _Reduce(os.system, (f"touch {marker}",)),
        "w": torch.ones(2),
    }
    path = tmp_path / "hostile.pt"
    torch.save(obj, path)
    message = refused(path, r"refused to unpickle", UnsafeCheckpointError)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    expected = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert {"argparse.Namespace", "__main__.Net", "posix.system"} <= expected
    assert set(info.value.globals) == expected
    assert "posix.system" in message and not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        read_checkpoint(path, allow_globals=frozenset(expected))  # os/posix are never allowed
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)


def test_whole_module_pickles_are_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert "torch.nn.modules.linear.Linear" in info.value.globals
    assert set(info.value.globals) == set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def test_allowlisted_globals_defer_to_torch(tmp_path: Path) -> None:
    path = tmp_path / "args.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert info.value.globals == ["argparse.Namespace"]
    with pytest.raises(EngineUnsupported, match="argparse.Namespace"):
        read_checkpoint(path, allow_globals=frozenset({"argparse.Namespace"}))


def test_empty_bytes_are_refused_as_torch_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "empty_bytes.pt"
    torch.save({"blob": b"", "w": torch.ones(1)}, path)  # protocol 2 pickles b"" as builtins.bytes()
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert info.value.globals == ["builtins.bytes"]
    with pytest.raises(pickle.UnpicklingError, match="builtins.bytes|GLOBAL bytes"):
        torch.load(path, weights_only=True)


def test_unsafe_globals_in_legacy_files(tmp_path: Path) -> None:
    path = tmp_path / "legacy_args.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert info.value.globals == ["argparse.Namespace"]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (_Reduce(bytearray, (10**12,)), r"refused builtins.bytearray\(1000000000000\)"),
        (_Reduce(torch.Tensor, (10**12,)), r"refused torch.Tensor\(1000000000000\)"),
        (_Reduce(torch.FloatStorage, (10**12,)), r"refused torch.FloatStorage\(1000000000000\)"),
    ],
)
def test_allocating_constructors_are_refused(tmp_path: Path, value: Any, match: str) -> None:
    path = torch_zip(tmp_path / "bomb.pt", {"x": value}, {})
    refused(path, match)


def test_deep_nesting_and_reference_bombs(tmp_path: Path) -> None:
    deep = b"\x80\x02" + b"]" * 1200 + b"a" * 1199 + b"."
    refused(craft_zip(tmp_path / "deep.pt", [("archive/data.pkl", deep)]), r"nested more than 1000 deep")
    ok = b"\x80\x02" + b"]" * 900 + b"a" * 899 + b"."
    assert type(read_checkpoint(craft_zip(tmp_path / "ok.pt", [("archive/data.pkl", ok)])).obj) is list
    bomb: list = [1]
    for _ in range(80):
        bomb = [bomb, bomb]
    path = torch_zip(tmp_path / "dag.pt", bomb, {})
    assert path.stat().st_size < 4096
    refused(path, r"shared references expand the object graph")
    key = b"K\x01" + b"\x85" * 200_000  # a 200,000-deep tuple: hashing it overflows the C stack
    crash = b"\x80\x02}" + key + b"K\x02s."
    refused(craft_zip(tmp_path / "hash.pt", [("archive/data.pkl", crash)]), r"key or set member nested more")
    chained = (
        b"\x80\x02}"
        + b"".join(  # many keys, each 900 deeper than the last
            b"h\x00" * (i > 0) + b"K\x01" * (i == 0) + b"\x85" * 900 + b"q\x00K\x00s" for i in range(50)
        )
        + b"."
    )
    refused(craft_zip(tmp_path / "chain.pt", [("archive/data.pkl", chained)]), r"key or set member nested more")
    loop: list = []
    loop.append(loop)
    with pytest.raises(EngineUnsupported, match="contains itself"):
        read_checkpoint(torch_zip(tmp_path / "loop.pt", loop, {}))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x80\x02]q\x00(K\x01K\x02u.", r"SETITEMS on a list"),
        (b"\x80\x02K\x01]a.", r"APPEND on a int"),
        (b"\x80\x02h\x05.", r"memo reference 5 that was never stored"),
        (b"\x80\x02t.", r"stack underflow"),
        (b"\x80\x02K\x01Q.", r"persistent id of type int"),
        (b"\x80\x02X\x04\x00\x00\x00fileK\x01\x86Q.", r"persistent id of kind 'file'"),
        (b"\x80\x02}K\x01b.", r"BUILD on a dict"),
        (b"\x80\x02S'x'\n.", r"unsupported pickle opcode 0x53 \(STRING\)"),
        (b"\x80\x02X\xff\xff\xff\x00ab.", r"data.pkl is truncated"),
    ],
)
def test_malformed_pickles(tmp_path: Path, data: bytes, match: str) -> None:
    refused(craft_zip(tmp_path / "bad.pt", [("archive/data.pkl", data)]), match)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_corrupted_files_only_raise_checkpoint_errors(zoo: dict[str, Path], data: st.DataObject) -> None:
    """Whatever the damage, reading ends in a result or one of our errors, never in the
    IndexError / KeyError / struct.error / UnicodeDecodeError that torch leaks."""
    name = data.draw(st.sampled_from(sorted(ZOO)))
    raw = bytearray(zoo[name].read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, min(len(raw), 4096) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    path = zoo[name].parent / f"fuzz-{name}"
    path.write_bytes(raw)
    try:
        ckpt = read_checkpoint(path)
    except (BadCheckpointError, EngineUnsupported):
        return
    for storage in ckpt.extras.get("storages", {}).values():  # whatever was accepted is readable
        read_bytes(storage, 0, storage.nbytes)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_pickle_protocol_4_is_refused_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=4)
    refused(path, r"unsupported pickle opcode 0x95 \(FRAME\)")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


# -- valid, but not modelled ------------------------------------------------------------------


def _with_attr(t: torch.Tensor) -> torch.Tensor:
    t.note = "hello"
    return t


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.quint8), "_rebuild_qtensor"),
        (lambda: torch.eye(3).to_sparse(), "torch.serialization._get_layout"),
        (lambda: torch.tensor([1 + 1j]).conj(), r"conj/neg"),
        (lambda: torch.tensor([1j]).conj().imag, r"conj/neg"),
        (lambda: _with_attr(torch.nn.Parameter(torch.ones(2))), "_rebuild_parameter_with_state"),
        (lambda: _with_attr(torch.ones(2)), "_rebuild_from_type_v2"),
        (lambda: collections.Counter("aab"), "collections.Counter"),
        (lambda: bytearray(b"ab"), "builtins.bytearray"),
        (lambda: 1 + 2j, "builtins.complex"),
        (lambda: torch.ones(2).untyped_storage(), "bare storage"),
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_valid_but_unmodelled_values_defer_to_torch(tmp_path: Path, make: Any, match: str) -> None:
    path = tmp_path / "unmodelled.pt"
    torch.save({"x": make()}, path)
    torch.load(path, weights_only=True)  # torch reads it
    with pytest.raises(EngineUnsupported, match=match):
        read_checkpoint(path)


# -- legacy format --------------------------------------------------------------------------


def test_legacy_new_dtypes_read_although_torch_cannot(tmp_path: Path) -> None:
    tensors = {k: v for k, v in dtype_tensors().items() if k not in LEGACY_DTYPES}
    path = tmp_path / "legacy_new.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    with pytest.raises(AttributeError, match="UntypedStorage"):
        torch.load(path, weights_only=True)
    obj = read_checkpoint(path).obj
    assert set(obj) == {"float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"}
    for name, t in tensors.items():
        meta = obj[name]
        assert (meta.dtype, meta.shape, meta.storage.dtype) == (name, tuple(t.shape), "uint8")
        assert read_bytes(meta.storage, *meta.span) == storage_bytes(t)


def test_legacy_validation(zoo: dict[str, Path], tmp_path: Path) -> None:
    raw = zoo["legacy_views"].read_bytes()
    ckpt = read_checkpoint(zoo["legacy_views"])
    first = min(ckpt.extras["storages"].values(), key=lambda s: s.data_offset)
    count_at = first.data_offset - 8
    itemsize = DTYPE_ITEMSIZE[first.dtype]
    assert struct.unpack_from("<q", raw, count_at)[0] * itemsize == first.nbytes

    def variant(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    wrong = bytearray(raw)
    struct.pack_into("<q", wrong, count_at, first.nbytes // itemsize + 1)
    refused(variant("count.pt", bytes(wrong)), r"holds \d+ elements but is pickled with \d+")
    refused(variant("trailing.pt", raw + b"x"), r"1 unexpected bytes after the last storage")
    refused(variant("cut.pt", raw[:-1]), r"truncated: storage '\d+' extends past the end")
    refused(variant("cut_pickle.pt", raw[:200]), r"truncated")


# -- safetensors ----------------------------------------------------------------------------


def st_file(path: Path, header: bytes | dict, data: bytes) -> Path:
    if isinstance(header, dict):
        import json

        header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def u8(begin: int, end: int) -> dict:
    return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "size", "match"),
    [
        (
            b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "a": {"dtype": "U8", '
            b'"shape": [2], "data_offsets": [0, 2]}}',
            2,
            r"the name 'a' appears twice",
        ),
        ({"a": u8(0, 2), "b": u8(1, 3)}, 3, r"tensor 'b' at bytes \[1, 3\) overlaps"),
        ({"a": u8(0, 2), "b": u8(3, 4)}, 4, r"tensor 'b' at bytes \[3, 4\) leaves a gap"),
        ({"a": u8(0, 2)}, 3, r"1 bytes after the last tensor"),
        ({"a": u8(0, 2)}, 1, r"truncated safetensors file"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, r"needs 12 bytes"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, 1, r"unknown dtype 'X9'"),
        ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, 0, r"has shape \[-1\]"),
        ({"__metadata__": {"k": 1}, "a": u8(0, 1)}, 1, r"__metadata__ must map strings to strings"),
        (b'{"a": [}', 0, r"invalid JSON"),
    ],
)
def test_safetensors_validation(tmp_path: Path, header: Any, size: int, match: str) -> None:
    refused(st_file(tmp_path / "x.safetensors", header, bytes(size)), match)


def test_safetensors_limits_and_unmodelled_dtypes(tmp_path: Path) -> None:
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:  # sparse: the header length alone is over the limit
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(100_000_001 + 8)
    refused(huge, r"header of 100000001 bytes exceeds the 100000000 limit")
    f4 = st_file(tmp_path / "f4.safetensors", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(EngineUnsupported, match="F4"):
        read_checkpoint(f4)
    empty = st_file(tmp_path / "empty.safetensors", {}, b"")
    assert read_checkpoint(empty).obj == collections.OrderedDict() and load_file(str(empty)) == {}


def test_safetensors_key_order_is_data_order(tmp_path: Path) -> None:
    path = tmp_path / "order.safetensors"
    save_file(
        {"zeta": torch.zeros(3, dtype=torch.int8), "alpha": torch.ones(2, dtype=torch.float64), "mid": torch.ones(1)},
        str(path),
    )
    assert list(read_checkpoint(path).obj) == list(load_file(str(path))) == ["alpha", "mid", "zeta"]


# -- not checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"empty file \(0 bytes\)"),
        (b"<!DOCTYPE html><html><body>404</body></html>", r"looks like an HTML page, e.g. a download error page"),
        (b"\n  <html><head>", r"looks like an HTML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", r"run `git lfs pull`"),
        (gzip.compress(b"x" * 100), r"gzip-compressed; decompress it first"),
        (b"epoch,loss\n1,0.5\n", r"plain text \(first line 'epoch,loss'\)"),
        (pickle.dumps({"a": 1}, protocol=2), r"a plain Python pickle without torch's magic number"),
        (b"\x00\x01\x02\x03\xff\xfe" * 4, r"unknown format \(first bytes 00 01 02"),
        (b"PK\x05\x06" + bytes(18), r"an empty ZIP archive"),
    ],
)
def test_non_checkpoints_get_a_hint(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    refused(path, match)


def test_tar_and_npz_and_plain_zip(tmp_path: Path) -> None:
    member = tmp_path / "pickle"
    member.write_bytes(b"x")
    tar = tmp_path / "old.pt"
    with tarfile.open(tar, "w") as tf:
        tf.add(member, arcname="pickle")
    refused(tar, r"pre-1.0 torch.save format")
    npz = tmp_path / "weights.npz"
    np.savez(npz, a=np.arange(3))
    refused(npz, r"a NumPy .npz archive")
    plain = craft_zip(tmp_path / "plain.zip", [("readme.txt", b"hi")])
    refused(plain, r"the ZIP members are not inside an archive folder")


def test_non_regular_files_are_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    refused(fifo, r"not a regular file \(a FIFO\)")  # would block forever if opened
    refused(tmp_path, r"not a regular file \(a directory\)")
    refused(tmp_path / "absent.pt", r"no such file")


def test_every_zoo_specimen_is_small_and_deterministic(zoo: dict[str, Path], tmp_path: Path) -> None:
    assert all(p.stat().st_size < 16_384 for p in zoo.values())
    again = torch.load(build("training", tmp_path), weights_only=True)["model_state_dict"]
    first = torch.load(zoo["training"], weights_only=True)["model_state_dict"]
    assert list(again) == list(first) and all(torch.equal(again[k], first[k]) for k in first)
