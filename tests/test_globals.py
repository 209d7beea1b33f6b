"""`--allow-global` never runs code chosen by the file; `--unsafe` is exactly torch.load(weights_only=False).

The first half: a class allowed with `--allow-global` is built as `object.__new__(cls)` plus plain
attribute state (a namedtuple from its fields, an Enum member by lookup), never by calling it with
the file's arguments; classes that reach the system are refused by name (the corpus cases of
tests/hostile/corpus.py: ALLOW_GLOBAL_PAYLOADS) and by behaviour (tests/globals_classes.py).
The second half: `--unsafe` reads every pickle protocol torch.load(weights_only=False) reads, in the
zip and the legacy format.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import trained_smallcnn
from hostile import corpus
from hostile.corpus import G, NewObj, StateDict, base_state, legacy_of, state_zip

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PRECIOUS = "precious bytes that must survive\n"


def one_line_error(result: Any) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("warning: --unsafe")]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_case(name: str, path: Path, marker: Path) -> Path:
    """One case of the hostile corpus, written to `path` with its payload aimed at `marker`."""
    (spec,) = [s for s in corpus._SPECS if s.name == name]
    spec.write(path, corpus._Ctx(marker))
    return path


def container_with(path: Path, value: Any, *, legacy: bool = False) -> Path:
    """A checkpoint {'model': a real state_dict, 'extra': value}, `value` pickled as given."""
    sd = base_state(legacy=legacy)
    state = StateDict({"model": sd.obj, "extra": value}, sd.blobs)
    path.write_bytes(legacy_of(state) if legacy else state_zip(state))
    return path


# ---------------------------------------------------------------- --unsafe: every pickle protocol


def tricky_container() -> dict[str, Any]:
    torch.manual_seed(0)
    emb = torch.randn(5, 3)
    sd = OrderedDict(
        [("emb.weight", emb), ("head.weight", emb), ("bias", torch.nn.Parameter(torch.randn(3))),
         ("half", torch.randn(4, dtype=torch.float16)), ("steps", torch.tensor([1, 2, 3]))]
    )
    return {"epoch": 7, "state_dict": sd, "note": "ok"}


PROTOCOLS = [(p, legacy) for legacy in (False, True) for p in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize(("protocol", "legacy"), PROTOCOLS, ids=[f"p{p}-{'legacy' if lg else 'zip'}" for p, lg in PROTOCOLS])
def test_unsafe_reads_every_protocol_torch_reads(cli, tmp_path: Path, protocol: int, legacy: bool) -> None:
    path = tmp_path / "in.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(tricky_container(), path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    want = torch.load(path, weights_only=False)["state_dict"]

    r = cli("inspect", path, "--unsafe", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["format"] == ("torch-legacy" if legacy else "torch-zip")
    assert report["state_dict_key"] == "state_dict" and report["other_entries"].keys() == {"epoch", "note"}
    assert [(t["key"], t["shape"], t["dtype"]) for t in report["tensors"]] == [
        (k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in want.items()
    ]
    assert report["shared_storage"] == [["emb.weight", "head.weight"]]

    out = tmp_path / "out.pt"
    r = cli("extract", path, "-o", out, "--unsafe")
    assert r.exit_code == 0, r.stderr
    got = torch.load(out, weights_only=True)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert isinstance(got["bias"], torch.nn.Parameter)
    assert got["emb.weight"].untyped_storage().data_ptr() == got["head.weight"].untyped_storage().data_ptr()

    reference = tmp_path / "p2.pt"
    torch.save(tricky_container(), reference)
    assert cli("diff", path, reference, "--unsafe").exit_code == 0


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_protocols_weights_only_refuses_stay_refused_without_unsafe(cli, tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "p4.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"w": torch.ones(2)}, path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    r = cli("inspect", path)
    assert r.exit_code == 2
    line = one_line_error(r)
    assert path.name in line and "opcode 0x95 (FRAME)" in line and "--unsafe" in line


def test_protocol_0_fails_as_it_fails_in_torch(cli, tmp_path: Path) -> None:
    path = tmp_path / "p0.pt"
    torch.save({"w": torch.ones(2)}, path, pickle_protocol=0)
    with pytest.raises(Exception):
        torch.load(path, weights_only=False)
    r = cli("inspect", path, "--unsafe")
    assert r.exit_code == 2 and "p0.pt" in one_line_error(r)


@pytest.mark.parametrize("case_name", ["pkl-storage-two-dtypes", "pkl-storage-two-sizes"])
def test_unsafe_keeps_refusing_storages_that_do_not_match_their_records(cli, tmp_path: Path, case_name: str) -> None:
    """What --unsafe lifts is the pickle's restrictions, not the check that values are right."""
    path = write_case(case_name, tmp_path / "in.pt", tmp_path / "marker")
    r = cli("inspect", path, "--unsafe")
    assert r.exit_code == 2 and "in.pt" in one_line_error(r)


def test_protocol_4_refusal_names_exactly_the_globals_torch_names(tmp_path: Path) -> None:
    """Protocol 4 fetches repeated module names from the memo: the list must still be right."""
    from ckptsurgeon import load_checkpoint
    from ckptsurgeon.errors import UnsafeCheckpointError

    path = tmp_path / "p4.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"w": torch.ones(2), "b": torch.tensor([1]), "args": argparse.Namespace(lr=1)}, path,
                   pickle_protocol=4)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert info.value.globals == ["argparse.Namespace"]  # (torch's own scanner stops at FRAME)
