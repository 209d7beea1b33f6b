"""Small files that once made the reader hang or crash (found in review): now a quick exit 2.

Each is built with the standard library only; each must give exit 2 with one line on stderr
naming the file, well inside the 10 s the hostile corpus allows a command.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest


def _torch_zip(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)


# 60 lists, each holding the one before twice: ~800 bytes whose full repr has 2**60 items
_SELF_SHARING = b"".join(b"]h\x00ah\x00aq\x00" for _ in range(60))


def repr_in_error_message(path: Path) -> None:
    _torch_zip(path, b"\x80\x02ctorch\ndevice\n(K\x00q\x00" + _SELF_SHARING + b"tR.")


def repr_of_allocating_call(path: Path) -> None:
    _torch_zip(path, b"\x80\x02c__builtin__\nbytearray\n(K\x01K\x00q\x00" + _SELF_SHARING + b"tR.")


def million_dim_shape_of_huge_ints(path: Path) -> None:
    big = b"\x8a\xff" + b"\xff" * 254 + b"\x3f"  # a 2039-bit int, then memo references to it
    n = 1_000_000
    shape = b"(" + big + b"r\x01\x00\x00\x00" + b"j\x01\x00\x00\x00" * (n - 1) + b"t"
    stride = b"(" + b"K\x00" * n + b"t"
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00" + shape + stride + b"\x89NtR."
    _torch_zip(path, pkl, {"0": b"\0" * 4})


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def safetensors_million_dim_shape(path: Path) -> None:
    header = json.dumps({"t": {"dtype": "U8", "shape": [2] * 2_000_000, "data_offsets": [0, 1]}}, separators=(",", ":"))
    _safetensors(path, header.encode(), b"\0")


def safetensors_deep_json(path: Path) -> None:
    _safetensors(path, b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}")


def colliding_int_keys(path: Path) -> None:
    m = 2**61 - 1  # CPython hashes ints modulo 2**61 - 1: every k*m hashes to 0
    keys = ((k * m).to_bytes(((k * m).bit_length() + 8) // 8, "little", signed=True) for k in range(1, 60_001))
    _torch_zip(path, b"\x80\x02}(" + b"".join(b"\x8a" + bytes([len(b)]) + b + b"N" for b in keys) + b"u.")


CASES: dict[str, Callable[[Path], None]] = {
    f.__name__: f
    for f in (
        repr_in_error_message,
        repr_of_allocating_call,
        million_dim_shape_of_huge_ints,
        safetensors_million_dim_shape,
        safetensors_deep_json,
        colliding_int_keys,
    )
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_quickly(name: str, tmp_path: Path) -> None:
    suffix = ".safetensors" if name.startswith("safetensors") else ".pt"
    path = tmp_path / f"{name}{suffix}"
    CASES[name](path)
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", "inspect", str(path)], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and path.name in lines[0] and "Traceback" not in r.stderr
    assert elapsed < 10, f"{elapsed:.1f} s"
