"""`--dtype` on every writer (issue 13): the floating-point tensors written are bit for bit torch's
`tensor.to(dtype)`, for random and special values (NaN, ±Inf, -0.0, subnormals, out of range,
rounding ties), from every input format; integer, bool and complex tensors are untouched; tied
tensors and views stay shared; `--json` names the keys cast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsurgeon import jobs

DTYPES = ["float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"]
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _specials(dtype: torch.dtype) -> torch.Tensor:
    """NaN, ±Inf, ±0.0, subnormals of every target, values out of range of float16 and float8,
    and exact rounding ties (halfway between two float16 / bfloat16 / float8 neighbours)."""
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0]
    values += [1e-40, -1e-42, 3e-8, -6e-8, 1e-6, 2.0**-10, 2.0**-9 * 1.5]  # float32 / float16 / float8 subnormals
    values += [1e5, -7e4, 65504.0, 65520.0, 448.0, 464.0, 500.0, 57344.0, 61440.0, 1e6, 3e38, -3e38]
    values += [1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-4, 1 + 3 * 2.0**-4]
    values += [1 + 2.0**-3, 1 + 3 * 2.0**-3, 2.0**-7 * 1.5, 0.1, 1 / 3]
    t = torch.tensor(values, dtype=torch.float64)
    if dtype == torch.float64:
        t = torch.cat([t, torch.tensor([1e300, -1e-310, 2.0**-1074])])  # beyond float32, a float64 subnormal
    return t.to(dtype)


def _state_dict(safetensors: bool = False) -> OrderedDict[str, Any]:
    """Random and special values of each floating dtype, and tensors a cast leaves alone
    (complex128 only where safetensors is not involved: it has no dtype code for it)."""
    torch.manual_seed(0)
    sd: OrderedDict[str, Any] = OrderedDict()
    floats = [("f32", torch.float32), ("f64", torch.float64), ("f16", torch.float16), ("bf16", torch.bfloat16)]
    for name, dtype in floats:
        sd[f"{name}.random"] = (torch.randn(37, 11, dtype=torch.float64) * 10**3).to(dtype)
        sd[f"{name}.special"] = _specials(dtype)
    sd["f8.random"] = (torch.randn(50) * 50).to(torch.float8_e5m2)
    sd["i64"] = torch.randint(-(2**40), 2**40, (20,))
    sd["i8"] = torch.randint(-100, 100, (9,), dtype=torch.int8)
    sd["u8"] = torch.randint(0, 255, (9,), dtype=torch.uint8)
    sd["mask"] = torch.rand(13) > 0.5
    sd["c64"] = torch.randn(6, dtype=torch.complex64)
    if not safetensors:
        sd["c128"] = torch.randn(6, dtype=torch.complex128)
    return sd


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().resolve_conj().contiguous()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(BITS[t.element_size()])


def _expected(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.to(getattr(torch, dtype)) if t.is_floating_point() else t


def _check_cast(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype: str) -> None:
    assert sorted(got) == sorted(want)
    for key, t in want.items():
        expected = _expected(t, dtype)
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        assert torch.equal(_bits(got[key]), _bits(expected)), key  # bit for bit: NaN payloads and -0.0 too


def _save(sd: dict[str, torch.Tensor], path: Path, fmt: str) -> Path:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_extract_dtype_is_torch_to_bit_for_bit(cli, tmp_path, dtype, fmt):
    sd = _state_dict(safetensors=fmt == "safetensors")
    src = _save(sd, tmp_path / f"in.{'safetensors' if fmt == 'safetensors' else 'pt'}", fmt)
    out = tmp_path / "out.pt"
    result = cli("extract", src, "-o", out, "--dtype", dtype, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    cast = [k for k, t in sd.items() if t.is_floating_point() and str(t.dtype) != f"torch.{dtype}"]
    assert doc["dtype"] == dtype and sorted(doc["cast"]) == sorted(cast)  # safetensors sorts its keys
    _check_cast(_load(out), sd, dtype)
    assert doc["total_bytes"] == sum(_expected(t, dtype).nbytes for t in sd.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "out.pt"])  # no scratch file left


@pytest.mark.parametrize("dtype", DTYPES)
def test_safetensors_output(cli, tmp_path, dtype):
    sd = _state_dict(safetensors=True)
    src = _save(sd, tmp_path / "in.pt", "zip")
    out = tmp_path / "out.safetensors"
    result = cli("extract", src, "-o", out, "--dtype", dtype, "--verify")
    assert result.exit_code == 0, result.stderr
    _check_cast(_load(out), sd, dtype)


def test_pieces_join_bit_for_bit(tmp_path, monkeypatch):
    """A tensor is cast in pieces (bounded memory); with tiny pieces the joins fall everywhere. (A
    multiple of torch's vector width: torch gives a NaN cast from float64 to bfloat16 other bits
    in its vector loop than in its scalar tail, so the pieces cut where its own loop does.)"""
    import ckptsurgeon.cast

    monkeypatch.setattr(ckptsurgeon.cast, "CAST_PIECE", 32)
    sd = _state_dict()
    src = _save(sd, tmp_path / "in.pt", "zip")
    for dtype in ("bfloat16", "float8_e4m3fn"):
        result = jobs.extract(src, jobs.Writing(tmp_path / f"{dtype}.pt", dtype=dtype))
        assert result.written
        _check_cast(_load(tmp_path / f"{dtype}.pt"), sd, dtype)


def test_ties_and_views_stay_shared(cli, tmp_path):
    torch.manual_seed(1)
    base = torch.randn(64, 32)
    sd = {
        "embed.weight": torch.nn.Parameter(base),
        "head.weight": None,
        "rows": base[10:12],  # a view of the same storage
        "cols": base.t()[3:5],  # non-contiguous
        "alone": torch.randn(5),
    }
    sd["head.weight"] = sd["embed.weight"]  # tied
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    out = tmp_path / "out.pt"
    result = cli("extract", src, "-o", out, "--dtype", "float16", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["cast"] == list(sd)
    got = torch.load(out, weights_only=True)
    for key, t in sd.items():
        assert torch.equal(_bits(got[key]), _bits(t.detach().to(torch.float16))), key
    ptr = got["embed.weight"].untyped_storage().data_ptr()
    assert all(got[k].untyped_storage().data_ptr() == ptr for k in ("head.weight", "rows", "cols"))
    assert got["cols"].stride() == (1, 32)  # still a view, not a copy
    assert isinstance(got["embed.weight"], torch.nn.Parameter) and got["embed.weight"] is got["head.weight"]
    # the shared storage is written once, in half the bytes
    assert os.path.getsize(out) < os.path.getsize(src) * 0.6


def test_a_view_of_a_big_storage_casts_its_span_only(tmp_path):
    big = torch.randn(1000, 100)
    src = tmp_path / "slice.pt"
    torch.save({"row": big[500:501]}, src)  # torch.save writes the whole 400 kB storage
    out = tmp_path / "out.pt"
    assert jobs.extract(src, jobs.Writing(out, dtype="bfloat16")).written
    got = torch.load(out, weights_only=True)["row"]
    assert torch.equal(_bits(got), _bits(big[500:501].bfloat16()))
    assert os.path.getsize(out) < 10_000


def test_rename_keeps_the_container_and_merge_casts_the_result(cli, tmp_path):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    src = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, src)
    out = tmp_path / "renamed.pt"
    result = cli("rename", src, "--add-prefix", "net.", "-o", out, "--dtype", "bfloat16", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["cast"] == [f"net.{k}" for k, v in model.state_dict().items() if v.is_floating_point()]
    got = torch.load(out, weights_only=True)
    assert got["epoch"] == 3
    for v in got["optimizer"]["state"].values():  # only the state_dict is cast
        assert v["momentum_buffer"].dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(got["model"][f"net.{k}"]), _bits(_expected(v, "bfloat16"))), k
    assert got["model"]["net.1.num_batches_tracked"].dtype == torch.int64

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"x": torch.randn(8), "n": torch.tensor(1)}, a)
    torch.save({"x": torch.randn(8), "n": torch.tensor(1)}, b)
    for extra in ([], ["--average"]):
        merged = tmp_path / f"merged{len(extra)}.pt"
        result = cli("merge", a, b, "-o", merged, "--on-conflict", "first", "--dtype", "float16", *extra)
        assert result.exit_code == 0, result.stderr
        xa, xb = torch.load(a)["x"], torch.load(b)["x"]
        want = ((xa + xb) / 2 if extra else xa).to(torch.float16)
        got_x = torch.load(merged, weights_only=True)["x"]
        assert got_x.dtype == torch.float16
        torch.testing.assert_close(got_x, want, rtol=0, atol=1e-3)  # the mean is computed: within rounding


def test_dry_run_writes_nothing_and_names_the_keys(cli, tmp_path):
    sd = _state_dict()
    src = _save(sd, tmp_path / "in.pt", "zip")
    out = tmp_path / "out.pt"
    result = cli("extract", src, "-o", out, "--dtype", "float8_e5m2", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert not out.exists() and not doc["written"]
    assert doc["cast"] == [k for k, t in sd.items() if t.is_floating_point() and t.dtype != torch.float8_e5m2]
    assert doc["total_bytes"] == sum(_expected(t, "float8_e5m2").nbytes for t in sd.values())
    assert sorted(os.listdir(tmp_path)) == ["in.pt"]  # no scratch file left either


def test_unknown_dtype_is_refused_before_reading(cli, tmp_path):
    out = tmp_path / "out.pt"
    result = cli("extract", tmp_path / "missing.pt", "-o", out, "--dtype", "int8")
    assert result.exit_code == 2
    assert not out.exists()


def test_unknown_dtype_fast_path_and_api(tmp_path):
    src = _save(_state_dict(), tmp_path / "in.pt", "zip")
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(src), "-o", str(out), "--dtype", "int8"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --dtype 'int8': expected one of float16")
    assert not out.exists()
    from ckptsurgeon.errors import UsageError

    with pytest.raises(UsageError):
        jobs.merge([src, src], jobs.Writing(out, dtype="complex64"))


def test_fast_path_subprocess_strips_a_training_checkpoint(tmp_path):
    """yolov5's strip_optimizer in one command: the state_dict out of its container, in float16."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.Conv2d(16, 16, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    src = tmp_path / "last.pt"
    torch.save({"epoch": 9, "model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    out = tmp_path / "best.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(src), "-o", str(out), "--dtype", "float16", "--verify"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    got = torch.load(out, weights_only=True)
    assert list(got) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(got[k]), _bits(_expected(v, "float16"))), k
    assert os.path.getsize(out) < os.path.getsize(src) / 4  # no optimizer state, half the bytes


def test_tensors_torch_holds_are_cast_too(cli, tmp_path):
    """A file the engine leaves to torch.load (it holds a sparse tensor): dense tensors are cast
    through the staged path, the sparse one by torch in memory; both as `.to(dtype)`."""
    torch.manual_seed(4)
    dense = torch.randn(6, 5)
    dense[dense.abs() < 0.7] = 0
    sd = {"sparse": dense.to_sparse(), "dense": torch.randn(3, 3), "view": None, "i": torch.arange(4)}
    sd["view"] = sd["dense"][1]
    src = tmp_path / "mixed.pt"
    torch.save(sd, src)
    out = tmp_path / "out.pt"
    result = cli("extract", src, "-o", out, "--dtype", "bfloat16", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["cast"] == ["sparse", "dense", "view"]
    got = torch.load(out, weights_only=True)
    assert got["sparse"].layout == torch.sparse_coo and got["sparse"].dtype == torch.bfloat16
    assert torch.equal(_bits(got["sparse"].to_dense()), _bits(sd["sparse"].to(torch.bfloat16).to_dense()))
    assert torch.equal(_bits(got["dense"]), _bits(sd["dense"].bfloat16()))
    assert got["view"].untyped_storage().data_ptr() == got["dense"].untyped_storage().data_ptr()
    assert torch.equal(got["i"], sd["i"])


def test_rename_keeps_the_state_dicts_metadata(tmp_path):
    """The cast state_dict keeps its `_metadata` (BatchNorm's loading depends on it), renamed
    as without --dtype."""
    bn = torch.nn.BatchNorm1d(3)
    src = tmp_path / "in.pt"
    torch.save({"model": bn.state_dict(), "epoch": 1}, src)
    cast, uncast = tmp_path / "cast.pt", tmp_path / "uncast.pt"
    for out, dtype in ((cast, "float16"), (uncast, None)):
        assert jobs.rename(src, _prefix_rules("m."), jobs.Writing(out, dtype=dtype)).written
    got, want = (torch.load(p, weights_only=True)["model"] for p in (cast, uncast))
    assert got._metadata == want._metadata and got._metadata  # renamed along with the keys, not lost
    assert got["m.running_mean"].dtype == torch.float16 and got["m.num_batches_tracked"].dtype == torch.int64


def _prefix_rules(prefix: str) -> Any:
    from ckptsurgeon.rename import RenameRules

    return RenameRules(add_prefix=prefix)
