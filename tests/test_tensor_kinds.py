"""Sparse (COO, CSR, CSC, BSR, BSC), conjugate and negative views, quantized tensors (per tensor
and per channel) through every command (issue 13): inspect says what they are, the writers keep
their values exactly (layout, qscheme, scale and zero point too), diff compares their values,
`merge --average` refuses what has no arithmetic, and no torch warning reaches stderr raw."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

SPARSE = ["coo", "csr", "csc", "bsr", "bsc"]
QUANTIZED = ["qt", "qc"]
VIEWS = ["conj", "conjbase", "neg", "negbase"]


def _kinds() -> OrderedDict[str, torch.Tensor]:
    """One tensor of each kind (torch warns while making some: that is the test's business, not
    the user's)."""
    torch.manual_seed(0)
    d = torch.randn(4, 6)
    d[d.abs() < 0.8] = 0
    complex_base = torch.randn(10, 4, dtype=torch.complex64)
    real_base = torch.randn(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OrderedDict(
            coo=d.to_sparse(),
            csr=d.to_sparse_csr(),
            csc=d.to_sparse_csc(),
            bsr=d.to_sparse_bsr((2, 2)),
            bsc=d.to_sparse_bsc((2, 3)),
            conj=complex_base[2:5].conj(),  # a conjugate view of part of a storage ...
            conjbase=complex_base,  # ... that another tensor uses whole
            neg=torch._neg_view(real_base[1:3]),
            negbase=real_base,
            qt=torch.quantize_per_tensor(torch.randn(3, 4), 0.1, 3, torch.quint8),
            qc=torch.quantize_per_channel(
                torch.randn(3, 4),
                torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                torch.tensor([1, 2, 3]),
                0,
                torch.qint8,
            ),
            dense=torch.randn(2, 2),
        )


def _values(t: torch.Tensor) -> torch.Tensor:
    """A tensor's values as plain dense memory (torch's own conversions)."""
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    return t.resolve_conj().resolve_neg()


def _same_kind_and_values(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    assert got.layout == want.layout, key
    assert got.dtype == want.dtype and got.shape == want.shape, key
    assert torch.equal(_values(got), _values(want)), key
    if want.is_quantized:
        assert got.qscheme() == want.qscheme(), key
        assert torch.equal(got.int_repr(), want.int_repr()), key
        if want.qscheme() == torch.per_tensor_affine:
            assert (got.q_scale(), got.q_zero_point()) == (want.q_scale(), want.q_zero_point()), key
        else:
            assert got.q_per_channel_axis() == want.q_per_channel_axis(), key
            assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales()), key
            assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points()), key
    if want.layout != torch.strided:  # the stored structure, not just the values
        assert got._nnz() == want._nnz(), key


def _stored_bytes(t: torch.Tensor) -> int:
    """What a sparse tensor stores: its indices and its values."""
    if t.layout == torch.sparse_coo:
        parts = [t.indices(), t.values()]
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    else:
        parts = [t.ccol_indices(), t.row_indices(), t.values()]
    return sum(p.nbytes for p in parts)


def _load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own quantized / sparse notices while loading
        return torch.load(path, weights_only=True)


def _run(*args: Any) -> subprocess.CompletedProcess[str]:
    """The console command in its own process: what a user sees on stderr, warnings included."""
    proc = subprocess.run([sys.executable, "-m", "ckptsurgeon", *map(str, args)], capture_output=True, text=True)
    assert "Warning" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def kinds_file(tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("kinds") / "kinds.pt"
    torch.save(_kinds(), path)
    return path


def test_legacy_format(tmp_path):
    """The same tensors in torch's legacy format (each kind is rebuilt by torch there too)."""
    src = tmp_path / "legacy.pt"
    torch.save(_kinds(), src, _use_new_zipfile_serialization=False)
    proc = _run("inspect", src, "--json")
    assert proc.returncode == 0
    assert {r["key"]: r.get("kind") for r in json.loads(proc.stdout)["tensors"]}["csc"] == "sparse_csc"
    out = tmp_path / "out.pt"
    assert _run("extract", src, "-o", out, "--verify").returncode == 0
    got, want = _load(out), _kinds()
    for key in want:
        _same_kind_and_values(got[key], want[key], key)


def test_inspect_says_what_each_tensor_is(cli, kinds_file):
    proc = _run("inspect", kinds_file, "--json")
    assert proc.returncode == 0
    rows = {r["key"]: r for r in json.loads(proc.stdout)["tensors"]}
    want = _kinds()
    for key in SPARSE:
        t = want[key]
        assert rows[key]["layout"] == rows[key]["kind"] == str(t.layout).removeprefix("torch.")
        assert rows[key]["nnz"] == t.values().numel()
        assert rows[key]["shape"] == [4, 6] and rows[key]["numel"] == 24
        assert rows[key]["nbytes"] == _stored_bytes(t), key
    assert rows["qt"].items() >= {"kind": "quantized", "qscheme": "per_tensor_affine", "zero_point": 3}.items()
    assert rows["qt"]["scale"] == pytest.approx(0.1)
    assert rows["qc"].items() >= {"kind": "quantized", "qscheme": "per_channel_affine", "axis": 0}.items()
    assert rows["conj"]["conj"] is True and rows["conj"]["kind"] == "conjugate view"
    assert rows["neg"]["neg"] is True and rows["neg"]["kind"] == "negative view"
    assert "kind" not in rows["dense"] and "kind" not in rows["negbase"]

    table = cli("inspect", kinds_file)
    assert table.exit_code == 0
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    assert "sparse_bsr float32 (nnz 16)" in lines["bsr"]
    assert "quantized qint8 (per_channel_affine)" in lines["qc"]
    assert "conjugate view complex64" in lines["conj"]


def test_inspect_values_stats_and_hash(kinds_file):
    proc = _run("inspect", kinds_file, "--stats", "--hash", "--verify", "--json")
    assert proc.returncode == 0
    rows = {r["key"]: r for r in json.loads(proc.stdout)["tensors"]}
    for key, t in _kinds().items():
        v = _values(t).to(torch.float64) if not t.is_complex() else None
        if v is not None:
            assert rows[key]["stats"]["max"] == pytest.approx(v.max().item()), key
            assert rows[key]["stats"]["zeros"] == int((v == 0).sum()), key


def test_extract_rename_merge_keep_every_kind(kinds_file, tmp_path):
    want = _kinds()
    out = tmp_path / "extract.pt"
    assert _run("extract", kinds_file, "-o", out, "--verify").returncode == 0
    got = _load(out)
    assert list(got) == list(want)
    for key in want:
        _same_kind_and_values(got[key], want[key], key)
    assert got["conj"].is_conj() and got["neg"].is_neg()  # the bits are kept in a torch file
    assert got["conj"].untyped_storage().data_ptr() == got["conjbase"].untyped_storage().data_ptr()

    renamed = tmp_path / "renamed.pt"
    assert _run("rename", kinds_file, "--add-prefix", "m.", "-o", renamed, "--verify").returncode == 0
    got = _load(renamed)
    for key in want:
        _same_kind_and_values(got[f"m.{key}"], want[key], key)

    other = tmp_path / "other.pt"
    torch.save({"extra": torch.ones(3)}, other)
    merged = tmp_path / "merged.pt"
    assert _run("merge", kinds_file, other, "-o", merged, "--verify").returncode == 0
    got = _load(merged)
    assert list(got) == [*want, "extra"]
    for key in want:
        _same_kind_and_values(got[key], want[key], key)


def test_diff_compares_values(cli, kinds_file, tmp_path):
    """diff compares what the tensors mean: the same values in another layout (a sparse tensor
    and its dense copy, a conjugate view and its resolved copy) are equal, as `--hash` says too;
    a quantized tensor and its dequantized copy differ in dtype."""
    same = _run("diff", kinds_file, kinds_file, "--json")  # a process of its own: its stderr is the user's
    assert same.returncode == 0 and json.loads(same.stdout)["identical"]
    want = _kinds()
    dense = tmp_path / "dense.pt"
    torch.save({k: _values(v).clone() for k, v in want.items() if not v.is_quantized}, dense)
    proc = cli("diff", kinds_file, dense, "-x", "qt", "-x", "qc", "--json")
    assert proc.exit_code == 0, proc.stdout
    changed = {k: _values(v).clone() for k, v in want.items() if not v.is_quantized}
    changed["csr"][1, 2] += 1
    changed["conj"][0, 0] += 1j
    torch.save(changed, dense)
    proc = cli("diff", kinds_file, dense, "-x", "qt", "-x", "qc", "--json")
    assert proc.exit_code == 1
    doc = json.loads(proc.stdout)
    assert sorted(m["key"] for m in doc["value_mismatches"]) == ["conj", "csr"]
    dq = tmp_path / "dq.pt"
    torch.save({k: _values(v).clone() for k, v in want.items()}, dq)
    proc = cli("diff", kinds_file, dq, "-i", "qt", "-i", "qc", "--json")
    assert proc.exit_code == 1
    assert sorted(m["key"] for m in json.loads(proc.stdout)["dtype_mismatches"]) == ["qc", "qt"]
    proc = cli("diff", kinds_file, dq, "-i", "qt", "-i", "qc", "--ignore-dtype", "--json")
    assert proc.exit_code == 0  # the values are the dequantized ones: equal
    assert json.loads(proc.stdout)["value_mismatches"] == []


@pytest.mark.parametrize("key", SPARSE + QUANTIZED)
def test_average_refuses_what_has_no_arithmetic(cli, tmp_path, key):
    path = tmp_path / f"{key}.pt"
    torch.save({key: _kinds()[key]}, path)
    out = tmp_path / "avg.pt"
    result = cli("merge", path, path, "--average", "-o", out)
    assert result.exit_code == 2
    assert f"cannot average {'sparse' if key in SPARSE else 'quantized'}" in result.stderr
    assert "only dense tensors are averaged" in result.stderr and not out.exists()


def test_average_resolves_conj_and_neg_views(cli, tmp_path):
    want = _kinds()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({k: want[k] for k in VIEWS}, a)
    torch.save({k: _values(want[k]).clone() * 3 for k in VIEWS}, b)
    out = tmp_path / "avg.pt"
    result = cli("merge", a, b, "--average", "-o", out)
    assert result.exit_code == 0, result.stderr
    got = _load(out)
    for key in VIEWS:
        torch.testing.assert_close(_values(got[key]), _values(want[key]) * 2)  # the mean of x and 3x


def test_safetensors_output(cli, tmp_path, kinds_file):
    """safetensors holds plain dense tensors: a sparse or quantized tensor is refused naming it
    (exit 2, nothing written); a conj/neg view is written as its values, with a notice."""
    out = tmp_path / "out.safetensors"
    for key in SPARSE + QUANTIZED:
        result = cli("extract", kinds_file, "-i", key, "-o", out)
        assert result.exit_code == 2 and f"tensor '{key}' to safetensors" in result.stderr
        assert not out.exists()
    result = cli("extract", kinds_file, "-i", "conj", "-i", "neg", "-o", out, "--verify")
    assert result.exit_code == 0, result.stderr
    assert "resolved into the values of conj, neg" in result.stderr
    from safetensors.torch import load_file

    got = load_file(str(out))
    want = _kinds()
    for key in ("conj", "neg"):
        assert torch.equal(got[key], _values(want[key]))


def test_dtype_casts_sparse_and_neg_keeps_quantized_and_conj(cli, tmp_path, kinds_file):
    out = tmp_path / "half.pt"
    result = cli("extract", kinds_file, "-o", out, "--dtype", "float16", "--json")
    assert result.exit_code == 0, result.stderr
    want = _kinds()
    floats = [k for k, t in want.items() if t.is_floating_point()]
    assert json.loads(result.stdout)["cast"] == floats
    got = _load(out)
    for key, t in want.items():
        if key in floats:
            assert got[key].dtype == torch.float16 and got[key].layout == t.layout, key
            assert torch.equal(_values(got[key]), _values(t.to(torch.float16))), key
        else:
            _same_kind_and_values(got[key], t, key)


def test_any_other_warning_is_one_notice_line(tmp_path):
    """A warning that is not torch's known noise (here: from the model's own code, run by
    `--model`) is said as one `warning:` line, without the file name and source line."""
    (tmp_path / "net.py").write_text(
        "import warnings\n"
        "import torch\n"
        "warnings.warn('this model is old\\nsecond line', UserWarning)\n"
        "class Net(torch.nn.Linear):\n"
        "    def __init__(self):\n"
        "        super().__init__(2, 2)\n"
    )
    ckpt = tmp_path / "net.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), ckpt)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "inspect", str(ckpt), "--model", f"{tmp_path / 'net.py'}:Net"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["warning: this model is old"]
