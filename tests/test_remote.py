"""Remote checkpoints (issue 12) against real servers on loopback: moto's S3 server and a small
HTTP server that honours `Range` and `If-Match`, counts what it serves, and can fail on purpose
(5xx, dropped connections, an object replaced while it is read).

What is asserted is what a user sees: values equal to torch.load of the original, `--json`'s
bytes_read/requests (and the servers' own counts), exit codes and one-line errors, and no object
appearing when a write fails or is killed.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import parse_json

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def one_line_error(result: Any) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def same_values(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def s3_endpoint() -> Any:
    """moto's S3 server on loopback; AWS_* point every S3 client (s3fs, ours) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CREDENTIALS.items():
            mp.setenv(k, v)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, request: Any) -> Any:
    """A new bucket for one test, and an s3fs client on it."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = "b-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:12]
    fs.mkdir(name)
    return name, fs


class _Store(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.gets = self.heads = self.served = 0
        self.faults: list[str] = []  # per GET, in order: "500", "503", "drop"
        self.replace_after: tuple[int, str, bytes] | None = None  # (GETs, path, new bytes)
        self.if_match = True  # honour If-Match (a server that ignores it serves whatever it has)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        self.gets = self.heads = self.served = 0


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Store

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        with self.server.lock:
            self.server.heads += 1
            data = self.server.objects.get(self.path)
        if data is None:
            self._status(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", _etag(data))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        store = self.server
        with store.lock:
            store.gets += 1
            fault = store.faults.pop(0) if store.faults else None
            if store.replace_after is not None and store.gets > store.replace_after[0]:
                _, path, new = store.replace_after
                store.objects[path] = new
                store.replace_after = None
            data = store.objects.get(self.path)
        if fault in ("500", "503"):
            self._status(int(fault))
            return
        if data is None:
            self._status(404)
            return
        if_match = self.headers.get("If-Match")
        if store.if_match and if_match is not None and if_match != _etag(data):
            self._status(412)
            return
        start, end = 0, len(data)
        ranged = self.headers.get("Range")
        if ranged:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, end = int(first), min(len(data), int(last) + 1 if last else len(data))
        body = data[start:end]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", _etag(data))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if fault == "drop":  # half the body, then the connection goes away
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        with store.lock:  # counted before the client can have it (it may finish before this thread runs on)
            store.served += len(body)
        self.wfile.write(body)

    def _status(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def http_store() -> Any:
    store = _Store()
    thread = threading.Thread(target=store.serve_forever, daemon=True)
    thread.start()
    yield store
    store.shutdown()


@pytest.fixture
def store(http_store: _Store) -> _Store:
    http_store.objects.clear()
    http_store.faults.clear()
    http_store.replace_after = None
    http_store.if_match = True
    http_store.reset()
    return http_store


# ------------------------------------------------------------------------------------ inputs


def _model_sd(layers: int = 6, width: int = 64) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(layers):
        sd[f"layers.{i}.weight"] = torch.randn(width, width)
        sd[f"layers.{i}.bias"] = torch.randn(width, dtype=torch.float16)
    sd["steps"] = torch.tensor(7)
    sd["embed.weight"] = torch.randn(10, width)
    sd["head.weight"] = sd["embed.weight"]  # tied
    return sd


def _save(tmp_path: Path, name: str, sd: Any) -> Path:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v for k, v in sd.items() if k != "head.weight"}, path)
    else:
        torch.save(sd, path)
    return path


def _put(bucket: Any, path: Path, key: str | None = None) -> str:
    name, fs = bucket
    fs.put_file(str(path), f"{name}/{key or path.name}")
    return f"s3://{name}/{key or path.name}"


# ------------------------------------------------------------------------------ reading: s3


def test_inspect_of_a_50_mb_pt_on_s3_reads_its_directory_and_pickle_only(cli, tmp_path, bucket):
    sd = OrderedDict((f"blocks.{i}.weight", torch.randn(512, 512)) for i in range(50))  # 50 x 1 MiB
    url = _put(bucket, _save(tmp_path, "big.pt", sd))
    data = parse_json(cli("inspect", url, "--json"))
    assert [t["key"] for t in data["tensors"]] == list(sd)
    assert all(t["shape"] == [512, 512] and t["dtype"] == "float32" for t in data["tensors"])
    assert data["bytes_read"] < 1 << 20
    assert 1 <= data["requests"] <= 4


def test_extract_of_a_tenth_reads_about_the_selected_bytes_in_one_request_each(cli, tmp_path, bucket):
    """Each selected record costs one ranged GET (its local header and data descriptor come with
    its data), plus the few requests of reading the directory."""
    sd = OrderedDict((f"blocks.{i}.weight", torch.randn(512, 512)) for i in range(50))
    url = _put(bucket, _save(tmp_path, "big.pt", sd))
    out = tmp_path / "tenth.pt"
    picked = [f"blocks.{i}." for i in range(10, 15)]
    data = parse_json(cli("extract", url, *[a for p in picked for a in ("-i", p)], "-o", out, "--json"))
    want = OrderedDict((k, v) for k, v in sd.items() if k.startswith(tuple(picked)))
    same_values(torch.load(out, weights_only=True), want)
    selected = sum(v.nbytes for v in want.values())
    assert selected <= data["bytes_read"] < selected + 300_000
    assert data["requests"] <= len(want) + 4


def test_a_storage_larger_than_one_request_is_read_in_parallel_parts(tmp_path, bucket):
    from ckptsurgeon.engine import remote
    from ckptsurgeon.io import as_torch, load_checkpoint

    sd = OrderedDict(big=torch.randn(10 << 20), small=torch.arange(5))  # 40 MiB: three 16 MiB requests
    url = _put(bucket, _save(tmp_path, "big.pt", sd))
    with load_checkpoint(url) as ckpt:
        before = ckpt.source.requests
        same_values(as_torch(ckpt.state_dict), sd)
        assert ckpt.source.requests - before <= 4 + (40 << 20) // remote.CHUNK
        assert ckpt.source.bytes_read < (40 << 20) + 400_000


def test_inspect_verify_on_s3_checks_every_crc(cli, tmp_path, bucket):
    path = _save(tmp_path, "m.pt", _model_sd())
    url = _put(bucket, path)
    data = parse_json(cli("inspect", url, "--verify", "--json"))
    assert data["num_tensors"] == len(_model_sd())
    assert path.stat().st_size * 0.9 < data["bytes_read"] < path.stat().st_size * 2


def test_extract_from_s3_equals_torch_load_of_the_original(cli, tmp_path, bucket):
    sd = _model_sd()
    url = _put(bucket, _save(tmp_path, "m.pt", sd))
    out = tmp_path / "out.pt"
    data = parse_json(cli("extract", url, "-i", "layers.1", "-i", "embed", "-o", out, "--json"))
    got = torch.load(out, weights_only=True)
    same_values(got, OrderedDict((k, v) for k, v in sd.items() if k.startswith(("layers.1.", "embed."))))
    assert data["bytes_read"] > 0 and data["requests"] >= 3


def test_extract_of_a_safetensors_object_and_to_safetensors(cli, tmp_path, bucket):
    sd = _model_sd()
    url = _put(bucket, _save(tmp_path, "m.safetensors", sd))
    out = tmp_path / "out.safetensors"
    r = cli("extract", url, "-x", "steps", "-o", out)
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    want = OrderedDict((k, v) for k, v in sd.items() if k not in ("steps", "head.weight"))
    got = load_file(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_diff_merge_rename_read_s3(cli, tmp_path, bucket):
    sd = _model_sd()
    url = _put(bucket, _save(tmp_path, "m.pt", sd))
    local = _save(tmp_path, "same.pt", sd)
    assert cli("diff", url, local).exit_code == 0
    changed = OrderedDict(sd)
    changed["layers.0.weight"] = sd["layers.0.weight"] + 1
    other = _put(bucket, _save(tmp_path, "other.pt", changed))
    d = parse_json(cli("diff", url, other, "--json"))
    assert [m["key"] for m in d["value_mismatches"]] == ["layers.0.weight"]
    assert d["requests"] > 0

    head = _put(bucket, _save(tmp_path, "head.pt", {"fc.weight": torch.ones(3, 3)}))
    merged = tmp_path / "merged.pt"
    r = cli("merge", url, head, "-o", merged)
    assert r.exit_code == 0, r.stderr
    same_values(torch.load(merged, weights_only=True), OrderedDict(**sd, **{"fc.weight": torch.ones(3, 3)}))

    renamed = tmp_path / "renamed.pt"
    r = cli("rename", url, "--add-prefix", "model.", "-o", renamed)
    assert r.exit_code == 0, r.stderr
    got = torch.load(renamed, weights_only=True)
    same_values(got, OrderedDict((f"model.{k}", v) for k, v in sd.items()))
    assert (
        got["model.head.weight"].untyped_storage().data_ptr() == got["model.embed.weight"].untyped_storage().data_ptr()
    )


def test_storage_options_give_the_endpoint(cli, tmp_path, bucket, monkeypatch):
    url = _put(bucket, _save(tmp_path, "m.pt", _model_sd()))
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = json.dumps({"endpoint_url": endpoint})
    data = parse_json(cli("inspect", url, "--storage-options", options, "--json"))
    assert data["num_tensors"] == len(_model_sd())
    r = cli("inspect", url, "--storage-options", "[1, 2]")
    assert r.exit_code == 2 and "--storage-options" in one_line_error(r)


def test_missing_object_and_bucket_are_one_line_exit_2(cli, bucket):
    name, _ = bucket
    for url in (f"s3://{name}/nothing.pt", "s3://no-such-bucket-here/m.pt"):
        r = cli("inspect", url)
        assert r.exit_code == 2
        assert one_line_error(r) == f"error: {url}: no such object"


def test_an_s3_object_replaced_while_it_is_read_is_refused(tmp_path, bucket):
    """Every ranged GET is pinned to the ETag validated at open (If-Match): the new object's
    bytes are never mixed with the old one's."""
    from ckptsurgeon.errors import BadCheckpointError
    from ckptsurgeon.io import as_torch, load_checkpoint

    sd = _model_sd()
    url = _put(bucket, _save(tmp_path, "m.pt", sd))
    ckpt = load_checkpoint(url)
    changed = OrderedDict((k, v + 1 if v.is_floating_point() else v) for k, v in sd.items())
    _put(bucket, _save(tmp_path, "m2.pt", changed), key="m.pt")
    with pytest.raises(BadCheckpointError, match="changed while it was being read"):
        as_torch(ckpt.state_dict)


# ---------------------------------------------------------------------------- reading: https


def test_https_inspect_of_a_pt_serves_under_1_mb_in_at_most_4_requests(cli, tmp_path, store):
    sd = OrderedDict((f"blocks.{i}.weight", torch.randn(512, 512)) for i in range(50))
    store.objects["/big.pt"] = _save(tmp_path, "big.pt", sd).read_bytes()
    data = parse_json(cli("inspect", f"{store.url}/big.pt", "--json"))
    assert [t["key"] for t in data["tensors"]] == list(sd)
    assert store.heads + store.gets == data["requests"] <= 4
    assert store.served == data["bytes_read"] < 1 << 20


def test_https_inspect_of_safetensors_takes_one_ranged_get(cli, tmp_path, store):
    """The first GET (bytes 0-99999) validates the object too: its size and ETag come with it."""
    sd = _model_sd()
    store.objects["/m.safetensors"] = _save(tmp_path, "m.safetensors", sd).read_bytes()
    data = parse_json(cli("inspect", f"{store.url}/m.safetensors", "--json"))
    assert data["num_tensors"] == len(sd) - 1
    assert (store.heads, store.gets) == (0, 1) and data["requests"] == 1
    # a header longer than the first 100 kB: one more GET, for the rest of it only
    many = OrderedDict((f"a.rather.long.module.path.number.{i:05d}.weight", torch.zeros(1)) for i in range(2000))
    store.objects["/long.safetensors"] = _save(tmp_path, "long.safetensors", many).read_bytes()
    store.reset()
    data = parse_json(cli("inspect", f"{store.url}/long.safetensors", "--json"))
    assert data["num_tensors"] == 2000
    assert (store.heads, store.gets) == (0, 2) and data["requests"] == 2


def test_extract_diff_merge_rename_from_https(cli, tmp_path, store):
    sd = _model_sd()
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", sd).read_bytes()
    store.objects["/m.safetensors"] = _save(tmp_path, "m.safetensors", sd).read_bytes()
    url = f"{store.url}/m.pt"
    out = tmp_path / "out.pt"
    assert cli("extract", url, "-o", out).exit_code == 0
    same_values(torch.load(out, weights_only=True), sd)
    assert cli("diff", url, f"{store.url}/m.safetensors", "-x", "head.weight").exit_code == 0
    r = cli("rename", url, "--sub", "s/^layers/blocks/", "-o", tmp_path / "r.pt")
    assert r.exit_code == 0, r.stderr
    assert list(torch.load(tmp_path / "r.pt", weights_only=True))[0] == "blocks.0.weight"
    store.objects["/extra.pt"] = _save(tmp_path, "extra.pt", {"x": torch.arange(4)}).read_bytes()
    r = cli("merge", url, f"{store.url}/extra.pt", "-o", tmp_path / "merged.pt")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(torch.load(tmp_path / "merged.pt", weights_only=True)["x"], torch.arange(4))


def test_transient_errors_are_retried(cli, tmp_path, store):
    sd = _model_sd()
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", sd).read_bytes()
    store.faults[:] = ["503", "drop", "500"]
    out = tmp_path / "out.pt"
    data = parse_json(cli("extract", f"{store.url}/m.pt", "-o", out, "--json"))
    same_values(torch.load(out, weights_only=True), sd)
    assert data["requests"] == store.heads + store.gets  # the failed attempts count too
    assert not store.faults


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_errors_that_persist_end_in_a_clean_exit_2(cli, tmp_path, store, fault):
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", _model_sd()).read_bytes()
    store.faults[:] = [fault] * 20
    out = tmp_path / "out.pt"
    r = cli("extract", f"{store.url}/m.pt", "-o", out)
    assert r.exit_code == 2
    line = one_line_error(r)
    assert "after 5 attempts" in line and f"{store.url}/m.pt" in line
    assert not out.exists()
    assert store.gets == 5


def test_an_object_replaced_mid_read_is_exit_2_and_nothing_is_written(cli, tmp_path, store):
    sd = _model_sd(layers=40, width=256)
    store.objects["/m.pt"] = _save(tmp_path, "m.pt", sd).read_bytes()
    changed = OrderedDict((k, v + 1 if v.is_floating_point() else v) for k, v in sd.items())
    # after the GETs of the head and of the central directory: the data's request sees the new object
    store.replace_after = (2, "/m.pt", _save(tmp_path, "m2.pt", changed).read_bytes())
    out = tmp_path / "out.pt"
    r = cli("extract", f"{store.url}/m.pt", "-o", out)
    assert r.exit_code == 2
    assert "changed while it was being read" in one_line_error(r)
    assert not out.exists()


def test_an_object_cut_short_behind_a_server_that_ignores_if_match_is_exit_2(cli, tmp_path, store):
    data = _save(tmp_path, "m.pt", _model_sd(layers=40, width=256)).read_bytes()
    store.objects["/m.pt"] = data
    store.if_match = False
    store.replace_after = (2, "/m.pt", data[: len(data) // 2])
    out = tmp_path / "out.pt"
    r = cli("extract", f"{store.url}/m.pt", "-o", out)
    assert r.exit_code == 2
    line = one_line_error(r)
    assert "not the one validated (changed or truncated)" in line, line
    assert not out.exists()


def test_a_missing_url_and_a_missing_backend(cli, store, monkeypatch):
    r = cli("inspect", f"{store.url}/none.pt")
    assert r.exit_code == 2 and one_line_error(r) == f"error: {store.url}/none.pt: no such object"
    # a backend that is not installed: the registry names a module that cannot be imported
    registry = sys.modules["fsspec.registry"]
    monkeypatch.setitem(registry.known_implementations, "gs", {"class": "no_such_module_here.GCSFileSystem"})
    monkeypatch.delitem(registry._registry, "gs", raising=False)
    r = cli("inspect", "gs://bucket/m.pt")
    assert r.exit_code == 2
    assert "pip install 'ckptsurgeon[gcs]'" in one_line_error(r)


# ----------------------------------------------------------------------------------- writing


def test_extract_and_rename_to_s3(cli, tmp_path, bucket):
    name, fs = bucket
    sd = _model_sd()
    url = _put(bucket, _save(tmp_path, "m.pt", sd))
    out = f"s3://{name}/out/extracted.pt"
    r = cli("extract", url, "-i", "layers", "-o", out)
    assert r.exit_code == 0, r.stderr
    fs.get_file(f"{name}/out/extracted.pt", str(tmp_path / "back.pt"))
    same_values(
        torch.load(tmp_path / "back.pt", weights_only=True),
        OrderedDict((k, v) for k, v in sd.items() if k.startswith("layers.")),
    )
    # an existing object needs --force
    r = cli("extract", url, "-o", out)
    assert r.exit_code == 2 and "pass --force" in one_line_error(r)
    r = cli("rename", url, "--add-prefix", "m.", "-o", out, "--force", "--verify")
    assert r.exit_code == 0, r.stderr
    fs.get_file(f"{name}/out/extracted.pt", str(tmp_path / "back2.pt"))
    assert list(torch.load(tmp_path / "back2.pt", weights_only=True)) == [f"m.{k}" for k in sd]
    st = f"s3://{name}/out/m.safetensors"
    assert cli("extract", url, "-x", "head.weight", "-o", st).exit_code == 0
    assert fs.cat_file(f"{name}/out/m.safetensors")[8:9] == b"{"
    # merge --average parks its means in the temp directory, then uploads the result
    halves = _put(
        bucket, _save(tmp_path, "h.pt", OrderedDict((k, v * 0 if v.is_floating_point() else v) for k, v in sd.items()))
    )
    avg = f"s3://{name}/out/avg.pt"
    r = cli("merge", url, halves, "--average", "-o", avg)
    assert r.exit_code == 0, r.stderr
    fs.get_file(f"{name}/out/avg.pt", str(tmp_path / "avg.pt"))
    got = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert torch.allclose(got["layers.0.weight"], sd["layers.0.weight"] / 2)


def test_https_is_read_only(cli, tmp_path, store):
    path = _save(tmp_path, "m.pt", _model_sd())
    r = cli("extract", path, "-o", f"{store.url}/out.pt")
    assert r.exit_code == 2 and "read-only" in one_line_error(r)
    assert store.gets == 0 and "/out.pt" not in store.objects


class S3Proxy:
    """A TCP proxy in front of the S3 server that logs each request line (`PUT /b/out/x`,
    `DELETE ...`) in the order the server received them, and can stop forwarding an upload: the
    `stall_at`-th PUT (never forwarded), or any upload once `stall_after` of its bytes went
    through. `stalled` says that it did, so that the writer can be killed mid-upload."""

    METHODS = (b"PUT", b"POST", b"DELETE", b"GET", b"HEAD")

    def __init__(self, target: tuple[str, int], *, stall_at: int | None = None, stall_after: int | None = None):
        self.target, self.stall_at, self.stall_after = target, stall_at, stall_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.log: list[str] = []
        self.puts = 0
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        uploading, sent = False, 0
        try:
            while chunk := src.recv(1 << 16):
                if requests and chunk[:8].split(b" ")[0] in self.METHODS:
                    method, path = chunk.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
                    uploading, sent = method in ("PUT", "POST"), 0
                    with self.lock:
                        self.log.append(f"{method} {path.split('?')[0]}")
                        self.puts += method == "PUT"
                        if method == "PUT" and self.puts == self.stall_at:
                            self.stalled.set()
                            return  # never forwarded
                if uploading and self.stall_after is not None:
                    sent += len(chunk)
                    if sent > self.stall_after:
                        self.stalled.set()
                        return  # never forward the rest
                dst.sendall(chunk)
        except OSError:
            pass

    def changes(self, prefix: str) -> list[str]:
        """The PUTs and DELETEs of objects under `prefix`, as `PUT name` / `DELETE name`."""
        out = []
        for entry in self.log:
            method, path = entry.split(" ", 1)
            if method in ("PUT", "DELETE") and f"/{prefix}/" in path:
                out.append(f"{method} {path.rsplit('/', 1)[-1]}")
        return out

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_writer_killed_mid_upload_leaves_no_object(tmp_path, bucket, s3_endpoint, sig):
    name, fs = bucket
    big = OrderedDict((f"w{i}", torch.randn(256, 1024)) for i in range(8))  # 8 MiB
    src = _save(tmp_path, "big.pt", big)
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = S3Proxy((host, int(port)), stall_after=1 << 20)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = f"s3://{name}/killed.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptsurgeon", "extract", str(src), "-o", out],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
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
    fs.invalidate_cache()
    assert not fs.exists(f"{name}/killed.pt")
    if sig == signal.SIGTERM:
        assert b"Traceback" not in err


# ------------------------------------------------------------------------ other layouts, fallback


def test_an_archive_not_laid_out_by_torch_save_is_read_with_every_header_checked(cli, tmp_path, store):
    """Storage records' data offsets are taken from torch.save's layout and checked when read; a
    ZIP another writer made (here Python's zipfile, no padding) is noticed at once and read as
    locally."""
    import zipfile

    sd = _model_sd()
    original = _save(tmp_path, "m.pt", sd)
    rezipped = tmp_path / "rezipped.pt"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(rezipped, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    store.objects["/rezipped.pt"] = rezipped.read_bytes()
    out = tmp_path / "out.pt"
    r = cli("extract", f"{store.url}/rezipped.pt", "-o", out)
    assert r.exit_code == 0, r.stderr
    same_values(torch.load(out, weights_only=True), sd)


def test_a_corrupt_storage_header_is_found_when_its_data_is_read(cli, tmp_path, store):
    sd = _model_sd()
    data = bytearray(_save(tmp_path, "m.pt", sd).read_bytes())
    at = data.index(b"m/data/3")  # the local header's copy of the name (the central directory's comes later)
    data[at : at + 8] = b"m/data/X"
    store.objects["/m.pt"] = bytes(data)
    out = tmp_path / "out.pt"
    r = cli("extract", f"{store.url}/m.pt", "-o", out)
    assert r.exit_code == 2
    assert "the local ZIP header of 'm/data/3' names a different member" in one_line_error(r)
    assert not out.exists()


def test_the_torch_fallback_reads_a_downloaded_copy(cli, tmp_path, bucket, monkeypatch):
    """What the engine does not model (a quantized tensor) is read by torch from a temporary copy
    of the object, removed afterwards."""
    sd = OrderedDict(w=torch.randn(4, 4), q=torch.quantize_per_tensor(torch.randn(3), 0.1, 3, torch.quint8))
    url = _put(bucket, _save(tmp_path, "q.pt", sd))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    data = parse_json(cli("inspect", url, "--json"))
    assert {t["key"]: t["dtype"] for t in data["tensors"]} == {"w": "float32", "q": "quint8"}
    assert data["bytes_read"] >= (tmp_path / "q.pt").stat().st_size
    assert list(scratch.iterdir()) == []


def test_local_files_report_bytes_and_no_requests(cli, tmp_path):
    path = _save(tmp_path, "m.pt", _model_sd())
    data = parse_json(cli("inspect", path, "--json"))
    assert data["requests"] == 0 and data["bytes_read"] > 0
    data = parse_json(cli("inspect", f"file://{path}", "--json"))
    assert data["requests"] == 0 and data["num_tensors"] == len(_model_sd())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_remote_pickle_is_refused_and_never_runs(cli, tmp_path, store):
    marker = tmp_path / "ran"
    store.objects["/evil.pt"] = _save(tmp_path, "evil.pt", {"w": torch.ones(2), "x": _Payload(marker)}).read_bytes()
    out = tmp_path / "out.pt"
    for args in (("inspect",), ("extract", "-o", out)):
        r = cli(*args[:1], f"{store.url}/evil.pt", *args[1:])
        assert r.exit_code == 2
        assert "refused to unpickle" in one_line_error(r) and "system" in r.stderr
    assert not marker.exists() and not out.exists()


def test_a_legacy_format_checkpoint_on_s3(cli, tmp_path, bucket):
    sd = _model_sd()
    path = tmp_path / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    url = _put(bucket, path)
    out = tmp_path / "out.pt"
    data = parse_json(cli("extract", url, "-o", out, "--json"))
    same_values(torch.load(out, weights_only=True), sd)
    assert data["requests"] >= 2


def test_any_fsspec_backend_reads_and_writes(cli, tmp_path):
    """A backend without S3's or HTTP's headers (fsspec's in-memory one): validated by `info`,
    read by `cat_file` ranges, written by `put_file`."""
    import fsspec

    fs = fsspec.filesystem("memory")
    sd = _model_sd()
    fs.pipe_file("/ckpts/m.pt", _save(tmp_path, "m.pt", sd).read_bytes())
    data = parse_json(cli("extract", "memory://ckpts/m.pt", "-i", "layers", "-o", "memory://out/l.pt", "--json"))
    assert data["requests"] >= 2
    (tmp_path / "l.pt").write_bytes(fs.cat_file("/out/l.pt"))
    same_values(
        torch.load(tmp_path / "l.pt", weights_only=True),
        OrderedDict((k, v) for k, v in sd.items() if k.startswith("layers.")),
    )
    r = cli("extract", "memory://ckpts/m.pt", "-o", "memory://out/l.pt")
    assert r.exit_code == 2 and "pass --force" in one_line_error(r)
    r = cli("inspect", "memory://ckpts/none.pt")
    assert r.exit_code == 2 and one_line_error(r) == "error: memory://ckpts/none.pt: no such object"
