"""diff: `--key-a`/`--key-b` (one container's entry against a bare file) and `--ignore-dtype`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trained_smallcnn

from ckptsurgeon.diff import diff_state_dicts


def run(cli: Any, *args: Any, code: int) -> Any:
    result = cli(*args)
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def ema_files(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A training checkpoint with `model` and `ema` state_dicts, and the EMA weights as a bare file."""
    model = trained_smallcnn().state_dict()
    ema = {k: (v * 0.5 if v.is_floating_point() else v.clone()) for k, v in model.items()}
    ckpt = tmp_path / "train.ckpt"
    torch.save({"epoch": 3, "model": model, "ema": ema}, ckpt)
    bare = tmp_path / "ema.pt"
    torch.save(ema, bare)
    return ckpt, bare, ema


def test_key_a_picks_one_side_only(cli, ema_files):
    ckpt, bare, ema = ema_files
    data = json.loads(run(cli, "diff", ckpt, bare, "--key-a", "ema", "--json", code=0).stdout)
    assert data["identical"] is True and data["num_equal"] == len(ema)
    # the other entry of the same container is not the EMA: values differ
    data = json.loads(run(cli, "diff", ckpt, bare, "--key-a", "model", "--json", code=1).stdout)
    assert data["value_mismatches"] and not data["only_in_a"] and not data["only_in_b"]


def test_key_b_and_key_override_one_side(cli, ema_files):
    ckpt, bare, _ = ema_files
    run(cli, "diff", bare, ckpt, "--key-b", "ema", code=0)
    # --key sets both sides; --key-b overrides it for B
    run(cli, "diff", ckpt, ckpt, "--key", "ema", "--key-b", "ema", code=0)
    run(cli, "diff", ckpt, ckpt, "--key", "model", "--key-b", "ema", code=1)
    # without them the container's `model` is found by name: not the EMA
    run(cli, "diff", ckpt, bare, code=1)
    # --key alone applies to both sides: the bare file has no entry 'ema'
    result = run(cli, "diff", ckpt, bare, "--key", "ema", code=2)
    assert str(bare) in result.stderr and "'ema'" in result.stderr


@pytest.fixture
def cast_files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """bf16 weights and the same upcast to float32 (equal values); float32 weights and their
    float16 cast (close values)."""
    sd = {k: v for k, v in trained_smallcnn().state_dict().items()}
    low = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sd.items()}
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    paths = tmp_path / "bf16.pt", tmp_path / "up.pt", tmp_path / "fp32.pt", tmp_path / "fp16.pt"
    for p, d in zip(paths, (low, up, sd, half)):
        torch.save(d, p)
    return paths


def test_ignore_dtype_reports_but_does_not_fail_on_a_cast(cli, cast_files):
    bf16, fp32, _, _ = cast_files
    data = json.loads(run(cli, "diff", bf16, fp32, "--json", code=1).stdout)
    casts = len(data["dtype_mismatches"])
    assert casts > 0 and data["value_mismatches"] == [] and data["ignore_dtype"] is False

    data = json.loads(run(cli, "diff", bf16, fp32, "--ignore-dtype", "--json", code=0).stdout)
    assert data["identical"] is True and data["ignore_dtype"] is True
    assert len(data["dtype_mismatches"]) == casts  # still reported
    assert data["dtype_mismatches"][0] == {"key": "conv1.weight", "a": "bfloat16", "b": "float32"}
    assert data["num_equal"] == 22

    text = run(cli, "diff", bf16, fp32, "--ignore-dtype", code=0).stdout
    assert "conv1.weight dtype bfloat16 vs float32 (ignored)" in [" ".join(line.split()) for line in text.splitlines()]
    assert text.splitlines()[-1].startswith("identical: 22 tensors equal")


def test_ignore_dtype_still_compares_values_with_the_tolerance(cli, cast_files):
    _, _, fp32, fp16 = cast_files
    data = json.loads(run(cli, "diff", fp32, fp16, "--ignore-dtype", "--json", code=1).stdout)
    assert data["value_mismatches"]  # float16 rounding changed values; no tolerance given
    run(cli, "diff", fp32, fp16, "--ignore-dtype", "--rtol", "1e-3", "--atol", "1e-6", code=0)
    run(cli, "diff", fp32, fp16, "--rtol", "1e-3", "--atol", "1e-6", code=1)  # without it: the dtype differs


def test_ignore_dtype_in_the_core():
    a = {"w": torch.arange(4, dtype=torch.int32)}
    b = {"w": torch.arange(4, dtype=torch.int64)}
    assert not diff_state_dicts(a, b).identical
    report = diff_state_dicts(a, b, ignore_dtype=True)
    assert report.identical and report.num_equal == 1 and report.to_dict()["ignore_dtype"] is True
    assert [m.key for m in report.dtype_mismatches] == ["w"]
    c = {"w": torch.tensor([0, 1, 2, 4], dtype=torch.int64)}
    assert not diff_state_dicts(a, c, ignore_dtype=True).identical
