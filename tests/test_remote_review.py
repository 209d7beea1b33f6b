"""A reviewer's attacks on remote directories (issue 12), each a case that once went wrong: names
an index gives its shards that a URL reads as something else, outputs next to their inputs,
dry runs that write, and torchrun's gating of misconfigured environments.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import test_remote
import torch
from safetensors.torch import save

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

s3_endpoint = test_remote.s3_endpoint
bucket = test_remote.bucket
http_store = test_remote.http_store
store = test_remote.store
one_line_error = test_remote.one_line_error


@pytest.fixture(scope="module", autouse=True)
def _clients_of_this_server(s3_endpoint: str) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _index(shard: str) -> bytes:
    return json.dumps({"weight_map": {"w": shard}}).encode()


SHARD = save({"w": torch.zeros(2)})


@pytest.mark.parametrize(
    "name",
    [
        "%2e%2e/secret.safetensors",  # the client decodes it to `..`: the server's /secret.safetensors
        ".%2E/secret.safetensors",
        "a#x.safetensors",  # a fragment: the object `a`, not the one named
        "a?x.safetensors",  # a query string on the object `a`
    ],
)
def test_an_https_index_naming_shards_a_url_reads_otherwise_is_refused(cli, store, name):
    store.objects["/secret.safetensors"] = store.objects["/hub/a"] = SHARD
    store.objects["/hub/model.safetensors.index.json"] = _index(name)
    r = cli("inspect", f"{store.url}/hub/model.safetensors.index.json")
    assert r.exit_code == 2
    assert repr(name) in one_line_error(r)
    assert store.served == len(_index(name))  # the index, and no shard


def test_an_s3_index_naming_a_chained_url_is_refused(cli, bucket):
    """fsspec reads `A::B` as a chain: the shard `ab::s3://other/x` was the object `ab` of the
    index's directory, opened with options for another store (here: a TypeError from aiobotocore)."""
    name, fs = bucket
    fs.pipe(f"{name}/m/ab", SHARD)
    shard = "ab::s3://other/x.safetensors"
    fs.pipe(f"{name}/m/model.safetensors.index.json", _index(shard))
    r = cli("inspect", f"s3://{name}/m/model.safetensors.index.json")
    assert r.exit_code == 2
    assert repr(shard) in one_line_error(r)


# ------------------------------------------------------------------------------ torchrun gating

GATING = """
import json, sys
from ckptsurgeon.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
open(sys.argv[2], "w").write(json.dumps(codes))
"""


def test_a_misconfigured_torchrun_world_is_exit_2_on_a_follower_whatever_the_argv_form(tmp_path):
    """WORLD_SIZE=2, RANK=1 and no rendezvous: every spelling of a sharded write joins the ranks
    and fails cleanly (exit 2, nothing written), where `-fo OUT` once returned 0 at once, leaving
    rank 0 waiting for it; a command that writes no shards is rank 0's alone (0, nothing said)."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in.pt"
    torch.save({"a": torch.zeros(3), "b": torch.ones(2)}, src)
    out = str(tmp_path / "out") + "/"
    writes = [
        ["extract", str(src), "-o", out, "--format", "hf"],
        ["extract", str(src), f"--output={out}", "--format=dcp"],
        ["extract", str(src), f"-o{out}", "--format", "hf"],
        ["extract", str(src), "-fo", out, "--format", "hf"],
        ["extract", str(src), f"-fo{out}", "--format=hf"],
    ]
    rank_0_only = [["inspect", str(src)], ["extract", str(src), "-o", out, "--format", "hf", "--dry-run"]]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "CKPTSURGEON_DIST_TIMEOUT": "5"}
    env.pop("MASTER_ADDR", None)
    report = tmp_path / "codes.json"
    r = subprocess.run(
        [sys.executable, "-c", GATING, json.dumps(writes + rank_0_only), str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(report.read_text()) == [2] * len(writes) + [0] * len(rank_0_only)
    assert "Traceback" not in r.stderr
    assert r.stderr.count("cannot join the other ranks") == len(writes)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ remote outputs


def _layout(fs: Any, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    try:
        return {k: fs.info(k)["ETag"] for k in fs.find(prefix)}
    except FileNotFoundError:
        return {}


def test_dry_runs_and_neighbour_prefixes_on_s3(cli, tmp_path, bucket):
    """`--dry-run` to a remote prefix, also over an existing layout with --force, writes and deletes
    nothing; an output `m` beside the input `m2/` is not taken for it, with or without a `/`."""
    name, fs = bucket
    src = tmp_path / "in.pt"
    sd = {"a": torch.arange(300.0), "b": torch.ones(200)}
    torch.save(sd, src)
    assert cli("extract", src, "-o", f"s3://{name}/m2/", "--format", "hf", "--max-shard-size", "1KB").exit_code == 0
    m2 = _layout(fs, f"{name}/m2")
    assert len(m2) == 3  # two shards and the index

    for args in (
        ("-o", f"s3://{name}/m/", "--format", "hf"),
        ("-o", f"s3://{name}/m2/", "--format", "dcp", "--force"),
        ("-o", f"s3://{name}/m2", "--format", "hf", "--force", "--include", "a"),
    ):
        r = cli("extract", src, *args, "--dry-run", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["dry_run"] is True
    assert _layout(fs, f"{name}/m") == {} and _layout(fs, f"{name}/m2") == m2

    for out in (f"s3://{name}/m", f"s3://{name}/m/"):
        r = cli("rename", f"s3://{name}/m2/", "--add-prefix", "x.", "-o", out, "--format", "hf", "--force")
        assert r.exit_code == 0, r.stderr
        assert _layout(fs, f"{name}/m2") == m2
    from safetensors.torch import load_file

    fs.get(f"{name}/m/", str(tmp_path / "back"), recursive=True)
    back = {k: v for f in sorted((tmp_path / "back").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(back) == {"x.a", "x.b"} and torch.equal(back["x.a"], sd["a"]) and torch.equal(back["x.b"], sd["b"])


def test_folder_markers_and_names_both_object_and_prefix_on_s3(cli, tmp_path, bucket):
    """S3 lets `d/x.safetensors` and `d/x.safetensors/y` both exist, and the console's "Create folder"
    makes an empty object `out/`: the object is read (it was hidden behind the prefix: "no
    checkpoint"), and an output prefix holding only its marker is empty (it was "output exists",
    then with --force "it also holds 'out'")."""
    import boto3

    name, fs = bucket
    client = boto3.client("s3")
    client.put_object(Bucket=name, Key="d/model.safetensors", Body=SHARD)
    client.put_object(Bucket=name, Key="d/model.safetensors/notes.txt", Body=b"mine")
    data = json.loads(cli("inspect", f"s3://{name}/d/", "--json").stdout)
    assert data["format"] == "safetensors" and data["num_tensors"] == 1

    client.put_object(Bucket=name, Key="out/", Body=b"")
    src = tmp_path / "in.pt"
    torch.save({"a": torch.arange(4.0)}, src)
    r = cli("extract", src, "-o", f"s3://{name}/out/", "--format", "hf")
    assert r.exit_code == 0, r.stderr
    data = json.loads(cli("inspect", f"s3://{name}/out/", "--json").stdout)
    assert data["format"] == "safetensors" and data["num_tensors"] == 1


def test_a_single_file_output_named_like_a_remote_directory_is_refused(cli, tmp_path, bucket):
    """`-o s3://b/o1 --force` where `o1/` holds a layout once wrote an object `o1` beside the prefix
    (locally a directory is never replaced by a file): refused, the layout untouched; with `/`
    the layout is replaced."""
    name, fs = bucket
    src = tmp_path / "in.pt"
    torch.save({"a": torch.arange(300.0), "b": torch.ones(200)}, src)
    assert cli("extract", src, "-o", f"s3://{name}/o1", "--format", "hf", "--max-shard-size", "1KB").exit_code == 0
    before = _layout(fs, f"{name}/o1")
    for args in ((), ("--force",), ("--format", "safetensors", "--force")):
        r = cli("extract", src, "-o", f"s3://{name}/o1", "--include", "a", *args)
        assert r.exit_code == 2
        assert "a directory" in one_line_error(r)
        assert _layout(fs, f"{name}/o1") == before and not fs.isfile(f"{name}/o1")
    assert cli("extract", src, "-o", f"s3://{name}/o1/", "--include", "a", "--force").exit_code == 0
    assert [k.rsplit("/", 1)[-1] for k in _layout(fs, f"{name}/o1")] == ["model.safetensors"]
