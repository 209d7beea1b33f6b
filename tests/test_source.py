"""The I/O boundary: a checkpoint is opened once, validated, and every later read goes through that
open handle. A file renamed onto the path after validation is never read; one changed in place is
refused; nothing reopens the checkpoint by name."""

from __future__ import annotations

import builtins
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptsurgeon.diff import diff_state_dicts
from ckptsurgeon.engine.source import Source
from ckptsurgeon.errors import BadCheckpointError
from ckptsurgeon.io import as_torch, load_checkpoint, save_checkpoint, verify_data


def _weights(seed: int) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=gen)
    return OrderedDict(emb=w, head=w, bias=torch.randn(64, generator=gen), step=torch.tensor(seed))


def _quantized(seed: int) -> OrderedDict[str, torch.Tensor]:
    """A state_dict the engine hands to torch (quantized tensors are not modelled)."""
    sd = _weights(seed)
    sd["q"] = torch.quantize_per_tensor(sd["bias"], 0.1, 3, torch.quint8)
    return sd


def _swap(path: Path, other: OrderedDict[str, torch.Tensor]) -> None:
    """Rename another checkpoint onto `path`, as an `mv` or a concurrent training job would."""
    tmp = path.with_name("incoming.pt")
    torch.save(other, tmp)
    os.replace(tmp, path)


@pytest.mark.parametrize("make", [_weights, _quantized], ids=["engine", "torch-fallback"])
def test_a_file_renamed_onto_the_path_is_never_read(tmp_path: Path, make) -> None:
    path = tmp_path / "model.pt"
    original, impostor = make(0), make(1)
    torch.save(original, path)
    with load_checkpoint(path) as ckpt:
        _swap(path, impostor)
        assert verify_data(ckpt) >= 0
        out = tmp_path / "out.pt"
        save_checkpoint(ckpt.state_dict, out)
    written = torch.load(out, weights_only=True)
    for key, value in original.items():
        assert (
            torch.equal(written[key], value)
            if not value.is_quantized
            else torch.equal(written[key].int_repr(), value.int_repr())
        ), key
    assert not torch.equal(written["bias"], impostor["bias"])
    assert written["emb"].untyped_storage().data_ptr() == written["head"].untyped_storage().data_ptr()


def test_a_file_changed_in_place_is_refused_not_mixed(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_weights(0), path)
    with load_checkpoint(path) as ckpt:
        with open(path, "r+b") as f:  # same inode, other size: a writer appending to it
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * 100)
        out = tmp_path / "out.pt"
        with pytest.raises(BadCheckpointError, match="changed while it was being read"):
            save_checkpoint(ckpt.state_dict, out)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_a_truncated_file_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_weights(0), path)
    with load_checkpoint(path) as ckpt:
        os.truncate(path, 1000)
        with pytest.raises(BadCheckpointError, match="model.pt"):
            verify_data(ckpt)
        with pytest.raises(BadCheckpointError, match="model.pt"):
            as_torch(ckpt.state_dict)


@pytest.mark.parametrize("make", [_weights, _quantized], ids=["engine", "torch-fallback"])
def test_nothing_reopens_the_checkpoint_by_name(tmp_path: Path, monkeypatch, make) -> None:
    """After load, reading, copying, comparing and verifying never open the file's path again."""
    path = tmp_path / "model.pt"
    torch.save(make(0), path)
    ckpt = load_checkpoint(path)
    other = load_checkpoint(path)
    watched = {str(path), os.path.realpath(path)}
    real_open, real_os_open = builtins.open, os.open

    def guarded(opener):
        def call(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) in watched:
                raise AssertionError(f"{file} reopened by name")
            return opener(file, *args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", guarded(real_open))
    monkeypatch.setattr(os, "open", guarded(real_os_open))
    verify_data(ckpt)
    plain = [k for k, v in ckpt.state_dict.items() if not getattr(v, "is_quantized", False)]
    assert diff_state_dicts(ckpt.state_dict, other.state_dict, plain).identical
    as_torch(ckpt.state_dict)
    save_checkpoint(ckpt.state_dict, tmp_path / "copy.pt", verify=make is _weights)
    save_checkpoint({k: ckpt.state_dict[k] for k in plain}, tmp_path / "copy.safetensors")
    monkeypatch.undo()
    back = torch.load(tmp_path / "copy.pt", weights_only=True)
    assert torch.equal(back["emb"], make(0)["emb"])


def test_a_closed_checkpoint_says_so(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_weights(0), path)
    with load_checkpoint(path) as ckpt:
        pass
    assert ckpt.source is not None and ckpt.source.closed
    with pytest.raises(BadCheckpointError, match="closed"):
        verify_data(ckpt)


def test_source_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BadCheckpointError, match="a FIFO"):
        Source(tmp_path / "fifo")
    with pytest.raises(BadCheckpointError, match="a directory"):
        Source(tmp_path)
    with pytest.raises(BadCheckpointError, match="no such file"):
        Source(tmp_path / "missing.pt")


def test_two_sources_of_one_file_are_one_file(tmp_path: Path) -> None:
    """Hard links and repeated opens read the same bytes: storages of both count as one."""
    path = tmp_path / "a.pt"
    torch.save(_weights(0), path)
    os.link(path, tmp_path / "b.pt")
    with Source(path) as a, Source(tmp_path / "b.pt") as b:
        assert a == b and hash(a) == hash(b) and a is not b
        assert a.pread(4, 0) == b"PK\x03\x04"
