"""`inspect --stats`, `--check-finite`, `--hash` (issue 13): statistics equal to torch's in float64,
exit codes of the finiteness gate, and content hashes equal across file formats and layouts."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckptsurgeon.engine.meta import TensorMeta
from ckptsurgeon.engine.read import read_checkpoint


def tensor_values(*args: Any, **kwargs: Any) -> Any:
    from ckptsurgeon.stats import tensor_values  # imported here: the CLI tests also run on the code before it

    return tensor_values(*args, **kwargs)


def _specials() -> torch.Tensor:
    t = torch.randn(64)
    t[3], t[10], t[20], t[21] = float("nan"), float("inf"), -float("inf"), 0.0
    return t


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "f32": torch.randn(40, 33) * 3 + 1,
        "f16": torch.randn(300).half(),
        "bf16": torch.randn(7, 9).bfloat16(),
        "f64": torch.randn(1000, dtype=torch.float64),
        "i64": torch.randint(-1000, 1000, (500,)),
        "i8": torch.randint(-100, 100, (77,), dtype=torch.int8),
        "u8": torch.randint(0, 255, (50,), dtype=torch.uint8),
        "bool": torch.rand(90) > 0.3,
        "transposed": torch.randn(30, 20).t(),  # a strided view of its own storage
        "zeros": torch.zeros(5, 5),
        "one": torch.tensor([2.5]),
        "scalar": torch.tensor(-4.0),
        "empty": torch.zeros(0, 3),
        "nan_inf": _specials(),
        "only_inf": torch.tensor([1.0, float("inf")]),
    }


def reference(t: torch.Tensor) -> dict[str, Any] | None:
    """torch's own statistics, in float64."""
    if t.numel() == 0:
        return None
    x = t.to(torch.float64)
    return {
        "min": x.min().item(),
        "max": x.max().item(),
        "mean": x.mean().item(),
        "std": x.std(correction=1).item() if t.numel() > 1 else math.nan,
        "nan": int(t.isnan().sum()) if t.is_floating_point() else 0,
        "inf": int(t.isinf().sum()) if t.is_floating_point() else 0,
        "zeros": int((t == 0).sum()),
    }


def assert_stats(got: dict[str, Any] | None, want: dict[str, Any] | None, scale: float) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None
    assert {k: got[k] for k in ("nan", "inf", "zeros")} == {k: want[k] for k in ("nan", "inf", "zeros")}
    for name in ("min", "max", "mean", "std"):
        a, b = got[name], want[name]
        if math.isnan(b):
            assert a is None or math.isnan(a), (name, a, b)
        elif math.isinf(b):  # strict JSON has no Infinity: null there (the counts say which)
            assert a is None or a == b, (name, a, b)
        else:
            assert a is not None
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12 * scale), (name, a, b)


def _scale(t: torch.Tensor) -> float:
    x = t.to(torch.float64)
    finite = x[x.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 1.0


def _hash(t: torch.Tensor) -> str:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _inspect_json(cli: Any, path: Path, *args: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    result = cli("inspect", path, "--json", *args)
    assert result.exit_code in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    return result.exit_code, doc, {row["key"]: row for row in doc["tensors"]}


def _meta(path: Path) -> dict[str, Any]:
    obj = read_checkpoint(path).obj
    assert all(isinstance(v, TensorMeta) for v in obj.values())
    return dict(obj)


# ----------------------------------------------------------------------------------- --stats


def test_stats_equal_torch_for_every_dtype(cli: Any, tmp_path: Path) -> None:
    src = tensors()
    path = tmp_path / "all.pt"
    torch.save(src, path)
    code, doc, rows = _inspect_json(cli, path, "--stats")
    assert code == 0  # --stats alone never fails on NaN
    assert "non_finite" not in doc
    for key, t in src.items():
        assert "sha256" not in rows[key]
        assert_stats(rows[key]["stats"], reference(t), _scale(t) if t.numel() else 1.0)


def test_stats_stream_over_many_chunks(tmp_path: Path) -> None:
    """Chunks of 64 bytes: the pairwise float64 merge of partial results equals one torch pass,
    also for a strided view and for NaN/Inf in a later chunk."""
    torch.manual_seed(1)
    src = {
        "big": torch.randn(20_000) * 5 + 100,
        "bf16": torch.randn(3001).bfloat16(),
        "ints": torch.randint(0, 10**6, (4099,)),
        "view": torch.randn(200, 31).t(),
        "late_nan": torch.cat([torch.randn(1000), torch.tensor([float("nan")])]),
    }
    path = tmp_path / "big.pt"
    torch.save(src, path)
    for key, meta in _meta(path).items():
        for chunk in (64, 1 << 20):
            v = tensor_values(meta, key, stats=True, chunk_bytes=chunk)
            assert v.stats is not None
            assert_stats(v.stats.to_dict(), reference(src[key]), _scale(src[key]))


def test_float8_stats_widened_through_torch(tmp_path: Path) -> None:
    t = torch.randn(100).to(torch.float8_e4m3fn)
    path = tmp_path / "f8.pt"
    torch.save({"w": t}, path)
    v = tensor_values(_meta(path)["w"], "w", stats=True, sha256=True)
    assert v.stats is not None
    assert_stats(v.stats.to_dict(), reference(t.to(torch.float32)), 500.0)
    assert v.sha256 == hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def test_torch_held_tensors_use_their_values() -> None:
    """A quantized tensor (the engine hands such tensors to torch): the stats of its dequantized values."""
    q = torch.quantize_per_tensor(torch.randn(50), scale=0.1, zero_point=3, dtype=torch.qint8)
    v = tensor_values(q, "q", stats=True)
    assert v.stats is not None
    assert_stats(v.stats.to_dict(), reference(q.dequantize()), 20.0)


def test_stats_same_in_every_format(cli: Any, tmp_path: Path) -> None:
    src = {k: v.contiguous() for k, v in tensors().items() if k != "scalar"}
    paths = [tmp_path / "a.pt", tmp_path / "b_legacy.pt", tmp_path / "c.safetensors"]
    torch.save(src, paths[0])
    torch.save(src, paths[1], _use_new_zipfile_serialization=False)
    save_file(src, str(paths[2]))
    docs = [_inspect_json(cli, p, "--stats", "--hash")[2] for p in paths]
    assert {d["format"] for d in (_inspect_json(cli, p)[1] for p in paths)} == {
        "torch-zip",
        "torch-legacy",
        "safetensors",
    }
    for key in src:
        assert docs[0][key]["stats"] == docs[1][key]["stats"] == docs[2][key]["stats"]
        assert docs[0][key]["sha256"] == docs[1][key]["sha256"] == docs[2][key]["sha256"] == _hash(src[key])


def test_stats_table_shows_the_columns(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.tensor([0.0, 1.0, 2.0, float("nan")]), "e": torch.zeros(0)}, path)
    result = cli("inspect", path, "--stats")
    assert result.exit_code == 0, result.stderr
    header, w_row, e_row = result.stdout.splitlines()[1:4]
    assert header.split() == [
        "key",
        "shape",
        "dtype",
        "numel",
        "bytes",
        "min",
        "max",
        "mean",
        "std",
        "nan",
        "inf",
        "zeros",
    ]
    assert w_row.split()[-7:] == ["nan", "nan", "nan", "nan", "1", "0", "1"]
    assert e_row.split()[0] == "e" and len(e_row.split()) == 6  # empty: no statistics


# ------------------------------------------------------------------------------ --check-finite


def test_check_finite_fails_and_names_the_tensors(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "diverged.pt"
    torch.save(tensors(), path)
    result = cli("inspect", path, "--check-finite")
    assert result.exit_code == 1
    assert "nan_inf" in result.stderr and "only_inf" in result.stderr and "f32" not in result.stderr
    code, doc, rows = _inspect_json(cli, path, "--check-finite")
    assert code == 1
    assert doc["non_finite"] == ["nan_inf", "only_inf"]
    assert "stats" not in rows["f32"]  # the gate alone adds no columns
    code, doc, rows = _inspect_json(cli, path, "--check-finite", "--stats")
    assert code == 1 and doc["non_finite"] == ["nan_inf", "only_inf"]
    assert rows["nan_inf"]["stats"]["nan"] == 1 and rows["nan_inf"]["stats"]["inf"] == 2


def test_check_finite_passes_on_a_clean_file_or_selection(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "diverged.pt"
    torch.save(tensors(), path)
    code, doc, _ = _inspect_json(cli, path, "--check-finite", "-x", "nan_inf", "-x", "only_inf")
    assert code == 0 and doc["non_finite"] == []
    result = cli("inspect", path, "--check-finite", "-i", "f32")
    assert result.exit_code == 0, result.stderr
    clean = tmp_path / "clean.safetensors"
    save_file({"a": torch.randn(10), "b": torch.arange(4)}, str(clean))
    assert cli("inspect", clean, "--check-finite").exit_code == 0


# ------------------------------------------------------------------------------------- --hash


def test_hash_equal_for_a_view_and_its_contiguous_copy(cli: Any, tmp_path: Path) -> None:
    torch.manual_seed(2)
    base = torch.randn(12, 7)
    bf = torch.randn(5, 6).bfloat16()
    src = {
        "view": base.t(),
        "copy": base.t().contiguous(),
        "bf_view": bf.t(),
        "bf_copy": bf.t().contiguous(),
        "sliced": base[2:9:3, 1:],
    }
    for legacy in (False, True):
        path = tmp_path / f"views_{legacy}.pt"
        torch.save(src, path, _use_new_zipfile_serialization=not legacy)
        _, _, rows = _inspect_json(cli, path, "--hash")
        assert rows["view"]["sha256"] == rows["copy"]["sha256"] == _hash(base.t())
        assert rows["bf_view"]["sha256"] == rows["bf_copy"]["sha256"] == _hash(bf.t())
        assert rows["sliced"]["sha256"] == _hash(base[2:9:3, 1:])
        assert "stats" not in rows["view"]
    result = cli("inspect", tmp_path / "views_False.pt", "--hash", "-i", "view")
    assert result.exit_code == 0 and _hash(base.t()) in result.stdout


def test_hash_of_an_empty_tensor_is_sha256_of_nothing(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "e.pt"
    torch.save({"e": torch.zeros(0, 4)}, path)
    _, _, rows = _inspect_json(cli, path, "--hash", "--stats")
    assert rows["e"]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert rows["e"]["stats"] is None


@pytest.mark.parametrize("flag", ["--stats", "--check-finite", "--hash"])
def test_values_options_leave_the_metadata_rows_unchanged(cli: Any, tmp_path: Path, flag: str) -> None:
    path = tmp_path / "cnn.pt"
    torch.save(tensors(), path)
    _, plain, _ = _inspect_json(cli, path)
    _, doc, _ = _inspect_json(cli, path, flag)
    doc.pop("non_finite", None)
    for row in doc["tensors"]:
        row.pop("stats", None)
        row.pop("sha256", None)
    assert doc.pop("bytes_read") > plain.pop("bytes_read")  # the values were read, the metadata only before
    assert doc.pop("requests") == plain.pop("requests") == 0  # a local file: no request to a store
    assert doc == plain


def test_console_script_gate_without_torch(tmp_path: Path) -> None:
    """The installed command (its Typer-free parser) takes the options, exits 1 on a diverged
    file, and reads plain float32 / int64 / float16 values without importing torch."""
    import os
    import subprocess
    import sys

    path = tmp_path / "run.pt"
    torch.save({"w": torch.tensor([1.0, float("nan")]), "n": torch.arange(3), "h": torch.ones(2).half()}, path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run(
        ["ckptsurgeon", "inspect", str(path), "--check-finite", "--stats", "--hash", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["non_finite"] == ["w"]
    assert "w (1 NaN, 0 Inf)" in r.stderr
    code = (
        "import sys; from ckptsurgeon import jobs; "
        f"r = jobs.inspect({str(path)!r}, stats=True, check_finite=True, sha256=True); "
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["1", "False"], out.stderr


def test_strided_views_on_disk_by_their_strides(tmp_path: Path) -> None:
    """Views read from their span by their strides (no torch): a broadcast (stride 0), a slice
    with an offset, an empty view, bfloat16 and int16 views."""
    torch.manual_seed(3)
    base = torch.randn(9, 8)
    src = {
        "expanded": torch.randn(1, 6).expand(4, 6),
        "offset": base[3:, 2:7:2],
        "empty": base.t()[:, :0],
        "bf16": base.bfloat16().t()[1:],
        "i16": torch.arange(60, dtype=torch.int16).reshape(6, 10)[:, ::3],
    }
    path = tmp_path / "views.pt"
    torch.save(src, path)
    metas = _meta(path)
    assert not metas["offset"].is_contiguous and not metas["expanded"].is_contiguous
    for key, t in src.items():
        for chunk in (16, 1 << 20):
            v = tensor_values(metas[key], key, stats=True, sha256=True, chunk_bytes=chunk)
            assert v.sha256 == _hash(t), key
            assert_stats(v.stats.to_dict() if v.stats else None, reference(t), _scale(t) if t.numel() else 1.0)


# ------------------------------------------------------------------------- widening, threads


@pytest.mark.parametrize(
    "dtype", ["float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
)
def test_every_bit_pattern_widens_as_torch_widens_it(dtype: str) -> None:
    """float16 and the float8 formats are widened by table look-up, without torch: every bit
    pattern gives torch's own value (NaN where torch says NaN)."""
    from ckptsurgeon.stats import _float8_table, _float16_table

    bits = 16 if dtype == "float16" else 8
    patterns = torch.arange(1 << bits, dtype=torch.int32).to(torch.uint16 if bits == 16 else torch.uint8)
    want = patterns.view(getattr(torch, dtype)).to(torch.float64)
    got = torch.from_numpy(_float16_table() if bits == 16 else _float8_table(dtype)).to(torch.float64)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])  # exact: both are the same real numbers


def test_statistics_and_hashes_do_not_depend_on_threads_or_pieces(tmp_path: Path) -> None:
    """Many pieces (tiny blocks) shared out among 1-3 threads: the same results each time, equal
    to torch's; the CRC-32 of each record, checked from its pieces' CRCs, passes."""
    from ckptsurgeon.stats import values_of

    torch.manual_seed(4)
    src = {
        "a": torch.randn(50_000) * 2 + 3,
        "b": torch.randn(3000).bfloat16(),
        "c": torch.randint(-5, 5, (7000,), dtype=torch.int16),
        "d": torch.cat([torch.randn(4000), torch.tensor([float("inf")])]),
    }
    path = tmp_path / "many.pt"
    torch.save(src, path)
    metas = _meta(path)
    results = []
    for threads in (1, 2, 3):
        for sha256 in (False, True):
            values = values_of(metas.items(), stats=True, sha256=sha256, threads=threads, chunk_bytes=256)
            results.append({k: v.stats for k, v in values.items()})
            if sha256:
                assert all(values[k].sha256 == _hash(t) for k, t in src.items())
    assert all(r == results[0] for r in results)
    for key, t in src.items():
        stats = results[0][key]
        assert stats is not None
        assert_stats(stats.to_dict(), reference(t), _scale(t))


def test_a_corrupt_record_is_found_by_the_pieces(cli: Any, tmp_path: Path) -> None:
    """One flipped byte in the second piece of a record: --stats (on two threads) exits 2 naming
    the CRC-32 mismatch; nothing on stdout."""
    path = tmp_path / "c.pt"
    t = torch.arange(5_000_000, dtype=torch.float32)  # 20 MB: two pieces
    torch.save({"w": t}, path)
    data = bytearray(path.read_bytes())
    at = data.find(t[-10:].numpy().tobytes())
    assert at > 0
    data[at] ^= 1
    path.write_bytes(bytes(data))
    result = cli("inspect", path, "--stats", "--jobs", "2")
    assert result.exit_code == 2
    assert "CRC-32 mismatch" in result.stderr and result.stdout == ""


def test_values_are_read_in_bounded_memory(tmp_path: Path) -> None:
    """--stats --hash --check-finite over 96 MiB of float32 on two threads: the process stays
    under 64 MiB (blocks and scratch arrays are reused; nothing is loaded whole)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "big.pt"
    torch.save({f"w{i}": torch.randn(4_000_000) for i in range(6)}, path)
    code = (
        "import resource, subprocess, sys; "
        "r = subprocess.run([sys.executable, '-m', 'ckptsurgeon', 'inspect', sys.argv[1], '--stats', '--hash', "
        "'--check-finite', '--jobs', '2', '--json'], stdout=subprocess.DEVNULL); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    rc, maxrss_kib = out.stdout.split()
    assert rc == "0", out.stderr
    assert int(maxrss_kib) < 64 * 1024, f"peak RSS {int(maxrss_kib) // 1024} MiB"
