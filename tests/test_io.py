"""Output safety: atomic writes, full disks, kills, output == input, --verify, torch version gate."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckptsurgeon.errors import OutputError, UsageError
from ckptsurgeon.io import TMP_MARK, atomic_output, check_output, load_checkpoint, save_checkpoint
from ckptsurgeon.io import save as ck_io
from ckptsurgeon.safety import check_torch_version


def temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(TMP_MARK)]


def sd() -> OrderedDict:
    torch.manual_seed(0)
    return OrderedDict(w=torch.randn(64, 64), b=torch.zeros(64))


def test_failure_mid_write_leaves_destination_and_no_temp(tmp_path):
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"old contents")
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"old contents"
    assert temps(tmp_path) == []


def test_full_disk_is_exit_2_error_and_destination_kept(tmp_path, monkeypatch):
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"old contents")
    real_fsync = os.fsync

    def no_space(fd):  # the data reaches the disk at fsync: simulate ENOSPC there
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match="no space left"):
        save_checkpoint(sd(), dest)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert dest.read_bytes() == b"old contents"
    assert temps(tmp_path) == []


def test_full_disk_during_torch_save(tmp_path, monkeypatch):
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"keep me")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OutputError, match="no space left"):
        save_checkpoint(sd(), dest)
    assert dest.read_bytes() == b"keep me" and temps(tmp_path) == []


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        dest = tmp_path / "m.pt"
        save_checkpoint(sd(), dest)
    finally:
        os.umask(old)
    assert (dest.stat().st_mode & 0o777) == 0o640


def test_output_same_as_input_needs_force(tmp_path):
    src = tmp_path / "in.pt"
    torch.save(sd(), src)
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    hard = tmp_path / "hard.pt"
    os.link(src, hard)
    for out in (src, link, hard):
        with pytest.raises(OutputError, match="same file as an input"):
            check_output(out, [src], force=False)
        check_output(out, [src], force=True)


def test_overwrite_mmapped_input_in_place(tmp_path):
    src = tmp_path / "in.pt"
    torch.save(sd(), src)
    ckpt = load_checkpoint(src)
    kept = OrderedDict(w=ckpt.state_dict["w"])
    save_checkpoint(kept, src)  # input still open (mmap or engine) while it is replaced
    back = torch.load(src, weights_only=True)
    assert list(back) == ["w"] and torch.equal(back["w"], sd()["w"])


def test_stale_temp_from_killed_run_is_cleaned(tmp_path):
    dest = tmp_path / "out.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.pt.{dead.pid}.abc123{TMP_MARK}"
    stale.write_bytes(b"junk")
    alive = tmp_path / f".out.pt.{os.getpid()}.zzz{TMP_MARK}"
    alive.write_bytes(b"someone else's write in progress")
    other_output = tmp_path / f".out.pt.{dead.pid}.{dead.pid}.xyz{TMP_MARK}"  # belongs to "out.pt.<pid>"
    other_output.write_bytes(b"another output's write")
    save_checkpoint(sd(), dest)
    assert not stale.exists() and alive.exists() and other_output.exists()


def test_kill_during_write_keeps_destination(tmp_path):
    big = tmp_path / "big.pt"
    torch.save(OrderedDict((f"t{i}", torch.randn(1 << 20)) for i in range(64)), big)  # 256 MiB
    dest = tmp_path / "out.pt"
    dest.write_bytes(b"precious")
    code = (
        "import os, sys, ckptsurgeon.io as io\n"
        "real = io.atomic_output\n"
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def slow(dest, **kw):\n"
        "    with real(dest, **kw) as f:\n"
        "        f.write(b'x' * 4096); f.flush(); print('writing', flush=True)\n"
        "        import time; time.sleep(60)\n"
        "        yield f\n"
        "io.save.atomic_output = slow\n"
        f"io.save_checkpoint(io.load_checkpoint({str(big)!r}).state_dict, {str(dest)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert temps(tmp_path), "the write goes through a temporary file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert dest.read_bytes() == b"precious"
    save_checkpoint(sd(), tmp_path / "out.pt")  # the next run cleans the dead run's temp file
    assert temps(tmp_path) == []
    assert list(torch.load(dest, weights_only=True)) == ["w", "b"]


def test_verify_catches_a_bad_write(tmp_path, monkeypatch):
    dest = tmp_path / "v.pt"
    dest.write_bytes(b"old")
    real = ck_io._write_torch

    def corrupting(obj, f):
        bad = OrderedDict((k, v.clone() + 1) for k, v in ck_io.as_torch(obj).items())
        real(bad, f)

    monkeypatch.setattr(ck_io, "_try_raw_write", lambda *a: False)
    monkeypatch.setattr(ck_io, "_write_torch", corrupting)
    with pytest.raises(OutputError, match="--verify failed"):
        save_checkpoint(sd(), dest, verify=True)
    assert dest.read_bytes() == b"old" and temps(tmp_path) == []
    save_checkpoint(sd(), dest)  # without --verify the bad write would have landed
    assert not torch.equal(torch.load(dest, weights_only=True)["w"], sd()["w"])


def test_verify_passes_for_good_writes(tmp_path):
    for name in ("v.pt", "v.safetensors"):
        save_checkpoint(sd(), tmp_path / name, verify=True)
        back = load_checkpoint(tmp_path / name)
        assert set(back.state_dict) == {"w", "b"}


@pytest.mark.parametrize(
    "version, ok", [("2.9.1", False), ("2.5.1+cu121", False), ("2.10.0", True), ("2.13.0+cpu", True), ("3.0.0", True)]
)
def test_old_torch_is_refused(version, ok):
    if ok:
        check_torch_version(version)
    else:
        with pytest.raises(UsageError, match="CVE-2025-32434"):
            check_torch_version(version)


def test_fifo_input_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(Exception, match="not a regular file"):
        load_checkpoint(fifo)
    assert time.monotonic() - start < 5


def test_installed_torch_version_is_read_without_importing_torch():
    code = "import sys; from ckptsurgeon.safety import installed_torch_version as v; print(v(), 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    version, imported = r.stdout.split()
    assert version == torch.__version__ and imported == "False"
