"""Hugging Face sharded and DCP directories on remote stores (issue 12): read from, and written
to, moto's S3 server and the loopback HTTP store of test_remote.py.

Inputs are made by the real writers (huggingface_hub's `save_torch_state_dict`, `dcp.save` from one
process and from two gloo ranks) and uploaded; what is asserted is what a user sees: values equal
to torch's / huggingface_hub's own loading, `--json` requests and bytes, one-line exit-2 errors with
nothing written, and outputs that huggingface_hub and `dcp.load` read back, whose index appears
last (the store's own log of requests, seen by a proxy, says so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import test_dcp
import test_remote
import torch
import torch.distributed.checkpoint as dcp
from conftest import parse_json

from sample_models.models import TiedLM

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# the servers of test_remote.py (fixtures by the same names)
s3_endpoint = test_remote.s3_endpoint
bucket = test_remote.bucket
http_store = test_remote.http_store
store = test_remote.store
two_ranks = test_dcp.two_ranks
single = test_dcp.single
one_line_error = test_remote.one_line_error
MODEL = "sample_models.models:TiedLM"


@pytest.fixture(scope="module", autouse=True)
def _clients_of_this_server(s3_endpoint: str) -> None:
    """S3 clients made for an earlier module's server (fsspec caches them) are not reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


# ------------------------------------------------------------------------------------ inputs


def tied_bf16() -> OrderedDict[str, torch.Tensor]:
    """TiedLM's state_dict in bfloat16: `head.weight` is `embed.weight`."""
    torch.manual_seed(3)
    sd: OrderedDict[str, torch.Tensor] = TiedLM().to(torch.bfloat16).state_dict()
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()
    return sd


def hub_directory(tmp_path: Path, sd: Any, name: str = "hub") -> Path:
    """`sd` saved by huggingface_hub in shards of at most 1 kB (one per tensor or two)."""
    from huggingface_hub import save_torch_state_dict

    out = tmp_path / name
    out.mkdir()
    save_torch_state_dict(dict(sd), out, max_shard_size="1KB")  # (it drops ties from the dict it is given)
    return out


def upload_dir(bucket: Any, local: Path, prefix: str) -> str:
    """Every file of `local` (and of its subdirectories) put under `prefix/` in the bucket; the
    URL of the prefix."""
    name, fs = bucket
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{name}/{prefix}/{path.relative_to(local).as_posix()}")
    return f"s3://{name}/{prefix}"


def download_dir(bucket: Any, prefix: str, local: Path) -> Path:
    name, fs = bucket
    fs.invalidate_cache()
    local.mkdir()
    for key in fs.ls(f"{name}/{prefix}", detail=False, refresh=True):
        fs.get_file(key, str(local / key.rsplit("/", 1)[-1]))
    return local


def listing(bucket: Any, prefix: str) -> list[str]:
    name, fs = bucket
    fs.invalidate_cache()
    try:
        return sorted(k.rsplit("/", 1)[-1] for k in fs.ls(f"{name}/{prefix}", detail=False, refresh=True))
    except FileNotFoundError:
        return []


def same(got: Any, want: Any) -> None:
    """Equal nested values: tensors bit for bit with their dtype, the rest by == (the order of keys
    aside: torch's own consolidation of a DCP directory orders them by its own rules)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (list(got), list(want))
        for k in want:
            same(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            same(g, w)
    else:
        assert got == want


def flat_equal(path: Path, want: OrderedDict[str, torch.Tensor]) -> None:
    got = torch.load(path, weights_only=True)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# ----------------------------------------------------------------------- reading: HF on S3


@pytest.fixture
def hub_on_s3(tmp_path: Path, bucket: Any) -> tuple[str, Path, OrderedDict[str, torch.Tensor]]:
    sd = tied_bf16()
    local = hub_directory(tmp_path, sd)
    return upload_dir(bucket, local, "models/tied"), local, sd


def test_inspect_of_an_hf_directory_reads_the_index_and_one_request_per_shard(cli, hub_on_s3):
    url, local, sd = hub_on_s3
    shards = sorted(p for p in local.iterdir() if p.suffix == ".safetensors")
    index = local / "model.safetensors.index.json"
    assert len(shards) >= 3
    for where in (url + "/", url, f"{url}/model.safetensors.index.json"):
        data = parse_json(cli("inspect", where, "--json"))
        assert data["format"] == "hf-sharded"
        assert {t["key"]: t["dtype"] for t in data["tensors"]} == {k: "bfloat16" for k in sd}
        assert [s["file"] for s in data["shards"]] == [p.name for p in shards]
        named = where.endswith(".json")
        # the index, one ranged GET per shard (its header is in its first 100 kB), and for a
        # directory one look-up and one listing
        assert data["requests"] == 1 + len(shards) + (0 if named else 2), where
        assert data["bytes_read"] == index.stat().st_size + sum(p.stat().st_size for p in shards)


def test_every_command_on_an_hf_directory_on_s3(cli, tmp_path, hub_on_s3, bucket):
    url, local, sd = hub_on_s3
    out = tmp_path / "all.pt"
    data = parse_json(cli("extract", url + "/", "-o", out, "--json"))
    flat_equal(out, sd)
    assert data["requests"] >= 1 + 4 and data["bytes_read"] > 0
    r = cli("extract", url, "-i", "block", "-o", tmp_path / "block.safetensors")
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    got = load_file(tmp_path / "block.safetensors")
    assert set(got) == {k for k in sd if k.startswith("block.")}
    assert all(torch.equal(got[k], sd[k]) for k in got)

    r = cli("rename", url, "--add-prefix", "model.", "-o", tmp_path / "renamed.pt")
    assert r.exit_code == 0, r.stderr
    renamed = torch.load(tmp_path / "renamed.pt", weights_only=True)
    assert list(renamed) == [f"model.{k}" for k in sd]
    assert renamed["model.head.weight"].data_ptr() == renamed["model.embed.weight"].data_ptr()

    original = tmp_path / "original.pt"
    torch.save(sd, original)
    assert cli("diff", url, original).exit_code == 0
    changed = OrderedDict(sd)
    changed["norm.weight"] = sd["norm.weight"] + 1
    torch.save(changed, tmp_path / "changed.pt")
    d = parse_json(cli("diff", url, tmp_path / "changed.pt", "--json"))
    assert [m["key"] for m in d["value_mismatches"]] == ["norm.weight"]

    torch.save({"extra.weight": torch.ones(2)}, tmp_path / "extra.pt")
    r = cli("merge", url, tmp_path / "extra.pt", "-o", tmp_path / "merged.pt")
    assert r.exit_code == 0, r.stderr
    flat_equal(tmp_path / "merged.pt", OrderedDict(**sd, **{"extra.weight": torch.ones(2)}))

    data = parse_json(cli("inspect", url, "--json", "--model", MODEL))
    assert data["compatible"] is True


def test_hf_bin_shards_on_s3(cli, tmp_path, bucket):
    from huggingface_hub import save_torch_state_dict

    sd = tied_bf16()
    local = tmp_path / "bin"
    local.mkdir()
    save_torch_state_dict(dict(sd), local, max_shard_size="1KB", safe_serialization=False)
    url = upload_dir(bucket, local, "bin")
    out = tmp_path / "out.pt"
    data = parse_json(cli("extract", url, "-o", out, "--json"))
    flat_equal(out, sd)
    assert data["requests"] > 0


# ----------------------------------------------------------------------------- reading: DCP


def test_inspect_of_a_dcp_directory_on_s3_reads_its_metadata_only(cli, bucket, single, two_ranks):
    for local, prefix in ((single, "dcp/single"), (two_ranks / "pt", "dcp/ranks-pt"), (two_ranks / "st", "dcp/st")):
        url = upload_dir(bucket, local, prefix)
        metadata = (local / ".metadata").stat().st_size
        data = parse_json(cli("inspect", url + "/", "--json"))
        assert data["format"] == "dcp"
        assert data["state_dict_key"] == "model"
        assert {t["key"] for t in data["tensors"]} == {"rows", "cols", "rep", "odd"}
        # one look-up and one listing decide the layout; then `.metadata`, whole in one GET
        assert data["bytes_read"] == metadata
        assert data["requests"] == 3
        data = parse_json(cli("inspect", f"{url}/.metadata", "--json"))
        assert data["bytes_read"] == metadata and data["requests"] == 1


def test_every_command_on_dcp_directories_on_s3_equals_torch(cli, tmp_path, bucket, single, two_ranks):
    for local, prefix in ((single, "dcp/single"), (two_ranks / "pt", "dcp/pt"), (two_ranks / "st", "dcp/st")):
        url = upload_dir(bucket, local, prefix)
        want = test_dcp.torch_reference(two_ranks / "pt")  # torch consolidates the default format only
        same(want, test_dcp.full_state())  # which all three hold
        out = tmp_path / f"{prefix.replace('/', '-')}.pt"
        data = parse_json(cli("extract", url, "--key", "model", "-o", out, "--json"))
        same(torch.load(out, weights_only=True), want["model"])
        assert data["bytes_read"] > 0
        stats = parse_json(cli("inspect", url, "--key", "model", "--stats", "--json"))  # reads every value
        assert stats["requests"] > 3 and stats["bytes_read"] > (local / ".metadata").stat().st_size
        r = cli("rename", url, "--key", "model", "--add-prefix", "m.", "-o", tmp_path / "r.pt")
        assert r.exit_code == 0, r.stderr
        renamed = torch.load(tmp_path / "r.pt", weights_only=True)  # in its container, the rest unchanged
        assert set(renamed["model"]) == {f"m.{k}" for k in want["model"]} and renamed["step"] == 7
        torch.save(want["model"], tmp_path / "model.pt")
        assert cli("diff", url, tmp_path / "model.pt").exit_code == 0  # its state_dict is found at "model"
        (tmp_path / "r.pt").unlink()


def test_deepspeed_on_s3_through_latest_and_zero3_refused(cli, tmp_path, bucket):
    import test_sharded_read

    run, sd = test_sharded_read._deepspeed_run(tmp_path / "zero2")
    url = upload_dir(bucket, run, "ds/zero2")
    for where in (url, f"{url}/global_step10/"):
        data = parse_json(cli("inspect", where, "--json"))
        assert data["format"] == "deepspeed" and data["state_dict_key"] == "module"
    out = tmp_path / "out.pt"
    assert cli("extract", url, "-o", out).exit_code == 0
    flat_equal(out, sd)
    run3, _ = test_sharded_read._deepspeed_run(tmp_path / "zero3", zero3=True)
    r = cli("inspect", upload_dir(bucket, run3, "ds/zero3"))
    assert r.exit_code == 2 and "ZeRO-3" in one_line_error(r)


# ---------------------------------------------------------------------------------- https


def test_an_https_index_and_dcp_metadata_url(cli, tmp_path, store, single):
    sd = tied_bf16()
    local = hub_directory(tmp_path, sd)
    for path in local.iterdir():
        store.objects[f"/hub/{path.name}"] = path.read_bytes()
    shards = [p for p in local.iterdir() if p.suffix == ".safetensors"]
    data = parse_json(cli("inspect", f"{store.url}/hub/model.safetensors.index.json", "--json"))
    assert data["num_tensors"] == len(sd)
    assert data["requests"] == store.gets + store.heads == 1 + len(shards)
    assert data["bytes_read"] == store.served
    out = tmp_path / "out.pt"
    assert cli("extract", f"{store.url}/hub/model.safetensors.index.json", "-o", out).exit_code == 0
    flat_equal(out, sd)

    for path in single.iterdir():
        store.objects[f"/dcp/{path.name}"] = path.read_bytes()
    store.reset()
    data = parse_json(cli("inspect", f"{store.url}/dcp/.metadata", "--json"))
    assert data["format"] == "dcp" and (store.gets, store.heads) == (1, 0) and data["requests"] == 1
    r = cli("extract", f"{store.url}/dcp/.metadata", "--key", "model", "-o", tmp_path / "dcp.pt")
    assert r.exit_code == 0, r.stderr
    same(torch.load(tmp_path / "dcp.pt", weights_only=True), test_dcp.torch_reference(single)["model"])


def test_a_local_metadata_file_names_its_dcp_directory(cli, tmp_path, single):
    data = parse_json(cli("inspect", single / ".metadata", "--json"))
    assert (
        data["format"] == "dcp" and data["num_tensors"] == parse_json(cli("inspect", single, "--json"))["num_tensors"]
    )


# ---------------------------------------------------------------------------------- hostile


def _hostile(tmp_path: Path, bucket: Any, prefix: str, edit: Any) -> str:
    local = hub_directory(tmp_path, tied_bf16(), prefix)
    edit(local)
    return upload_dir(bucket, local, prefix)


def _edit_index(change: Any) -> Any:
    def edit(local: Path) -> None:
        path = local / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        change(index, local)
        path.write_text(json.dumps(index))

    return edit


def _leave(index: dict[str, Any], local: Path) -> None:
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../x.safetensors"


def _missing(index: dict[str, Any], local: Path) -> None:
    (local / index["weight_map"]["norm.weight"]).unlink()


def _disagree(index: dict[str, Any], local: Path) -> None:
    weights = index["weight_map"]
    a = next(iter(weights))
    b = next(k for k in weights if weights[k] != weights[a])
    weights[a], weights[b] = weights[b], weights[a]


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (_leave, "leaves the index's directory (..)"),
        (_missing, "no such object"),
        (_disagree, "which the index"),
    ],
)
def test_a_hostile_remote_hf_directory_is_one_line_exit_2(cli, tmp_path, bucket, edit, says):
    url = _hostile(tmp_path, bucket, "bad", _edit_index(edit))
    out = tmp_path / "out.pt"
    for args in (
        ("inspect", url),
        ("extract", url, "-o", out),
        ("extract", url, "-o", url + "-out/", "--format", "hf"),
    ):
        r = cli(*args)
        assert r.exit_code == 2, r.stderr
        assert says in one_line_error(r)
    assert not out.exists()
    assert listing(bucket, "bad-out") == []


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_a_dcp_metadata_with_a_payload_is_refused_and_never_runs(cli, tmp_path, bucket, single):
    import pickle

    marker = tmp_path / "ran"
    local = tmp_path / "evil"
    local.mkdir()
    for path in single.iterdir():
        (local / path.name).write_bytes(path.read_bytes())
    (local / ".metadata").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    url = upload_dir(bucket, local, "evil")
    out = tmp_path / "out.pt"
    for args in (("inspect", url), ("extract", url, "-o", out)):
        r = cli(*args)
        assert r.exit_code == 2
        assert "system" in one_line_error(r)
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------------------------ writing


def test_an_hf_output_on_s3_loads_with_huggingface_hub(cli, tmp_path, bucket):
    from huggingface_hub import load_torch_model

    sd = tied_bf16()
    torch.save(sd, tmp_path / "in.pt")
    name, _ = bucket
    data = parse_json(
        cli(
            "extract",
            tmp_path / "in.pt",
            "-o",
            f"s3://{name}/out/",
            "--format",
            "hf",
            "--max-shard-size",
            "1KB",
            "--json",
        )
    )
    files = [f["file"] for f in data["files"]]
    assert files[-1] == "model.safetensors.index.json" and len(files) >= 4
    assert listing(bucket, "out") == sorted(files)
    model = TiedLM().to(torch.bfloat16)
    result = load_torch_model(model, download_dir(bucket, "out", tmp_path / "back"))
    assert result.missing_keys == ["head.weight"] and not result.unexpected_keys  # tied: loaded with embed
    same(dict(model.state_dict()), dict(sd))
    assert model.head.weight is model.embed.weight
    # and read back remotely: the same tensors
    flat_equal_out = tmp_path / "again.pt"
    assert cli("extract", f"s3://{name}/out", "-o", flat_equal_out).exit_code == 0
    flat_equal(flat_equal_out, sd)


def test_a_dcp_output_on_s3_loads_with_dcp_load(cli, tmp_path, bucket, two_ranks):
    name, _ = bucket
    url = upload_dir(bucket, two_ranks / "pt", "ranks")
    r = cli("extract", url, "-o", f"s3://{name}/dcp-out/", "--format", "dcp")
    assert r.exit_code == 0, r.stderr
    back = download_dir(bucket, "dcp-out", tmp_path / "back")
    assert sorted(p.name for p in back.iterdir()) == [".metadata", "__0_0.distcp"]
    want = test_dcp.torch_reference(two_ranks / "pt")
    template = {k: torch.empty_like(v) for k, v in want["model"].items()}
    dcp.load(template, checkpoint_id=str(back))
    same(template, want["model"])


def test_an_hf_bin_output_on_s3(cli, tmp_path, bucket):
    sd = tied_bf16()
    torch.save(sd, tmp_path / "in.pt")
    name, _ = bucket
    r = cli(
        "extract",
        tmp_path / "in.pt",
        "-o",
        f"s3://{name}/bin",
        "--format",
        "hf-bin",
        "--max-shard-size",
        "1KB",
        "--verify",
    )
    assert r.exit_code == 0, r.stderr
    back = download_dir(bucket, "bin", tmp_path / "back")
    index = json.loads((back / "pytorch_model.bin.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(torch.load(back / shard, weights_only=True))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


# ------------------------------------------------------------- the order of uploads, --force


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch: Any) -> Any:
    host, port = s3_endpoint.removeprefix("http://").split(":")
    p = test_remote.S3Proxy((host, int(port)))
    yield p
    p.close()


def _cli_through(proxy: Any, *args: Any) -> Any:
    """The CLI in-process, its S3 requests through the proxy (`--storage-options endpoint_url`)."""
    from typer.testing import CliRunner

    from ckptsurgeon.cli import app

    options = json.dumps({"endpoint_url": proxy.url, "skip_instance_cache": True})
    return CliRunner().invoke(app, [str(a) for a in args] + ["--storage-options", options])


def test_shards_are_uploaded_first_and_the_index_last(tmp_path, bucket, proxy):
    sd = tied_bf16()
    torch.save(sd, tmp_path / "in.pt")
    name, _ = bucket
    out = f"s3://{name}/ordered/"
    r = _cli_through(proxy, "extract", tmp_path / "in.pt", "-o", out, "--max-shard-size", "1KB", "--jobs", "4")
    assert r.exit_code == 0, r.stderr
    changes = proxy.changes(f"{name}/ordered")
    assert changes[-1] == "PUT model.safetensors.index.json"
    assert len(changes) == len(listing(bucket, "ordered")) >= 4
    assert all(c.startswith("PUT model-") for c in changes[:-1])


def test_force_over_a_remote_layout(cli, tmp_path, bucket, proxy):
    """The old index goes first, then the new shards, the new index, and the old shards the new
    layout does not have."""
    name, _ = bucket
    sd = tied_bf16()
    old = upload_dir(bucket, hub_directory(tmp_path, sd, "old"), "forced")  # 5+ shards
    before = listing(bucket, "forced")
    torch.save(OrderedDict(w=torch.ones(300)), tmp_path / "small.pt")  # 1200 bytes: two shards of 1KB? one.
    r = cli("extract", tmp_path / "small.pt", "-o", old + "/", "--format", "hf")
    assert r.exit_code == 2 and "pass --force" in one_line_error(r)
    assert listing(bucket, "forced") == before
    small = OrderedDict(a=torch.ones(200), b=torch.zeros(200))  # two shards of 800 bytes
    torch.save(small, tmp_path / "small.pt")
    r = _cli_through(
        proxy, "extract", tmp_path / "small.pt", "-o", old, "--format", "hf", "--max-shard-size", "1KB", "--force"
    )
    assert r.exit_code == 0, r.stderr
    new = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert listing(bucket, "forced") == new
    changes = proxy.changes(f"{name}/forced")
    assert changes[0] == "DELETE model.safetensors.index.json"
    assert changes[1:4] == [f"PUT {n}" for n in new[:2]] + ["PUT model.safetensors.index.json"] or changes[1:4] == [
        f"PUT {new[1]}",
        f"PUT {new[0]}",
        "PUT model.safetensors.index.json",
    ]
    assert sorted(changes[4:]) == sorted(f"DELETE {n}" for n in before if n not in new)
    back = download_dir(bucket, "forced", tmp_path / "back")
    from safetensors.torch import load_file

    assert torch.equal(load_file(back / new[0])["a"], small["a"])

    # a prefix that holds anything but a layout is never replaced
    _, fs = bucket
    fs.pipe_file(f"{name}/forced/README.md", b"mine")
    r = cli("extract", tmp_path / "small.pt", "-o", old, "--format", "dcp", "--force")
    assert r.exit_code == 2 and "README.md" in one_line_error(r)
    assert listing(bucket, "forced") == sorted([*new, "README.md"])


def test_an_output_directory_that_holds_an_input_is_refused(cli, bucket, hub_on_s3):
    url, _, _ = hub_on_s3
    before = listing(bucket, "models/tied")
    r = cli("rename", url, "--add-prefix", "m.", "-o", url, "--format", "hf", "--force")
    assert r.exit_code == 2 and "holds an input" in one_line_error(r)
    assert listing(bucket, "models/tied") == before


def test_https_directory_outputs_are_read_only(cli, tmp_path, store):
    torch.save(tied_bf16(), tmp_path / "in.pt")
    r = cli("extract", tmp_path / "in.pt", "-o", f"{store.url}/out/", "--format", "hf")
    assert r.exit_code == 2 and "read-only" in one_line_error(r)
    assert store.gets == 0 and not store.objects


@pytest.mark.parametrize(("sig", "jobs"), [(signal.SIGKILL, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 4)])
def test_a_writer_killed_mid_layout_leaves_no_index(tmp_path, bucket, s3_endpoint, sig, jobs):
    """Killed while its third shard uploads: SIGKILL leaves the two shards done and no index;
    SIGTERM deletes them too (also an upload stalled in a worker thread, which the signal stops)."""
    name, _ = bucket
    sd = tied_bf16()
    torch.save(sd, tmp_path / "in.pt")
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = test_remote.S3Proxy((host, int(port)), stall_at=3)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = f"s3://{name}/killed/"
    command = ["extract", str(tmp_path / "in.pt"), "-o", out, "--max-shard-size", "1KB", "--jobs", str(jobs)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proxy.stalled.wait(60), proc.communicate(timeout=5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 143), err
    time.sleep(0.5)
    left = listing(bucket, "killed")
    assert not any(n.endswith(".index.json") for n in left)
    if sig == signal.SIGKILL:
        assert len(left) == 2 and all(n.startswith("model-") for n in left)
    else:
        assert left == [] and b"Traceback" not in err


def test_a_write_that_fails_midway_deletes_the_shards_it_uploaded(cli, tmp_path, bucket, proxy, store, monkeypatch):
    """The input (on the HTTP store) is replaced after a few shards were uploaded: exit 2, and
    every shard uploaded is deleted again; no index was ever uploaded."""
    name, _ = bucket
    sd = OrderedDict((f"w{i}", torch.full((64 << 10,), float(i))) for i in range(8))  # 256 KiB each
    torch.save(sd, tmp_path / "in.pt")
    store.objects["/in.pt"] = (tmp_path / "in.pt").read_bytes()
    changed = OrderedDict((k, v + 1) for k, v in sd.items())
    torch.save(changed, tmp_path / "changed.pt")
    store.replace_after = (5, "/in.pt", (tmp_path / "changed.pt").read_bytes())
    out = f"s3://{name}/failed/"
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # S3 through the proxy; the input from the HTTP store
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        r = cli("extract", f"{store.url}/in.pt", "-o", out, "--max-shard-size", "300KB", "--jobs", "1")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert r.exit_code == 2 and "changed while it was being read" in one_line_error(r)
    changes = proxy.changes(f"{name}/failed")
    puts = [c.removeprefix("PUT ") for c in changes if c.startswith("PUT ")]
    assert puts and not any(p.endswith(".index.json") for p in puts)
    assert sorted(c.removeprefix("DELETE ") for c in changes if c.startswith("DELETE ")) == sorted(puts)
    assert listing(bucket, "failed") == []


# ----------------------------------------------------------------------- torchrun, bucket to bucket


def test_two_torchrun_ranks_reshard_bucket_to_bucket_as_one_process_does(cli, tmp_path, bucket):
    """The multi-node case of the README: ranks that share no filesystem, only a bucket. Each rank
    reads its shards' tensors from S3 and uploads its shards; rank 0 uploads the index last. The
    objects equal a one-process run's byte for byte and load with huggingface_hub."""
    from huggingface_hub import load_torch_model
    from test_torchrun import same_directory, torchrun

    sd = tied_bf16()
    src = upload_dir(bucket, hub_directory(tmp_path, sd), "src")
    name, _ = bucket
    args = ("--format", "hf", "--max-shard-size", "2KB", "--json")
    single = parse_json(cli("extract", src, "-o", f"s3://{name}/one/", *args))
    ranks = torchrun(tmp_path, "extract", src, "-o", f"s3://{name}/two/", *args)
    data = ranks.json()
    assert data["files"] == single["files"] and len(data["files"]) >= 3  # shards, then the index
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and all(r["requests"] > 0 for r in data["ranks"])
    one, two = download_dir(bucket, "one", tmp_path / "one"), download_dir(bucket, "two", tmp_path / "two")
    same_directory(one, two)
    model = TiedLM().to(torch.bfloat16)
    result = load_torch_model(model, two)
    assert result.missing_keys == ["head.weight"] and not result.unexpected_keys  # tied: loaded with embed
    same(dict(model.state_dict()), dict(sd))
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(".two.*"))  # no staging left behind
