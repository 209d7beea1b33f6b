"""diff_state_dicts: structure, dtype, value mismatches with tolerances; diff(x, x) is empty."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import zlib
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptsurgeon.diff import CHUNK_BYTES, NUMPY_PIECE, STATS_BLOCK, diff_state_dicts
from ckptsurgeon.engine.meta import TensorMeta
from ckptsurgeon.errors import BadCheckpointError
from ckptsurgeon.io import load_checkpoint


def test_identical_and_counts():
    a = OrderedDict(w=torch.randn(3, 4), b=torch.arange(3))
    r = diff_state_dicts(a, OrderedDict((k, v.clone()) for k, v in a.items()))
    assert r.identical and r.num_equal == 2
    assert r.to_dict()["identical"] is True and r.to_dict()["schema_version"] == 1


def test_structure_mismatches():
    a = OrderedDict(x=torch.zeros(2), y=torch.zeros(2, 2), z=torch.zeros(2))
    b = OrderedDict(y=torch.zeros(4), z=torch.zeros(2, dtype=torch.float64), w=torch.zeros(1))
    r = diff_state_dicts(a, b)
    assert r.only_in_a == ("x",) and r.only_in_b == ("w",)
    assert [(m.key, m.a, m.b) for m in r.shape_mismatches] == [("y", (2, 2), (4,))]
    assert [(m.key, m.a, m.b) for m in r.dtype_mismatches] == [("z", "float32", "float64")]
    assert not r.value_mismatches and r.num_equal == 0 and not r.identical


def test_value_statistics():
    a = OrderedDict(w=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = OrderedDict(w=torch.tensor([1.0, 2.5, 3.0, 2.0]))
    (m,) = diff_state_dicts(a, b).value_mismatches
    assert m.num_different == 2 and m.numel == 4
    assert m.max_abs_diff == pytest.approx(2.0) and m.max_rel_diff == pytest.approx(1.0)


def test_tolerances_follow_the_formula():
    a = OrderedDict(w=torch.tensor([1.0, 100.0]))
    b = OrderedDict(w=torch.tensor([1.001, 100.1]))
    assert not diff_state_dicts(a, b).identical
    assert diff_state_dicts(a, b, atol=0.11).identical
    assert diff_state_dicts(a, b, rtol=1e-3).identical  # |a-b| <= rtol*|b|
    assert not diff_state_dicts(a, b, rtol=1e-4).identical


def test_nan_in_same_place_is_equal_and_inf_counts():
    a = OrderedDict(w=torch.tensor([math.nan, 1.0, math.inf]))
    assert diff_state_dicts(a, OrderedDict(w=torch.tensor([math.nan, 1.0, math.inf]))).identical
    r = diff_state_dicts(a, OrderedDict(w=torch.tensor([0.0, 1.0, math.inf])))
    (m,) = r.value_mismatches
    assert m.num_different == 1 and math.isinf(m.max_abs_diff)
    assert r.to_dict()["value_mismatches"][0]["max_abs_diff"] is None  # JSON has no inf


def test_relative_diff_against_zero_is_infinite():
    (m,) = diff_state_dicts(OrderedDict(w=torch.tensor([1.0])), OrderedDict(w=torch.tensor([0.0]))).value_mismatches
    assert math.isinf(m.max_rel_diff)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn]
)
def test_every_kind_of_dtype(dtype):
    base = torch.tensor([0, 1, 1, 0]).to(dtype)
    other = base.clone()
    other[0] = torch.tensor(1).to(dtype)
    assert diff_state_dicts(OrderedDict(w=base), OrderedDict(w=base.clone())).identical
    (m,) = diff_state_dicts(OrderedDict(w=base), OrderedDict(w=other)).value_mismatches
    assert m.num_different == 1 and m.max_abs_diff == pytest.approx(1.0)


def test_non_contiguous_and_views():
    base = torch.randn(6, 5)
    a = OrderedDict(t=base.t(), s=base[2:4])
    b = OrderedDict(t=base.t().contiguous(), s=base[2:4].clone())
    assert diff_state_dicts(a, b).identical


def test_cross_dtype_values_are_compared_after_promotion():
    a = OrderedDict(w=torch.tensor([1.0, 2.0]))
    r = diff_state_dicts(a, OrderedDict(w=torch.tensor([1.0, 2.0], dtype=torch.bfloat16)))
    assert r.dtype_mismatches and not r.value_mismatches


def test_chunked_comparison_counts_across_chunks(monkeypatch):
    import ckptsurgeon.diff as d

    monkeypatch.setattr(d, "CHUNK_BYTES", 64)
    a = torch.zeros(1000)
    b = a.clone()
    b[::100] = 1.0
    (m,) = diff_state_dicts(OrderedDict(w=a), OrderedDict(w=b)).value_mismatches
    assert m.num_different == 10 and m.numel == 1000


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(allow_nan=True, width=32), min_size=0, max_size=50))
def test_diff_of_x_with_itself_is_empty(values):
    t = torch.tensor(values, dtype=torch.float32)
    assert diff_state_dicts(OrderedDict(w=t), OrderedDict(w=t.clone())).identical


# --------------------------------------------------- statistics from files (numpy) against torch

NUMPY_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
]
TOLERANCES = [
    (0.0, 0.0),
    (1e-3, 0.0),
    (0.0, 1e-3),
    (0.1, 0.5),
    (1e-6, 1e-9),
    (0.0, sys.float_info.max),
    (sys.float_info.max, 0.0),
]  # tolerances are finite


def _pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors that agree in most places and differ in every way a dtype allows: random bit
    patterns (NaNs, infinities, subnormals, extreme integers), small relative changes, NaN in the
    same place, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        x = torch.randint(0, 2, (n,), generator=g).bool()
        y = x.clone()
        y[torch.randint(0, n, (n // 10,), generator=g)] ^= True
        return x, y
    size = torch.empty(0, dtype=dtype).element_size()
    bits = lambda: torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype)  # noqa: E731
    x = bits()
    if dtype.is_floating_point or dtype.is_complex:
        normal = torch.randn(n, dtype=torch.float64, generator=g) * 10.0 ** torch.randint(-4, 5, (n,), generator=g)
        specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0], dtype=torch.float64)
        x = torch.where(torch.rand(n, generator=g) < 0.6, normal.to(dtype), x)
        where = torch.randint(0, n, (n // 20,), generator=g)
        x[where] = specials[torch.randint(0, 7, (n // 20,), generator=g)].to(dtype)
    kind = torch.randint(0, 6, (n,), generator=g)
    y = torch.where(kind == 1, bits(), x)
    if dtype.is_floating_point or dtype.is_complex:
        wide = x.to(torch.complex128 if dtype.is_complex else torch.float64)
        y = torch.where(kind == 2, (wide * (1 + 1e-4)).to(dtype), y)
        y = torch.where(kind == 3, (wide + 1e-3).to(dtype), y)
        y = torch.where(kind == 4, (-wide).to(dtype), y)
    else:
        low = x.view(torch.uint8).clone()
        low[::size] ^= 1  # off by one in the lowest bit (little-endian)
        y = torch.where(kind == 2, low.view(dtype), y)
    return x, y


def _same_numbers(a: tuple, b: tuple) -> bool:
    """Equal bit for bit (NaN equals NaN: its sign and payload are not reported)."""
    return len(a) == len(b) and all(
        (isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v))
        or (type(u) is type(v) and struct.pack("<d", u) == struct.pack("<d", v) if isinstance(u, float) else u == v)
        for u, v in zip(a, b)
    )


def _assert_same_reports(ours, theirs) -> None:
    assert ours.num_equal == theirs.num_equal and len(ours.value_mismatches) == len(theirs.value_mismatches)
    for m, n in zip(ours.value_mismatches, theirs.value_mismatches):
        ours_numbers = (m.key, m.num_different, m.numel, m.max_abs_diff, m.max_rel_diff)
        theirs_numbers = (n.key, n.num_different, n.numel, n.max_abs_diff, n.max_rel_diff)
        assert _same_numbers(ours_numbers, theirs_numbers), (ours_numbers, theirs_numbers)


def _files_and_tensors(tmp_path, pairs: dict) -> tuple[tuple, tuple]:
    """(A, B) read from files by the engine, and (A, B) as torch tensors."""
    a, b = OrderedDict((k, v[0]) for k, v in pairs.items()), OrderedDict((k, v[1]) for k, v in pairs.items())
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    files = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert all(isinstance(t, TensorMeta) for f in files for t in f.state_dict.values())
    return (files[0].state_dict, files[1].state_dict), (a, b)


SIZES = {  # CHUNK_BYTES, STATS_BLOCK, NUMPY_PIECE
    "default": (CHUNK_BYTES, STATS_BLOCK, NUMPY_PIECE),
    "small": (4096, 300, 64),
    "piece>block": (4096, 256, 1000),
    "block>chunk": (2048, 1 << 20, 50),
}


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=str)
def test_statistics_of_files_are_torch_statistics_bit_for_bit(dtype, sizes, tmp_path, monkeypatch):
    """Files go through the raw path (numpy, in pieces on two threads), tensors through torch's
    _block_stats: the numbers are the same bit for bit, for every tolerance, NaN and inf included."""
    import ckptsurgeon.diff as d

    for name, value in zip(("CHUNK_BYTES", "STATS_BLOCK", "NUMPY_PIECE"), sizes):
        monkeypatch.setattr(d, name, value)
    (fa, fb), (ta, tb) = _files_and_tensors(tmp_path, {f"w{seed}": _pair(dtype, 3000, seed) for seed in range(3)})
    for rtol, atol in TOLERANCES:
        ours = diff_state_dicts(fa, fb, rtol=rtol, atol=atol)
        _assert_same_reports(ours, diff_state_dicts(ta, tb, rtol=rtol, atol=atol))
        assert len(ours.value_mismatches) == 3 or (rtol, atol) != (0.0, 0.0)


def test_statistics_on_one_thread_are_the_same(tmp_path, monkeypatch):
    import ckptsurgeon.diff as d

    for name, value in zip(("CHUNK_BYTES", "STATS_BLOCK", "NUMPY_PIECE"), SIZES["small"]):
        monkeypatch.setattr(d, name, value)
    monkeypatch.setattr(d._Workspace, "pool", lambda self: None)
    pairs = {str(t): _pair(t, 3000, 1) for t in (torch.float32, torch.bfloat16)}
    (fa, fb), (ta, tb) = _files_and_tensors(tmp_path, pairs)
    for rtol, atol in TOLERANCES:
        ours = diff_state_dicts(fa, fb, rtol=rtol, atol=atol)
        _assert_same_reports(ours, diff_state_dicts(ta, tb, rtol=rtol, atol=atol))


@pytest.mark.parametrize("rtol, atol", TOLERANCES[:5])
def test_files_of_every_dtype_at_once(tmp_path, monkeypatch, rtol, atol):
    """One file of every dtype, the ones numpy does not widen (float8, complex) included: they
    take torch's statistics over the same raw path."""
    import ckptsurgeon.diff as d

    monkeypatch.setattr(d, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(d, "STATS_BLOCK", 500)
    pairs = {str(t): _pair(t, 3000, i) for i, t in enumerate(NUMPY_DTYPES)}
    pairs["float8"] = tuple(v.to(torch.float8_e4m3fn) for v in _pair(torch.float32, 3000, 99))
    pairs["complex64"] = _pair(torch.complex64, 3000, 98)
    pairs["same"] = (torch.arange(5000.0), torch.arange(5000.0))
    (fa, fb), (ta, tb) = _files_and_tensors(tmp_path, pairs)
    ours = diff_state_dicts(fa, fb, rtol=rtol, atol=atol)
    _assert_same_reports(ours, diff_state_dicts(ta, tb, rtol=rtol, atol=atol))
    assert len(ours.value_mismatches) >= 10


def test_progress_counts_every_byte_of_a_once(tmp_path, monkeypatch):
    import ckptsurgeon.diff as d
    import ckptsurgeon.engine.data as data

    monkeypatch.setattr(data, "SCAN_TASK", 1024)
    monkeypatch.setattr(d, "CHUNK_BYTES", 4096)
    a = OrderedDict((k, torch.arange(3000.0)) for k in ("same", "late", "early"))
    a["small"] = torch.ones(3)
    b = OrderedDict((k, v.clone()) for k, v in a.items())
    b["late"][-1] = -1.0
    b["early"][0] = -1.0
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    seen: list[int] = []
    r = _diff_files(tmp_path / "a.pt", tmp_path / "b.pt", progress=seen.append)
    assert [m.key for m in r.value_mismatches] == ["late", "early"] and r.num_equal == 2
    assert sum(seen) == sum(t.numel() * 4 for t in a.values()) and min(seen) > 0


# --------------------------------------------------------------------------- CRC-32 of the records


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=3000))
def test_crc32_combine_is_the_crc_of_the_concatenation(first, second):
    from ckptsurgeon.engine.crc import crc32_combine

    assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == zlib.crc32(first + second)


def _flip(path, key: str, at: int) -> None:
    """Flip one byte of `key`'s data in place (its stored CRC-32 stays as it was)."""
    storage = load_checkpoint(path).state_dict[key].storage
    with open(path, "r+b") as f:
        f.seek(storage.data_offset + at)
        byte = f.read(1)[0]
        f.seek(storage.data_offset + at)
        f.write(bytes([byte ^ 0x10]))


def _store_crc(path, key: str, crc: int) -> None:
    """Store `crc` as the CRC-32 of `key`'s record wherever torch's ZIP keeps it (data
    descriptor, central directory)."""
    storage = load_checkpoint(path).state_dict[key].storage
    raw = bytearray(path.read_bytes())
    old, new = struct.pack("<I", storage.crc32), struct.pack("<I", crc)
    end = storage.data_offset + storage.nbytes
    assert raw[end : end + 8] == b"PK\x07\x08" + old
    raw[end + 4 : end + 8] = new
    entry = raw.rindex(storage.record_name.encode()) - 46
    assert raw[entry : entry + 4] == b"PK\x01\x02" and raw[entry + 16 : entry + 20] == old
    raw[entry + 16 : entry + 20] = new
    path.write_bytes(raw)


def _record_crc(path, key: str) -> int:
    """The CRC-32 of what `key`'s record holds now."""
    storage = load_checkpoint(path).state_dict[key].storage
    return zlib.crc32(path.read_bytes()[storage.data_offset : storage.data_offset + storage.nbytes])


@pytest.fixture
def pair_of_files(tmp_path):
    """a.pt, and b.pt a byte-for-byte copy of it: 3 tensors of 40 KB and a small one."""
    g = torch.Generator().manual_seed(3)
    sd = OrderedDict((f"w{i}", torch.randn(10_000, generator=g)) for i in range(3))
    sd["bias"] = torch.zeros(5)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(sd, a)
    b.write_bytes(a.read_bytes())
    return a, b


def _diff_files(a, b, **kw):
    return diff_state_dicts(load_checkpoint(a).state_dict, load_checkpoint(b).state_dict, **kw)


def test_identical_files_except_b_stored_crc(pair_of_files, capsys):
    from ckptsurgeon.cli import main

    a, b = pair_of_files
    assert main(["diff", str(a), str(b)]) == 0
    _store_crc(b, "w1", _record_crc(b, "w1") ^ 0x00FF0000)
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "CRC-32 mismatch" in err and "b.pt" in err and "a.pt" not in err
    assert main(["diff", str(b), str(a), "--json"]) == 2


def test_byte_flipped_in_a_of_an_identical_pair(pair_of_files, capsys):
    from ckptsurgeon.cli import main

    a, b = pair_of_files
    _flip(a, "w2", 12345)
    assert main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "CRC-32 mismatch" in err and "a.pt" in err and "b.pt" not in err


@pytest.mark.parametrize("threads", [False, True], ids=["one thread", "two threads"])
def test_a_byte_flipped_alike_in_both_files_is_caught_part_by_part(pair_of_files, monkeypatch, threads):
    """Equal bytes are checksummed once for both files, in parts whose CRCs are combined: damage
    in one part (the same in A and B, so nothing differs) must still fail both records."""
    import ckptsurgeon.diff as d
    import ckptsurgeon.engine.data as data

    monkeypatch.setattr(data, "SCAN_TASK", 4096)
    monkeypatch.setattr(data, "SCAN_BLOCK", 1000)
    if not threads:
        monkeypatch.setattr(d._Workspace, "pool", lambda self: None)
    a, b = pair_of_files
    assert _diff_files(a, b).identical  # every part's CRC, combined, is the record's
    for path in (a, b):
        _flip(path, "w1", 30_000)
    with pytest.raises(BadCheckpointError, match=r"a\.pt: CRC-32 mismatch in record a/data/1"):
        _diff_files(a, b)


@pytest.mark.parametrize("changed, damaged", [(100, 30_000), (35_000, 1_000)], ids=["damage after", "damage before"])
def test_equal_chunks_around_a_difference_are_checked_once(pair_of_files, monkeypatch, changed, damaged):
    """A chunk equal in A and B moves both running CRCs on with one crc32; after a chunk that
    differs they part, and the one CRC moves both on through crc32_combine. Right files pass,
    damage in an equal chunk (alike in both files, so nothing differs there) fails."""
    import ckptsurgeon.diff as d

    monkeypatch.setattr(d, "CHUNK_BYTES", 4096)
    a, b = pair_of_files
    _flip(b, "w0", changed)
    _store_crc(b, "w0", _record_crc(b, "w0"))  # a valid B that differs from A in one chunk
    (m,) = _diff_files(a, b).value_mismatches
    assert m.key == "w0" and m.num_different == 1
    for path in (a, b):
        _flip(path, "w0", damaged)
    with pytest.raises(BadCheckpointError, match=r"a\.pt: CRC-32 mismatch in record a/data/0"):
        _diff_files(a, b)


# ----------------------------------------------------------------------- what diff imports


def _imports_of_diff(a, b) -> tuple[int, list[str]]:
    code = (
        "import sys\n"
        "from ckptsurgeon.cli import main\n"
        "rc = main(['diff', sys.argv[1], sys.argv[2], '--json'])\n"
        "print(rc, sorted(m for m in ('numpy', 'torch') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True, timeout=120)
    rc, modules = r.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(rc), eval(modules)  # noqa: S307 (our own printed list)


def _dtype_zoo() -> OrderedDict:
    g = torch.Generator().manual_seed(5)
    return OrderedDict(
        fp32=torch.randn(1000, generator=g),
        fp16=torch.randn(1000, generator=g).half(),
        bf16=torch.randn(1000, generator=g).bfloat16(),
        int64=torch.randint(-100, 100, (1000,), generator=g),
        uint8=torch.randint(0, 255, (1000,), generator=g, dtype=torch.uint8),
    )


def test_diff_of_identical_files_imports_neither_numpy_nor_torch(tmp_path):
    torch.save(_dtype_zoo(), tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes())
    assert _imports_of_diff(tmp_path / "a.pt", tmp_path / "b.pt") == (0, [])


def test_diff_with_differences_imports_numpy_not_torch(tmp_path):
    a = _dtype_zoo()
    torch.save(a, tmp_path / "a.pt")
    torch.save(OrderedDict((k, v + 1) for k, v in a.items()), tmp_path / "b.pt")
    assert _imports_of_diff(tmp_path / "a.pt", tmp_path / "b.pt") == (1, ["numpy"])


def _both_ways(tmp_path, a, b, **tol):
    """The value mismatch of key "w" computed from files (raw bytes, numpy) and from tensors (torch)."""
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    on_disk = diff_state_dicts(
        load_checkpoint(tmp_path / "a.pt").state_dict, load_checkpoint(tmp_path / "b.pt").state_dict, **tol
    )
    in_memory = diff_state_dicts({"w": a}, {"w": b}, **tol)
    return on_disk.value_mismatches, in_memory.value_mismatches


@pytest.mark.parametrize("gap", [1, STATS_BLOCK + 7, 2 * STATS_BLOCK])
def test_max_abs_diff_is_over_the_whole_tensor_wherever_the_difference_lies(tmp_path, gap):
    """A difference within tolerance counts in max_abs_diff wherever it lies (before, the maximum
    skipped 1M-element blocks without a real difference, so the answer depended on the layout)."""
    b = torch.ones(2 * STATS_BLOCK + 10)
    a = b.clone()
    b[0], a[0] = 1000.0, 1100.0  # |diff| 100, within rtol 0.2
    a[gap] = 3.0  # |diff| 2, beyond it
    for found in _both_ways(tmp_path, a, b, rtol=0.2):
        (m,) = found
        assert (m.num_different, m.max_abs_diff) == (1, 100.0)
        assert m.max_rel_diff == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_an_infinite_b_against_a_finite_a_is_an_infinite_relative_difference(tmp_path, dtype):
    """|a - b| / |b| with b = inf is inf / inf: reported as infinite, never dropped as NaN."""
    a = torch.zeros(10, dtype=dtype)
    b = a.clone()
    b[3] = math.inf
    for found in _both_ways(tmp_path, a, b):
        (m,) = found
        assert m.num_different == 1 and m.max_abs_diff == math.inf and m.max_rel_diff == math.inf
