"""DCP directories through every command (issue 11): consolidate an FSDP run (`extract dcp/ -o
model.safetensors`), diff and merge across formats, `--format dcp` outputs read back by
`dcp.load` and `dcp_to_torch_save`, and `inspect` reading `.metadata` alone. Inputs come from
`dcp.save` (one process, and two gloo ranks with DTensors: see tests/test_dcp.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests import test_dcp
from tests.test_dcp import full_state, torch_reference

two_ranks = test_dcp.two_ranks  # the session fixtures of the engine's DCP tests
single = test_dcp.single

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _model(directory: Path) -> dict[str, torch.Tensor]:
    """The `model` state_dict that torch's own consolidation gives."""
    return dict(torch_reference(directory)["model"])


@pytest.mark.parametrize("fmt", ["pt", "st"])
def test_consolidating_a_two_rank_run_gives_what_torch_consolidates(
    cli: Any, two_ranks: Path, tmp_path: Path, fmt: str
) -> None:
    src = two_ranks / fmt
    want = _model(two_ranks / "pt")  # dcp_to_torch_save reads the default format only
    out = tmp_path / "model.safetensors"
    r = cli("extract", src, "-o", out, "--key", "model", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["written"] and doc["format"] == "safetensors" and doc["bytes_read"] > 0
    got = load_file(out)  # (the library gives the keys in data order: compared as sets)
    assert set(got) == set(want)
    for k in want:
        assert _bits_equal(got[k], want[k]), k
    pt = tmp_path / "model.pt"
    assert cli("extract", src, "-o", pt, "--key", "model").exit_code == 0
    back = torch.load(pt, weights_only=True)
    assert all(_bits_equal(back[k], want[k]) for k in want)


def test_inspect_reads_the_metadata_only(cli: Any, two_ranks: Path) -> None:
    src = two_ranks / "pt"
    r = cli("inspect", src, "--key", "model", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "dcp"
    want = _model(two_ranks / "pt")
    assert [t["key"] for t in doc["tensors"]] == list(full_state()["model"])
    for row in doc["tensors"]:
        assert row["shape"] == list(want[row["key"]].shape)
        assert row["dtype"] == str(want[row["key"]].dtype).removeprefix("torch.")
    assert doc["bytes_read"] == (src / ".metadata").stat().st_size
    # the values, when asked for, are the assembled chunks
    r = cli("inspect", src, "--key", "model", "--hash", "--json")
    hashes = {t["key"]: t["sha256"] for t in json.loads(r.stdout)["tensors"]}
    import hashlib

    for k, v in want.items():
        assert hashes[k] == hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def test_diff_and_merge_across_formats(cli: Any, two_ranks: Path, tmp_path: Path) -> None:
    want = _model(two_ranks / "pt")
    ref = tmp_path / "ref.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in want.items()}, ref)
    r = cli("diff", two_ranks / "pt", ref, "--key-a", "model", "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    assert json.loads(r.stdout)["identical"]
    head = tmp_path / "head.pt"
    torch.save({"model": {"head.weight": torch.ones(2, 2)}}, head)  # --key applies to every input
    out = tmp_path / "merged"
    r = cli("merge", two_ranks / "st", head, "--key", "model", "-o", f"{out}/")
    assert r.exit_code == 0, r.stderr
    from huggingface_hub import load_state_dict_from_file

    got = load_state_dict_from_file(out / "model.safetensors")
    assert set(got) == set(want) | {"head.weight"}
    assert all(_bits_equal(got[k], want[k]) for k in want)


def test_format_dcp_output_loads_with_dcp_load_and_dcp_to_torch_save(cli: Any, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli("rename", single, "-o", out, "--format", "dcp", "--add-prefix", "m.", "--key", "model", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "dcp" and [f["file"] for f in doc["files"]][-1] == ".metadata"
    full = full_state()
    # the container is kept: the renamed model beside optim and step
    target = {
        "model": {f"m.{k}": torch.zeros_like(v) for k, v in full["model"].items()},
        "step": 0,
    }
    dcp.load(target, checkpoint_id=str(out))
    for k, v in full["model"].items():
        assert _bits_equal(target["model"][f"m.{k}"], v), k
    assert target["step"] == 7
    consolidated = tmp_path / "c.pt"
    dcp_to_torch_save(str(out), str(consolidated))
    back = torch.load(consolidated, weights_only=False)
    assert back["step"] == 7 and back["optim"]["param_groups"] == full["optim"]["param_groups"]
    # and ckptsurgeon reads its own output back
    r = cli("diff", out, single, "--key-a", "model", "--key-b", "model", "--json")
    assert r.exit_code == 1  # the keys were renamed
    r = cli("extract", out, "--key", "model", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 0, r.stderr
    assert set(load_file(tmp_path / "x.safetensors")) == {f"m.{k}" for k in full["model"]}


def test_a_hostile_metadata_is_refused_by_every_command(cli: Any, single: Path, tmp_path: Path) -> None:
    import pickle
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(single, bad)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> Any:
            import os

            return (os.system, (f"touch {marker}",))

    (bad / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=4))
    before = {p.name: p.read_bytes() for p in bad.iterdir()}
    for args in (
        ("inspect", bad),
        ("extract", bad, "-o", tmp_path / "o.pt"),
        ("rename", bad, "-o", tmp_path / "r.pt", "--add-prefix", "x."),
        ("merge", bad, single, "-o", tmp_path / "m.pt"),
        ("diff", bad, single),
    ):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == before
    assert not any(p.name.startswith(("o.", "r.", "m.")) for p in tmp_path.iterdir())
