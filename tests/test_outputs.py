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


# ------------------------------------------------------------------ outputs are regular files


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket node stays on disk


def _chardev(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    except PermissionError:
        pytest.skip("cannot make a device node here")


NODES = {  # (an existing directory is a sharded output's place: see test_sharded_write.py)
    "fifo": (_fifo, stat.S_ISFIFO, "a FIFO"),
    "socket": (_socket, stat.S_ISSOCK, "a socket"),
    "chardev": (_chardev, stat.S_ISCHR, "a character device"),
}

WRITERS = {
    "extract": lambda a, b, out: ["extract", a, "-o", out],
    "rename": lambda a, b, out: ["rename", a, "-o", out, "--add-prefix", "m."],
    "merge": lambda a, b, out: ["merge", a, b, "-o", out, "--on-conflict", "first"],
    "average": lambda a, b, out: ["merge", a, b, "-o", out, "--average"],
}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("node", sorted(NODES))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_an_output_that_is_not_a_regular_file_is_refused_even_with_force(
    cli, two_inputs, tmp_path, writer, node, force
):
    make, is_kind, kind = NODES[node]
    out = tmp_path / "out.pt"
    make(out)
    args = WRITERS[writer](*two_inputs, out) + (["--force"] if force else [])
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: is {kind}; an output must be a regular file or not exist (--force does not change that)"
    ]
    assert is_kind(os.stat(out).st_mode), "the node is still there, untouched"
    assert temps(tmp_path) == []


def test_a_symlink_to_a_fifo_is_refused_and_kept(cli, two_inputs, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "out.pt"
    link.symlink_to(fifo)
    result = cli("extract", two_inputs[0], "-o", link, "-f")
    assert result.exit_code == 2 and "is a FIFO" in result.stderr
    assert link.is_symlink() and stat.S_ISFIFO(os.stat(link).st_mode)


def test_dev_null_is_refused_and_stays_a_device(two_inputs, capsys):
    # First the pure check: on code that would not refuse, stop here before /dev/null is touched.
    with pytest.raises(OutputError, match="is a character device"):
        check_output(Path("/dev/null"), [], force=True)
    before = os.stat("/dev/null")
    assert main(["extract", str(two_inputs[0]), "-o", "/dev/null", "-f"]) == 2  # the Typer-free path
    assert "/dev/null: is a character device" in capsys.readouterr().err
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_the_core_writer_refuses_a_fifo_before_making_a_temp_file(tmp_path, monkeypatch):
    fifo = tmp_path / "out.pt"
    os.mkfifo(fifo)
    from ckptsurgeon.io import atomic as io

    def no_temp(dest):
        raise AssertionError("a temporary file was made")

    monkeypatch.setattr(io, "_temp_beside", no_temp)
    with pytest.raises(OutputError, match="is a FIFO"):
        save_checkpoint(small_sd(), fifo)
    with pytest.raises(OutputError, match="is a FIFO"), atomic_output(fifo):
        pass
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_fifo_made_while_the_output_is_written_is_not_replaced(tmp_path):
    out = tmp_path / "out.pt"
    with pytest.raises(OutputError, match="is a FIFO"), atomic_output(out) as f:
        f.write(b"data")
        os.mkfifo(out)  # appears between the first check and the rename
    assert stat.S_ISFIFO(os.stat(out).st_mode) and temps(tmp_path) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_dash_output_is_exit_2_and_makes_no_file(cli, two_inputs, tmp_path, monkeypatch, writer):
    monkeypatch.chdir(tmp_path)
    result = cli(*WRITERS[writer](*two_inputs, "-"), "--force")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: -o -: writing to stdout is not supported; give a file path"
    assert not (tmp_path / "-").exists() and temps(tmp_path) == []


def test_dash_output_through_main(two_inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["extract", str(two_inputs[0]), "-o", "-"]) == 2
    assert "writing to stdout is not supported" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()


def test_a_file_named_dash_in_a_directory_is_an_ordinary_output(cli, two_inputs, tmp_path):
    result = cli("extract", two_inputs[0], "-o", tmp_path / "-")  # (pathlib reads `./-` as `-`)
    assert result.exit_code == 0, result.stderr
    back = torch.load(tmp_path / "-", weights_only=True)
    assert torch.equal(back["w"], small_sd(0)["w"])


# --------------------------------------------------------- output and --weights checked first


@pytest.fixture
def unreadable(tmp_path: Path) -> tuple[Path, Path]:
    """Two inputs that are not checkpoints: reading either one is an error."""
    a, b = tmp_path / "x.pt", tmp_path / "y.pt"
    a.write_text("not a checkpoint\n")
    b.write_text("not a checkpoint either\n")
    return a, b


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_an_existing_output_is_reported_before_any_input_is_read(cli, unreadable, tmp_path, writer):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    result = cli(*WRITERS[writer](*unreadable, out))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {out}: output exists; pass --force to replace it"
    assert out.read_bytes() == b"precious"


def test_a_fifo_output_is_reported_before_any_input_is_read(unreadable, tmp_path, capsys):
    out = tmp_path / "out.pt"
    os.mkfifo(out)
    assert main(["extract", str(unreadable[0]), "-o", str(out), "-f"]) == 2  # the Typer-free path
    assert "is a FIFO" in capsys.readouterr().err


@pytest.mark.parametrize(
    "weights, message",
    [
        ("1,2,3", "--weights has 3 values for 2 inputs"),
        ("1,nan", "--weights must be finite"),
        ("0,0", "positive finite sum"),
    ],
)
def test_bad_weights_are_reported_before_any_input_is_read(cli, unreadable, tmp_path, weights, message):
    result = cli("merge", *unreadable, "-o", tmp_path / "avg.pt", "--average", "--weights", weights)
    assert result.exit_code == 2
    assert message in result.stderr and "not a checkpoint" not in result.stderr
    assert not (tmp_path / "avg.pt").exists()


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
        preexec_fn=_file_size_limit(1 << 20),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {out}: cannot write: File too large"]
    assert out.read_bytes() == b"precious" and temps(tmp_path) == []


# -------------------------------------------------------------------------------- signals


def test_a_swallowed_signal_still_stops_the_write_before_the_rename(tmp_path):
    from ckptsurgeon import interrupts

    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    with interrupts.handling_signals(), pytest.raises(interrupts.Interrupted) as caught, atomic_output(out) as f:
        f.write(b"new")
        try:  # what torch's import does to an exception raised inside it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except BaseException:  # noqa: BLE001, S110 (the swallowing under test)
            pass
    assert caught.value.exit_code == 130
    assert out.read_bytes() == b"precious" and temps(tmp_path) == []


def test_a_signal_while_the_temp_file_is_made_leaves_no_temp_file(tmp_path, monkeypatch):
    from ckptsurgeon import interrupts
    from ckptsurgeon.io import atomic as io

    real = io._temp_beside

    def made_then_signalled(dest):
        made = real(dest)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the caller knows the file
        return made

    monkeypatch.setattr(io, "_temp_beside", made_then_signalled)
    with interrupts.handling_signals(), pytest.raises(interrupts.Interrupted) as caught:
        save_checkpoint(small_sd(), tmp_path / "out.pt")
    assert caught.value.exit_code == 143
    assert not (tmp_path / "out.pt").exists() and temps(tmp_path) == []


def test_without_the_cli_a_signal_is_python_s_own(tmp_path):
    from ckptsurgeon import interrupts

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts.handling_signals():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after a command
    out = tmp_path / "out.pt"
    with pytest.raises(KeyboardInterrupt), atomic_output(out) as f:
        f.write(b"x")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert not out.exists() and temps(tmp_path) == []


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def _handlers_installed(pid: int) -> bool:
    """SIGTERM is caught: ckptsurgeon's handlers are in place (Python catches only SIGINT itself)."""
    for line in _proc_text(pid, "status").splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _when(proc: subprocess.Popen, ready, limit: float = 60.0, *, must_run: bool = True) -> None:
    """Wait until `ready(pid)` (polling /proc every 2 ms) or the process ends."""
    deadline = time.monotonic() + limit
    while not ready(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    if must_run:
        assert proc.poll() is None, f"the command ended first: {proc.stderr.read() if proc.stderr else ''}"


def _loaded(library: str):
    return lambda pid: library in _proc_text(pid, "maps")


@pytest.fixture(scope="module")
def average_inputs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("average")
    a, b = d / "a.pt", d / "b.pt"
    g = torch.Generator().manual_seed(0)
    for p in (a, b):
        torch.save(OrderedDict((f"t{i}", torch.randn(256 << 10, generator=g)) for i in range(16)), p)  # 16 MiB
    return a, b


MOMENTS = {
    # torch's import swallows what is raised while it imports numpy: the signal must not be lost
    "inside torch's import of numpy": _loaded("_multiarray_umath"),
    "as torch's C library is loaded": _loaded("libtorch_cpu"),
    "right after the handlers are installed": _handlers_installed,
}


def _start_average(inputs, out: Path) -> subprocess.Popen:
    """`ckptsurgeon merge --average INPUTS -o OUT -f`, started in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", "merge", "--average", *map(str, inputs), "-o", str(out), "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_merge_average_interrupted_leaves_the_output_untouched(average_inputs, tmp_path, moment, sig):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    proc = _start_average(average_inputs, out)
    _when(proc, MOMENTS[moment])
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == ("interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)")
    assert "Traceback" not in err
    assert out.read_bytes() == b"precious" and temps(tmp_path) == []


@pytest.mark.parametrize("stage, delay", [(1, 0.3), (2, 0.0)])
def test_interrupted_while_averaging_or_writing_is_all_or_nothing(average_inputs, tmp_path, stage, delay):
    """Later signals land in the averaging (one temporary file: the mean being staged), the write
    (two) or after the rename: either the command stops (143) with the output untouched, or it
    has finished (0) and the output is complete."""
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    proc = _start_average(average_inputs, out)
    _when(proc, lambda pid: len(temps(tmp_path)) >= stage, must_run=False)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert temps(tmp_path) == [] and "Traceback" not in err
    if proc.returncode == 0:
        a, b = (torch.load(p, weights_only=True) for p in average_inputs)
        got = torch.load(out, weights_only=True)
        assert list(got) == list(a)
        for k in a:
            torch.testing.assert_close(got[k], (a[k] + b[k]) / 2)
    else:
        assert proc.returncode == 143, err
        assert out.read_bytes() == b"precious"


def test_extract_without_typer_or_torch_is_interrupted_cleanly(average_inputs, tmp_path):
    out = tmp_path / "out.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(average_inputs[0]), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _when(proc, _handlers_installed)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not out.exists() and temps(tmp_path) == []


def test_a_signal_ignored_at_start_stays_ignored(average_inputs, tmp_path):
    """`nohup` and `cmd &` in a script start a command with SIGINT ignored: it must not stop it."""
    out = tmp_path / "out.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(average_inputs[0]), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 (no threads here)
    )
    _when(proc, _handlers_installed)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert torch.equal(torch.load(out, weights_only=True)["t0"], torch.load(average_inputs[0], weights_only=True)["t0"])
