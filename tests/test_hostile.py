"""Every CLI command over a corpus of hostile and broken files (tests/hostile/corpus.py).

For each broken or hostile case and each of the six commands (`inspect F`, `inspect F --json`,
`extract F -o OUT`, `rename F -o OUT --add-prefix x.`, `merge F REF -o OUT`, `diff F REF`) the
command must: exit 2; print exactly one non-empty line on stderr, naming the file, with no
traceback; write nothing (no OUT, no temp file, neither in the working directory nor next to the
input); leave the input's bytes as they were; never run the pickle's code (the MARKER file the
code-execution payloads would create never appears). Valid cases must work (exit 0; `diff` exits 1
because they differ from REF) and their outputs must hold what torch reads from the input, bit for bit.

How it runs, and why:
- Isolation and speed. A process that imports torch costs 1.5-1.9 s on an idle 2-core machine (over
  9 s when the other test files run at the same time), and there are ~180 cases x 6 commands. So
  each worker starts a *zygote*: this file run as a script, which imports torch and
  `ckptsurgeon.cli` once and then forks one child per case. The child runs the six commands in turn
  by calling `ckptsurgeon.cli.main(argv) -> int` (which never raises SystemExit), with stdout and
  stderr of each command captured by `os.dup2` to files of their own, and writes a JSON result
  after each command; the parent test process asserts. Two zygotes run cases in parallel; each runs
  `inspect` once before forking so the CLI's lazy imports (~1 s) are not paid per case. The whole
  file took 2m18s on the 2-core machine while other test files ran (60 s of it were CLI timeouts).
  A few tests also run the real thing, `python -m ckptsurgeon` and the `ckptsurgeon` console
  script, in fresh subprocesses.
- Memory: every child runs under RLIMIT_AS = 2 GiB, as the issue asks. Measured on this machine:
  `import torch` plus a small `torch.load` needs ~640 MiB of address space (384 MiB: std::bad_alloc
  in the import, 512 MiB: OpenBLAS cannot allocate its buffers), so 2 GiB leaves room for real work
  while `bytearray(2**31)` or `torch.Tensor(2**31)` fail with MemoryError instead of swapping, and a
  1 GiB zip bomb cannot be inflated twice (torch itself fails on it under this limit).
- Time: each command gets 10 s of wall-clock time (SIGALRM in the child, counted from the call to
  `main`, after torch is already imported); a child that does not finish all six within 95 s is
  killed by its zygote. A FIFO with no writer therefore shows up as a timeout, not a hang.
- The working directory of every child is an empty temporary directory; OUT lives there.

Set CKPTSURGEON_HOSTILE_STUB=1 to run the harness against `_stub_main` below (a naive
`torch.load(weights_only=True)` front end) instead of the real CLI: that is how the harness was
checked before the CLI existed, and it shows what the corpus catches in a naive tool.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import queue
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:  # also when run as the zygote script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile.corpus import TORCH_LOADS_SILENTLY, Case, build_corpus, case_names, write_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_LIMIT = 2 << 30  # bytes; see the module docstring for the measurement
COMMAND_TIMEOUT = 10.0  # seconds per command
WORKERS = 2
STUB = os.environ.get("CKPTSURGEON_HOSTILE_STUB") == "1"

# command id -> argv builder (F, REF, OUT)
COMMANDS: dict[str, Callable[[str, str, str], list[str]]] = {
    "inspect": lambda f, ref, out: ["inspect", f],
    "inspect-json": lambda f, ref, out: ["inspect", f, "--json"],
    "inspect-verify": lambda f, ref, out: ["inspect", f, "--verify", "--json"],
    "extract": lambda f, ref, out: ["extract", f, "-o", out],
    "rename": lambda f, ref, out: ["rename", f, "-o", out, "--add-prefix", "x."],
    "merge": lambda f, ref, out: ["merge", f, ref, "-o", out],
    "diff": lambda f, ref, out: ["diff", f, ref],
}
WRITES_OUTPUT = {"extract", "rename", "merge"}
VALID_EXIT = {"diff": 1}  # a valid case differs from REF, so diff reports a difference
# Damage only the tensor bytes show (a flipped bit under an intact CRC record): plain `inspect`
# reads metadata only by design (README, Safety) and exits 0, and `diff F REF` shares no key with
# REF so it reads no data (1: different); every command that reads or copies the data,
# `inspect --verify` included, must refuse it (test_crc_damage_is_caught_wherever_data_is_read).
DATA_ONLY_DAMAGE = {"zip-crc-flip-data"}
METADATA_ONLY_COMMANDS = {"inspect": 0, "inspect-json": 0, "diff": 1}

CASE_NAMES = case_names()


def _fingerprint(path: Path) -> str:
    """What a file system entry is and holds, without following links or opening FIFOs."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"missing: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "symlink -> " + os.readlink(path)
    if stat.S_ISFIFO(st.st_mode):
        return "fifo"
    if stat.S_ISDIR(st.st_mode):
        return "dir: " + ", ".join(f"{p.name}={_fingerprint(p)}" for p in sorted(path.iterdir()))
    with open(path, "rb") as f:
        return f"file {st.st_size} sha256={hashlib.file_digest(f, 'sha256').hexdigest()}"


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------------------------
# the child side: runs inside a forked copy of the zygote


class _CommandTimeout(BaseException):
    """Raised by SIGALRM inside a command; a BaseException so `except Exception` does not eat it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _CommandTimeout()


def _run_job(job: dict[str, Any], main: Callable[[list[str]], int]) -> None:
    """Run each command of `job` through `main`, writing the JSON result after each one."""
    cwd, capture = Path(job["cwd"]), Path(job["capture"])
    case_path = Path(job["input"])
    os.chdir(cwd)
    signal.signal(signal.SIGALRM, _on_alarm)
    results: dict[str, Any] = {}
    for cmd in job["commands"]:
        out_file, err_file = capture / f"{cmd['id']}.stdout", capture / f"{cmd['id']}.stderr"
        record: dict[str, Any] = {"status": "returned", "rc": None, "detail": ""}
        with open(out_file, "wb") as out, open(err_file, "wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            start = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, job["timeout"])
            try:
                rc = main(list(cmd["argv"]))
                record["rc"] = rc if isinstance(rc, int) else repr(rc)
            except _CommandTimeout:
                record["status"] = "timeout"
            except SystemExit as exc:
                record["status"], record["detail"] = "system-exit", repr(exc.code)
            except BaseException:
                record["status"], record["detail"] = "raised", traceback.format_exc()
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
            record["elapsed"] = round(time.monotonic() - start, 3)
        record["stdout"] = out_file.read_bytes()[:65536].decode("utf-8", "replace")
        record["stderr"] = err_file.read_bytes()[:65536].decode("utf-8", "replace")
        record["marker"] = os.path.lexists(job["marker"])
        record["input_fingerprint"] = _fingerprint(case_path)
        record["input_dir"] = _listing(case_path.parent)
        record["cwd"] = _listing(cwd)
        # keep a valid run's output for the parent to check; then start the next command clean
        if cmd["out"] and os.path.lexists(cmd["out"]):
            shutil.move(cmd["out"], capture / f"{cmd['id']}.output")
        for entry in cwd.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        results[cmd["id"]] = record
        tmp = capture / "result.json.tmp"
        tmp.write_text(json.dumps(results))
        os.replace(tmp, capture / "result.json")


def _zygote(warm_up_file: str) -> None:
    """Import torch and the CLI once, then fork one child per job read from stdin.

    Before forking, `inspect` runs once on a valid file and once on a missing one, so the CLI's
    lazy imports (rich, ...: ~1 s) are paid here and not inside every case's first command.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.dup(2)
    os.dup2(devnull, 1)
    try:
        try:
            import torch  # noqa: F401  (commands are timed without the import)
        except ImportError:
            pass
        if STUB:
            main = _stub_main
        else:
            from ckptsurgeon.cli import main  # type: ignore[no-redef]
        os.dup2(devnull, 2)
        for argv in (["inspect", warm_up_file], ["inspect", warm_up_file + ".missing"]):
            main(argv)
        sys.stderr.flush()
        os.dup2(log, 2)
    except BaseException:
        protocol.write("error " + json.dumps(traceback.format_exc()) + "\n")
        return
    protocol.write("ready\n")
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(devnull, 0)
                _run_job(job, main)
            except BaseException:
                Path(job["capture"], "child-error.txt").write_text(traceback.format_exc())
            finally:
                os._exit(0)
        budget = len(job["commands"]) * (job["timeout"] + 5) + 5
        deadline = time.monotonic() + budget
        status = None
        while status is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = f"exit {code}"
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = f"killed after {budget} s"
            else:
                time.sleep(0.01)
        protocol.write("done " + json.dumps(status) + "\n")


def _stub_main(argv: list[str]) -> int:
    """A naive stand-in for ckptsurgeon.cli.main (CKPTSURGEON_HOSTILE_STUB=1 only): torch.load and hope."""
    import torch

    cmd, args = argv[0], argv[1:]
    out = args[args.index("-o") + 1] if "-o" in args else None
    files = [
        a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in ("-o", "--add-prefix"))
    ]
    current = files[0]
    try:
        sds = []
        for current in files:
            sds.append(torch.load(current, weights_only=True, map_location="cpu"))
        if cmd == "inspect":
            print(json.dumps({k: list(v.shape) for k, v in sds[0].items()}) if "--json" in args else "\n".join(sds[0]))
        elif cmd == "diff":
            return 0 if sds[0].keys() == sds[1].keys() else 1
        else:
            result = dict(sds[0])
            if cmd == "rename":
                result = {"x." + k: v for k, v in result.items()}
            elif cmd == "merge":
                result.update(sds[1])
            torch.save(result, out)
        return 0
    except Exception as exc:
        print(f"ckptsurgeon: error: {current}: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------
# the parent side


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("CKPTSURGEON_DEBUG", None)
    env["COLUMNS"] = "120"
    return env


class _Zygote:
    def __init__(self, workdir: Path, warm_up_file: Path):
        self.log = open(workdir / f"zygote-{id(self)}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote", str(warm_up_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            preexec_fn=_limit_address_space,
            env=_child_env(),
            cwd=workdir,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line != "ready\n":
            detail = json.loads(line[6:]) if line.startswith("error ") else f"zygote said {line!r}"
            self.close()
            raise RuntimeError(f"the harness could not import the CLI:\n{detail}")

    def run(self, job: dict[str, Any]) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("done "):
            raise RuntimeError(f"the zygote died (said {line!r})")
        return json.loads(line[5:])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass
class CaseRun:
    """What happened when the six commands ran over one case."""

    case: Case
    commands: dict[str, dict[str, Any]]
    capture: Path
    child_status: str
    child_error: str

    def command(self, cmd: str) -> dict[str, Any]:
        if cmd not in self.commands:
            pytest.fail(
                f"{self.case.name}: no result for {cmd!r}: the child ended with {self.child_status}; "
                f"commands that finished: {sorted(self.commands)}\n{self.child_error}"
            )
        return self.commands[cmd]


class HostileRunner:
    """Runs cases in zygote children, WORKERS at a time, in the order the tests will ask for them."""

    def __init__(self, cases: dict[str, Case], reference: Path, marker: Path, workdir: Path):
        self.cases, self.reference, self.marker, self.workdir = cases, reference, marker, workdir
        self.zygotes: queue.Queue[_Zygote | None] = queue.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
        self.futures: dict[str, concurrent.futures.Future[CaseRun]] = {}
        self.lock = threading.Lock()
        self.started = 0
        self.fatal = ""

    def prefetch(self, names: Sequence[str]) -> None:
        for name in names:
            self._submit(name)

    def result(self, name: str) -> CaseRun:
        return self._submit(name).result()

    def _submit(self, name: str) -> concurrent.futures.Future[CaseRun]:
        with self.lock:
            if name not in self.futures:
                self.futures[name] = self.pool.submit(self._run, self.cases[name])
            return self.futures[name]

    def _zygote(self) -> _Zygote:
        with self.lock:
            if self.fatal:
                raise RuntimeError(self.fatal)
            create = self.zygotes.empty() and self.started < WORKERS
            if create:
                self.started += 1
        if not create:
            zygote = self.zygotes.get()
            if zygote is None:  # another worker could not start one
                self.zygotes.put(None)
                raise RuntimeError(self.fatal)
            return zygote
        try:
            return _Zygote(self.workdir, self.reference)
        except RuntimeError as exc:
            with self.lock:
                self.fatal = str(exc)
            self.zygotes.put(None)
            raise

    def _run(self, case: Case) -> CaseRun:
        base = self.workdir / "runs" / case.name
        cwd, capture = base / "cwd", base / "capture"
        cwd.mkdir(parents=True)
        capture.mkdir()
        commands = []
        for cmd, argv in COMMANDS.items():
            out = cwd / f"out-{cmd}.pt"
            commands.append(
                {
                    "id": cmd,
                    "argv": argv(str(case.path), str(self.reference), str(out)),
                    "out": str(out) if cmd in WRITES_OUTPUT else None,
                }
            )
        job = {
            "input": str(case.path),
            "marker": str(self.marker),
            "cwd": str(cwd),
            "capture": str(capture),
            "timeout": COMMAND_TIMEOUT,
            "commands": commands,
        }
        zygote = self._zygote()
        try:
            status = zygote.run(job)
        except RuntimeError as exc:
            zygote.close()
            with self.lock:
                self.started -= 1
            status = str(exc)
        else:
            self.zygotes.put(zygote)
        result = capture / "result.json"
        error = capture / "child-error.txt"
        return CaseRun(
            case,
            json.loads(result.read_text()) if result.exists() else {},
            capture,
            status,
            error.read_text() if error.exists() else "",
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        while not self.zygotes.empty():
            z = self.zygotes.get()
            if z is not None:
                z.close()


@dataclass(frozen=True)
class Corpus:
    """The corpus of one test session and what each case looked like before any command ran."""

    cases: dict[str, Case]
    marker: Path  # the file a code-execution payload would create
    reference: Path  # a valid checkpoint: the second input of merge and diff
    originals: dict[str, tuple[str, list[str]]]  # case -> (fingerprint, listing of its directory)


@pytest.fixture(scope="session")
def hostile_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile")
    (root / "marker-dir").mkdir()
    (root / "reference").mkdir()
    marker = root / "marker-dir" / "MARKER"
    cases = {c.name: c for c in build_corpus(root / "corpus", marker)}
    reference = write_reference(root / "reference" / "ref.pt")
    originals = {name: (_fingerprint(c.path), _listing(c.path.parent)) for name, c in cases.items()}
    return Corpus(cases, marker, reference, originals)


@pytest.fixture(scope="session")
def hostile_runs(
    request: pytest.FixtureRequest, hostile_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """Starts every selected case at once (two at a time, in test order); tests wait for theirs."""
    c = hostile_corpus
    runner = HostileRunner(c.cases, c.reference, c.marker, tmp_path_factory.mktemp("hostile-runs"))
    wanted: list[str] = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "originalname", "") == "test_command" and params.get("case_name") not in wanted:
            wanted.append(params["case_name"])
    runner.prefetch(wanted)
    yield runner
    runner.close()


def _params() -> list[Any]:
    return [pytest.param(name, cmd, id=f"{name}/{cmd}") for name in CASE_NAMES for cmd in COMMANDS]


@pytest.mark.parametrize(("case_name", "command"), _params())
def test_command(case_name: str, command: str, hostile_corpus: Corpus, hostile_runs: HostileRunner) -> None:
    case, marker, reference, originals = (
        hostile_corpus.cases[case_name],
        hostile_corpus.marker,
        hostile_corpus.reference,
        hostile_corpus.originals,
    )
    run = hostile_runs.result(case_name)
    r = run.command(command)
    stderr = r["stderr"]
    context = (
        f"{case.name} ({case.note}): {command}\nstatus {r['status']} rc {r['rc']} in {r['elapsed']} s\n"
        f"stderr: {stderr[-3000:]!r}\n{r['detail'][-3000:]}"
    )
    assert r["status"] == "returned", context
    assert not r["marker"], f"{context}\nthe pickle's code RAN: {marker} exists"
    assert r["input_fingerprint"] == originals[case_name][0], f"{context}\nthe input changed"
    assert r["input_dir"] == originals[case_name][1], f"{context}\nfiles appeared next to the input"
    assert "Traceback" not in stderr, context
    if case.name in DATA_ONLY_DAMAGE and command in METADATA_ONLY_COMMANDS:
        assert r["rc"] == METADATA_ONLY_COMMANDS[command], context
        return
    if case.kind == "valid":
        expected = VALID_EXIT.get(command, 0)
        assert r["rc"] == expected, context
        out_name = f"out-{command}.pt"
        assert r["cwd"] == ([out_name] if command in WRITES_OUTPUT else []), f"{context}\nworking directory: {r['cwd']}"
        _check_valid_output(case, command, r, run.capture / f"{command}.output", reference)
        return
    assert r["rc"] == 2, context
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"{context}\nstderr must be exactly one non-empty line"
    assert case.path.name in lines[0], f"{context}\nthe message does not name {case.path.name}"
    assert r["cwd"] == [], f"{context}\nsomething was written: {r['cwd']}"


# ---------------- valid cases: outputs hold what torch reads


def _load_any(path: Path) -> dict[str, Any]:
    """The state dict in `path` as torch / safetensors read it."""
    import torch

    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        obj = torch.load(path, weights_only=True, map_location="cpu")
    else:
        from safetensors.torch import load_file

        obj = load_file(path)
    if isinstance(obj, dict) and "state_dict" in obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["state_dict"]
    return dict(obj)


def _bits(t: Any) -> Any:
    import torch

    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_same_tensors(got: dict[str, Any], want: dict[str, Any], context: str) -> None:
    import torch

    assert sorted(got) == sorted(want), f"{context}: keys {sorted(got)} != {sorted(want)}"
    for k, w in want.items():
        g = got[k]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (
            f"{context}: {k}: {g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}"
        )
        assert torch.equal(_bits(g), _bits(w)), f"{context}: {k}: values differ"


def _check_valid_output(case: Case, command: str, r: dict[str, Any], output: Path, reference: Path) -> None:
    want = _load_any(case.path)
    if command in ("inspect", "inspect-json", "inspect-verify"):
        if command != "inspect":
            json.loads(r["stdout"])
        for key in want:
            assert key in r["stdout"], f"{case.name}: {command} does not show {key!r}:\n{r['stdout'][:2000]}"
        return
    if command == "diff":
        assert r["stdout"].strip(), f"{case.name}: diff printed nothing"
        return
    assert output.exists(), f"{case.name}: {command} exited 0 but wrote no output"
    got = _load_any(output)
    if command == "rename":
        want = {"x." + k: v for k, v in want.items()}
    elif command == "merge":
        want = {**want, **_load_any(reference)}
    _assert_same_tensors(got, want, f"{case.name}: {command}")


# ---------------- the corpus is what it claims


def test_corpus_covers_every_class(hostile_corpus: Corpus) -> None:
    cases = hostile_corpus.cases
    kinds: dict[str, int] = {}
    for c in cases.values():
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    assert sum(n for k, n in kinds.items() if k != "valid") >= 80
    assert all(
        kinds.get(k, 0) >= 3
        for k in (
            "not-checkpoint",
            "code-exec",
            "malformed-pickle",
            "zip-damage",
            "legacy-damage",
            "safetensors-damage",
            "valid",
        )
    ), kinds
    assert [c.name for c in cases.values()] == CASE_NAMES


def test_corpus_is_deterministic(tmp_path: Path, hostile_corpus: Corpus) -> None:
    cases, marker = hostile_corpus.cases, hostile_corpus.marker
    again = {c.name: c for c in build_corpus(tmp_path / "again", marker)}
    assert [_fingerprint(c.path) for c in cases.values()] == [_fingerprint(again[n].path) for n in cases]


def test_zip_writer_matches_torch_save_byte_for_byte(tmp_path: Path) -> None:
    import zipfile
    from collections import OrderedDict

    import torch
    from hostile.corpus import base_state, state_zip, tricky_state

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tricky = OrderedDict()
    tricky["emb.weight"] = w
    tricky["head.weight"] = w
    tricky["row"] = w[1]
    tricky["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tricky["empty"] = torch.zeros(0, 3)
    tricky["bf"] = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    tricky["p"] = torch.nn.Parameter(torch.ones(2))
    tricky._metadata = OrderedDict([("", {"version": 1}), ("emb", {"version": 2})])  # type: ignore[attr-defined]
    base = OrderedDict(w=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.tensor([1, 2]))
    for name, sd, ours in (("base", base, base_state()), ("tricky", tricky, tricky_state())):
        path = tmp_path / f"{name}.pt"
        torch.save(sd, path)
        sid = zipfile.ZipFile(path).read(f"{name}/.data/serialization_id")  # random per save
        assert state_zip(ours, prefix=name, sid=sid) == path.read_bytes(), name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_refuses_every_code_execution_case(hostile_corpus: Corpus) -> None:
    """torch.load(weights_only=True) itself refuses each payload, and runs none of them."""
    import pickle

    import torch

    cases, marker = hostile_corpus.cases, hostile_corpus.marker
    exec_cases = [c for c in cases.values() if c.kind == "code-exec"]
    assert len(exec_cases) >= 30
    for c in exec_cases:
        with pytest.raises(pickle.UnpicklingError):
            torch.load(c.path, weights_only=True, map_location="cpu")
        assert not marker.exists(), c.name


_UNSAFE_LOADER = r"""
import json, os, sys, time, warnings
warnings.simplefilter("ignore")
import torch
class Net:  # what a pickled `__main__.Net` module needs in order to unpickle
    pass
marker = sys.argv[1]
ran = {}
for path in sys.argv[2:]:
    try:
        torch.load(path, weights_only=False, map_location="cpu")
    except Exception:
        pass
    deadline = time.monotonic() + 5  # subprocess.Popen's touch runs asynchronously
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.01)
    ran[path] = os.path.exists(marker)
    if ran[path]:
        os.remove(marker)
print(json.dumps(ran))
"""


def test_each_code_execution_case_runs_its_payload_when_unpickled_unsafely(
    tmp_path: Path, hostile_corpus: Corpus
) -> None:
    """The corpus is real: torch.load(weights_only=False) creates the marker for every payload.

    Runs in a subprocess whose working directory is tmp_path; the payloads only create the marker.
    """
    cases = hostile_corpus.cases
    marker = tmp_path / "MARKER"
    exec_cases = [c for c in build_corpus(tmp_path / "corpus", marker) if c.kind == "code-exec"]
    assert {c.name for c in exec_cases} == {c.name for c in cases.values() if c.kind == "code-exec"}
    proc = subprocess.run(
        [sys.executable, "-c", _UNSAFE_LOADER, str(marker)] + [str(c.path) for c in exec_cases],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=_child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(Path(p).parent.name for p, r in ran.items() if not r) == []


@pytest.mark.parametrize("case_name", sorted(TORCH_LOADS_SILENTLY))
def test_torch_loads_these_without_error(case_name: str, hostile_corpus: Corpus) -> None:
    """Neither torch nor safetensors notices what is wrong with these: ckptsurgeon must check itself."""
    import torch

    case = hostile_corpus.cases[case_name]
    kwargs = TORCH_LOADS_SILENTLY[case_name]
    if case.path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(case.path)
    else:
        obj = torch.load(case.path, weights_only=True, map_location="cpu", **kwargs)
    assert isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()), case_name
    if case_name == "zip-crc-flip-data":  # and what it loads is wrong
        assert not torch.equal(obj["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    if case_name == "zip-crc-flip-pkl":
        assert "v" in obj and "w" not in obj


# ---------------- real processes: python -m ckptsurgeon and the console script

_REAL_PROCESS_CASES = [
    "empty",
    "fifo",
    "exec-zip-os-system",
    "zip-bomb-data-pkl",
    "pkl-deep-list-nesting",
    "st-header-huge",
    "valid-zip",
]
# a fresh interpreter imports torch before the command starts: allow for it on a busy machine
_REAL_PROCESS_TIMEOUT = COMMAND_TIMEOUT + 50


def _real_run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=_REAL_PROCESS_TIMEOUT,
        preexec_fn=_limit_address_space,
        env=_child_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("case_name", _REAL_PROCESS_CASES)
def test_python_m_ckptsurgeon_inspect(case_name: str, hostile_corpus: Corpus, tmp_path: Path) -> None:
    case, marker, originals = hostile_corpus.cases[case_name], hostile_corpus.marker, hostile_corpus.originals
    proc = _real_run([sys.executable, "-m", "ckptsurgeon", "inspect", str(case.path)], tmp_path)
    assert not marker.exists()
    assert _fingerprint(case.path) == originals[case_name][0]
    assert os.listdir(tmp_path) == []
    if case.kind == "valid":
        assert proc.returncode == 0, proc.stderr
        assert "layer.w" in proc.stdout
        return
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and case.path.name in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("case_name", ["exec-legacy-in-magic", "zip-crc-flip-data", "valid-legacy"])
def test_console_script_extract(case_name: str, hostile_corpus: Corpus, tmp_path: Path) -> None:
    exe = shutil.which("ckptsurgeon")
    if exe is None:
        pytest.skip("the ckptsurgeon console script is not installed (pip install -e .)")
    case, marker, originals = hostile_corpus.cases[case_name], hostile_corpus.marker, hostile_corpus.originals
    out = tmp_path / "out.pt"
    proc = _real_run([exe, "extract", str(case.path), "-o", str(out)], tmp_path)
    assert not marker.exists()
    assert _fingerprint(case.path) == originals[case_name][0]
    if case.kind == "valid":
        assert proc.returncode == 0, proc.stderr
        _assert_same_tensors(_load_any(out), _load_any(case.path), case_name)
        return
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and case.path.name in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote(sys.argv[2])


def test_crc_damage_is_caught_wherever_data_is_read(hostile_corpus: Corpus, tmp_path: Path) -> None:
    """A flipped bit that torch loads silently: every command that reads the bytes refuses it."""
    import torch

    from ckptsurgeon.cli import main

    (name,) = DATA_ONLY_DAMAGE
    path = str(hostile_corpus.cases[name].path)
    out = str(tmp_path / "out.pt")
    wider = tmp_path / "wider.pt"  # same keys and shapes, other dtypes: compared after promotion
    torch.save({"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.int32)}, wider)
    for argv in (
        ["diff", path, path],
        ["diff", path, str(wider), "--atol", "1"],
        ["inspect", path, "--verify"],
        ["extract", path, "-o", out],
        ["merge", path, path, "-o", out, "--average"],
        ["extract", path, "-o", out + ".safetensors"],
    ):
        assert main(argv) == 2, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wider.pt"]
