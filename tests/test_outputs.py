"""Outputs are regular files or nothing; `-o -`; output and --weights checked before any input is
read; a full disk names the output; SIGINT / SIGTERM at any moment (also inside `import torch`)
end the command with 130 / 143, the output untouched and no temporary file left."""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptsurgeon.cli import main
from ckptsurgeon.errors import OutputError
from ckptsurgeon.io import TMP_MARK, atomic_output, check_output, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(TMP_MARK)]


def small_sd(seed: int = 0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(w=torch.randn(32, 32, generator=g), b=torch.randn(32, generator=g))


@pytest.fixture
def two_inputs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(small_sd(0), a)
    torch.save(small_sd(1), b)
    return a, b


# ------------------------------------------------------------------------- a full disk


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_a_write_that_hits_the_size_limit_names_the_output(tmp_path):
    src = tmp_path / "big.pt"
    torch.save(OrderedDict((f"t{i}", torch.ones(64 << 10)) for i in range(8)), src)  # 2 MiB
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(src), "-o", str(out), "-f"],
        preexec_fn=_file_size_limit(1 << 20), capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {out}: cannot write: File too large"]
    assert out.read_bytes() == b"precious" and temps(tmp_path) == []


