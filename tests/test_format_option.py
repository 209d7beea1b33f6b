"""`--format pt|safetensors` on every writer: the layout of OUT, whatever its name (the default
still comes from the name). One entry in the option table, used by the writers."""

from __future__ import annotations

import json
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptsurgeon.cli import main


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "train.ckpt"
    sd = OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2, dtype=torch.bfloat16))
    torch.save({"epoch": 3, "model": sd}, path)
    return path


def _run(capsys, *args: object) -> tuple[int, dict, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else {}), err


@pytest.mark.parametrize("command", ["extract", "rename", "merge"])
def test_format_safetensors_whatever_the_name(capsys, tmp_path, ckpt, command):
    out = tmp_path / "weights.bin"
    args = {"extract": ["extract", ckpt], "rename": ["rename", ckpt, "--add-prefix", "m."],
            "merge": ["merge", ckpt, ckpt, "--on-conflict", "first"]}[command]  # fmt: skip
    rc, report, err = _run(capsys, *args, "-o", out, "--format", "safetensors", "--json")
    assert rc == 0, err
    assert report["format"] == "safetensors"
    loaded = load_file(str(out))
    prefix = "m." if command == "rename" else ""
    assert torch.equal(loaded[prefix + "w"], torch.arange(6.0).reshape(2, 3))
    assert loaded[prefix + "b"].dtype == torch.bfloat16


def test_format_pt_for_a_safetensors_name(capsys, tmp_path, ckpt):
    out = tmp_path / "odd.safetensors"
    rc, report, err = _run(capsys, "extract", ckpt, "-o", out, "--format", "pt", "--json")
    assert rc == 0 and report["format"] == "pt", err
    assert zipfile.is_zipfile(out)
    with open(out, "rb") as f:  # by file object: torch.load hands a *.safetensors name to safetensors
        assert torch.equal(torch.load(f, weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))


def test_default_still_comes_from_the_name(capsys, tmp_path, ckpt):
    rc, report, _ = _run(capsys, "extract", ckpt, "-o", tmp_path / "a.safetensors", "--json")
    assert rc == 0 and report["format"] == "safetensors"
    rc, report, _ = _run(capsys, "extract", ckpt, "-o", tmp_path / "a.pt", "--json")
    assert rc == 0 and report["format"] == "pt"


@pytest.mark.parametrize("typer_path", [False, True], ids=["fast parser", "typer"])
def test_an_unknown_format_is_exit_2_and_writes_nothing(capsys, tmp_path, ckpt, typer_path):
    out = tmp_path / "x.pt"
    extra = ["--allow-missing"] if typer_path else []  # an option only Typer parses
    rc, report, err = _run(capsys, "extract", ckpt, "-o", out, "--format", "hdf5", *extra, "--json")
    assert rc == 2 and report["error"]["kind"] == "usage" and "hdf5" in err
    assert not out.exists()
