"""Sharded writers under torchrun: two local ranks (gloo) split the shards, rank 0 writes the
index last, and the directory equals a one-process run's byte for byte; a rank that fails (a
corrupt record in its shard) or dies (SIGKILL) leaves no index and OUT as it was.

Each run is a real `python -m torch.distributed.run --nproc-per-node 2` with every rank's stdout
and stderr in its own log file (`--log-dir`, `-r 3`)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import load_torch_model
from typer.testing import CliRunner

from ckptsurgeon.cli import app, main
from ckptsurgeon.ranks import World, assign_shards, world

# dcp.load in this (one) process says it assumes one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# ------------------------------------------------------------------------------------ helpers


class Ranks:
    """What a torchrun run left: its exit code and each rank's stdout and stderr."""

    def __init__(self, rc: int, logs: Path, agent_err: str) -> None:
        self.rc = rc
        self.agent_err = agent_err
        self.out: dict[int, str] = {}
        self.err: dict[int, str] = {}
        for rank in (0, 1):
            found = list(logs.glob(f"*/attempt_0/{rank}"))
            assert len(found) == 1, (found, agent_err)
            self.out[rank] = (found[0] / "stdout.log").read_text()
            self.err[rank] = (found[0] / "stderr.log").read_text()

    def json(self) -> Any:
        assert self.rc == 0, (self.err, self.agent_err)
        return json.loads(self.out[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_argv(logs: Path, *args: Any) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "--monitor-interval", "0.1", "--log-dir", str(logs), "-r", "3",
        "-m", "ckptsurgeon", *map(str, args),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CKPTSURGEON_DIST_TIMEOUT": "60"}


def torchrun(tmp_path: Path, *args: Any) -> Ranks:
    logs = tmp_path / f"logs{len(list(tmp_path.glob('logs*')))}"
    proc = subprocess.run(_torchrun_argv(logs, *args), env=_env(), capture_output=True, text=True, timeout=180)
    return Ranks(proc.returncode, logs, proc.stderr)


def one_process(*args: Any) -> Any:
    """The one-process run of `args` (in this process, through the CLI): its JSON document."""
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def same_directory(a: Path, b: Path) -> None:
    """The same file names and, in each, the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def nothing_temporary(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if "ckptsurgeon" in p.name]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.Linear(300, 100), torch.nn.Linear(100, 50))


def _two_tensors() -> OrderedDict[str, torch.Tensor]:
    """600 kB and 400 kB: with --max-shard-size 700KB two shards, the bigger one rank 0's."""
    torch.manual_seed(1)
    return OrderedDict(big=torch.randn(150_000), small=torch.randn(100_000))


def _record_span(path: Path, name: str) -> tuple[int, int]:
    """(start, end) of a stored zip record's data."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(name))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, extra = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + n + extra
    return start, start + info.file_size


# --------------------------------------------------------------------------- the pure parts


def test_shards_go_biggest_first_to_the_least_loaded_rank() -> None:
    assert assign_shards([10, 30, 20, 20], 2) == [0, 0, 1, 1]  # 30 -> 0; 20, 20 -> 1; 10 -> 0
    assert assign_shards([5, 5, 5], 2) == [0, 1, 0]
    assert assign_shards([7], 3) == [0]
    assert assign_shards([], 2) == []


def test_the_world_comes_from_torchruns_environment(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert world() == World(0, 1) and not world().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert world() == World(3, 4) and world().distributed and not world().leader
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(Exception, match="0 <= RANK < WORLD_SIZE"):
        world()


def test_the_wait_for_other_ranks_is_bounded(monkeypatch) -> None:
    from ckptsurgeon.errors import UsageError
    from ckptsurgeon.ranks import DEFAULT_TIMEOUT, TIMEOUT_ENV, _timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert _timeout() == DEFAULT_TIMEOUT == 1800
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert _timeout() == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=TIMEOUT_ENV):
            _timeout()


def test_without_torchrun_the_world_module_imports_no_torch() -> None:
    code = (
        "import sys; from ckptsurgeon.ranks import world, team_directory; w = world(); "
        "print(w.size, 'torch' in sys.modules)"
    )
    env = {k: v for k, v in _env().items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["1", "False"]


def test_other_ranks_leave_everything_but_sharded_writers_to_rank_0(tmp_path, monkeypatch, capsys) -> None:
    torch.save(_two_tensors(), tmp_path / "m.pt")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for argv in (
        ["inspect", tmp_path / "m.pt", "--json"],
        ["diff", tmp_path / "m.pt", tmp_path / "m.pt"],
        ["extract", tmp_path / "m.pt", "-o", tmp_path / "one.safetensors"],
        ["extract", tmp_path / "m.pt", "-o", f"{tmp_path / 'shards'}/", "--dry-run", "--json"],
        ["rename", tmp_path / "m.pt", "-o", tmp_path / "r.pt", "--add-prefix", "x."],
        ["inspect", tmp_path / "missing.pt"],  # rank 0 says what is wrong
    ):
        assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_dcp_data_files_of_at_most_max_shard_size_load_in_torch(tmp_path) -> None:
    sd = _two_tensors()
    container = {"model": sd, "step": 7}
    torch.save(container, tmp_path / "c.pt")
    data = one_process("rename", tmp_path / "c.pt", "-o", tmp_path / "c-dcp", "--format", "dcp",
                       "--max-shard-size", "700KB", "--add-prefix", "m.")  # fmt: skip
    assert [f["file"] for f in data["files"]] == ["__0_0.distcp", "__0_1.distcp", ".metadata"]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = {"model": {f"m.{k}": torch.empty_like(v) for k, v in sd.items()}, "step": 0}
    dcp.load(target, checkpoint_id=str(tmp_path / "c-dcp"))
    assert all(torch.equal(target["model"][f"m.{k}"], v) for k, v in sd.items()) and target["step"] == 7
    dcp_to_torch_save(str(tmp_path / "c-dcp"), str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt")
    assert back["step"] == 7 and all(torch.equal(back["model"][f"m.{k}"], v) for k, v in sd.items())


# ---------------------------------------------------------------------------- torchrun runs


def test_extract_to_hf_under_torchrun_equals_one_process_byte_for_byte(tmp_path) -> None:
    model = _model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    args = ("--format", "hf", "--max-shard-size", "100KB")
    single = one_process("extract", tmp_path / "m.pt", "-o", tmp_path / "one", *args)
    inspected = one_process("inspect", tmp_path / "m.pt")
    ranks = torchrun(tmp_path, "extract", tmp_path / "m.pt", "-o", tmp_path / "two", *args, "--json")
    data = ranks.json()
    same_directory(tmp_path / "one", tmp_path / "two")
    assert len(single["files"]) == 4 and data["files"] == single["files"]  # the index last
    assert ranks.out[1] == ranks.err[1] == ""  # rank 0 speaks for the run, once
    assert ranks.err[0] == "note: safetensors has no place for the state_dict's _metadata (module versions): dropped\n"
    fresh = torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.Linear(300, 100), torch.nn.Linear(100, 50))
    load_torch_model(fresh, tmp_path / "two", strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # each rank read the metadata and the tensors of its own shards: together, the tensors once
    metadata = inspected["bytes_read"]
    per_rank = [r["bytes_read"] - metadata for r in data["ranks"]]
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and all(
        0 < n < single["bytes_read"] - metadata for n in per_rank
    )
    assert sum(per_rank) == single["bytes_read"] - metadata
    assert data["bytes_read"] == sum(r["bytes_read"] for r in data["ranks"])
    nothing_temporary(tmp_path)


def test_merge_to_hf_bin_under_torchrun_equals_one_process(tmp_path) -> None:
    sd = _model().state_dict()
    keys = list(sd)
    torch.save(OrderedDict((k, sd[k]) for k in keys[:3]), tmp_path / "a.pt")
    torch.save(OrderedDict((k, sd[k]) for k in keys[3:]), tmp_path / "b.pt")
    args = ("-o", None, "--format", "hf-bin", "--max-shard-size", "100KB")
    single = one_process("merge", tmp_path / "a.pt", tmp_path / "b.pt", *args[:1], tmp_path / "one", *args[2:])
    ranks = torchrun(
        tmp_path, "merge", tmp_path / "a.pt", tmp_path / "b.pt", "-o", tmp_path / "two", *args[2:], "--json"
    )
    assert ranks.json()["files"] == single["files"]
    same_directory(tmp_path / "one", tmp_path / "two")
    fresh = torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.Linear(300, 100), torch.nn.Linear(100, 50))
    load_torch_model(fresh, tmp_path / "two", strict=True, safe=False)
    assert all(torch.equal(a, sd[k]) for k, a in fresh.state_dict().items())


def test_rename_to_dcp_under_torchrun_equals_one_process(tmp_path) -> None:
    sd = _two_tensors()
    torch.save({"model": sd, "step": 7}, tmp_path / "c.pt")
    args = ("--format", "dcp", "--max-shard-size", "700KB", "--add-prefix", "m.")
    single = one_process("rename", tmp_path / "c.pt", "-o", tmp_path / "one", *args)
    ranks = torchrun(tmp_path, "rename", tmp_path / "c.pt", "-o", tmp_path / "two", *args, "--json")
    assert ranks.json()["files"] == single["files"]
    assert [f["file"] for f in single["files"]] == ["__0_0.distcp", "__0_1.distcp", ".metadata"]
    same_directory(tmp_path / "one", tmp_path / "two")
    import torch.distributed.checkpoint as dcp

    target = {"model": {f"m.{k}": torch.empty_like(v) for k, v in sd.items()}, "step": 0}
    dcp.load(target, checkpoint_id=str(tmp_path / "two"))
    assert all(torch.equal(target["model"][f"m.{k}"], v) for k, v in sd.items()) and target["step"] == 7


def test_inspect_under_torchrun_runs_once(tmp_path) -> None:
    torch.save(_two_tensors(), tmp_path / "m.pt")
    ranks = torchrun(tmp_path, "inspect", tmp_path / "m.pt", "--json")
    assert [row["key"] for row in ranks.json()["tensors"]] == ["big", "small"]
    assert ranks.out[1] == "" and ranks.err == {0: "", 1: ""}


def test_a_rank_that_reads_a_corrupt_record_fails_every_rank_and_keeps_the_old_output(tmp_path) -> None:
    src = tmp_path / "m.pt"
    torch.save(_two_tensors(), src)
    args = ("--format", "hf", "--max-shard-size", "700KB")
    one_process("extract", src, "-o", tmp_path / "out", *args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    start, _ = _record_span(src, "data/1")  # `small`: the second shard, rank 1's
    with open(src, "r+b") as f:
        f.seek(start + 1000)
        byte = f.read(1)
        f.seek(start + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    ranks = torchrun(tmp_path, "extract", src, "-o", tmp_path / "out", *args, "--force", "--json")
    assert ranks.rc != 0
    crc = ranks.err[1].splitlines()
    assert len(crc) == 1 and crc[0].startswith("error: ") and "CRC-32 mismatch in record" in crc[0], ranks.err
    cause = crc[0].removeprefix("error: ")
    # rank 0 says whose failure stopped it (unless torchrun's agent, seeing rank 1 exit, stopped it first)
    assert set(ranks.err[0].splitlines()) <= {f"error: rank 1 failed: {cause}", "terminated (SIGTERM)"}, ranks.err
    if ranks.out[0]:
        assert json.loads(ranks.out[0])["error"]["exit_code"] == 2
    assert ranks.out[1] == ""
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    nothing_temporary(tmp_path)


class _StallingStore(http.server.ThreadingHTTPServer):
    """One object over HTTP with ranges; a GET that touches `trap` waits until `release` is set."""

    daemon_threads = True

    def __init__(self, data: bytes, trap: tuple[int, int]) -> None:
        super().__init__(("127.0.0.1", 0), _StallingHandler)
        self.data, self.trap = data, trap
        self.trapped, self.release = threading.Event(), threading.Event()


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StallingStore

    def log_message(self, *args: Any) -> None:
        pass

    def _headers(self, code: int, body: bytes, start: int | None) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"one"')
        self.send_header("Accept-Ranges", "bytes")
        if start is not None:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(self.server.data)}")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._headers(200, self.server.data, None)

    def do_GET(self) -> None:
        data = self.server.data
        first, _, last = self.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        start, end = int(first), min(len(data), int(last) + 1 if last else len(data))
        if start < self.server.trap[1] and end > self.server.trap[0]:
            self.server.trapped.set()
            self.server.release.wait(120)
        body = data[start:end]
        self._headers(206, body, start)
        self.wfile.write(body)


def _worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process of `rank` (its child with RANK=rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_rank_killed_while_it_writes_leaves_no_index_and_no_output(tmp_path) -> None:
    src = tmp_path / "m.pt"
    torch.save(_two_tensors(), src)
    start, end = _record_span(src, "data/1")  # `small`: rank 1's shard
    store = _StallingStore(src.read_bytes(), (start + 100_000, start + 200_000))
    threading.Thread(target=store.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{store.server_address[1]}/m.pt"
    logs = tmp_path / "logs"
    argv = _torchrun_argv(logs, "extract", url, "-o", tmp_path / "out", "--format", "hf", "--max-shard-size", "700KB")
    agent = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert store.trapped.wait(90), agent.communicate(timeout=5)
        time.sleep(0.3)  # rank 0 writes its shard meanwhile, then waits for rank 1
        os.kill(_worker_of_rank(agent.pid, 1), signal.SIGKILL)
        store.release.set()
        _, err = agent.communicate(timeout=90)
    finally:
        store.release.set()
        if agent.poll() is None:
            agent.kill()
        store.shutdown()
    assert agent.returncode != 0, err
    assert not (tmp_path / "out").exists()
    nothing_temporary(tmp_path)
    # rank 0 saw rank 1 go (or torchrun's agent stopped it first): one line says which
    (rank0_err,) = logs.glob("*/attempt_0/0/stderr.log")
    first = rank0_err.read_text().splitlines()[0]
    assert first.startswith("error: rank 0: lost touch with the other ranks: Connection closed by peer") or first == (
        "terminated (SIGTERM)"
    ), first
