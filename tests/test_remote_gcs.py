"""gs:// checkpoints (issue 12) against a real GCS JSON-API server on loopback: the
gcp-storage-emulator package's server, reached by gcsfs through `STORAGE_EMULATOR_HOST`, as a user
points gcsfs at an emulator.

The S3 and HTTP cases (faults, replaced objects, request counts) are in test_remote.py; this file
proves that the same commands work through gcsfs, whose ranged reads, listings and uploads are its
own: values equal to torch.load of the original, outputs that appear whole, exit 2 with one line.
"""

from __future__ import annotations

import io
import json
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import parse_json

# gcsfs >= 2026.10 asks a gRPC control plane for each bucket's layout first (60 s against an
# emulator that has none); the plain JSON-API client is what the emulator serves
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

ANON = json.dumps({"token": "anon"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gcs() -> Any:
    """The emulator on loopback and a gcsfs client on it; STORAGE_EMULATOR_HOST points ours there too."""
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="ckpts")
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        yield gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    server.stop()


def _model_sd() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(4):
        sd[f"layers.{i}.weight"] = torch.randn(64, 64, generator=g)
        sd[f"layers.{i}.bias"] = torch.randn(64, generator=g).to(torch.bfloat16)
    sd["head.weight"] = torch.randn(10, 64, generator=g)
    return sd


def _put(fs: Any, tmp_path: Path, name: str, obj: Any) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    fs.put_file(str(path), f"ckpts/{name}")
    return f"gs://ckpts/{name}"


def _load(fs: Any, url: str) -> Any:
    fs.invalidate_cache()
    return torch.load(io.BytesIO(fs.cat_file(url)), weights_only=True)


def _same(got: Any, want: Any) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_inspect_of_a_gs_object_lists_its_tensors_by_ranged_reads(cli, tmp_path, gcs):
    sd = _model_sd()
    url = _put(gcs, tmp_path, "m.pt", {"model": sd, "step": 7})
    data = parse_json(cli("inspect", url, "--storage-options", ANON, "--json"))
    assert data["state_dict_key"] == "model"
    assert [t["key"] for t in data["tensors"]] == list(sd)
    assert data["requests"] <= 4 and data["bytes_read"] <= (tmp_path / "m.pt").stat().st_size


def test_extract_from_gs_to_gs_appears_whole_and_equals_the_original(cli, tmp_path, gcs):
    sd = _model_sd()
    url = _put(gcs, tmp_path, "train.pt", {"model": sd, "optimizer": {"lr": 0.1}})
    out = "gs://ckpts/backbone.pt"
    r = cli("extract", url, "-x", "head", "-o", out, "--dtype", "float32", "--storage-options", ANON)
    assert r.exit_code == 0, r.stderr
    want = OrderedDict((k, v.float()) for k, v in sd.items() if not k.startswith("head."))
    _same(_load(gcs, out), want)
    # an existing object needs --force, as a local file does
    again = cli("extract", url, "-o", out, "--storage-options", ANON)
    assert again.exit_code == 2 and "--force" in again.stderr
    forced = cli("extract", url, "-i", "head", "-o", out, "--force", "--storage-options", ANON)
    assert forced.exit_code == 0, forced.stderr
    _same(_load(gcs, out), {"head.weight": sd["head.weight"]})


def test_diff_of_gs_and_local_copies_is_identical(cli, tmp_path, gcs):
    sd = _model_sd()
    url = _put(gcs, tmp_path, "a.pt", sd)
    data = parse_json(cli("diff", url, tmp_path / "a.pt", "--storage-options", ANON, "--json"))
    assert data["identical"] is True


def test_a_missing_gs_object_is_exit_2_in_one_line(cli, gcs):
    r = cli("inspect", "gs://ckpts/nope.pt", "--storage-options", ANON)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "gs://ckpts/nope.pt" in lines[0] and "Traceback" not in r.stderr
