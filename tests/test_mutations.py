"""Random damage to valid checkpoints: a clean error, or the right values.

Flip, insert and delete random bytes of small valid files (torch zip, legacy, safetensors; tied
weights, views, `_metadata`, a training container). Whatever ckptsurgeon reads must either fail
with a CheckpointError (exit 2 in the CLI) or give exactly the undamaged file's tensors (damage
in bytes nothing depends on), or exactly what torch reads from the damaged file (damage that
legitimately changes the content) — never a crash, a hang or a silently wrong value.

Found while writing this: setting the MS-DOS directory bit (0x10) in the external attributes of a
record's central directory entry makes torch.load return uninitialised memory for that tensor,
without an error; ckptsurgeon reads the record through its checked local header and CRC and
returns the right values.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ckptsurgeon.errors import CheckpointError
from ckptsurgeon.io import as_torch, load_checkpoint


def _state_dict() -> OrderedDict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sd = model.state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd["tied_a"] = base
    sd["tied_b"] = base
    sd["view"] = base[1, 2:5]
    sd["half"] = torch.randn(3, dtype=torch.float16)
    return sd


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("valid")
    sd = _state_dict()
    torch.save(sd, d / "zip.pt")
    torch.save({"epoch": 3, "model_state_dict": sd, "best": 0.5}, d / "container.ckpt")
    torch.save(sd, d / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.clone() for k, v in sd.items() if k not in ("tied_b",)}, d / "w.safetensors")
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _torch_read(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return OrderedDict(load_file(path))
    return torch.load(path, weights_only=True, map_location="cpu")


def _assert_same(ours: Any, theirs: Any, where: str = "") -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        a = ours.detach().contiguous().reshape(-1).view(torch.uint8)
        b = theirs.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), f"wrong values at {where}"
    elif isinstance(theirs, Mapping):
        assert isinstance(ours, Mapping) and list(ours) == list(theirs), where
        for k in theirs:
            _assert_same(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (x, y) in enumerate(zip(ours, theirs)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert ours == theirs or (ours != ours and theirs != theirs), where  # NaN == NaN


def _mutate(raw: bytes, op: str, pos: int, value: int) -> bytes:
    pos %= len(raw)
    if op == "flip":
        return raw[:pos] + bytes([raw[pos] ^ (1 << (value % 8))]) + raw[pos + 1 :]
    if op == "set":
        return raw[:pos] + bytes([value % 256]) + raw[pos + 1 :]
    if op == "insert":
        return raw[:pos] + bytes([value % 256]) + raw[pos:]
    return raw[:pos] + raw[pos + 1 :]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["zip.pt", "container.ckpt", "legacy.pt", "w.safetensors"]),
    op=st.sampled_from(["flip", "set", "insert", "delete"]),
    pos=st.integers(min_value=0, max_value=1 << 20),
    value=st.integers(min_value=0, max_value=255),
)
def test_damage_gives_a_clean_error_or_torchs_values(originals, tmp_path, name, op, pos, value):
    path = tmp_path / name
    damaged = _mutate(originals[name], op, pos, value)
    path.write_bytes(damaged)
    try:
        ours = as_torch(load_checkpoint(path).container)
    except CheckpointError:
        return  # a clean, expected error
    assert path.read_bytes() == damaged  # the input is never touched
    original = tmp_path / f"original-{name}"
    original.write_bytes(originals[name])
    try:
        _assert_same(ours, _torch_read(original), name)
    except AssertionError:
        _assert_same(ours, _torch_read(path), name)  # a change that is really in the content


@pytest.fixture(scope="module")
def many_small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Enough tiny records that their local headers share read-ahead windows."""
    path = tmp_path_factory.mktemp("many") / "many.pt"
    torch.save(OrderedDict((f"t{i}", torch.full((i % 5,), float(i))) for i in range(40)), path)
    return path.read_bytes()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["flip", "set"]), pos=st.floats(0, 1, exclude_max=True), value=st.integers(0, 255))
def test_fast_local_header_loop_accepts_only_what_the_checked_loop_accepts(many_small, tmp_path, op, pos, value):
    """zipread reads local headers with a tight loop for torch.save's own layout and falls back
    to the checked loop for anything else: where the tight loop answers, it must give exactly the
    checked loop's members, and it must never accept what the checked loop refuses."""

    from ckptsurgeon.engine import zipread

    data = bytearray(many_small)
    at = int(pos * len(data))
    data[at] = data[at] ^ 0xFF if op == "flip" else value
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(data))
    from ckptsurgeon.engine.source import Source

    fd = Source(path)  # the readers read through a Source (local or remote)
    try:
        try:
            entries, cd_offset = zipread._read_central(fd, len(data), str(path))
        except CheckpointError:
            return  # damage to the central directory: neither loop runs
        members = [e[0] for e in entries]
        raws = [e[1] for e in entries]
        fast = zipread._locate_plain(fd, members, raws, cd_offset)
        try:
            checked = zipread._locate_checked(fd, members, raws, cd_offset, str(path))
        except CheckpointError:
            assert fast is None, f"the tight loop accepted what the checked loop refuses (byte {at})"
            return
        assert fast is None or fast == checked
    finally:
        fd.close()


def test_fast_local_header_loop_reads_torch_save_archives(many_small, tmp_path):
    """The tight loop is the one that serves an undamaged torch.save file (not the fallback)."""

    from ckptsurgeon.engine import zipread

    path = tmp_path / "m.pt"
    path.write_bytes(many_small)
    from ckptsurgeon.engine.source import Source

    fd = Source(path)
    try:
        entries, cd_offset = zipread._read_central(fd, len(many_small), str(path))
        members, raws = [e[0] for e in entries], [e[1] for e in entries]
        fast = zipread._locate_plain(fd, members, raws, cd_offset)
        assert fast is not None
        assert fast == zipread._locate_checked(fd, members, raws, cd_offset, str(path))
        assert [m.data_offset % 64 for m in fast if "/data/" in m.name] == [0] * 40
    finally:
        fd.close()


def _deferred_member(name: bytes, data: bytes) -> bytes:
    """A local header that defers CRC and sizes to a signed data descriptor, as torch.save writes."""
    import struct
    import zlib

    crc = zlib.crc32(data)
    header = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0x08, 0, 0, 0, 0, 0, 0, len(name), 0)
    return header + name + data + struct.pack("<4sIQQ", b"PK\x07\x08", crc, len(data), len(data))


def test_a_long_gap_after_a_data_descriptor_is_not_read_into_memory(tmp_path, monkeypatch):
    """The gap between a data descriptor and the next header is sized by the file: the tight
    loop gives up before reading it (the checked loop, which allows junk there, reads 24 bytes)."""
    import os
    import zlib

    from ckptsurgeon.engine import zipread

    first = _deferred_member(b"a/x", b"hi")
    gap = 8 << 20
    second_at = len(first) + gap
    path = tmp_path / "gap.zip"
    path.write_bytes(first + b"\0" * gap + _deferred_member(b"a/y", b"yo"))
    members = [
        zipread.ZipMember("a/x", 0, -1, 2, zlib.crc32(b"hi"), 0x08),
        zipread.ZipMember("a/y", second_at, -1, 2, zlib.crc32(b"yo"), 0x08),
    ]
    largest = []
    real_pread = os.pread
    monkeypatch.setattr(zipread.os, "pread", lambda fd, n, at: largest.append(n) or real_pread(fd, n, at))
    from ckptsurgeon.engine.source import Source

    fd = Source(path)
    try:
        located = zipread._check_local_headers(fd, members, [b"a/x", b"a/y"], path.stat().st_size, str(path))
    finally:
        fd.close()
    assert [m.data_offset for m in located] == [33, second_at + 33]
    assert max(largest) <= zipread._Window.READ_AHEAD


def test_a_member_offset_past_the_central_directory_is_a_clean_error(tmp_path):
    """A ZIP64 extra field can give a member any 64-bit offset (2**63 made os.pread overflow)."""
    import zlib

    from ckptsurgeon.engine import zipread
    from ckptsurgeon.engine.source import Source

    path = tmp_path / "far.zip"
    path.write_bytes(_deferred_member(b"a/x", b"hi"))
    for far in (path.stat().st_size, 1 << 45, 1 << 63, (1 << 64) - 1):
        entries = [(zipread.ZipMember("a/x", far, -1, 2, zlib.crc32(b"hi"), 0x08), b"a/x", 0, 2)]
        fd = Source(path)
        try:
            with pytest.raises(CheckpointError, match="past the central directory"):
                zipread._validate(fd, entries, path.stat().st_size, str(path))
        finally:
            fd.close()
