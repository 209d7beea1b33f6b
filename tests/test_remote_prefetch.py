"""Remote records read ahead of the writer (issue 12): adjacent records come in one streamed
ranged GET, a few requests run at a time (`--jobs`), memory stays bounded, and every record is
CRC- and header-checked as a local copy is. Against the loopback servers of test_remote.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import parse_json
from test_remote import _put, _save, _Store, bucket, http_store, one_line_error, s3_endpoint, same_values, store

__all__ = ["bucket", "http_store", "s3_endpoint", "store"]  # fixtures of test_remote, used here by name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _s3_clients_of_this_module() -> Any:
    """fsspec keeps one S3FileSystem per set of options, with the endpoint it was made with:
    this module's server is another than test_remote's, so neither may reuse the other's."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _blocks(n: int, rows: int = 512) -> OrderedDict[str, torch.Tensor]:
    """n float32 tensors of rows x 512 (1 MiB each at 512 rows), saved as n adjacent records."""
    torch.manual_seed(0)
    return OrderedDict((f"blocks.{i}.weight", torch.randn(rows, 512)) for i in range(n))


def _selected(sd: OrderedDict[str, torch.Tensor], prefixes: tuple[str, ...]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v) for k, v in sd.items() if k.startswith(prefixes))


@pytest.mark.parametrize("jobs", ["1", "4"])
def test_adjacent_records_come_in_one_request(cli, tmp_path, bucket, jobs):
    """Ten adjacent records of fifty: one GET for their data (headers and descriptors between
    them included), besides what inspect reads (the head, the central directory)."""
    sd = _blocks(50)
    url = _put(bucket, _save(tmp_path, "big.pt", sd))
    inspected = parse_json(cli("inspect", url, "--json"))
    picked = tuple(f"blocks.{i}." for i in range(10, 20))
    out = tmp_path / "tenth.pt"
    data = parse_json(cli("extract", url, *[a for p in picked for a in ("-i", p)], "-o", out, "--json", "--jobs", jobs))
    want = _selected(sd, picked)
    same_values(torch.load(out, weights_only=True), want)
    selected = sum(v.nbytes for v in want.values())
    assert selected <= data["bytes_read"] < selected + 300_000
    assert data["requests"] == inspected["requests"] + 2  # a HEAD (unchanged?) before writing, one GET


def test_records_apart_are_each_one_request(cli, tmp_path, store):
    """Every fifth record: records far apart are not merged (the bytes between them are not
    read), one GET each, run a few at a time."""
    sd = _blocks(40)
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", sd).read_bytes()
    picked = tuple(f"blocks.{i}." for i in range(0, 40, 5))
    out = tmp_path / "out.safetensors"
    data = parse_json(
        cli("extract", f"{store.url}/m.pt", *[a for p in picked for a in ("-i", p)], "-o", out, "--json", "--jobs", "4")
    )
    from safetensors.torch import load_file

    want = _selected(sd, picked)
    got = load_file(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    selected = sum(v.nbytes for v in want.values())
    assert selected <= store.served < selected + 400_000
    assert data["requests"] <= len(want) + 3


@pytest.mark.parametrize("output", ["out.pt", "out.safetensors", "dir/"])
def test_a_flipped_byte_in_a_remote_record_is_exit_2_and_nothing_is_written(cli, tmp_path, bucket, output):
    sd = _blocks(6, rows=64)
    data = bytearray(_save(tmp_path, "m.pt", sd).read_bytes())
    at = data.find(sd["blocks.3.weight"][-1].numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    url = _put(bucket, tmp_path / "bad.pt")
    out = f"{tmp_path}/{output}"
    r = cli("extract", url, "-o", out, "--jobs", "2")
    assert r.exit_code == 2
    assert "CRC-32 mismatch in record m/data/3" in one_line_error(r)
    assert not Path(out).exists()


def test_a_connection_dropped_mid_answer_resumes_where_it_stopped(cli, tmp_path, store):
    """The data's GET is cut after half its body: the read goes on from the byte reached
    (one more request, not the whole range again), and the copy equals the original."""
    sd = _blocks(12)
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", sd).read_bytes()
    picked = tuple(f"blocks.{i}." for i in range(2, 10))
    out = tmp_path / "out.pt"
    args = ("extract", f"{store.url}/m.pt", *[a for p in picked for a in ("-i", p)], "-o", out, "--json")
    clean = parse_json(cli(*args))
    store.faults[:] = ["ok", "ok", "drop"]  # the head, the central directory, then the data
    data = parse_json(cli(*args, "--force"))
    want = _selected(sd, picked)
    same_values(torch.load(out, weights_only=True), want)
    assert data["requests"] == clean["requests"] + 1
    assert data["bytes_read"] < clean["bytes_read"] + (1 << 20)  # the first half is not read twice


def test_a_record_larger_than_a_request_is_streamed_in_bounded_memory(tmp_path, bucket):
    """extract of a 112 MiB object (two 48 MiB records among small ones) in a process of its
    own: its peak RSS stays within 48 MiB of an inspect's, which reads no record, and each big
    record takes one request."""
    torch.manual_seed(0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(2):
        sd[f"big.{i}"] = torch.randn(12 << 20)  # 48 MiB
        for j in range(8):
            sd[f"small.{i}.{j}"] = torch.randn(512, 512)  # 1 MiB
    url = _put(bucket, _save(tmp_path, "m.pt", sd))
    out = tmp_path / "out.pt"
    inspect_rss, _ = _peak_rss(["inspect", url, "--json"])
    extract_rss, data = _peak_rss(["extract", url, "-o", str(out), "--json", "--jobs", "4"])
    same_values(torch.load(out, weights_only=True, mmap=True), sd)
    assert extract_rss - inspect_rss < 48 << 20, f"{extract_rss >> 20} MiB against {inspect_rss >> 20} MiB"
    assert data["requests"] <= 8


def _peak_rss(args: list[str]) -> tuple[int, Any]:
    """(peak RSS in bytes, --json) of `python -m ckptsurgeon ARGS` run from a small wrapper
    process (a child's ru_maxrss counts from its exec, not this process's size)."""
    import json

    code = (
        "import resource, subprocess, sys; "
        "r = subprocess.run([sys.executable, '-m', 'ckptsurgeon', *sys.argv[1:]], capture_output=True, text=True); "
        "sys.stderr.write(r.stderr); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(r.stdout)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    first, _, rest = out.stdout.partition("\n")
    rc, maxrss_kib = first.split()
    assert rc == "0", out.stderr
    return int(maxrss_kib) * 1024, json.loads(rest)


def test_an_object_replaced_between_requests_is_refused(cli, tmp_path, store: _Store):
    """Records far apart are read by several requests at once: an object replaced after the
    first of them is refused by the next (If-Match), never mixed into the output."""
    sd = _blocks(40)
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", sd).read_bytes()
    changed = OrderedDict((k, v + 1) for k, v in sd.items())
    store.replace_after = (3, "/m.pt", _save(tmp_path, "m2.pt", changed).read_bytes())
    picked = tuple(f"blocks.{i}." for i in range(0, 40, 10))
    out = tmp_path / "out.pt"
    r = cli("extract", f"{store.url}/m.pt", *[a for p in picked for a in ("-i", p)], "-o", out, "--jobs", "2")
    assert r.exit_code == 2
    assert "changed while it was being read" in one_line_error(r)
    assert not out.exists()
