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
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import globals_classes
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


# ---------------------------------------------------------------- --allow-global: refused by name

_NAMED_CASES = [
    (f"exec-{fmt}-{payload}", cls)
    for payload, cls in corpus.ALLOW_GLOBAL_PAYLOADS.items()
    for fmt in ("zip", "legacy")
    if f"exec-{fmt}-{payload}" in corpus.case_names()
]


@pytest.mark.parametrize(("case_name", "allowed"), _NAMED_CASES)
@pytest.mark.parametrize("marker_exists", [False, True], ids=["absent", "present"])
def test_allow_global_of_a_class_that_reaches_the_system_creates_and_truncates_nothing(
    cli, tmp_path: Path, case_name: str, allowed: str, marker_exists: bool
) -> None:
    marker = tmp_path / "marker"
    if marker_exists:
        marker.write_text(PRECIOUS)
    path = write_case(case_name, tmp_path / "in.pt", marker)
    before = path.read_bytes()
    for argv in (["inspect", path], ["extract", path, "-o", tmp_path / "out.pt"]):
        r = cli(*argv, "--allow-global", allowed)
        assert r.exit_code == 2, r.stdout
        assert "refused" in one_line_error(r)
    assert marker.read_text() == PRECIOUS if marker_exists else not marker.exists()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"] + (["marker"] if marker_exists else [])


@pytest.mark.parametrize(
    "name",
    [
        "logging.FileHandler",
        "logging.handlers.RotatingFileHandler",
        "zipfile.ZipFile",
        "tarfile.TarFile",
        "shelve.DbfilenameShelf",
        "sqlite3.Connection",
        "socket.socket",
        "tempfile.SpooledTemporaryFile",
        "threading.Thread",
        "subprocess.Popen",
        "io.FileIO",
        "pathlib.Path",
        "mmap.mmap",
        "weakref.finalize",
        "multiprocessing.Process",
        "types.FunctionType",
        "types.CodeType",
        "builtins.type",
    ],
)
def test_allow_global_refuses_system_classes_before_reading(cli, tmp_path: Path, name: str) -> None:
    missing = tmp_path / "never-read.pt"  # refused before the file is even looked at
    r = cli("inspect", missing, "--allow-global", name)
    assert r.exit_code == 2
    line = one_line_error(r)
    assert f"--allow-global {name}: refused" in line and "never-read" not in line


def test_console_script_allow_global_filehandler_truncates_nothing(tmp_path: Path) -> None:
    """The issue's report, as a user runs it: the file names logging.FileHandler(marker, 'w')."""
    exe = shutil.which("ckptsurgeon")
    if exe is None:
        pytest.skip("the ckptsurgeon console script is not installed (pip install -e .)")
    marker = tmp_path / "marker"
    marker.write_text(PRECIOUS)
    path = write_case("exec-zip-logging-filehandler", tmp_path / "in.pt", marker)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [exe, "inspect", str(path), "--allow-global", "logging.FileHandler"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert marker.read_text() == PRECIOUS


# ----------------------------------------------------------- --allow-global: refused by behaviour


def test_allowed_class_is_never_called_with_the_files_arguments(cli, tmp_path: Path) -> None:
    """`Touch(path)` writes `path`; the class is allowed, but REDUCE with arguments is refused."""
    marker = tmp_path / "marker"
    path = container_with(tmp_path / "in.pt", G("globals_classes", "Touch")(str(marker)))
    r = cli("inspect", path, "--allow-global", "globals_classes.Touch")
    assert r.exit_code == 2
    line = one_line_error(r)
    assert "refused to build globals_classes.Touch" in line and str(path) in line
    assert not marker.exists()


def test_allowed_class_is_built_from_attribute_state_alone(cli, tmp_path: Path) -> None:
    """NEWOBJ + BUILD, as pickle writes any instance: `__new__` and `__dict__`, no `__init__`."""
    from ckptsurgeon import load_checkpoint

    marker = tmp_path / "marker"
    state = {"path": str(marker), "sizes": [1, 2]}
    path = container_with(tmp_path / "in.pt", NewObj(G("globals_classes", "Touch"), (), state))
    ckpt = load_checkpoint(path, allow_globals=["globals_classes.Touch"])
    extra = ckpt.container["extra"]
    assert type(extra) is globals_classes.Touch and vars(extra) == state
    assert torch.equal(ckpt.state_dict["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    out = tmp_path / "out.pt"
    r = cli("rename", path, "-o", out, "--add-prefix", "m.", "--allow-global", "globals_classes.Touch")
    assert r.exit_code == 0, r.stderr
    with torch.serialization.safe_globals([globals_classes.Touch]):
        back = torch.load(out, weights_only=True)
    assert vars(back["extra"]) == state and list(back["model"]) == ["m.w", "m.b"]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        ("ReopensInSetstate", "defines __setstate__"),
        ("WritesInDel", "defines __del__"),
        ("LazyAttrs", "defines __getattr__"),
        ("CustomReduce", "defines __reduce__"),
        ("Guarded", "runs code when it is set"),
        ("LogHandler", "belongs to logging"),
        ("DictSubclass", "is a C type"),
    ],
)
def test_classes_whose_hooks_would_run_on_file_data_are_refused(cli, tmp_path: Path, cls: str, why: str) -> None:
    marker = tmp_path / "marker"
    path = container_with(tmp_path / "in.pt", NewObj(G("globals_classes", cls), (), {"path": str(marker)}))
    for argv in (["inspect", path], ["inspect", path, "--json"], ["extract", path, "-o", tmp_path / "o.pt"]):
        r = cli(*argv, "--allow-global", f"globals_classes.{cls}")
        assert r.exit_code == 2, r.stdout
        line = one_line_error(r)
        assert "refused" in line and why in line
    import gc

    gc.collect()  # a __del__ would have run by now
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


# ---------------------------------------------------------------- --allow-global: what still works


def test_lightning_hparams_namespace_still_loads_with_its_values(cli, tmp_path: Path) -> None:
    from ckptsurgeon import load_checkpoint

    hparams = argparse.Namespace(lr=0.01, layers=[64, 32], name="cnn", nested={"betas": (0.9, 0.99)})
    sd = trained_smallcnn().state_dict()
    path = tmp_path / "lightning.ckpt"
    torch.save({"epoch": 3, "state_dict": sd, "hyper_parameters": hparams}, path)
    ckpt = load_checkpoint(path, allow_globals=["argparse.Namespace"])
    got = ckpt.container["hyper_parameters"]
    assert type(got) is argparse.Namespace and vars(got) == vars(hparams)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items()) and list(ckpt.state_dict) == list(sd)
    r = cli("inspect", path, "--allow-global", "argparse.Namespace", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["state_dict_key"] == "state_dict" and report["num_tensors"] == len(sd)
    assert set(report["other_entries"]) == {"epoch", "hyper_parameters"}


def test_dataclass_namedtuple_enum_and_simplenamespace_load_with_their_values(tmp_path: Path) -> None:
    from ckptsurgeon import load_checkpoint

    extras = {
        "hp": globals_classes.Hparams(lr=0.5, layers=(3, 4)),
        "slotted": globals_classes.Slotted(seed=3, tags=("a", "b")),
        "pair": globals_classes.Pair(7, "seven"),
        "mode": globals_classes.Mode.EVAL,
        "ns": types.SimpleNamespace(seed=1, tag="x"),
    }
    path = tmp_path / "extras.pt"
    torch.save({"model": {"w": torch.ones(2)}, **extras}, path)
    names = [
        "globals_classes.Hparams",
        "globals_classes.Slotted",
        "globals_classes.Pair",
        "globals_classes.Mode",
        "types.SimpleNamespace",
    ]
    ckpt = load_checkpoint(path, allow_globals=names)
    for key, want in extras.items():
        got = ckpt.container[key]
        assert type(got) is type(want) and got == want, key
    assert ckpt.container["mode"] is globals_classes.Mode.EVAL
    assert torch.equal(ckpt.state_dict["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (G("globals_classes", "Mode")("test"), "no member has this value"),
        (G("globals_classes", "Pair")(1, "a", "extra"), "it has 2 fields"),
        (G("argparse", "Namespace")("/tmp/x"), "passes arguments to its constructor"),
    ],
)
def test_stand_ins_refuse_arguments_they_cannot_use(tmp_path: Path, value: Any, why: str) -> None:
    from ckptsurgeon import load_checkpoint
    from ckptsurgeon.errors import BadCheckpointError

    path = container_with(tmp_path / "in.pt", value)
    with pytest.raises(BadCheckpointError, match=why):
        load_checkpoint(path, allow_globals=["globals_classes.Mode", "globals_classes.Pair", "argparse.Namespace"])


# ---------------------------------------------------------------- --unsafe: every pickle protocol


def tricky_container() -> dict[str, Any]:
    torch.manual_seed(0)
    emb = torch.randn(5, 3)
    sd = OrderedDict(
        [
            ("emb.weight", emb),
            ("head.weight", emb),
            ("bias", torch.nn.Parameter(torch.randn(3))),
            ("half", torch.randn(4, dtype=torch.float16)),
            ("steps", torch.tensor([1, 2, 3])),
        ]
    )
    return {"epoch": 7, "state_dict": sd, "note": "ok"}


PROTOCOLS = [(p, legacy) for legacy in (False, True) for p in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize(
    ("protocol", "legacy"), PROTOCOLS, ids=[f"p{p}-{'legacy' if lg else 'zip'}" for p, lg in PROTOCOLS]
)
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
    with pytest.raises(Exception):  # noqa: B017 -- whatever torch raises: it cannot load the file
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
        torch.save(
            {"w": torch.ones(2), "b": torch.tensor([1]), "args": argparse.Namespace(lr=1)}, path, pickle_protocol=4
        )
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert info.value.globals == ["argparse.Namespace"]  # (torch's own scanner stops at FRAME)
