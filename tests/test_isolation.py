"""--model runs the model's code in a child process: its prints never reach stdout, and an exit,
crash or signal in it is exit 2 naming the model, never a silent success (real console-script runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckptsurgeon.errors import ModelSpecError

MODELS = """
import os, signal, sys
import torch.nn as nn

if os.environ.get("PRINT_AT_IMPORT"):
    print("debug print at import")

class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

class Prints(Base):
    def __init__(self):
        super().__init__()
        print("debug print in the constructor")
        os.write(1, b"a write to fd 1\\n")

class OsExit(Base):
    def __init__(self):
        super().__init__()
        os._exit(0)

class SysExit(Base):
    def __init__(self):
        super().__init__()
        sys.exit(0)

class RaisesSystemExit(Base):
    def __init__(self):
        super().__init__()
        raise SystemExit(0)

class Segfault(Base):
    def __init__(self):
        super().__init__()
        os.kill(os.getpid(), signal.SIGSEGV)

class ExitInHook(Base):
    def __init__(self):
        super().__init__()
        self.register_load_state_dict_post_hook(lambda module, keys: os._exit(0))

if os.environ.get("EXIT_AT_IMPORT"):
    os._exit(0)
"""


def strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("iso")
    (d / "usermodels.py").write_text(textwrap.dedent(MODELS))
    torch.save({"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}, d / "ckpt.pt")
    return d


def run(d: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("ckptsurgeon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ckptsurgeon"]
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, timeout=120, cwd=d, env={**os.environ, **env}
    )


def test_prints_of_the_model_go_to_stderr_and_stdout_is_one_json_document(files):
    r = run(files, "inspect", "ckpt.pt", "--json", "--model", "usermodels.py:Prints", PRINT_AT_IMPORT="1")
    assert r.returncode == 0, r.stderr
    data = strict_json(r.stdout)  # the whole of stdout: nothing before or after the document
    assert data["compatible"] is True and data["model"] == "usermodels.py:Prints"
    assert "debug print at import" in r.stderr
    assert "debug print in the constructor" in r.stderr and "a write to fd 1" in r.stderr


def test_an_exit_in_the_model_is_exit_2_naming_it(files):
    r = run(files, "inspect", "ckpt.pt", "--json", "--model", "usermodels.py:OsExit")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["error"]["kind"] == "model_spec"  # the one document: the error
    assert r.stderr.splitlines() == [
        "error: model spec 'usermodels.py:OsExit': the model's code exited (status 0) while building the model; "
        "nothing was checked"
    ]


def test_a_crash_in_the_model_is_exit_2_and_extract_writes_nothing(files):
    out = files / "out.pt"
    r = run(files, "extract", "ckpt.pt", "-o", str(out), "--json", "--model", "usermodels.py:Segfault")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["exit_code"] == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model spec 'usermodels.py:Segfault'"), r.stderr
    assert "crashed (killed by SIGSEGV) while building the model" in lines[0]
    assert not out.exists()


# Every way out, for inspect and extract, in one process that calls the CLI's main() case after
# case: on code that let the model end the process, the driver dies and reports nothing.
DRIVER = """
import io, json, os, sys
from ckptsurgeon.cli import main
results = []
for command, name, env in json.loads(sys.argv[1]):
    os.environ.update(env)
    out = f"out_{name}_{command}.pt"
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    extra = ["-o", out] if command == "extract" else []
    rc = main([command, "ckpt.pt", *extra, "--json", "--model", f"usermodels.py:{name}"])
    results.append([rc, sys.stdout.getvalue(), sys.stderr.getvalue(), os.path.exists(out)])
    for k in env:
        del os.environ[k]
sys.__stdout__.write(json.dumps(results))
"""

WAYS_OUT = [
    ("OsExit", {}, "exited (status 0) while building the model"),
    ("Segfault", {}, "crashed (killed by SIGSEGV) while building the model"),
    ("SysExit", {}, "raised SystemExit: 0"),
    ("RaisesSystemExit", {}, "raised SystemExit: 0"),
    ("Base", {"EXIT_AT_IMPORT": "1"}, "exited (status 0) while importing usermodels.py"),
    ("ExitInHook", {}, "exited (status 0) while checking the checkpoint against the model"),
]


def test_every_way_out_of_the_model_is_exit_2(files):
    cases = [(command, name, env) for command in ("inspect", "extract") for name, env, _ in WAYS_OUT]
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True, timeout=120, cwd=files
    )
    assert r.returncode == 0 and r.stdout, r.stderr
    results = json.loads(r.stdout)
    assert len(results) == len(cases)
    for (command, name, _), (_, _, how), (rc, out, err, written) in zip(cases, WAYS_OUT * 2, results):
        assert rc == 2 and json.loads(out)["error"]["kind"] == "model_spec", (command, name, out, err)
        assert err.startswith(f"error: model spec 'usermodels.py:{name}'") and how in err, (command, err)
        assert len(err.splitlines()) == 1, err
        assert not written


def test_extract_json_stays_valid_when_the_model_prints(files, cli, monkeypatch):
    monkeypatch.chdir(files)
    monkeypatch.setenv("PRINT_AT_IMPORT", "1")
    out = files / "out_prints.pt"
    r = cli("extract", "ckpt.pt", "-o", out, "--json", "--model", "usermodels.py:Prints")
    assert r.exit_code == 0, r.stderr
    data = strict_json(r.stdout)
    assert data["written"] is True and data["model"]["compatible"] is True
    assert torch.equal(torch.load(out, weights_only=True)["fc.weight"], torch.ones(2, 2))


def test_the_model_module_is_not_imported_into_the_caller(files, monkeypatch):
    from ckptsurgeon.model import check_model_spec

    monkeypatch.chdir(files)
    before = set(sys.modules)
    report = check_model_spec(f"{files / 'usermodels.py'}:Base", {"fc.weight": (2, 2), "fc.bias": (2,)})
    assert report.compatible() and report.kinds == {"fc.weight": "parameter", "fc.bias": "parameter"}
    assert not any("usermodels" in m for m in set(sys.modules) - before)
    with pytest.raises(ModelSpecError, match="exited"):
        check_model_spec(f"{files / 'usermodels.py'}:OsExit", {"fc.weight": (2, 2)})


# ------------------------------------------------------------- inspect: a selection with --model

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def test_inspect_selection_with_model_judges_the_whole_state_dict(cli):
    r = cli("inspect", SAMPLES / "smallcnn.pt", "-i", "fc", "--json", "--model", "sample_models.models:SmallCNN")
    assert r.exit_code == 0, r.stderr
    data = strict_json(r.stdout)
    assert [t["key"] for t in data["tensors"]] == ["fc.weight", "fc.bias"]  # the selection is shown
    assert data["compatible"] is True and data["missing_keys"] == [] and data["num_tensors_in_state_dict"] == 22


def test_inspect_selection_table_shows_only_selected_missing_rows(cli):
    r = cli(
        "inspect", SAMPLES / "smallcnn.pt", "-x", "fc", "-x", "head.0", "--model", "sample_models.models:TransferCNN"
    )
    assert r.exit_code == 1  # head.* missing, fc.* unexpected: judged on the whole state_dict
    rows = {line.split()[0]: line.split()[-1] for line in r.stdout.splitlines()[2:] if line.split()}
    assert rows["head.2.weight"] == "missing" and rows["head.2.bias"] == "missing"
    assert "head.0.weight" not in rows and "fc.weight" not in rows
    assert "4 missing, 2 unexpected" in r.stdout


# ------------------------------------------------------------------------- strict JSON, tolerances


@pytest.mark.parametrize(
    ("option", "value"),
    [("--atol", "inf"), ("--atol", "nan"), ("--atol", "-1"), ("--rtol", "1e400"), ("--rtol", "NaN")],
)
def test_diff_refuses_a_tolerance_that_is_not_finite_and_non_negative(cli, files, option, value):
    r = cli("diff", files / "ckpt.pt", files / "ckpt.pt", option, value, "--json")
    assert r.exit_code == 2 and strict_json(r.stdout)["error"]["kind"] == "usage"
    assert len(r.stderr.splitlines()) == 1 and option in r.stderr


@pytest.mark.parametrize("bad", [{"atol": math.inf}, {"atol": math.nan}, {"rtol": -1e-9}, {"rtol": math.inf}])
def test_diff_state_dicts_refuses_bad_tolerances(bad):
    from ckptsurgeon import diff_state_dicts
    from ckptsurgeon.errors import UsageError

    sd = {"w": torch.ones(2)}
    with pytest.raises(UsageError, match=next(iter(bad))):
        diff_state_dicts(sd, sd, **bad)


def test_non_finite_numbers_are_null_in_json():
    from ckptsurgeon.cli.text import to_json

    data = {"a": math.nan, "b": [math.inf, 1.5, {"c": -math.inf}], "d": (2.0,)}
    for pretty in (False, True):
        assert strict_json(to_json(data, pretty=pretty)) == {"a": None, "b": [None, 1.5, {"c": None}], "d": [2.0]}


def test_every_json_document_is_strict_json(cli, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.tensor([1.0, 1.0, math.nan]), "n": torch.tensor(3)}, a)
    torch.save({"w": torch.tensor([1.0, 0.0, 2.0]), "n": torch.tensor(4)}, b)
    r = cli("diff", a, b, "--json", "--rtol", "1e-3")
    assert r.exit_code == 1
    diff = strict_json(r.stdout)
    (w,) = [v for v in diff["value_mismatches"] if v["key"] == "w"]
    assert w["max_abs_diff"] is None and w["max_rel_diff"] is None and w["num_different"] == 2  # NaN vs 2.0; 1 vs 0
    assert diff["rtol"] == 1e-3 and diff["atol"] == 0.0
    runs = [
        ("inspect", a, "--json"),
        ("extract", a, "-o", tmp_path / "e.pt", "--json"),
        ("rename", a, "-o", tmp_path / "r.pt", "--add-prefix", "m.", "--json"),
        ("merge", a, b, "-o", tmp_path / "m.pt", "--average", "--json"),
    ]
    for args in runs:
        r = cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
        strict_json(r.stdout)


# ----------------------------------------------------------------- merge --average: one warning


def test_average_warns_once_for_all_integer_tensors_taken_from_the_first(cli, tmp_path):
    def net() -> torch.nn.Module:
        return torch.nn.Sequential(*[torch.nn.BatchNorm1d(2) for _ in range(12)])

    a, b = net(), net()
    for i, m in enumerate(b):
        m.num_batches_tracked += i + 1
        m.running_mean += 1.0
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    r = cli("merge", tmp_path / "a.pt", tmp_path / "b.pt", "--average", "-o", tmp_path / "m.pt")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: 12 integer tensors differ between inputs and were taken from the first: "
        "0.num_batches_tracked, 1.num_batches_tracked, 2.num_batches_tracked (+9 more)"
    ]
    merged = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(merged[f"{i}.num_batches_tracked"].item() == 0 for i in range(12))  # from the first
    assert torch.allclose(merged["5.running_mean"], torch.full((2,), 0.5))
    r = cli("merge", tmp_path / "a.pt", tmp_path / "b.pt", "--average", "-o", tmp_path / "m.pt", "-f", "--json")
    assert len(strict_json(r.stdout)["warnings"]) == 12  # JSON keeps one entry per key


# ------------------------------------------------------------------------------- plain tables


def columns(text: str) -> int:
    """Terminal columns of `text` (East Asian wide characters take two, combining marks none)."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_plain_table_aligns_wide_keys_and_quotes_blank_ones(cli, tmp_path):
    keys = ["", " ", "x ", "層.重み", "e\u0301.w", "'q'", "long_ascii_key.weight"]
    torch.save({k: torch.zeros(i + 1) for i, k in enumerate(keys)}, tmp_path / "k.pt")
    r = cli("inspect", tmp_path / "k.pt")
    assert r.exit_code == 0, r.stderr
    rows = r.stdout.splitlines()[2 : 2 + len(keys)]
    shown = [row[: row.index("(")].rstrip() for row in rows]
    assert shown == ["''", "' '", "'x '", "層.重み", "e\u0301.w", "\"'q'\"", "long_ascii_key.weight"]
    assert len({columns(row[: row.index("(")]) for row in rows}) == 1  # the shape column starts at one column
    assert len({columns(row) for row in rows}) == 1  # right-aligned bytes end at one column


def test_diff_table_quotes_blank_keys(cli, tmp_path):
    torch.save({"": torch.zeros(1), " ": torch.zeros(1)}, tmp_path / "a.pt")
    torch.save({" ": torch.ones(1)}, tmp_path / "b.pt")
    r = cli("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert r.exit_code == 1
    assert r.stdout.splitlines()[1].split("  ")[0] == "''" and r.stdout.splitlines()[2].startswith("' '  ")
