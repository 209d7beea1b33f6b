"""Every dtype x layout x device tag torch can save, and every command run over each of them.

`build(directory)` writes the checkpoints (those that torch.save writes and torch.load reads back
with weights_only=True; combinations torch cannot make or save are skipped) and returns the list
of command lines to run; `run(directory, commands)` runs them all in ONE subprocess that imports
ckptsurgeon once and forks per command, so a segfault kills only that command's child and shows
as a signal, and the sweep stays fast.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "quint8",
    "qint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "qint8_per_channel",
]
LAYOUTS = ["strided", "transposed", "coo", "csr", "csc", "bsr", "bsc", "conj", "neg", "nested"]
DEVICES = ["cpu", "meta", "cuda"]

RAW_BITS = {"float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"}
QUANTIZED = {"quint8", "qint8", "qint32", "quint4x2", "quint2x4"}


def dense(dtype: str, seed: int) -> torch.Tensor:
    """A 4x4 tensor of `dtype` whose values depend on `seed` (different seeds: different values)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 4, generator=g) * 3
    if dtype == "qint8_per_channel":
        return torch.quantize_per_channel(
            base, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0, 1, 2, 3]), 0, torch.qint8
        )
    if dtype in QUANTIZED:
        return torch.quantize_per_tensor(base, 0.25, 3 if dtype != "qint32" else 0, getattr(torch, dtype))
    if dtype in RAW_BITS:
        width = 2 if dtype == "bits16" else 1
        raw = torch.randint(0, 256, (4, 4 * width), generator=g, dtype=torch.uint8)
        return raw.view(getattr(torch, dtype))
    target = getattr(torch, dtype)
    if dtype.startswith("complex"):
        return torch.complex(base, base.flip(0)).to(target)
    if dtype.startswith(("uint", "int")) or dtype == "bool":
        return (base.abs() * 10).to(target) if dtype != "bool" else base > 0
    return base.to(target)


def make(dtype: str, layout: str, device: str, seed: int) -> torch.Tensor:
    t = dense(dtype, seed)
    if layout == "transposed":
        t = t.t()
    elif layout == "coo":
        t = t.to_sparse()
    elif layout == "csr":
        t = t.to_sparse_csr()
    elif layout == "csc":
        t = t.to_sparse_csc()
    elif layout == "bsr":
        t = t.to_sparse_bsr((2, 2))
    elif layout == "bsc":
        t = t.to_sparse_bsc((2, 2))
    elif layout == "conj":
        if not t.is_complex():
            raise TypeError("conj views are of complex tensors")
        t = t.conj()
    elif layout == "neg":
        if dtype in QUANTIZED or dtype in RAW_BITS or dtype == "qint8_per_channel":
            raise TypeError("torch.save segfaults on a quantized neg view")
        t = torch._neg_view(t)
    elif layout == "nested":
        t = torch.nested.nested_tensor([t[0], t[1, :3]])
    if device == "meta":
        t = t.to("meta")
    return t


def _saved(obj: Any) -> bytes | None:
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001  torch cannot save or reload it: not a combination to sweep
        return None
    return buf.getvalue()


def as_cuda_saved(data: bytes) -> bytes:
    """The same torch.save file with every storage location 'cpu' changed to 'cuda:0' in data.pkl,
    as a GPU job writes it (records copied by torch's own zip writer)."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        record = reader.get_record(name)
        if name.endswith("data.pkl"):
            record = record.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return out.getvalue()


@dataclass(frozen=True)
class Combo:
    name: str
    dtype: str
    layout: str
    device: str


def build(directory: Path, *, full: bool = True) -> tuple[list[Combo], list[list[str]]]:
    """Write every savable combination as NAME.pt (key 'w'), NAME.b.pt (other values) and
    NAME.c.pt (key 'v'); return the combinations and the command lines (paths relative to
    `directory`).

    `full`: every command over every combination (~5,000 commands, 10 minutes on 2 busy cores).
    Otherwise a quick sweep of about 1,200: the 'cuda' tag (which every reader maps to the CPU
    path) only on strided tensors, and each combination gets four of the commands, in rotation,
    so that every command meets every dtype, layout and device tag many times over."""
    combos: list[Combo] = []
    commands: list[list[str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in DTYPES:
            for layout in LAYOUTS:
                for device in DEVICES:
                    name = f"{dtype}-{layout}-{device}"
                    try:
                        a = make(dtype, layout, "meta" if device == "meta" else "cpu", 1)
                        b = make(dtype, layout, "meta" if device == "meta" else "cpu", 2)
                    except Exception:  # noqa: BLE001, S112  torch cannot make it
                        continue
                    files = [_saved({"w": a}), _saved({"w": b}), _saved({"v": a})]
                    if any(f is None for f in files):
                        continue
                    if device == "cuda":
                        files = [as_cuda_saved(f) for f in files]  # type: ignore[arg-type]
                    for suffix, data in zip(("", ".b", ".c"), files):
                        (directory / f"{name}{suffix}.pt").write_bytes(data)  # type: ignore[arg-type]
                    combos.append(Combo(name, dtype, layout, device))
                    if full:
                        commands += commands_for(name)
                    elif device != "cuda" or layout == "strided":
                        lines = commands_for(name)
                        n = len(combos)
                        commands += [lines[(4 * n + i) % len(lines)] for i in range(4)]
    return combos, commands


def commands_for(name: str) -> list[list[str]]:
    a, b, c = f"{name}.pt", f"{name}.b.pt", f"{name}.c.pt"
    return [
        ["inspect", a],
        ["inspect", a, "--verify", "--json"],
        ["extract", a, "-o", f"out/{name}.x.pt", "--verify"],
        ["extract", a, "-o", f"out/{name}.x.safetensors", "--verify"],
        ["rename", a, "-o", f"out/{name}.r.pt", "--add-prefix", "p.", "--verify"],
        ["merge", a, c, "-o", f"out/{name}.m.pt", "--verify"],
        ["merge", a, b, "--average", "-o", f"out/{name}.avg.pt", "--verify"],
        ["merge", a, b, "--average", "-o", f"out/{name}.avg.safetensors", "--verify"],
        ["diff", a, a, "--json"],
        ["diff", a, b, "--json"],
        ["diff", a, b, "--atol", "1", "--json"],
    ]


RUNNER = r"""
import json, os, sys, time
os.chdir(sys.argv[1])
first = int(sys.argv[2])
from ckptsurgeon.cli import main
import faulthandler
commands = json.load(open("commands.json"))
log = open("results.jsonl", "a")
faulthandler.enable(open("logs/faulthandler", "a"))
for i in range(first, len(commands)):
    with open("current", "w") as f:
        f.write(str(i))
    start = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.open(f"logs/{i}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(f"logs/{i}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    try:
        rc = main(commands[i])
    except BaseException as exc:
        rc = repr(exc)
    sys.stdout.flush()
    sys.stderr.flush()
    log.write(json.dumps({"i": i, "exit": rc, "seconds": round(time.monotonic() - start, 3)}) + "\n")
    log.flush()
"""


def run(directory: Path, commands: list[list[str]]) -> list[dict[str, Any]]:
    """Run every command through `ckptsurgeon.cli.main` in a worker subprocess; a worker killed by
    a signal is recorded against the command it was running and a new worker goes on with the
    next one. Each result has `args`, `exit` (an int, or the repr of an exception main let out)
    or `signal`, `seconds`, `stdout`, `stderr`."""
    (directory / "out").mkdir(exist_ok=True)
    (directory / "logs").mkdir(exist_ok=True)
    (directory / "commands.json").write_text(json.dumps(commands))
    (directory / "results.jsonl").write_text("")
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    first = 0
    while first < len(commands):
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(directory), str(first)], env=env, timeout=900, check=False
        )
        if proc.returncode == 0:
            break
        current = int((directory / "current").read_text())
        with open(directory / "results.jsonl", "a") as log:
            log.write(json.dumps({"i": current, "signal": -proc.returncode}) + "\n")
        first = current + 1
    results = [json.loads(line) for line in (directory / "results.jsonl").read_text().splitlines()]
    for result in results:
        i = result["i"]
        result["args"] = commands[i]
        result["stdout"] = (directory / "logs" / f"{i}.out").read_text(errors="replace")
        result["stderr"] = (directory / "logs" / f"{i}.err").read_text(errors="replace")
    return results
