"""A failing command run with --json still prints exactly one JSON document on stdout: the error,
with its exit code, kind and message (besides the one line on stderr), so that a CI step piping
into `jq` never parses an empty stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptsurgeon.cli import main


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt"
    torch.save(OrderedDict(w=torch.ones(3), b=torch.zeros(2)), path)
    return path


def _run(capsys, *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


CASES = [
    # (command line with {ckpt} / {tmp}, exit code, kind, words of the message)
    ("inspect {tmp}/missing.pt --json", 2, "bad_checkpoint", "no such file"),
    ("inspect {ckpt} --json -i nothing_matches", 2, "selection", "nothing"),
    ("inspect {ckpt} --json --key model", 2, "container", "model"),
    ("inspect {ckpt} --json --model nosuchmodule:Net", 2, "model_spec", "nosuchmodule"),
    ("extract {ckpt} -o {ckpt} --json", 2, "output", "same file as an input"),
    ("extract {tmp}/missing.pt -o {tmp}/o.pt --json", 2, "bad_checkpoint", "no such file"),
    ("rename {ckpt} -o {tmp}/o.pt --json", 2, "usage", "nothing to do"),
    ("merge {ckpt} {ckpt} -o {tmp}/o.pt --json", 2, "conflict", "'b', 'w'"),
    ("merge {ckpt} -o {tmp}/o.pt --json", 2, "usage", "at least two"),
    ("diff {ckpt} {tmp}/missing.pt --json", 2, "bad_checkpoint", "missing.pt"),
    ("diff {ckpt} {ckpt} --json --no-such-option", 2, "usage", "No such option"),
    ("inspect --json", 2, "usage", "Missing argument"),
]


@pytest.mark.parametrize("line, code, kind, words", CASES, ids=[c[0].split()[0] + ":" + c[2] for c in CASES])
def test_a_failure_with_json_prints_one_error_document(capsys, tmp_path, ckpt, line, code, kind, words):
    args = line.format(ckpt=ckpt, tmp=tmp_path).split()
    rc, out, err = _run(capsys, *args)
    assert rc == code
    doc = json.loads(out)  # exactly one document: json.loads refuses trailing data
    assert doc["schema_version"] == 1 and set(doc) == {"schema_version", "error"}
    assert doc["error"]["exit_code"] == code and doc["error"]["kind"] == kind
    assert words in doc["error"]["message"]
    last = err.splitlines()[-1]  # a warning may come first (an include that matched nothing)
    assert last.startswith("error: ") and words in last and err.count("error: ") == 1


def test_without_json_a_failure_leaves_stdout_empty(capsys, tmp_path):
    rc, out, err = _run(capsys, "inspect", tmp_path / "missing.pt")
    assert (rc, out) == (2, "") and err.startswith("error: ")


def test_success_and_found_differences_print_their_own_document_only(capsys, tmp_path, ckpt):
    other = tmp_path / "other.pt"
    torch.save(OrderedDict(w=torch.ones(3) * 2, b=torch.zeros(2)), other)
    rc, out, _ = _run(capsys, "diff", ckpt, other, "--json")
    assert rc == 1 and "error" not in json.loads(out) and json.loads(out)["identical"] is False
    rc, out, _ = _run(capsys, "inspect", ckpt, "--json")
    assert rc == 0 and "error" not in json.loads(out)


def test_json_after_double_dash_is_not_an_option(capsys, tmp_path):
    rc, out, _ = _run(capsys, "inspect", "--", "--json")
    assert rc == 2 and out == ""


def test_the_console_script_pipes_into_a_json_reader(tmp_path):
    """The real process, as `ckptsurgeon ... --json | jq .error.kind` would run it."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptsurgeon",
            "extract",
            str(tmp_path / "missing.pt"),
            "-o",
            str(tmp_path / "o.pt"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == {
        "exit_code": 2,
        "kind": "bad_checkpoint",
        "message": f"{tmp_path / 'missing.pt'}: no such file",
    }
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("command", ["extract", "rename", "merge"])
def test_a_writer_refused_by_model_prints_its_report_marked_not_written(capsys, tmp_path, command):
    """Exit 1 (the result does not fit --model) with --json: one document, `"written": false`."""
    src = Path(__file__).resolve().parent.parent / "sample_models" / "smallcnn_dp.pt"
    out = tmp_path / "out.pt"
    args = {
        "extract": ["extract", src],
        "rename": ["rename", src, "--add-prefix", "x."],
        "merge": ["merge", src, src, "--on-conflict", "first"],
    }[command]
    rc, stdout, _ = _run(capsys, *args, "-o", out, "--model", "sample_models.models:SmallCNN", "--json")
    doc = json.loads(stdout)
    assert rc == 1 and doc["written"] is False and doc["command"] == command and not out.exists()
    assert doc["model"]["compatible"] is False and doc["model"]["unexpected_keys"][0].endswith("module.conv1.weight")
