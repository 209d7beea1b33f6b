"""The jobs (`ckptsurgeon.jobs`): one pipeline per command, the same the CLI runs.

A job's `to_dict()` is the command's `--json` document and its `notices` are the command's stderr
lines; bad input raises with the notices said before it; the README's example of the jobs runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptsurgeon import CheckpointError, RenameRules, SelectionError, jobs
from ckptsurgeon.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


def _cli(capsys, *args):
    """(exit code, parsed stdout JSON, stderr lines) of one in-process CLI run."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err.splitlines()


def test_inspect_job_is_the_command(capsys):
    ckpt = SAMPLES / "smallcnn_train.ckpt"
    result = jobs.inspect(ckpt, selection=jobs.Selection(include=["fc", "nope"]))
    rc, doc, err = _cli(capsys, "inspect", ckpt, "-i", "fc", "-i", "nope", "--json")
    assert (result.exit_code, result.to_dict(), list(result.notices)) == (rc, doc, err)
    assert result.notices == ("warning: --include 'nope' matches no key",)
    assert [r.key for r in result.report.tensors] == ["fc.weight", "fc.bias"]


def test_inspect_job_with_a_model_that_does_not_fit(capsys):
    ckpt = SAMPLES / "smallcnn_dp.pt"
    spec = "sample_models.models:SmallCNN"
    result = jobs.inspect(ckpt, model=jobs.ModelCheck(spec))
    rc, doc, _ = _cli(capsys, "inspect", ckpt, "--model", spec, "--json")
    assert result.exit_code == rc == 1
    assert result.to_dict() == doc and doc["compatible"] is False


def test_extract_job_writes_what_the_command_writes(tmp_path, capsys):
    ckpt = SAMPLES / "smallcnn_train.ckpt"
    result = jobs.extract(ckpt, jobs.Writing(tmp_path / "job.pt"), selection=jobs.Selection(exclude=["fc"]))
    rc, doc, err = _cli(capsys, "extract", ckpt, "-o", tmp_path / "cli.pt", "-x", "fc", "--json")
    assert rc == result.exit_code == 0
    assert {**result.to_dict(), "output": "X"} == {**doc, "output": "X"}
    assert list(result.notices) == err == [f"using the state_dict at key 'model_state_dict' of {ckpt}"]
    written = torch.load(tmp_path / "job.pt", weights_only=True)
    source = torch.load(ckpt, weights_only=True)["model_state_dict"]
    assert list(written) == [k for k in source if not k.startswith("fc.")] == list(result.keys)
    for k, v in written.items():
        assert v.dtype == source[k].dtype and torch.equal(v, source[k])


def test_a_notice_said_before_an_error_reaches_notify_and_nothing_is_written(tmp_path):
    seen: list[str] = []
    out = tmp_path / "out.pt"
    with pytest.raises(SelectionError) as exc:
        jobs.extract(
            SAMPLES / "smallcnn.pt", jobs.Writing(out), selection=jobs.Selection(include=["nope"]), notify=seen.append
        )
    assert exc.value.exit_code == 2
    assert seen == ["warning: --include 'nope' matches no key"]
    assert not out.exists()


def test_a_refused_write_is_exit_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.pt"
    spec = jobs.ModelCheck("sample_models.models:SmallCNN")
    result = jobs.extract(
        SAMPLES / "smallcnn.pt", jobs.Writing(out), selection=jobs.Selection(exclude=["fc"]), model=spec
    )
    assert result.exit_code == 1 and result.refused and not out.exists()
    rc, doc, err = _cli(
        capsys, "extract", SAMPLES / "smallcnn.pt", "-o", out, "-x", "fc", "--model", spec.spec, "--json"
    )
    assert rc == 1 and doc == result.to_dict() and doc["written"] is False
    assert err[-1].startswith("nothing written: the result does not fit the model")


def test_rename_job(tmp_path, capsys):
    ckpt = SAMPLES / "smallcnn_dp.pt"
    rules = RenameRules(strip_prefixes=("module.",))
    result = jobs.rename(ckpt, rules, jobs.Writing(tmp_path / "a.pt", dry_run=True))
    rc, doc, err = _cli(
        capsys, "rename", ckpt, "-o", tmp_path / "a.pt", "--strip-prefix", "module.", "--dry-run", "--json"
    )
    assert (rc, doc, err) == (0, result.to_dict(), list(result.notices))
    assert result.num_changed == 22 and not (tmp_path / "a.pt").exists()
    written = jobs.rename(ckpt, rules, jobs.Writing(tmp_path / "b.pt"))
    sd = torch.load(tmp_path / "b.pt", weights_only=True)
    assert written.written and list(sd) == [k.removeprefix("module.") for k in torch.load(ckpt, weights_only=True)]
    with pytest.raises(CheckpointError, match="nothing to do"):
        jobs.rename(ckpt, RenameRules(), jobs.Writing(tmp_path / "c.pt"))


def _bn_file(path: Path, tracked: int, scale: float) -> Path:
    sd = OrderedDict(w=torch.full((3,), scale), n=torch.tensor(tracked))
    torch.save(sd, path)
    return path


def test_merge_job_average_and_its_warning(tmp_path, capsys):
    a, b = _bn_file(tmp_path / "a.pt", 1, 1.0), _bn_file(tmp_path / "b.pt", 2, 3.0)
    seen: list[str] = []
    result = jobs.merge([a, b], jobs.Writing(tmp_path / "m.pt"), average=True, weights=[1, 3], notify=seen.append)
    assert list(result.notices) == seen and seen[0].startswith("warning: 1 integer tensor differs")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.allclose(sd["w"], torch.full((3,), 2.5)) and sd["n"].item() == 1
    rc, doc, err = _cli(capsys, "merge", a, b, "-o", tmp_path / "c.pt", "--average", "--weights", "1,3", "--json")
    assert rc == 0 and {**doc, "output": "X"} == {**result.to_dict(), "output": "X"} and err == seen
    with pytest.raises(CheckpointError, match="--weights needs --average"):
        jobs.merge([a, b], jobs.Writing(tmp_path / "x.pt"), weights=[1, 1])


def test_diff_job(tmp_path, capsys):
    a, b = _bn_file(tmp_path / "a.pt", 1, 1.0), _bn_file(tmp_path / "b.pt", 1, 1.5)
    result = jobs.diff(a, b)
    rc, doc, _ = _cli(capsys, "diff", a, b, "--json")
    assert result.exit_code == rc == 1 and result.to_dict() == doc
    assert [m.key for m in result.report.value_mismatches] == ["w"]
    assert jobs.diff(a, b, atol=0.5).exit_code == 0


def test_results_and_options_are_immutable():
    result = jobs.inspect(SAMPLES / "smallcnn.pt")
    for obj in (result, jobs.Selection(), jobs.Writing("x.pt")):
        with pytest.raises(AttributeError):
            obj.notices = ()  # type: ignore[union-attr]


def test_importing_the_jobs_imports_neither_the_cli_nor_torch():
    code = (
        "import sys; from ckptsurgeon import jobs; "
        "print(sorted(m for m in ('typer', 'rich', 'torch', 'ckptsurgeon.cli') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr


def test_readme_jobs_example_runs(tmp_path):
    """The README's example of the jobs runs as written, in a scratch dir with sample_models/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from ckptsurgeon import RenameRules, jobs" in b
    ]
    assert len(blocks) == 1
    shutil.copytree(SAMPLES, tmp_path / "sample_models", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run(
        [sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "0 identical"
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    source = torch.load(SAMPLES / "smallcnn.pt", weights_only=True)
    assert sorted(whole) == sorted(source) and all(torch.equal(whole[k], source[k]) for k in source)
