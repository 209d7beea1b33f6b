"""README's "In CI and Makefiles" runs as shown: `examples/Makefile`'s targets on the bundled
samples, the `run:` steps of `examples/github-workflow.yml`, and the hooks of
`.pre-commit-hooks.yaml` through `pre-commit try-repo` on a repository holding a clean, a diverged
and an unsafe checkpoint. The README includes the example files verbatim."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SAMPLES = ROOT / "sample_models"


def test_readme_includes_the_examples_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## In CI and Makefiles" in readme
    assert "```make\n" + (EXAMPLES / "Makefile").read_text(encoding="utf-8") + "```" in readme
    assert "```yaml\n" + (EXAMPLES / "github-workflow.yml").read_text(encoding="utf-8") + "```" in readme
    for hook in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8")):
        assert f"`{hook['id']}`" in readme


def _shim(tmp_path: Path) -> dict[str, str]:
    """An environment whose `ckptsurgeon` (first on PATH) is this checkout's, run by this Python,
    and where sample_models imports (for --model)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "ckptsurgeon"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ckptsurgeon "$@"\n')
    script.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
    }


def _training_checkpoint(path: Path, change: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The bundled training checkpoint, with some of its weights changed; returns its state_dict."""
    ckpt = torch.load(SAMPLES / "smallcnn_train.ckpt", weights_only=True)
    for key, value in (change or {}).items():
        ckpt["model_state_dict"][key] = value
    torch.save(ckpt, path)
    return dict(ckpt["model_state_dict"])


# ----------------------------------------------------------------------------------- Makefile


def _make(tmp_path: Path, *targets: str, **variables: str) -> subprocess.CompletedProcess[str]:
    args = {
        "CKPTSURGEON": "ckptsurgeon",
        "RUN": "run.ckpt",
        "BASE": str(SAMPLES / "smallcnn.pt"),
        "MODEL": "sample_models.models:SmallCNN",
        "TRAINED": "fc",
        **variables,
    }
    return subprocess.run(
        ["make", "-f", str(EXAMPLES / "Makefile"), *targets, *(f"{k}={v}" for k, v in args.items())],
        cwd=tmp_path,
        env=_shim(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def make_dir(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copytree(SAMPLES, tmp_path / "sample_models", ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.ckpt"))
    return tmp_path


def test_make_ships_a_fine_tuned_head(make_dir: Path) -> None:
    """Fine-tuning changed the head only: `make` writes the weights alone, checked against the
    model, with a manifest of hashes, and proves the frozen layers unchanged; a second `make` has
    nothing to do."""
    torch.manual_seed(0)
    want = _training_checkpoint(make_dir / "run.ckpt", {"fc.weight": torch.randn(10, 32)})
    r = _make(make_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    weights = load_file(str(make_dir / "dist" / "model.safetensors"))
    assert weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in want)
    manifest = json.loads((make_dir / "dist" / "manifest.json").read_text())
    assert manifest["non_finite"] == [] and manifest["format"] == "safetensors"
    import hashlib

    for row in manifest["tensors"]:
        assert row["sha256"] == hashlib.sha256(want[row["key"]].contiguous().numpy().tobytes()).hexdigest()
    assert "identical: 20 tensors equal" in r.stdout + r.stderr
    again = _make(make_dir)
    assert again.returncode == 0 and "extract" not in again.stdout


def test_make_check_fails_on_a_diverged_run(make_dir: Path) -> None:
    _training_checkpoint(make_dir / "run.ckpt", {"conv1.bias": torch.full((16,), float("nan"))})
    r = _make(make_dir, "check")
    assert r.returncode != 0
    assert "not finite: 1 of 22 tensors hold NaN or Inf: conv1.bias (16 NaN, 0 Inf)" in r.stderr
    assert json.loads((make_dir / "dist" / "manifest.json").read_text())["non_finite"] == ["conv1.bias"]


def test_make_frozen_fails_when_a_frozen_layer_moved(make_dir: Path) -> None:
    state = torch.load(SAMPLES / "smallcnn.pt", weights_only=True)
    _training_checkpoint(make_dir / "run.ckpt", {"conv1.weight": state["conv1.weight"] + 1e-6})
    assert _make(make_dir, "check").returncode == 0
    r = _make(make_dir, "frozen")
    assert r.returncode != 0
    assert "conv1.weight" in r.stdout and "different: 1 value mismatches; 19 equal" in r.stdout


def test_make_writes_nothing_that_does_not_fit_the_model(make_dir: Path) -> None:
    _training_checkpoint(make_dir / "run.ckpt")
    r = _make(make_dir, MODEL="sample_models.models:TransferCNN")
    assert r.returncode != 0
    assert "nothing written: the result does not fit the model" in r.stderr
    assert not (make_dir / "dist" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------- workflow


def _workflow_steps() -> list[dict[str, Any]]:
    """The `run:` steps of the workflow except the installation (this checkout is the install)."""
    workflow = yaml.safe_load((EXAMPLES / "github-workflow.yml").read_text(encoding="utf-8"))
    (job,) = workflow["jobs"].values()
    steps = [s for s in job["steps"] if "run" in s]
    assert steps[0]["name"].startswith("Install") and all(
        line.startswith("pip install") for line in steps[0]["run"].splitlines()
    )
    return steps[1:]


def _run_workflow(tmp_path: Path) -> list[int]:
    """Run each step as GitHub Actions runs a `run:` (bash -eo pipefail); their exit codes."""
    codes = []
    for step in _workflow_steps():
        r = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=tmp_path,
            env=_shim(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        codes.append(r.returncode)
    return codes


@pytest.fixture
def repo_with_weights(tmp_path: Path) -> Path:
    """A repository as the workflow expects it: weights/ and the model class mypkg.models:Net."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text("from sample_models.models import SmallCNN as Net  # noqa: F401\n")
    shutil.copytree(SAMPLES, tmp_path / "sample_models", ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.ckpt"))
    (tmp_path / "weights").mkdir()
    shutil.copy(SAMPLES / "smallcnn.safetensors", tmp_path / "weights" / "pretrained.safetensors")
    return tmp_path


def _weights(repo: Path, change: dict[str, torch.Tensor]) -> None:
    state = load_file(str(SAMPLES / "smallcnn.safetensors"))
    state.update(change)
    save_file(state, str(repo / "weights" / "model.safetensors"))


def test_workflow_passes_fine_tuned_weights(repo_with_weights: Path) -> None:
    _weights(repo_with_weights, {"fc.bias": torch.ones(10)})
    assert _run_workflow(repo_with_weights) == [0, 0]
    assert json.loads((repo_with_weights / "diff.json").read_text())["identical"] is True


def test_workflow_fails_on_nan_and_on_a_moved_frozen_layer(repo_with_weights: Path) -> None:
    _weights(repo_with_weights, {"fc.bias": torch.tensor([float("nan")] * 10)})
    assert _run_workflow(repo_with_weights) == [1, 0]
    _weights(repo_with_weights, {"bn1.running_mean": torch.full((16,), 0.5)})
    assert _run_workflow(repo_with_weights) == [0, 1]
    (mismatch,) = json.loads((repo_with_weights / "diff.json").read_text())["value_mismatches"]
    assert mismatch["key"] == "bn1.running_mean" and mismatch["num_different"] == 16


# --------------------------------------------------------------------------------- pre-commit


class Marked(torch.Tensor):
    """A tensor subclass: its checkpoint names this class, which only --unsafe would import."""


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def pre_commit_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(the hooks' repository, a repository holding checkpoints, the environment to run
    pre-commit in). The hooks' repository is a committed copy of this checkout's package, so
    that the hooks run what a user would install. pre-commit builds the hooks' environment once:
    with the system site-packages (torch is not downloaded again; the constraint keeps pip from
    choosing another torch) and its own install of ckptsurgeon."""
    try:
        import pre_commit  # noqa: F401
    except ImportError:
        pytest.skip("pre-commit is not installed (a test dependency)")
    base = tmp_path_factory.mktemp("pre_commit")
    hooks = base / "hooks"
    hooks.mkdir()
    shutil.copytree(ROOT / "ckptsurgeon", hooks / "ckptsurgeon", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy(ROOT / name, hooks / name)
    _git(hooks, "init", "-q")
    _git(hooks, "add", ".")
    _git(hooks, "commit", "-q", "-m", "hooks")
    work = base / "work"
    work.mkdir()
    shutil.copy(SAMPLES / "smallcnn.pt", work / "clean.pt")
    shutil.copy(SAMPLES / "smallcnn.safetensors", work / "clean.safetensors")
    torch.save({"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2)}, work / "diverged.pt")
    torch.save({"w": torch.ones(3).as_subclass(Marked)}, work / "subclass.pt")
    _git(work, "init", "-q")
    _git(work, "add", ".")
    (base / "constraints.txt").write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PRE_COMMIT_HOME=str(base / "cache"),
        VIRTUALENV_SYSTEM_SITE_PACKAGES="1",
        PIP_CONSTRAINT=str(base / "constraints.txt"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return hooks, work, env


def _try_repo(env: tuple[Path, Path, dict[str, str]], *files: str) -> subprocess.CompletedProcess[str]:
    """Every hook of the repository over `files` (each call builds the hooks' environment anew)."""
    hooks, work, environ = env
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", "try-repo", str(hooks), "--files", *files],
        cwd=work,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _hook_outputs(stdout: str) -> dict[str, str]:
    """pre-commit's report split by hook: hook id -> its lines."""
    sections: dict[str, str] = {}
    current = ""
    for line in stdout.splitlines():
        if line.startswith("- hook id: "):
            current = line.removeprefix("- hook id: ").strip()
        if current:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_pre_commit_hooks_pass_clean_files_and_refuse_the_others(
    pre_commit_env: tuple[Path, Path, dict[str, str]],
) -> None:
    ok = _try_repo(pre_commit_env, "clean.pt", "clean.safetensors")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("Passed") == 2
    bad = _try_repo(pre_commit_env, "clean.pt", "diverged.pt", "subclass.pt")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = _hook_outputs(bad.stdout)
    safe, finite = out["ckptsurgeon-safe"], out["ckptsurgeon-finite"]
    # ckptsurgeon-safe: only the file that needs --unsafe, naming the global it would import
    assert "refused subclass.pt" in safe and "test_ci_examples.Marked" in safe and "--unsafe" in safe
    assert "refused diverged.pt" not in safe and "refused clean.pt" not in safe
    # ckptsurgeon-finite: the diverged file (and the unsafe one, which it cannot read either)
    assert "refused diverged.pt" in finite and "w (1 NaN, 0 Inf)" in finite and "refused subclass.pt" in finite
    assert "refused clean.pt" not in finite
