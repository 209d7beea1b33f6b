"""State_dicts holding non-tensor values: a module's `get_extra_state` (key `<module>._extra_state`).

Real torch modules that define get_extra_state/set_extra_state, saved with `model.state_dict()`
and torch.save; every command runs through the CLI and every output is loaded back with torch
(and into the model, where set_extra_state must get the same value).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptsurgeon import find_state_dict
from ckptsurgeon.diff import diff_state_dicts

MODEL = f"{Path(__file__).resolve()}:ExtraNet"


class Scaled(nn.Module):
    """torch's docs example: the extra state is a dict of plain data."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.config: dict[str, Any] = {"scale": 1.0, "calls": 0, "name": "scaled"}

    def get_extra_state(self) -> Any:
        return dict(self.config)

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):  # a placeholder from a model check would fail here
            raise TypeError(f"extra state must be a dict, got {type(state).__name__}")
        self.config = dict(state)


class Blob(nn.Module):
    """Extra state as bytes (e.g. a serialised calibration table)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(2, dtype=torch.int64))
        self.blob = b"\x00calibration"

    def get_extra_state(self) -> Any:
        return self.blob

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, bytes):
            raise TypeError(f"extra state must be bytes, got {type(state).__name__}")
        self.blob = state


class ExtraNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Scaled()
        self.blob = Blob()
        self.head = nn.Linear(3, 2)


KEYS = [  # torch's order: a module's own entries (extra state last), then its children's
    "encoder._extra_state",
    "encoder.lin.weight",
    "encoder.lin.bias",
    "blob.table",
    "blob._extra_state",
    "head.weight",
    "head.bias",
]


def make_net(seed: int = 0, scale: float = 0.5) -> ExtraNet:
    torch.manual_seed(seed)
    net = ExtraNet()
    net.encoder.config = {"scale": scale, "calls": 7, "name": "enc"}
    net.blob.blob = b"table-" + bytes([seed])
    net.blob.table += seed
    return net


def load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def run(cli: Any, *args: Any, code: int = 0) -> Any:
    result = cli(*args)
    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    return result


def assert_same_state(got: Any, want: Any) -> None:
    """Same keys in the same order; tensors bit for bit with their dtype; other values equal."""
    assert list(got) == list(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert type(got[k]) is type(v) and got[k] == v, k


def loads_into_model(sd: Any, want: ExtraNet) -> None:
    fresh = ExtraNet()
    result = fresh.load_state_dict(sd)  # strict: every _extra_state key must be there
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.encoder.config == want.encoder.config and fresh.blob.blob == want.blob.blob
    assert torch.equal(fresh.head.weight, want.head.weight)


@pytest.fixture
def net() -> ExtraNet:
    return make_net()


@pytest.fixture
def sd_file(tmp_path: Path, net: ExtraNet) -> Path:
    path = tmp_path / "extra.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def train_file(tmp_path: Path, net: ExtraNet) -> Path:
    path = tmp_path / "train.ckpt"
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.save({"epoch": 2, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    return path


def test_torch_puts_extra_state_in_the_state_dict(net):
    assert list(net.state_dict()) == KEYS


# ------------------------------------------------------------------------ finding the state_dict


def test_found_as_a_state_dict_bare_and_in_a_container(net):
    sd = net.state_dict()
    assert find_state_dict(sd) == (None, sd)
    path, found = find_state_dict({"epoch": 1, "model_state_dict": sd, "optimizer": {"lr": 0.1}})
    assert path == ("model_state_dict",) and found is sd
    path, found = find_state_dict({"run": {"weights_of_the_run": sd}, "notes": "x"})
    assert path == ("run", "weights_of_the_run")


def test_only_the_extra_state_key_may_hold_a_non_tensor():
    # a mapping with any other non-tensor value is not a state_dict (it is a container)
    with pytest.raises(Exception, match="no state_dict found"):
        find_state_dict({"w": torch.ones(1), "extra_state": {"a": 1}})
    with pytest.raises(Exception, match="no state_dict found"):
        find_state_dict({"w": torch.ones(1), "encoder.my_extra_state": 1})
    # extra state alone is not taken for a state_dict without --key
    with pytest.raises(Exception, match="no state_dict found"):
        find_state_dict({"_extra_state": {"a": 1}})
    assert find_state_dict({"x": {"_extra_state": 1}}, key="x")[0] == ("x",)


# ------------------------------------------------------------------------------------- inspect


def test_inspect_lists_extra_state_apart_from_tensors(cli, train_file, net):
    data = json.loads(run(cli, "inspect", train_file, "--json").stdout)
    assert data["state_dict_key"] == "model_state_dict"
    assert [t["key"] for t in data["tensors"]] == [k for k in KEYS if not k.endswith("_extra_state")]
    assert data["num_tensors"] == data["num_tensors_in_state_dict"] == 5
    assert data["total_bytes"] == sum(
        v.numel() * v.element_size() for v in net.state_dict().values() if isinstance(v, torch.Tensor)
    )
    assert data["extra_state"] == {"encoder._extra_state": "dict (3 entries)", "blob._extra_state": "bytes (7 bytes)"}
    assert data["other_entries"]["epoch"] == "2"

    text = run(cli, "inspect", train_file).stdout.splitlines()
    assert any(line.split() == ["encoder._extra_state", "extra", "state", "dict", "(3", "entries)"] for line in text)
    assert any("5 tensors" in line and "2 extra state entries" in line for line in text)


def test_inspect_selection_applies_to_extra_state(cli, sd_file):
    data = json.loads(run(cli, "inspect", sd_file, "-i", "encoder", "--json").stdout)
    assert [t["key"] for t in data["tensors"]] == ["encoder.lin.weight", "encoder.lin.bias"]
    assert data["extra_state"] == {"encoder._extra_state": "dict (3 entries)"}
    assert data["num_tensors_in_state_dict"] == 5


def test_inspect_model_check_expects_the_extra_state_keys(cli, sd_file):
    data = json.loads(run(cli, "inspect", sd_file, "--model", MODEL, "--json").stdout)
    assert data["compatible"] is True and data["errors"] == []
    assert data["kinds"]["encoder._extra_state"] == "extra_state"
    assert data["kinds"]["head.weight"] == "parameter"
    # inspect -x only narrows the table (the whole state_dict is judged); a file written without
    # them would miss them in torch's load_state_dict: so does the check of such a result
    data = json.loads(run(cli, "inspect", sd_file, "--model", MODEL, "-x", "*._extra_state", "--json").stdout)
    assert data["compatible"] is True
    out = sd_file.with_name("no_extra.pt")
    r = run(cli, "extract", sd_file, "-o", out, "--model", MODEL, "-x", "*._extra_state", "--json", code=1)
    data = json.loads(r.stdout)  # exit 1 with --json: the report, marked as not written
    assert data["written"] is False and not out.exists()
    assert data["model"]["missing_keys"] == ["encoder._extra_state", "blob._extra_state"]


# ------------------------------------------------------------------------------------- extract


def test_extract_whole_keeps_extra_state_and_loads_into_the_model(cli, train_file, tmp_path, net):
    out = tmp_path / "out.pt"
    report = json.loads(run(cli, "extract", train_file, "-o", out, "--verify", "--model", MODEL, "--json").stdout)
    assert report["keys"] == KEYS and report["num_tensors"] == 5
    assert report["extra_state"] == ["encoder._extra_state", "blob._extra_state"]
    written = load(out)
    assert_same_state(written, net.state_dict())
    loads_into_model(written, net)


def test_extract_patterns_select_extra_state_keys(cli, sd_file, tmp_path, net):
    enc = tmp_path / "enc.pt"
    run(cli, "extract", sd_file, "-o", enc, "-i", "encoder")
    assert list(load(enc)) == ["encoder._extra_state", "encoder.lin.weight", "encoder.lin.bias"]
    assert load(enc)["encoder._extra_state"] == {"scale": 0.5, "calls": 7, "name": "enc"}
    plain = tmp_path / "plain.pt"
    result = run(cli, "extract", sd_file, "-o", plain, "-x", "*._extra_state")
    assert list(load(plain)) == [k for k in KEYS if not k.endswith("_extra_state")]
    assert "wrote 5 tensors" in result.stderr


def test_extract_with_the_torch_writer_keeps_extra_state(cli, sd_file, tmp_path, net):
    out = tmp_path / "out.pt"  # --unsafe: torch.load reads it, torch.save writes it
    run(cli, "extract", sd_file, "-o", out, "--unsafe")
    assert_same_state(load(out), net.state_dict())


def test_safetensors_output_refuses_extra_state_naming_the_keys(cli, sd_file, tmp_path):
    out = tmp_path / "out.safetensors"
    result = run(cli, "extract", sd_file, "-o", out, code=2)
    line = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "'blob._extra_state', 'encoder._extra_state'" in line[0]
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))
    run(cli, "extract", sd_file, "-o", out, "-x", "*._extra_state")
    from safetensors.torch import load_file

    assert list(load_file(str(out))) != [] and "head.weight" in load_file(str(out))


# -------------------------------------------------------------------------------------- rename


def test_rename_keeps_container_and_renames_extra_state(cli, train_file, tmp_path, net):
    out = tmp_path / "renamed.ckpt"
    run(cli, "rename", train_file, "-o", out, "--add-prefix", "model.")
    written = load(out)
    assert written["epoch"] == 2 and "optimizer_state_dict" in written
    sd = written["model_state_dict"]
    assert list(sd) == ["model." + k for k in KEYS]
    assert sd["model.blob._extra_state"] == net.blob.blob
    back = tmp_path / "back.pt"
    run(cli, "rename", out, "-o", back, "--strip-prefix", "model.", "--model", MODEL)
    loads_into_model(load(back)["model_state_dict"], net)


# --------------------------------------------------------------------------------------- merge


def test_merge_union_puts_the_parts_back_together(cli, sd_file, tmp_path, net):
    enc, rest, whole = tmp_path / "enc.pt", tmp_path / "rest.pt", tmp_path / "whole.pt"
    run(cli, "extract", sd_file, "-o", enc, "-i", "encoder")
    run(cli, "extract", sd_file, "-o", rest, "-x", "encoder")
    run(cli, "merge", rest, enc, "-o", whole, "--model", MODEL)
    written = load(whole)
    assert set(written) == set(KEYS)
    loads_into_model(written, net)


def test_merge_conflict_on_an_extra_state_key(cli, sd_file, tmp_path):
    result = run(cli, "merge", sd_file, sd_file, "-o", tmp_path / "m.pt", code=2)
    assert "present in more than one input" in result.stderr and "'encoder._extra_state'" in result.stderr


def test_merge_average_takes_extra_state_from_the_first_input(cli, tmp_path):
    a, b = make_net(0, scale=0.5), make_net(1, scale=2.0)
    fa, fb, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "avg.pt"
    torch.save(a.state_dict(), fa)
    torch.save(b.state_dict(), fb)
    result = run(cli, "merge", fa, fb, "-o", out, "--average", "--json")
    assert any("encoder._extra_state" in w for w in json.loads(result.stdout)["warnings"])
    written = load(out)
    assert list(written) == KEYS
    assert written["encoder._extra_state"] == a.encoder.get_extra_state()
    assert written["blob._extra_state"] == a.blob.blob
    torch.testing.assert_close(written["head.weight"], (a.head.weight + b.head.weight) / 2)
    same = tmp_path / "same.pt"
    result = run(cli, "merge", fa, fa, "-o", same, "--average", "--json")
    assert json.loads(result.stdout)["warnings"] == []


# ---------------------------------------------------------------------------------------- diff


def test_diff_compares_extra_state_by_equality(cli, tmp_path, sd_file, net):
    copy = tmp_path / "copy.pt"
    run(cli, "extract", sd_file, "-o", copy)
    data = json.loads(run(cli, "diff", sd_file, copy, "--json").stdout)
    assert data["identical"] is True and data["num_equal"] == 5 and data["num_equal_extra_state"] == 2

    net.encoder.config["calls"] = 8  # one number inside the extra state
    changed = tmp_path / "changed.pt"
    torch.save(net.state_dict(), changed)
    data = json.loads(run(cli, "diff", sd_file, changed, "--json", code=1).stdout)
    assert data["identical"] is False
    assert [m["key"] for m in data["extra_state_mismatches"]] == ["encoder._extra_state"]
    assert data["value_mismatches"] == [] and data["num_equal"] == 5
    text = run(cli, "diff", sd_file, changed, code=1).stdout
    assert "encoder._extra_state" in text and "1 extra state mismatches" in text
    # excluding it makes the files identical
    run(cli, "diff", sd_file, changed, "-x", "encoder._extra_state")


def test_diff_extra_state_against_a_tensor_is_a_difference():
    a = {"w": torch.ones(2), "_extra_state": {"k": 1}}
    b = {"w": torch.ones(2), "_extra_state": torch.ones(1)}
    report = diff_state_dicts(a, b)
    assert not report.identical and [m.key for m in report.extra_state_mismatches] == ["_extra_state"]
    nested = {"w": torch.ones(2), "_extra_state": {"t": torch.ones(3), "n": float("nan")}}
    twin = {"w": torch.ones(2), "_extra_state": {"t": torch.ones(3), "n": float("nan")}}
    assert diff_state_dicts(nested, twin).identical
    twin["_extra_state"]["t"] = torch.tensor([1.0, 1.0, 2.0])
    assert not diff_state_dicts(nested, twin).identical


# -------------------------------------------------------------- Transformer Engine's io.BytesIO


class BytesIOState(nn.Module):
    """Transformer Engine stores its extra state as an io.BytesIO (not weights_only-safe)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.state = b"fp8-meta"

    def get_extra_state(self) -> Any:
        return io.BytesIO(self.state)

    def set_extra_state(self, state: Any) -> None:
        self.state = state.getvalue()


def test_bytesio_extra_state_is_refused_safely_and_works_with_unsafe(cli, tmp_path):
    path, out = tmp_path / "te.pt", tmp_path / "out.pt"
    torch.save(BytesIOState().state_dict(), path)
    result = run(cli, "inspect", path, code=2)
    assert "_io.BytesIO" in result.stderr
    data = json.loads(run(cli, "inspect", path, "--unsafe", "--json").stdout)
    assert data["extra_state"] == {"_extra_state": "BytesIO (8 bytes)"}
    run(cli, "extract", path, "-o", out, "--unsafe")
    run(cli, "diff", path, out, "--unsafe")
    fresh = BytesIOState()
    fresh.state = b""
    fresh.load_state_dict(torch.load(out, weights_only=False))
    assert fresh.state == b"fp8-meta"


def test_console_script_extracts_extra_state(tmp_path, sd_file, net):
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(sd_file), "-o", str(out), "-i", "blob"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 tensors and 1 extra state entry" in proc.stderr
    assert load(out)["blob._extra_state"] == net.blob.blob
