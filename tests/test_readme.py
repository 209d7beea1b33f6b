"""README.md is part of the product: its commands run and print exactly what it shows.

Every `$ ` line in a ```console block runs (in order, in one scratch directory holding a copy of
sample_models/) and its output must equal the lines that follow it. Regenerate the outputs after a
deliberate change with:  CKPTSURGEON_REGEN_README=1 python -m pytest tests/test_readme.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptsurgeon.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def _examples(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line; `\\` continues a command."""
    out: list[tuple[str, list[str]]] = []
    for block in BLOCK.findall(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            cmd = lines[i][2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            i += 1
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i].rstrip())
                i += 1
            out.append((cmd, expected))
    return out


def _run(cmd: str, cwd: Path) -> list[str]:
    # this checkout's ckptsurgeon first (the console script's editable install may be another's)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400", "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}"}
    r = subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        capture_output=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=120,
    )
    return [ln.rstrip() for ln in r.stdout.splitlines()]


def test_readme_examples_print_what_they_show(tmp_path):
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models", ignore=shutil.ignore_patterns("__pycache__"))
    text = README.read_text(encoding="utf-8")
    examples = _examples(text)
    assert len(examples) >= 8
    regen = bool(os.environ.get("CKPTSURGEON_REGEN_README"))
    actual_by_cmd = []
    for cmd, expected in examples:
        actual = _run(cmd, tmp_path)
        actual_by_cmd.append((cmd, actual))
        if not regen:
            assert actual == expected, f"README example changed: $ {cmd}\n" + "\n".join(actual)
    if regen:
        README.write_text(_rewrite(text, dict(actual_by_cmd)), encoding="utf-8")


def _rewrite(text: str, outputs: dict[str, list[str]]) -> str:
    def block(m: re.Match[str]) -> str:
        lines = m.group(1).splitlines()
        new: list[str] = []
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                if not any(ln.startswith("$ ") for ln in lines):
                    new.append(lines[i])
                i += 1
                continue
            start = i
            cmd = lines[i][2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            new.extend(lines[start : i + 1])
            i += 1
            while i < len(lines) and not lines[i].startswith("$ "):
                i += 1
            new.extend(outputs[cmd])
        return "```console\n" + "\n".join(new) + "\n```"

    return BLOCK.sub(block, text)


def test_ci_runs_the_readme_setup_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = README.read_text()
    commands = [ln.strip() for ln in ci.splitlines() if ln.strip().startswith("pip install")]
    assert len(commands) == 2
    for cmd in commands:
        assert f"```console\n{cmd}\n```" in readme, cmd
    assert "pytest" in commands[1] and "ckptsurgeon inspect sample_models/" in commands[0]


def test_every_command_and_exit_code_is_documented():
    readme = README.read_text()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert f"### {name}" in readme, name
    for code in range(4):
        assert f"| {code} |" in readme
    for section in ("## Key patterns", "## Safety", "## Output, JSON and exit codes", "## Set-up"):
        assert section in readme


@pytest.mark.skipif(shutil.which("ckptsurgeon") is None, reason="console script not installed")
def test_console_script_is_on_path():
    r = subprocess.run(["ckptsurgeon", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ckptsurgeon ")


def test_readme_python_example_runs(tmp_path):
    """The "Use from Python" block runs as written (in a scratch dir with sample_models/)."""
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models", ignore=shutil.ignore_patterns("__pycache__"))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for code in blocks:
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "identical" in r.stdout
