"""Opaque entries: container entries built by globals outside the allowlist are read as inert
placeholders, never imported or called, shown as `NAME (not loaded)`, listed as `opaque_entries`,
and pickled again unchanged by `rename`; what a tensor depends on is still refused.

The classes come from tests/opaque_classes.py (shaped like argparse.Namespace's users, OmegaConf's
DictConfig, DeepSpeed's ZeroStageEnum and LossScaler, a dataclass, Lightning's AttributeDict);
files are written by `torch.save`, or by the hostile corpus' pickler for payloads.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import opaque_classes
import pytest
import torch
from hostile.corpus import G, NewObj, StateDict, Storage, base_state, legacy_of, rebuild_tensor, state_zip
from opaque_classes import AttributeDict, Collection, DictConfig, LossScaler, MyTensor, TrainConfig, ZeroStageEnum

from ckptsurgeon import load_checkpoint
from ckptsurgeon.errors import UnsafeCheckpointError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def model_state() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    return model.state_dict()


def lightning_container() -> dict[str, Any]:
    return {
        "epoch": 3,
        "global_step": 120,
        "state_dict": model_state(),
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}]}],
        "hyper_parameters": argparse.Namespace(
            lr=0.1, layers=[64, 32], nested={"betas": (0.9, 0.99)}, data_dir=pathlib.PurePosixPath("/data/x")
        ),
        "cfg": DictConfig({"model": {"width": 64}}, {"readonly": True}),
        "datamodule_hyper_parameters": AttributeDict(batch_size=32),
        "ds": {
            "zero_stage": ZeroStageEnum.weights,
            "loss_scaler": LossScaler(),
            "train": TrainConfig(),
            "coll": Collection([1, "two"]),
        },
    }


EXPECTED_OPAQUE = [
    {"path": "hyper_parameters", "globals": ["argparse.Namespace", "pathlib.PurePosixPath"]},
    {
        "path": "cfg",
        "globals": [
            "builtins.bool",  # builtin types named as values: inert
            "builtins.dict",
            "builtins.int",
            "collections.defaultdict",
            "opaque_classes.AnyNode",
            "opaque_classes.DictConfig",
            "typing.Any",
        ],
    },
    {"path": "datamodule_hyper_parameters", "globals": ["opaque_classes.AttributeDict"]},
    {"path": "ds.zero_stage", "globals": ["opaque_classes.ZeroStageEnum"]},
    {"path": "ds.loss_scaler", "globals": ["opaque_classes.LossScaler"]},
    {"path": "ds.train", "globals": ["opaque_classes.TrainConfig"]},
    {"path": "ds.coll", "globals": ["opaque_classes.Collection"]},
]


def save(obj: Any, path: Path, *, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same_tensors(got: Any, want: Any) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(bits(got[k]), bits(w)), k


def one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return str(lines[0])


@pytest.fixture
def no_torch_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files with opaque entries are the engine's: torch (which refuses them) is never asked."""
    import ckptsurgeon.io.load as load_module

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the torch fallback was reached")

    monkeypatch.setattr(load_module, "_torch_load", refuse)


# ---------------------------------------------------------------- read, shown, written back


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lightning_checkpoint_without_flags(cli: Any, tmp_path: Path, legacy: bool, no_torch_fallback: None) -> None:
    original = lightning_container()
    path = save(original, tmp_path / "last.ckpt", legacy=legacy)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # what a user meets with torch itself

    r = cli("inspect", path)
    assert r.exit_code == 0, r.stderr
    assert "hyper_parameters: argparse.Namespace (not loaded)" in r.stdout
    assert "cfg: opaque_classes.DictConfig (not loaded)" in r.stdout
    assert "epoch: 3" in r.stdout
    assert "ds: dict (4 entries, 4 not loaded)" in r.stdout

    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["opaque_entries"] == EXPECTED_OPAQUE
    assert report["other_entries"]["hyper_parameters"] == "argparse.Namespace (not loaded)"
    assert [t["key"] for t in report["tensors"]] == list(original["state_dict"])

    out = tmp_path / "weights.pt"
    r = cli("extract", path, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert_same_tensors(torch.load(out, weights_only=True), original["state_dict"])

    out = tmp_path / "renamed.ckpt"
    r = cli("rename", path, "-o", out, "--add-prefix", "model.", "--verify")
    assert r.exit_code == 0, r.stderr
    back = torch.load(out, weights_only=False)  # the owner of the file gets their objects back
    assert_same_tensors(back["state_dict"], OrderedDict(("model." + k, v) for k, v in original["state_dict"].items()))
    assert back["state_dict"]._metadata == {  # module versions follow the rename
        ("model." + k).rstrip("."): v for k, v in original["state_dict"]._metadata.items()
    }
    for key in ("epoch", "global_step", "optimizer_states", "hyper_parameters", "cfg"):
        assert type(back[key]) is type(original[key]) and back[key] == original[key], key
    assert type(back["datamodule_hyper_parameters"]) is AttributeDict
    assert back["datamodule_hyper_parameters"] == {"batch_size": 32}
    assert back["ds"]["zero_stage"] is ZeroStageEnum.weights
    assert back["ds"]["loss_scaler"] == original["ds"]["loss_scaler"]
    assert back["ds"]["train"] == TrainConfig() and type(back["ds"]["train"]) is TrainConfig
    assert type(back["ds"]["coll"]) is Collection and back["ds"]["coll"] == [1, "two"]

    r = cli("inspect", out, "--json")  # the output reads as the input did
    assert r.exit_code == 0 and json.loads(r.stdout)["opaque_entries"] == EXPECTED_OPAQUE

    ref = save({"other.w": torch.ones(2)}, tmp_path / "ref.pt")
    out = tmp_path / "merged.pt"
    r = cli("merge", path, ref, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert list(torch.load(out, weights_only=True)) == [*original["state_dict"], "other.w"]

    r = cli("diff", path, out)
    assert r.exit_code == 1, r.stderr  # other.w only in b
    r = cli("diff", path, path, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["identical"]


def test_opaque_extra_state_is_written_back_by_extract(cli: Any, tmp_path: Path, no_torch_fallback: None) -> None:
    sd = OrderedDict([("lin.weight", torch.randn(2, 2)), ("lin._extra_state", LossScaler(128.0))])
    path = save(sd, tmp_path / "te.pt")
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["extra_state"] == {"lin._extra_state": "opaque_classes.LossScaler (not loaded)"}
    assert report["opaque_entries"] == [{"path": "lin._extra_state", "globals": ["opaque_classes.LossScaler"]}]
    out = tmp_path / "out.pt"
    r = cli("extract", path, "-o", out)
    assert r.exit_code == 0, r.stderr
    back = torch.load(out, weights_only=False)
    assert back["lin._extra_state"] == LossScaler(128.0) and torch.equal(back["lin.weight"], sd["lin.weight"])

    # diff compares opaque extra state by the pickle instructions that make it
    assert cli("diff", path, out).exit_code == 0
    sd["lin._extra_state"] = LossScaler(256.0)
    other = save(sd, tmp_path / "other.pt")
    r = cli("diff", path, other, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["extra_state_mismatches"][0]["key"] == "lin._extra_state"


def test_commands_never_import_the_classes(tmp_path: Path) -> None:
    """In a fresh process, as a user runs it: the module the entries name is never imported."""
    path = save(lightning_container(), tmp_path / "last.ckpt")
    marker = tmp_path / "imported"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "CKPTSURGEON_IMPORT_MARKER": str(marker)}
    for argv in (
        ["inspect", path, "--json"],
        ["extract", path, "-o", tmp_path / "a.pt"],
        ["rename", path, "-o", tmp_path / "b.ckpt", "--strip-prefix", "0.", "--verify"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "ckptsurgeon", *map(str, argv)], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert not marker.exists(), f"{argv[0]} imported opaque_classes"
    assert "opaque_classes" in json.dumps(
        json.loads(
            subprocess.check_output(
                [sys.executable, "-m", "ckptsurgeon", "inspect", str(tmp_path / "b.ckpt"), "--json"], env=env
            )
        )["opaque_entries"]
    )
    assert not marker.exists()


# ---------------------------------------------------------------- payloads never run


def payload_file(path: Path, value: Any, *, legacy: bool = False) -> Path:
    """{'model': a real state_dict, 'args': value}, pickled as given (nothing imported)."""
    sd = base_state(legacy=legacy)
    state = StateDict({"model": sd.obj, "args": value}, sd.blobs)
    path.write_bytes(legacy_of(state) if legacy else state_zip(state))
    return path


def namespace(**state: Any) -> NewObj:
    return NewObj(G("argparse", "Namespace"), (), state)


def opaque_payloads(marker: Path) -> dict[str, Any]:
    """Opaque entries that would create `marker` if anything in them were called."""
    touch = G("opaque_classes", "touch")
    return {
        "reduce-in-namespace": namespace(lr=0.1, cmd=touch(str(marker))),
        "reduce-of-a-reduce": namespace(make=G("opaque_classes", "DictConfig")({"x": 1})(str(marker))),
        "newobj-state": NewObj(G("opaque_classes", "LossScaler"), (str(marker),), {"hook": touch(str(marker))}),
        "top-level-call": touch(str(marker)),
        "bare-global": G("opaque_classes", "touch"),
    }


SHOWN_AS = {
    "reduce-in-namespace": "argparse.Namespace",
    "reduce-of-a-reduce": "argparse.Namespace",
    "newobj-state": "opaque_classes.LossScaler",
    "top-level-call": "opaque_classes.touch",
    "bare-global": "opaque_classes.touch",
}

REFUSED_PAYLOADS = {  # payload -> the global the refusal names
    "os-system-in-namespace": (lambda m: namespace(cmd=G("os", "system")(f"touch {m}")), "os.system"),
    "eval-in-namespace": (lambda m: namespace(x=G("builtins", "eval")(f"open({str(m)!r}, 'w')")), "builtins.eval"),
    "subprocess-in-dictconfig": (
        lambda m: NewObj(G("opaque_classes", "DictConfig"), (), {"p": G("subprocess", "Popen")(["touch", str(m)])}),
        "subprocess.Popen",
    ),
    "runstring-function": (lambda m: G("numpy.testing._private.utils", "runstring")("x", {}), "runstring"),
}


def run_all_commands(cli: Any, path: Path, tmp_path: Path) -> dict[str, Any]:
    ref = tmp_path / "ref.pt"
    if not ref.exists():
        ref.write_bytes(state_zip(base_state(prefix="r.")))
    return {
        "inspect": cli("inspect", path),
        "inspect-json": cli("inspect", path, "--json"),
        "extract": cli("extract", path, "-o", tmp_path / "out-extract.pt", "--force"),
        "rename": cli("rename", path, "-o", tmp_path / "out-rename.pt", "--add-prefix", "x.", "--force"),
        "merge": cli("merge", path, ref, "-o", tmp_path / "out-merge.pt", "--force"),
        "diff": cli("diff", path, ref),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", list(opaque_payloads(Path("/x"))))
def test_a_payload_inside_an_opaque_entry_never_runs(cli: Any, tmp_path: Path, payload: str, legacy: bool) -> None:
    marker = tmp_path / "marker"
    path = payload_file(tmp_path / "in.pt", opaque_payloads(marker)[payload], legacy=legacy)
    results = run_all_commands(cli, path, tmp_path)
    assert not marker.exists()
    for command, r in results.items():
        assert r.exit_code == (1 if command == "diff" else 0), (command, r.stderr)
    assert f"args: {SHOWN_AS[payload]} (not loaded)" in results["inspect"].stdout
    # written back as it was: torch's safe loader refuses the output as it refuses the input
    out = tmp_path / "out-rename.pt"
    with pytest.raises(Exception, match="Unsupported global|unrecognized function"):
        torch.load(out, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("payload", list(REFUSED_PAYLOADS))
def test_code_running_globals_are_refused_even_inside_an_entry(cli: Any, tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "marker"
    make, name = REFUSED_PAYLOADS[payload]
    path = payload_file(tmp_path / "in.pt", make(marker))
    for command, r in run_all_commands(cli, path, tmp_path).items():
        assert r.exit_code == 2, (command, r.stdout)
        line = one_line(r)
        assert "refused to unpickle" in line and name in line and "--allow-global" in line, line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "ref.pt"]


# ---------------------------------------------------------------- what tensors depend on: refused


def refused_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    storage = Storage("FloatStorage", "0", 6)
    blobs = base_state().blobs[:1]
    cases: dict[str, tuple[Path, Any]] = {}

    def raw(name: str, obj: Any, want: str) -> None:
        path = tmp_path / f"{name}.pt"
        path.write_bytes(state_zip(StateDict(obj, blobs)))
        cases[name] = (path, want)

    def saved(name: str, obj: Any, want: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases[name] = (save(obj, tmp_path / f"{name}.pt"), want)

    saved("tensor-subclass", {"w": torch.ones(2).as_subclass(MyTensor)}, "opaque_classes.MyTensor")
    saved(
        "tensor-in-namespace",
        {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": argparse.Namespace(w=torch.zeros(1))},
        "argparse.Namespace",
    )
    saved("pickled-module", {"state_dict": {"w": torch.ones(2)}, "net": torch.nn.Linear(2, 2)}, "Linear")
    saved("opaque-in-the-state-dict", {"w": torch.ones(2), "cfg": argparse.Namespace(a=1)}, "argparse.Namespace")
    raw(
        "opaque-storage-class",
        OrderedDict(w=rebuild_tensor(Storage(G("opaque_classes", "LossScaler"), "0", 6), 0, (6,), (1,))),
        "opaque_classes.LossScaler",
    )
    raw(
        "opaque-size",
        OrderedDict(w=rebuild_tensor(storage, 0, G("opaque_classes", "TrainConfig")(), (1,))),
        "opaque_classes.TrainConfig",
    )
    raw(
        "opaque-device",
        {
            "state_dict": OrderedDict(w=rebuild_tensor(storage, 0, (6,), (1,))),
            "dev": G("torch", "device")(G("opaque_classes", "TrainConfig")()),
        },
        "opaque_classes.TrainConfig",
    )
    return cases


REFUSED = [
    "tensor-subclass",
    "tensor-in-namespace",
    "pickled-module",
    "opaque-in-the-state-dict",
    "opaque-storage-class",
    "opaque-size",
    "opaque-device",
]


@pytest.mark.parametrize("case", REFUSED)
def test_globals_a_tensor_depends_on_are_refused(cli: Any, tmp_path: Path, case: str) -> None:
    path, name = refused_cases(tmp_path)[case]
    for argv in (
        ["inspect", path],
        ["extract", path, "-o", tmp_path / "o.pt"],
        ["rename", path, "-o", tmp_path / "r.pt", "--add-prefix", "x."],
    ):
        r = cli(*argv)
        assert r.exit_code == 2, (argv, r.stdout)
        line = one_line(r)
        assert "refused to unpickle" in line and name in line and "--allow-global" in line, line
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "r.pt").exists()


def test_container_errors_stay_container_errors_beside_opaque_entries(cli: Any, tmp_path: Path) -> None:
    ns = argparse.Namespace(lr=1)
    two = save({"a": {"w": torch.ones(1)}, "b": {"w": torch.ones(1)}, "args": ns}, tmp_path / "two.pt")
    r = cli("inspect", two)
    assert r.exit_code == 2 and "ambiguous container" in one_line(r)
    one = save({"state_dict": {"w": torch.ones(1)}, "args": ns}, tmp_path / "one.pt")
    r = cli("inspect", one, "--key", "args")
    assert r.exit_code == 2 and "--key 'args' does not name a mapping of tensors" in one_line(r)
    r = cli("inspect", one, "--key", "args.lr")
    assert r.exit_code == 2 and "no entry 'lr'" in one_line(r)


# ---------------------------------------------------------------- --allow-global and --unsafe


def test_allow_global_and_unsafe_build_the_objects_as_before(tmp_path: Path) -> None:
    hp = argparse.Namespace(lr=0.5, tags=["a"])
    path = save({"state_dict": model_state(), "hyper_parameters": hp}, tmp_path / "ns.ckpt")
    with load_checkpoint(path) as ckpt:
        assert ckpt.engine == "raw" and repr(ckpt.container["hyper_parameters"]) == "<argparse.Namespace (not loaded)>"
    with load_checkpoint(path, allow_globals=["argparse.Namespace"]) as ckpt:
        assert ckpt.engine == "torch"
        assert (
            type(ckpt.container["hyper_parameters"]) is argparse.Namespace and ckpt.container["hyper_parameters"] == hp
        )
    with load_checkpoint(path, unsafe=True) as ckpt:
        assert ckpt.container["hyper_parameters"] == hp

    both = save(lightning_container(), tmp_path / "both.ckpt")
    # allowing one class hands the file to torch, which refuses the others: as before, all named
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(both, allow_globals=["argparse.Namespace"])
    assert "opaque_classes.DictConfig" in info.value.globals and "argparse.Namespace" not in info.value.globals
    with load_checkpoint(both, unsafe=True) as ckpt:
        assert ckpt.container["cfg"] == DictConfig({"model": {"width": 64}}, {"readonly": True})
    assert opaque_classes.ZeroStageEnum.weights == 3
