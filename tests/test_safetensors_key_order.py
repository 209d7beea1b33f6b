"""`.pt -> .safetensors -> .pt` keeps the state_dict's key order: the writer puts the header in
key order (the safetensors library sorts it) and the reader returns the header's order."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptsurgeon.engine.read import read_checkpoint


def run(cli: Any, *args: Any, code: int = 0) -> Any:
    result = cli(*args)
    assert result.exit_code == code, result.stderr
    return result


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Not in alphabetical order, of several dtypes and element sizes (as a real model's is)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    sd = dict(model.state_dict())  # ends with 1.num_batches_tracked (int64) between float32s
    sd["0.bias"] = sd["0.bias"].to(torch.bfloat16)
    sd["3.weight"] = sd["3.weight"].to(torch.float64)
    sd["z_mask"] = torch.tensor([True, False, True])
    sd["a_scalar"] = torch.tensor(2.5, dtype=torch.float16)
    sd["empty"] = torch.zeros(0, 3)
    return sd


def header(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    return json.loads(raw[8 : 8 + n])


def test_roundtrip_through_safetensors_keeps_key_order(cli, tmp_path):
    sd = mixed_state_dict()
    src, mid, back = tmp_path / "in.pt", tmp_path / "mid.safetensors", tmp_path / "back.pt"
    torch.save(sd, src)
    run(cli, "extract", src, "-o", mid, "--verify")
    run(cli, "extract", mid, "-o", back, "--verify")
    written = torch.load(back, weights_only=True)
    assert list(written) == list(sd)
    for k, v in sd.items():
        assert written[k].dtype == v.dtype and written[k].shape == v.shape and torch.equal(written[k], v), k
    data = json.loads(run(cli, "inspect", mid, "--json").stdout)
    assert [t["key"] for t in data["tensors"]] == list(sd)


def test_written_file_is_a_valid_safetensors_file(cli, tmp_path):
    sd = mixed_state_dict()
    src, out = tmp_path / "in.pt", tmp_path / "out.safetensors"
    torch.save(sd, src)
    run(cli, "extract", src, "-o", out)
    assert [k for k in header(out) if k != "__metadata__"] == list(sd)
    loaded = load_file(str(out))  # the library reads it (its own order does not matter here)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(out), framework="pt") as f:
        for k in sd:  # every tensor's data starts aligned to its element size
            begin = header(out)[k]["data_offsets"][0]
            assert begin % max(1, sd[k].element_size()) == 0
            assert torch.equal(f.get_tensor(k), sd[k])


def test_safetensors_to_safetensors_keeps_order_and_metadata(cli, tmp_path):
    sd = mixed_state_dict()
    src, a, b = tmp_path / "in.pt", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    torch.save(sd, src)
    run(cli, "extract", src, "-o", a)
    raw = a.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    head["__metadata__"] = {"format": "pt", "note": "kept"}
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    a.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    run(cli, "rename", a, "-o", b, "--add-prefix", "m.")
    assert [k for k in header(b) if k != "__metadata__"] == ["m." + k for k in sd]
    with safe_open(str(b), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}


def test_reader_returns_header_order_not_data_order(tmp_path):
    # data laid out b, a; header lists a, c, b
    meta = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        "c": {"dtype": "U8", "shape": [2], "data_offsets": [8, 10]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    text = json.dumps(meta).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "order.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + struct.pack("<ff", 2.0, 1.0) + b"\x07\x09")
    assert list(read_checkpoint(path).obj) == ["a", "c", "b"]
    loaded = load_file(str(path))
    assert loaded["a"].item() == 1.0 and loaded["b"].item() == 2.0
