"""The engine writer: files built from TensorMeta graphs load in torch exactly like torch.save's.

Every test builds torch objects, describes them as TensorMeta pointing into a "blob" file whose
bytes the test writes itself (at odd offsets, with junk between storages), writes a checkpoint
with `write_torch_zip`, and compares what torch loads (plain, mmap=True, map_location="meta")
with the original, bit for bit.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import data_start, masked_serialization_id

from ckptsurgeon.engine.crc import crc32_zeros
from ckptsurgeon.engine.materialize import tensor_from_meta, to_torch
from ckptsurgeon.engine.meta import (
    DTYPE_ITEMSIZE,
    StorageMeta,
    TensorMeta,
    TorchDevice,
    TorchDtype,
    TorchSize,
)
from ckptsurgeon.engine.pickle_write import V3_DTYPES, pickle_graph, plan_storages
from ckptsurgeon.engine.source import Source
from ckptsurgeon.engine.zipwrite import write_torch_zip
from ckptsurgeon.errors import BadCheckpointError, EngineUnsupported, OutputError

# -- helpers ------------------------------------------------------------------------------------


def storage_bytes(storage: torch.UntypedStorage) -> bytes:
    if storage.nbytes() == 0:
        return b""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()


class Blob:
    """A plain file the test fills with storage bytes, described as StorageMeta."""

    def __init__(self, path: Path, *, gap: int = 13):
        self.path = path
        self.gap = gap
        self.f = open(path, "w+b")
        self.source = Source.scratch(self.f.fileno(), str(path))  # still growing: no identity check
        self.count = 0

    def add(self, data: bytes, *, crc: bool = False, key: str | None = None) -> StorageMeta:
        self.f.write(b"\xab" * self.gap)  # junk between storages: a wrong offset shows
        offset = self.f.tell()
        self.f.write(data)
        self.f.flush()
        self.count += 1
        return StorageMeta(
            source=self.source,
            key=key or f"s{self.count}",
            dtype="uint8",
            nbytes=len(data),
            data_offset=offset,
            crc32=zlib.crc32(data) if crc else None,
        )


def to_meta(obj: Any, blob: Blob, *, crc: bool = False) -> Any:
    """Describe a torch object graph as an engine graph, keeping object identities and sharing."""
    storages: dict[int, StorageMeta] = {}
    memo: dict[int, Any] = {}

    def conv(o: Any) -> Any:
        if id(o) in memo:
            return memo[id(o)]
        r: Any
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s._cdata not in storages:
                storages[s._cdata] = blob.add(storage_bytes(s), crc=crc)
            r = TensorMeta(
                storage=storages[s._cdata],
                dtype=str(o.dtype).removeprefix("torch."),
                shape=tuple(o.shape),
                stride=tuple(o.stride()),
                storage_offset=o.storage_offset(),
                requires_grad=o.requires_grad,
                is_parameter=isinstance(o, torch.nn.Parameter),
            )
        elif type(o) is collections.OrderedDict:
            r = memo[id(o)] = collections.OrderedDict()
            for k, v in o.items():
                r[conv(k)] = conv(v)
            for k, v in vars(o).items():
                setattr(r, k, v)  # the same _metadata object, as torch.save sees it
            return r
        elif type(o) is dict:
            r = memo[id(o)] = {}
            for k, v in o.items():
                r[conv(k)] = conv(v)
            return r
        elif type(o) is list:
            r = memo[id(o)] = []
            r.extend(conv(x) for x in o)
            return r
        elif type(o) is tuple:
            r = tuple(conv(x) for x in o)
        elif isinstance(o, torch.dtype):
            r = TorchDtype(str(o).removeprefix("torch."))
        elif isinstance(o, torch.device):
            r = TorchDevice(str(o))
        elif isinstance(o, torch.Size):
            r = TorchSize(o)
        else:
            return o
        memo[id(o)] = r
        return r

    return conv(obj)


def write(meta: Any, path: Path) -> Path:
    with open(path, "wb") as f:
        write_torch_zip(meta, f, archive_name=path.stem)
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, *, values: bool = True) -> None:
    """Same structure, types, tensor metadata and (if `values`) tensor bits."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (
            b.dtype,
            b.shape,
            b.stride(),
            b.requires_grad,
        )
        if values:
            assert torch.equal(bits(a), bits(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k], values=values)
        if isinstance(a, collections.OrderedDict):
            assert vars(a) == vars(b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, values=values)
    else:
        assert a == b or (a != a and b != b)


def load_all_ways(path: Path) -> dict[str, Any]:
    return {
        "plain": torch.load(path, weights_only=True),
        "mmap": torch.load(path, weights_only=True, mmap=True),
        "meta": torch.load(path, weights_only=True, map_location="meta"),
    }


def roundtrip(obj: Any, tmp_path: Path, **kw: Any) -> tuple[Path, dict[str, Any]]:
    meta = to_meta(obj, Blob(tmp_path / "blob.bin"), **kw)
    out = write(meta, tmp_path / "out.pt")
    loaded = load_all_ways(out)
    assert_same(obj, loaded["plain"])
    assert_same(obj, loaded["mmap"])
    assert_same(obj, loaded["meta"], values=False)
    assert zipfile.ZipFile(out).testzip() is None  # every CRC-32 is right
    return out, loaded


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    itemsize = DTYPE_ITEMSIZE[str(dtype).removeprefix("torch.")]
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


class Zoo(torch.nn.Module):
    """Tied weights, BatchNorm buffers, a nested module, a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight


def zoo_state_dict() -> collections.OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Zoo()
    model.block[1].running_mean.uniform_()
    return model.state_dict()


# -- byte identity with torch.save --------------------------------------------------------------


def graph_zoo() -> Any:
    return zoo_state_dict()


def graph_checkpoint() -> Any:
    sd = zoo_state_dict()
    return {
        "model": sd,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(7, 4)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}],
        },
        "epoch": 7,
        "args": {"name": "zoo", "dims": (4, 5, 7, 2, 3), "big": 2**70, "neg": -3, "none": None},
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "views": [sd["emb.weight"][2:5], sd["emb.weight"].t()],
    }


def graph_many() -> Any:
    # the pickler batches items by 1000: a dict of 1000 and 1001, a list of 1000 and 1001, ...
    od = collections.OrderedDict((f"t{i}", torch.full((1,), float(i))) for i in range(1001))
    return {
        "od": od,
        "dict1000": {i: torch.tensor(i) for i in range(1000)},
        "dict2001": {str(i): i for i in range(2001)},
        "list1000": [torch.tensor(i) for i in range(1000)],
        "list1001": list(range(1001)),
        "one": [1],
        "single": {"k": 1},
        "new_dtypes": [random_tensor((3,), getattr(torch, d)) for d in ("uint16", "float8_e4m3fn")],
        "param": torch.nn.Parameter(torch.ones(2)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
    }


@pytest.mark.parametrize("make", [graph_zoo, graph_checkpoint, graph_many])
def test_bytes_equal_torch_save_except_serialization_id(make: Any, tmp_path: Path) -> None:
    obj = make()
    torch.save(obj, tmp_path / "ref.pt")
    meta = to_meta(obj, Blob(tmp_path / "blob.bin"))
    (tmp_path / "mine").mkdir()
    out = write(meta, tmp_path / "mine" / "ref.pt")
    assert masked_serialization_id(out) == masked_serialization_id(tmp_path / "ref.pt")
    assert out.read_bytes() != (tmp_path / "ref.pt").read_bytes()  # only the random id differs
    assert_same(obj, torch.load(out, weights_only=True))


def test_record_order_and_fixed_records(tmp_path: Path) -> None:
    sd = collections.OrderedDict(a=torch.zeros(2), b=torch.ones(3))
    out = write(to_meta(sd, Blob(tmp_path / "blob.bin")), tmp_path / "model.v2.pt")
    z = zipfile.ZipFile(out)
    assert z.namelist() == [
        "model.v2/data.pkl",
        "model.v2/.format_version",
        "model.v2/.storage_alignment",
        "model.v2/byteorder",
        "model.v2/data/0",
        "model.v2/data/1",
        "model.v2/version",
        "model.v2/.data/serialization_id",
    ]
    assert [z.read(n) for n in z.namelist()[1:4]] == [b"1", b"64", b"little"]
    assert z.read("model.v2/version") == b"3\n"
    assert all(data_start(out.read_bytes(), i.header_offset) % 64 == 0 for i in z.infolist())


# -- round trips --------------------------------------------------------------------------------


SUPPORTED_DTYPES = [d for d in DTYPE_ITEMSIZE if isinstance(getattr(torch, d, None), torch.dtype)]


def test_every_meta_dtype_is_known_to_torch() -> None:
    assert SUPPORTED_DTYPES == list(DTYPE_ITEMSIZE)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype_name", SUPPORTED_DTYPES)
def test_roundtrip_each_dtype(dtype_name: str, tmp_path: Path) -> None:
    dtype = getattr(torch, dtype_name)
    base = random_tensor((4, 6), dtype, seed=len(dtype_name))
    obj = {"full": base, "view": base[1:3, 2:], "t": base.t(), "scalar": base[2, 3]}
    obj["empty"] = base[:0]
    out, loaded = roundtrip(obj, tmp_path)
    # one storage: the views share it after loading, as with torch.save
    got = loaded["plain"]
    assert len({got[k].untyped_storage().data_ptr() for k in ("full", "view", "t", "scalar")}) == 1
    v3 = b"_rebuild_tensor_v3" in zipfile.ZipFile(out).read("out/data.pkl")
    assert v3 == (dtype_name in V3_DTYPES)


def test_roundtrip_layouts(tmp_path: Path) -> None:
    x = random_tensor((2, 3, 4, 5), torch.float32)
    obj = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x[0, 0].t(),
        "offset_slice": x[1, 2, 1:, ::2],
        "expanded": torch.arange(3.0).expand(4, 3),
        "zero_dim": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "empty_view": x[1, :, 0:0],
    }
    roundtrip(obj, tmp_path)


def test_tied_storages_stay_shared(tmp_path: Path) -> None:
    sd = zoo_state_dict()
    assert sd["emb.weight"] is not sd["head.weight"]  # two tensors, one storage
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
    sd["rows"] = sd["emb.weight"][3:]
    out, loaded = roundtrip(sd, tmp_path)
    for how in ("plain", "mmap"):
        got = loaded[how]
        ptr = got["emb.weight"].untyped_storage().data_ptr()
        assert got["head.weight"].untyped_storage().data_ptr() == ptr
        assert got["rows"].untyped_storage().data_ptr() == ptr
        got["emb.weight"][3, 0] = 123.0  # plain loads are writable; mmap loads are copy-on-write
        assert got["rows"][0, 0].item() == 123.0
    assert len([n for n in zipfile.ZipFile(out).namelist() if "/data/" in n]) == len(
        {t.untyped_storage()._cdata for t in sd.values()}
    )


def test_parameters_and_requires_grad(tmp_path: Path) -> None:
    obj = {
        "p": torch.nn.Parameter(torch.randn(3)),
        "frozen": torch.nn.Parameter(torch.randn(2, 2), requires_grad=False),
        "leaf": torch.randn(2).requires_grad_(),
    }
    _, loaded = roundtrip(obj, tmp_path)
    for how in ("plain", "mmap", "meta"):
        got = loaded[how]
        assert isinstance(got["p"], torch.nn.Parameter) and got["p"].requires_grad
        assert isinstance(got["frozen"], torch.nn.Parameter) and not got["frozen"].requires_grad
        assert type(got["leaf"]) is torch.Tensor and got["leaf"].requires_grad


def test_nested_containers_and_values(tmp_path: Path) -> None:
    shared = [1, 2]
    obj = {
        "ints": [0, 255, 256, 65535, 65536, -1, 2**31, -(2**31) - 1, 2**100, -(2**2000)],
        "floats": (0.5, -0.0, float("inf"), float("nan")),
        "text": ["", "ü€𝄞", "x" * 300],
        "none": None,
        "flags": (True, False),
        "tuple4": (1, "a", None, [torch.ones(1)]),
        "shared": (shared, shared),
        "bytes": [b"\x00\x80\xff", bytearray(b"ab")],  # b"" pickles as builtins.bytes: refused
        "set": {3, 1},
        "complex": 1 + 2j,
        "deep": {"a": {"b": {"c": [{"d": torch.zeros(2, dtype=torch.int64)}]}}},
    }
    _, loaded = roundtrip(obj, tmp_path)
    assert loaded["plain"]["shared"][0] is loaded["plain"]["shared"][1]


def test_metadata_survives_and_batchnorm_strict_load(tmp_path: Path) -> None:
    model = Zoo()
    sd = model.state_dict()
    assert sd._metadata["block.1"]["version"] == 2
    _, loaded = roundtrip(sd, tmp_path)
    got = loaded["plain"]
    assert got._metadata == sd._metadata
    Zoo().load_state_dict(got, strict=True)
    # with BatchNorm version 2 recorded, a missing num_batches_tracked is a strict-load error;
    # it would silently load as 0 had `_metadata` been lost
    meta = to_meta(sd, Blob(tmp_path / "blob2.bin"))
    del meta["block.1.num_batches_tracked"]
    out = write(meta, tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        Zoo().load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_tensors_from_two_source_files(tmp_path: Path) -> None:
    a = zoo_state_dict()
    b = {"x": random_tensor((5, 5), torch.float16, seed=3), "y": random_tensor((2,), torch.int8)}
    meta_a = to_meta(a, Blob(tmp_path / "a.bin", gap=3))
    meta_b = to_meta(b, Blob(tmp_path / "b.bin", gap=5))
    merged = collections.OrderedDict(list(meta_a.items()) + list(meta_b.items()))
    merged._metadata = meta_a._metadata
    expected = collections.OrderedDict(list(a.items()) + list(b.items()))
    expected._metadata = a._metadata
    out = write(merged, tmp_path / "merged.pt")
    for loaded in load_all_ways(out).values():
        assert_same(expected, loaded, values=loaded["x"].device.type != "meta")


def test_slice_of_big_tensor_is_compacted(tmp_path: Path) -> None:
    big = random_tensor((1000, 1000), torch.float32)
    obj = {"row": big[417], "bits": big[418, 10:20]}
    out, loaded = roundtrip(obj, tmp_path, crc=True)
    assert out.stat().st_size < 10_000  # torch.save writes 4,001,577 bytes here
    row = loaded["plain"]["row"]
    assert row.untyped_storage().data_ptr() == loaded["plain"]["bits"].untyped_storage().data_ptr()
    assert row.untyped_storage().nbytes() == (1000 + 20) * 4
    plan = plan_storages(to_meta(obj, Blob(tmp_path / "blob2.bin")))
    (planned,) = plan.values()
    assert (planned.start, planned.offset_shift) == (417 * 1000 * 4, 417 * 1000)


def test_storages_renumbered_in_first_use_order(tmp_path: Path) -> None:
    blob = Blob(tmp_path / "blob.bin")
    tensors = [random_tensor((i + 2,), torch.float32, seed=i) for i in range(4)]
    storages = [blob.add(storage_bytes(t.untyped_storage()), key=str(9 - i)) for i, t in enumerate(tensors)]
    metas = [TensorMeta(s, "float32", tuple(t.shape), (1,)) for s, t in zip(storages, tensors)]
    order = [2, 0, 3, 1, 2]  # references out of key order, one twice
    graph = {f"t{n}": metas[i] for n, i in enumerate(order)}
    out = write(graph, tmp_path / "out.pt")
    z = zipfile.ZipFile(out)
    assert [n for n in z.namelist() if "/data/" in n] == [f"out/data/{i}" for i in range(4)]
    for i, name in enumerate(order[:4]):
        assert z.read(f"out/data/{i}") == storage_bytes(tensors[name].untyped_storage())
    meta_loaded = torch.load(out, weights_only=True, map_location="meta")
    assert [tuple(meta_loaded[f"t{n}"].shape) for n in range(5)] == [(i + 2,) for i in order]
    from torch.utils.serialization import config

    old = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        got = torch.load(out, weights_only=True, mmap=True)
    finally:
        config.load.calculate_storage_offsets = old
    for n, i in enumerate(order):
        assert torch.equal(got[f"t{n}"], tensors[i])


# -- CRC-32 -------------------------------------------------------------------------------------


def test_source_crc_is_checked_never_trusted(tmp_path: Path) -> None:
    """A flipped byte in a source record is caught while copying, whole record or slice of it."""
    from ckptsurgeon.errors import BadCheckpointError

    blob = Blob(tmp_path / "blob.bin")
    data = random_tensor((64,), torch.float32)
    s = blob.add(storage_bytes(data.untyped_storage()))
    good_crc = zlib.crc32(storage_bytes(data.untyped_storage()))
    good = StorageMeta(s.source, s.key, s.dtype, s.nbytes, s.data_offset, crc32=good_crc, record_name="a/data/0")
    whole = write({"w": TensorMeta(good, "float32", (64,), (1,))}, tmp_path / "whole.pt")
    assert zipfile.ZipFile(whole).getinfo("whole/data/0").CRC == good_crc
    part = write({"p": TensorMeta(good, "float32", (8,), (1,), 4)}, tmp_path / "part.pt")
    info = zipfile.ZipFile(part).getinfo("part/data/0")
    assert info.CRC == zlib.crc32(storage_bytes(data[4:12].clone().untyped_storage()))
    wrong = StorageMeta(s.source, s.key, s.dtype, s.nbytes, s.data_offset, crc32=0x12345678, record_name="a/data/0")
    for name, tensor in (
        ("w2", TensorMeta(wrong, "float32", (64,), (1,))),
        ("p2", TensorMeta(wrong, "float32", (8,), (1,), 4)),
    ):
        with pytest.raises(BadCheckpointError, match="CRC-32 mismatch in record a/data/0"):
            write({name: tensor}, tmp_path / f"{name}.pt")


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_large_storages_get_correct_crc_with_and_without_kernel_copy(
    kernel_copy: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not kernel_copy:  # e.g. copying across file systems on an old kernel

        def refuse(*args: Any) -> int:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    big = random_tensor((3_000_000,), torch.float32)  # 12 MB: CRC in a second thread
    obj = {"whole": big, "other": random_tensor((5, 5), torch.int16), "slice": big[100:2_500_000]}
    out, loaded = roundtrip(obj, tmp_path)  # no CRCs known: all computed; testzip checks them
    crc = zipfile.ZipFile(out).getinfo("out/data/0").CRC
    assert crc == zlib.crc32(storage_bytes(big.untyped_storage()))


@pytest.mark.parametrize("n", [0, 1, 7, 4096, 1 << 20, (1 << 20) + 12345])
@pytest.mark.parametrize("start", [0, 0xDEADBEEF])
def test_crc32_zeros_matches_zlib(n: int, start: int) -> None:
    assert crc32_zeros(start, n) == zlib.crc32(bytes(n), start)


# -- zip64 --------------------------------------------------------------------------------------


def zip_skeleton(path: Path) -> list[bytes]:
    """Every byte of a torch zip except record data, data-record CRCs and the serialization id."""
    z = zipfile.ZipFile(path)
    parts = []
    with open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            name_and_extra = f.read(name_len + extra_len)
            parts.append(head + name_and_extra)
            if info.file_size:
                zip64 = name_and_extra[name_len : name_len + 2] == b"\x01\x00"
                f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size)
                desc = bytearray(f.read(24 if zip64 else 16))
                if "/data/" in info.filename or "serialization_id" in info.filename:
                    desc[4:8] = bytes(4)
                parts.append(bytes(desc))
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size - 22)
        eocd = f.read(22)
        f.seek(size - 22 - 20)
        (z64_end,) = struct.unpack_from("<Q", f.read(20), 8)
        f.seek(z64_end + 48)
        (cd_start,) = struct.unpack("<Q", f.read(8))
        f.seek(cd_start)
        cd = bytearray(f.read(size - cd_start))
    pos = 0
    while cd[pos : pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", cd, pos + 28)
        name = bytes(cd[pos + 46 : pos + 46 + name_len])
        if b"/data/" in name or b"serialization_id" in name:
            cd[pos + 16 : pos + 20] = bytes(4)
        pos += 46 + name_len + extra_len + comment_len
    parts.append(bytes(cd))
    assert eocd == bytes(cd[-22:])
    return parts


def test_zip64_output_past_4gib_matches_torch_layout(tmp_path: Path) -> None:
    """A sparse 5 GiB source: holes stay holes, so a > 4 GiB output costs a few KB of disk."""
    src = tmp_path / "sparse.bin"
    small = random_tensor((3,), torch.float32)
    huge_n = (4 << 30) // 4 + 1000  # > 4 GiB of float32, all zeros (a hole)
    with open(src, "wb") as f:
        f.truncate(5 << 30)
        f.seek((4 << 30) + 4096)
        f.write(storage_bytes(small.untyped_storage()))
    if os.stat(src).st_blocks * 512 > (1 << 20):
        pytest.skip("the file system does not keep sparse files sparse")
    source = Source(src)
    huge_s = StorageMeta(source, "h", "float32", huge_n * 4, 64)
    small_s = StorageMeta(source, "s", "float32", 12, (4 << 30) + 4096)
    empty_s = StorageMeta(source, "e", "float32", 0, 0)
    graph = {
        "small": TensorMeta(small_s, "float32", (3,), (1,)),
        "huge": TensorMeta(huge_s, "float32", (huge_n,), (1,)),
        "empty": TensorMeta(empty_s, "float32", (0,), (1,)),
        "again": TensorMeta(small_s, "float32", (2,), (1,), 1),
    }
    (tmp_path / "mine").mkdir()
    out = write(graph, tmp_path / "mine" / "big.pt")
    assert out.stat().st_size > (4 << 30) + 1000
    assert out.stat().st_blocks * 512 < (1 << 20)
    # torch's own layout for the same shapes, written without data by skip_data (torch.empty of
    # 4 GiB only reserves address space)
    t_small = torch.empty(3)
    ref = {"small": t_small, "huge": torch.empty(huge_n), "empty": torch.empty(0)}
    ref["again"] = t_small[1:]
    with torch.serialization.skip_data():
        torch.save(ref, tmp_path / "big.pt")
    del ref
    assert zip_skeleton(out) == zip_skeleton(tmp_path / "big.pt")
    z = zipfile.ZipFile(out)
    assert z.getinfo("big/data/1").CRC == crc32_zeros(0, huge_n * 4)
    assert z.read("big/data/0") == storage_bytes(small.untyped_storage())
    got = torch.load(out, weights_only=True, mmap=True)
    assert torch.equal(got["small"], small) and torch.equal(got["again"], small[1:])
    assert got["huge"].shape == (huge_n,) and got["huge"][-5:].eq(0).all()
    assert got["small"].untyped_storage().data_ptr() == got["again"].untyped_storage().data_ptr()
    assert torch.load(out, weights_only=True, map_location="meta")["huge"].shape == (huge_n,)


# -- refusals and errors ------------------------------------------------------------------------


def _one(blob: Blob) -> StorageMeta:
    return blob.add(bytes(range(16)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda s: {"x": object()}, "cannot write a value of type builtins.object"),
        (lambda s: {"x": TensorMeta(s, "qint8", (4,), (1,))}, "dtype 'qint8'"),
        (
            lambda s: [TensorMeta(s, "float32", (2,), (1,)), TensorMeta(s, "int32", (2,), (1,))],
            "several dtypes",
        ),
        (lambda s: {"x": TensorMeta(s, "float32", (5,), (1,))}, "reaches byte 20"),
        (lambda s: {"x": TensorMeta(s, "float32", (2,), (-1,), 1)}, "negative or invalid stride"),
        (lambda s: collections.Counter(a=1), "collections.Counter"),
        (lambda s: {"d": TorchDtype("qint8")}, "dtype 'qint8'"),
    ],
)
def test_refuses_what_it_cannot_represent(make: Any, message: str, tmp_path: Path) -> None:
    graph = make(_one(Blob(tmp_path / "blob.bin")))
    out = tmp_path / "out.pt"
    with open(out, "wb") as f, pytest.raises(EngineUnsupported, match=message):
        write_torch_zip(graph, f, archive_name="out")
    assert out.stat().st_size == 0  # refused before writing


def test_refuses_a_tuple_containing_itself(tmp_path: Path) -> None:
    lst: list[Any] = []
    tup = (lst,)
    lst.append(tup)
    with pytest.raises(EngineUnsupported, match="contains itself"):
        pickle_graph(tup)


def test_missing_and_truncated_sources(tmp_path: Path) -> None:
    s = _one(Blob(tmp_path / "blob.bin"))
    short = StorageMeta(s.source, s.key, s.dtype, 4096, s.data_offset)
    truncated = pytest.raises(BadCheckpointError, match="blob.bin: file is truncated")
    with open(tmp_path / "o.pt", "wb") as f, truncated:
        write_torch_zip({"x": TensorMeta(short, "uint8", (4096,), (1,))}, f, archive_name="o")
    with pytest.raises(BadCheckpointError, match="gone.bin: no such file"):
        Source(tmp_path / "gone.bin")


def test_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    blob = Blob(tmp_path / "blob.bin")
    s = _one(blob)
    with open(tmp_path / "blob.bin", "r+b") as f, pytest.raises(OutputError, match="also an input"):
        write_torch_zip({"x": TensorMeta(s, "uint8", (16,), (1,))}, f, archive_name="blob")
    assert (tmp_path / "blob.bin").read_bytes()[s.data_offset :] == bytes(range(16))


# -- materialize --------------------------------------------------------------------------------


def test_to_torch_equals_what_torch_loads(tmp_path: Path) -> None:
    obj = graph_checkpoint()
    obj["model"]["rows"] = obj["model"]["emb.weight"][1:3]
    obj["p"] = torch.nn.Parameter(torch.randn(2))
    torch.save(obj, tmp_path / "ref.pt")
    expected = torch.load(tmp_path / "ref.pt", weights_only=True)
    got = to_torch(to_meta(obj, Blob(tmp_path / "blob.bin")))
    assert_same(expected, got)
    assert got["model"]._metadata == obj["model"]._metadata
    m = got["model"]
    ptr = m["emb.weight"].untyped_storage().data_ptr()
    assert m["head.weight"].untyped_storage().data_ptr() == ptr
    assert m["rows"].untyped_storage().data_ptr() == ptr
    assert got["views"][1].untyped_storage().data_ptr() == ptr
    assert isinstance(got["p"], torch.nn.Parameter) and got["p"].requires_grad
    assert got["dtype"] is torch.bfloat16
    assert (got["device"], got["size"]) == (torch.device("cpu"), torch.Size([2, 3]))


def test_to_torch_reads_only_the_used_span(tmp_path: Path) -> None:
    big = random_tensor((1000, 1000), torch.float32)
    got = to_torch(to_meta({"row": big[10]}, Blob(tmp_path / "blob.bin")))
    assert torch.equal(bits(got["row"]), bits(big[10]))
    assert got["row"].untyped_storage().nbytes() == 4000


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.t(),
        lambda x: x.reshape(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        lambda x: x[3:5, 2:7:2],
        lambda x: x[4, 4],
        lambda x: x[:0],
    ],
)
def test_tensor_from_meta_is_a_contiguous_copy(make: Any, tmp_path: Path) -> None:
    base = random_tensor((10, 12), torch.float64)
    t = make(base)
    meta = to_meta({"t": t, "base": base}, Blob(tmp_path / "blob.bin"))
    got = tensor_from_meta(meta["t"])
    assert got.is_contiguous() and got.shape == t.shape and got.dtype == t.dtype
    assert got.untyped_storage().nbytes() == t.numel() * 8
    assert torch.equal(bits(got), bits(t))


# -- the pickler against CPython's ---------------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.complex_numbers(allow_nan=False)
)


def _ordered(items: list[tuple[str, Any]], meta: Any) -> collections.OrderedDict[str, Any]:
    od = collections.OrderedDict(items)
    if meta is not None:
        od._metadata = meta
    return od


_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=3) | st.integers(-5, 5), inner, max_size=4)
        | st.builds(_ordered, st.lists(st.tuples(st.text(max_size=3), inner), max_size=3), st.none() | inner)
        | st.sets(st.integers(-3, 300), max_size=4)
        | st.binary(max_size=4).map(bytearray)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(_values)
def test_pickle_matches_cpython_protocol_2(value: Any) -> None:
    assert pickle_graph(value).data == pickle.dumps(value, protocol=2)


@pytest.mark.parametrize("n", [999, 1000, 1001, 2000, 2001])
def test_pickle_batches_like_cpython(n: int) -> None:
    shared = "shared"
    value = {
        "list": [shared] * n,
        "dict": {i: shared for i in range(n)},
        "od": collections.OrderedDict((i, i) for i in range(n)),
        "set": set(range(n)),
    }
    assert pickle_graph(value).data == pickle.dumps(value, protocol=2)


def test_plain_values_load_with_weights_only(tmp_path: Path) -> None:
    value = {"b": b"x", "ba": bytearray(b"yz"), "s": {1, 2}, "c": 1j, "big": -(2**90)}
    assert torch.load(write(value, tmp_path / "v.pt"), weights_only=True) == value


# -- through the torch-free reader --------------------------------------------------------------


def read_checkpoint(path: Path) -> Any:
    from ckptsurgeon.engine.read import read_checkpoint as read

    return read(path)


@pytest.mark.parametrize("make", [graph_zoo, graph_checkpoint, graph_many])
def test_read_then_write_reproduces_torch_save(make: Any, tmp_path: Path) -> None:
    obj = make()
    torch.save(obj, tmp_path / "ref.pt")
    raw = read_checkpoint(tmp_path / "ref.pt")
    (tmp_path / "mine").mkdir()
    out = write(raw.obj, tmp_path / "mine" / "ref.pt")
    assert masked_serialization_id(out) == masked_serialization_id(tmp_path / "ref.pt")
    expected = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert_same(expected, torch.load(out, weights_only=True))
    assert_same(expected, to_torch(raw.obj))


def test_read_extract_write_compacts_and_keeps_ties(tmp_path: Path) -> None:
    sd = zoo_state_dict()
    sd["big"] = random_tensor((1000, 1000), torch.float32)
    sd["big_row"] = sd["big"][7]
    torch.save(sd, tmp_path / "src.pt")
    raw = read_checkpoint(tmp_path / "src.pt")
    keep = ["emb.weight", "head.weight", "big_row", "block.1.running_mean"]
    sub = collections.OrderedDict((k, raw.obj[k]) for k in keep)
    sub._metadata = raw.obj._metadata
    out = write(sub, tmp_path / "sub.pt")
    assert out.stat().st_size < 20_000  # "big" is not referenced: only its row is written
    assert zipfile.ZipFile(out).testzip() is None
    expected = collections.OrderedDict((k, sd[k]) for k in keep)
    expected._metadata = sd._metadata
    for how, got in load_all_ways(out).items():
        assert_same(expected, got, values=how != "meta")
    got = torch.load(out, weights_only=True)
    ptr = got["emb.weight"].untyped_storage().data_ptr()
    assert got["head.weight"].untyped_storage().data_ptr() == ptr


def test_read_legacy_and_safetensors_then_write(tmp_path: Path) -> None:
    import safetensors.torch

    obj = graph_checkpoint()
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    out = write(read_checkpoint(tmp_path / "legacy.pt").obj, tmp_path / "from_legacy.pt")
    assert zipfile.ZipFile(out).testzip() is None  # CRCs computed: legacy files have none
    assert_same(torch.load(tmp_path / "legacy.pt", weights_only=True), torch.load(out))
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.ones(2).bfloat16()}
    safetensors.torch.save_file(tensors, tmp_path / "s.safetensors")
    out = write(read_checkpoint(tmp_path / "s.safetensors").obj, tmp_path / "from_st.pt")
    got = torch.load(out, weights_only=True)
    assert_same(dict(sorted(tensors.items())), dict(sorted(got.items())))  # the reader's key order


def test_outputs_are_cpu_checkpoints_whatever_the_source_device(tmp_path):
    """A file saved from CUDA (location 'cuda:0') comes out loadable without map_location."""
    import torch
    from zoo import fake_location

    from ckptsurgeon.engine.read import read_checkpoint
    from ckptsurgeon.engine.zipwrite import write_torch_zip

    src = tmp_path / "cuda.pt"
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    with fake_location("cuda:0"):
        torch.save(sd, src)
    raw = read_checkpoint(src)
    assert raw.obj["w"].storage.location == "cuda:0"
    out = tmp_path / "out.pt"
    with open(out, "wb") as f:
        write_torch_zip(raw.obj, f, archive_name="out")
    back = torch.load(out, weights_only=True)  # no map_location: it must not ask for CUDA
    assert back["w"].device.type == "cpu" and torch.equal(back["w"], sd["w"])


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(2**300), max_value=2**300) | st.integers(min_value=-70000, max_value=70000))
def test_encode_long_is_pickles(x: int) -> None:
    """The writer's LONG1 payload is exactly pickle's (it no longer imports pickle for it)."""
    from ckptsurgeon.engine.pickle_write import _encode_long

    assert _encode_long(x) == pickle.encode_long(x)
    assert pickle.decode_long(_encode_long(x)) == x


def test_serialization_id_is_torchs_shape(tmp_path: Path) -> None:
    from ckptsurgeon.engine.read import read_checkpoint

    src = tmp_path / "a.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    out = tmp_path / "b.pt"
    with open(out, "wb") as f:
        write_torch_zip(read_checkpoint(src).obj, f, archive_name="b")
    ids = zipfile.ZipFile(out).read("b/.data/serialization_id").decode()
    assert len(ids) == 40 and ids.isdigit()
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.arange(4.0))


def test_the_same_checkpoint_written_twice_is_one_file_and_another_gets_another_id(tmp_path: Path) -> None:
    """The serialization id comes from the content: rewriting a checkpoint (again, in other
    threads, by the ranks of a torchrun job) gives identical bytes; a different tensor value
    gives a different id."""
    from ckptsurgeon.engine.read import read_checkpoint

    def written(values: torch.Tensor, name: str) -> bytes:
        src = tmp_path / f"{name}.src.pt"
        torch.save({"w": values}, src)
        out = tmp_path / f"{name}.pt"
        with open(out, "wb") as f:
            write_torch_zip(read_checkpoint(src).obj, f, archive_name="m")
        return out.read_bytes()

    def serialization_id(data: bytes) -> bytes:
        return zipfile.ZipFile(io.BytesIO(data)).read("m/.data/serialization_id")

    first, again = written(torch.arange(4.0), "a"), written(torch.arange(4.0), "b")
    other = written(torch.arange(4.0) + 1, "c")
    assert first == again
    assert serialization_id(other) != serialization_id(first)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=2**32 - 1))
def test_the_engines_crc32_is_zlibs(data: bytes, start: int) -> None:
    """Whichever implementation is installed (ISA-L or zlib), the CRC is the zip CRC-32."""
    from ckptsurgeon.engine.crc import crc32

    assert crc32(data, start) == zlib.crc32(data, start)
    assert crc32(memoryview(bytearray(data))) == zlib.crc32(data)


def test_records_past_the_writeback_step_start_the_disk_and_stay_exact(tmp_path: Path, monkeypatch) -> None:
    """Every 16 MiB of copied records the writer asks the kernel to start writing them out; the
    file is still byte for byte what torch.save writes (but the random serialization id)."""
    from ckptsurgeon.engine import copier

    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        copier.os,
        "posix_fadvise",
        lambda fd, off, n, advice: calls.append((off, n, advice)) or real(fd, off, n, advice),
    )
    torch.manual_seed(0)
    sd = collections.OrderedDict((f"w{i}", torch.randn(1_500_000)) for i in range(4))  # 4 x 6 MB
    torch.save(sd, tmp_path / "ref.pt")
    (tmp_path / "mine").mkdir()
    out = write(to_meta(sd, Blob(tmp_path / "blob.bin")), tmp_path / "mine" / "ref.pt")
    assert masked_serialization_id(out) == masked_serialization_id(tmp_path / "ref.pt")
    assert_same(sd, torch.load(out, weights_only=True))
    assert [advice for _, _, advice in calls] == [os.POSIX_FADV_DONTNEED]  # after 18 of 24 MB
    off, n, _ = calls[0]
    assert off == 0 and copier._WRITEBACK_STEP <= n < out.stat().st_size


def test_writeback_starts_inside_one_large_record(tmp_path: Path, monkeypatch) -> None:
    """A single big tensor does not wait for its last byte: writeback is started between the
    kernel copies of one record, over consecutive ranges of the output."""
    from ckptsurgeon.engine import copier

    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        copier.os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n)) or real(fd, off, n, advice)
    )
    monkeypatch.setattr(copier, "_KERNEL_COPY_CHUNK", 8 << 20)
    torch.manual_seed(0)
    sd = collections.OrderedDict(big=torch.randn(10_000_000))  # one 40 MB record
    torch.save(sd, tmp_path / "ref.pt")
    (tmp_path / "mine").mkdir()
    out = write(to_meta(sd, Blob(tmp_path / "blob.bin")), tmp_path / "mine" / "ref.pt")
    assert masked_serialization_id(out) == masked_serialization_id(tmp_path / "ref.pt")
    assert_same(sd, torch.load(out, weights_only=True))
    assert len(calls) >= 2, calls
    assert calls[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
    assert calls[-1][0] + calls[-1][1] < out.stat().st_size
