"""hf:// checkpoints (issue 12) through huggingface_hub's HfFileSystem against a Hub server on
loopback that speaks the parts of the Hub's HTTP API a reader uses: the revision of a repo
(`/api/models/ORG/REPO/revision/REV`), its tree (`/tree/REV/PATH`), paths-info, and files by
`/ORG/REPO/resolve/REV/PATH` with `Range`. It counts requests and bytes served, as the S3 and HTTP
stores of test_remote.py do.

What is asserted is what a user sees: the values of torch.load of the original, `--json`'s
bytes_read/requests against the server's own counts, revisions given as `@REV`, one-line exit 2.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import itertools
import json
import threading
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import parse_json

pytest.importorskip("huggingface_hub")

_COMMIT_NUMBERS = itertools.count()


class _Hub(http.server.ThreadingHTTPServer):
    """Repos as the Hub keeps them: every `put` is a new commit, and a branch or tag names one."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.commits: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, commit id) -> path -> bytes
        self.refs: dict[tuple[str, str], str] = {}  # (repo, branch or tag) -> commit id
        self.lock = threading.Lock()
        self.requests = self.file_gets = self.served = self.commit_requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def put(self, repo: str, path: str, data: bytes, revision: str = "main") -> str:
        """Commit `data` at `path` on the branch `revision`; returns the new commit id."""
        with self.lock:
            parent = self.commits.get((repo, self.refs.get((repo, revision), "")), {})
            sha = hashlib.sha1(f"{repo}{next(_COMMIT_NUMBERS)}".encode()).hexdigest()  # never twice, as on the Hub
            self.commits[(repo, sha)] = {**parent, path: data}
            self.refs[(repo, revision)] = sha
        return sha

    def delete(self, repo: str, path: str, revision: str = "main") -> str:
        with self.lock:
            files = dict(self.commits[(repo, self.refs[(repo, revision)])])
            files.pop(path, None)
            sha = hashlib.sha1(f"{repo}{next(_COMMIT_NUMBERS)}".encode()).hexdigest()
            self.commits[(repo, sha)] = files
            self.refs[(repo, revision)] = sha
        return sha

    def commit_of(self, repo: str, revision: str) -> str | None:
        return self.refs.get((repo, revision), revision if (repo, revision) in self.commits else None)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Hub

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, code: int = 200) -> None:
        self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _missing(self, what: str) -> None:
        self._send(404, json.dumps({"error": what}).encode(), {"X-Error-Code": what, "X-Error-Message": what})

    def _files(self, repo: str, revision: str) -> dict[str, bytes] | None:
        with self.server.lock:
            sha = self.server.commit_of(repo, revision)
            return None if sha is None else self.server.commits[(repo, sha)]

    @staticmethod
    def _entry(path: str, data: bytes | None) -> dict[str, Any]:
        if data is None:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": path}

    def _children(self, files: dict[str, bytes], folder: str) -> list[dict[str, Any]]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        out: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            head, sep, _ = path[len(prefix) :].partition("/")
            name = prefix + head
            out.setdefault(name, self._entry(name, None if sep else data))
        return list(out.values())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests += 1
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and (len(parts) == 4 or len(parts) >= 6):
            repo = "/".join(parts[2:4])
            what, revision, rest = (
                (parts[4], parts[5], "/".join(parts[6:])) if len(parts) >= 6 else ("revision", "main", "")
            )
            files = self._files(repo, revision)
            if files is None:
                return self._missing(
                    "RepoNotFound" if not any(r == repo for r, _ in self.server.refs) else "RevisionNotFound"
                )
            if what == "revision":
                return self._json(
                    {
                        "id": repo,
                        "sha": self.server.commit_of(repo, revision),
                        "private": False,
                        "siblings": [{"rfilename": p} for p in files],
                    }
                )
            if what == "tree":
                children = self._children(files, rest)
                if not children and rest:
                    return self._missing("EntryNotFound")
                return self._json(children)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            files = self._files(repo, revision)
            if files is None or path not in files:
                return self._missing("EntryNotFound")
            data = files[path]
            headers = {
                "ETag": '"' + hashlib.sha1(data).hexdigest() + '"',
                "X-Repo-Commit": str(self.server.commit_of(repo, revision)),
                "Accept-Ranges": "bytes",
            }
            code, body = 200, data
            ranged = self.headers.get("Range")
            if ranged:
                start_s, _, end_s = ranged.removeprefix("bytes=").partition("-")
                start = int(start_s)
                end = min(int(end_s) + 1 if end_s else len(data), len(data))
                code, body = 206, data[start:end]
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            with self.server.lock:
                self.server.file_gets += self.command == "GET"
                self.server.served += len(body) if self.command == "GET" else 0
            return self._send(code, body, headers)
        return self._missing("NotFound")

    def do_POST(self) -> None:
        with self.server.lock:
            self.server.requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            return self._upload(f"{parts[2]}/{parts[3]}", parts[4], parts[5], body)
        form = urllib.parse.parse_qs(body.decode())
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "paths-info":
            files = self._files("/".join(parts[2:4]), parts[5])
            if files is None:
                return self._missing("RepoNotFound")
            out = []
            for path in form.get("paths", []):
                if path in files:
                    out.append(self._entry(path, files[path]))
                elif any(p.startswith(path.rstrip("/") + "/") for p in files):
                    out.append(self._entry(path, None))
            return self._json(out)
        return self._missing("NotFound")

    def _upload(self, repo: str, step: str, revision: str, body: bytes) -> None:
        """The two steps of huggingface_hub's create_commit: which files go inline ("regular": all
        of them here, no LFS), then the commit itself, NDJSON lines of base64 files and deletions."""
        if self._files(repo, revision) is None:
            return self._missing("RepoNotFound")
        if step == "preupload":
            files = json.loads(body)["files"]
            return self._json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        sha = ""
        for line in body.decode().splitlines():
            op = json.loads(line)
            value = op["value"]
            if op["key"] == "file":
                sha = self.server.put(repo, value["path"], base64.b64decode(value["content"]), revision)
            elif op["key"] == "deletedFile":
                sha = self.server.delete(repo, value["path"], revision)
        with self.server.lock:
            self.server.commit_requests += 1
        return self._json({"commitUrl": f"{self.server.url}/{repo}/commit/{sha}", "commitOid": sha})


@pytest.fixture(scope="module")
def hub_server() -> Any:
    server = _Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture
def hub(hub_server: _Hub) -> _Hub:
    hub_server.commits.clear()
    hub_server.refs.clear()
    hub_server.requests = hub_server.file_gets = hub_server.served = 0
    return hub_server


def _options(hub: _Hub) -> str:
    return json.dumps({"endpoint": hub.url, "token": False})


def _model_sd(layers: int = 8, width: int = 128) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(layers):
        sd[f"layers.{i}.weight"] = torch.randn(width, width, generator=g)
        sd[f"layers.{i}.bias"] = torch.randn(width, generator=g)
    sd["lm_head.weight"] = torch.randn(50, width, generator=g).to(torch.bfloat16)
    return sd


def _saved(tmp_path: Path, name: str, obj: Any) -> bytes:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(obj, path)
    else:
        torch.save(obj, path)
    return path.read_bytes()


def _same(got: Any, want: Any) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_inspect_of_an_hf_object_reads_its_directory_and_pickle_only(cli, tmp_path, hub):
    sd = _model_sd(width=512)  # 8 MB
    data = _saved(tmp_path, "model.pt", {"state_dict": sd, "epoch": 3})
    hub.put("org/repo", "ckpt/model.pt", data)
    out = parse_json(cli("inspect", "hf://org/repo/ckpt/model.pt", "--storage-options", _options(hub), "--json"))
    assert out["state_dict_key"] == "state_dict"
    assert [t["key"] for t in out["tensors"]] == list(sd)
    assert out["bytes_read"] == hub.served < 300_000  # the tail and data.pkl: no block of several MB
    assert hub.file_gets <= 4


def test_extract_from_a_revision_equals_torch_load_of_that_revision(cli, tmp_path, hub):
    old, new = _model_sd(), _model_sd()
    new["lm_head.weight"] = new["lm_head.weight"] + 1
    hub.put("org/repo", "model.safetensors", _saved(tmp_path, "new.safetensors", dict(new)))
    hub.put("org/repo", "model.safetensors", _saved(tmp_path, "old.safetensors", dict(old)), revision="v1")
    # (a tag made by a commit of its own: the Hub names both by commit id)
    out = tmp_path / "head.pt"
    r = cli(
        "extract", "hf://org/repo@v1/model.safetensors", "-i", "lm_head", "-o", out, "--storage-options", _options(hub)
    )
    assert r.exit_code == 0, r.stderr
    _same(torch.load(out, weights_only=True), {"lm_head.weight": old["lm_head.weight"]})


def test_diff_of_an_hf_object_and_a_local_copy_is_identical(cli, tmp_path, hub):
    sd = _model_sd(2)
    hub.put("org/repo", "model.pt", _saved(tmp_path, "model.pt", sd))
    out = parse_json(
        cli("diff", "hf://org/repo/model.pt", tmp_path / "model.pt", "--storage-options", _options(hub), "--json")
    )
    assert out["identical"] is True


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("hf://org/repo/nope.pt", "nope.pt"),
        ("hf://org/other/model.pt", "org/other"),
        ("hf://org/repo@v9/model.pt", "v9"),
    ],
)
def test_a_missing_file_repo_or_revision_is_exit_2_in_one_line(cli, tmp_path, hub, url, what):
    hub.put("org/repo", "model.pt", _saved(tmp_path, "model.pt", _model_sd(1)))
    r = cli("inspect", url, "--storage-options", _options(hub))
    assert r.exit_code == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and what in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_push_to_the_branch_while_reading_does_not_mix_commits(tmp_path, hub):
    """The branch named in the URL is pinned to its commit when the file is opened: a push that
    moves the branch afterwards changes nothing that is read."""
    from ckptsurgeon.io import as_torch, load_checkpoint

    old = _model_sd(2)
    hub.put("org/repo", "model.pt", _saved(tmp_path, "old.pt", old))
    options = json.loads(_options(hub))
    with load_checkpoint("hf://org/repo/model.pt", storage_options=options) as ckpt:
        new = OrderedDict((k, v + 1) for k, v in old.items())
        hub.put("org/repo", "model.pt", _saved(tmp_path, "new.pt", new))
        _same(as_torch(ckpt.state_dict), old)
    with load_checkpoint("hf://org/repo/model.pt", storage_options=options) as ckpt:
        _same(as_torch(ckpt.state_dict), new)


def test_extract_to_the_hub_commits_the_whole_file_once(cli, tmp_path, hub):
    sd = _model_sd(2)
    hub.put("org/repo", "train.pt", _saved(tmp_path, "train.pt", {"model": sd, "step": 9}))
    options = _options(hub)
    r = cli("extract", "hf://org/repo/train.pt", "-o", "hf://org/repo/weights/model.pt", "--storage-options", options)
    assert r.exit_code == 0, r.stderr
    assert hub.commit_requests == 1  # one commit: the file appears whole, in one step
    files = hub.commits[("org/repo", hub.refs[("org/repo", "main")])]
    _same(torch.load(io.BytesIO(files["weights/model.pt"]), weights_only=True), sd)
    again = cli(
        "extract", "hf://org/repo/train.pt", "-o", "hf://org/repo/weights/model.pt", "--storage-options", options
    )
    assert again.exit_code == 2 and "--force" in again.stderr and hub.commit_requests == 1
