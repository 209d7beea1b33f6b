"""Tied tensors in `.safetensors` outputs follow the huggingface_hub / safetensors convention: kept
once, `dropped -> kept` recorded in `__metadata__`; ckptsurgeon's reader restores the tie, so
`.pt -> .safetensors -> .pt` gives back the same sharing."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_model

from sample_models.models import TiedLM


def _header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _data_bytes(path: Path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return path.stat().st_size - 8 - n


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.fixture
def tied(tmp_path: Path) -> tuple[TiedLM, Path]:
    torch.manual_seed(0)
    model = TiedLM()
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_extract_writes_a_tie_once_and_records_it_as_safetensors_does(cli, tmp_path, tied):
    model, path = tied
    out = tmp_path / "y.safetensors"
    r = cli("extract", path, "-o", out, "--verify")
    assert r.exit_code == 0, r.stderr
    header = _header(out)
    assert "head.weight" not in header and "embed.weight" in header
    reference = tmp_path / "ref.safetensors"
    save_model(model, str(reference))  # the library's own way of writing a tied model
    ours, theirs = header["__metadata__"], _header(reference)["__metadata__"]
    assert theirs == {"head.weight": "embed.weight"}
    assert ours == {"format": "pt", **theirs}  # plus the format tag huggingface_hub writes
    assert (
        _data_bytes(out)
        == _data_bytes(reference)
        == sum(  # the tied matrix is stored once
            p.numel() * p.element_size() for p in model.state_dict().values()
        )
        - model.head.weight.numel() * 4
    )
    plain = load_file(str(out))  # the library reads it (without the tie: it does not restore it)
    assert torch.equal(plain["embed.weight"], model.embed.weight.detach())


def test_pt_to_safetensors_to_pt_gives_back_the_same_sharing(cli, tmp_path, tied):
    model, path = tied
    st, back = tmp_path / "y.safetensors", tmp_path / "z.pt"
    assert cli("extract", path, "-o", st).exit_code == 0
    r = cli("extract", st, "-o", back, "--verify")
    assert r.exit_code == 0, r.stderr
    original, again = torch.load(path, weights_only=True), torch.load(back, weights_only=True)
    assert list(again) == list(original)
    for key, value in original.items():
        assert torch.equal(again[key], value) and again[key].dtype == value.dtype, key
    assert _same_storage(again["embed.weight"], again["head.weight"])
    r = cli("inspect", st, "--json")
    assert json.loads(r.stdout)["shared_storage"] == [["embed.weight", "head.weight"]]


def test_files_written_by_the_library_get_their_tie_back(cli, tmp_path, tied):
    model, _ = tied
    st = tmp_path / "lib.safetensors"
    save_model(model, str(st))
    out = tmp_path / "out.pt"
    assert cli("extract", st, "-o", out).exit_code == 0
    sd = torch.load(out, weights_only=True)
    assert _same_storage(sd["embed.weight"], sd["head.weight"])
    model2 = TiedLM()
    model2.load_state_dict(sd)
    assert torch.equal(model2.head.weight, model.head.weight)


def test_views_that_only_share_storage_are_written_separately(cli, tmp_path):
    base = torch.arange(12.0)
    path = tmp_path / "views.pt"
    torch.save(OrderedDict(all=base, half=base[:6], same=base), path)
    out = tmp_path / "v.safetensors"
    r = cli("extract", path, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "written separately: all, half" in r.stderr
    meta = _header(out)["__metadata__"]
    assert meta == {"format": "pt", "same": "all"}
    back = tmp_path / "v.pt"
    assert cli("extract", out, "-o", back).exit_code == 0
    sd = torch.load(back, weights_only=True)
    assert torch.equal(sd["half"], base[:6]) and torch.equal(sd["same"], base)
    assert _same_storage(sd["all"], sd["same"]) and not _same_storage(sd["all"], sd["half"])


def test_a_metadata_entry_of_the_user_is_never_overwritten(tmp_path):
    from ckptsurgeon.io import save_checkpoint

    w = torch.ones(3)
    out = tmp_path / "m.safetensors"
    save_checkpoint(OrderedDict(a=w, b=w), out, safetensors_metadata={"b": "user note", "format": "pt"})
    assert _header(out)["__metadata__"] == {"format": "pt", "b": "user note"}
    assert set(load_file(str(out))) == {"a", "b"}  # so b is written, not dropped
