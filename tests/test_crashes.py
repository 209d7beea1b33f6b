"""No segfault and no exit 3 on valid checkpoints: every dtype x layout x device tag torch can
save, through every command (tests/crashes_sweep.py), plus the cases of the review's issue with
the values they must give.

Commands that crashed the old code with SIGSEGV run in subprocesses, so that a crash fails one
test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ckptsurgeon.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import crashes_sweep

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a fresh process (a segfault shows as returncode -11)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*ckptsurgeon-tmp*"))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line and "tensor = " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)


# ------------------------------------------------------------------------------------------ sweep


def test_every_command_over_every_dtype_layout_and_device_exits_0_1_or_2(tmp_path: Path) -> None:
    full = os.environ.get("CKPTSURGEON_FULL_SWEEP") == "1"
    combos, commands = crashes_sweep.build(tmp_path, full=full)
    assert len({c.dtype for c in combos}) == len(crashes_sweep.DTYPES)  # every dtype made it
    assert {c.layout for c in combos} == set(crashes_sweep.LAYOUTS)
    assert {c.device for c in combos} == set(crashes_sweep.DEVICES)
    results = crashes_sweep.run(tmp_path, commands)
    assert len(results) == len(commands)
    bad = []
    for r in results:
        code = r.get("exit")
        allowed = {0, 1, 2} if r["args"][0] == "diff" else {0, 2}
        if "signal" in r or code not in allowed:
            bad.append(
                f"{' '.join(r['args'])}: {r.get('signal') and 'signal ' + str(r['signal']) or code}: "
                f"{r['stderr'][-300:]}"
            )
        elif code == 2:
            errors = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
            if len(errors) != 1 or "Traceback" in r["stderr"]:
                bad.append(f"{' '.join(r['args'])}: exit 2 without exactly one error line: {r['stderr'][-300:]}")
    assert not bad, f"{len(bad)} bad runs:\n" + "\n".join(bad[:40])
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the cases


def test_diff_of_quantized_tensors_compares_their_values(tmp_path: Path) -> None:
    a = torch.quantize_per_tensor(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0.5, 2, torch.quint8)
    b = torch.quantize_per_tensor(torch.tensor([0.0, 1.0, 2.5, 3.0]), 0.5, 2, torch.quint8)
    torch.save({"q": a}, tmp_path / "a.pt")
    torch.save({"q": b}, tmp_path / "b.pt")
    same = cli("diff", "a.pt", "a.pt", "--json", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["num_equal"] == 1
    differ = cli("diff", "a.pt", "b.pt", "--json", cwd=tmp_path)
    assert differ.returncode == 1, differ.stderr
    (m,) = json.loads(differ.stdout)["value_mismatches"]
    assert m["key"] == "q" and m["num_different"] == 1 and m["max_abs_diff"] == pytest.approx(0.5)


def test_extract_verify_of_quantized_and_sparse_tensors_keeps_them(tmp_path: Path) -> None:
    q = torch.quantize_per_channel(
        torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1, 2]), 0, torch.qint8
    )
    sparse = torch.eye(4).to_sparse_csr()
    torch.save({"q": q, "s": sparse, "d": torch.arange(4.0)}, tmp_path / "in.pt")
    r = cli("extract", "in.pt", "-o", "out.pt", "--verify", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["q"].dtype == torch.qint8 and torch.equal(out["q"].int_repr(), q.int_repr())
    assert torch.equal(out["q"].q_per_channel_scales(), q.q_per_channel_scales())
    assert out["s"].layout == torch.sparse_csr and torch.equal(out["s"].to_dense(), torch.eye(4))
    assert leftovers(tmp_path) == []


def test_merge_average_of_meta_tensors_is_refused_cleanly(tmp_path: Path) -> None:
    torch.save({"w": torch.empty(3, device="meta")}, tmp_path / "a.pt")
    torch.save({"w": torch.empty(3, device="meta")}, tmp_path / "b.pt")
    r = cli("merge", "a.pt", "b.pt", "--average", "-o", "avg.pt", cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "meta" in one_error_line(r.stderr) and "'w'" in r.stderr
    assert not (tmp_path / "avg.pt").exists() and leftovers(tmp_path) == []


def test_diff_of_meta_tensors_says_there_are_no_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.empty(3, device="meta")}, tmp_path / "a.pt")
    assert main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "meta" in line and "'w'" in line and "no data" in line


def test_extract_verify_of_meta_tensors_writes_them(tmp_path: Path) -> None:
    torch.save({"w": torch.empty(2, 3, device="meta")}, tmp_path / "a.pt")
    assert main(["extract", str(tmp_path / "a.pt"), "-o", str(tmp_path / "o.pt"), "--verify"]) == 0
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert out["w"].is_meta and out["w"].shape == (2, 3)


def test_merge_average_of_float8_averages_in_float32(tmp_path: Path) -> None:
    a = torch.tensor([1.0, 2.0, -4.0, 8.0]).to(torch.float8_e4m3fn)
    b = torch.tensor([3.0, 2.0, 4.0, 16.0]).to(torch.float8_e4m3fn)
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    assert (
        main(["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--average", "-o", str(tmp_path / "m.pt")]) == 0
    )
    out = torch.load(tmp_path / "m.pt", weights_only=True)["w"]
    assert out.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(out.float(), torch.tensor([2.0, 2.0, 0.0, 12.0]), rtol=0.07, atol=0.0)


@pytest.mark.parametrize("dtype", ["bits8", "bits16", "float4_e2m1fn_x2"])
def test_merge_average_of_bit_patterns_is_refused(
    tmp_path: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    t = crashes_sweep.dense(dtype, 1)
    torch.save({"w": t}, tmp_path / "a.pt")
    torch.save({"w": crashes_sweep.dense(dtype, 2)}, tmp_path / "b.pt")
    assert (
        main(["merge", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--average", "-o", str(tmp_path / "m.pt")]) == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot average {dtype} tensor 'w'" in line
    assert not (tmp_path / "m.pt").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", ["bits16", "float4_e2m1fn_x2"])
def test_diff_of_bit_patterns_counts_the_elements_that_differ(
    tmp_path: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a = crashes_sweep.dense(dtype, 1)
    raw = a.view(torch.uint8).clone()
    raw.view(-1)[:3] ^= 1  # elements 0 and 1 (bits16: both in element 0)
    b = raw.view(a.dtype)
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    assert main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json"]) == 1
    (m,) = json.loads(capsys.readouterr().out)["value_mismatches"]
    expected = int((a.view(torch.uint8) != b.view(torch.uint8)).view(-1, a.element_size()).any(1).sum())
    assert m["num_different"] == expected and m["max_abs_diff"] is None and m["numel"] == a.numel()


@pytest.mark.parametrize("dtype", ["complex128", "complex32", "bits8", "bits16", "quint8"])
def test_safetensors_output_of_a_dtype_safetensors_lacks_is_refused(
    tmp_path: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"w": crashes_sweep.dense(dtype, 1)}, tmp_path / "a.pt")
    assert main(["extract", str(tmp_path / "a.pt"), "-o", str(tmp_path / "o.safetensors")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'w'" in line and dtype in line and "safetensors" in line
    assert not (tmp_path / "o.safetensors").exists() and leftovers(tmp_path) == []


def test_safetensors_output_of_a_conjugate_view_holds_its_values(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    z = torch.complex(torch.arange(4.0), torch.ones(4))
    torch.save({"z": z.conj()}, tmp_path / "a.pt")
    assert main(["extract", str(tmp_path / "a.pt"), "-o", str(tmp_path / "o.safetensors"), "--verify"]) == 0
    out = load_file(tmp_path / "o.safetensors")["z"]
    assert not out.is_conj() and torch.equal(out, z.conj().resolve_conj())


def _deep(depth: int, leaf: object) -> list[object]:
    top: list[object] = []
    node = top
    for _ in range(depth - 1):
        child: list[object] = []
        node.append(child)
        node = child
    node.append(leaf)
    return top


def _depth(x: object) -> int:
    n = 0
    while isinstance(x, list):
        x, n = x[0], n + 1
    return n


@pytest.mark.parametrize("depth", [500, 995])
@pytest.mark.parametrize("path", ["engine", "torch"])  # a sparse tensor sends the file through torch.save
def test_rename_keeps_a_container_nested_as_deep_as_the_reader_accepts(tmp_path: Path, depth: int, path: str) -> None:
    sd = {"w": torch.arange(3.0)}
    if path == "torch":
        sd["s"] = torch.eye(3).to_sparse()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # torch.save's own pickler needs it to write the input
    try:
        torch.save({"state_dict": sd, "deep": _deep(depth, "leaf")}, tmp_path / "in.pt")
    finally:
        sys.setrecursionlimit(limit)
    assert (
        main(["rename", str(tmp_path / "in.pt"), "-o", str(tmp_path / "out.pt"), "--add-prefix", "m.", "--verify"]) == 0
    )
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(out["state_dict"]) == ["m." + k for k in sd] and torch.equal(
        out["state_dict"]["m.w"], torch.arange(3.0)
    )
    if path == "torch":
        assert torch.equal(out["state_dict"]["m.s"].to_dense(), torch.eye(3))
    assert _depth(out["deep"]) == depth
    assert sys.getrecursionlimit() == limit


def _safetensors_file(path: Path, shape: list[int]) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("shape", [[2**62, 2**62, 0], [0, 2**40, 2**40], [2**63 - 1, 2, 0]])
def test_a_shape_whose_numel_overflows_int64_is_refused(
    tmp_path: Path, shape: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    _safetensors_file(tmp_path / "big.safetensors", shape)
    for args in (["inspect"], ["extract", "-o", str(tmp_path / "o.pt"), "--verify"]):
        assert main([args[0], str(tmp_path / "big.safetensors"), *args[1:]]) == 2
        assert "overflows int64" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.pt").exists()


def test_a_pickled_tensor_whose_numel_overflows_int64_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"w": torch.zeros(0)}, tmp_path / "ok.pt")
    # storage offset 0, size (0,), stride (1,) as torch.save pickles them -> size (2**62, 2**62, 0)
    small = b"K\x00K\x00\x85q\x08K\x01\x85"
    big = b"\x8a\x08" + (2**62).to_bytes(8, "little")
    reader = torch._C.PyTorchFileReader(str(tmp_path / "ok.pt"))
    out = torch._C.PyTorchFileWriter(str(tmp_path / "big.pt"))
    for name in reader.get_all_records():
        record = reader.get_record(name)
        if name.endswith("data.pkl"):
            assert record.count(small) == 1
            record = record.replace(small, b"K\x00" + big + big + b"K\x00\x87q\x08K\x01K\x01K\x01\x87")
        out.write_record(name, record, len(record))
    out.write_end_of_file()
    with pytest.raises(Exception, match="overflow"):  # torch refuses it
        torch.load(tmp_path / "big.pt", weights_only=True)
    assert main(["inspect", str(tmp_path / "big.pt")]) == 2
    assert "overflows int64" in one_error_line(capsys.readouterr().err)
