"""diff's statistics of a value mismatch (issue 13): `mean_abs_diff`, `rel_l2` and `cosine` equal
torch's float64 computation within float64 rounding, for every dtype and every path the values
take (raw bytes with numpy, torch for what numpy cannot widen, promoted pairs across dtypes); the
edge cases give what the README says; and the report is the same for every `--jobs N`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckptsurgeon import jobs
from ckptsurgeon.diff import diff_state_dicts
from ckptsurgeon.engine.read import read_checkpoint


def reference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """torch's own float64 (complex128) computation of the three statistics."""
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    x, y = a.to(wide).reshape(-1), b.to(wide).reshape(-1)
    d = (x - y).abs()
    return {
        "mean_abs_diff": d.mean().item(),
        "rel_l2": (torch.linalg.vector_norm(d) / torch.linalg.vector_norm(y)).item(),
        "cosine": ((x * y.conj()).real.sum() / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))).item(),
    }


def assert_close(got: dict[str, Any], want: dict[str, float]) -> None:
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-300), (got["key"], name)


def pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) of every dtype; the large ones span many of the pieces statistics are computed on,
    some of which are equal in both (the sums of those pieces are taken from one side)."""
    torch.manual_seed(0)
    big = torch.randn(300_000) * 3 + 1
    half_changed = big.clone()
    half_changed[200_000:] += torch.randn(100_000) * 1e-3  # the first pieces are bit-identical
    out = {
        "f32_big": (big, half_changed),
        "f64": (torch.randn(5000, dtype=torch.float64), torch.randn(5000, dtype=torch.float64)),
        "f16": (torch.randn(777).half(), torch.randn(777).half()),
        "bf16": (torch.randn(40, 50).bfloat16(), torch.randn(40, 50).bfloat16()),
        "i64": (torch.randint(-1000, 1000, (3000,)), torch.randint(-1000, 1000, (3000,))),
        "i8": (torch.randint(-100, 100, (300,), dtype=torch.int8), torch.randint(-100, 100, (300,), dtype=torch.int8)),
        "u8": (torch.randint(0, 255, (300,), dtype=torch.uint8), torch.randint(0, 255, (300,), dtype=torch.uint8)),
        "bool": (torch.rand(500) > 0.5, torch.rand(500) > 0.5),
        "f8": (torch.randn(600).to(torch.float8_e4m3fn), torch.randn(600).to(torch.float8_e4m3fn)),
        "c64": (torch.randn(400, dtype=torch.complex64), torch.randn(400, dtype=torch.complex64)),
        "negated": (torch.arange(1.0, 101.0), -torch.arange(1.0, 101.0)),  # cosine -1
    }
    return out


def test_statistics_equal_torch_in_float64_for_every_dtype(cli: Any, tmp_path: Path) -> None:
    src = pairs()
    torch.save({k: a for k, (a, _) in src.items()}, tmp_path / "a.pt")
    torch.save({k: b for k, (_, b) in src.items()}, tmp_path / "b.pt")
    result = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json")
    assert result.exit_code == 1, result.stderr
    rows = {m["key"]: m for m in json.loads(result.stdout)["value_mismatches"]}
    assert set(rows) == set(src)
    for key, (a, b) in src.items():
        assert_close(rows[key], reference(a, b))
    assert rows["negated"]["cosine"] == pytest.approx(-1.0, rel=1e-12)
    assert rows["negated"]["rel_l2"] == pytest.approx(2.0, rel=1e-12)


def test_statistics_of_tensors_held_by_torch_and_of_promoted_pairs() -> None:
    """The torch path (in-memory tensors, a strided view) and a pair of two dtypes (float32
    against its bfloat16 cast, compared after promotion) give the same statistics as torch."""
    torch.manual_seed(1)
    a = torch.randn(300, 200)
    cases = {
        "view": (a.t(), (a + 0.01).t()),
        "cast": (a, a.bfloat16()),
        "f64": (a.double(), a.double() * 1.5),
    }
    report = diff_state_dicts({k: x for k, (x, _) in cases.items()}, {k: y for k, (_, y) in cases.items()})
    rows = {m.key: m.to_dict() for m in report.value_mismatches}
    for key, (x, y) in cases.items():
        assert_close(rows[key], reference(x, y))


def test_statistics_across_file_formats_agree(tmp_path: Path) -> None:
    """safetensors against a torch zip: the same numbers as two torch zips (numpy path both)."""
    src = pairs()
    a = {k: x.contiguous() for k, (x, _) in src.items() if k not in ("c64",)}
    b = {k: y.contiguous() for k, (_, y) in src.items() if k not in ("c64",)}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    save_file(b, str(tmp_path / "b.safetensors"))
    pt = jobs.diff(tmp_path / "a.pt", tmp_path / "b.pt").to_dict()
    st = jobs.diff(tmp_path / "a.pt", tmp_path / "b.safetensors").to_dict()
    assert pt["value_mismatches"] == st["value_mismatches"]


def test_edge_cases_are_null_in_strict_json(cli: Any, tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    a = {
        "b_zero": torch.tensor([1.0, 2.0]),  # ||b|| = 0: rel_l2 infinite (null), cosine undefined (null)
        "a_zero": torch.zeros(3),  # ||a|| = 0: cosine undefined; rel_l2 = 1
        "nan_in_a": torch.tensor([nan, 1.0, 2.0]),  # NaN against a number: d infinite, no norms
        "same_nan": torch.tensor([nan, 1.0, 2.0]),  # NaN against NaN counts as equal (d = 0)
        "inf": torch.tensor([inf, 1.0]),
        "bits": torch.tensor([1, 2, 3], dtype=torch.uint8).view(torch.bits8),
    }
    b = {
        "b_zero": torch.zeros(2),
        "a_zero": torch.tensor([1.0, 2.0, 2.0]),
        "nan_in_a": torch.tensor([0.0, 1.0, 2.5]),
        "same_nan": torch.tensor([nan, 1.0, 3.0]),
        "inf": torch.tensor([inf, 2.0]),
        "bits": torch.tensor([1, 2, 4], dtype=torch.uint8).view(torch.bits8),
    }
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    result = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json")
    assert result.exit_code == 1, result.stderr

    def refuse(name: str) -> None:
        raise AssertionError(f"not strict JSON: {name}")

    rows = {m["key"]: m for m in json.loads(result.stdout, parse_constant=refuse)["value_mismatches"]}
    assert rows["b_zero"]["rel_l2"] is None and rows["b_zero"]["cosine"] is None
    assert rows["b_zero"]["mean_abs_diff"] == pytest.approx(1.5, rel=1e-12)
    assert rows["a_zero"]["cosine"] is None and rows["a_zero"]["rel_l2"] == pytest.approx(1.0, rel=1e-12)
    assert rows["nan_in_a"]["mean_abs_diff"] is None  # infinite, as max_abs_diff
    assert rows["nan_in_a"]["rel_l2"] is None and rows["nan_in_a"]["cosine"] is None
    assert rows["same_nan"]["mean_abs_diff"] == pytest.approx(1 / 3, rel=1e-12)
    assert rows["same_nan"]["rel_l2"] is None and rows["same_nan"]["cosine"] is None
    assert rows["inf"]["mean_abs_diff"] == pytest.approx(0.5, rel=1e-12)  # inf against inf: d = 0
    assert rows["inf"]["rel_l2"] is None and rows["inf"]["cosine"] is None
    assert rows["bits"]["num_different"] == 1
    assert rows["bits"]["mean_abs_diff"] is rows["bits"]["rel_l2"] is rows["bits"]["cosine"] is None
    report = jobs.diff(tmp_path / "a.pt", tmp_path / "b.pt").report
    b_zero = next(m for m in report.value_mismatches if m.key == "b_zero")
    assert b_zero.rel_l2 == math.inf and math.isnan(b_zero.cosine)


def test_text_table_shows_the_statistics(cli: Any, tmp_path: Path) -> None:
    torch.save({"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}, tmp_path / "a.pt")
    torch.save({"w": torch.tensor([1.0, 2.0, 3.0, 5.0])}, tmp_path / "b.pt")
    result = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert result.exit_code == 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("w "))
    ref = reference(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert "values: 1 of 4 differ, max abs 1, max rel 0.2, mean abs 0.25" in row
    rel_l2 = float(row.split("rel l2 ")[1].split(",")[0])
    cosine = float(row.split("cosine ")[1])
    assert rel_l2 == pytest.approx(ref["rel_l2"], rel=1e-5) and cosine == pytest.approx(ref["cosine"], rel=1e-7)


# ------------------------------------------------------------------------------------ --jobs


def test_diff_report_is_the_same_for_every_jobs(cli: Any, tmp_path: Path) -> None:
    src = pairs()
    torch.save({k: a for k, (a, _) in src.items()}, tmp_path / "a.pt")
    torch.save({k: b for k, (_, b) in src.items()}, tmp_path / "b.pt")
    torch.manual_seed(5)
    b_other = {k: b for k, (_, b) in src.items()}
    b_other["f32_big"] = b_other["f32_big"].bfloat16()  # a dtype mismatch: compared after promotion
    torch.save(b_other, tmp_path / "b_cast.pt")
    for other in ("b.pt", "b_cast.pt"):
        outputs = set()
        for n in ("1", "2", "3", "4"):
            result = cli("diff", tmp_path / "a.pt", tmp_path / other, "--json", "--jobs", n, "--ignore-dtype")
            assert result.exit_code == 1, result.stderr
            doc = json.loads(result.stdout)
            doc.pop("bytes_read")  # I/O accounting: threads may read a piece the first difference made moot
            outputs.add(json.dumps(doc))
        assert len(outputs) == 1, other
    with pytest.raises(Exception, match="--jobs 0"):
        jobs.diff(tmp_path / "a.pt", tmp_path / "b.pt", loading=jobs.Loading(jobs=0))


def test_inspect_values_are_the_same_for_every_jobs(cli: Any, tmp_path: Path) -> None:
    src = {k: a for k, (a, _) in pairs().items()}
    src["tied"] = src["f32_big"]
    torch.save(src, tmp_path / "a.pt")
    outputs = {
        cli("inspect", tmp_path / "a.pt", "--json", "--stats", "--hash", "--jobs", n).stdout for n in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_meta_tensors_of_the_engine_are_compared_without_torch_in_a_subprocess(tmp_path: Path) -> None:
    """The numpy path really is the one on-disk float32 takes: the statistics come without
    importing torch."""
    import os
    import subprocess
    import sys

    torch.save({"w": torch.randn(1000)}, tmp_path / "a.pt")
    torch.save({"w": torch.randn(1000)}, tmp_path / "b.pt")
    assert all(type(v).__name__ == "TensorMeta" for v in read_checkpoint(tmp_path / "a.pt").obj.values())
    code = (
        "import sys; from ckptsurgeon import jobs; "
        f"r = jobs.diff({str(tmp_path / 'a.pt')!r}, {str(tmp_path / 'b.pt')!r}, loading=jobs.Loading(jobs=2)); "
        "m = r.report.value_mismatches[0]; print(m.cosine < 1, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["True", "False"], out.stderr
